"""Evaluation during training: held-out loss and the visual-fading probe every `trainer.eval.every` steps.

    python train.py trainer.eval.every=100 'trainer.eval.probe_distances=[0,256,1024]' trainer.eval.probe_samples=16

Logged with the training metrics of the same step (one record per step in metrics.jsonl / wandb):
- `eval/loss`: token cross-entropy summed over up to `max_batches` packed held-out rows, divided by their
  supervised tokens (the training loss' normalisation, over the whole held-out set);
- `eval/probe/share@<d>`: the attention share of question+answer queries to the image with `d` distractor
  tokens between image and question (`mmrope.eval.probe`), mean over layers, heads, queries and samples.

Held-out data: `trainer.eval.shards`, or (empty) `synthetic_samples` generated like the training set with seed
`data.synthetic.seed + 1` under `<data.cache_dir>/synthetic_eval`. Eval data always raises on a bad record.
Every rank evaluates the same rows (no data split): the cost is small, ZeRO-3's parameter gathers stay in
lockstep, and there is nothing to reduce. The model runs in eval mode under `no_grad`; each module's mode is
restored afterwards.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from data.loader import PackedRowStream
from data.pixels import to_device
from data.processing import Sample, SampleProcessor
from mmrope.encodings import Encoding
from mmrope.model.objective import num_supervised
from mmrope.train.config import TrainConfig

EVAL_SEED_OFFSET = 1  # held-out synthetic data: data.synthetic.seed + 1
CORPUS_WORDS = 5_000  # the probe's distractor text (distances during training are short)


def eval_shard_urls(cfg: TrainConfig, rank0_first=None) -> list[str]:
    """`trainer.eval.shards`, or held-out synthetic shards generated once with another seed."""
    e = cfg.trainer.eval
    if e.shards:
        return list(e.shards)
    from data.synthetic import write_synthetic_shards

    s = cfg.data.synthetic

    def write() -> list[str]:
        return write_synthetic_shards(
            Path(cfg.data.cache_dir) / "synthetic_eval",
            num_samples=e.synthetic_samples,
            samples_per_shard=e.synthetic_samples,
            min_image_size=s.min_image_size,
            max_image_size=s.max_image_size,
            seed=s.seed + EVAL_SEED_OFFSET,
        )

    return rank0_first(write) if rank0_first is not None else write()


class Evaluator:
    def __init__(
        self,
        cfg: TrainConfig,
        objective: nn.Module,
        sample_processor: SampleProcessor,
        encoding: Encoding,
        urls: list[str],
        device: torch.device,
    ) -> None:
        self.cfg, self.e = cfg, cfg.trainer.eval
        self.objective = objective  # SFTObjective (engine.module): forward(batch, num_global_tokens) -> loss
        self.sample_processor = sample_processor
        self.encoding = encoding
        self.urls = urls
        self.device = device
        self._rows: list[dict] | None = None  # the held-out rows, read once
        self._probe_samples: list[Sample] | None = None
        self._corpus: str | None = None

    def due(self, step: int) -> bool:
        return self.e.every > 0 and step % self.e.every == 0

    def maybe_run(self, step: int) -> dict[str, float]:
        return self.run() if self.due(step) else {}

    def _held_out_rows(self) -> list[dict]:
        if self._rows is None:
            stream = PackedRowStream(
                self.urls,
                self.sample_processor,
                max_tokens=self.cfg.data.max_tokens,
                seed=self.cfg.data.seed,
                for_eval=True,  # one pass (a seeded permutation: the same rows every time), a bad record raises
                index_cache_dir=self.cfg.data.cache_dir,
            )
            rows = []
            for row in stream:
                rows.append(row)
                if self.e.max_batches and len(rows) >= self.e.max_batches:
                    break
            self._rows = rows
        return self._rows

    def _samples_for_probe(self) -> list[Sample]:
        if self._probe_samples is None:
            from mmrope.eval.probe import load_probe_samples, read_records

            self._probe_samples = load_probe_samples(
                read_records(self.urls), self.sample_processor, self.e.probe_samples
            )
            if not self._probe_samples:
                raise ValueError(
                    f"config key `trainer.eval.shards`: no image+question sample to probe in {self.urls[:3]}"
                )
        return self._probe_samples

    @torch.no_grad()
    def run(self) -> dict[str, float]:
        tic = time.perf_counter()
        modes = {m: m.training for m in self.objective.modules()}
        self.objective.eval()
        try:
            out = {"eval/loss": self._loss()}
            if self.e.probe_samples > 0 and self.e.probe_distances:
                out.update(self._probe())
        finally:
            for m, training in modes.items():
                m.training = training
        out["eval/time_s"] = time.perf_counter() - tic
        return out

    def _loss(self) -> float:
        loss_sum, num_tokens = 0.0, 0
        for row in self._held_out_rows():
            batch = to_device(row, self.device)
            # num_global_tokens=1: the row's summed token loss; normalised over the whole set below
            loss_sum += float(self.objective(batch, num_global_tokens=1.0))
            num_tokens += num_supervised(row)
        return loss_sum / max(num_tokens, 1)

    def _probe(self) -> dict[str, float]:
        from mmrope.eval.distractors import default_corpus
        from mmrope.eval.probe import probe_curve

        if self._corpus is None:
            self._corpus = default_corpus(CORPUS_WORDS, seed=self.cfg.data.seed)
        sp = self.sample_processor
        curve = probe_curve(
            self.objective.vlm,
            self._samples_for_probe(),
            list(self.e.probe_distances),
            tokenizer=sp.processor.tokenizer,
            corpus=self._corpus,
            tokens=sp.tokens,
            encoding=self.encoding,
            layout=sp.layout,
            dipe=sp.dipe,
            seed=self.cfg.trainer.seed,
        )
        return {f"eval/probe/share@{d}": row["mean"] for d, row in curve.items()}
