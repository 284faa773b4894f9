"""Use an exported model (`python -m mmrope.train.export`) in two lines, without torchvision:

    import mmrope
    model, processor = mmrope.from_pretrained("exported/mrope")
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=text, images=[image])
    out = mmrope.generate(model, processor, inputs, max_new_tokens=32)
    print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))

`from_pretrained` loads the folder with the transformers class of its family (`model_family` in
`mmrope_encoding.json`; the config.json fields by which a non-stock export refuses stock transformers restored,
see `mmrope.model.stock`), installs the encoding it was trained with (and DIPE) through the seam, and returns the
processor: the folder's tokenizer and (PIL) image processor, which is all a Qwen-VL processor does for images.
Transformers' `AutoProcessor` would also build the video processor, which needs torchvision.

The processor's output is a plain dict of tensors: `input_ids` (each `<|image_pad|>` expanded to the image's
visual tokens), `attention_mask` (left padding), `pixel_values`, `image_grid_thw` and `mm_token_type_ids` (1 at
image tokens): the same inputs stock transformers' `generate` needs to compute 3-D positions (without
`mm_token_type_ids` it silently falls back to 1-D positions). `mmrope.generate` computes positions with the
installed encoding instead (greedy, KV cache), so it works for every encoding, DIPE included.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from data.processing import token_ids_for
from data.processor import IMAGE_PAD, VLProcessor, load_processor
from mmrope.encodings import Encoding, TokenIds, build
from mmrope.model.build import FAMILY_CLASSES
from mmrope.model.families import FAMILIES
from mmrope.model.generate import greedy_generate
from mmrope.model.install import install, text_model
from mmrope.model.stock import load_config

ENCODING_FILE = "mmrope_encoding.json"
ROTARY_FILE = "mmrope_rotary.safetensors"  # an encoding's learned parameters (GRAPE's planes), if it has any
IMAGE_TOKEN_TYPE = 1  # transformers' mm_token_type_ids: 0 text, 1 image, 2 video


@dataclass
class Processor(VLProcessor):
    """Tokenizer + image processor of an exported model, with the encoding it was trained with."""

    encoding: Encoding | None = None
    layout: str = "qwen2_5"
    dipe: bool = False

    @property
    def tokens(self) -> TokenIds:
        return token_ids_for(self)

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        """The chat text; an image part (`{"type": "image"}`) becomes `<|vision_start|><|image_pad|><|vision_end|>`."""
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def __call__(self, text: str | list[str], images: list[Any] | None = None) -> dict[str, Tensor]:
        """Model inputs for one text or a batch (left padded); `images` (PIL) in the order of the texts' pads."""
        texts = [text] if isinstance(text, str) else list(text)
        out: dict[str, Tensor] = {}
        counts: list[int] = []
        if images:
            pixels = self.image_processor(images=images, return_tensors="pt")
            out["pixel_values"], out["image_grid_thw"] = pixels["pixel_values"], pixels["image_grid_thw"]
            counts = (pixels["image_grid_thw"].prod(-1) // self.merge_size**2).tolist()
        num_pads = sum(t.count(IMAGE_PAD) for t in texts)
        if num_pads != len(counts):
            raise ValueError(
                f"images: {len(counts)} given for {num_pads} {IMAGE_PAD} placeholders in the text"
            )
        expanded, used = [], 0
        for t in texts:  # each placeholder becomes as many tokens as its image has merged patches
            pieces = t.split(IMAGE_PAD)
            parts = [pieces[0]]
            for piece in pieces[1:]:
                parts += [IMAGE_PAD * counts[used], piece]
                used += 1
            expanded.append("".join(parts))
        batch = self.tokenizer(
            expanded, padding=True, padding_side="left", add_special_tokens=False, return_tensors="pt"
        )
        input_ids = batch["input_ids"]
        out = {
            "input_ids": input_ids,
            "attention_mask": batch["attention_mask"],
            **out,
            "mm_token_type_ids": (input_ids == self.tokens.image_token_id).int() * IMAGE_TOKEN_TYPE,
        }
        return out

    def decode(self, ids: Tensor | list[int], **kwargs: Any) -> str:
        return self.tokenizer.decode(ids, **kwargs)

    def batch_decode(self, ids: Tensor | list[list[int]], **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(ids, **kwargs)


def read_encoding_file(path: str | os.PathLike) -> dict:
    """`mmrope_encoding.json` of an exported folder; ValueError naming the folder if it is not one."""
    meta_file = Path(path) / ENCODING_FILE
    if not meta_file.is_file():
        raise ValueError(
            f"checkpoint: {str(path)!r} has no {ENCODING_FILE} (export a training checkpoint with "
            "`python -m mmrope.train.export`)"
        )
    meta = json.loads(meta_file.read_text())
    family = meta.get("model_family", "qwen2_5_vl")
    if family not in FAMILY_CLASSES:
        raise ValueError(
            f"checkpoint: {ENCODING_FILE} model_family {family!r} not in {sorted(FAMILY_CLASSES)}"
        )
    return meta


def from_pretrained(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_backend: str = "auto",
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> tuple[nn.Module, Processor]:
    """(model, processor) of an exported folder: its transformers class with its encoding (and DIPE) installed,
    in eval mode on `device`; the processor needs no torchvision."""
    meta = read_encoding_file(path)
    family = meta.get("model_family", "qwen2_5_vl")
    config = load_config(path, meta)  # a non-stock export's refusing config.json fields restored
    model = FAMILY_CLASSES[family].from_pretrained(
        path,
        config=config,
        dtype=dtype,
        attn_implementation="sdpa",
        local_files_only=True,
    )
    model.to(device).eval()
    encoding = build(meta["name"], **meta.get("hparams", {}))
    dipe = bool(meta.get("dipe", False))
    install(model, encoding, attn_backend=attn_backend, dipe=dipe)
    load_rotary(model, path)
    parts = load_processor(path, min_pixels=min_pixels, max_pixels=max_pixels, config=config)
    processor = Processor(
        tokenizer=parts.tokenizer,
        image_processor=parts.image_processor,
        encoding=encoding,
        layout=meta.get("layout") or FAMILIES[family].layout,
        dipe=dipe,
    )
    return model, processor


def load_rotary(model: nn.Module, path: str | os.PathLike) -> None:
    """Load the installed encoding's learned parameters from the export's ROTARY_FILE (strict); refuse an export
    whose encoding has learned parameters but no such file (it would run with untrained planes)."""
    rotary = text_model(model).rotary_emb.rotary
    learned = dict(rotary.named_parameters())
    file = Path(path) / ROTARY_FILE
    if not file.is_file():
        if learned:
            raise ValueError(
                f"checkpoint: {str(path)!r} has no {ROTARY_FILE}, but its encoding learns {len(learned)} tensors "
                f"({sorted(learned)[:3]}...): re-export the training checkpoint with `python -m mmrope.train.export`"
            )
        return
    from safetensors.torch import load_file

    device = next(model.parameters()).device
    rotary.load_state_dict(load_file(str(file), device=str(device)), strict=True)


@torch.no_grad()
def generate(
    model: nn.Module, processor: Processor, inputs: dict[str, Tensor], *, max_new_tokens: int = 32
) -> Tensor:
    """Greedy generation with the KV cache, positions from the installed encoding (DIPE included); stops like
    transformers' `generate` at `<|im_end|>` (finished rows are padded). Returns prompt + new tokens `[B, N]`.
    Video inputs (`pixel_values_videos`, `video_grid_thw`, `second_per_grid_ts`, as transformers names them) are
    used when present; their temporal positions use the model's `vision_config.tokens_per_second`."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    pixel_values = inputs.get("pixel_values")
    grid = inputs.get("image_grid_thw")
    video_pixels, video_grid = inputs.get("pixel_values_videos"), inputs.get("video_grid_thw")
    ids = processor.special_ids
    return greedy_generate(
        model,
        processor.encoding,
        inputs["input_ids"].to(device),
        pixel_values=pixel_values.to(device, dtype) if pixel_values is not None else None,
        image_grid_thw=grid.to(device) if grid is not None else None,
        pixel_values_videos=video_pixels.to(device, dtype) if video_pixels is not None else None,
        video_grid_thw=video_grid.to(device) if video_grid is not None else None,
        second_per_grid_ts=inputs.get("second_per_grid_ts"),
        attention_mask_BL=inputs.get("attention_mask"),
        max_new_tokens=max_new_tokens,
        tokens=processor.tokens,
        layout=processor.layout,
        dipe=processor.dipe,
        eos_token_id=ids["eos_token_id"],
        pad_token_id=ids["pad_token_id"],
    ).cpu()
