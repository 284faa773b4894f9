"""Convert LLaVA / ShareGPT / messages JSON(L) into the project's webdataset shards.

    python -m data.convert --input llava.json --image-root /data/images --out /data/shards \\
        [--format auto|llava|sharegpt|messages] [--max-shard-bytes 1e9] [--max-shard-samples 100000] \\
        [--max-reject-fraction 0.05] [--quiet]

Input records (one JSON list, or JSONL):
  llava     {"id": .., "image": "a.jpg" | ["a.jpg", ...], "video": "clip.mp4" (a file) | ["f0.jpg", ...] (frames),
             "conversations": [{"from": "human", "value": "<image>\\nWhat is it?"}, {"from": "gpt", "value": ..}]}
  sharegpt  the same turns under "conversations" (or "messages" with from/value), images under "images"
  messages  {"messages": [{"role": "user", "content": "<image>.." | [{"type": "image", "image": "a.jpg"},
             {"type": "text", "text": ..}]}, ...], "images": [...]}
`<image>` / `<video>` placeholders mark where the media go; LLaVA-style records with fewer placeholders than
images get the missing ones at the start of the first user turn.

Output, per accepted record: `<key>.json` {"messages": [...], "id": original id} whose image parts reference
members `<key>.img0.<ext>` (bytes copied unchanged), video parts `{"type": "video", "video": "vid0.mp4"}` for a
video file (mp4/webm/mkv/mov/avi/m4v, bytes copied unchanged, checked with PyAV) or `{"type": "video", "video":
[frame members]}` (`<key>.vid0.f000.<ext>`, ...) for a frame list. Videos train in both layouts
(data/video.py): one contiguous block (Qwen2.5-VL) or per-frame blocks with timestamps (Qwen3-VL).
`--max-shard-bytes` bounds the member payload per shard (webdataset's ShardWriter maxsize; tar headers add
~1 KiB per member on top). Also written: `index.json` (per-shard sample counts, rejects by reason, a summary of
the videos), `rejected.jsonl` (one line per rejected record: index, id, reason, detail), one `<shard>.idx` per
shard (data/index.py: byte offsets, image sizes, video frame counts; token counts with `--processor`) and, when
there are video files, `videos.jsonl` (per video: source frames and fps, and the frames, effective fps and
visual tokens it trains with at Qwen2.5-VL's sampling defaults, `data.video` of configs/data/shards.yaml).
Reasons: bad_json, bad_structure, missing_image, bad_image, missing_video, bad_video, placeholder_mismatch.
The CLI exits with status 1 (after writing everything) when nothing was converted or more than
`--max-reject-fraction` of the records were rejected; `--quiet` drops the progress bar.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shlex
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import webdataset as wds
from PIL import Image

from data.processing import image_error
from data.video import QWEN_VIDEO, VIDEO_EXTENSIONS, describe, probe

FORMATS = ("auto", "llava", "sharegpt", "messages")
DEFAULT_MAX_REJECT_FRACTION = 0.05  # a few missing or broken images are normal; most of a data set is not
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
PLACEHOLDER = re.compile(r"(<image>|<video>)")


class Reject(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def read_records(path: Path) -> Iterator[tuple[int, dict | None, str]]:
    """(index, record or None, error detail) for a JSON list or a JSONL file."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl" or not text.lstrip().startswith("["):
        for i, line in enumerate(line for line in text.splitlines() if line.strip()):
            try:
                yield i, json.loads(line), ""
            except json.JSONDecodeError as e:
                yield i, None, str(e)
        return
    for i, rec in enumerate(json.loads(text)):
        yield i, rec, ""


def detect_format(rec: dict) -> str:
    if "conversations" not in rec and "messages" not in rec:
        # neither turn list: say what a record needs (not "no 'messages' field" for a LLaVA record)
        keys = ", ".join(repr(k) for k in list(rec)[:8]) or "none"
        raise Reject(
            "bad_structure",
            f"no 'conversations' (LLaVA / ShareGPT) or 'messages' field; the record's keys: {keys}",
        )
    if "conversations" in rec:
        return "llava" if ("image" in rec or "video" in rec or "images" not in rec) else "sharegpt"
    if isinstance(rec.get("messages"), list) and rec["messages"] and "from" in rec["messages"][0]:
        return "sharegpt"
    return "messages"


def _as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _turn_list(rec: dict, keys: tuple[str, ...]) -> list:
    """The record's list of turns under the first of `keys` it has; Reject saying what is wrong with it."""
    key = next((k for k in keys if k in rec), None)
    if key is None:
        raise Reject("bad_structure", f"no {' or '.join(repr(k) for k in keys)} field")
    turns = rec[key]
    if not isinstance(turns, list):
        raise Reject("bad_structure", f"{key!r} is a {type(turns).__name__}, not a list of turns")
    if not turns:
        raise Reject("bad_structure", f"{key!r} is an empty list")
    return turns


def _turns(rec: dict, fmt: str) -> list[tuple[str, object]]:
    """(role, content) pairs; content is a string or (messages format) a list of parts."""
    if fmt in ("llava", "sharegpt"):
        turns = _turn_list(rec, ("conversations", "messages"))
        out = []
        for t in turns:
            if (
                not isinstance(t, dict)
                or ROLES.get(t.get("from")) is None
                or not isinstance(t.get("value"), str)
            ):
                raise Reject("bad_structure", f"malformed turn {t!r:.80}")
            out.append((ROLES[t["from"]], t["value"]))
        if rec.get("system") and out[0][0] != "system":
            out.insert(0, ("system", str(rec["system"])))
        return out
    turns = _turn_list(rec, ("messages",))
    out = []
    for t in turns:
        if (
            not isinstance(t, dict)
            or ROLES.get(t.get("role")) is None
            or not isinstance(t.get("content"), (str, list))
        ):
            raise Reject("bad_structure", f"malformed message {t!r:.80}")
        out.append((ROLES[t["role"]], t["content"]))
    return out


def _read_image(root: Path, ref: str) -> tuple[bytes, str]:
    path = Path(ref) if os.path.isabs(ref) else root / ref
    if not path.is_file():
        raise Reject("missing_image", f"{ref} (looked up {path.absolute()})")
    blob = path.read_bytes()
    try:
        with Image.open(io.BytesIO(blob)) as img:
            img.load()
    except Exception as e:  # PIL raises many types for corrupt data
        raise Reject("bad_image", f"{path.absolute()}: {image_error(e)}") from e
    ext = path.suffix.lower().lstrip(".") or "jpg"
    return blob, re.sub(r"[^a-z0-9]", "", ext) or "jpg"


def _read_video(root: Path, ref: str) -> tuple[bytes, str]:
    path = Path(ref) if os.path.isabs(ref) else root / ref
    if not path.is_file():
        raise Reject("missing_video", f"{ref} (looked up {path.absolute()})")
    blob = path.read_bytes()
    try:
        probe(blob)  # a container with a decodable-looking video stream
    except Exception as e:  # PyAV raises its own error types for corrupt data
        raise Reject("bad_video", f"{ref}: {e}") from e
    return blob, path.suffix.lower().lstrip(".")


def _is_video_file(ref) -> bool:
    return isinstance(ref, str) and ref.lower().rsplit(".", 1)[-1] in VIDEO_EXTENSIONS


def convert_record(rec: dict, fmt: str, image_root: Path, key: str) -> dict:
    """One source record -> one webdataset sample dict (`__key__`, `json`, media members). Raises Reject."""
    if not isinstance(rec, dict):
        raise Reject("bad_structure", f"record is {type(rec).__name__}, not an object")
    fmt = detect_format(rec) if fmt == "auto" else fmt
    turns = _turns(rec, fmt)
    images = _as_list(rec.get("image")) + _as_list(rec.get("images"))
    videos = rec.get("video", rec.get("videos"))
    if isinstance(videos, list) and videos and all(isinstance(v, str) for v in videos):
        # a list of paths: video files (all with a video extension), or the frames of one video
        videos = list(videos) if all(_is_video_file(v) for v in videos) else [videos]
    else:
        videos = _as_list(videos)
    if not all(isinstance(r, str) for r in images) or not all(
        _is_video_file(v) or (isinstance(v, list) and v and all(isinstance(f, str) for f in v))
        for v in videos
    ):
        raise Reject(
            "bad_structure", "images must be paths; videos must be video file paths or lists of frame paths"
        )
    if not any(role == "assistant" for role, _ in turns):
        raise Reject("bad_structure", "no assistant turn")

    sample: dict = {"__key__": key}
    media = {"image": iter(range(len(images))), "video": iter(range(len(videos)))}
    used = Counter()

    def image_part(ref: str | None = None) -> dict:
        if ref is None:
            i = next(media["image"], None)
            if i is None:
                raise Reject(
                    "placeholder_mismatch", f"more <image> placeholders than the {len(images)} images"
                )
            ref = images[i]
        n = used["image"]
        used["image"] += 1
        blob, ext = _read_image(image_root, ref)
        sample[f"img{n}.{ext}"] = blob
        return {"type": "image", "image": f"img{n}.{ext}"}

    def video_part(frames: list[str] | str | None = None) -> dict:
        if frames is None:
            i = next(media["video"], None)
            if i is None:
                raise Reject(
                    "placeholder_mismatch", f"more <video> placeholders than the {len(videos)} videos"
                )
            frames = videos[i]
        n = used["video"]
        used["video"] += 1
        if isinstance(frames, str):  # a video file: copied as one member, sampled at training time
            blob, ext = _read_video(image_root, frames)
            sample[f"vid{n}.{ext}"] = blob
            return {"type": "video", "video": f"vid{n}.{ext}"}
        names = []
        for j, ref in enumerate(frames):
            blob, ext = _read_image(image_root, ref)
            name = f"vid{n}.f{j:03d}.{ext}"
            sample[name] = blob
            names.append(name)
        return {"type": "video", "video": names}

    def split(text: str) -> list[dict]:
        parts = []
        for piece in PLACEHOLDER.split(text):
            if piece == "<image>":
                parts.append(image_part())
            elif piece == "<video>":
                parts.append(video_part())
            elif piece.strip("\n"):
                parts.append({"type": "text", "text": piece.strip("\n")})
        return parts

    messages = []
    for role, content in turns:
        if isinstance(content, list):  # messages format with explicit parts
            parts = []
            for p in content:
                kind = p.get("type") if isinstance(p, dict) else None
                if kind == "text" and isinstance(p.get("text"), str):
                    parts.append({"type": "text", "text": p["text"]})
                elif kind == "image":
                    ref = p.get("image") or p.get("path") or p.get("url")
                    parts.append(image_part(ref) if isinstance(ref, str) else image_part())
                elif kind == "video":
                    frames = p.get("video")
                    given = isinstance(frames, list) or _is_video_file(frames)
                    parts.append(video_part(frames) if given else video_part())
                else:
                    raise Reject("bad_structure", f"unknown content part {p!r:.80}")
        elif role == "user" and PLACEHOLDER.search(content):
            parts = split(content)
        elif PLACEHOLDER.search(content):
            raise Reject("placeholder_mismatch", f"media placeholder in a {role} turn")
        else:
            parts = None
        if parts is None or (role != "user" and all(p["type"] == "text" for p in parts)):
            text = content if parts is None else "".join(p["text"] for p in parts)
            messages.append({"role": role, "content": text})
        else:
            messages.append({"role": role, "content": parts})

    # LLaVA convention: images without a placeholder go first into the first user turn.
    leftover = [image_part() for _ in range(len(images) - used["image"])]
    leftover += [video_part() for _ in range(len(videos) - used["video"])]
    if leftover:
        first = next((m for m in messages if m["role"] == "user"), None)
        if first is None:
            raise Reject("bad_structure", "media but no user turn")
        content = first["content"]
        first["content"] = leftover + (
            content if isinstance(content, list) else [{"type": "text", "text": content}]
        )
    meta = {"messages": messages}
    if "id" in rec:
        meta["id"] = rec["id"]
    sample["json"] = json.dumps(meta, ensure_ascii=False).encode()
    return sample


def convert(
    inputs: list[Path],
    image_root: Path,
    out_dir: Path,
    *,
    fmt: str = "auto",
    max_shard_bytes: float = 1e9,
    max_shard_samples: int = 100_000,
    progress: bool = True,
    processor: str | None = None,
) -> dict:
    """Write shards + per-shard indexes + index.json + rejected.jsonl (+ videos.jsonl) under out_dir; returns
    the summary index. `processor`: a local tokenizer + image processor directory; the shard indexes then hold
    exact token counts for it."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {list(FORMATS)}, got {fmt!r}")
    if max_shard_bytes <= 0 or max_shard_samples <= 0:
        raise ValueError("--max-shard-bytes and --max-shard-samples must be > 0")
    from tqdm import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    per_shard: Counter = Counter()
    rejected: Counter = Counter()
    num_written = 0
    with (
        open(out_dir / "rejected.jsonl", "w") as report,
        wds.ShardWriter(
            str(out_dir / "shard-%06d.tar"), maxcount=max_shard_samples, maxsize=max_shard_bytes, verbose=0
        ) as sink,
    ):
        bar = tqdm(desc="convert", unit="rec", disable=not progress)
        for source in inputs:
            for index, rec, error in read_records(source):
                try:
                    if rec is None:
                        raise Reject("bad_json", error)
                    sample = convert_record(rec, fmt, image_root, key=f"{num_written:09d}")
                except Reject as e:
                    rejected[e.reason] += 1
                    rid = rec.get("id") if isinstance(rec, dict) else None
                    line = {
                        "source": str(source),
                        "index": index,
                        "id": rid,
                        "reason": e.reason,
                        "detail": e.detail,
                    }
                    report.write(json.dumps(line, ensure_ascii=False, default=str) + "\n")
                else:
                    sink.write(sample)
                    per_shard[Path(sink.fname).name] += 1
                    num_written += 1
                # counts after every record, rejected ones included (the bar shows the last state it got)
                bar.set_postfix(ok=num_written, rejected=sum(rejected.values()), refresh=False)
                bar.update(1)
        bar.close()
    # ShardWriter opens its first shard eagerly: drop it if nothing went in.
    for tar in out_dir.glob("shard-*.tar"):
        if tar.name not in per_shard:
            tar.unlink()
    index = {
        "shards": [{"name": name, "num_samples": n} for name, n in sorted(per_shard.items())],
        "num_records": num_written + sum(rejected.values()),
        "num_samples": num_written,
        "num_rejected": sum(rejected.values()),
        "rejected": dict(rejected),
        "videos": index_shards(out_dir, sorted(per_shard), processor),
    }
    (out_dir / "index.json").write_text(json.dumps(index, indent=1))
    return index


def shards_pattern(out_dir: Path, index: dict) -> str:
    """The written shards as one `data.shards` entry: `out/shard-000000.tar` or `out/shard-{000000..000011}.tar`."""
    names = sorted(s["name"] for s in index["shards"])
    numbers = [n.removeprefix("shard-").removesuffix(".tar") for n in names]
    if len(numbers) == 1:
        return str(out_dir / names[0])
    return str(out_dir / f"shard-{{{numbers[0]}..{numbers[-1]}}}.tar")


def train_command(out_dir: Path, index: dict) -> str:
    """The command that trains on the written shards, as the README writes it: the shards value is a quoted
    string inside the list (`'data.shards=["out/shard-{000000..000005}.tar"]'`), since Hydra's grammar takes
    braces and `..` only inside quotes, and the whole override is shell-quoted.

    >>> print(train_command(Path("d"), {"shards": [{"name": "shard-000000.tar"}, {"name": "shard-000001.tar"}]}))
    python train.py data=shards 'data.shards=["d/shard-{000000..000001}.tar"]'
    """
    value = shards_pattern(out_dir, index).replace("\\", "\\\\").replace('"', '\\"')  # Hydra's escapes
    override = 'data.shards=["' + value + '"]'
    return f"python train.py data=shards {shlex.quote(override)}"


def too_many_rejects(index: dict, max_reject_fraction: float) -> str | None:
    """Why the conversion failed (nothing converted, or rejects above the limit), or None."""
    num_records, num_rejected = index["num_records"], index["num_rejected"]
    if index["num_samples"] == 0:
        return f"no record could be converted ({num_rejected} of {num_records} rejected)"
    if num_rejected > max_reject_fraction * num_records:
        return (
            f"{num_rejected} of {num_records} records rejected ({num_rejected / num_records:.1%}) > "
            f"--max-reject-fraction={max_reject_fraction:g}"
        )
    return None


def index_shards(out_dir: Path, names: list[str], processor: str | None = None) -> dict:
    """Write each shard's index (data/index.py) and `videos.jsonl`; returns a summary of the video files."""
    from data import index as shard_index

    planner = None
    if processor is not None:
        from data.processing import SampleProcessor
        from data.processor import load_processor
        from mmrope.encodings import build

        planner = SampleProcessor(
            load_processor(processor), build("mrope"), max_tokens=1 << 30, layout="qwen2_5", video=QWEN_VIDEO
        )
    lines = []
    for name in names:
        idx = shard_index.build(str(out_dir / name), planner)
        shard_index.write(idx, shard_index.candidates(str(out_dir / name), None)[0])
        for rec in idx.records:
            for member, meta in rec.get("videos", {}).items():
                line = {"shard": name, "key": rec["key"], "member": member}
                if meta:
                    line.update(
                        source_frames=meta["frames"],
                        source_fps=meta["fps"],
                        size=[meta["width"], meta["height"]],
                    )
                    try:
                        line.update(describe(shard_index.VideoMeta(**meta), QWEN_VIDEO))
                    except ValueError as e:
                        line["error"] = str(e)
                lines.append(line)
    if not lines:
        return {"num": 0}
    with open(out_dir / "videos.jsonl", "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    ok = [line for line in lines if "frames" in line]

    def span(key: str) -> list:
        return [min(line[key] for line in ok), max(line[key] for line in ok)] if ok else []

    return {
        "num": len(lines),
        "sampling": QWEN_VIDEO.__dict__,
        "frames": span("frames"),
        "effective_fps": span("effective_fps"),
        "visual_tokens": span("visual_tokens"),
        "cannot_sample": len(lines) - len(ok),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m data.convert", description=__doc__.splitlines()[0])
    ap.add_argument("--input", nargs="+", required=True, type=Path, help="JSON list or JSONL file(s)")
    ap.add_argument("--image-root", required=True, type=Path, help="relative image/frame paths start here")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--format", default="auto", choices=FORMATS)
    ap.add_argument("--max-shard-bytes", type=float, default=1e9)
    ap.add_argument("--max-shard-samples", type=int, default=100_000)
    ap.add_argument(
        "--max-reject-fraction",
        type=float,
        default=DEFAULT_MAX_REJECT_FRACTION,
        help="exit with status 1 when more records than this fraction are rejected (outputs are still written)",
    )
    ap.add_argument("--quiet", action="store_true", help="no progress bar (for logs that are not a terminal)")
    ap.add_argument(
        "--processor", default=None, help="local tokenizer + image processor: token counts in indexes"
    )
    args = ap.parse_args(argv)
    if not args.image_root.is_dir():
        ap.error(
            f"--image-root {args.image_root}: not a directory (looked up {args.image_root.absolute()}); "
            "relative image paths of the records start there"
        )
    if not 0 <= args.max_reject_fraction <= 1:
        ap.error(f"--max-reject-fraction must be in [0, 1], got {args.max_reject_fraction}")
    index = convert(
        args.input,
        args.image_root,
        args.out,
        fmt=args.format,
        max_shard_bytes=args.max_shard_bytes,
        max_shard_samples=args.max_shard_samples,
        progress=not args.quiet,
        processor=args.processor,
    )
    print(
        f"{index['num_samples']} samples in {len(index['shards'])} shard(s) under {args.out}; "
        f"{index['num_rejected']} of {index['num_records']} records rejected {index['rejected']} "
        "(see rejected.jsonl)"
    )
    v = index["videos"]
    if v["num"]:
        print(
            f"{v['num']} video files (see videos.jsonl): {v['frames']} frames, effective fps {v['effective_fps']}, "
            f"{v['visual_tokens']} visual tokens per video at Qwen2.5-VL's sampling (data.video)"
        )
    if index["shards"]:
        print(f"train on them: {train_command(args.out, index)}")
    missing = index["rejected"].get("missing_image", 0) + index["rejected"].get("missing_video", 0)
    if missing:  # most often a wrong --image-root: show where the files were looked for
        print(
            f"{missing} record(s) name media not found under --image-root {args.image_root} "
            f"({args.image_root.absolute()}); the paths looked up are in rejected.jsonl"
        )
    failure = too_many_rejects(index, args.max_reject_fraction)
    if failure is not None:
        sys.exit(f"data.convert: {failure}; reasons per record in {args.out / 'rejected.jsonl'}")


if __name__ == "__main__":
    main()
