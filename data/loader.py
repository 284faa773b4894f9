"""Streaming loader: shard indexes -> per-epoch permutation -> slots -> plan -> pack -> read + process -> rows.

**Epochs.** An epoch of a source is every readable record of it exactly once: a seeded permutation of all its
(shard, record) references, reshuffled every epoch (numpy's PCG64 seeded by data.seed, the source and the epoch).
Epoch e's permutation is dealt to the `num_slots` virtual slots round-robin (slot i takes positions i, i + S,
..., so the slots' shares differ by at most one record), and each slot packs its share, then its share of epoch
e + 1, and so on. The union of the slots' epoch-e shares is the whole source, once: that is what makes an epoch
exact over every rank, worker and slot. A row may span an epoch boundary (its last records of epoch e, its first
of e + 1), but the packer never puts one record into a row twice: a record that would repeat one already in an
open row goes to another row or opens one. The packer fills its oldest open row first (data/packing.py), so a
record reaches a row within about `open_rows` rows of its slot after it was drawn: epoch e's last records are
trained on at most that many rows of the slot into epoch e + 1. `open_rows` is `num_open_rows` (16), but never more
than the rows a slot's share of an epoch fills (at least 2, so that a record which would repeat one in a row has
another row to go to): a small data set packs two rows at a time, and the epochs stay in order. Every sample carries the epoch it was drawn in
(`sample_epochs`). A weighted mixture (`data.mixture`) draws each record's source by a seeded weighted draw per
slot, and every source cycles its own epochs: source i completes an epoch after ~N_i / p_i draws (N_i readable
records, p_i its share of the weights), so a small, heavily weighted source is passed over more often.

**How many slots.** A slot needs at least one record per epoch of every source (else refused, naming
`data.num_slots`), and a slot's epochs follow one another cleanly when its share of an epoch is at least what its
packer holds in flight (`num_open_rows` rows' worth): with smaller shares a row spans several epochs (never
repeating a record). `fit_slots` checks an explicit `data.num_slots` against the shard indexes' record counts, or
derives `auto` from them: the most slots, up to 64, of the form world_size x num_workers x 2^k whose shares are
that large (at least one slot per consumer); records per row are estimated from the planned token counts.

**Virtual slots.** The stream is `num_slots` independent slot streams. Global row g is row g // S of slot g % S.
Rank r of W takes global rows r, r + W, r + 2W, ... (slot i belongs to rank i % W) and DataLoader worker k of K
takes that rank's rows k, k + K, ... An optimizer step of G rows therefore consumes global rows [s*G, (s+1)*G)
whatever W and K are, and the stream position is nothing but the slot states. A checkpoint taken at a step
boundary resumes on any world size and worker count for which W * K divides S (`data.num_slots`).

**What a slot holds.** Per source a cursor (epoch, position in its share of that epoch's permutation); a
first-fit packer over references with their planned token counts; completed rows not yet handed out. A reference
is *planned* when its slot reaches it: its token count comes from the shard index when the index holds this
processor's counts, else from the record's JSON member and the media sizes in the index (one small read, no pixel
decoded); bad records are counted here. When the packer completes a row, its records are read (one seek each,
`data/index.py`) and processed, with pixels kept as uint8 (`data/pixels.py`). So host memory is the open rows'
references plus one row of pixels (and each slot's share of the current epoch's permutation, 8 bytes a record),
and a resumed slot re-reads nothing to restore its packer.

**Bad input** follows `error_policy`: `raise` stops with the reason, `skip` counts it. Each row carries the
records planned since the previous row of its slot (`records`), the skip counts by reason (`skipped`) and by
shard (`skipped_shards`), so the trainer can log `data/skipped/<reason>`, name the shards, and abort above
`max_skip_fraction`. A shard whose index stopped early (truncated, corrupt) or that cannot be read at all is
counted as `bad_shard` once per epoch, by slot (its position in the source's shard list) mod S.
"""

from __future__ import annotations

import bisect
import random
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data import index as shard_index
from data.packing import FirstFitPacker, collate_row
from data.processing import SampleError, SampleProcessor, record_id

STATE_VERSION = 4  # 4: per-epoch permutations dealt to slots, no shuffle buffer; 3: virtual slots
INDEX_CACHE = 64  # shard indexes a worker keeps in memory
AUTO_MAX_SLOTS = 64  # data.num_slots=auto derives at most this many slots
PLAN_SAMPLE = 256  # records per source planned at start to estimate the records per row


class DataError(RuntimeError):
    """Raised under error_policy=raise (and always for eval data), naming the reason and the record."""


@dataclass
class Ref:
    """A record named by its shard and position in it, the source and epoch it was drawn in; `num_tokens` once
    planned."""

    url: str
    record: int
    num_tokens: int = 0
    epoch: int = 0
    source: int = 0
    num_visual: int = 0  # image + video tokens among num_tokens (the packer's ViT balance)

    @property
    def key(self) -> str:  # for the packer's messages
        return f"{self.url}#{self.record}"


def _seed(*parts: int) -> int:
    out = 0
    for p in parts:
        out = (out * 1_000_003 + int(p)) & 0xFFFFFFFFFFFF
    return out


def _rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _set_rng_state(rng: random.Random, state: list) -> None:
    rng.setstate((state[0], tuple(state[1]), state[2]))


class PackedRowStream(IterableDataset):
    """The rows of one rank (split over its DataLoader workers), as described in the module docstring."""

    def __init__(
        self,
        urls: list[str] | None,
        processor: SampleProcessor,
        *,
        max_tokens: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_slots: int | str | None = None,
        error_policy: str = "skip",
        num_open_rows: int = 16,
        vit_balance: float | None = None,
        epochs: int | None = None,
        mixture: list[tuple[list[str], float]] | None = None,
        for_eval: bool = False,
        index_cache_dir: str | None = None,
        log=print,
    ):
        if for_eval:  # evaluation data: one pass, and a bad record is an error, never a silent skip
            error_policy, epochs, vit_balance = "raise", 1, None  # no ranks to balance in a one-pass eval
        if error_policy not in ("raise", "skip"):
            raise ValueError(f"config key `data.error_policy`: must be raise|skip, got {error_policy!r}")
        if mixture:
            if urls:
                raise ValueError("config keys `data.shards` and `data.mixture`: give one, not both")
            self.sources = [shard_index.expand_urls(u) for u, _ in mixture]
            self.weights = [float(w) for _, w in mixture]
            if any(w <= 0 for w in self.weights):
                raise ValueError(f"config key `data.mixture`: weights must be > 0, got {self.weights}")
        else:
            self.sources, self.weights = [shard_index.expand_urls(urls or [])], [1.0]
        if num_slots not in (None, "auto") and (not isinstance(num_slots, int) or num_slots < 1):
            raise ValueError(f"config key `data.num_slots`: must be >= 1, got {num_slots}")
        self.processor = processor
        self.max_tokens = max_tokens
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        # None: one slot per consumer (world_size x num_workers); "auto": derived by `fit_slots`
        self.num_slots = num_slots
        self.error_policy = error_policy
        self.num_open_rows = num_open_rows
        self.open_rows = num_open_rows  # per slot's packer: set with the slot count (`open_rows_for`)
        if vit_balance is not None and vit_balance <= 0:
            raise ValueError(f"config key `data.vit_balance`: must be > 0 or null, got {vit_balance}")
        self.vit_balance = vit_balance  # the packer's visual / text caps per row (data/packing.py); None: off
        self.epochs = epochs  # None = forever
        self.index_cache_dir = index_cache_dir
        self.fingerprint = processor.fingerprint
        # Set by ResumableLoader before iteration: slot states, and the rank's next global row.
        self.resume_states: dict[int, dict] = {}
        self.start_row = rank
        self._indexes: OrderedDict[str, shard_index.ShardIndex] = OrderedDict()
        self.lengths: dict[str, int] = {}
        self.errors: dict[str, str] = {}
        self.video_files: list[tuple[str, shard_index.VideoMeta]] = []  # (record key, metadata), for reports
        for url in dict.fromkeys(u for src in self.sources for u in src):
            try:
                idx = self.index(url, log=log)
                self.lengths[url] = len(idx)
                self.video_files += [
                    (r["key"], shard_index.VideoMeta(**v))
                    for r in idx.records
                    for v in r.get("videos", {}).values()
                    if v
                ]
                if idx.error and error_policy == "raise":
                    raise DataError(f"bad_shard: {url}: {idx.error}")
                if idx.error:
                    self.errors[url] = idx.error
            except (ValueError, DataError):
                raise  # a configuration error (e.g. a remote URL) names its key
            except Exception as e:  # missing file, not a tar: the shard is bad
                if error_policy == "raise":
                    raise DataError(f"bad_shard: {url}: {e}") from e
                self.lengths[url], self.errors[url] = 0, f"{type(e).__name__}: {e}"
        for i, src in enumerate(self.sources):
            if not any(self.lengths[u] for u in src):
                raise DataError(
                    f"no records could be read from {len(src)} shard(s) of source {i}: {src[:3]}..."
                )
        # Per source: the cumulative readable record counts of its shards (in the order given): record q of the
        # concatenation is record q - ends[i-1] of shard i.
        self.ends = [list(_cumsum(self.lengths[u] for u in src)) for src in self.sources]
        self.num_records = [e[-1] if e else 0 for e in self.ends]
        self.mean_tokens: list[float] | None = None  # per source, from `estimate_rows` (a planned sample)
        self.mean_visual: list[float] | None = None  # per source: visual tokens per record, likewise
        self._indexes = OrderedDict(list(self._indexes.items())[-8:])  # workers inherit a small cache

    def index(self, url: str, log=None) -> shard_index.ShardIndex:
        idx = self._indexes.get(url)
        if idx is None:
            idx = shard_index.load_or_build(
                url, cache_dir=self.index_cache_dir, planner=self.processor, log=log or print
            )
            self._indexes[url] = idx
            while len(self._indexes) > INDEX_CACHE:
                self._indexes.popitem(last=False)
        else:
            self._indexes.move_to_end(url)
        return idx

    def plan_tokens(self, url: str, record: int) -> int:
        """A record's token count from the index (or its JSON member and the index's media sizes); raises
        SampleError for a record that cannot be trained on (too long, unplannable)."""
        return self.plan_counts(url, record)[0]

    def plan_counts(self, url: str, record: int) -> tuple[int, int]:
        """(tokens, visual tokens) of a record, like `plan_tokens`. An index written before it held visual
        counts is read like one without this processor's counts: from the JSON member (only with the ViT balance
        on; else the visual count is not needed and reported as 0)."""
        idx = self.index(url)
        rec = idx.records[record]
        planned = rec.get("num_tokens", {}).get(self.fingerprint)
        visual = rec.get("num_visual", {}).get(self.fingerprint)
        if isinstance(planned, str):
            raise SampleError(planned, "found when the shard was indexed")
        if planned is None or (visual is None and self.vit_balance):
            if "json" not in rec["members"]:
                raise SampleError("missing_field", "no .json member")
            raw = shard_index.read_member(idx, record, "json")
            planned, visual = self.processor.plan_counts(raw, idx.media_sizes(record), check_length=False)
        if planned > self.max_tokens:
            raise SampleError("too_long", f"{planned} tokens > max_tokens={self.max_tokens}")
        return planned, visual or 0

    def locate(self, source: int, q: int) -> tuple[str, int]:
        """(shard, record) of record q of the source's concatenated shards."""
        ends = self.ends[source]
        i = bisect.bisect_right(ends, q)
        return self.sources[source][i], q - (ends[i - 1] if i else 0)

    # -- how many slots ---------------------------------------------------------------------------------------
    def shares(self) -> list[float]:
        total = sum(self.weights)
        return [w / total for w in self.weights]

    def estimate_rows(self) -> float:
        """Records per row, estimated from the planned token counts of a seeded sample of up to PLAN_SAMPLE
        records per source (from the indexes: nothing decoded); sets `mean_tokens` per source."""
        if self.mean_tokens is None:
            means, visual_means = [], []
            for source, n in enumerate(self.num_records):
                picks = random.Random(_seed(self.seed, 3, source)).sample(range(n), min(n, PLAN_SAMPLE))
                counts, visual = [], []
                for q in picks:
                    try:
                        n, v = self.plan_counts(*self.locate(source, q))
                    except SampleError:
                        continue  # counted when a slot meets it
                    counts.append(n)
                    visual.append(v)
                means.append(sum(counts) / len(counts) if counts else float(self.max_tokens))
                visual_means.append(sum(visual) / len(visual) if visual else 0.0)
            self.mean_tokens, self.mean_visual = means, visual_means
        mean = sum(p * m for p, m in zip(self.shares(), self.mean_tokens))
        return max(1.0, self.max_tokens / mean)

    def visual_share(self) -> float:
        """The data's visual fraction of a token (mixture-weighted), from the same seeded sample as
        `estimate_rows`: a pure function of the data and data.seed, so every slot, rank and resume agrees."""
        self.estimate_rows()
        tokens = sum(p * m for p, m in zip(self.shares(), self.mean_tokens))
        return sum(p * v for p, v in zip(self.shares(), self.mean_visual)) / max(1.0, tokens)

    def slot_limits(self) -> tuple[int, int]:
        """(the most slots that each get at least one record of every source per epoch, the most whose share of
        every source's epoch is at least what a slot's packer holds in flight: num_open_rows rows' worth)."""
        in_flight = self.estimate_rows() * self.num_open_rows
        hard = min(self.num_records)
        fit = min(int(n // max(1.0, in_flight * p)) for n, p in zip(self.num_records, self.shares()))
        return hard, fit

    def open_rows_for(self, num_slots: int) -> int:
        """Open rows per slot's packer: num_open_rows, but no more than the rows a slot's share of an epoch fills
        (of every source), so that the rows in flight hold about the end of one epoch and the start of the next;
        at least 2 (a record that would repeat one in a row needs another row to go to, else a half-full row
        would leave)."""
        per_row = self.estimate_rows()
        rows_per_epoch = min(n / num_slots / (per_row * p) for n, p in zip(self.num_records, self.shares()))
        return max(min(2, self.num_open_rows), min(self.num_open_rows, int(rows_per_epoch)))

    def fit_slots(self, num_slots: int | str | None, num_workers: int) -> int:
        """Resolve and check `data.num_slots` against the data (call before anything expensive is built): an
        int is refused when a slot would get no record of a source in an epoch, or when it does not divide
        over world_size x num_workers; `auto` is the most slots, up to AUTO_MAX_SLOTS, of the form consumers x
        2^k whose shares of an epoch hold what a slot's packer has in flight (at least one slot per consumer)."""
        consumers = self.world_size * max(1, num_workers)
        hard, fit = self.slot_limits()
        if num_slots is None:
            num_slots = consumers
        if num_slots == "auto":
            if hard < consumers:
                raise ValueError(
                    f"config key `data.num_slots`: auto needs at least one slot per consumer (world_size "
                    f"{self.world_size} x data.num_workers {max(1, num_workers)} = {consumers}), and every slot "
                    f"at least one record per epoch, but {self._smallest()} has {hard} readable records; lower "
                    f"data.num_workers or add data"
                )
            num_slots = consumers
            while num_slots * 2 <= min(fit, hard, AUTO_MAX_SLOTS):
                num_slots *= 2
        else:
            self.check_slots(num_slots, self.world_size, num_workers)
            if num_slots > hard:
                best = (hard // consumers) * consumers
                raise ValueError(
                    f"config key `data.num_slots`: {num_slots} slots, but {self._smallest()} has {hard} readable "
                    f"records: slots would get no record in an epoch. Use data.num_slots=auto"
                    + (
                        f" or at most {best} (a multiple of world_size x num_workers = {consumers})"
                        if best
                        else ""
                    )
                )
        self.num_slots = num_slots
        self.open_rows = self.open_rows_for(num_slots)
        return num_slots

    def _smallest(self) -> str:
        i = min(range(len(self.num_records)), key=self.num_records.__getitem__)
        return "the data" if len(self.sources) == 1 else f"source {i} (data.mixture[{i}])"

    # -- which slots this consumer plays -----------------------------------------------------------------------
    def resolve_slots(self, num_workers: int) -> int:
        """`num_slots` (derived by `fit_slots` when auto), or one slot per consumer when unset; refused (naming
        the key) if it does not divide."""
        if self.num_slots == "auto":
            return self.fit_slots("auto", num_workers)
        num_slots = self.check_slots(self.num_slots, self.world_size, num_workers)
        self.open_rows = self.open_rows_for(num_slots)
        return num_slots

    @staticmethod
    def check_slots(num_slots: int | None, world_size: int, num_workers: int) -> int:
        consumers = world_size * max(1, num_workers)
        slots = num_slots or consumers
        if slots % consumers:
            raise ValueError(
                f"config key `data.num_slots`: {slots} slots cannot be split evenly over world_size "
                f"{world_size} x num_workers {max(1, num_workers)} = {consumers} consumers; use a multiple "
                f"(it is fixed for a run: choose it for the largest world size x workers you will use)"
            )
        return slots

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        num_slots = self.resolve_slots(num_workers)
        per_rank = num_slots // self.world_size
        first = (
            self.start_row % num_slots - self.rank
        ) // self.world_size  # local index of the next row's slot
        mine = [(first + worker + n * num_workers) % per_rank for n in range(per_rank // num_workers)]
        slots = [
            _Slot(
                self,
                self.rank + self.world_size * j,
                num_slots,
                self.resume_states.get(self.rank + self.world_size * j),
            )
            for j in mine
        ]
        streams = [s.rows() for s in slots]
        while streams:  # round-robin over this worker's slots: the rank's global row order
            for stream in list(streams):
                out = [next(stream, None)]
                if out[0] is None:
                    streams.remove(stream)  # a finite stream (epochs) ran out
                else:
                    yield out.pop()  # (holding no reference while suspended, as in _Slot._emit)


class _Slot:
    """One virtual slot's stream of rows (see the module docstring)."""

    def __init__(self, stream: PackedRowStream, slot: int, num_slots: int, state: dict | None):
        self.s, self.slot, self.num_slots = stream, slot, num_slots
        self.cursors = [[0, 0] for _ in stream.sources]  # per source: [epoch, position in this slot's share]
        self.mix_rng = random.Random(_seed(stream.seed, 1, slot))
        self.packer = FirstFitPacker(
            stream.max_tokens,
            stream.open_rows,
            visual_share=stream.visual_share() if stream.vit_balance else None,
            balance=stream.vit_balance,
        )
        self.pending: list[list[Ref]] = []
        self.rows_out = 0
        self.counts: Counter = Counter()
        self.by_shard: dict[str, Counter] = {}
        # `url#record` (or a bad shard's url) -> reason, for the skips since the last row
        self.skipped_ids: dict[str, str] = {}
        self._shares: dict[int, tuple[int, np.ndarray]] = {}
        if state is not None:
            self._load(state)

    # -- the share of one epoch -------------------------------------------------------------------------------
    def _share(self, source: int, epoch: int) -> np.ndarray:
        """This slot's positions in the source's epoch permutation: record numbers of the concatenated shards."""
        cached = self._shares.get(source)
        if cached is None or cached[0] != epoch:  # one epoch per source is cached: the current one
            rng = np.random.Generator(np.random.PCG64(_seed(self.s.seed, source, epoch)))
            perm = rng.permutation(self.s.num_records[source])
            cached = (epoch, perm[self.slot :: self.num_slots].copy())
            self._shares[source] = cached
        return cached[1]

    def _count_bad_shards(self, source: int) -> None:
        for i, url in enumerate(self.s.sources[source]):
            if i % self.num_slots == self.slot and url in self.s.errors:
                self._skip("bad_shard", url, f"bad_shard: {self.s.errors[url]}")

    def _next_ref(self) -> Ref | None:
        source = (
            0 if len(self.cursors) == 1 else self.mix_rng.choices(range(len(self.cursors)), self.s.weights)[0]
        )
        cur = self.cursors[source]
        while self.s.epochs is None or cur[0] < self.s.epochs:
            if cur[1] == 0:
                self._count_bad_shards(source)
            share = self._share(source, cur[0])
            if cur[1] < len(share):
                url, record = self.s.locate(source, int(share[cur[1]]))
                cur[1] += 1
                return Ref(url, record, epoch=cur[0], source=source)
            if len(share) == 0 and self.s.epochs is None:  # every epoch's share has the same size: none, ever
                raise DataError(
                    f"config key `data.num_slots`: slot {self.slot} gets no records of source {source} "
                    f"({self.s.num_records[source]} readable records in {len(self.s.sources[source])} shards for "
                    f"{self.num_slots} slots); use data.num_slots=auto, lower it, or add data"
                )
            cur[0], cur[1] = cur[0] + 1, 0
        return None  # `epochs` reached (for a mixture: by the first source to get there)

    # -- plan, pack, read ---------------------------------------------------------------------------------------
    def _skip(self, reason: str, url: str, message: str, record: int | None = None) -> None:
        """Count a skipped record (or shard) under `reason`; under error_policy=raise stop with `message`. The
        record's identity travels too: a record met again in a later epoch is one record, not another skip."""
        if self.s.error_policy == "raise":
            raise DataError(f"{message} (in {url})")
        self.counts[reason] += 1
        self.by_shard.setdefault(url, Counter())[reason] += 1
        self.skipped_ids[url if record is None else f"{url}#{record}"] = reason

    def _plan(self, ref: Ref) -> bool:
        """Set ref.num_tokens from the index (or the JSON member); False if the record is skipped."""
        self.counts["records"] += 1
        try:
            ref.num_tokens, ref.num_visual = self.s.plan_counts(ref.url, ref.record)
        except SampleError as e:
            idx = self.s.index(ref.url)
            key = idx.records[ref.record]["key"]
            self._skip(e.reason, ref.url, f"{e} ({self._record_id(idx, ref)}record {key!r})", ref.record)
            return False
        return True

    @staticmethod
    def _record_id(idx, ref: Ref) -> str:
        """`record id '...', ` from the record's JSON member (the source's own id), or '' without one."""
        if "json" not in idx.records[ref.record]["members"]:
            return ""
        try:
            rid = record_id({"json": shard_index.read_member(idx, ref.record, "json")})
        except Exception:  # the error being reported is what matters; an unreadable id just stays unnamed
            return ""
        return "" if rid is None else f"record id {rid!r}, "

    def _row(self, refs: list[Ref]) -> dict | None:
        """Read and process a completed row's records; None if every one of them failed."""
        samples, kept = [], []
        for ref in refs:
            idx = self.s.index(ref.url)
            record = shard_index.read_record(idx, ref.record)  # IndexMismatch stops the run: never trusted
            try:
                sample = self.s.processor(record)
            except Exception as e:
                # SampleError carries its reason; anything else a record provokes (a library raising on odd
                # input) is still that record's fault: counted as `processing_error`, never a dead run.
                reason = e.reason if isinstance(e, SampleError) else "processing_error"
                self._skip(reason, ref.url, f"{e} (record {record['__key__']!r})", ref.record)
                continue
            if sample.num_tokens != ref.num_tokens:
                raise DataError(
                    f"{ref.url}: record {record['__key__']!r} was planned with {ref.num_tokens} tokens but has "
                    f"{sample.num_tokens}: the shard index' token counts are stale; rebuild it with "
                    f"`python -m data.index {ref.url} --force`"
                )
            samples.append(sample)
            kept.append(ref)
        if not samples:
            return None
        tokens = self.s.processor.tokens
        row = collate_row(
            samples,
            image_token_id=tokens.image_token_id,
            video_token_id=tokens.video_token_id,
            pixel_table=self.s.processor.pixel_table,
        )
        row["records"] = self.counts.pop("records", 0)
        row["skipped"] = dict(self.counts)
        row["skipped_shards"] = {u: dict(c) for u, c in self.by_shard.items()}
        row["skipped_records"] = dict(self.skipped_ids)
        row["sample_epochs"] = [r.epoch for r in kept]  # the epoch each sample was drawn in (0 = first pass)
        row["sample_sources"] = [r.source for r in kept]
        row["epoch"] = max(row["sample_epochs"])
        row["videos"] = [v for s in samples for v in s.videos]
        self.counts.clear()
        self.by_shard.clear()
        self.skipped_ids.clear()
        return row

    def planned_rows(self) -> Iterator[list[Ref]]:
        """The slot's rows as references, in order (nothing read): rows completed before a checkpoint first."""
        while True:
            while self.pending:
                yield self.pending.pop(0)
            ref = self._next_ref()
            if ref is None:
                break
            if self._plan(ref):
                self.pending += self.packer.add(ref)
        self.pending += self.packer.flush()  # the end of the last epoch (finite streams only)
        while self.pending:
            yield self.pending.pop(0)

    def rows(self) -> Iterator[dict]:
        for refs in self.planned_rows():
            out = [self._row(refs)]
            if out[0] is None:
                continue
            out[0]["slot"], out[0]["global_row"] = self.slot, self.rows_out * self.num_slots + self.slot
            self.rows_out += 1
            out[0]["slot_state"] = self._snapshot()
            # No local name may hold the row while this generator is suspended: a worker keeps many slots'
            # generators suspended, and each would pin its last row (up to ~130 MB of pixels at 32K).
            yield out.pop()

    # -- state ---------------------------------------------------------------------------------------------------
    def _snapshot(self) -> dict:
        urls: dict[str, int] = {}

        def ref(r: Ref) -> list:
            return [
                urls.setdefault(r.url, len(urls)),
                r.record,
                r.num_tokens,
                r.epoch,
                r.source,
                r.num_visual,
            ]

        return {
            "version": STATE_VERSION,
            "slot": self.slot,
            "rows": self.rows_out,
            "cursors": [list(c) for c in self.cursors],
            "mix_rng": _rng_state(self.mix_rng),
            "packer": [[ref(r) for r in row] for row in self.packer.rows],
            "pending": [[ref(r) for r in row] for row in self.pending],
            "urls": list(urls),
        }

    def _load(self, state: dict) -> None:
        urls = state["urls"]
        for u in urls:
            if u not in self.s.lengths:
                raise ValueError(
                    f"config key `data.shards`: the checkpoint's data position names {u!r}, not a shard now"
                )

        def ref(r: list) -> Ref:
            return Ref(*([urls[r[0]]] + r[1:]))  # a state written before num_visual: 0 (balance off then)

        self.rows_out = state["rows"]
        self.cursors = [list(c) for c in state["cursors"]]
        _set_rng_state(self.mix_rng, state["mix_rng"])
        self.packer.rows = [[ref(r) for r in row] for row in state["packer"]]
        self.pending = [[ref(r) for r in row] for row in state["pending"]]


def _cumsum(values) -> Iterator[int]:
    total = 0
    for v in values:
        total += v
        yield total


def make_loader(stream: PackedRowStream, num_workers: int) -> DataLoader:
    # Rows are already batches (batch dim 1): no collation, no re-batching. Workers are read round-robin
    # in order (in_order=True), which is what maps the rank's k-th row to worker k % num_workers.
    # Two rows in flight per worker: a real row holds up to ~130 MB of uint8 pixels.
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        prefetch_factor=2 if num_workers > 0 else None,
        pin_memory=torch.cuda.is_available(),
        in_order=True,
    )


class ResumableLoader:
    """An iterator over one rank's packed rows whose `state_dict()` is the position of the rows *handed out so
    far* (not of what the workers prefetched): the state of each of this rank's slots after its last row.

    A state merged from every rank's `state_dict()` (taken at the same optimizer step) resumes on any world
    size and worker count that divide `num_slots`:

    >>> loader = ResumableLoader(stream, num_workers=2)
    >>> rows = [next(loader) for _ in range(6)]; state = loader.state_dict()
    >>> resumed = ResumableLoader(stream, num_workers=4, state=state)   # next(resumed) == row 7
    """

    def __init__(self, stream: PackedRowStream, num_workers: int, state: dict | None = None):
        self.stream, self.num_workers = stream, num_workers
        self.num_slots = stream.resolve_slots(num_workers)
        self.states: dict[int, dict] = {}
        self.next_row = stream.rank  # the rank's next global row
        self._it: Iterator[dict] | None = None
        if state:
            self.load_state_dict(state)

    def state_dict(self) -> dict:
        # `consumed`: global rows consumed by all ranks, which is this rank's count x world size when every rank
        # stands at the same step (checkpoints are taken at step boundaries).
        consumed = self.next_row - self.stream.rank
        return {
            "version": STATE_VERSION,
            "num_slots": self.num_slots,
            "consumed": consumed,
            "slots": dict(self.states),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from a state holding (at least) this rank's slots: one rank's own `state_dict()` on the same
        world size, or `merge_states` of every rank's on another."""
        if self._it is not None:
            raise RuntimeError("ResumableLoader.load_state_dict: the loader is already iterating")
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"config key `trainer.resume`: the checkpoint's data position has format {state.get('version')}, "
                f"this loader reads {STATE_VERSION} (per-epoch permutations over virtual slots); resume with the code that "
                f"wrote it"
            )
        if state["num_slots"] != self.num_slots:
            raise ValueError(
                f"config key `data.num_slots`: the checkpoint was written with {state['num_slots']} slots, now "
                f"{self.num_slots}; the stream position cannot be carried over"
            )
        world, consumed = self.stream.world_size, int(state["consumed"])
        if consumed % world:
            raise ValueError(
                f"config key `trainer.resume`: the data position ({consumed} rows) is not a step boundary for "
                f"world size {world}"
            )
        slots = {int(k): v for k, v in state["slots"].items()}
        for slot in range(self.num_slots):  # slot i made every global row g < consumed with g % S == i
            expected = consumed // self.num_slots + (slot < consumed % self.num_slots)
            made = slots.get(slot, {"rows": 0})["rows"]
            if (slot in slots or slot % world == self.stream.rank) and made != expected:
                raise ValueError(
                    f"config key `trainer.resume`: the data position is not one of a step boundary (slot {slot} "
                    f"made {made} rows, expected {expected} of {consumed}); on another world size the state "
                    f"must be merged from every rank (data.loader.merge_states)"
                )
        self.states = {i: s for i, s in slots.items() if i % world == self.stream.rank}
        self.next_row = consumed + self.stream.rank

    def __iter__(self) -> ResumableLoader:
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self.stream.num_slots = self.num_slots
            self.stream.resume_states = dict(self.states)
            self.stream.start_row = self.next_row
            # torch's DataLoader draws its base seed from the global RNG when its iterator starts: on a resumed run
            # that happens at the first step, after the checkpoint's RNG state was restored, and would shift every
            # later draw (dropout masks: LoRA's adapter.dropout) against the uninterrupted run. Draw it off the side.
            with torch.random.fork_rng(devices=[]):
                self._it = iter(make_loader(self.stream, self.num_workers))
        row = next(self._it)
        slot, global_row = row.pop("slot"), row.pop("global_row")
        if self.stream.epochs is None and global_row != self.next_row:
            raise RuntimeError(
                f"data loader out of order: got global row {global_row}, expected {self.next_row}"
            )
        self.next_row = global_row + self.stream.world_size
        self.states[slot] = row.pop("slot_state")
        row["global_row"] = global_row
        return row


def video_report(stream: PackedRowStream, examples: int = 2) -> list[str]:
    """Lines describing how the stream's video files are sampled (from the indexes: nothing decoded)."""
    if not stream.video_files:
        return []
    described, bad = [], 0
    for key, meta in stream.video_files:
        try:
            described.append((key, meta, stream.processor.describe_video(meta)))
        except SampleError:
            bad += 1
    v = stream.processor.video
    lines = [
        f"data: {len(stream.video_files)} video files"
        + (f" ({bad} cannot be sampled: counted as skipped when met)" if bad else "")
        + (
            f"; sampling (data.video): fps {v.fps}, {v.min_frames}..{v.max_frames} frames, "
            f"{v.min_pixels}..{v.max_pixels} px/frame, {v.total_pixels} px/video"
            if v
            else ""
        )
    ]
    if described:

        def span(name: str, fmt: str = "{:,}") -> str:
            values = sorted(d[name] for _, _, d in described)
            return f"{fmt.format(values[0])}..{fmt.format(values[-1])} (median {fmt.format(values[len(values) // 2])})"

        lines.append(
            f"  per video: {span('frames')} frames, effective fps {span('effective_fps', '{:.2f}')}, "
            f"{span('visual_tokens')} visual tokens"
        )
        for key, meta, d in described[:examples]:
            lines.append(
                f"  e.g. {key}: {meta.frames} frames @ {meta.fps:.2f} fps, {meta.width}x{meta.height} -> "
                f"{d['frames']} frames @ {d['effective_fps']:.2f} fps, grid {d['grid']}, "
                f"{d['visual_tokens']:,} visual tokens"
            )
    return lines


def source_report(stream: PackedRowStream) -> list[str]:
    """What a run trains on (from the indexes: nothing decoded): sources, shards, readable records."""
    stream.estimate_rows()  # mean tokens per record
    lines = []
    for i, (src, n) in enumerate(zip(stream.sources, stream.num_records)):
        bad = [u for u in src if u in stream.errors]
        name = "" if len(stream.sources) == 1 else f"data.mixture[{i}] (weight {stream.weights[i]:g}): "
        lines.append(
            f"data: {name}{len(src)} shard{'s' * (len(src) != 1)} ({src[0]}"
            + (f" .. {src[-1]}" if len(src) > 1 else "")
            + f"), {n:,} readable records"
            + (f" ({len(bad)} unreadable or truncated shards: {bad[:3]})" if bad else "")
            + f", ~{stream.mean_tokens[i]:,.0f} tokens per record"
        )
    return lines


def plan_report(stream: PackedRowStream, *, rows: int, slots_setting: int | str | None) -> list[str]:
    """The slots (after `fit_slots`) and how many epochs `rows` global rows cover (records per row estimated
    from the planned token counts)."""
    per_row = stream.estimate_rows()
    num_slots = stream.num_slots
    hard, fit = stream.slot_limits()
    lines = []
    how = {
        "auto": "data.num_slots=auto: the most, up to 64, whose shares of an epoch fill a slot's open rows",
        "checkpoint": "data.num_slots=auto, as the checkpoint was written",
        None: "one per consumer",
    }.get(slots_setting, "data.num_slots")
    lines.append(
        f"data: ~{per_row:.1f} records per {stream.max_tokens:,}-token row (planned token counts); "
        f"{num_slots} slots ({how}): ~{min(stream.num_records) / num_slots:,.0f} records per slot per epoch"
        + (
            f"; fewer than data.num_open_rows={stream.num_open_rows} rows' worth: {stream.open_rows} open "
            f"row{'s' * (stream.open_rows != 1)} per slot, so epochs stay in order (a row may span "
            f"epochs, never repeating a record)"
            if num_slots > fit
            else ""
        )
    )
    # A row never holds a record twice, so on a small data set (all of it fits in a row) a row holds at most
    # N_i / p_i records (source i's N_i records, a share p_i of the row), not the token count's many more.
    samples = rows * min(per_row, *(n / p for n, p in zip(stream.num_records, stream.shares()) if p))
    epochs = [samples * p / n for p, n in zip(stream.shares(), stream.num_records)]
    lines.append(
        f"data: this run: {rows:,} rows ~ {samples:,.0f} samples ~ "
        + (
            f"{epochs[0]:.2f} epochs"
            if len(epochs) == 1
            else ", ".join(f"{e:.2f} epochs of data.mixture[{i}]" for i, e in enumerate(epochs))
        )
        + " (an epoch: every readable record once, reshuffled for the next)"
    )
    return lines


def merge_states(states: list[dict | None]) -> dict | None:
    """One data position from every rank's `state_dict()` of the same step (each holds its own slots)."""
    states = [s for s in states if s]
    if not states:
        return None
    first = states[0]
    merged = {k: first.get(k) for k in ("version", "num_slots", "consumed")}
    merged["slots"] = {}
    for s in states:
        if (s.get("num_slots"), s.get("consumed")) != (merged["num_slots"], merged["consumed"]):
            raise ValueError(
                "config key `trainer.resume`: the ranks' data positions are not of the same step "
                f"({[(x.get('num_slots'), x.get('consumed')) for x in states]} as (num_slots, consumed rows))"
            )
        merged["slots"].update({int(k): v for k, v in s.get("slots", {}).items()})
    return merged
