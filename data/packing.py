"""First-fit packing of samples into rows of at most `max_tokens` tokens, and row collation.

A row is a plain dict of tensors (batch dimension 1):
  input_ids [1, L], labels [1, L] (unshifted), position_ids [3, 1, L] (per-sample positions, concatenated),
  cu_seqlens [S+1] int32 (sample boundaries), pixel_values [P, C] or absent, image_grid_thw [I, 3],
  static_position_ids [3, 1, L] with DIPE, visual_mask [1, L] bool, num_samples int; with uint8 pixels also
  pixel_table [C, 256] (data/pixels.py expands them on the device).
Rows are not padded: attention and the loss work on cu_seqlens, so padding would only cost compute.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from data.processing import Sample


class FirstFitPacker:
    """Streaming first-fit by age: keep up to `num_open` partially filled rows, oldest first; put each sample into
    the oldest open row it fits, but never into a row that already holds the same `key` (a row never repeats a
    record, also where it spans an epoch boundary); emit a row once it cannot take even a minimal sample, and the
    oldest row when the pool overflows (everything at the end).

    Filling the oldest row first bounds how long a sample waits: its row leaves the pool at the latest after
    `num_open` younger rows were opened, so a record is trained on within about `num_open` rows of its stream
    after it was drawn (best-fit, which fills the tightest row, left a half-empty row waiting for 100 rows, so an
    epoch's last records arrived epochs late). Fill is the same within 0.2% (tests/perf/RESULTS.md).

    ViT balance (`visual_share`, `balance`): rows of equal tokens cost the LLM the same, but a row of many large
    images costs the vision tower far more than a text-heavy one, and data-parallel ranks wait for the slowest at
    the gradient reduction. With a balance, a row takes a sample only while its visual tokens stay within
    (1 + balance) x visual_share x max_tokens and its text tokens within max_tokens - (1 - balance) x
    visual_share x max_tokens, where visual_share is the data's mean visual fraction of a token: a full row's
    visual tokens are then within +-balance of the data's mean share, whichever rows a rank gets, so the balance needs no rank-aware assignment (the
    global row -> rank mapping stays world-size independent, and so does elastic resume). An empty row takes any
    sample (a record above a cap on its own still trains, in a row of its own share). Samples then need
    `num_visual` (their image + video tokens).

    Works on anything with `num_tokens` and `key`: the loader packs record references whose token counts were
    planned without decoding (data/loader.py), and only reads and processes a row's records once it is complete.
    Deterministic for a given input order.
    """

    def __init__(
        self,
        max_tokens: int,
        num_open: int = 8,
        *,
        visual_share: float | None = None,
        balance: float | None = None,
    ):
        if max_tokens <= 0 or num_open <= 0:
            raise ValueError("packing: max_tokens and num_open must be > 0")
        self.max_tokens = max_tokens
        self.num_open = num_open
        self.rows: list[list[Sample]] = []  # oldest first
        # Caps on a row's visual and text tokens (None: only max_tokens counts); see the class docstring.
        self.caps: tuple[float, float] | None = None
        if balance and visual_share is not None:
            self.caps = (
                (1 + balance) * visual_share * max_tokens,
                (1 - visual_share + balance * visual_share) * max_tokens,
            )

    def _fits(self, row: list[Sample], sample: Sample) -> bool:
        used = self._used(row) + sample.num_tokens
        if used > self.max_tokens or any(s.key == sample.key for s in row):
            return False
        if self.caps is None:
            return True
        visual = sum(s.num_visual for s in row) + sample.num_visual
        return visual <= self.caps[0] and used - visual <= self.caps[1]

    def _used(self, row: list[Sample]) -> int:
        return sum(s.num_tokens for s in row)

    def add(self, sample: Sample) -> list[list[Sample]]:
        """Add a sample; returns the rows completed by it (possibly none), oldest first."""
        if sample.num_tokens > self.max_tokens:
            raise ValueError(
                f"sample {sample.key} has {sample.num_tokens} tokens > max_tokens {self.max_tokens}"
            )
        for row in self.rows:
            if self._fits(row, sample):
                row.append(sample)
                break
        else:
            self.rows.append([sample])
        # A row that cannot take even a minimal sample is complete. (Rows are taken out by position: list
        # equality would compare the samples' tensors.)
        done = [r for r in self.rows if self.max_tokens - self._used(r) < 16]
        self.rows = [r for r in self.rows if self.max_tokens - self._used(r) >= 16]
        while len(self.rows) > self.num_open:
            done.append(self.rows.pop(0))
        return done

    def flush(self) -> list[list[Sample]]:
        done, self.rows = self.rows, []
        return done


def pack(samples: Iterable[Sample], max_tokens: int, num_open: int = 8) -> Iterator[list[Sample]]:
    packer = FirstFitPacker(max_tokens, num_open)
    for s in samples:
        yield from packer.add(s)
    yield from packer.flush()


def collate_row(
    samples: list[Sample],
    *,
    image_token_id: int,
    video_token_id: int,
    pixel_table: torch.Tensor | None = None,
) -> dict:
    """Concatenate samples into one packed row (positions stay per sample: they restart at 0 in each)."""
    input_ids = torch.cat([s.input_ids for s in samples])
    lengths = torch.tensor([0] + [s.num_tokens for s in samples])
    row = {
        "input_ids": input_ids[None],
        "labels": torch.cat([s.labels for s in samples])[None],
        "position_ids": torch.cat([s.position_ids for s in samples], dim=-1)[:, None],
        "cu_seqlens": lengths.cumsum(0).to(torch.int32),
        "image_grid_thw": torch.cat([s.image_grid_thw for s in samples]).long(),
        "visual_mask": ((input_ids == image_token_id) | (input_ids == video_token_id))[None],
        "num_samples": len(samples),
        "sample_keys": [s.key for s in samples],
    }
    pixels = [s.pixel_values for s in samples if s.pixel_values is not None]
    if pixels:
        row["pixel_values"] = torch.cat(pixels)
    videos = [s.pixel_values_videos for s in samples if s.pixel_values_videos is not None]
    if videos:
        row["pixel_values_videos"] = torch.cat(videos)
        row["video_grid_thw"] = torch.cat([s.video_grid_thw for s in samples]).long()
        row["second_per_grid_ts"] = torch.cat([s.second_per_grid_ts for s in samples])
    if pixel_table is not None and ("pixel_values" in row or "pixel_values_videos" in row):
        row["pixel_table"] = pixel_table
    if samples[0].static_position_ids is not None:
        row["static_position_ids"] = torch.cat([s.static_position_ids for s in samples], dim=-1)[:, None]
    return row
