"""Visual-fading probe: the attention share to visual tokens as text grows between image and question.

DIPE's motivation (specs/dipe.md sections 0, 3, 7): with ordinary MRoPE the text -> image offset grows with every
text token between them, so the question's attention to the image fades with the inter-modal distance; DIPE
anchors the inter-modal offset, so it should not. The probe measures it directly:

    python -m mmrope.eval.probe --checkpoint runs/a/export/step_300 --checkpoint runs/b/export/step_300 \\
        --data 'shards/shard-{000000..000003}.tar' --distances 0,1024,2048 --num-samples 32 --out probe/

For every image+question sample, distractor text of `d` tokens is inserted between the image(s) and the question
(`mmrope.eval.distractors.insert_distractor`) for each distance `d`; one forward with
`mmrope_probe=ProbeRecorder(...)` records, in every layer and for every selected query (the question and the first
answer) and head, the share of its attention probability that lands on visual keys:

    share = sum_{j visual, allowed} p_ij = exp(lse_visual - lse_all)

with `lse_all` the log-sum-exp of the logits over the keys the query may attend to (causal, same sample) and
`lse_visual` the same over the allowed visual keys. The logits are those of the attention itself: the installed
layer hands the ROTATED q/k to the recorder (`mmrope.model.attention_layer.MMRopeAttention`), and with DIPE a same-
modality pair uses the dynamic query, a cross-modality pair the static one, all in one softmax (spec section 0).

Cost: only the `Q_sel` selected query rows are scored against the `L` keys, in query chunks: O(Q_sel * L * H * D)
FLOPs and O(chunk * L * H) extra memory per layer; never an L x L matrix.

Outputs: `probe.csv` (checkpoint, distance, layer, share; layer "mean" = mean over layers) and `probe.png`
(mean share vs inter-modal distance, one curve per checkpoint). Per distance, a checkpoint's share is the mean
over samples of the per-sample mean over selected queries and heads (every sample weighs the same).
"""

from __future__ import annotations

import argparse
import csv
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from data.processing import IGNORE_INDEX, Sample, SampleError, SampleProcessor
from mmrope.attention import normalize_doc_ids
from mmrope.encodings import Encoding, TokenIds
from mmrope.eval.distractors import distractor_ids, insert_distractor, insertion_index, load_corpus
from mmrope.model.families import tokens_per_second

__all__ = [
    "ProbeRecorder",
    "ProbeModel",
    "load_probe_model",
    "load_probe_samples",
    "main",
    "probe_curve",
    "probe_query_mask",
    "probe_sample",
    "visual_attention_share",
]


def visual_attention_share(
    q_dyn_BHLD: Tensor,
    k_BHkvLD: Tensor,
    *,
    query_mask_BL: Tensor,
    visual_BL: Tensor,
    scale: float,
    doc_ids_BL: Tensor | None = None,
    q_sta_BHLD: Tensor | None = None,
    route_visual_BL: Tensor | None = None,
    chunk_size: int = 512,
) -> Tensor:
    """Attention share to visual keys of the selected queries: `[H, Q_sel]` float32 (rows in row-major order).

    Args:
        q_dyn_BHLD: queries rotated with the (dynamic) positions; k_BHkvLD: keys rotated likewise (GQA ok).
        query_mask_BL: bool, the queries to score (e.g. question + answer tokens).
        visual_BL: bool, which keys count as visual (image/video placeholders).
        scale: the attention's softmax scale.
        doc_ids_BL: sample ids (packing; see `mmrope.attention.masks`); None = one sample per row.
        q_sta_BHLD, route_visual_BL: DIPE: the static query and the modality used for routing; a pair of the
            same modality uses `q_dyn`, a cross-modality pair `q_sta` (spec dipe.md section 0).

    A query sees key `j` iff `j <= i` and both are in the same sample. Example: text query 3 of a row
    `[VS, P, P, q]` (P visual) with logits `[0, 1, 1, 0]` has share `2e / (2e + 2) ~= 0.73`.
    """
    num_rows, num_heads, seq_len, head_dim = q_dyn_BHLD.shape
    num_kv_heads = k_BHkvLD.shape[1]
    dipe = q_sta_BHLD is not None
    if dipe and route_visual_BL is None:
        raise ValueError("visual_attention_share: DIPE (q_sta_BHLD given) needs route_visual_BL")
    device = q_dyn_BHLD.device
    run_BL = (
        normalize_doc_ids(doc_ids_BL.to(device))
        if doc_ids_BL is not None
        else torch.zeros(num_rows, seq_len, dtype=torch.long, device=device)
    )
    key_idx_L = torch.arange(seq_len, device=device)
    visual_BL = visual_BL.to(device=device, dtype=torch.bool)
    route_BL = route_visual_BL.to(device=device, dtype=torch.bool) if dipe else None
    shares: list[Tensor] = []
    for b in range(num_rows):
        k_Kv1DL = k_BHkvLD[b].float()[:, None].transpose(-1, -2)
        query_idx = query_mask_BL[b].to(device).nonzero().flatten()
        for chunk in query_idx.split(chunk_size):
            s_KvGQL = _chunk_scores(q_dyn_BHLD[b][:, chunk], k_Kv1DL, num_kv_heads, scale)
            if dipe:  # same modality: dynamic query; cross modality: static query (one softmax below)
                same_QL = route_BL[b, chunk][:, None] == route_BL[b][None, :]
                s_KvGQL = torch.where(
                    same_QL, s_KvGQL, _chunk_scores(q_sta_BHLD[b][:, chunk], k_Kv1DL, num_kv_heads, scale)
                )
            allowed_QL = (key_idx_L[None, :] <= chunk[:, None]) & (
                run_BL[b, chunk][:, None] == run_BL[b][None]
            )
            s_KvGQL = s_KvGQL.masked_fill(~allowed_QL, float("-inf"))
            lse_all = torch.logsumexp(s_KvGQL, dim=-1)
            lse_visual = torch.logsumexp(s_KvGQL.masked_fill(~visual_BL[b][None, :], float("-inf")), dim=-1)
            shares.append(torch.exp(lse_visual - lse_all).reshape(num_heads, chunk.numel()))
    if not shares:
        return torch.zeros(num_heads, 0)
    return torch.cat(shares, dim=1).cpu()


def _chunk_scores(q_HQD: Tensor, k_Kv1DL: Tensor, num_kv_heads: int, scale: float) -> Tensor:
    """fp32 logits `[H_kv, G, Q, L]` of some queries of one row against all its keys (query head h uses KV head
    h // G, as HF `repeat_kv`)."""
    num_heads, num_q, head_dim = q_HQD.shape
    q_KvGQD = q_HQD.float().reshape(num_kv_heads, num_heads // num_kv_heads, num_q, head_dim)
    return torch.matmul(q_KvGQD, k_Kv1DL) * scale


class ProbeRecorder:
    """Pass as `mmrope_probe=` to an installed model's forward; collects the visual share per layer.

    `shares[layer]` is `[H, Q_sel]` (every head, every selected query); `layer_means()` the mean over both.
    """

    def __init__(self, query_mask_BL: Tensor, visual_BL: Tensor, *, chunk_size: int = 512) -> None:
        if query_mask_BL.shape != visual_BL.shape or query_mask_BL.dim() != 2:
            raise ValueError(
                f"query_mask_BL {tuple(query_mask_BL.shape)} and visual_BL {tuple(visual_BL.shape)} must be the "
                "same [B, L] shape"
            )
        self.query_mask_BL = query_mask_BL.bool()
        self.visual_BL = visual_BL.bool()
        self.chunk_size = chunk_size
        self.shares: dict[int, Tensor] = {}

    def record(
        self,
        layer_idx: int,
        *,
        q_dyn_BHLD: Tensor,
        k_BHkvLD: Tensor,
        scale: float,
        doc_ids_BL: Tensor | None = None,
        q_sta_BHLD: Tensor | None = None,
        route_visual_BL: Tensor | None = None,
    ) -> None:
        if (q_dyn_BHLD.shape[0], q_dyn_BHLD.shape[2]) != tuple(self.query_mask_BL.shape):
            raise ValueError(
                f"mmrope_probe: the recorder's masks are {tuple(self.query_mask_BL.shape)} but the layer sees "
                f"B, L = {q_dyn_BHLD.shape[0], q_dyn_BHLD.shape[2]}"
            )
        self.shares[layer_idx] = visual_attention_share(
            q_dyn_BHLD,
            k_BHkvLD,
            query_mask_BL=self.query_mask_BL,
            visual_BL=self.visual_BL,
            scale=scale,
            doc_ids_BL=doc_ids_BL,
            q_sta_BHLD=q_sta_BHLD,
            route_visual_BL=route_visual_BL,
            chunk_size=self.chunk_size,
        )

    def layer_means(self) -> dict[int, float]:
        return {layer: float(s.mean()) for layer, s in sorted(self.shares.items())}


def probe_query_mask(labels_L: Tensor, start: int) -> Tensor:
    """Queries of the probe: from `start` (the first token after the image(s) and distractor: the question)
    through the end of the first supervised span (the first answer, with its `<|im_end|>`).

    Example: labels `[-, -, -, -, a, a, -, b]`, start 2 -> `[0, 0, 1, 1, 1, 1, 0, 0]`.
    """
    supervised = (labels_L != IGNORE_INDEX).nonzero().flatten()
    if supervised.numel() == 0 or int(supervised[0]) < start:
        raise ValueError("sample: no supervised answer after the probe's question start")
    first = int(supervised[0])
    unsupervised_after = (labels_L[first:] == IGNORE_INDEX).nonzero().flatten()
    end = first + int(unsupervised_after[0]) if unsupervised_after.numel() else labels_L.numel()
    mask_L = torch.zeros(labels_L.numel(), dtype=torch.bool)
    mask_L[start:end] = True
    return mask_L


def _visual_mask(input_ids_L: Tensor, tokens: TokenIds) -> Tensor:
    return (input_ids_L == tokens.image_token_id) | (input_ids_L == tokens.video_token_id)


@torch.no_grad()
def probe_sample(
    vlm: nn.Module, sample: Sample, *, query_mask_L: Tensor, tokens: TokenIds, dipe: bool
) -> dict[int, float]:
    """One forward of `sample` (one row, one sample) with the probe; returns the per-layer mean visual share."""
    device = next(vlm.parameters()).device
    input_ids_1L = sample.input_ids[None].to(device)
    visual_1L = _visual_mask(sample.input_ids, tokens)[None].to(device)
    recorder = ProbeRecorder(query_mask_L[None].to(device), visual_1L)
    kwargs: dict[str, Any] = {"mmrope_probe": recorder}
    if dipe:
        if sample.static_position_ids is None:
            raise ValueError(
                "sample: DIPE probe needs static_position_ids (insert_distractor(..., dipe=True))"
            )
        kwargs["mmrope_static_position_ids"] = sample.static_position_ids[:, None].to(device)
        kwargs["mmrope_visual_mask"] = visual_1L
    pixel_values = sample.pixel_values
    dtype = next(vlm.parameters()).dtype
    vlm.model(
        input_ids=input_ids_1L,
        position_ids=sample.position_ids[:, None].to(device),
        pixel_values=pixel_values.to(device=device, dtype=dtype) if pixel_values is not None else None,
        image_grid_thw=sample.image_grid_thw.to(device) if pixel_values is not None else None,
        use_cache=False,
        **kwargs,
    )
    return recorder.layer_means()


def probe_curve(
    vlm: nn.Module,
    samples: Sequence[Sample],
    distances: Sequence[int],
    *,
    tokenizer: Any,
    corpus: str,
    tokens: TokenIds,
    encoding: Encoding,
    layout: str,
    dipe: bool,
    seed: int = 0,
) -> dict[int, dict[int | str, float]]:
    """`{distance: {layer: share, ..., "mean": share}}`: per-sample layer means averaged over `samples`.

    Sample `s` gets the distractor tokens starting at corpus offset `997 * s` (different text per sample, the
    same text at every distance, only longer), and HoPE's random scales a generator seeded with `seed`.
    """
    was_training = vlm.training
    vlm.eval()
    out: dict[int, dict[int | str, float]] = {}
    try:
        for distance in distances:
            per_layer: dict[int, list[float]] = {}
            for s_idx, sample in enumerate(samples):
                ids_N = distractor_ids(tokenizer, corpus, int(distance), offset=997 * s_idx)
                far = insert_distractor(
                    sample,
                    ids_N,
                    tokens=tokens,
                    encoding=encoding,
                    layout=layout,
                    dipe=dipe,
                    generator=torch.Generator().manual_seed(seed),
                )
                start = insertion_index(sample.input_ids, sample.labels, tokens) + int(distance)
                means = probe_sample(
                    vlm, far, query_mask_L=probe_query_mask(far.labels, start), tokens=tokens, dipe=dipe
                )
                for layer, share in means.items():
                    per_layer.setdefault(layer, []).append(share)
            row: dict[int | str, float] = {layer: sum(v) / len(v) for layer, v in sorted(per_layer.items())}
            row["mean"] = sum(row.values()) / len(row) if row else float("nan")
            out[int(distance)] = row
    finally:
        vlm.train(was_training)
    return out


def load_probe_samples(
    records: Iterable[dict],
    sample_processor: SampleProcessor,
    num_samples: int,
    *,
    max_tokens: int | None = None,
    skipped: Counter | None = None,
) -> list[Sample]:
    """The first `num_samples` records that are image+question samples (a visual block before the first answer,
    so distractors can be inserted) and, with `max_tokens`, at most that long. The others are counted in
    `skipped` by reason (`no_image`: text only, `video_only`, `no_insertion_point`, `too_long`). A record that cannot be
    processed raises (evaluation data never skips silently)."""
    tokens = sample_processor.tokens
    skipped = Counter() if skipped is None else skipped
    out: list[Sample] = []
    for record in records:
        if len(out) >= num_samples:
            break
        try:
            sample = sample_processor(record)
        except SampleError as e:
            raise ValueError(f"probe data: record {record.get('__key__')!r}: {e}") from e
        if sample.pixel_values is None:  # the probe feeds images (pixel_values) only
            skipped["video_only" if sample.pixel_values_videos is not None else "no_image"] += 1
            continue
        try:
            insertion_index(sample.input_ids, sample.labels, tokens)
        except ValueError:
            skipped["no_insertion_point"] += 1
            continue
        if max_tokens is not None and sample.num_tokens > max_tokens:
            skipped["too_long"] += 1
            continue
        out.append(sample)
    return out


def read_records(urls: Sequence[str]) -> Iterable[dict]:
    """Raw webdataset records of `urls` in order (brace notation expanded); a bad shard raises."""
    import webdataset as wds

    from data.index import expand_urls

    for url in expand_urls(list(urls)):
        yield from wds.tarfile_to_samples(handler=wds.reraise_exception)([{"url": url}])


# ---------------------------------------------------------------------------------------------------------------
# checkpoints


@dataclass
class ProbeModel:
    vlm: nn.Module
    processor: Any
    encoding: Encoding
    dipe: bool
    layout: str
    label: str
    path: str


def _export_if_needed(path: Path) -> Path:
    """An exported dir as is; a committed training checkpoint (step dir or checkpoints dir) is exported first to
    `<run dir>/export/step_N` (reused when already there)."""
    if (path / "mmrope_encoding.json").is_file():
        return path
    from mmrope.eval.bench import BenchError, committed_step, run_export

    step_dir = committed_step(path)
    if step_dir is None:
        raise ValueError(
            f"argument `--checkpoint`: {str(path)!r} is neither an exported model (mmrope_encoding.json) nor a "
            "committed training checkpoint"
        )
    out = step_dir.parent.parent / "export" / step_dir.name
    if not (
        out / "mmrope_encoding.json"
    ).is_file():  # exported in a subprocess: eval never imports the trainer
        try:
            run_export(step_dir, out, out.with_name(out.name + ".export.log"))
        except BenchError as e:
            raise ValueError(f"argument `--checkpoint`: {e}") from e
    return out


def load_probe_model(path: str | Path, *, attn_backend: str = "auto", device: str = "cpu") -> ProbeModel:
    """Load an exported checkpoint (`mmrope.from_pretrained`: stock transformers class + `mmrope_encoding.json`,
    its encoding (and DIPE) installed like training did)."""
    from mmrope.pretrained import from_pretrained

    vlm, processor = from_pretrained(_export_if_needed(Path(path)), device=device, attn_backend=attn_backend)
    label = f"{processor.encoding.name}{' + DIPE' if processor.dipe else ''}"
    return ProbeModel(
        vlm=vlm,
        processor=processor,
        encoding=processor.encoding,
        dipe=processor.dipe,
        layout=processor.layout,
        label=label,
        path=str(path),
    )


# ---------------------------------------------------------------------------------------------------------------
# outputs


def write_csv(path: Path, results: dict[str, dict[int, dict[int | str, float]]]) -> None:
    tmp = path.with_name(path.name + ".tmp")  # replaced atomically: it is rewritten after every checkpoint
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["checkpoint", "distance", "layer", "share"])
        for checkpoint, curve in results.items():
            for distance, row in curve.items():
                for layer, share in row.items():
                    w.writerow([checkpoint, distance, layer, f"{share:.6g}"])
    os.replace(tmp, path)


def plot(path: Path, curves: dict[str, dict[int, float]], *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, curve in curves.items():
        xs = sorted(curve)
        ax.plot(xs, [curve[x] for x in xs], marker="o", label=label)
    ax.set_xlabel("inter-modal distance (distractor tokens between image and question)")
    ax.set_ylabel("attention share to visual tokens")
    ax.set_title(title)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _distances(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise ValueError(f"argument `--distances`: expected comma-separated integers, got {text!r}") from e
    if not values or any(v < 0 for v in values):
        raise ValueError(f"argument `--distances`: need >= 1 non-negative integers, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> dict[str, dict[int, dict[int | str, float]]]:
    p = argparse.ArgumentParser(prog="python -m mmrope.eval.probe", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--checkpoint",
        action="append",
        required=True,
        help="exported model dir (repeatable); a "
        "committed training checkpoint is exported first to <run>/export/step_N",
    )
    p.add_argument(
        "--data", action="append", required=True, help="webdataset shard URL(s), brace notation ok"
    )
    p.add_argument(
        "--distances", default="0,1024,2048,4096", help="comma-separated distractor lengths (tokens)"
    )
    p.add_argument(
        "--corpus",
        action="append",
        default=None,
        help="distractor text files (globs ok); default: the built-in generated corpus",
    )
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument(
        "--max-tokens",
        type=int,
        default=32768,
        help="keep samples whose length plus the largest distance fits",
    )
    p.add_argument("--min-pixels", type=int, default=None)
    p.add_argument("--max-pixels", type=int, default=None)
    p.add_argument("--attn-backend", default="auto")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    distances = _distances(args.distances)
    if args.num_samples < 1:
        raise ValueError(f"argument `--num-samples`: must be >= 1, got {args.num_samples}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus(args.corpus)

    results: dict[str, dict[int, dict[int | str, float]]] = {}
    curves: dict[str, dict[int, float]] = {}
    for path in args.checkpoint:
        pm = load_probe_model(path, attn_backend=args.attn_backend, device=args.device)
        if args.min_pixels is not None and args.max_pixels is not None:
            from data.processor import load_processor

            pm.processor = load_processor(
                _export_if_needed(Path(path)),
                min_pixels=args.min_pixels,
                max_pixels=args.max_pixels,
                config=pm.vlm.config,
            )
        sample_processor = SampleProcessor(
            pm.processor,
            pm.encoding,
            max_tokens=args.max_tokens,
            layout=pm.layout,
            dipe=pm.dipe,
            tokens_per_second=tokens_per_second(pm.vlm.config),
        )
        skipped: Counter = Counter()
        samples = load_probe_samples(
            read_records(args.data),
            sample_processor,
            args.num_samples,
            max_tokens=args.max_tokens - max(distances),
            skipped=skipped,
        )
        reasons = ", ".join(f"{k}={n}" for k, n in sorted(skipped.items()))
        if not samples:
            raise ValueError(
                f"argument `--data`: no image+question sample fits --max-tokens={args.max_tokens}"
                + (f" (skipped: {reasons})" if skipped else "")
            )
        if skipped:
            print(f"{path}: skipped {sum(skipped.values())} records before {len(samples)} usable ({reasons})")
        curve = probe_curve(
            pm.vlm,
            samples,
            distances,
            tokenizer=pm.processor.tokenizer,
            corpus=corpus,
            tokens=sample_processor.tokens,
            encoding=pm.encoding,
            layout=pm.layout,
            dipe=pm.dipe,
            seed=args.seed,
        )
        results[path] = curve
        label = pm.label if sum(m.startswith(pm.label) for m in curves) == 0 else f"{pm.label} ({path})"
        curves[label] = {d: row["mean"] for d, row in curve.items()}
        print(
            f"{label} [{path}] ({len(samples)} samples): "
            + ", ".join(f"d={d}: {row['mean']:.4f}" for d, row in curve.items())
        )
        del pm
        # written after every checkpoint: a run that stops later keeps what it computed
        write_csv(out_dir / "probe.csv", results)
        plot(out_dir / "probe.png", curves, title="visual fading: attention share to the image vs distance")
    print(f"wrote {out_dir / 'probe.csv'} and {out_dir / 'probe.png'}")
    return results


if __name__ == "__main__":
    main()
