"""Run by torchrun from the sequence-parallel tests: for each encoding, the same packed rows through
(a) a plain model on this process alone (no SP, no DeepSpeed) and (b) the DeepSpeed engine with
trainer.sequence_parallel_size=2 over the launched ranks; every rank dumps both losses and gradients.

usage: torchrun --nproc_per_node 2 sp_worker.py OUT_DIR STAGE CASE [CASE ...] -- override [override ...]
A CASE is a rope name, `+dipe` for DIPE on top, `:mode` for GRAPE's grape_mode (e.g. `grape:axis`, `mrope+dipe`).
Each rank writes OUT_DIR/rank_R.pt = {CASE: {"ref_loss", "sp_loss", "ref_grads", "sp_grads", "media",
"row_lens"}}. One launch runs every case: process start-up and DeepSpeed's import are paid once.
"""

import itertools
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hydra import compose, initialize_config_dir  # noqa: E402

from data.loader import PackedRowStream  # noqa: E402
from data.pixels import to_device  # noqa: E402
from mmrope.encodings import build as build_encoding  # noqa: E402
from mmrope.model.build import build_model  # noqa: E402
from mmrope.model.install import install  # noqa: E402
from mmrope.model.objective import SFTObjective, num_supervised  # noqa: E402
from mmrope.train.config import register_configs, validate  # noqa: E402
from mmrope.train.engine import build_engine, init_distributed, init_sequence_parallel  # noqa: E402
from mmrope.train.run import make_processor, make_sample_processor, shard_urls  # noqa: E402

NUM_ROWS = 2  # rows per step (gradient accumulation over them): together an image, a video, text-only samples


def case_overrides(case: str) -> list[str]:
    name, _, mode = case.replace("+dipe", "").partition(":")
    out = [f"rope={name}", f"rope.dipe={'true' if '+dipe' in case else 'false'}"]
    return out + ([f"rope.hparams.grape_mode={mode}"] if mode else [])


def text_only_samples(row: dict) -> int:
    bounds = row["cu_seqlens"].tolist()
    visual_L = row["visual_mask"][0]
    return sum(int(not visual_L[a:b].any()) for a, b in zip(bounds[:-1], bounds[1:]))


def rows_for(cfg, processor, encoding) -> list[dict]:
    """NUM_ROWS rows of the synthetic stream that hold images, a video and text-only samples between them (the
    same rows on every process: a stream of one rank)."""
    stream = PackedRowStream(
        shard_urls(cfg, d),
        make_sample_processor(cfg, processor, encoding),
        max_tokens=cfg.data.max_tokens,
        seed=cfg.data.seed,
        num_slots=1,
    )
    rows = list(itertools.islice(iter(stream), 24))
    video = next(r for r in rows if "pixel_values_videos" in r)
    other = next(r for r in rows if r is not video and "pixel_values" in r and text_only_samples(r))
    return [video, other]


def grads(module: torch.nn.Module, engine_grads: bool) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_grad

    out = {}
    for n, p in module.named_parameters():
        if p.requires_grad:
            g = safe_get_full_grad(p) if engine_grads else p.grad  # ZeRO: a collective, every rank calls it
            out[n] = g.detach().float().clone() if g is not None else None
    return out


def run_case(case: str, overrides: list[str], sp) -> dict:
    with initialize_config_dir(
        config_dir=str(Path(__file__).resolve().parents[2] / "configs"), version_base="1.3"
    ):
        cfg = validate(compose("train", overrides=overrides + case_overrides(case)))
    processor = make_processor(cfg, d)
    encoding = build_encoding(cfg.rope.name, **cfg.rope.hparams)
    raw = rows_for(cfg, processor, encoding)
    rows = [to_device(r, d.device) for r in raw]
    num_global = sum(num_supervised(r) for r in rows)

    def model():
        m = build_model(
            cfg.model, vocab_size=len(processor.tokenizer), special_ids=processor.special_ids, seed=0
        )
        from mmrope.model.freeze import apply_freeze
        from mmrope.model.recompute import apply_activation_checkpointing

        apply_freeze(m, cfg.model.freeze)
        apply_activation_checkpointing(
            m, cfg.model.activation_checkpointing, cfg.model.activation_checkpointing_every
        )
        return m

    # (a) the reference: the whole rows on one process, no sequence parallelism.
    ref = model()
    install(ref, encoding, attn_backend=cfg.model.attn_backend, dipe=cfg.rope.dipe)
    ref_obj = SFTObjective(ref)
    ref_loss = 0.0
    for row in rows:
        loss = ref_obj(row, num_global_tokens=num_global)
        loss.backward()
        ref_loss += float(loss)

    # (b) the same rows, split over the SP group, under the DeepSpeed engine as the trainer drives it.
    vlm = model()
    install(vlm, encoding, attn_backend=cfg.model.attn_backend, dipe=cfg.rope.dipe, sequence_parallel=sp)
    obj = SFTObjective(vlm, zero_stage=cfg.deepspeed.stage, sequence_parallel=sp)
    engine, _, _ = build_engine(obj, cfg, d.world_size)
    sp_loss = torch.zeros((), dtype=torch.float64)
    for i, row in enumerate(rows):
        loss = engine(row, num_global_tokens=num_global)
        engine.backward(loss * d.world_size, scale_wrt_gas=False)
        sp_loss += loss.detach().double()
        if i < len(rows) - 1:
            engine.step()
    dist.all_reduce(sp_loss)  # each rank holds its slice's share of the loss
    out = {
        "ref_loss": ref_loss,
        "sp_loss": float(sp_loss),
        "ref_grads": grads(ref, engine_grads=False),
        "sp_grads": grads(engine.module.vlm, engine_grads=True),
        "media": sorted({k for r in rows for k in ("pixel_values", "pixel_values_videos") if k in r}),
        "text_only_samples": sum(text_only_samples(r) for r in raw),
        "row_lens": [int(r["input_ids"].shape[1]) for r in rows],
    }
    engine.destroy()
    return out


def main() -> None:
    global d
    sep = sys.argv.index("--")
    out_dir, stage, cases, overrides = (
        Path(sys.argv[1]),
        int(sys.argv[2]),
        sys.argv[3:sep],
        sys.argv[sep + 1 :],
    )
    overrides = overrides + [f"deepspeed=zero{stage}", "trainer.sequence_parallel_size=2"]
    overrides += [f"trainer.global_batch_size={NUM_ROWS}", "trainer.precision=fp32"]
    register_configs()
    d = init_distributed()
    sp = init_sequence_parallel(d, 2)
    results = {case: run_case(case, overrides, sp) for case in cases}
    torch.save(results, out_dir / f"rank_{d.rank}.pt")


d = None

if __name__ == "__main__":
    main()
