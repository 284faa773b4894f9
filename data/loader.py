"""Streaming loader: shards -> records -> processed samples -> packed rows, split across ranks and workers.

Order is a pure function of (seed, rank, worker): each source's shards are permuted per epoch with the seed
and dealt round-robin to the `world_size * num_workers` consumers (or, when there are fewer shards than
consumers, every consumer reads every shard and keeps every n-th record), so an epoch is covered exactly once.
A mixture draws each next record from a source chosen by a seeded weighted draw; each source cycles its own
epochs. Samples pass a seeded shuffle buffer, then a best-fit packer. The stream repeats forever unless
`epochs` is given (then the buffer and the packer are flushed at the end and nothing is lost).

Resumable: every row carries its consumer's state *after* that row (`loader_state`): per-source cursor (epoch,
shard position, record offset), the RNG states, and the (url, key) names of the samples held in the shuffle
buffer, the packer and completed-but-not-yet-yielded rows. `ResumableLoader` (main process) keeps the state of
the last row it handed out per worker; a stream built with those states re-reads the held records, fast-forwards
the cursors and yields exactly the rows an uninterrupted stream would.

Bad input follows `error_policy`: `raise` stops with the reason, `skip` counts it. Each row carries the skip
counts accumulated since the previous row of that consumer (`skipped`), plus how many records were read
(`records`), so the trainer can log `data/skipped/<reason>` and abort above `max_skip_fraction`.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import braceexpand
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.packing import BestFitPacker, collate_row
from data.processing import Sample, SampleError, SampleProcessor

STATE_VERSION = 1


def expand_urls(urls: list[str] | str) -> list[str]:
    """Brace-expand shard URLs: `/d/shard-{000..003}.tar` -> 4 paths (remote-style URLs work too)."""
    if isinstance(urls, str):
        urls = [urls]
    out = [u for pattern in urls for u in braceexpand.braceexpand(pattern)]
    if not out:
        raise ValueError("config key `data.shards`: no shard URLs given")
    return out


class DataError(RuntimeError):
    """Raised under error_policy=raise (and always for eval data), naming the reason and the record."""


@dataclass
class Cursor:
    """Where one consumer stands in one source: the next record is record `offset` of shard `shard` of its
    epoch-`epoch` shard list; `index` counts raw records of the epoch (stride mode keeps every n-th)."""

    epoch: int = 0
    shard: int = 0
    offset: int = 0
    index: int = 0


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


def _ref(s: Sample) -> list[str]:
    return [s.url, s.key]


class PackedRowStream(IterableDataset):
    def __init__(
        self,
        urls: list[str] | None,
        processor: SampleProcessor,
        *,
        max_tokens: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 256,
        error_policy: str = "skip",
        num_open_rows: int = 8,
        epochs: int | None = None,
        mixture: list[tuple[list[str], float]] | None = None,
        for_eval: bool = False,
    ):
        if for_eval:  # evaluation data: one pass, and a bad record is an error, never a silent skip
            error_policy, epochs = "raise", 1
        if error_policy not in ("raise", "skip"):
            raise ValueError(f"config key `data.error_policy`: must be raise|skip, got {error_policy!r}")
        if mixture:
            if urls:
                raise ValueError("config keys `data.shards` and `data.mixture`: give one, not both")
            self.sources = [expand_urls(u) for u, _ in mixture]
            self.weights = [float(w) for _, w in mixture]
            if any(w <= 0 for w in self.weights):
                raise ValueError(f"config key `data.mixture`: weights must be > 0, got {self.weights}")
        else:
            self.sources, self.weights = [expand_urls(urls or [])], [1.0]
        self.urls = [u for src in self.sources for u in src]
        self.processor = processor
        self.max_tokens = max_tokens
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.error_policy = error_policy
        self.num_open_rows = num_open_rows
        self.epochs = epochs  # None = forever
        # Set by ResumableLoader before iteration: per logical worker state, and which worker goes first.
        self.resume_states: dict[int, dict] = {}
        self.worker_offset = 0

    # -- the consumer's share of an epoch ------------------------------------------------------------------
    def _consumer(self) -> tuple[int, int, int]:
        """(logical worker, consumer id, number of consumers). DataLoader worker i plays logical worker
        (i + worker_offset) % num_workers, so a resumed loader can start with the worker that was next."""
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        worker = (worker + self.worker_offset) % num_workers
        return worker, self.rank * num_workers + worker, self.world_size * num_workers

    def _shards(self, source: int, epoch: int, consumer: int, num_consumers: int) -> tuple[list[str], bool]:
        shards = list(self.sources[source])
        random.Random(_seed(self.seed, source, epoch)).shuffle(shards)
        stride = len(shards) < num_consumers
        return (shards if stride else shards[consumer::num_consumers]), stride

    def _read(self, url: str, counts: Counter, skip: int) -> Iterator[tuple[int, dict]]:
        """(position, record) of one shard from position `skip` on. Errors met while fast-forwarding over the
        first `skip` records were counted before the checkpoint, so they are not counted again."""
        fast_forward = [skip > 0]

        def on_error(exn: Exception) -> bool:
            if fast_forward[0]:
                return True
            counts["bad_shard"] += 1
            if self.error_policy == "raise":
                raise DataError(f"bad_shard: {url}: {exn}") from exn
            return True  # keep going with the next record / shard

        for position, record in enumerate(wds.tarfile_to_samples(handler=on_error)([{"url": url}])):
            if position + 1 >= skip:
                fast_forward[0] = False
            if position >= skip:
                yield position, record

    def _source_records(self, source: int, cur: Cursor, counts: Counter) -> Iterator[dict]:
        """Records of one source for this consumer from `cur` on, advancing `cur` before each yield."""
        _, consumer, num_consumers = self._consumer()
        while self.epochs is None or cur.epoch < self.epochs:
            mine, stride = self._shards(source, cur.epoch, consumer, num_consumers)
            read_any = cur.shard > 0 or cur.offset > 0
            while cur.shard < len(mine):
                for position, record in self._read(mine[cur.shard], counts, cur.offset):
                    cur.offset = position + 1
                    cur.index += 1
                    read_any = True
                    if stride and (cur.index - 1) % num_consumers != consumer:
                        continue
                    yield record
                cur.shard, cur.offset = cur.shard + 1, 0
            cur.epoch, cur.shard, cur.offset, cur.index = cur.epoch + 1, 0, 0, 0
            if not read_any:  # every shard of this consumer is unreadable: stop instead of spinning forever
                raise DataError(
                    f"no records could be read from source {source} shard(s) {mine[:3]}... (epoch {cur.epoch - 1})"
                )

    # -- one consumer's stream, as an explicit state machine -----------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        worker, consumer, _ = self._consumer()
        counts: Counter = Counter()
        cursors = [Cursor() for _ in self.sources]
        mix_rng = random.Random(_seed(self.seed, 1, consumer))
        shuffle_rng = random.Random(_seed(self.seed, 2, consumer))
        packer = BestFitPacker(self.max_tokens, self.num_open_rows)
        buffer: list[Sample] = []
        pending: list[list[Sample]] = []
        state = self.resume_states.get(worker)
        if state is not None:
            cursors = [Cursor(**c) for c in state["cursors"]]
            _set_rng_state(mix_rng, state["mix_rng"])
            _set_rng_state(shuffle_rng, state["shuffle_rng"])
            held = self._fetch(
                [r for group in (state["buffer"], *state["packer"], *state["pending"]) for r in group]
            )
            buffer = [held[tuple(r)] for r in state["buffer"]]
            packer.rows = [[held[tuple(r)] for r in row] for row in state["packer"]]
            pending = [[held[tuple(r)] for r in row] for row in state["pending"]]

        def snapshot() -> dict:
            return {
                "version": STATE_VERSION,
                "cursors": [asdict(c) for c in cursors],
                "mix_rng": _rng_state(mix_rng),
                "shuffle_rng": _rng_state(shuffle_rng),
                "buffer": [_ref(s) for s in buffer],
                "packer": [[_ref(s) for s in row] for row in packer.rows],
                "pending": [[_ref(s) for s in row] for row in pending],
            }

        def emit() -> Iterator[dict]:
            while pending:
                row = self._finish(pending.pop(0), counts, cursors[0].epoch)
                row["loader_state"], row["loader_worker"] = snapshot(), worker
                yield row

        streams = [self._source_records(i, cursors[i], counts) for i in range(len(self.sources))]
        yield from emit()  # rows completed before the checkpoint but not yet handed out
        num_read = 0
        while True:
            source = 0 if len(streams) == 1 else mix_rng.choices(range(len(streams)), self.weights)[0]
            record = next(streams[source], None)
            if record is None:
                break  # `epochs` reached (for a mixture: by the first source to get there)
            counts["records"] += 1
            num_read += 1
            try:
                buffer.append(self.processor(record))
            except Exception as e:
                # SampleError carries its reason; anything else a record provokes (a library raising on odd
                # input) is still that record's fault: counted as `processing_error`, never a dead run.
                reason = e.reason if isinstance(e, SampleError) else "processing_error"
                if self.error_policy == "raise":
                    raise DataError(
                        f"{reason}: {e} (record {record.get('__key__')!r} in {record.get('__url__')!r})"
                    ) from e
                counts[reason] += 1
                continue
            if len(buffer) >= self.shuffle_buffer:
                pending += packer.add(buffer.pop(shuffle_rng.randrange(len(buffer))))
                yield from emit()
        if num_read == 0 and state is None:
            raise DataError(f"no records could be read from {len(self.urls)} shard(s): {self.urls[:3]}...")
        while buffer:  # the end of the last epoch: drain the buffer, then flush the packer
            pending += packer.add(buffer.pop(shuffle_rng.randrange(len(buffer))))
            yield from emit()
        pending += packer.flush()
        yield from emit()

    def _fetch(self, refs: list[list[str]]) -> dict[tuple[str, str], Sample]:
        """Re-read and re-process the records named by (url, key) refs (processing is deterministic)."""
        wanted: dict[str, set[str]] = {}
        for url, key in refs:
            wanted.setdefault(url, set()).add(key)
        out: dict[tuple[str, str], Sample] = {}
        for url, keys in wanted.items():
            for record in wds.tarfile_to_samples(handler=wds.ignore_and_continue)([{"url": url}]):
                if record["__key__"] in keys:
                    out[(url, record["__key__"])] = self.processor(record)
            missing = keys - {k for u, k in out if u == url}
            if missing:
                raise DataError(f"resume: records {sorted(missing)[:3]} no longer in {url!r}")
        return out

    def _finish(self, samples: list, counts: Counter, epoch: int) -> dict:
        tokens = self.processor.tokens
        row = collate_row(samples, image_token_id=tokens.image_token_id, video_token_id=tokens.video_token_id)
        row["records"] = counts.pop("records", 0)
        row["skipped"] = dict(counts)
        row["epoch"] = epoch
        counts.clear()
        return row


def make_loader(stream: PackedRowStream, num_workers: int) -> DataLoader:
    # Rows are already batches (batch dim 1): no collation, no re-batching. Workers are read round-robin
    # in order (in_order=True), which is what makes the per-worker resume state exact.
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        pin_memory=torch.cuda.is_available(),
        in_order=True,
    )


class ResumableLoader:
    """An iterator over packed rows whose `state_dict()` is the position of the rows *handed out so far*
    (not of what the workers prefetched): the last state per worker and which worker comes next.

    >>> loader = ResumableLoader(stream, num_workers=2)
    >>> rows = [next(loader) for _ in range(5)]; state = loader.state_dict()
    >>> resumed = ResumableLoader(stream, num_workers=2, state=state)   # next(resumed) == row 6
    """

    def __init__(self, stream: PackedRowStream, num_workers: int, state: dict | None = None):
        self.stream, self.num_workers = stream, num_workers
        self.states: dict[int, dict] = {}
        self.next_worker = 0
        if state:
            self.load_state_dict(state)
        self._it: Iterator[dict] | None = None

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "num_workers": self.num_workers,
            "rank": self.stream.rank,
            "world_size": self.stream.world_size,
            "next_worker": self.next_worker,
            "workers": dict(self.states),
        }

    def load_state_dict(self, state: dict) -> None:
        if self._it_started():
            raise RuntimeError("ResumableLoader.load_state_dict: the loader is already iterating")
        for key, mine in (("num_workers", self.num_workers), ("world_size", self.stream.world_size)):
            if state[key] != mine:
                raise ValueError(
                    f"config key `data.{key}`: checkpoint data state was saved with {key}={state[key]}, "
                    f"now {mine}; the stream position cannot be carried over"
                )
        self.states = {int(k): v for k, v in state["workers"].items()}
        self.next_worker = int(state["next_worker"])

    def _it_started(self) -> bool:
        return getattr(self, "_it", None) is not None

    def __iter__(self) -> ResumableLoader:
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self.stream.resume_states = dict(self.states)
            self.stream.worker_offset = self.next_worker
            self._it = iter(make_loader(self.stream, self.num_workers))
        row = next(self._it)
        worker = row.pop("loader_worker")
        self.states[worker] = row.pop("loader_state")
        self.next_worker = (worker + 1) % max(1, self.num_workers)
        return row
