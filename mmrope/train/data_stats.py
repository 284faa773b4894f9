"""What the training rows say about the data they came from: records read, skips by reason and by shard, the
skipped records by identity, the epochs trained. Saved with each rank's checkpoint state."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch.distributed as dist

from mmrope.train.engine import all_reduce_values


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


class DataStats:
    """This rank's data accounting, which travels with the rows (data/loader.py). The reports gather every
    rank's view: every rank must call them."""

    def __init__(self, num_readable: int | None = None, per_source_epochs: bool = False, sp_size: int = 1):
        self.num_readable = num_readable  # records in the readable shards: what skips are out of
        self.source_records: list[int] | None = None  # readable records per source: what an epoch is
        self.per_source_epochs = per_source_epochs  # a mixture: `data/epoch/<i>` per source
        # The ranks of a sequence-parallel group read the same rows: every global count is divided by this.
        self.sp_size = sp_size
        self.records = 0
        self.skipped: Counter = Counter()  # this rank's skipped records by reason (since the run began)
        self.skipped_shards: dict[str, Counter] = {}  # ... and by shard
        # Skipped records by identity (`url#record` -> reason; a bad shard: its url): a record met again in a
        # later epoch is one skipped record, not one per encounter. `skipped_records` is the global set as of the
        # last gather (the same on every rank), `_new_skipped` this rank's additions since.
        self.skipped_records: dict[str, str] = {}
        self._new_skipped: dict[str, str] = {}
        self._skips_reported = 0  # distinct skipped records at the last console line
        # Per source: the samples this rank trained on (records once per row they were packed into). Epochs are
        # those over all ranks divided by the source's readable records: how many times the data was trained on.
        # (The epoch a row's records were drawn in says less: on small data one row spans several epochs.)
        self.samples: Counter = Counter()
        self.last_epoch: float | None = None  # data/epoch as of the last log step (the progress bar shows it)

    def state_dict(self) -> dict:
        """The keys of a checkpoint's rank_N.pt (mmrope/train/checkpoint.py merges them on a resize)."""
        return {
            "records": self.records,
            "skipped": dict(self.skipped),
            "skipped_shards": {url: dict(c) for url, c in self.skipped_shards.items()},
            "skipped_records": {**self.skipped_records, **self._new_skipped},
            "samples": dict(self.samples),  # for data/epoch
        }

    def load_state_dict(self, state: dict) -> None:
        """Tolerant of checkpoints that predate a key (it starts empty)."""
        self.records = state.get("records", 0)
        self.samples = Counter(state.get("samples", {}))
        self.skipped = Counter(state.get("skipped", {}))
        self.skipped_shards = {url: Counter(c) for url, c in state.get("skipped_shards", {}).items()}
        self.skipped_records = dict(state.get("skipped_records", {}))
        self._new_skipped = {}
        self._skips_reported = len(self.skipped_records)

    def account(self, rows: list[dict]) -> None:
        """Add one step's rows: samples per source, records read, skips, skipped records."""
        for r in rows:
            self.samples.update(r.get("sample_sources", ()))
            self.records += r.get("records", 0)
            self.skipped.update(r.get("skipped", {}))
            for url, reasons in r.get("skipped_shards", {}).items():
                self.skipped_shards.setdefault(url, Counter()).update(reasons)
            for key, reason in r.get("skipped_records", {}).items():
                if key not in self.skipped_records:
                    self._new_skipped[key] = reason

    def epoch_report(self) -> dict:
        """`data/epoch`: the epochs trained so far, over all ranks, samples of the first source / its readable
        records (2.5: every record trained on 2.5 times on average; a skipped record counts as not trained); a
        mixture adds `data/epoch/<i>` per source (each source cycles its own epochs). Every rank must call it."""
        samples: Counter = Counter()
        for mine in _all_gather(dict(self.samples)):
            samples.update(mine)
        if not self.source_records:
            return {}
        epochs = {s: samples[s] / self.sp_size / n for s, n in enumerate(self.source_records) if n}
        self.last_epoch = round(epochs[0], 2) if 0 in epochs else None
        out = {"data/epoch": self.last_epoch} if self.last_epoch is not None else {}
        if self.per_source_epochs:
            out.update({f"data/epoch/{s}": round(e, 2) for s, e in sorted(epochs.items())})
        return out

    def _global_skips(self) -> tuple[int, Counter, dict[str, Counter]]:
        """(records read, skips by reason, skips by shard) over all ranks, and the global set of skipped records
        brought up to date (only each rank's new ones travel)."""
        records, reasons, shards = 0, Counter(), {}
        gathered = _all_gather((self.records, dict(self.skipped), self.skipped_shards, self._new_skipped))
        for n, by_reason, by_shard, new in gathered:
            records += n
            reasons.update(by_reason)
            for url, c in by_shard.items():
                shards.setdefault(url, Counter()).update(c)
            self.skipped_records.update(new)
        self._new_skipped = {}
        if self.sp_size > 1:  # each row was counted by every rank of its group
            records //= self.sp_size
            reasons = Counter({k: v // self.sp_size for k, v in reasons.items()})
            shards = {u: Counter({k: v // self.sp_size for k, v in c.items()}) for u, c in shards.items()}
        return records, reasons, shards

    def skip_report(self, step: int, log: Callable[[str], None]) -> dict:
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
            log(
                f"data: {skipped - self._skips_reported} more record(s) skipped by step {step}; {skipped} of "
                f"{of} records ({skipped / max(of, 1):.2%}) so far{again}: {dict(reasons.most_common())}; "
                f"{_shard_summary(shards)}"
            )
            self._skips_reported = skipped
        return {
            "data/records": reads,
            "data/skips": sum(encounters.values()),
            **{f"data/skipped/{k}": v for k, v in reasons.items()},
        }

    def check(self, max_skip_fraction: float) -> None:
        """Raise once more than data.max_skip_fraction of the records read (at least 100) were skipped."""
        # sync point: every rank contributes its counts
        records, skipped = all_reduce_values([self.records, sum(self.skipped.values())])
        if records >= 100 and skipped / records > max_skip_fraction:
            _, reasons, shards = self._global_skips()  # every rank is here: the same sums on all of them
            raise RuntimeError(
                f"data: {skipped:.0f} of {records:.0f} records skipped ({skipped / records:.1%}) > "
                f"data.max_skip_fraction={max_skip_fraction}; reasons: {dict(reasons.most_common())}; shards: "
                f"{_shard_summary(shards, limit=10)}"
            )
