"""The `.cache` a fresh machine fills on first use (synthetic shards, the tiny processor) is safe when several
processes start at once (a parallel local sweep, ranks of several jobs): each process gets a complete set."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from tests.conftest import ROOT, clean_env

# Both processes import everything first, then wait at a barrier (the "go" file) so that they really
# generate at the same moment, then report what they got.
WORKER = """
import json, sys, time
from pathlib import Path
from data.processor import build_tiny_processor
from data.synthetic import corpus, write_synthetic_shards
cache, name = Path(sys.argv[1]), sys.argv[2]
(cache / f"ready.{name}").touch()
while not (cache / "go").exists():
    time.sleep(0.005)
shards = write_synthetic_shards(cache / "synthetic", num_samples=400, samples_per_shard=50,
                                min_image_size=56, max_image_size=140, seed=0)
processor = build_tiny_processor(cache / "tiny_processor", corpus(1500))
print(json.dumps({"shards": shards, "vocab": len(processor.tokenizer)}))
"""


def test_two_processes_generating_the_cache_at_once(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(cache), name],
            cwd=ROOT,
            env=clean_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    deadline = time.monotonic() + 120
    while not all((cache / f"ready.{n}").exists() for n in ("a", "b")):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "workers did not start"
        time.sleep(0.01)
    (cache / "go").touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[0] == results[1]
    shards = results[0]["shards"]
    assert len(shards) == 8 and all((cache / "synthetic" / s.rsplit("/", 1)[-1]).is_file() for s in shards)
    manifest = json.loads((cache / "synthetic" / "manifest.json").read_text())
    assert sum(manifest["counts"].values()) == 400
    # nothing half-written is left next to the published sets
    assert not list(cache.glob("*.tmp*"))

    import webdataset as wds

    keys = [r["__key__"] for s in shards for r in wds.tarfile_to_samples()([{"url": s}])]
    assert len(keys) == len(set(keys)) == 400
