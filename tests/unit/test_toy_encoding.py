"""A new encoding is one positions class + one registry entry: a toy one, declared in this module (no YAML, no
edit anywhere in mmrope/), composes through the typed config, fits the tiny model and trains a step through the
real model build, seam and objective."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore

from mmrope.encodings import build, knobs
from mmrope.encodings.positions.skeleton import Block, PositionDesign, grid_indices
from mmrope.encodings.registry import EncodingSpec, register, unregister
from mmrope.model.build import build_model
from mmrope.model.install import install
from mmrope.model.objective import SFTObjective
from mmrope.train.config import register_configs, register_rope_config, validate
from tests.conftest import ROOT
from tests.unit.model.tiny import SPECIAL_IDS, TOKENS, VOCAB, image_sample, pixels

NAME = "toy_spread"


class SpreadPositions(PositionDesign):
    """Toy design: a block starting at `base` gets t = base, h = base + spread * hi, w = base + spread * wi; the
    next text starts at max + 1.

    Example (`T T VS I I I I VE T`, image grid (1, 4, 4) -> 2x2 LLM tokens, `spread=2.0`)::

        t: 0 1 2 3 3 3 3 6 7
        h: 0 1 2 3 3 5 5 6 7
        w: 0 1 2 3 5 3 5 6 7
    """

    name = NAME

    def __init__(self, spread: float) -> None:
        self.spread = spread

    def block(self, cur: float, text_len: int, blk: Block, generator) -> tuple[torch.Tensor, float]:
        _, hi, wi = grid_indices(blk.num_t, blk.num_h, blk.num_w)
        base = cur + text_len
        pos_3N = torch.stack([torch.zeros_like(hi), self.spread * hi, self.spread * wi]) + base
        return pos_3N, pos_3N.max().item() + 1


# The one entry: design, allocation, defaults, and the validator of the knob no shipped encoding has.
TOY = EncodingSpec(
    NAME,
    SpreadPositions,
    "chunked",
    {"mrope_section": [16, 24, 24], "spread": 2.0},
    position_keys=("spread",),
    validators={"spread": knobs.positive_number},
)


@pytest.fixture
def toy():
    register(TOY)
    register_configs()
    register_rope_config(NAME)  # `rope=toy_spread` without a YAML
    yield TOY
    unregister(NAME)
    ConfigStore.instance().repo["rope"].pop(f"{NAME}.yaml")


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=overrides)


def test_a_toy_encoding_in_one_entry_trains_a_step(toy):
    cfg = validate(_compose([f"rope={NAME}"]))  # name, knobs and the fit to the tiny model: checked up front
    enc = cfg.rope.encoding()
    assert (enc.name, enc.hparams["spread"], enc.is_1d) == (NAME, 2.0, False)
    with pytest.raises(ValueError, match="`rope.hparams.spread`"):
        validate(
            _compose([f"rope={NAME}", "rope.hparams.spread=-1"])
        )  # the entry's validator, naming the key

    ids_L, grid = image_sample(2, (4, 4), 6, seed=0)  # T T VS I I I I VE + 6 text
    cu = torch.tensor([0, len(ids_L)], dtype=torch.int32)
    pos_3L = enc.packed_position_ids(ids_L, cu, tokens=TOKENS, image_grid_thw=grid, layout=cfg.rope_layout())
    assert pos_3L[:, :9].tolist() == [
        [0, 1, 2, 3, 3, 3, 3, 6, 7],
        [0, 1, 2, 3, 3, 5, 5, 6, 7],
        [0, 1, 2, 3, 5, 3, 5, 6, 7],
    ]

    model = build_model(cfg.model, vocab_size=VOCAB, special_ids=SPECIAL_IDS, seed=cfg.trainer.seed)
    install(model, enc, attn_backend=cfg.model.attn_backend)
    objective = SFTObjective(model)
    labels_L = torch.where(ids_L < 50, ids_L, torch.full_like(ids_L, -100))
    batch = {
        "input_ids": ids_L[None],
        "labels": labels_L[None],
        "position_ids": pos_3L[:, None],
        "cu_seqlens": cu,
        "pixel_values": pixels(grid, seed=0),
        "image_grid_thw": grid,
    }
    optimizer = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=1e-3)
    loss = objective(batch)
    with torch.no_grad():  # the toy's positions reach attention: MRoPE's for the same row give another loss
        mrope_3L = build("mrope").packed_position_ids(ids_L, cu, tokens=TOKENS, image_grid_thw=grid)
        assert not torch.equal(objective({**batch, "position_ids": mrope_3L[:, None]}), loss)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        after = objective(batch)
    assert torch.isfinite(loss) and after < loss
