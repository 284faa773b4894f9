"""Shared fixtures: a locally built tiny processor and synthetic shards (session-scoped, no downloads)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """A data cache shared by the session: tiny processor + 200 synthetic samples in 2 shards."""
    from data.processor import build_tiny_processor
    from data.synthetic import corpus, write_synthetic_shards

    d = tmp_path_factory.mktemp("mmrope_cache")
    build_tiny_processor(d / "tiny_processor", corpus(), min_pixels=56 * 56, max_pixels=140 * 140)
    write_synthetic_shards(
        d / "synthetic", num_samples=200, samples_per_shard=100, min_image_size=56, max_image_size=140, seed=0
    )
    return d


@pytest.fixture(scope="session")
def tiny_processor(cache_dir):
    from data.processor import load_processor

    return load_processor(cache_dir / "tiny_processor")


@pytest.fixture(scope="session")
def synthetic_shards(cache_dir) -> list[str]:
    return sorted(str(p) for p in (cache_dir / "synthetic").glob("shard-*.tar"))


def uneven_shards(synthetic_shards: list[str], folder: Path, sizes: tuple[int, ...]) -> list[str]:
    """Shards of the given record counts cut, in order, from the synthetic set (uneven shards, as users have)."""
    import webdataset as wds

    records = [r for url in synthetic_shards for r in wds.tarfile_to_samples()([{"url": url}])]
    shards, start = [], 0
    for i, n in enumerate(sizes):
        path = folder / f"uneven-{i}.tar"
        with wds.TarWriter(str(path)) as w:
            for r in records[start : start + n]:
                w.write({k: v for k, v in r.items() if k != "__url__"})
        shards.append(str(path))
        start += n
    return shards


def tiny_overrides(cache_dir: Path, out_dir: Path, *extra: str) -> list[str]:
    """Hydra overrides for a fast tiny run on the session cache."""
    return [
        f"data.cache_dir={cache_dir}",
        f"trainer.output_dir={out_dir}",
        "data.synthetic.num_samples=200",
        "data.synthetic.samples_per_shard=100",
        "data.max_tokens=512",
        "data.num_workers=0",
        "trainer.wandb.mode=disabled",
        "trainer.optim.warmup_steps=0",
        *extra,
    ]


# Set by an in-process test that joined a process group; a child inheriting them would reuse the parent's
# (still listening) rendezvous port instead of starting its own group.
DIST_ENV = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "GROUP_RANK",
    "ROLE_RANK",
    "TORCHELASTIC_RUN_ID",
)


def clean_env(**extra: str) -> dict[str, str]:
    """Environment for a child process (train.py, torchrun, export): no inherited distributed state."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", **extra)
    return env
