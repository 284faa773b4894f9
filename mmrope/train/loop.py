"""The training loop: one readable step, sync points commented."""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from mmrope.model.objective import num_supervised
from mmrope.train.checkpoint import CheckpointManager
from mmrope.train.config import TrainConfig
from mmrope.train.engine import Dist
from mmrope.train.metrics import Metrics


@dataclass
class TrainResult:
    first_loss: float | None
    last_loss: float | None
    last_checkpoint: Path | None
    steps_done: int


def _to_device(row: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in row.items()}


def _all_sum(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t)  # sync point: every rank contributes its counts
    return t.tolist()


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        d: Dist,
        engine,
        rows: Iterator[dict],
        ckpt: CheckpointManager,
        metrics: Metrics,
        fingerprint: dict,
        start_step: int = 0,
    ):
        self.cfg, self.d, self.engine, self.rows = cfg, d, engine, rows
        self.ckpt, self.metrics, self.fingerprint = ckpt, metrics, fingerprint
        self.step = start_step
        self.accum = cfg.grad_accum_steps(d.world_size)
        self.skipped: Counter = Counter()
        self.records = 0
        self.tokens_seen = 0

    def train(self) -> TrainResult:
        t = self.cfg.trainer
        first = last = None
        last_ckpt = None
        while self.step < t.max_steps:
            tic = time.perf_counter()
            loss, stats = self.train_step()
            self.step += 1
            first = loss if first is None else first
            last = loss
            lr = self.engine.get_lr()[0]
            self.metrics.progress(self.step, loss, lr)
            if self.step % t.log_every == 0 or self.step == t.max_steps:
                self.metrics.log(
                    self.step,
                    {
                        "train/loss": loss,
                        "train/lr": lr,
                        "train/step_time_s": time.perf_counter() - tic,
                        **stats,
                    },
                )
            if self.step % t.save_every == 0 or self.step == t.max_steps:
                last_ckpt = self.save()
        return TrainResult(first, last, last_ckpt, self.step)

    def train_step(self) -> tuple[float, dict]:
        rows = [next(self.rows) for _ in range(self.accum)]
        for r in rows:  # data accounting travels with the rows
            self.records += r.get("records", 0)
            self.skipped.update(r.get("skipped", {}))
        num_local = sum(num_supervised(r) for r in rows)
        num_tokens_local = sum(int(r["input_ids"].numel()) for r in rows)
        num_samples_local = sum(r["num_samples"] for r in rows)
        # Sync point: the loss is normalised by the supervised tokens of the whole step, all ranks and micro
        # steps, so every token weighs the same however the packer distributed them.
        num_global, num_tokens, num_samples = _all_sum([num_local, num_tokens_local, num_samples_local])
        loss_sum = torch.zeros((), dtype=torch.float64)
        for i, row in enumerate(rows):
            batch = _to_device(row, self.d.device)
            loss = self.engine(batch, num_global_tokens=max(num_global, 1.0))
            # ZeRO averages gradients over data-parallel ranks; undo that mean so the gradient is exactly
            # d(sum of token losses / num_global). scale_wrt_gas=False: we normalised across micro steps already.
            self.engine.backward(loss * self.d.world_size, scale_wrt_gas=False)
            loss_sum += loss.detach().double().cpu()
            if i < len(rows) - 1:
                self.engine.step()  # not a boundary: DeepSpeed only advances its micro-step counters
        (global_loss,) = _all_sum([float(loss_sum)])
        if not math.isfinite(global_loss):
            # Every rank sees the same all-reduced value, so all stop here, before the optimizer update.
            raise FloatingPointError(
                f"non-finite loss {global_loss} at step {self.step + 1}; no update applied"
            )
        self.engine.step()  # boundary: clip, optimizer update, LR schedule
        self.tokens_seen += int(num_tokens)
        self._check_skips()
        grad_norm = self.engine.get_global_grad_norm()
        stats = {
            "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "train/supervised_tokens": num_global,
            "train/tokens": num_tokens,
            "train/samples": num_samples,
            "train/tokens_seen": self.tokens_seen,
        }
        stats.update({f"data/skipped/{k}": v for k, v in self.skipped.items()})
        return global_loss, stats

    def _check_skips(self) -> None:
        total_skipped = sum(self.skipped.values())
        records, skipped = _all_sum([self.records, total_skipped])
        limit = self.cfg.data.max_skip_fraction
        if records >= 100 and skipped / records > limit:
            raise RuntimeError(
                f"data: {skipped:.0f} of {records:.0f} records skipped ({skipped / records:.1%}) > "
                f"data.max_skip_fraction={limit}; reasons on rank {self.d.rank}: {dict(self.skipped)}"
            )

    def save(self) -> Path:
        path = self.ckpt.save(
            self.engine,
            self.step,
            fingerprint=self.fingerprint,
            rank_state={
                "tokens_seen": self.tokens_seen,
                "records": self.records,
                "skipped": dict(self.skipped),
            },
        )
        self.metrics.print(f"checkpoint saved: {path}")
        return path
