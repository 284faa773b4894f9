"""data.convert: LLaVA / ShareGPT / messages JSON -> shards whose records equal the source, rejects reported."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys

import pytest
import webdataset as wds
from PIL import Image

from data.convert import convert, main


def _png(w: int, h: int, colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="PNG")
    return buf.getvalue()


def _read(out_dir) -> dict[str, dict]:
    urls = sorted(str(p) for p in out_dir.glob("shard-*.tar"))
    return {r["__key__"]: r for r in wds.tarfile_to_samples()([{"url": u} for u in urls])}


def test_llava_json_round_trips_text_and_image_bytes(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    blobs = {f"a{i}.png": _png(20 + i, 30, (10 * i, 0, 0)) for i in range(4)}
    for name, blob in blobs.items():
        (root / name).write_bytes(blob)
    (root / "broken.jpg").write_bytes(b"not an image")
    source = [
        {
            "id": "one",
            "image": "a0.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is it?"},
                {"from": "gpt", "value": "Red."},
            ],
        },
        {
            "id": "two",
            "image": ["a1.png", "a2.png"],
            "conversations": [
                {"from": "human", "value": "Compare <image> and <image>."},
                {"from": "gpt", "value": "Same."},
                {"from": "human", "value": "Sure?"},
                {"from": "gpt", "value": "Yes."},
            ],
        },
        {"id": "three", "conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
        {
            "id": "four",
            "image": "a3.png",  # no placeholder: the image goes first in the first user turn
            "conversations": [{"from": "human", "value": "Describe."}, {"from": "gpt", "value": "Dark."}],
        },
        {
            "id": "vid",
            "video": ["a0.png", "a1.png"],
            "conversations": [
                {"from": "human", "value": "<video>What happens?"},
                {"from": "gpt", "value": "X."},
            ],
        },
        {
            "id": "missing",
            "image": "nope.png",
            "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "?"}],
        },
        {
            "id": "broken",
            "image": "broken.jpg",
            "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "?"}],
        },
        {"id": "noanswer", "conversations": [{"from": "human", "value": "hi"}]},
        {
            "id": "extra",
            "image": "a0.png",
            "conversations": [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "?"}],
        },
        ["not", "a", "record"],
    ]
    src = tmp_path / "llava.json"
    src.write_text(json.dumps(source))
    out = tmp_path / "shards"
    argv = ["--input", str(src), "--image-root", str(root), "--out", str(out), "--max-shard-bytes", "150"]
    with pytest.raises(SystemExit, match=r"5 of 10 records rejected"):  # above --max-reject-fraction 0.05
        main(argv)

    index = json.loads((out / "index.json").read_text())
    assert index["num_samples"] == 5 and len(index["shards"]) >= 2  # the size bound split the output
    assert sum(s["num_samples"] for s in index["shards"]) == 5
    assert index["rejected"] == {
        "missing_image": 1,
        "bad_image": 1,
        "bad_structure": 2,
        "placeholder_mismatch": 1,
    }
    report = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert {(r["id"], r["reason"]) for r in report if r["id"]} >= {
        ("missing", "missing_image"),
        ("broken", "bad_image"),
    }

    records = _read(out)
    by_id = {json.loads(r["json"])["id"]: r for r in records.values()}
    assert set(by_id) == {"one", "two", "three", "four", "vid"}

    def msgs(rid):
        return json.loads(by_id[rid]["json"])["messages"]

    one = msgs("one")
    assert one[0]["content"] == [
        {"type": "image", "image": "img0.png"},
        {"type": "text", "text": "What is it?"},
    ]
    assert one[1] == {"role": "assistant", "content": "Red."}
    assert by_id["one"]["img0.png"] == blobs["a0.png"]
    two = msgs("two")
    assert two[0]["content"] == [
        {"type": "text", "text": "Compare "},
        {"type": "image", "image": "img0.png"},
        {"type": "text", "text": " and "},
        {"type": "image", "image": "img1.png"},
        {"type": "text", "text": "."},
    ]
    assert by_id["two"]["img0.png"] == blobs["a1.png"] and by_id["two"]["img1.png"] == blobs["a2.png"]
    assert [m["content"] for m in two[1:]] == ["Same.", "Sure?", "Yes."]
    assert msgs("three") == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    assert msgs("four")[0]["content"][0] == {"type": "image", "image": "img0.png"}
    assert by_id["four"]["img0.png"] == blobs["a3.png"]
    video = msgs("vid")[0]["content"][0]
    assert video["type"] == "video" and [by_id["vid"][f] for f in video["video"]] == [
        blobs["a0.png"],
        blobs["a1.png"],
    ]


def test_messages_jsonl_and_bad_lines(tmp_path):
    (tmp_path / "x.png").write_bytes(_png(8, 8, (0, 9, 0)))
    lines = [
        json.dumps(
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {
                        "role": "user",
                        "content": [{"type": "image", "image": "x.png"}, {"type": "text", "text": "Colour?"}],
                    },
                    {"role": "assistant", "content": "Green."},
                ]
            }
        ),
        "{truncated",
        json.dumps({"messages": [{"role": "robot", "content": "?"}]}),
    ]
    src = tmp_path / "m.jsonl"
    src.write_text("\n".join(lines))
    index = convert([src], tmp_path, tmp_path / "out", progress=False)
    assert index["num_samples"] == 1 and index["rejected"] == {"bad_json": 1, "bad_structure": 1}
    (record,) = _read(tmp_path / "out").values()
    messages = json.loads(record["json"])["messages"]
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[1]["content"][0] == {"type": "image", "image": "img0.png"}
    assert record["img0.png"] == (tmp_path / "x.png").read_bytes()


def test_converted_shards_train(tmp_path, tiny_processor):
    """Converted shards feed the loader: image and video samples train under both layouts."""
    from data.loader import PackedRowStream
    from data.processing import SampleProcessor
    from mmrope.encodings import build

    (tmp_path / "x.png").write_bytes(_png(64, 56, (200, 0, 0)))
    rows = [
        {
            "image": "x.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour?"},
                {"from": "gpt", "value": "It is red."},
            ],
        },
        {
            "video": ["x.png", "x.png"],
            "conversations": [
                {"from": "human", "value": "<video>What shape?"},
                {"from": "gpt", "value": "A square."},
            ],
        },
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    convert([tmp_path / "d.jsonl"], tmp_path, tmp_path / "out", progress=False)
    proc = SampleProcessor(tiny_processor, build("mrope"), max_tokens=512, layout="qwen2_5")
    urls = sorted(str(p) for p in (tmp_path / "out").glob("shard-*.tar"))
    out = list(PackedRowStream(urls, proc, max_tokens=512, epochs=1))
    assert sum(r["num_samples"] for r in out) == 2 and not any(r["skipped"] for r in out)
    assert out[0]["image_grid_thw"].tolist() == [[1, 4, 4]]  # 64x56 -> 56x56 (28-multiples) -> 4x4 patches
    assert out[0]["video_grid_thw"].tolist() == [[1, 4, 4]]  # 2 frames = one temporal patch
    qwen3 = SampleProcessor(tiny_processor, build("mrope_i"), max_tokens=512, layout="qwen3")
    out = list(PackedRowStream(urls, qwen3, max_tokens=512, epochs=1))  # per-frame blocks with timestamps
    assert sum(r["num_samples"] for r in out) == 2 and not any(r["skipped"] for r in out)


def _llava(num_ok: int, num_missing: int, root) -> list[dict]:
    """`num_ok` records with an image, then `num_missing` whose image is missing (the last ones)."""
    (root / "ok.png").write_bytes(_png(16, 16, (0, 0, 200)))
    turns = [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "Blue."}]
    return [
        {"id": f"r{i}", "image": "ok.png" if i < num_ok else "gone.png", "conversations": turns}
        for i in range(num_ok + num_missing)
    ]


def _cli(tmp_path, records, *flags, in_process: bool = True) -> subprocess.CompletedProcess:
    """`python -m data.convert ...` on `records`; in this process (main() and SystemExit as the interpreter
    would turn them into an exit status: a message means 1) or, with in_process=False, as a real command."""
    src = tmp_path / "in.json"
    src.write_text(json.dumps(records))
    argv = ["--input", str(src), "--image-root", str(tmp_path), "--out", str(tmp_path / "out"), *flags]
    if not in_process:
        from tests.conftest import ROOT, clean_env

        return subprocess.run(
            [sys.executable, "-m", "data.convert", *argv],
            cwd=ROOT,
            env=clean_env(),
            capture_output=True,
            text=True,
        )
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
            if isinstance(e.code, str):
                print(e.code, file=err)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def test_cli_fails_when_most_records_are_rejected(tmp_path):
    proc = _cli(tmp_path, _llava(1, 47, tmp_path), "--quiet", in_process=False)  # the real exit status
    assert proc.returncode == 1
    assert "47 of 48 records rejected" in proc.stderr and "--max-reject-fraction=0.05" in proc.stderr
    index = json.loads((tmp_path / "out" / "index.json").read_text())  # the reports are written all the same
    assert index["num_samples"] == 1 and index["rejected"] == {"missing_image": 47}
    assert len((tmp_path / "out" / "rejected.jsonl").read_text().splitlines()) == 47
    # a looser limit accepts the same input
    assert _cli(tmp_path, _llava(1, 47, tmp_path), "--quiet", "--max-reject-fraction", "1").returncode == 0


def test_cli_accepts_a_few_rejects_and_refuses_nothing_converted(tmp_path):
    ok = _cli(tmp_path, _llava(47, 1, tmp_path), "--quiet")
    assert ok.returncode == 0, ok.stderr
    assert "47 samples" in ok.stdout and "1 of 48 records rejected" in ok.stdout
    # it says how to train on what it wrote: a data.shards value that expands to exactly its shards
    from data.index import expand_urls

    (pattern,) = re.findall(r"'data\.shards=\[\"(.*)\"\]'", ok.stdout)
    assert expand_urls(pattern) == sorted(str(p) for p in (tmp_path / "out").glob("shard-*.tar"))
    many = _cli(tmp_path, _llava(30, 0, tmp_path), "--quiet", "--max-shard-samples", "8")
    (pattern,) = re.findall(r"'data\.shards=\[\"(.*)\"\]'", many.stdout)
    assert len(expand_urls(pattern)) == 4
    assert expand_urls(pattern) == sorted(str(p) for p in (tmp_path / "out").glob("shard-*.tar"))
    none = _cli(tmp_path, _llava(0, 3, tmp_path), "--quiet", "--max-reject-fraction", "1")
    assert none.returncode == 1 and "no record could be converted" in none.stderr


def test_the_printed_command_parses_in_hydra_and_names_every_shard(tmp_path, monkeypatch):
    """`'data.shards=[dir/shard-{000000..000005}.tar]'` (what it used to print) is a Hydra syntax error; the
    printed command goes through the shell's and Hydra's parsers as is, composes, validates (every shard found)
    and names exactly the written shards, also from a folder whose name holds a space and a quote."""
    import shlex

    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from data.index import expand_urls
    from mmrope.train.config import register_configs, validate
    from tests.conftest import ROOT

    register_configs()
    monkeypatch.chdir(tmp_path)
    for flags, num_shards in ((["--max-shard-samples", "5"], 6), ([], 1)):
        out_dir = tmp_path / f"it's my {num_shards}"
        src = tmp_path / "in.json"
        src.write_text(json.dumps(_llava(30, 0, tmp_path)))
        proc = io.StringIO()
        with contextlib.redirect_stdout(proc):
            main(
                ["--input", str(src), "--image-root", str(tmp_path), "--out", out_dir.name, "--quiet", *flags]
            )
        (line,) = [x for x in proc.getvalue().splitlines() if x.startswith("train on them: ")]
        argv = shlex.split(line.removeprefix("train on them: "))
        assert argv[:3] == ["python", "train.py", "data=shards"]
        overrides = [o.input_line for o in OverridesParser.create().parse_overrides(argv[2:])]
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            cfg = validate(compose("train", overrides=overrides))  # check_paths: every shard exists
        written = sorted(str(p.relative_to(tmp_path)) for p in out_dir.glob("shard-*.tar"))
        assert len(written) == num_shards and expand_urls(cfg.data.shards) == written


def test_reject_reasons_say_what_is_wrong(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    turns = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "?"}]
    records = [
        {"id": "empty", "conversations": []},
        {"id": "notlist", "conversations": "hello"},
        {"id": "emptymsg", "messages": []},
        {"id": "noturns", "image": "a.png"},  # LLaVA without `conversations`: was "no 'messages' field"
        {"id": "broken", "image": "broken.png", "conversations": turns},
        {"id": "gone", "image": "gone.png", "conversations": turns},
    ]
    src = tmp_path / "in.json"
    src.write_text(json.dumps(records))
    convert([src], tmp_path, tmp_path / "out", progress=False)
    details = {
        r["id"]: r["detail"]
        for r in map(json.loads, (tmp_path / "out" / "rejected.jsonl").read_text().splitlines())
    }
    assert details["empty"] == "'conversations' is an empty list"
    assert details["notlist"] == "'conversations' is a str, not a list of turns"
    assert details["emptymsg"] == "'messages' is an empty list"
    assert details["noturns"] == (
        "no 'conversations' (LLaVA / ShareGPT) or 'messages' field; the record's keys: 'id', 'image'"
    )
    # the file, and what is wrong with it (PIL's message names an in-memory BytesIO: not shown)
    assert (
        details["broken"] == f"{tmp_path}/broken.png: not a readable image (PIL cannot identify its format)"
    )
    assert details["gone"] == f"gone.png (looked up {tmp_path}/gone.png)"


def test_a_wrong_image_root_says_so_and_shows_the_path_looked_up(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    records = _llava(3, 0, tmp_path)
    src = tmp_path / "in.json"
    src.write_text(json.dumps(records))
    args = ["--input", str(src), "--out", "out", "--quiet"]
    with pytest.raises(SystemExit) as e, contextlib.redirect_stderr(io.StringIO()) as err:
        main([*args, "--image-root", "imgs"])  # no such folder
    assert e.value.code == 2
    assert f"--image-root imgs: not a directory (looked up {tmp_path}/imgs)" in err.getvalue()
    (tmp_path / "elsewhere").mkdir()  # a folder, but not the one the images are in
    proc = _cli(tmp_path, records, "--quiet", "--image-root", "elsewhere", "--max-reject-fraction", "1")
    assert proc.returncode == 1 and "no record could be converted" in proc.stderr
    assert (
        f"3 record(s) name media not found under --image-root elsewhere ({tmp_path}/elsewhere)" in proc.stdout
    )


def test_progress_counts_every_record_and_quiet_shows_none(tmp_path, capsys):
    src = tmp_path / "in.json"
    src.write_text(json.dumps(_llava(4, 6, tmp_path)))  # the last 6 records are rejected
    convert([src], tmp_path, tmp_path / "out", progress=True)
    bar = capsys.readouterr().err
    final = re.findall(r"(\d+)rec [^\r\n]*?ok=(\d+), rejected=(\d+)", bar)[-1]
    assert final == ("10", "4", "6")
    main(
        ["--input", str(src), "--image-root", str(tmp_path), "--out", str(tmp_path / "q"), "--quiet"]
        + [
            "--max-reject-fraction",
            "1",
        ]
    )
    out = capsys.readouterr()
    assert out.err == "" and "4 samples" in out.out and "6 of 10 records rejected" in out.out


def _mp4(num_frames: int, fps: int, size=(64, 48)) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(num_frames):
            for packet in stream.encode(av.VideoFrame.from_image(Image.new("RGB", size, (8 * i, 0, 0)))):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def test_video_files_are_accepted_indexed_and_reported(tmp_path, tiny_processor):
    from data import index as shard_index
    from data.loader import PackedRowStream
    from data.processing import SampleProcessor
    from data.video import QWEN_VIDEO
    from mmrope.encodings import build

    (tmp_path / "clip.mp4").write_bytes(_mp4(30, 10))  # 3 s at 10 fps
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom broken")
    (tmp_path / "x.png").write_bytes(_png(64, 56, (200, 0, 0)))
    turns = [{"from": "human", "value": "<video>What happens?"}, {"from": "gpt", "value": "It turns red."}]
    rows = [
        {"id": "file", "video": "clip.mp4", "conversations": turns},
        {"id": "files", "videos": ["clip.mp4", "clip.mp4"], "conversations": [
            {"from": "human", "value": "<video><video>Same?"}, {"from": "gpt", "value": "Yes."}]},
        {"id": "frames", "video": ["x.png", "x.png"], "conversations": turns},
        {"messages": [{"role": "user", "content": [{"type": "video", "video": "clip.mp4"}, {"type": "text", "text": "?"}]},
                      {"role": "assistant", "content": "Red."}], "id": "parts"},
        {"id": "broken", "video": "broken.mp4", "conversations": turns},
        {"id": "missing", "video": "nope.webm", "conversations": turns},
    ]  # fmt: skip
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    index = convert([tmp_path / "d.jsonl"], tmp_path, out, progress=False)
    assert index["num_samples"] == 4 and index["rejected"] == {"bad_video": 1, "missing_video": 1}
    by_id = {json.loads(r["json"])["id"]: r for r in _read(out).values()}
    part = json.loads(by_id["file"]["json"])["messages"][0]["content"][0]
    assert part == {"type": "video", "video": "vid0.mp4"}
    assert by_id["file"]["vid0.mp4"] == (tmp_path / "clip.mp4").read_bytes()
    assert sorted(k for k in by_id["files"] if k.startswith("vid")) == ["vid0.mp4", "vid1.mp4"]

    # Every shard has a valid index with the videos' frame counts.
    (shard,) = sorted(out.glob("shard-*.tar"))
    idx = shard_index.load(shard_index.candidates(str(shard), None)[0], str(shard))
    assert sorted(v["frames"] for r in idx.records for v in r.get("videos", {}).values()) == [30, 30, 30, 30]
    # The report, per video file, at Qwen2.5-VL's sampling. By hand: 3 s x fps 2 = 6 frames (>= 4), effective
    # fps 6 / 30 * 10 = 2; 64x48 frames are scaled up to >= 100352 px: factor sqrt(100352 / 3072) = 5.72 ->
    # ceil(48 * 5.72 / 28) * 28 = 280, ceil(64 * 5.72 / 28) * 28 = 392 -> grid 3 x 20 x 28 -> 420 tokens.
    report = [json.loads(line) for line in (out / "videos.jsonl").read_text().splitlines()]
    assert len(report) == 4
    assert {(r["source_frames"], r["source_fps"], r["frames"], r["effective_fps"], r["visual_tokens"]) for r in report} == {
        (30, 10.0, 6, 2.0, 420)
    }  # fmt: skip
    assert index["videos"]["num"] == 4 and index["videos"]["visual_tokens"] == [420, 420]

    # The converted shard trains: with Qwen's sampling the file videos give 3 x 20 x 28 grids.
    proc = SampleProcessor(
        tiny_processor, build("mrope"), max_tokens=4096, layout="qwen2_5", video=QWEN_VIDEO
    )
    rows_out = list(PackedRowStream([str(shard)], proc, max_tokens=4096, epochs=1))
    assert sum(r["num_samples"] for r in rows_out) == 4 and not any(r["skipped"] for r in rows_out)
    grids = sorted(g for r in rows_out for g in r["video_grid_thw"].tolist())
    assert grids.count([3, 20, 28]) == 4
