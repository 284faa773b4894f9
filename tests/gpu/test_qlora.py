"""`adapter=qlora` on CUDA: the frozen base in 4-bit NF4 (bitsandbytes), PEFT's LoRA on top, trained for real.

One process, ZeRO-2, bf16, the tiny Qwen2.5-VL: after `apply_adapter` every frozen linear layer is a bitsandbytes
`Linear4bit` wrapped by PEFT's bitsandbytes LoRA layer where adapted; a few steps make the loss fall and move only
the adapters. Skipped without CUDA or bitsandbytes (on CPU, validation refuses adapter=qlora: tests/unit).
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_overrides

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_qlora_trains_adapters_over_a_4bit_base(tmp_path, cache_dir):
    bnb = pytest.importorskip("bitsandbytes")
    from peft.tuners.lora import LoraLayer

    from mmrope.train.run import build_session
    from tests.integration.test_checkpoint import compose_cfg

    cfg = compose_cfg(
        tiny_overrides(
            cache_dir, tmp_path, "adapter=qlora", "trainer.run_name=qlora", "trainer.resume=never",
            "trainer.precision=bf16", "trainer.optim.lr=1e-3", "trainer.global_batch_size=1", "trainer.max_steps=6",
        )
    )  # fmt: skip
    s = build_session(cfg)
    vlm = s.engine.module.vlm
    lora = [m for m in vlm.modules() if isinstance(m, LoraLayer)]
    assert lora and all(isinstance(m.get_base_layer(), bnb.nn.Linear4bit) for m in lora)
    frozen4 = [m for m in vlm.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(frozen4) > len(lora)  # the ViT's frozen linears are 4-bit too
    trainable = {n for n, p in vlm.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in vlm.named_parameters() if n in trainable}
    losses = [s.trainer.train_step()[0] for _ in range(6)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    moved = [n for n, p in vlm.named_parameters() if n in trainable and not torch.equal(p, before[n])]
    assert moved, "no adapter moved"
    s.metrics.close()
