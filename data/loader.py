"""Streaming loader: shards -> records -> processed samples -> packed rows, split across ranks and workers.

Order is a pure function of (seed, epoch, rank, worker): shards are permuted per epoch with the seed, dealt
round-robin to the `world_size * num_workers` consumers (or, when there are fewer shards than consumers,
every consumer reads every shard and keeps every n-th record), then shuffled through a seeded buffer.
The stream repeats epochs forever, so no rank runs dry before the others; the trainer decides when to stop.

Bad input follows `error_policy`: `raise` stops with the reason, `skip` counts it. Each row carries the skip
counts accumulated since the previous row of that consumer (`skipped`), plus how many records were read
(`records`), so the trainer can log `data/skipped/<reason>` and abort above `max_skip_fraction`.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator

import braceexpand
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.packing import BestFitPacker, collate_row
from data.processing import SampleError, SampleProcessor


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


class PackedRowStream(IterableDataset):
    def __init__(
        self,
        urls: list[str],
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
    ):
        self.urls = expand_urls(urls)
        self.processor = processor
        self.max_tokens = max_tokens
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer = shuffle_buffer
        self.error_policy = error_policy
        self.num_open_rows = num_open_rows
        self.epochs = epochs  # None = forever

    # -- the consumer's share of an epoch ------------------------------------------------------------------
    def _consumer(self) -> tuple[int, int]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        return self.rank * num_workers + worker, self.world_size * num_workers

    def _records(self, epoch: int, counts: Counter) -> Iterator[dict]:
        consumer, num_consumers = self._consumer()
        shards = list(self.urls)
        random.Random(self.seed * 1_000_003 + epoch).shuffle(shards)
        stride_records = len(shards) < num_consumers
        mine = shards if stride_records else shards[consumer::num_consumers]

        def on_error(exn: Exception) -> bool:
            counts["bad_shard"] += 1
            if self.error_policy == "raise":
                raise DataError(f"bad_shard: {exn}") from exn
            return True  # keep going with the next record / shard

        index = 0
        for url in mine:
            for record in wds.tarfile_to_samples(handler=on_error)([{"url": url}]):
                index += 1
                if stride_records and (index - 1) % num_consumers != consumer:
                    continue
                yield record

    def _samples(self, epoch: int, counts: Counter) -> Iterator:
        consumer, _ = self._consumer()
        rng = random.Random(hash((self.seed, epoch, consumer)) & 0xFFFFFFFF)
        buffer: list = []
        for record in self._records(epoch, counts):
            counts["records"] += 1
            try:
                sample = self.processor(record)
            except SampleError as e:
                if self.error_policy == "raise":
                    raise DataError(
                        f"{e} (record {record.get('__key__')!r} in {record.get('__url__')!r})"
                    ) from e
                counts[e.reason] += 1
                continue
            buffer.append(sample)
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[dict]:
        counts: Counter = Counter()
        tokens = self.processor.tokens
        packer = BestFitPacker(self.max_tokens, self.num_open_rows)
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            produced = False
            for sample in self._samples(epoch, counts):
                for row in packer.add(sample):
                    produced = True
                    yield self._finish(row, counts, epoch, tokens)
            if self.epochs is not None and epoch == self.epochs - 1:
                for row in packer.flush():
                    produced = True
                    yield self._finish(row, counts, epoch, tokens)
            if not produced and counts["records"] == 0:
                raise DataError(
                    f"no records could be read from {len(self.urls)} shard(s): {self.urls[:3]}..."
                )
            epoch += 1

    @staticmethod
    def _finish(samples: list, counts: Counter, epoch: int, tokens) -> dict:
        row = collate_row(samples, image_token_id=tokens.image_token_id, video_token_id=tokens.video_token_id)
        row["records"] = counts.pop("records", 0)
        row["skipped"] = dict(counts)
        row["epoch"] = epoch
        counts.clear()
        return row


def make_loader(stream: PackedRowStream, num_workers: int) -> DataLoader:
    # Rows are already batches (batch dim 1): no collation, no re-batching.
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        pin_memory=torch.cuda.is_available(),
    )
