"""The tokenizer + image processor pair the data path uses, built locally or loaded from a checkpoint.

Nothing is downloaded: for the tiny default we train a small byte-level BPE with the `tokenizers` library on
the synthetic corpus and add the Qwen chat and vision special tokens; for real runs both parts come from a
local checkpoint directory. We keep the two parts (tokenizer, `Qwen2VLImageProcessorPil`) instead of a
`Qwen2_5_VLProcessor` object because the latter requires torchvision's video processor, which has no CPU
build; the one thing the processor class adds (expanding each image placeholder to its visual token count)
lives in `data/processing.py` and is tested against the grid.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoImageProcessor, AutoTokenizer, PreTrainedTokenizerFast
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

# The Qwen2-VL family's special tokens (same strings as the real vocabulary; ids differ in the tiny tokenizer).
PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
SPECIAL_TOKENS = [PAD, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]

# Qwen2-VL chat format: `<|im_start|>role\n...<|im_end|>\n`, images as VS IMAGE_PAD VE inside the content.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- else -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


@dataclass
class VLProcessor:
    """Tokenizer + image processor, plus the ids the position encodings need."""

    tokenizer: PreTrainedTokenizerFast
    image_processor: Qwen2VLImageProcessorPil

    @property
    def merge_size(self) -> int:
        return int(self.image_processor.merge_size)

    def token_id(self, token: str) -> int:
        tid = self.tokenizer.convert_tokens_to_ids(token)
        # (Qwen3.5's tokenizer class makes <|endoftext|> its unk token: that token itself is present)
        if tid is None or (tid == self.tokenizer.unk_token_id and token != self.tokenizer.unk_token):
            raise ValueError(f"tokenizer has no special token {token!r}; a Qwen-VL tokenizer is required")
        return int(tid)

    @property
    def special_ids(self) -> dict[str, int]:
        return {
            "image_token_id": self.token_id(IMAGE_PAD),
            "video_token_id": self.token_id(VIDEO_PAD),
            "vision_start_token_id": self.token_id(VISION_START),
            "vision_end_token_id": self.token_id(VISION_END),
            "pad_token_id": self.token_id(PAD),
            "eos_token_id": self.token_id(IM_END),
        }

    def save(self, path: str | os.PathLike) -> None:
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)


def load_processor(
    path: str | os.PathLike,
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    config: Any = None,
) -> VLProcessor:
    """Load tokenizer and image processor from a local directory (never the hub). `config`: the model's
    transformers config, when the folder's config.json is not for AutoConfig (a non-stock mmrope export's refuses
    it; AutoTokenizer would read it to pick the tokenizer class, and warn)."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"processor path {str(path)!r} is not a local directory")
    config_file = path / "tokenizer_config.json"
    tokenizer_class = (
        json.loads(config_file.read_text()).get("tokenizer_class") if config_file.is_file() else None
    )
    if (
        tokenizer_class in ("TokenizersBackend", "PreTrainedTokenizerFast")
        and (path / "tokenizer.json").is_file()
    ):
        # A tokenizer saved as a plain tokenizers file (the locally built tiny one) loads as exactly that file:
        # next to a config.json, AutoTokenizer would pick the model type's class (e.g. Qwen3_5Tokenizer), which
        # replaces the file's pre-tokenizer with its own and so changes the ids.
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, config=config)
    kwargs = {}
    if min_pixels is not None and max_pixels is not None:
        kwargs["size"] = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True, backend="pil", **kwargs)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHAT_TEMPLATE
    return VLProcessor(tokenizer=tokenizer, image_processor=image_processor)


def processor_for(
    model: Any, *, cache_dir: str | os.PathLike, min_pixels: int, max_pixels: int
) -> VLProcessor:
    """The processor a model config (`mmrope.model.config.ModelConfig`; data imports no model code, so it is read
    by its fields: kind, tokenizer_path, path, vision_path, tiny) trains with: the locally built tiny one (under
    `cache_dir`), or the one of the checkpoint (`model.tokenizer_path`, else the VLM checkpoint's)."""
    if model.kind == "tiny" and not model.tokenizer_path:
        from data.synthetic import corpus

        return build_tiny_processor(
            Path(cache_dir) / "tiny_processor",
            corpus(),
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            patch_size=model.tiny.patch_size,
            merge_size=model.tiny.spatial_merge_size,
            temporal_patch_size=model.tiny.temporal_patch_size,
        )
    path = model.tokenizer_path or (model.path if model.kind == "pretrained" else model.vision_path)
    return load_processor(path, min_pixels=min_pixels, max_pixels=max_pixels)


def build_tiny_processor(
    path: str | os.PathLike,
    corpus: Iterable[str],
    *,
    vocab_size: int = 1024,
    min_pixels: int = 56 * 56,
    max_pixels: int = 140 * 140,
    patch_size: int = 14,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
) -> VLProcessor:
    """Train a small byte-level BPE on `corpus`, add the Qwen special tokens, save tokenizer + image processor.

    Idempotent: if `path` already holds a processor built with the same settings it is loaded instead. Safe
    when several processes start at once: a file lock (`<path>.lock`) lets one build it, the others load it.
    """
    from filelock import FileLock

    path = Path(path)
    settings = {
        "vocab_size": vocab_size,
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "patch_size": patch_size,
        "merge_size": merge_size,
        "temporal_patch_size": temporal_patch_size,
    }
    stamp = path / "mmrope_processor.json"
    if stamp.exists() and json.loads(stamp.read_text()) == settings:
        return load_processor(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.with_name(path.name + ".lock"))):
        if stamp.exists() and json.loads(stamp.read_text()) == settings:  # built while we waited
            return load_processor(path)
        _train_tiny_processor(path, corpus, settings)
    return load_processor(path)


def _train_tiny_processor(path: Path, corpus: Iterable[str], settings: dict) -> None:
    """Train the BPE, save tokenizer + image processor to `path.tmp`, then rename it to `path` (atomic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=settings["vocab_size"],
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=IM_END,
        pad_token=PAD,
        additional_special_tokens=SPECIAL_TOKENS[1:],
        model_max_length=1 << 20,
        chat_template=CHAT_TEMPLATE,
    )
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": settings["min_pixels"], "longest_edge": settings["max_pixels"]},
        patch_size=settings["patch_size"],
        merge_size=settings["merge_size"],
        temporal_patch_size=settings["temporal_patch_size"],
    )
    processor = VLProcessor(tokenizer=tokenizer, image_processor=image_processor)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # leftovers of an interrupted build (we hold the lock)
    tmp.mkdir(parents=True)
    processor.save(tmp)
    (tmp / "mmrope_processor.json").write_text(json.dumps(settings))
    shutil.rmtree(path, ignore_errors=True)  # stale settings
    os.replace(tmp, path)
