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
from omegaconf import OmegaConf

from data.pixels import to_device
from mmrope.model.objective import num_supervised
from mmrope.train.checkpoint import CheckpointManager
from mmrope.train.config import TrainConfig
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


def _all_gather(value) -> list:
    if not dist.is_initialized():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)  # sync point: every rank contributes its view
    return out


def _shard_summary(shards: dict[str, Counter], limit: int = 5) -> str:
    """`/data/sft/shard-000003.tar (bad_image 12, too_long 1), ...`: the shards with the most skips first, by
    full path (shards of two sources may share a basename; the path is what to inspect or fix)."""
    worst = sorted(shards.items(), key=lambda kv: -sum(kv[1].values()))
    parts = [f"{url} ({', '.join(f'{k} {v}' for k, v in c.most_common())})" for url, c in worst[:limit]]
    more = f" and {len(worst) - limit} more shard(s)" if len(worst) > limit else ""
    return ", ".join(parts) + more


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
        self.skipped: Counter = Counter()  # this rank's skipped records by reason (since the run began)
        self.skipped_shards: dict[str, Counter] = {}  # ... and by shard
        self.records = 0
        # Skipped records by identity (`url#record` -> reason; a bad shard: its url): a record met again in a
        # later epoch is one skipped record, not one per encounter. `skipped_records` is the global set as of the
        # last gather (the same on every rank), `_new_skipped` this rank's additions since.
        self.skipped_records: dict[str, str] = {}
        self._new_skipped: dict[str, str] = {}
        self.num_readable: int | None = None  # records in the readable shards (set by the session)
        self._skips_reported = 0  # distinct skipped records at the last console line
        self.tokens_seen = 0
        self.nonfinite_skips = 0  # steps dropped under trainer.on_nonfinite=skip (saved with the checkpoint)
        self.preemption: PreemptionFlag | None = None  # installed by train()
        self.throughput: Throughput | None = (
            None  # set by the session when FLOPs can be counted for the model
        )
        self._step_composition: dict = {}
        # Per source: the epoch (0 = the first pass) of the oldest records of a step, the highest so far on this
        # rank (a row may hold the end of one epoch and the start of the next: the epoch is the one being ended).
        self.epochs: dict[int, int] = {}
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
            self.metrics.progress(self.step, loss, lr, epoch=self.epochs[0] + 1 if 0 in self.epochs else None)
            step_time = time.perf_counter() - tic
            # Every rank evaluates (same rows, ZeRO-3 gathers in lockstep); logged in this step's record.
            evals = self.evaluator.maybe_run(self.step) if self.evaluator is not None else {}
            # Step 1 is always logged: loss curves start where training starts, not at step log_every.
            if evals or self.step % t.log_every == 0 or self.step in (1, t.max_steps):
                stats.update(self._skip_report())  # every rank joins: the counts are gathered
                stats.update(self._epoch_report())  # ... and the epochs
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
        oldest: dict[int, int] = {}
        for r in rows:
            for epoch, source in zip(r.get("sample_epochs", ()), r.get("sample_sources", ())):
                oldest[source] = min(epoch, oldest.get(source, epoch))
        for source, epoch in oldest.items():
            self.epochs[source] = max(epoch, self.epochs.get(source, epoch))
        self._account(rows)
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
        self._check_skips()
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

    def _account(self, rows: list[dict]) -> None:
        """This rank's data accounting, which travels with the rows: records read, skips, skipped records."""
        for r in rows:
            self.records += r.get("records", 0)
            self.skipped.update(r.get("skipped", {}))
            for url, reasons in r.get("skipped_shards", {}).items():
                self.skipped_shards.setdefault(url, Counter()).update(reasons)
            for key, reason in r.get("skipped_records", {}).items():
                if key not in self.skipped_records:
                    self._new_skipped[key] = reason

    def _epoch_report(self) -> dict:
        """`data/epoch`: the pass over the data (counting from 1) that the steps' oldest records come from, never
        decreasing, over all ranks; a mixture adds `data/epoch/<i>` per source (each source cycles its own
        epochs). Every rank must call it."""
        epochs: dict[int, int] = {}
        for mine in _all_gather(self.epochs):
            for source, epoch in mine.items():
                epochs[source] = max(epoch, epochs.get(source, epoch))
        out = {"data/epoch": epochs[0] + 1} if 0 in epochs else {}
        if len(self.cfg.data.mixture) > 1:
            out.update({f"data/epoch/{s}": e + 1 for s, e in sorted(epochs.items())})
        return out

    def _global_skips(self) -> tuple[int, Counter, dict[str, Counter]]:
        """(records read, skips by reason, skips by shard) over all ranks, and the global set of skipped records
        brought up to date (only each rank's new ones travel). Every rank must call it."""
        records, reasons, shards = 0, Counter(), {}
        gathered = _all_gather((self.records, dict(self.skipped), self.skipped_shards, self._new_skipped))
        for n, by_reason, by_shard, new in gathered:
            records += n
            reasons.update(by_reason)
            for url, c in by_shard.items():
                shards.setdefault(url, Counter()).update(c)
            self.skipped_records.update(new)
        self._new_skipped = {}
        return records, reasons, shards

    def _skip_report(self) -> dict:
        """Global skip counters for the log step, and a console line whenever more records were skipped since the
        last one. Counts are of records (a record skipped in every epoch counts once), out of the readable ones;
        the skips per encounter are said too when records recur."""
        reads, encounters, shards = self._global_skips()
        reasons = Counter(self.skipped_records.values())
        skipped = len(self.skipped_records)
        if skipped != self._skips_reported:
            of = self.num_readable or reads
            recurring = sum(encounters.values())
            again = (
                f" ({recurring} skips in {reads} records read: epochs meet them again)"
                if recurring > skipped
                else ""
            )
            self.metrics.print(
                f"data: {skipped - self._skips_reported} more record(s) skipped by step {self.step}; {skipped} of "
                f"{of} records ({skipped / max(of, 1):.2%}) so far{again}: {dict(reasons.most_common())}; "
                f"{_shard_summary(shards)}"
            )
            self._skips_reported = skipped
        return {
            "data/records": reads,
            "data/skips": sum(encounters.values()),
            **{f"data/skipped/{k}": v for k, v in reasons.items()},
        }

    def _check_skips(self) -> None:
        total_skipped = sum(self.skipped.values())
        records, skipped = _all_sum([self.records, total_skipped])
        limit = self.cfg.data.max_skip_fraction
        if records >= 100 and skipped / records > limit:
            _, reasons, shards = self._global_skips()  # every rank is here: the same sums on all of them
            raise RuntimeError(
                f"data: {skipped:.0f} of {records:.0f} records skipped ({skipped / records:.1%}) > "
                f"data.max_skip_fraction={limit}; reasons: {dict(reasons.most_common())}; shards: "
                f"{_shard_summary(shards, limit=10)}"
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
                "skipped_shards": {url: dict(c) for url, c in self.skipped_shards.items()},
                "skipped_records": {**self.skipped_records, **self._new_skipped},
                "nonfinite_skips": self.nonfinite_skips,
                "epochs": dict(self.epochs),  # for data/epoch
                # exact stream position of the rows consumed so far (data.loader.ResumableLoader)
                "data": self.rows.state_dict() if hasattr(self.rows, "state_dict") else None,
            },
            # The whole config, so that `python -m mmrope.train.export` can rebuild the model from the
            # checkpoint alone.
            extra={"train_config": OmegaConf.to_container(OmegaConf.structured(self.cfg), resolve=True)},
        )
        if self.d.is_main:
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            self.metrics.print(f"checkpoint saved: {path} ({size / 2**20:,.1f} MiB)")
        return path
