"""Per-shard index: where each record sits in its tar file, and what planning needs to know about it.

    python -m data.index /data/sft/shard-{000000..000511}.tar            # build missing / invalid indexes
    python -m data.index /data/sft/shard-*.tar --check                   # validate only (exit 1 if any is bad)
    python -m data.index ... --processor /models/Qwen2.5-VL-7B-Instruct --max-tokens 32768
                                                                         # + token counts and a row plan

`<shard>.idx` (or, for a read-only shard directory, `<data.cache_dir>/shard_index/<hash>-<name>.idx`) is JSON
lines: a header line, then one line per record:

    {"format": "mmrope.shard_index", "version": 1, "shard": {"size": ..., "sha256_ends": ...}, "error": null,
     "num_records": N, "sha256": <hash of every byte after this line>}
    {"key": "000000042", "offset": 51200, "length": 204800, "members": {"json": [51712, 321], "img0.jpg": [...]},
     "images": {"img0.jpg": [1024, 768]}, "videos": {"vid0.mp4": {"frames": 300, "fps": 30.0, "width": 640,
     "height": 360}}, "num_tokens": {"<processor fingerprint>": 1834}, "num_visual": {"<...>": 1296}}

`offset`/`length` span the record's tar members (headers included), `members` give each member's data offset
and size; images are `[width, height]` read from their headers, videos their stream metadata (null: unreadable).
`num_tokens` holds exact token counts per processor fingerprint (`SampleProcessor.fingerprint`), or the reason
the record cannot be planned, when a processor was given to the builder; `num_visual` (same keys) the image +
video tokens among them, which the packer's ViT balance uses (an index without them is read as the JSON fallback).

Trust: an index is used only if its checksum matches its body and its `shard` identity (size, hash of the first
and last 64 KiB) matches the shard on disk; otherwise it is rebuilt (with a message) or, with `--check`,
reported. Every record read verifies the tar member names against the index's key, so an index that passed
those checks and still does not describe the shard stops the run instead of feeding it wrong bytes.
`error` records why a scan stopped early (a truncated or corrupt shard): the records before it are indexed.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import sys
import tarfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand
from PIL import Image
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_iterator

from data.video import VIDEO_EXTENSIONS, VideoMeta, probe

FORMAT, VERSION = "mmrope.shard_index", 1
SUFFIX = ".idx"
ENDS = 64 * 1024  # bytes hashed at each end of a shard to recognise it
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "gif", "bmp", "tif", "tiff", "ppm", "pgm", "jp2")
META_NAME = re.compile(r"__[^/]*__($|/)")  # webdataset skips such members; so do we

# What was read from shards in this process (tests and benchmarks count resume cost with it).
IO: Counter = Counter()


class IndexInvalid(ValueError):
    """An index that does not describe its shard (corrupt, stale, wrong format)."""


class IndexMismatch(RuntimeError):
    """A record read through a valid-looking index is not what the index says: never trusted."""


@dataclass
class ShardIndex:
    path: str  # the shard
    records: list[dict]
    shard: dict = field(default_factory=dict)
    error: str | None = None  # why the scan stopped before the end of the shard

    def __len__(self) -> int:
        return len(self.records)

    def media_sizes(self, i: int):
        from data.processing import MediaSizes

        rec = self.records[i]
        images = {k: (tuple(v) if v else None) for k, v in rec.get("images", {}).items()}
        videos = {k: (VideoMeta(**v) if v else None) for k, v in rec.get("videos", {}).items()}
        return MediaSizes(images=images, videos=videos)


def expand_urls(urls: list[str] | str) -> list[str]:
    """Brace-expand shard URLs: `/d/shard-{000..003}.tar` -> 4 paths."""
    if isinstance(urls, str):
        urls = [urls]
    out = [u for pattern in urls for u in braceexpand.braceexpand(pattern)]
    if not out:
        raise ValueError("config key `data.shards`: no shard URLs given")
    return out


def local_path(url: str) -> str:
    """Indexed reading seeks in files: shards must be local (or on a shared filesystem)."""
    path = url[len("file://") :] if url.startswith("file://") else url
    if re.match(r"^[a-z][a-z0-9+.-]*:", path):
        raise ValueError(
            f"config key `data.shards`: {url!r} is not a local path; indexed reading seeks in shard files, "
            f"so copy or mount the shards locally (a shared filesystem works)"
        )
    return path


def shard_identity(path: str) -> dict:
    size = os.path.getsize(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(ENDS))
        if size > ENDS:
            f.seek(max(ENDS, size - ENDS))
            h.update(f.read(ENDS))
    return {"size": size, "sha256_ends": h.hexdigest()}


# -- building --------------------------------------------------------------------------------------------------
def _media_info(ext: str, blob: bytes) -> tuple[str, object] | None:
    ext = ext.rsplit(".", 1)[-1]
    if ext in IMAGE_EXTENSIONS:
        try:
            with Image.open(io.BytesIO(blob)) as img:  # reads the header only
                return "images", list(img.size)
        except Exception:  # any unreadable image is recorded as such; processing reports it as bad_image
            return "images", None
    if ext in VIDEO_EXTENSIONS:
        try:
            return "videos", probe(blob).__dict__
        except Exception:  # PyAV raises its own error types for corrupt data
            return "videos", None
    return None


def build(path: str, planner=None) -> ShardIndex:
    """Scan a shard (headers, image headers, video metadata; with `planner`, a SampleProcessor, token counts).
    Raises OSError / tarfile.TarError if the file is not a readable tar at all."""
    size = os.path.getsize(path)
    records: list[dict] = []
    error = None
    with open(path, "rb") as f:
        tf = tarfile.open(fileobj=f, mode="r:")
        current: dict | None = None
        end = 0
        while True:
            try:
                info = tf.next()
            except tarfile.TarError as e:
                error = f"unreadable tar header after byte {end}: {e}"
                break
            if info is None:
                break
            if not info.isreg() or META_NAME.match(info.name):
                continue
            if info.offset_data + info.size > size:
                error = (
                    f"truncated: member {info.name!r} ends at byte {info.offset_data + info.size} > {size}"
                )
                break
            key, ext = base_plus_ext(info.name)
            if key is None:
                continue
            ext = ext.lower()
            if current is None or key != current["key"]:
                current = {"key": key, "offset": info.offset, "members": {}, "images": {}, "videos": {}}
                records.append(current)
            if ext in current["members"]:
                error = f"duplicate member {info.name!r}"
                break
            current["members"][ext] = [info.offset_data, info.size]
            end = info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            current["length"] = end - current["offset"]
            f.seek(info.offset_data)
            media = _media_info(ext, f.read(info.size))
            if media is not None:
                current[media[0]][ext] = media[1]
        if error is None:  # after the last member only zero blocks may follow
            f.seek(end)
            if f.read().strip(b"\0"):
                error = f"unreadable data after byte {end}"
        if error is not None and records:
            records.pop()  # the record the damage ran into may be incomplete
        if planner is not None:
            for rec in records:
                planned = _plan_tokens(f, rec, planner)
                rec["num_tokens"] = {planner.fingerprint: planned if isinstance(planned, str) else planned[0]}
                if not isinstance(planned, str):  # the visual tokens, for the packer's ViT balance
                    rec["num_visual"] = {planner.fingerprint: planned[1]}
    for rec in records:
        for k in ("images", "videos"):
            if not rec[k]:
                del rec[k]
    return ShardIndex(path=path, records=records, shard=shard_identity(path), error=error)


def _plan_tokens(f, rec: dict, planner) -> tuple[int, int] | str:
    from data.processing import SampleError

    if "json" not in rec["members"]:
        return "missing_field"
    offset, size = rec["members"]["json"]
    f.seek(offset)
    try:
        index = ShardIndex(path="", records=[rec])
        return planner.plan_counts(f.read(size), index.media_sizes(0), check_length=False)
    except SampleError as e:
        return e.reason


def write(index: ShardIndex, target: Path) -> Path:
    """Atomically write `index` to `target` (JSON lines, see the module docstring)."""
    body = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in index.records).encode()
    header = {
        "format": FORMAT,
        "version": VERSION,
        "shard": index.shard,
        "error": index.error,
        "num_records": len(index.records),
        "sha256": hashlib.sha256(body).hexdigest(),
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    tmp.write_bytes(json.dumps(header).encode() + b"\n" + body)
    os.replace(tmp, target)
    return target


# -- loading ---------------------------------------------------------------------------------------------------
def load(index_file: Path, shard: str) -> ShardIndex:
    """Read and validate an index of `shard`; raises IndexInvalid naming what is wrong."""
    raw = Path(index_file).read_bytes()
    IO["index_bytes"] += len(raw)
    head, _, body = raw.partition(b"\n")
    try:
        header = json.loads(head)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IndexInvalid(f"header is not JSON: {e}") from e
    if not isinstance(header, dict) or header.get("format") != FORMAT or header.get("version") != VERSION:
        raise IndexInvalid(f"not a {FORMAT} v{VERSION} index")
    if hashlib.sha256(body).hexdigest() != header.get("sha256"):
        raise IndexInvalid("checksum mismatch (the index was modified or truncated)")
    identity = shard_identity(shard)
    if header.get("shard") != identity:
        raise IndexInvalid(f"it describes another shard ({header.get('shard')}, on disk {identity})")
    records = [json.loads(line) for line in body.splitlines()]
    if len(records) != header.get("num_records"):
        raise IndexInvalid("record count differs from the header")
    end = 0
    for rec in records:
        if rec["offset"] < end or rec["offset"] + rec["length"] > identity["size"]:
            raise IndexInvalid(f"record {rec['key']!r} spans bytes outside the shard or overlaps another")
        end = rec["offset"] + rec["length"]
    return ShardIndex(path=shard, records=records, shard=identity, error=header.get("error"))


def candidates(shard: str, cache_dir: str | os.PathLike | None) -> list[Path]:
    """Where the index of `shard` may live: beside it, then in the cache (for read-only shard directories)."""
    out = [Path(shard + SUFFIX)]
    if cache_dir is not None:
        digest = hashlib.sha1(os.path.abspath(shard).encode()).hexdigest()[:16]
        out.append(Path(cache_dir) / "shard_index" / f"{digest}-{Path(shard).name}{SUFFIX}")
    return out


def load_or_build(
    url: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    planner=None,
    log: Callable[[str], None] = print,
) -> ShardIndex:
    """The valid index of a shard: loaded, or (missing / invalid) built and written where it can be."""
    shard = local_path(url)
    places = candidates(shard, cache_dir)
    for place in places:
        if place.is_file():
            try:
                return load(place, shard)
            except IndexInvalid as e:
                log(f"data: index {place} is not valid for {shard} ({e}); rebuilding it")
            except (OSError, ValueError, KeyError, TypeError) as e:
                log(f"data: index {place} could not be read ({e!r}); rebuilding it")
    index = build(shard, planner)
    for place in places:
        try:
            write(index, place)
            break
        except OSError:
            continue  # read-only directory: try the cache
    return index


# -- reading records -------------------------------------------------------------------------------------------
def read_record(index: ShardIndex, i: int) -> dict:
    """Record `i` of the shard as webdataset yields it (`{"__key__", "__url__", "json": bytes, ...}`): one seek
    and one read of exactly its bytes, parsed by webdataset's own tar iterator."""
    rec = index.records[i]
    with open(index.path, "rb") as f:
        f.seek(rec["offset"])
        blob = f.read(rec["length"])
    IO["bytes_read"] += len(blob)
    IO["records_read"] += 1
    try:
        files = [{**f, "__url__": index.path} for f in tar_file_iterator(io.BytesIO(blob))]
        samples = list(group_by_keys(files))
    except Exception as e:  # tarfile / webdataset errors on bytes that are not what the index says
        raise IndexMismatch(
            f"{index.path}: record {i} ({rec['key']!r}) does not parse: {e}; {_rebuild(index)}"
        ) from e
    if len(samples) != 1 or samples[0]["__key__"] != rec["key"]:
        found = [s["__key__"] for s in samples]
        raise IndexMismatch(
            f"{index.path}: record {i} should be {rec['key']!r}, found {found}; {_rebuild(index)}"
        )
    return samples[0]


def read_member(index: ShardIndex, i: int, ext: str) -> bytes:
    """One member's bytes (e.g. the JSON, for planning), checked against the tar header that precedes it."""
    rec = index.records[i]
    offset, size = rec["members"][ext]
    with open(index.path, "rb") as f:
        f.seek(offset - tarfile.BLOCKSIZE)
        blob = f.read(tarfile.BLOCKSIZE + size)
    IO["bytes_read"] += len(blob)
    IO["members_read"] += 1
    try:
        header = tarfile.TarInfo.frombuf(blob[: tarfile.BLOCKSIZE], "utf-8", "surrogateescape").name
    except tarfile.TarError:
        header = ""
    key, found = base_plus_ext(header)
    name = f"{rec['key']}.{ext}"
    # webdataset lower-cases extensions; a name over 100 characters is stored in a preceding extended header
    # and the ustar header holds only its start.
    if not (
        (key == rec["key"] and (found or "").lower() == ext)
        or (len(header) >= 99 and name.startswith(header))
    ):
        raise IndexMismatch(
            f"{index.path}: member {name!r} not at byte {offset} (found {header!r}); {_rebuild(index)}"
        )
    return blob[tarfile.BLOCKSIZE :]


def _rebuild(index: ShardIndex) -> str:
    return f"the shard changed after its index was written: rebuild it with `python -m data.index {index.path} --force`"


# -- CLI -------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:

    ap = argparse.ArgumentParser(prog="python -m data.index", description=__doc__.splitlines()[0])
    ap.add_argument("shards", nargs="+", help="shard paths (brace notation ok)")
    ap.add_argument(
        "--check", action="store_true", help="only validate; exit 1 if an index is missing or bad"
    )
    ap.add_argument("--force", action="store_true", help="rebuild even valid indexes")
    ap.add_argument("--cache-dir", default=None, help="where to write indexes of read-only shard directories")
    ap.add_argument("--processor", default=None, help="a local tokenizer + image processor dir: token counts")
    ap.add_argument("--min-pixels", type=int, default=None)
    ap.add_argument("--max-pixels", type=int, default=None)
    ap.add_argument("--layout", default="qwen2_5", choices=("qwen2_5", "qwen3"))
    ap.add_argument(
        "--max-tokens", type=int, default=32768, help="row budget for the row plan (with --processor)"
    )
    args = ap.parse_args(argv)
    planner = None
    if args.processor:
        from data.processing import SampleProcessor
        from data.processor import load_processor
        from mmrope.encodings import build as build_encoding

        vl = load_processor(args.processor, min_pixels=args.min_pixels, max_pixels=args.max_pixels)
        planner = SampleProcessor(vl, build_encoding("mrope"), max_tokens=args.max_tokens, layout=args.layout)
    bad, totals, lengths = 0, Counter(), []
    for shard in expand_urls(args.shards):
        places = candidates(local_path(shard), args.cache_dir)
        found = next((p for p in places if p.is_file()), None)
        if args.check:
            try:
                index = load(found, shard) if found else None
                status = "ok" if index else "missing"
            except IndexInvalid as e:
                index, status = None, f"INVALID: {e}"
            bad += status != "ok"
            print(f"{shard}: {status}")
            continue
        if args.force and found:
            found.unlink()
        index = load_or_build(shard, cache_dir=args.cache_dir, planner=planner)
        if planner is not None and any(
            planner.fingerprint not in r.get("num_tokens", {}) for r in index.records
        ):
            index = build(index.path, planner)  # add this processor's token counts
            write(index, found or places[0])
        totals.update(
            records=len(index),
            images=sum(len(r.get("images", {})) for r in index.records),
            videos=sum(len(r.get("videos", {})) for r in index.records),
            bad_shards=index.error is not None,
        )
        if planner is not None:
            lengths += [r["num_tokens"][planner.fingerprint] for r in index.records]
        print(f"{shard}: {len(index)} records" + (f" (stopped early: {index.error})" if index.error else ""))
    if args.check:
        return 1 if bad else 0
    print(f"total: {dict(totals)}")
    if lengths:
        ok = [n for n in lengths if isinstance(n, int) and n <= args.max_tokens]
        print(
            f"tokens: {sum(ok):,} in {len(ok)} samples; not plannable: {dict(Counter(n if isinstance(n, str) else 'too_long' for n in lengths if n not in ok))}"
        )
        print(f"row plan at {args.max_tokens} tokens: {plan_rows(ok, args.max_tokens)} rows")
    return 0


def plan_rows(lengths: list[int], max_tokens: int, num_open: int = 8) -> int:
    """How many rows the first-fit packer makes of these sample lengths (from the index, nothing decoded)."""
    from data.packing import FirstFitPacker

    @dataclass
    class _Item:
        num_tokens: int
        key: int  # distinct: the packer never puts one key into a row twice

    packer = FirstFitPacker(max_tokens, num_open)
    return sum(len(packer.add(_Item(n, i))) for i, n in enumerate(lengths)) + len(packer.flush())


if __name__ == "__main__":
    sys.exit(main())
