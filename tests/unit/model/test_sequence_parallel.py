"""Sequence parallelism without a process group: validation names trainer.sequence_parallel_size, the batch
arithmetic counts an SP group once, and the row split (pad, slice, boundaries) is exact. The 2-rank parity runs in
tests/integration/test_sequence_parallel.py."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir

from mmrope.distributed.sequence_parallel import (
    SequenceParallel,
    check_heads,
    expand_kv_heads,
    pad_and_slice,
    pad_cu_seqlens,
)
from mmrope.train.config import register_configs, validate
from mmrope.train.engine import deepspeed_config
from tests.conftest import ROOT

register_configs()
KEY = r"`trainer\.sequence_parallel_size`"


def cfg_with(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return validate(compose("train", overrides=list(overrides)))


def test_default_is_off_and_sp2_fits_the_tiny_model():
    assert cfg_with().trainer.sequence_parallel_size == 1
    cfg = cfg_with("trainer.sequence_parallel_size=2")  # 2 heads, 1 KV head (repeated to 2)
    assert cfg.trainer.sequence_parallel_size == 2
    assert cfg_with("trainer.sequence_parallel_size=2", "model.family=qwen3_vl", "rope=mrope_i")  # deepstack


@pytest.mark.parametrize(
    "overrides",
    [
        ["trainer.sequence_parallel_size=0"],
        ["trainer.sequence_parallel_size=4"],  # 2 query heads
        [  # 6 heads split over 3, but 2 KV heads and 3 do not divide one another
            "trainer.sequence_parallel_size=3",
            "model.tiny.hidden_size=384",
            "model.tiny.num_attention_heads=6",
            "model.tiny.num_key_value_heads=2",
            "rope.hparams.mrope_section=[8,8,16]",
        ],
        ["trainer.sequence_parallel_size=2", "model.family=qwen3_5", "rope=mrope_i"],  # linear attention
        ["trainer.sequence_parallel_size=2", "trainer.eval.every=10"],  # the probe runs whole rows
    ],
)
def test_bad_sp_sizes_and_models_name_the_key(overrides):
    with pytest.raises(ValueError, match=KEY):
        cfg_with(*overrides)


def test_check_heads_rules():
    check_heads(8, 8, 4)  # split both
    check_heads(8, 2, 4)  # KV heads repeated to 4
    with pytest.raises(ValueError, match="num_attention_heads=6"):
        check_heads(6, 6, 4)
    with pytest.raises(ValueError, match="num_key_value_heads=3"):
        check_heads(12, 3, 4)


def test_batch_arithmetic_uses_the_data_parallel_size():
    cfg = cfg_with("trainer.sequence_parallel_size=2", "trainer.global_batch_size=4")
    assert cfg.data_parallel_size(4) == 2
    assert cfg.grad_accum_steps(4) == 2  # 4 rows / 2 data-parallel groups
    assert cfg.grad_accum_steps(2) == 4  # one SP group: it trains every row
    # DeepSpeed counts every rank as a replica: its train batch holds each row once per SP rank.
    ds = deepspeed_config(cfg, 4)
    assert ds["train_batch_size"] == ds["gradient_accumulation_steps"] * 4 == 8
    with pytest.raises(ValueError, match=KEY):
        cfg.data_parallel_size(3)
    odd = cfg_with("trainer.sequence_parallel_size=2", "trainer.global_batch_size=3")
    with pytest.raises(ValueError, match=r"`trainer\.global_batch_size`.*data-parallel size = 1 x 2"):
        odd.grad_accum_steps(4)


def test_the_slices_of_a_padded_row_cover_it_in_order():
    row_BL = torch.arange(7)[None]  # 7 tokens over 2 ranks: one pad token, 4 + 4
    parts = [pad_and_slice(SequenceParallel(None, size=2, rank=r), row_BL, 1, -1) for r in range(2)]
    assert torch.equal(torch.cat(parts, dim=1), torch.tensor([[0, 1, 2, 3, 4, 5, 6, -1]]))
    pos_3BL = torch.arange(21).view(3, 1, 7)
    first = pad_and_slice(SequenceParallel(None, size=2, rank=0), pos_3BL, 2, 0)
    assert torch.equal(first, pos_3BL[:, :, :4])
    # The pad is a sample of its own; a row that needs none keeps its boundaries.
    assert pad_cu_seqlens(torch.tensor([0, 3, 7], dtype=torch.int32), 8).tolist() == [0, 3, 7, 8]
    assert pad_cu_seqlens(torch.tensor([0, 3, 8]), 8).tolist() == [0, 3, 8]


def test_kv_heads_fewer_than_the_group_are_repeated_in_order():
    k_BHLD = torch.arange(2.0).view(1, 2, 1, 1)
    assert expand_kv_heads(k_BHLD, 4).flatten().tolist() == [0, 0, 1, 1]
    assert expand_kv_heads(k_BHLD, 2) is k_BHLD


def test_ulysses_wraps_the_layers_attention_function_only():
    """apply_sequence_parallel replaces each attention layer's `attend` (the seam), nothing else; the model code
    itself has no SP branch, and a model with delta-net layers is refused naming the config key."""
    from mmrope.distributed.sequence_parallel import UlyssesAttention, apply_sequence_parallel
    from mmrope.encodings import build
    from mmrope.model.attention_layer import MMRopeAttention
    from mmrope.model.install import install
    from tests.unit.model.tiny import tiny_family, tiny_qwen2_5_vl

    model = install(tiny_qwen2_5_vl(), build("mrope", mrope_section=[2, 3, 3]))
    names = [n for n, _ in model.named_parameters()]
    sp = SequenceParallel(group=None, size=2, rank=0)
    assert apply_sequence_parallel(model, sp) == 2
    apply_sequence_parallel(model, sp)  # idempotent: no wrapper around a wrapper
    for layer in model.model.language_model.layers:
        attend = layer.self_attn.attend
        assert isinstance(attend, UlyssesAttention) and attend.sp is sp
        assert attend.attend.__func__ is MMRopeAttention.attend  # the single-device function, wrapped once
    assert [n for n, _ in model.named_parameters()] == names  # state_dict keys stay stock
    delta = install(tiny_family("qwen3_5"), build("mrope_i", mrope_section=[4, 2, 2]))
    with pytest.raises(ValueError, match=KEY):
        apply_sequence_parallel(delta, sp)
