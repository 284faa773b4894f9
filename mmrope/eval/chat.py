"""Chat evaluation of an exported model: conversations (images, several images, videos) -> answers, in batches.

This is the model side of the lmms-eval plugin (`mmrope.eval.lmms_plugin`), kept free of lmms-eval so that it
runs and is tested in the training environment too:

    chat = ChatModel("exported/videorope_dipe", device="cuda", dtype="bf16")
    chat.generate([[{"role": "user", "content": [{"type": "image", "url": pil_image},
                                                 {"type": "text", "text": "What shape?"}]}]],
                  max_new_tokens=16, until=["\\n"])

A conversation goes through the **training data path** (`data.processing.SampleProcessor`) with a placeholder
assistant turn: the chat template, image resizing between the export's `min_pixels`/`max_pixels`, video frame
sampling (`data.video`: the training data's `fps`, `max_frames` and pixel budgets, recorded in the export's
`mmrope_encoding.json` under `data.video`) and visual-token expansion are the training run's own. The prompt is
everything before the placeholder answer, i.e. it ends with the generation prompt. A batch is left padded and
generated through `mmrope.model.generate.greedy_generate`: positions from the export's encoding, DIPE included
(never the family's stock `get_rope_index`). Greedy answers of a batch equal those of each row alone.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from data.processing import IGNORE_INDEX, Sample, SampleProcessor
from data.video import VideoSampling

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PLACEHOLDER_ANSWER = "x"  # the assistant turn that marks where the prompt ends; never shown to the model


def _image_bytes(url: Any, where: str) -> bytes:
    """An lmms-eval image (PIL image, path, bytes or a datasets `{"bytes": ...}` dict) as encoded bytes."""
    if isinstance(url, Image.Image):
        buffer = io.BytesIO()
        url.save(buffer, format="PNG")  # lossless: the data path decodes it back to the same pixels
        return buffer.getvalue()
    if isinstance(url, dict) and url.get("bytes"):
        return bytes(url["bytes"])
    if isinstance(url, (bytes, bytearray)):
        return bytes(url)
    if isinstance(url, (str, os.PathLike)) and Path(url).is_file():
        return Path(url).read_bytes()
    raise ValueError(f"{where}: cannot read image {str(url)[:80]!r} (PIL image, file path or bytes expected)")


def conversation_record(messages: Sequence[dict], key: str = "item") -> dict:
    """Chat messages (lmms-eval's `ChatMessages.to_hf_messages()` / `{"type", "url"}` parts or HF-style
    `{"type": "image", "image": ...}`) -> a record of the project's shard format with a placeholder answer."""
    members: dict[str, bytes] = {}
    turns = []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            turns.append({"role": m["role"], "content": content})
            continue
        parts = []
        for part in content:
            kind = part.get("type")
            if kind == "text":
                parts.append({"type": "text", "text": part["text"]})
            elif kind in ("image", "video"):
                url = part.get("url", part.get(kind))
                name = f"m{len(members)}"
                if kind == "image":
                    members[name + ".png"] = _image_bytes(url, f"item {key}")
                    parts.append({"type": "image", "image": name + ".png"})
                elif isinstance(url, (str, os.PathLike)) and Path(url).is_file():
                    members[name + (Path(url).suffix or ".mp4")] = Path(url).read_bytes()
                    parts.append({"type": "video", "video": name + (Path(url).suffix or ".mp4")})
                elif isinstance(url, (list, tuple)) and url:  # already-extracted frames: kept, at 2 fps
                    names = []
                    for j, frame in enumerate(url):
                        members[f"{name}_{j}.png"] = _image_bytes(frame, f"item {key}")
                        names.append(f"{name}_{j}.png")
                    parts.append({"type": "video", "video": names})
                else:
                    raise ValueError(
                        f"item {key}: cannot read video {str(url)[:80]!r} (a file path expected)"
                    )
            else:
                raise ValueError(f"item {key}: unsupported content part type {kind!r} (text, image, video)")
        turns.append({"role": m["role"], "content": parts})
    turns.append({"role": "assistant", "content": PLACEHOLDER_ANSWER})
    return {"__key__": key, "json": {"messages": turns}, **members}


def prompt_sample(sample: Sample) -> Sample:
    """The prompt part of a processed conversation: the tokens before the placeholder answer."""
    first = int((sample.labels != IGNORE_INDEX).nonzero()[0])
    sample.input_ids = sample.input_ids[:first]
    return sample


class ChatModel:
    """An export (`mmrope.from_pretrained`) with the training data path as its processor.

    `min_pixels`/`max_pixels` (per image), `fps`/`max_num_frames` (video files) default to the export's own
    settings; `dtype` is fp32 | bf16 | fp16; `seed` seeds sampling (`temperature > 0`)."""

    def __init__(
        self,
        pretrained: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        dtype: str = "fp32",
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        fps: float | None = None,
        max_num_frames: int | None = None,
        system_prompt: str | None = None,
        attn_backend: str = "auto",
        seed: int = 0,
    ) -> None:
        from mmrope.model.families import tokens_per_second
        from mmrope.pretrained import from_pretrained, read_encoding_file

        if dtype not in DTYPES:
            raise ValueError(f"dtype: {dtype!r} is not one of {sorted(DTYPES)}")
        if (min_pixels is None) != (max_pixels is None):
            raise ValueError("min_pixels/max_pixels: give both or neither (default: the export's own)")
        meta = read_encoding_file(pretrained)
        self.path = str(pretrained)
        self.meta = meta
        self.model, self.processor = from_pretrained(
            pretrained,
            device=device,
            dtype=DTYPES[dtype],
            attn_backend=attn_backend,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
        )
        data = meta.get("data") or {}
        video = VideoSampling(**data["video"]) if data.get("video") else VideoSampling()
        overrides = {"fps": fps, "max_frames": max_num_frames}
        if max_num_frames is not None:  # fewer frames than the training minimum: the minimum follows
            overrides["min_frames"] = min(video.min_frames, max_num_frames)
        video = VideoSampling(**{**asdict(video), **{k: v for k, v in overrides.items() if v is not None}})
        self.video = video
        self.sample_processor = SampleProcessor(
            self.processor,
            self.processor.encoding,
            max_tokens=1 << 30,  # no training row to fit: the model's context is the limit
            layout=self.processor.layout,
            system_prompt=system_prompt if system_prompt is not None else data.get("system_prompt"),
            dipe=False,  # static positions are recomputed for the padded batch by greedy_generate
            video=video,
            tokens_per_second=tokens_per_second(self.model.config),
        )
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def settings(self) -> dict:
        """What the answers depend on besides the weights: encoding, DIPE, layout, pixels, video sampling."""
        ip = self.processor.image_processor
        return {
            "encoding": self.meta["name"],
            "dipe": bool(self.meta.get("dipe", False)),
            "layout": self.processor.layout,
            "min_pixels": int(ip.size["shortest_edge"]),
            "max_pixels": int(ip.size["longest_edge"]),
            "video": asdict(self.video),
        }

    def prompts(
        self, conversations: Sequence[Sequence[dict]], keys: Sequence[str] | None = None
    ) -> list[Sample]:
        keys = keys or [str(i) for i in range(len(conversations))]
        return [
            prompt_sample(self.sample_processor(conversation_record(c, k)))
            for c, k in zip(conversations, keys)
        ]

    @torch.no_grad()
    def generate(
        self,
        conversations: Sequence[Sequence[dict]],
        *,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        until: Sequence[str] = (),
        keys: Sequence[str] | None = None,
    ) -> list[str]:
        """One answer per conversation, generated as one left-padded batch; cut before the first `until`."""
        from mmrope.model.generate import greedy_generate

        samples = self.prompts(conversations, keys)
        batch = left_padded(samples, self.processor.special_ids["pad_token_id"])
        device, dtype = self.device, next(self.model.parameters()).dtype
        tokenizer = self.processor.tokenizer
        stops = [s for s in until if s]

        def stop(new_BN: Tensor) -> Tensor:
            texts = tokenizer.batch_decode(new_BN.tolist(), skip_special_tokens=True)
            return torch.tensor([any(s in t for s in stops) for t in texts])

        ids = self.processor.special_ids
        visual = {  # pixels in the model's dtype; grids and seconds per temporal patch as they are
            k: v.to(device, dtype) if k.startswith("pixel_values") else v.to(device)
            for k, v in batch["visual"].items()
        }
        out_BN = greedy_generate(
            self.model,
            self.processor.encoding,
            batch["input_ids"].to(device),
            **visual,
            attention_mask_BL=batch["attention_mask"].to(device),
            max_new_tokens=max_new_tokens,
            tokens=self.processor.tokens,
            layout=self.processor.layout,
            dipe=self.processor.dipe,
            eos_token_id=ids["eos_token_id"],
            pad_token_id=ids["pad_token_id"],
            temperature=temperature,
            top_p=top_p,
            generator=self.generator,
            stop=stop if stops else None,
        )
        length = batch["input_ids"].shape[1]
        return [cut(decode_new(tokenizer, row[length:].cpu(), ids), stops) for row in out_BN]


def left_padded(samples: Sequence[Sample], pad_token_id: int) -> dict:
    """input_ids / attention_mask `[B, L]` (left padding) and the visual inputs of the rows, in row order."""
    length = max(s.input_ids.numel() for s in samples)
    ids_BL = torch.full((len(samples), length), pad_token_id, dtype=torch.long)
    mask_BL = torch.zeros(len(samples), length, dtype=torch.long)
    for row, s in enumerate(samples):
        n = s.input_ids.numel()
        ids_BL[row, length - n :] = s.input_ids
        mask_BL[row, length - n :] = 1
    visual: dict[str, Tensor] = {}
    pixels = [s.pixel_values for s in samples if s.pixel_values is not None]
    if pixels:
        visual["pixel_values"] = torch.cat(pixels)
        visual["image_grid_thw"] = torch.cat([s.image_grid_thw for s in samples])
    videos = [s.pixel_values_videos for s in samples if s.pixel_values_videos is not None]
    if videos:
        visual["pixel_values_videos"] = torch.cat(videos)
        visual["video_grid_thw"] = torch.cat([s.video_grid_thw for s in samples])
        visual["second_per_grid_ts"] = torch.cat([s.second_per_grid_ts for s in samples])
    return {"input_ids": ids_BL, "attention_mask": mask_BL, "visual": visual}


def decode_new(tokenizer, new_ids: Tensor, ids: dict[str, int]) -> str:
    """The generated text up to the first end-of-turn (or padding) token."""
    stops = {ids["eos_token_id"], ids["pad_token_id"]}
    kept = []
    for token in new_ids.tolist():
        if token in stops:
            break
        kept.append(token)
    return tokenizer.decode(kept, skip_special_tokens=True)


def cut(text: str, until: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string (lmms-eval's `until`)."""
    for s in until:
        if s:
            text = text.split(s, 1)[0]
    return text


GEN_KEYS = ("until", "max_new_tokens", "temperature", "top_p", "do_sample", "num_beams", "top_k")


def gen_settings(gen_kwargs: dict) -> dict:
    """lmms-eval's generation kwargs -> `ChatModel.generate` kwargs (max_new_tokens 128, greedy where a task gives
    none). Keys other than GEN_KEYS are the caller's to report (`unused_gen_keys`); beam search and top-k
    sampling are refused rather than silently replaced."""
    if int(gen_kwargs.get("num_beams") or 1) != 1:
        raise ValueError("gen_kwargs: num_beams > 1 (beam search) is not supported by the mmrope model")
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    if gen_kwargs.get("do_sample") is False:
        temperature = 0.0
    if temperature > 0 and gen_kwargs.get("top_k"):
        raise ValueError("gen_kwargs: top_k sampling is not supported by the mmrope model (use top_p)")
    return {
        "max_new_tokens": int(gen_kwargs.get("max_new_tokens") or 128),
        "temperature": temperature,
        "top_p": float(gen_kwargs.get("top_p") or 1.0),
        "until": until,
    }


def unused_gen_keys(gen_kwargs: dict) -> list[str]:
    return sorted(set(gen_kwargs) - set(GEN_KEYS))
