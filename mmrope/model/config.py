"""Typed configuration schemas of the model: what `mmrope.model.build` builds and `mmrope.model.freeze` freezes.

They live with the model (not with training) so that model code never imports the training package;
`mmrope.train.config.TrainConfig` composes them with the training, data and encoding schemas.
Validation runs in `__post_init__` and raises `ValueError` naming the config key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mmrope.attention import PACKED_BACKENDS
from mmrope.model.families import FAMILIES

MODEL_KINDS = ("tiny", "pretrained", "composed")
MODEL_FAMILIES = tuple(FAMILIES)  # qwen2_vl qwen2_5_vl qwen3_vl qwen3_vl_moe qwen3_5 qwen3_5_moe
# ViT + connector of a VLM, LLM of a plain causal LM: qwen2_5_vl qwen3_vl
COMPOSED_FAMILIES = tuple(name for name, f in FAMILIES.items() if f.composable)
ATTN_BACKENDS = PACKED_BACKENDS  # one list, owned by mmrope.attention


# Field metadata: a field whose value must match the checkpoint's to resume (changing it changes what the checkpoint
# means); `mmrope.train.config.resume_keys()` collects them, `mmrope.train.checkpoint` fingerprints them.
MUST_MATCH = {"resume": "must_match"}


def must_match(default: Any = None, *, factory: Any = None) -> Any:
    """A dataclass field marked resume-relevant (`MUST_MATCH`)."""
    if factory is not None:
        return field(default_factory=factory, metadata=MUST_MATCH)
    return field(default=default, metadata=MUST_MATCH)


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ValueError(f"config key `{key}`: {message}")


def _one_of(value: Any, choices: tuple, key: str) -> None:
    _require(value in choices, key, f"must be one of {list(choices)}, got {value!r}")


@dataclass
class TinyModelConfig:
    """Sizes of the tiny Qwen-VL built from config for the embedded default and the tests."""

    # head_dim 128 like every real Qwen-VL, so the shipped rope configs ([16,24,24] = 64 rotary pairs) fit as is.
    hidden_size: int = 256
    num_hidden_layers: int = 2  # LLM decoder layers (Qwen3.5: delta-net and attention alternate)
    num_attention_heads: int = 2  # query heads: head_dim = hidden_size / num_attention_heads
    num_key_value_heads: int = 1  # KV heads (GQA); mhrope needs its rope.hparams.num_key_value_heads equal
    intermediate_size: int = 512  # dense MLP width (MoE experts: a quarter of it)
    rope_theta: float = 1_000_000.0  # rotary base, as Qwen2.5-7B
    vision_depth: int = 2  # ViT blocks
    vision_hidden_size: int = 32  # ViT width
    vision_num_heads: int = 2  # ViT attention heads
    vision_intermediate_size: int = 64  # ViT MLP width
    patch_size: int = 14  # ViT patch side in pixels, as every Qwen-VL
    temporal_patch_size: int = 2  # frames per temporal patch
    spatial_merge_size: int = 2  # 2x2 patches merge into one LLM token
    tie_word_embeddings: bool = True  # LM head shares the embedding matrix

    def __post_init__(self) -> None:
        _require(
            self.hidden_size % self.num_attention_heads == 0,
            "model.tiny.hidden_size",
            "must be divisible by num_attention_heads",
        )
        _require(
            self.num_attention_heads % self.num_key_value_heads == 0,
            "model.tiny.num_key_value_heads",
            "must divide num_attention_heads",
        )
        _require(
            (self.hidden_size // self.num_attention_heads) % 2 == 0,
            "model.tiny.hidden_size",
            "head_dim (hidden_size / num_attention_heads) must be even for rotary embeddings",
        )


@dataclass
class FreezeConfig:
    """Which module groups train. Paper default: ViT frozen; connector and LLM (with lm_head) trained."""

    vision: bool = True  # freeze the ViT (the paper recipe)
    connector: bool = False  # freeze the merger / connector (the paper trains it)
    llm: bool = False  # freeze the LLM decoder (the paper trains it)
    lm_head: bool = False  # freeze the LM head (tied to the embeddings in the tiny model)


@dataclass
class ModelConfig:
    """The VLM to train. `kind`: tiny (built from config with the real classes, the embedded default) | pretrained
    (one local VLM checkpoint) | composed (ViT + connector from one, LLM from another)."""

    kind: str = must_match("tiny")
    family: str = must_match(
        "qwen2_5_vl"
    )  # qwen2_vl | qwen2_5_vl | qwen3_vl | qwen3_vl_moe | qwen3_5 | qwen3_5_moe
    path: str | None = must_match(None)  # kind=pretrained: local VLM checkpoint directory
    vision_path: str | None = must_match(
        None
    )  # kind=composed: local VLM checkpoint: ViT + connector (+ processor)
    llm_path: str | None = must_match(None)  # kind=composed: local LLM checkpoint (e.g. Qwen2.5-7B)
    tokenizer_path: str | None = None  # default: the checkpoint's (or the locally built tiny tokenizer)
    tiny: TinyModelConfig = must_match(factory=TinyModelConfig)  # kind=tiny: its sizes
    attn_backend: str = "auto"  # auto: torch's varlen FlashAttention on CUDA (bf16), per-sample SDPA on CPU
    freeze: FreezeConfig = must_match(factory=FreezeConfig)  # which module groups train
    # none | all | every_k | first_n (LLM decoder layers; the frozen ViT stores nothing)
    activation_checkpointing: str = "none"
    activation_checkpointing_every: int = 1  # with every_k: checkpoint layers k-1, 2k-1, ...
    # with first_n: checkpoint layers 0..n-1, keep the rest's activations
    activation_checkpointing_layers: int = 0
    compile: bool = False  # torch.compile the LLM's RMSNorms and dense MLPs (mmrope/distributed/compile.py)

    def __post_init__(self) -> None:
        _one_of(self.kind, MODEL_KINDS, "model.kind")
        _one_of(
            self.activation_checkpointing,
            ("none", "all", "every_k", "first_n"),
            "model.activation_checkpointing",
        )
        if self.activation_checkpointing == "first_n":
            _require(
                self.activation_checkpointing_layers >= 1,
                "model.activation_checkpointing_layers",
                "must be >= 1 with activation_checkpointing=first_n (how many decoder layers to recompute)",
            )
        _require(
            self.activation_checkpointing_every >= 1, "model.activation_checkpointing_every", "must be >= 1"
        )
        _one_of(self.family, MODEL_FAMILIES, "model.family")
        _one_of(self.attn_backend, ATTN_BACKENDS, "model.attn_backend")
        if self.kind == "pretrained":
            _require(
                bool(self.path), "model.path", "is required when model.kind=pretrained (a local directory)"
            )
        if self.kind == "composed":
            _require(bool(self.vision_path), "model.vision_path", "is required when model.kind=composed")
            _require(bool(self.llm_path), "model.llm_path", "is required when model.kind=composed")
            _one_of(self.family, COMPOSED_FAMILIES, "model.family")


ADAPTER_NAMES = ("none", "lora", "qlora")


@dataclass
class AdapterConfig:
    """`adapter=lora|qlora` (configs/adapter/): PEFT LoRA on the modules of the named roles (mmrope/distributed/adapters.py).

    The base weights of adapted modules are frozen; every other module follows `model.freeze` (the adapter files
    freeze all groups, so only the adapters train unless a group is unfrozen); trainable encoding parameters (GRAPE's
    learned planes) stay trainable. qlora: the same adapters over a 4-bit (NF4, bitsandbytes) frozen base, CUDA only.
    """

    name: str = "none"  # none | lora | qlora
    rank: int = 16  # LoRA rank r
    alpha: float = 32.0  # scaling alpha / r (rsLoRA: alpha / sqrt(r))
    dropout: float = 0.0  # dropout on the adapter's input
    use_rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r)
    use_dora: bool = False  # weight-decomposed LoRA (magnitude vector per output channel)
    # roles (mmrope.model.families.ADAPTER_ROLES), resolved per family to module names
    targets: list[str] = field(default_factory=lambda: ["llm.attention", "llm.mlp", "connector"])

    def __post_init__(self) -> None:
        from mmrope.model.families import ADAPTER_ROLES

        _one_of(self.name, ADAPTER_NAMES, "adapter.name")
        if self.name == "none":
            return
        _require(self.rank >= 1, "adapter.rank", f"must be >= 1, got {self.rank}")
        _require(self.alpha > 0, "adapter.alpha", f"must be > 0, got {self.alpha}")
        _require(0.0 <= self.dropout < 1.0, "adapter.dropout", f"must be in [0, 1), got {self.dropout}")
        _require(bool(self.targets), "adapter.targets", f"must name at least one of {list(ADAPTER_ROLES)}")
        for role in self.targets:
            _one_of(role, ADAPTER_ROLES, "adapter.targets")
        _require(len(set(self.targets)) == len(self.targets), "adapter.targets", "names a role twice")
