"""Streaming loader: shard indexes -> record references -> shuffle -> plan -> pack -> read + process -> rows.

**Virtual slots.** The stream is `num_slots` independent slot streams. Slot i owns a fixed share of each source's
epochs (whole shards dealt round-robin when there are at least as many shards as slots, else every
`num_slots`-th record) and makes rows 0, 1, 2, ... Global row g is row g // S of slot g % S. Rank r of W takes
global rows r, r + W, r + 2W, ... (slot i belongs to rank i % W) and DataLoader worker k of K takes that
rank's rows k, k + K, ... An optimizer step of G rows therefore consumes global rows [s*G, (s+1)*G) whatever W
and K are, and the stream position is nothing but the slot states. A checkpoint taken at a step boundary
resumes on any world size and worker count for which W * K divides S (`data.num_slots`).

**What a slot holds.** Per source a cursor (epoch, position in its share); a shuffle buffer of record
*references* (shard, record number: nothing read yet); a best-fit packer over references with their planned
token counts; completed rows not yet handed out. A reference leaving the buffer is *planned*: its token count
comes from the shard index when the index holds this processor's counts, else from the record's JSON member
and the media sizes in the index (one small read, no pixel decoded); bad records are counted here. When the
packer completes a row, its records are read (one seek each, `data/index.py`) and processed, with pixels kept as
uint8 (`data/pixels.py`). So host memory is the open rows' references plus one row of pixels: it does not grow
with `shuffle_buffer`, and a resumed slot re-reads nothing to restore its buffer or packer.

**Bad input** follows `error_policy`: `raise` stops with the reason, `skip` counts it. Each row carries the
records planned since the previous row of its slot (`records`), the skip counts by reason (`skipped`) and by
shard (`skipped_shards`), so the trainer can log `data/skipped/<reason>`, name the shards, and abort above
`max_skip_fraction`. A shard whose index stopped early (truncated, corrupt) or that cannot be read at all is
counted as `bad_shard` once per epoch, by the slot whose share holds it.
"""

from __future__ import annotations

import bisect
import random
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data import index as shard_index
from data.packing import BestFitPacker, collate_row
from data.processing import SampleError, SampleProcessor, record_id

STATE_VERSION = 3  # 3: virtual slots + the global rows consumed
INDEX_CACHE = 64  # shard indexes a worker keeps in memory


class DataError(RuntimeError):
    """Raised under error_policy=raise (and always for eval data), naming the reason and the record."""


@dataclass
class Ref:
    """A record named by its shard and position in it; `num_tokens` once planned."""

    url: str
    record: int
    num_tokens: int = 0

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
        num_slots: int | None = None,
        shuffle_buffer: int = 256,
        error_policy: str = "skip",
        num_open_rows: int = 8,
        epochs: int | None = None,
        mixture: list[tuple[list[str], float]] | None = None,
        for_eval: bool = False,
        index_cache_dir: str | None = None,
        log=print,
    ):
        if for_eval:  # evaluation data: one pass, and a bad record is an error, never a silent skip
            error_policy, epochs = "raise", 1
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
        if num_slots is not None and num_slots < 1:
            raise ValueError(f"config key `data.num_slots`: must be >= 1, got {num_slots}")
        self.processor = processor
        self.max_tokens = max_tokens
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.num_slots = (
            num_slots  # None: one slot per consumer (world_size x num_workers), set by the loader
        )
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.error_policy = error_policy
        self.num_open_rows = num_open_rows
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

    # -- which slots this consumer plays -----------------------------------------------------------------------
    def resolve_slots(self, num_workers: int) -> int:
        """`num_slots`, or one slot per consumer when unset; refused (naming the key) if it does not divide."""
        return self.check_slots(self.num_slots, self.world_size, num_workers)

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
        self.shuffle_rng = random.Random(_seed(stream.seed, 2, slot))
        self.packer = BestFitPacker(stream.max_tokens, stream.num_open_rows)
        self.buffer: list[Ref] = []
        self.pending: list[list[Ref]] = []
        self.rows_out = 0
        self.counts: Counter = Counter()
        self.by_shard: dict[str, Counter] = {}
        # `url#record` (or a bad shard's url) -> reason, for the skips since the last row
        self.skipped_ids: dict[str, str] = {}
        self._shares: dict[int, tuple] = {}
        if state is not None:
            self._load(state)

    # -- the share of one epoch -------------------------------------------------------------------------------
    def _share(self, source: int, epoch: int):
        """(shards, cumulative record counts, first, stride, length): position p is record first + p * stride of
        the concatenated shards."""
        cached = self._shares.get(source)
        if cached is None or cached[0] != epoch:  # one epoch per source is cached: the current one
            shards = list(self.s.sources[source])
            random.Random(_seed(self.s.seed, source, epoch)).shuffle(shards)
            if len(shards) >= self.num_slots:
                shards, first, stride = shards[self.slot :: self.num_slots], 0, 1
            else:
                first, stride = self.slot, self.num_slots
            ends = list(_cumsum(self.s.lengths[u] for u in shards))
            total = ends[-1] if ends else 0
            cached = (epoch, shards, ends, first, stride, max(0, -(-(total - first) // stride)))
            self._shares[source] = cached
        return cached[1:]

    def _count_bad_shards(self, source: int, epoch: int) -> None:
        shards, _, _, stride, _ = self._share(source, epoch)
        mine = shards if stride == 1 else shards[self.slot :: self.num_slots]
        for url in mine:
            if url in self.s.errors:
                self._skip("bad_shard", url, f"bad_shard: {self.s.errors[url]}")

    def _next_ref(self) -> Ref | None:
        source = (
            0 if len(self.cursors) == 1 else self.mix_rng.choices(range(len(self.cursors)), self.s.weights)[0]
        )
        cur = self.cursors[source]
        empty_epochs = 0
        while self.s.epochs is None or cur[0] < self.s.epochs:
            if cur[1] == 0:
                self._count_bad_shards(source, cur[0])
            shards, ends, first, stride, length = self._share(source, cur[0])
            if cur[1] < length:
                q = first + cur[1] * stride
                i = bisect.bisect_right(ends, q)
                cur[1] += 1
                return Ref(shards[i], q - (ends[i - 1] if i else 0))
            cur[0], cur[1] = cur[0] + 1, 0
            empty_epochs = empty_epochs + 1 if length == 0 else 0
            if empty_epochs >= 2:
                total = sum(self.s.lengths[u] for u in self.s.sources[source])
                raise DataError(
                    f"config key `data.num_slots`: slot {self.slot} gets no records of source {source} "
                    f"({total} readable records in {len(self.s.sources[source])} shards for {self.num_slots} "
                    f"slots); lower data.num_slots or add data"
                )
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
        idx = self.s.index(ref.url)
        rec = idx.records[ref.record]
        self.counts["records"] += 1
        try:
            planned = rec.get("num_tokens", {}).get(self.s.fingerprint)
            if isinstance(planned, str):
                raise SampleError(planned, "found when the shard was indexed")
            if planned is None:
                if "json" not in rec["members"]:
                    raise SampleError("missing_field", "no .json member")
                raw = shard_index.read_member(idx, ref.record, "json")
                planned = self.s.processor.num_tokens(raw, idx.media_sizes(ref.record), check_length=False)
            if planned > self.s.max_tokens:
                raise SampleError("too_long", f"{planned} tokens > max_tokens={self.s.max_tokens}")
        except SampleError as e:
            self._skip(
                e.reason, ref.url, f"{e} ({self._record_id(idx, ref)}record {rec['key']!r})", ref.record
            )
            return False
        ref.num_tokens = planned
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

    def _add(self, ref: Ref) -> None:
        if self._plan(ref):
            self.pending += self.packer.add(ref)

    def _row(self, refs: list[Ref]) -> dict | None:
        """Read and process a completed row's records; None if every one of them failed."""
        samples = []
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
        row["epoch"] = self.cursors[0][0]
        row["videos"] = [v for s in samples for v in s.videos]
        self.counts.clear()
        self.by_shard.clear()
        self.skipped_ids.clear()
        return row

    def _emit(self) -> Iterator[dict]:
        while self.pending:
            out = [self._row(self.pending.pop(0))]
            if out[0] is None:
                continue
            out[0]["slot"], out[0]["global_row"] = self.slot, self.rows_out * self.num_slots + self.slot
            self.rows_out += 1
            out[0]["slot_state"] = self._snapshot()
            # No local name may hold the row while this generator is suspended: a worker keeps many slots'
            # generators suspended, and each would pin its last row (up to ~130 MB of pixels at 32K).
            yield out.pop()

    def rows(self) -> Iterator[dict]:
        yield from self._emit()  # rows completed before the checkpoint but not yet handed out
        while True:
            ref = self._next_ref()
            if ref is None:
                break
            self.buffer.append(ref)
            if len(self.buffer) >= self.s.shuffle_buffer:
                self._add(self.buffer.pop(self.shuffle_rng.randrange(len(self.buffer))))
                yield from self._emit()
        while self.buffer:  # the end of the last epoch: drain the buffer, then flush the packer
            self._add(self.buffer.pop(self.shuffle_rng.randrange(len(self.buffer))))
            yield from self._emit()
        self.pending += self.packer.flush()
        yield from self._emit()

    # -- state ---------------------------------------------------------------------------------------------------
    def _snapshot(self) -> dict:
        urls: dict[str, int] = {}

        def ref(r: Ref, planned: bool) -> list:
            u = urls.setdefault(r.url, len(urls))
            return [u, r.record, r.num_tokens] if planned else [u, r.record]

        return {
            "version": STATE_VERSION,
            "slot": self.slot,
            "rows": self.rows_out,
            "cursors": [list(c) for c in self.cursors],
            "mix_rng": _rng_state(self.mix_rng),
            "shuffle_rng": _rng_state(self.shuffle_rng),
            "buffer": [ref(r, False) for r in self.buffer],
            "packer": [[ref(r, True) for r in row] for row in self.packer.rows],
            "pending": [[ref(r, True) for r in row] for row in self.pending],
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
            return Ref(urls[r[0]], r[1], r[2] if len(r) > 2 else 0)

        self.rows_out = state["rows"]
        self.cursors = [list(c) for c in state["cursors"]]
        _set_rng_state(self.mix_rng, state["mix_rng"])
        _set_rng_state(self.shuffle_rng, state["shuffle_rng"])
        self.buffer = [ref(r) for r in state["buffer"]]
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
                f"this loader reads {STATE_VERSION} (virtual slots); resume with the code that wrote it"
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
