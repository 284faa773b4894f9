"""ViT balance of the packer (issue 23): with `balance`, every row's visual tokens stay near the data's mean
share, so any assignment of rows to data-parallel ranks gives each rank about the same vision-tower work."""

from __future__ import annotations

import random
from dataclasses import dataclass

from data.packing import FirstFitPacker

MAX_TOKENS, SLOTS, RANKS, OPEN_ROWS = 32768, 8, 8, 8


@dataclass
class _Rec:
    key: int
    num_tokens: int
    num_visual: int


def _skewed_records(n: int, seed: int = 0) -> list[_Rec]:
    """Skewed image sizes: 10% text only, 60% a small image with long text, 30% a large image with short text
    (large-image records cost the vision tower ~5x a small one for the same LLM tokens)."""
    rng, out = random.Random(seed), []
    for key in range(n):
        kind = rng.random()
        visual = 0 if kind < 0.1 else rng.randint(64, 400) if kind < 0.7 else rng.randint(600, 1600)
        text = rng.randint(300, 1500) if visual < 500 else rng.randint(100, 800)
        out.append(_Rec(key, text + visual, visual))
    return out


def _plan(records: list[_Rec], balance: float | None) -> tuple[list[list[_Rec]], float]:
    """The loader's scheme in small: the records dealt round-robin to slots, each slot packs its share, global
    row g is row g // SLOTS of slot g % SLOTS. Returns the global rows and the data's visual share."""
    share = sum(r.num_visual for r in records) / sum(r.num_tokens for r in records)
    per_slot = []
    for slot in range(SLOTS):
        packer = FirstFitPacker(MAX_TOKENS, OPEN_ROWS, visual_share=share, balance=balance)
        rows = [row for r in records[slot::SLOTS] for row in packer.add(r)] + packer.flush()
        per_slot.append(rows)
    depth = min(len(rows) for rows in per_slot)
    return [per_slot[g % SLOTS][g // SLOTS] for g in range(depth * SLOTS)], share


def _balance(rows: list[list[_Rec]]) -> tuple[float, float]:
    """(mean over steps of max/mean visual tokens per rank, fill) with RANKS ranks taking one row each a step;
    the last rows of each slot (the flush) are left out as a long run would never reach them."""
    rows = rows[: len(rows) - 2 * SLOTS]
    ratios = []
    for step in range(len(rows) // RANKS):
        visual = [sum(r.num_visual for r in row) for row in rows[step * RANKS : (step + 1) * RANKS]]
        ratios.append(max(visual) / (sum(visual) / len(visual)))
    fill = sum(r.num_tokens for row in rows for r in row) / (len(rows) * MAX_TOKENS)
    return sum(ratios) / len(ratios), fill


def test_vit_balance_bounds_the_visual_work_per_rank():
    records = _skewed_records(6000)
    before, fill_before = _balance(_plan(records, None)[0])
    after, fill_after = _balance(_plan(records, 0.06)[0])
    # measured: 1.20 -> 1.08, fill 99.6% -> 99.0% (data.vit_balance=0.1 gives 1.11 on this harsher skew than the
    # LLaVA-like set's, where it gives 1.06: tests/perf/RESULTS.md)
    assert before > 1.15, "the skewed plan must be unbalanced without the caps (else this test shows nothing)"
    assert after <= 1.1
    assert fill_after >= 0.98


def test_vit_balance_keeps_every_record_once_and_rows_within_caps():
    records = _skewed_records(2000, seed=1)
    rows, share = _plan(records, 0.1)
    packer = FirstFitPacker(MAX_TOKENS, OPEN_ROWS, visual_share=share, balance=0.1)
    seen = [r.key for row in rows for r in row]
    assert len(seen) == len(set(seen)), "a record twice"
    for row in rows:
        assert sum(r.num_tokens for r in row) <= MAX_TOKENS
        if len(row) > 1:  # an empty row takes any record, alone above a cap
            visual = sum(r.num_visual for r in row)
            assert visual <= packer.caps[0] and sum(r.num_tokens for r in row) - visual <= packer.caps[1]
