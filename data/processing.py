"""One shard record -> model-ready tensors: tokens, assistant-only labels, pixels, grids and positions.

Positions are computed here, per sample, by the chosen mmrope encoding (and DIPE's anchored positions when
enabled). They travel with the sample through packing, so a packed row's positions are correct by
construction and the model never re-derives them from token ids.

Every way a record can be bad raises `SampleError(reason)`; the reader turns that into a counted skip
(`data/skipped/<reason>`) or an error, depending on the policy.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import torch
from PIL import Image

from data.processor import IM_END, IMAGE_PAD, VIDEO_PAD, VLProcessor
from data.video import qwen3_frame_blocks, video_patches
from mmrope.encodings import Encoding, TokenIds, anchored_positions

IGNORE_INDEX = -100
ASSISTANT_HEADER = "<|im_start|>assistant\n"


class SampleError(Exception):
    """A record that cannot become a training sample; `reason` is the counter name."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def record_id(record: dict) -> str | None:
    """The record's own id (the converter keeps the source's `id` in the .json member), if it has one."""
    raw = record.get("json")
    try:
        meta = json.loads(raw) if isinstance(raw, (bytes, str)) else raw
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    value = meta.get("id") if isinstance(meta, dict) else None
    return None if value is None else str(value)


@dataclass
class Sample:
    key: str
    input_ids: torch.Tensor  # [L] int64
    labels: torch.Tensor  # [L] int64, IGNORE_INDEX outside assistant turns (not shifted)
    position_ids: torch.Tensor  # [3, L] (dynamic positions of the encoding)
    pixel_values: torch.Tensor | None = None  # [num_patches, C * temporal_patch * patch * patch]
    image_grid_thw: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 3, dtype=torch.long))
    static_position_ids: torch.Tensor | None = None  # [3, L] DIPE anchored positions
    pixel_values_videos: torch.Tensor | None = None  # [num_video_patches, C * temporal_patch * patch * patch]
    video_grid_thw: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 3, dtype=torch.long))
    second_per_grid_ts: torch.Tensor = field(
        default_factory=lambda: torch.zeros(0)
    )  # seconds per temporal patch
    url: str = ""  # the shard it came from: (url, key) names the record for a resumed loader

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())


def token_ids_for(processor: VLProcessor) -> TokenIds:
    ids = processor.special_ids
    return TokenIds(
        image_token_id=ids["image_token_id"],
        video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"],
        vision_end_token_id=ids["vision_end_token_id"],
        spatial_merge_size=processor.merge_size,
    )


def assistant_spans(text: str) -> list[tuple[int, int]]:
    """Character spans supervised in a rendered Qwen chat: each assistant turn's content through `<|im_end|>`.

    >>> assistant_spans("<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\nyo<|im_end|>\\n")
    [(43, 55)]
    """
    spans, start = [], 0
    while (head := text.find(ASSISTANT_HEADER, start)) >= 0:
        begin = head + len(ASSISTANT_HEADER)
        end = text.find(IM_END, begin)
        if end < 0:
            raise SampleError("bad_template", "assistant turn without <|im_end|>")
        spans.append((begin, end + len(IM_END)))
        start = end
    return spans


class SampleProcessor:
    """Turns decoded shard records (`{"__key__", "json", "img0.png", ...}`) into `Sample`s."""

    def __init__(
        self,
        processor: VLProcessor,
        encoding: Encoding,
        *,
        max_tokens: int,
        layout: str,
        system_prompt: str | None = None,
        dipe: bool = False,
    ):
        self.processor = processor
        self.encoding = encoding
        self.max_tokens = max_tokens
        self.layout = layout
        self.system_prompt = system_prompt
        self.dipe = dipe
        self.tokens = token_ids_for(processor)
        self.merge_area = processor.merge_size**2

    # -- parsing ---------------------------------------------------------------------------------------------
    def _messages(self, record: dict) -> list[dict]:
        raw = record.get("json")
        if raw is None:
            raise SampleError("missing_field", "no .json member")
        try:
            meta = json.loads(raw) if isinstance(raw, (bytes, str)) else raw
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SampleError("bad_json", str(e)) from e
        messages = meta.get("messages") if isinstance(meta, dict) else None
        if not isinstance(messages, list) or not messages:
            raise SampleError("missing_field", "no 'messages' list")
        for m in messages:
            if (
                not isinstance(m, dict)
                or m.get("role") not in ("system", "user", "assistant")
                or "content" not in m
            ):
                raise SampleError("missing_field", f"malformed message {m!r:.80}")
            content = m["content"]
            if not isinstance(content, str) and not (
                isinstance(content, list)
                and all(
                    isinstance(p, dict) and (p.get("type") != "text" or isinstance(p.get("text"), str))
                    for p in content
                )
            ):
                raise SampleError(
                    "bad_structure", f"content must be a string or a list of parts: {content!r:.80}"
                )
        if not any(m["role"] == "assistant" for m in messages):
            raise SampleError("no_labels", "no assistant turn")
        if self.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        return messages

    @staticmethod
    def _decode(record: dict, ref, what: str) -> Image.Image:
        blob = record.get(ref) if isinstance(ref, str) else None
        if blob is None:
            raise SampleError("missing_field", f"{what} {ref!r} not in record")
        try:
            img = Image.open(io.BytesIO(blob))
            img.load()
        except Exception as e:  # PIL raises many types for corrupt data
            raise SampleError("bad_image", f"{ref}: {e}") from e
        return img.convert("RGB")

    def _media(
        self, record: dict, messages: list[dict]
    ) -> tuple[list[Image.Image], list[tuple[list, float]]]:
        """Images and videos (frame lists + fps) in order of appearance."""
        images, videos = [], []
        for m in messages:
            if isinstance(m["content"], str):
                if IMAGE_PAD in m["content"] or VIDEO_PAD in m["content"]:
                    raise SampleError("token_grid_mismatch", "literal vision placeholder in text")
                continue
            for part in m["content"]:
                if part.get("type") == "image":
                    images.append(self._decode(record, part.get("image"), "image"))
                elif part.get("type") == "video":
                    refs = part.get("video")
                    if not isinstance(refs, list) or not refs:
                        raise SampleError("missing_field", "video part without a list of frame members")
                    frames = [self._decode(record, r, "video frame") for r in refs]
                    videos.append((frames, float(part.get("fps", 2.0))))
        return images, videos

    # -- tokens ----------------------------------------------------------------------------------------------
    def __call__(self, record: dict) -> Sample:
        try:
            return self._sample(record)
        except SampleError as e:  # name the record by its own id too: the shard key is only a position
            rid = record_id(record)
            if rid is None:
                raise
            raise SampleError(e.reason, f"{e.detail} (record id {rid!r})".lstrip()) from e

    def _sample(self, record: dict) -> Sample:
        key = str(record.get("__key__", "?"))
        messages = self._messages(record)
        images, videos = self._media(record, messages)
        pixel_values, grid_thw = None, torch.zeros(0, 3, dtype=torch.long)
        video_pixels, video_grid, seconds = None, torch.zeros(0, 3, dtype=torch.long), torch.zeros(0)
        if videos:
            try:
                parts = [video_patches(self.processor.image_processor, f, fps=fps) for f, fps in videos]
            except ValueError as e:
                raise SampleError("bad_image", f"video: {e}") from e
            video_pixels = torch.cat([p for p, _, _ in parts])
            video_grid = torch.cat([g for _, g, _ in parts]).long()
            seconds = torch.tensor([t for _, _, t in parts], dtype=torch.float32)
        if images:
            try:
                out = self.processor.image_processor(images=images, return_tensors="pt")
            except ValueError as e:  # e.g. smart_resize on a degenerate size or aspect ratio
                raise SampleError("bad_image", f"image processor: {e}") from e
            pixel_values, grid_thw = out["pixel_values"], out["image_grid_thw"].long()
        num_visual = {
            IMAGE_PAD: (grid_thw.prod(-1) // self.merge_area).tolist(),
            VIDEO_PAD: (video_grid.prod(-1) // self.merge_area).tolist(),
        }

        text = self.processor.tokenizer.apply_chat_template(messages, tokenize=False)
        if self.layout == "qwen3" and videos:  # per-frame `<t seconds> VS ... VE` blocks (Qwen3-VL)
            try:
                text, num_visual[VIDEO_PAD] = qwen3_frame_blocks(
                    text,
                    [len(f) for f, _ in videos],
                    video_grid,
                    [fps for _, fps in videos],
                    self.merge_area,
                    int(self.processor.image_processor.temporal_patch_size),
                )
            except ValueError as e:
                raise SampleError("token_grid_mismatch", str(e)) from e
        ids, labels, cursor = [], [], 0
        used = {IMAGE_PAD: 0, VIDEO_PAD: 0}
        for begin, end in [*assistant_spans(text), (len(text), len(text))]:
            for segment, supervised in ((text[cursor:begin], False), (text[begin:end], True)):
                if not segment:
                    continue
                for pad, counts in num_visual.items():  # expand each placeholder to its grid's token count
                    n_pads = segment.count(pad)
                    if used[pad] + n_pads > len(counts):
                        raise SampleError("token_grid_mismatch", f"more {pad} placeholders than media")
                    for n in counts[used[pad] : used[pad] + n_pads]:
                        segment = segment.replace(pad, "\0" * n, 1)
                    segment = segment.replace("\0", pad)
                    used[pad] += n_pads
                seg_ids = self.processor.tokenizer(segment, add_special_tokens=False)["input_ids"]
                ids += seg_ids
                labels += seg_ids if supervised else [IGNORE_INDEX] * len(seg_ids)
            cursor = end
        for pad, counts in num_visual.items():
            if used[pad] != len(counts):
                raise SampleError(
                    "token_grid_mismatch", f"{len(counts)} media but {used[pad]} {pad} placeholders"
                )
        input_ids = torch.tensor(ids, dtype=torch.long)
        for token_id, counts in (
            (self.tokens.image_token_id, num_visual[IMAGE_PAD]),
            (self.tokens.video_token_id, num_visual[VIDEO_PAD]),
        ):
            if int((input_ids == token_id).sum()) != sum(counts):
                raise SampleError("token_grid_mismatch", "visual token count differs from the grids")
        if input_ids.numel() > self.max_tokens:
            # Dropped whole: cutting would either split a visual block or lose the supervised answer.
            raise SampleError("too_long", f"{input_ids.numel()} tokens > max_tokens={self.max_tokens}")
        labels_t = torch.tensor(labels, dtype=torch.long)
        if not (labels_t != IGNORE_INDEX).any():
            raise SampleError("no_labels", "nothing supervised")

        pos_3BL, _ = self.encoding.position_ids(
            input_ids[None],
            tokens=self.tokens,
            image_grid_thw=grid_thw if len(grid_thw) else None,
            video_grid_thw=video_grid if len(video_grid) else None,
            second_per_grid_ts=seconds if len(seconds) else None,
            layout=self.layout,
        )
        pos_3L = pos_3BL[:, 0]
        static = None
        if self.dipe:
            visual_1L = (input_ids == self.tokens.image_token_id) | (input_ids == self.tokens.video_token_id)
            static = anchored_positions(pos_3BL, visual_1L[None])[:, 0]
        return Sample(
            key=key,
            input_ids=input_ids,
            labels=labels_t,
            position_ids=pos_3L,
            pixel_values=pixel_values,
            image_grid_thw=grid_thw,
            static_position_ids=static,
            pixel_values_videos=video_pixels,
            video_grid_thw=video_grid,
            second_per_grid_ts=seconds,
            url=str(record.get("__url__", "")),
        )
