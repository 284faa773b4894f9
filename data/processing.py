"""One shard record -> model-ready tensors: tokens, assistant-only labels, pixels, grids and positions.

Processing has two halves, so the loader can plan rows before it decodes a single pixel:
- **plan** (`num_tokens`, and the first half of `__call__`): messages, each image's size and each video's frame
  sampling -> grids (`smart_resize`, the image processor's own function) -> the chat text with every visual
  placeholder expanded -> token ids and labels. Sizes come from the shard index (`data/index.py`) or from the
  decoded media; nothing else differs, so a plan is exact.
- **pixels**: decode and run the image processor; its grids must equal the planned ones.

Positions are computed here, per sample, by the chosen mmrope encoding (and DIPE's anchored positions when
enabled). They travel with the sample through packing, so a packed row's positions are correct by
construction and the model never re-derives them from token ids. Encodings that draw random numbers (HoPE)
draw them from a generator seeded by the record's key, so a record gets the same positions wherever and
however often it is processed.

Every way a record can be bad raises `SampleError(reason)`; the reader turns that into a counted skip
(`data/skipped/<reason>`) or an error, depending on the policy.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import zlib
from dataclasses import asdict, dataclass, field

import torch
from PIL import Image, UnidentifiedImageError
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from data.pixels import pixel_table
from data.processor import IM_END, IMAGE_PAD, VIDEO_PAD, VLProcessor
from data.video import (
    VideoMeta,
    VideoPlan,
    VideoSampling,
    decode_frames,
    describe,
    plan_file,
    plan_frames,
    probe,
    qwen3_frame_blocks,
    video_patches,
)
from mmrope.encodings import Encoding, TokenIds, anchored_positions

IGNORE_INDEX = -100
ASSISTANT_HEADER = "<|im_start|>assistant\n"
PIXEL_FORMATS = ("float32", "uint8")


def image_error(e: Exception) -> str:
    """What is wrong with an image PIL could not read, without the in-memory file PIL names in its message
    (`cannot identify image file <_io.BytesIO object at 0x7f..>`): the caller names the file or member."""
    if isinstance(e, UnidentifiedImageError):
        return "not a readable image (PIL cannot identify its format)"
    text = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(e)).strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def record_id(record: dict) -> str | None:
    """The record's own id (the converter keeps the source's `id` in the .json member), if it has one."""
    raw = record.get("json")
    try:
        meta = json.loads(raw) if isinstance(raw, (bytes, str)) else raw
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    value = meta.get("id") if isinstance(meta, dict) else None
    return None if value is None else str(value)


class SampleError(Exception):
    """A record that cannot become a training sample; `reason` is the counter name."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass
class Sample:
    key: str
    input_ids: torch.Tensor  # [L] int64
    labels: torch.Tensor  # [L] int64, IGNORE_INDEX outside assistant turns (not shifted)
    position_ids: torch.Tensor  # [3, L] (dynamic positions of the encoding)
    pixel_values: torch.Tensor | None = (
        None  # [num_patches, C * temporal_patch * patch * patch], float32 or uint8
    )
    image_grid_thw: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 3, dtype=torch.long))
    static_position_ids: torch.Tensor | None = None  # [3, L] DIPE anchored positions
    pixel_values_videos: torch.Tensor | None = None  # [num_video_patches, C * temporal_patch * patch * patch]
    video_grid_thw: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 3, dtype=torch.long))
    second_per_grid_ts: torch.Tensor = field(
        default_factory=lambda: torch.zeros(0)
    )  # seconds per temporal patch
    url: str = ""  # the shard it came from
    videos: list[dict] = field(default_factory=list)  # per video: frames, effective_fps, visual_tokens

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


@dataclass
class MediaSizes:
    """What planning needs about a record's media members: image sizes (w, h) and video file metadata.
    None marks a member that exists but could not be read (a bad image / video)."""

    images: dict[str, tuple[int, int] | None] = field(default_factory=dict)
    videos: dict[str, VideoMeta | None] = field(default_factory=dict)


@dataclass
class _Plan:
    """Everything about a sample but its pixels and positions."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    image_grid: torch.Tensor  # [I, 3]
    video_grid: torch.Tensor  # [V, 3]
    seconds: torch.Tensor  # [V] seconds per temporal patch
    videos: list[tuple[dict, VideoPlan]]  # (content part, sampling) per video, in order


class SampleProcessor:
    """Turns shard records (`{"__key__", "json", "img0.png", ...}`) into `Sample`s.

    `video` sets how video *files* are sampled (and frame pixel budgets); `pixels="uint8"` keeps the resized
    pixels as uint8 for compact transport (data/pixels.py expands them on the device). `tokens_per_second`: the
    model's `vision_config.tokens_per_second` (`mmrope.model.families.tokens_per_second`), the temporal position
    step per second of a "qwen2_5"-layout video; the trainer and the evaluators pass the model's value (data knows
    no model: the default is the released Qwen2.5-VL checkpoints' 2)."""

    def __init__(
        self,
        processor: VLProcessor,
        encoding: Encoding,
        *,
        max_tokens: int,
        layout: str,
        system_prompt: str | None = None,
        dipe: bool = False,
        video: VideoSampling | None = None,
        pixels: str = "float32",
        seed: int = 0,
        tokens_per_second: float = 2.0,
    ):
        if pixels not in PIXEL_FORMATS:
            raise ValueError(f"pixels must be one of {PIXEL_FORMATS}, got {pixels!r}")
        self.processor = processor
        self.encoding = encoding
        self.max_tokens = max_tokens
        self.layout = layout
        self.system_prompt = system_prompt
        self.dipe = dipe
        self.video = video
        self.pixels = pixels
        self.seed = seed
        self.tokens_per_second = float(tokens_per_second)
        self.tokens = token_ids_for(processor)
        self.merge_area = processor.merge_size**2
        ip = processor.image_processor
        self.patch = int(ip.patch_size)
        self.factor = self.patch * processor.merge_size
        self.temporal = int(ip.temporal_patch_size)
        self.image_limits = (int(ip.size["shortest_edge"]), int(ip.size["longest_edge"]))
        self.pixel_table = pixel_table(ip) if pixels == "uint8" else None
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        """Names everything a sample's token count depends on (tokenizer, template, image and video settings,
        layout), so a token count stored in a shard index is used only by a processor that would compute it."""
        if self._fingerprint is None:
            tok = self.processor.tokenizer
            payload = {
                "tokenizer": hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest(),
                "template": tok.chat_template,
                "system_prompt": self.system_prompt,
                "image": [self.image_limits, self.patch, self.factor, self.temporal],
                "video": asdict(self.video) if self.video else None,
                "layout": self.layout,
            }
            blob = json.dumps(payload, sort_keys=True, default=str).encode()
            self._fingerprint = hashlib.sha256(blob).hexdigest()[:16]
        return self._fingerprint

    # -- parsing ---------------------------------------------------------------------------------------------
    def _messages(self, raw) -> list[dict]:
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
    def _media_parts(messages: list[dict]) -> list[dict]:
        """Image and video parts in order of appearance."""
        parts = []
        for m in messages:
            if isinstance(m["content"], str):
                if IMAGE_PAD in m["content"] or VIDEO_PAD in m["content"]:
                    raise SampleError("token_grid_mismatch", "literal vision placeholder in text")
                continue
            for part in m["content"]:
                if part.get("type") == "image":
                    if not isinstance(part.get("image"), str):
                        raise SampleError("missing_field", f"image part without a member name: {part!r:.80}")
                    parts.append(part)
                elif part.get("type") == "video":
                    refs = part.get("video")
                    if not (isinstance(refs, str) or (isinstance(refs, list) and refs)):
                        raise SampleError(
                            "missing_field", "video part needs a video member or a list of frame members"
                        )
                    parts.append(part)
        return parts

    # -- the plan: grids and tokens from media sizes ----------------------------------------------------------
    def _grid(self, size: tuple[int, int] | None, ref: str, limits: tuple[int, int], what: str) -> list[int]:
        if size is None:
            raise SampleError("bad_image", f"{what} {ref!r} could not be read")
        width, height = size
        try:
            h, w = smart_resize(height, width, factor=self.factor, min_pixels=limits[0], max_pixels=limits[1])
        except (ValueError, ZeroDivisionError) as e:  # degenerate size or aspect ratio
            raise SampleError("bad_image", f"{what} {ref!r} ({width}x{height}): {e}") from e
        return [h // self.patch, w // self.patch]

    def _video_plan(self, part: dict, sizes: MediaSizes) -> tuple[VideoPlan, tuple[int, int] | None, str]:
        refs = part["video"]
        if isinstance(refs, list):  # a frame list: every frame, at the part's fps
            for ref in refs:
                if ref not in sizes.images:
                    raise SampleError("missing_field", f"video frame {ref!r} not in record")
            try:
                plan = plan_frames(
                    len(refs), float(part.get("fps", 2.0)), self.video, self.image_limits, self.temporal
                )
            except (TypeError, ValueError) as e:
                raise SampleError("bad_image", f"video: {e}") from e
            return plan, sizes.images[refs[0]], refs[0]
        if refs not in sizes.videos:
            raise SampleError("missing_field", f"video {refs!r} not in record")
        meta = sizes.videos[refs]
        if meta is None:
            raise SampleError("bad_video", f"video {refs!r} could not be read")
        try:
            fps = part.get("fps")
            plan = plan_file(
                meta,
                self.video or VideoSampling(),
                self.image_limits,
                self.temporal,
                float(fps) if fps else None,
            )
        except (TypeError, ValueError) as e:
            raise SampleError("bad_video", f"video {refs!r}: {e}") from e
        return plan, (meta.width, meta.height), refs

    def describe_video(self, meta: VideoMeta) -> dict:
        """How a video file with this metadata is sampled: frames, effective fps, grid and visual tokens."""
        try:
            return describe(
                meta,
                self.video or VideoSampling(),
                image_limits=self.image_limits,
                patch=self.patch,
                merge=self.factor // self.patch,
                temporal=self.temporal,
            )
        except ValueError as e:
            raise SampleError("bad_video", str(e)) from e

    def _plan(self, messages: list[dict], sizes: MediaSizes, check_length: bool = True) -> _Plan:
        image_grid, video_grid, seconds, videos = [], [], [], []
        for part in self._media_parts(messages):
            if part["type"] == "image":
                ref = part["image"]
                if ref not in sizes.images:
                    raise SampleError("missing_field", f"image {ref!r} not in record")
                image_grid.append([1, *self._grid(sizes.images[ref], ref, self.image_limits, "image")])
                continue
            plan, size, ref = self._video_plan(part, sizes)
            hw = self._grid(size, ref, (plan.min_pixels, plan.max_pixels), "video")
            video_grid.append([-(-len(plan.indices) // self.temporal), *hw])
            seconds.append(self.temporal / plan.effective_fps)
            videos.append((part, plan))
        grid_thw = torch.tensor(image_grid, dtype=torch.long).view(-1, 3)
        video_thw = torch.tensor(video_grid, dtype=torch.long).view(-1, 3)
        num_visual = {
            IMAGE_PAD: (grid_thw.prod(-1) // self.merge_area).tolist(),
            VIDEO_PAD: (video_thw.prod(-1) // self.merge_area).tolist(),
        }
        text = self.processor.tokenizer.apply_chat_template(messages, tokenize=False)
        if self.layout == "qwen3" and videos:  # per-frame `<t seconds> VS ... VE` blocks (Qwen3-VL)
            try:
                text, num_visual[VIDEO_PAD] = qwen3_frame_blocks(
                    text, [plan.times for _, plan in videos], video_thw, self.merge_area, self.temporal
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
        if check_length and input_ids.numel() > self.max_tokens:
            # Dropped whole: cutting would either split a visual block or lose the supervised answer.
            raise SampleError("too_long", f"{input_ids.numel()} tokens > max_tokens={self.max_tokens}")
        labels_t = torch.tensor(labels, dtype=torch.long)
        if not (labels_t != IGNORE_INDEX).any():
            raise SampleError("no_labels", "nothing supervised")
        return _Plan(
            input_ids, labels_t, grid_thw, video_thw, torch.tensor(seconds, dtype=torch.float32), videos
        )

    def num_tokens(self, meta_json, sizes: MediaSizes, check_length: bool = True) -> int:
        """The sample's exact token count from its JSON and media sizes alone (no pixels decoded). Raises
        SampleError like processing would (`too_long` only with `check_length`)."""
        return self.plan_counts(meta_json, sizes, check_length)[0]

    def plan_counts(self, meta_json, sizes: MediaSizes, check_length: bool = True) -> tuple[int, int]:
        """(tokens, visual tokens: image + video placeholders) of the sample, like `num_tokens`."""
        ids = self._plan(self._messages(meta_json), sizes, check_length).input_ids
        visual = (ids == self.tokens.image_token_id) | (ids == self.tokens.video_token_id)
        return int(ids.numel()), int(visual.sum())

    # -- the full sample ---------------------------------------------------------------------------------------
    @staticmethod
    def _decode(record: dict, ref: str, what: str) -> Image.Image:
        blob = record.get(ref)
        if blob is None:
            raise SampleError("missing_field", f"{what} {ref!r} not in record")
        try:
            img = Image.open(io.BytesIO(blob))
            img.load()
        except Exception as e:  # PIL raises many types for corrupt data
            raise SampleError("bad_image", f"{what} member {ref!r}: {image_error(e)}") from e
        return img.convert("RGB")

    def _decoded_media(self, record: dict, messages: list[dict]) -> tuple[dict, dict, MediaSizes]:
        """Decode every image / frame list member and probe every video file member the messages reference."""
        images: dict[str, Image.Image] = {}
        blobs: dict[str, bytes] = {}
        sizes = MediaSizes()
        for part in self._media_parts(messages):
            refs = [part["image"]] if part["type"] == "image" else part["video"]
            if isinstance(refs, str):  # a video file
                blob = record.get(refs)
                if blob is None:
                    raise SampleError("missing_field", f"video {refs!r} not in record")
                try:
                    sizes.videos[refs] = probe(blob)
                except Exception as e:  # PyAV raises its own error types for corrupt data
                    raise SampleError("bad_video", f"{refs}: {e}") from e
                blobs[refs] = blob
                continue
            what = "image" if part["type"] == "image" else "video frame"
            for ref in refs:
                if ref not in images:
                    images[ref] = self._decode(record, ref, what)
                    sizes.images[ref] = images[ref].size
        return images, blobs, sizes

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
        messages = self._messages(record.get("json"))
        images, blobs, sizes = self._decoded_media(record, messages)
        plan = self._plan(messages, sizes)
        keep = {} if self.pixels == "float32" else {"do_rescale": False, "do_normalize": False}
        ip = self.processor.image_processor

        pixel_values = video_pixels = None
        image_refs = [p["image"] for p in self._media_parts(messages) if p["type"] == "image"]
        if image_refs:
            try:
                out = ip(images=[images[r] for r in image_refs], return_tensors="pt", **keep)
            except ValueError as e:  # e.g. smart_resize on a degenerate size or aspect ratio
                raise SampleError("bad_image", f"image processor: {e}") from e
            pixel_values = self._compact(out["pixel_values"])
            if not torch.equal(out["image_grid_thw"].long(), plan.image_grid):
                raise SampleError("token_grid_mismatch", "image processor grids differ from the plan")
        video_info = []
        if plan.videos:
            parts = []
            for part, vplan in plan.videos:
                refs = part["video"]
                try:
                    frames = (
                        [images[r] for r in refs]
                        if isinstance(refs, list)
                        else decode_frames(blobs[refs], vplan.indices)
                    )
                    limits = (
                        None
                        if self.video is None or self.video.min_pixels is None
                        else (vplan.min_pixels, vplan.max_pixels)
                    )
                    parts.append(
                        video_patches(
                            ip,
                            frames,
                            fps=vplan.effective_fps,
                            limits=limits,
                            normalize=self.pixels == "float32",
                        )
                    )
                except ValueError as e:
                    reason = "bad_image" if isinstance(refs, list) else "bad_video"
                    raise SampleError(reason, f"video: {e}") from e
            video_pixels = self._compact(torch.cat([p for p, _, _ in parts]))
            if not torch.equal(torch.cat([g for _, g, _ in parts]).long(), plan.video_grid):
                raise SampleError("token_grid_mismatch", "video grids differ from the plan")
            for (_, vplan), grid in zip(plan.videos, plan.video_grid.tolist()):
                video_info.append(
                    {
                        "frames": len(vplan.indices),
                        "effective_fps": vplan.effective_fps,
                        "visual_tokens": grid[0] * grid[1] * grid[2] // self.merge_area,
                    }
                )

        # Random position designs (HoPE) draw from a generator seeded by the record: same positions every time.
        generator = torch.Generator().manual_seed(zlib.crc32(key.encode()) + (self.seed << 32))
        pos_3BL, _ = self.encoding.position_ids(
            plan.input_ids[None],
            tokens=self.tokens,
            image_grid_thw=plan.image_grid if len(plan.image_grid) else None,
            video_grid_thw=plan.video_grid if len(plan.video_grid) else None,
            second_per_grid_ts=plan.seconds if len(plan.seconds) else None,
            layout=self.layout,
            tokens_per_second=self.tokens_per_second,
            generator=generator,
        )
        static = None
        if self.dipe:
            visual_1L = (plan.input_ids == self.tokens.image_token_id) | (
                plan.input_ids == self.tokens.video_token_id
            )
            static = anchored_positions(pos_3BL, visual_1L[None])[:, 0]
        return Sample(
            key=key,
            input_ids=plan.input_ids,
            labels=plan.labels,
            position_ids=pos_3BL[:, 0],
            pixel_values=pixel_values,
            image_grid_thw=plan.image_grid,
            static_position_ids=static,
            pixel_values_videos=video_pixels,
            video_grid_thw=plan.video_grid,
            second_per_grid_ts=plan.seconds,
            url=str(record.get("__url__", "")),
            videos=video_info,
        )

    def _compact(self, pixels: torch.Tensor) -> torch.Tensor:
        # uint8 mode: the processor stopped after resize + patchify, so the values are integers in 0..255.
        return pixels.to(torch.uint8) if self.pixels == "uint8" else pixels
