"""`adapter=lora` pieces without training: roles resolved per family to real module names, what trains after
`apply_adapter`, PEFT's LoRA math at init and merged, the refusals (naming the key), resume fingerprints."""

from __future__ import annotations

import re

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from mmrope.distributed.adapters import apply_adapter, is_adapter_parameter, resolve_targets
from mmrope.encodings import build
from mmrope.model.config import AdapterConfig, FreezeConfig, TinyModelConfig
from mmrope.model.families import FAMILIES, tiny_config
from mmrope.model.freeze import apply_freeze
from mmrope.model.install import install
from mmrope.train.checkpoint import CheckpointManager, config_fingerprint
from mmrope.train.config import register_configs, validate
from tests.conftest import ROOT

IDS = dict.fromkeys(
    ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"), 1
) | {
    "pad_token_id": 0,
    "eos_token_id": 0,
}
ALL_FROZEN = FreezeConfig(vision=True, connector=True, llm=True, lm_head=True)


def tiny(family: str) -> nn.Module:
    torch.manual_seed(0)
    return FAMILIES[family].model_class(
        tiny_config(family, TinyModelConfig(), vocab_size=64, special_ids=IDS)
    )


# Per tiny model (2 LLM layers, 2 ViT blocks): modules per role, and the name each must end with. Qwen3.5 has one
# gated delta-net layer (in_proj_qkv, in_proj_z, out_proj) and one attention layer (q/k/v/o); Qwen3-VL adds one
# DeepStack merger to the connector; the ViT MLPs: Qwen2-VL fc1/fc2, Qwen2.5-VL a SwiGLU, Qwen3 linear_fc1/fc2.
EXPECTED = {
    "qwen2_vl": {"llm.attention": 8, "llm.mlp": 6, "connector": 2, "vision.attention": 4, "vision.mlp": 4},
    "qwen2_5_vl": {"llm.attention": 8, "llm.mlp": 6, "connector": 2, "vision.attention": 4, "vision.mlp": 6},
    "qwen3_vl": {"llm.attention": 8, "llm.mlp": 6, "connector": 4, "vision.attention": 4, "vision.mlp": 4},
    "qwen3_vl_moe": {"llm.attention": 8, "connector": 4, "vision.attention": 4, "vision.mlp": 4},
    "qwen3_5": {"llm.attention": 7, "llm.mlp": 6, "connector": 2, "vision.attention": 4, "vision.mlp": 4},
    "qwen3_5_moe": {"llm.attention": 7, "connector": 2, "vision.attention": 4, "vision.mlp": 4},
}
# Linear layers no role adapts: the delta-net's per-head scalars, MoE routers and the shared expert (left to the
# freeze policy), the lm_head (refused at validation: the loss reads its weight directly).
UNADAPTED = r"lm_head|.*linear_attn\.in_proj_[ab]|.*mlp\.(gate|shared_expert.*)"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_roles_resolve_to_the_family_modules(family):
    model = tiny(family)
    roles = [r for r in EXPECTED[family]]
    by_role = resolve_targets(model, [*roles, "lm_head"])
    assert {r: len(n) for r, n in by_role.items() if r != "lm_head"} == EXPECTED[family]
    assert all(n.endswith(("attn.qkv", "attn.proj")) for n in by_role["vision.attention"])  # fused qkv
    assert sum(n.endswith("attn.qkv") for n in by_role["vision.attention"]) == 2
    for names in by_role.values():
        assert all(isinstance(model.get_submodule(n), nn.Linear) for n in names)
    # Every linear layer of the model is in exactly one role, or deliberately outside all of them.
    adapted = {n for names in by_role.values() for n in names}
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert {n for n in linears - adapted if not re.fullmatch(UNADAPTED, n)} == set()
    if FAMILIES[family].moe:  # fused 3D experts: no role, refused at validation (test_refusals_name_the_key)
        assert FAMILIES[family].adapter_roles["llm.mlp"] == ()


def test_a_role_that_matches_nothing_is_refused_naming_the_key():
    model = tiny("qwen2_5_vl")
    model.model.visual.merger = nn.Identity()  # a model without the connector's linear layers
    with pytest.raises(ValueError, match=r"`adapter\.targets`: connector"):
        resolve_targets(model, ["llm.attention", "connector"])


def installed(family: str, rope: str = "mrope", **hparams) -> nn.Module:
    model = tiny(family)
    install(model, build(rope, **hparams), attn_backend="sdpa")
    return model


def test_only_adapters_train_and_unfrozen_groups_and_learned_planes_stay_trainable():
    # GRAPE with learned planes: encoding parameters on the text model's rotary_emb.
    model = installed("qwen2_5_vl", "grape", grape_mode="axis")
    planes = [n for n, _ in model.named_parameters() if ".rotary_emb." in n]
    assert planes, "GRAPE axis mode has no learned planes: the test would prove nothing"
    apply_freeze(model, FreezeConfig(vision=True, connector=False, llm=True, lm_head=True), adapter=True)
    summary = apply_adapter(model, AdapterConfig(name="lora", rank=4, targets=["llm.attention"]), seed=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if is_adapter_parameter(n)}
    connector = {n for n, _ in model.named_parameters() if ".visual.merger." in n}
    assert len(lora) == 2 * 8  # A and B of q/k/v/o in 2 layers
    assert trainable == lora | connector | set(planes)
    assert not any(".base_layer." in n for n in trainable)  # adapted weights frozen
    assert summary.adapter_params == sum(p.numel() for n, p in model.named_parameters() if n in lora)
    assert summary.other_trainable_params == sum(
        p.numel() for n, p in model.named_parameters() if n in connector | set(planes)
    )


def test_lora_starts_as_the_base_and_merges_to_what_it_computes():
    """PEFT's LoRA: B = 0 at init (the adapted model computes the base), and after moving B the merged weights
    compute what the unmerged adapters compute; rsLoRA/DoRA switches reach PEFT."""
    from peft.tuners.lora import LoraLayer

    model = tiny("qwen3_5")
    ids = torch.randint(2, 60, (1, 12))
    with torch.no_grad():
        base = model(input_ids=ids).logits
    cfg = AdapterConfig(
        name="lora", rank=4, alpha=8, use_rslora=True, use_dora=True, targets=["llm.attention"]
    )
    apply_adapter(model, cfg, seed=0)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 7 and all(
        m.scaling["default"] == 8 / 4**0.5 for m in layers
    )  # rsLoRA: alpha/sqrt(r)
    assert all("default" in m.lora_magnitude_vector for m in layers)  # DoRA
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, base, rtol=0, atol=1e-5)
        for m in layers:
            m.lora_B["default"].weight.normal_(std=0.05)
        adapted = model(input_ids=ids).logits
        assert (adapted - base).abs().max() > 1e-3
        for m in layers:
            m.merge()
        torch.testing.assert_close(model(input_ids=ids).logits, adapted, rtol=0, atol=1e-5)


def test_same_seed_same_adapters():
    a, b = tiny("qwen2_5_vl"), tiny("qwen2_5_vl")
    torch.manual_seed(1)  # the ranks' generators differ (seeded seed + rank); the adapters must not
    apply_adapter(a, AdapterConfig(name="lora"), seed=0)
    torch.manual_seed(2)
    apply_adapter(b, AdapterConfig(name="lora"), seed=0)
    pb = dict(b.named_parameters())
    assert all(torch.equal(p, pb[n]) for n, p in a.named_parameters())


register_configs()


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=overrides)


def test_adapter_lora_composes_with_every_group_frozen():
    cfg = validate(compose_cfg(["adapter=lora", "rope=videorope", "rope.dipe=true", "deepspeed=zero3"]))
    assert cfg.adapter.name == "lora" and cfg.adapter.targets == ["llm.attention", "llm.mlp", "connector"]
    assert cfg.model.freeze == ALL_FROZEN
    # a group unfrozen on the command line trains fully next to the adapters
    assert not validate(compose_cfg(["adapter=lora", "model.freeze.connector=false"])).model.freeze.connector


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["adapter=lora", "adapter.targets=[llm.attention,llm.nope]"], "adapter.targets"),
        (["adapter=lora", "adapter.targets=[]"], "adapter.targets"),
        (["adapter=lora", "adapter.rank=0"], "adapter.rank"),
        (["adapter=lora", "adapter.dropout=1.0"], "adapter.dropout"),
        (["adapter=lora", "adapter.targets=[llm.attention,lm_head]"], "adapter.targets"),
        (["adapter=lora", "model.family=qwen3_vl_moe", "rope=mrope_i"], "adapter.targets"),  # fused experts
        (["adapter.name=magic"], "adapter.name"),
    ],
)
def test_refusals_name_the_key(overrides, key):
    with pytest.raises(ValueError, match=rf"`{re.escape(key)}`"):
        validate(compose_cfg(overrides))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal without CUDA")
def test_qlora_is_refused_on_cpu_naming_it():
    with pytest.raises(ValueError, match=r"`adapter=qlora`.*CUDA"):
        validate(compose_cfg(["adapter=qlora"]))


def test_resume_with_other_adapter_settings_is_refused_naming_the_key(tmp_path):
    from mmrope.train.resume import flatten

    ckpt = CheckpointManager(tmp_path, rank=0, world_size=1)
    step = tmp_path / "step_2"
    step.mkdir()

    def manifest_of(overrides):
        import json

        saved = config_fingerprint(flatten(validate(compose_cfg(overrides))))
        (step / "manifest.json").write_text(json.dumps({"config": saved}))

    def check(overrides):
        return ckpt.check_compatible(step, config_fingerprint(flatten(validate(compose_cfg(overrides)))))

    manifest_of(["adapter=lora"])
    check(["adapter=lora"])
    for change, key in [
        (["adapter.rank=8"], "adapter.rank"),
        (["adapter.targets=[llm.attention]"], "adapter.targets"),
        (["adapter.use_dora=true"], "adapter.use_dora"),
    ]:
        with pytest.raises(ValueError, match=rf"`{re.escape(key)}`"):
            check(["adapter=lora", *change])
    with pytest.raises(ValueError, match=r"`adapter\.name`"):
        check([])  # adapter=none over a LoRA checkpoint
    manifest_of([])  # a full-training checkpoint (written before adapters existed: no adapter keys) ...
    check([])
    with pytest.raises(ValueError, match=r"`adapter\.name`"):  # ... cannot continue as LoRA
        check(["adapter=lora"])
    with pytest.raises(ValueError, match=r"`deepspeed\.offload_optimizer`"):  # another optimizer (CPU Adam)
        check(["deepspeed.offload_optimizer=true"])


def test_the_memory_benchmark_counts_the_adapters_peft_builds():
    """tests/perf/bench_memory.py's LoRA arithmetic (r x (in + out) per adapted linear layer, by role), checked on a
    tiny model against the parameters PEFT actually creates."""
    from mmrope.train.flops import shapes_from_hf_config
    from tests.perf.bench_memory import lora_params

    targets = ["llm.attention", "llm.mlp", "connector", "vision.attention", "vision.mlp"]
    model = tiny("qwen2_5_vl")
    llm, vit = shapes_from_hf_config(model.config)
    summary = apply_adapter(model, AdapterConfig(name="lora", rank=4, targets=targets), seed=0)
    assert summary.adapter_params == lora_params(llm, vit, 4, targets)
