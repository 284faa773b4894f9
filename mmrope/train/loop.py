"""The training loop: one readable step, sync points commented."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from data.pixels import to_device
from mmrope.model.objective import num_supervised
from mmrope.train.checkpoint import CheckpointManager
from mmrope.train.config import TrainConfig
from mmrope.train.data_stats import DataStats
from mmrope.train.engine import Dist, all_reduce_values
from mmrope.train.metrics import Metrics
from mmrope.train.preemption import Preempted, PreemptionFlag
from mmrope.train.throughput import Throughput


@dataclass
class TrainResult:
    first_loss: float | None
    last_loss: float | None
    last_checkpoint: Path | None
    steps_done: int


def _all_sum(values: list[float]) -> list[float]:
    return all_reduce_values(values)  # sync point: every rank contributes its counts


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
        # records read, skips, epochs: from the rows (num_readable is set by the session once the data is open)
        self.data_stats = DataStats(per_source_epochs=len(cfg.data.mixture) > 1, sp_size=d.sp_size)
        self.tokens_seen = 0
        self.nonfinite_skips = 0  # steps dropped under trainer.on_nonfinite=skip (saved with the checkpoint)
        self.preemption: PreemptionFlag | None = None  # installed by train()
        self.throughput: Throughput | None = (
            None  # set by the session when FLOPs can be counted for the model
        )
        self._step_composition: dict = {}
        self.evaluator = None  # mmrope.train.eval.Evaluator, set by the session when trainer.eval.every > 0
        self.benchmarks = (
            None  # mmrope.train.benchmarks.Benchmarks (rank 0), when trainer.eval.benchmarks.tasks
        )
        self._waiting_since: float | None = None  # set while the first batch is awaited (status line)

    def train(self) -> TrainResult:
        """Train to trainer.max_steps. On a preemption signal: save, then raise `Preempted` (a SystemExit
        whose code is trainer.requeue_exit_code)."""
        self.preemption = PreemptionFlag()
        try:
            return self._train_loop()
        finally:
            self.preemption.restore()

    def _train_loop(self) -> TrainResult:
        t = self.cfg.trainer
        first = last = None
        last_ckpt = None
        if self.step < t.max_steps:  # the first rows (workers start, shards open, images decode) take a while
            self.metrics.print("waiting for the first batch...")
            self._waiting_since = time.perf_counter()
        while self.step < t.max_steps:
            tic = time.perf_counter()
            loss, stats = self.train_step()
            if self.throughput is not None:  # tokens/s, samples/s, MFU, peak memory of this step
                stats.update(
                    self.throughput.step_metrics(time.perf_counter() - tic, **self._step_composition)
                )
            self.step += 1
            first = loss if first is None else first
            last = loss
            lr = self.engine.get_lr()[0]
            self.metrics.progress(self.step, loss, lr, epoch=self.data_stats.last_epoch)
            step_time = time.perf_counter() - tic
            # Every rank evaluates (same rows, ZeRO-3 gathers in lockstep); logged in this step's record.
            evals = self.evaluator.maybe_run(self.step) if self.evaluator is not None else {}
            # Step 1 is always logged: loss curves start where training starts, not at step log_every.
            if evals or self.step % t.log_every == 0 or self.step in (1, t.max_steps):
                # every rank joins: the counts and the epochs are gathered
                stats.update(self.data_stats.skip_report(self.step, self.metrics.print))
                stats.update(self.data_stats.epoch_report())
                self.metrics.log(
                    self.step,
                    {
                        "train/loss": loss,
                        "train/lr": lr,
                        "train/step_time_s": step_time,
                        **stats,
                        **evals,
                    },
                )
            if self.step % t.save_every == 0 or self.step == t.max_steps:
                last_ckpt = self.save()
                if self.benchmarks is not None:  # rank 0: a background process judges the committed step
                    self._log_bench(
                        self.step,
                        self.benchmarks.on_save(self.step, last_ckpt, final=self.step == t.max_steps),
                    )
            if self.benchmarks is not None:  # scores of a finished background benchmark, at its step
                self._log_bench(*(self.benchmarks.poll() or (0, {})))
            # Sync point: any rank signalled -> every rank saves this step (a finished run just finishes).
            if self.preemption.agreed() and self.step < t.max_steps:
                if last_ckpt is None or last_ckpt.name != f"step_{self.step}":
                    last_ckpt = self.save()
                self.metrics.print(
                    f"preempted (a rank got a preemption signal; here: {self.preemption.signum}): saved step "
                    f"{self.step}, exiting with trainer.requeue_exit_code={t.requeue_exit_code}"
                )
                self.preemption.chain()  # e.g. submitit's handler requeues the SLURM job (may exit itself)
                raise Preempted(t.requeue_exit_code)
        if self.benchmarks is not None:  # the final checkpoint's benchmark: wait a while for it
            self._log_bench(*(self.benchmarks.wait() or (0, {})))
        return TrainResult(first, last, last_ckpt, self.step)

    def _log_bench(self, checkpoint_step: int, values: dict) -> None:
        if values:
            self.metrics.log_late(checkpoint_step, values, current_step=self.step)

    def train_step(self) -> tuple[float, dict]:
        rows = [next(self.rows) for _ in range(self.accum)]
        self.data_stats.account(rows)
        if self._waiting_since is not None:  # the progress bar starts once this step is done
            waited, self._waiting_since = time.perf_counter() - self._waiting_since, None
            self.metrics.print(
                f"first batch after {waited:.1f} s; step {self.step + 1} (the first is the slowest)..."
            )
        num_local = sum(num_supervised(r) for r in rows)
        num_tokens_local = sum(int(r["input_ids"].numel()) for r in rows)
        num_samples_local = sum(r["num_samples"] for r in rows)
        # Sync point: the loss is normalised by the supervised tokens of the whole step, all ranks and micro
        # steps, so every token weighs the same however the packer distributed them. The ranks of a sequence-
        # parallel group hold the same rows (each computes the loss of its slice): they count them once.
        sp = self.d.sp_size
        # SP pads each row to a multiple of its size (the pad is a sample of its own, without labels)
        num_pad_local = sum(-int(r["input_ids"].shape[1]) % sp for r in rows)
        totals = _all_sum([num_local, num_tokens_local, num_samples_local, num_pad_local])
        num_global, num_tokens, num_samples, num_pad = (v / sp for v in totals)
        loss_sum = torch.zeros((), dtype=torch.float64)
        for i, row in enumerate(rows):
            batch = to_device(row, self.d.device)  # uint8 pixels are expanded there (data/pixels.py)
            loss = self.engine(batch, num_global_tokens=max(num_global, 1.0))
            if self.step + 1 == self.cfg.trainer.debug_inject_nan_at_step:
                loss = loss * float("nan")  # testing aid: a NaN loss, and through backward NaN gradients
            # ZeRO averages gradients over all ranks; undo that mean so the gradient is exactly d(sum of token
            # losses / num_global): the sum over ranks (an SP rank's share is its slice's part of the row's
            # gradient). scale_wrt_gas=False: we normalised across micro steps already.
            self.engine.backward(loss * self.d.world_size, scale_wrt_gas=False)
            loss_sum += loss.detach().double().cpu()
            if i < len(rows) - 1:
                self.engine.step()  # not a boundary: DeepSpeed only advances its micro-step counters
        (global_loss,) = _all_sum([float(loss_sum)])
        self._step_composition = {
            "rows": rows,
            "num_supervised_global": num_global,
            "tokens_global": num_tokens,
            "samples_global": num_samples,
            "global_scale": num_tokens / max(num_tokens_local, 1),
        }
        # Every rank sees the same all-reduced loss, so all of them take the same branch below.
        if not math.isfinite(global_loss) and self.cfg.trainer.on_nonfinite == "raise":
            raise FloatingPointError(
                f"non-finite loss {global_loss} at step {self.step + 1}; no update applied "
                f"(trainer.on_nonfinite=raise)"
            )
        # Boundary: clip, optimizer update, LR schedule. ZeRO all-reduces an overflow flag / the global grad
        # norm inside step(); a non-finite one makes every rank drop the update, clear the gradients and leave
        # the LR schedule where it was. That is how a skip keeps DeepSpeed's counters and buffers consistent.
        self.engine.step()
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        applied = self.engine.was_step_applied()
        if math.isfinite(global_loss) and applied:
            self.tokens_seen += int(num_tokens)
        else:
            if applied:  # cannot happen with the DeepSpeed versions we support; never continue silently
                raise RuntimeError(
                    f"step {self.step + 1}: non-finite loss {global_loss} but DeepSpeed applied the update"
                )
            what = f"loss {global_loss}, grad norm {grad_norm}"
            if self.cfg.trainer.on_nonfinite == "raise":  # finite loss, non-finite gradient: nothing applied
                raise FloatingPointError(
                    f"non-finite gradient at step {self.step + 1} ({what}); no update applied "
                    f"(trainer.on_nonfinite=raise)"
                )
            self.nonfinite_skips += 1
            budget = self.cfg.trainer.max_nonfinite_skips
            self.metrics.print(
                f"step {self.step + 1}: non-finite ({what}): update skipped on all ranks "
                f"({self.nonfinite_skips}/{budget} skips)"
            )
            if self.nonfinite_skips > budget:
                raise FloatingPointError(
                    f"{self.nonfinite_skips} non-finite steps skipped > trainer.max_nonfinite_skips={budget}; "
                    f"last at step {self.step + 1} ({what})"
                )
        self.data_stats.check(self.cfg.data.max_skip_fraction)
        stats = {
            "train/grad_norm": grad_norm,
            "train/nonfinite_skips": self.nonfinite_skips,
            "train/supervised_tokens": num_global,
            "train/tokens": num_tokens,
            "train/samples": num_samples,
            "train/tokens_seen": self.tokens_seen,
        }
        if sp > 1:
            stats["train/sp_pad_tokens"] = num_pad  # pad tokens added so that SP divides the row length
        return global_loss, stats

    def state_dict(self) -> dict:
        """This rank's training state beside the engine's: the keys of a checkpoint's rank_N.pt."""
        return {
            "tokens_seen": self.tokens_seen,
            "nonfinite_skips": self.nonfinite_skips,
            **self.data_stats.state_dict(),
            # exact stream position of the rows consumed so far (data.loader.ResumableLoader)
            "data": self.rows.state_dict() if hasattr(self.rows, "state_dict") else None,
        }

    def load_state_dict(self, state: dict) -> None:
        """A checkpoint's rank state (CheckpointManager.load; {} for a fresh run). The stream position ("data")
        is the loader's: it was opened at it (mmrope/train/run.py)."""
        self.step = state.get("step", self.step)
        self.tokens_seen = state.get("tokens_seen", 0)
        self.nonfinite_skips = state.get("nonfinite_skips", 0)
        self.data_stats.load_state_dict(state)

    def save(self) -> Path:
        path = self.ckpt.save(
            self.engine,
            self.step,
            fingerprint=self.fingerprint,
            rank_state=self.state_dict(),
            # The whole config, so that `python -m mmrope.train.export` can rebuild the model from the
            # checkpoint alone.
            extra={"train_config": OmegaConf.to_container(OmegaConf.structured(self.cfg), resolve=True)},
        )
        if self.d.is_main:
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            self.metrics.print(f"checkpoint saved: {path} ({size / 2**20:,.1f} MiB)")
        return path
