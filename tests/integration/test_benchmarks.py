"""Benchmarks (issue 20): the lmms-eval plugin `mmrope`, `mmrope.eval.bench`, and benchmarks during training.

- The plugin's model side (`mmrope.eval.chat.ChatModel`) answers what `mmrope.generate` answers on the same
  prompts, at batch size 1 and in left-padded batches of 4 (images, two images; a video item batched too).
- `.venv-eval/bin/lmms-eval --model mmrope` (via `mmrope.eval.bench`, batch size 4) on the shipped local tasks,
  for a `rope=mrope` export and a `rope=videorope rope.dipe=true` run of a sweep (exported by the bench): its
  answers equal ChatModel's at batch size 1, scores.csv holds every task, the sweep report shows the scores.
- A tiny training run with `trainer.eval.benchmarks` logs `bench/<task>/<metric>` at the checkpoint's step.
- A task that fails inside lmms-eval (which then exits 0) makes the bench fail, naming the task (that bench runs
  in the background beside the other one: lmms-eval's start, 10-13 s of imports, is mostly one thread).

The eval environment comes from `make eval-setup` (cached by its stamp file; ~16 s the first time, on top of .venv).
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import ROOT, clean_env, tiny_overrides

pytestmark = pytest.mark.slow

LIMIT = 3  # items per task: the video item, the two-image item and one single-image item of the QA task


@pytest.fixture(scope="session")
def lmms_eval_bin() -> Path:
    """`.venv-eval/bin/lmms-eval` of this checkout, made by `make eval-setup` when missing or stale."""
    done = subprocess.run(["make", "-s", "eval-setup"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, "make eval-setup failed:\n" + done.stdout[-3000:] + done.stderr[-3000:]
    path = ROOT / ".venv-eval" / "bin" / "lmms-eval"
    assert path.is_file()
    return path


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    from mmrope.eval.local_tasks import write_local_tasks

    return write_local_tasks(tmp_path_factory.mktemp("tasks"), num_items=4)


def _export_untied(out: Path, processor, name: str, dipe: bool, seed: int) -> Path:
    """A tiny VLM exported with an untied random head: its greedy answers vary
    from prompt to prompt (a tied head repeats the prompt's last token), so equal answers mean something."""
    from mmrope.model.build import build_model
    from mmrope.model.config import ModelConfig, TinyModelConfig
    from mmrope.train.export import write_export

    tiny = TinyModelConfig(
        hidden_size=128,
        num_attention_heads=1,
        intermediate_size=128,
        vision_depth=1,
        tie_word_embeddings=False,
    )
    model = build_model(
        ModelConfig(kind="tiny", tiny=tiny),
        vocab_size=len(processor.tokenizer),
        special_ids=processor.special_ids,
        seed=seed,
    ).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(seed))
    # as `python -m mmrope.train.export` writes it (a non-stock export refuses stock transformers)
    return write_export(
        model, processor, out, name=name, hparams={}, dipe=dipe, layout="qwen2_5", family="qwen2_5_vl"
    )


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_processor) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exports")
    return {
        "mrope": _export_untied(root / "mrope", tiny_processor, "mrope", False, seed=0),
        "videorope_dipe": _export_untied(root / "videorope_dipe", tiny_processor, "videorope", True, seed=1),
    }


@pytest.fixture(scope="module")
def failing_bench(tmp_path_factory, lmms_eval_bin, tasks_dir, exports):
    """`mmrope.eval.bench` on a task whose scorer raises (~15 s: an lmms-eval start, and lmms-eval's 4 retries of
    the scorer, 2 s apart). `test_a_failing_task_makes_the_bench_fail` checks it; the in-training benchmark test
    starts it beside its own bench (both on one thread each) so that it costs no time of its own on 2 cores."""
    root = tmp_path_factory.mktemp("failing")
    broken = root / "broken_tasks"
    broken.mkdir()
    task_yaml = (tasks_dir / "mmrope_shapes_mc.yaml").read_text()
    task_yaml = task_yaml.replace("task: mmrope_shapes_mc", "task: mmrope_broken")
    task_yaml = task_yaml.replace("!function utils.process_results", "!function utils.broken")
    (broken / "mmrope_broken.yaml").write_text(task_yaml)
    (broken / "utils.py").write_text(
        (tasks_dir / "utils.py").read_text()
        + "\n\ndef broken(doc, results):\n    raise RuntimeError('scorer bug')\n"
    )
    args = ["--checkpoint", str(exports["mrope"]), "--tasks", "mmrope_broken", "--include-path", str(broken)]
    args += ["--limit", "1", "--out", str(root / "out"), "--lmms-eval", str(lmms_eval_bin)]
    run = _BenchRun(*args, cwd=root)
    yield run
    run.kill()  # the test that checks it did not run


def _items(tasks_dir: Path, task: str) -> list[dict]:
    return [json.loads(line) for line in (tasks_dir / f"{task}.jsonl").read_text().splitlines()]


def _conversation(doc: dict) -> list[dict]:
    """The user turn lmms-eval builds from doc_to_visual + doc_to_text (a path string is a video)."""
    from mmrope.eval.local_tasks import doc_to_text, doc_to_visual

    parts = [{"type": "video" if isinstance(v, str) else "image", "url": v} for v in doc_to_visual(doc)]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": doc_to_text(doc)}]}]


@pytest.mark.parametrize("name", ["mrope", "videorope_dipe"])
def test_chat_model_answers_equal_mmrope_generate_at_batch_1_and_4(exports, tasks_dir, name):
    import mmrope
    from mmrope.eval.chat import ChatModel, decode_new
    from mmrope.eval.local_tasks import doc_to_text, doc_to_visual

    docs = _items(tasks_dir, "mmrope_shapes_qa") + _items(tasks_dir, "mmrope_shapes_mc")[:2]
    assert docs[0].get("video") and len(docs[1]["images"]) == 2  # a video and a two-image item
    chat = ChatModel(exports[name])
    conversations = [_conversation(d) for d in docs]
    single = [chat.generate([c], max_new_tokens=5)[0] for c in conversations]
    batched = chat.generate(conversations[:4], max_new_tokens=5) + chat.generate(
        conversations[4:], max_new_tokens=5
    )
    assert batched == single
    assert len(set(single)) > 2, single  # the answers differ between prompts: the comparison has teeth
    # reference: the README's path, mmrope.from_pretrained's processor + mmrope.generate, one prompt at a time
    model, processor = mmrope.from_pretrained(exports[name])
    ids = processor.special_ids
    for doc, answer in zip(docs, single):
        if doc.get("video"):
            continue  # mmrope.generate's processor takes images only
        messages = [
            {"role": "user", "content": [{"type": "image"}] * len(doc["images"]) + [{"type": "text"}]}
        ]
        messages[0]["content"][-1]["text"] = doc_to_text(doc)
        inputs = processor(text=processor.apply_chat_template(messages), images=doc_to_visual(doc))
        out = mmrope.generate(model, processor, inputs, max_new_tokens=5)
        assert decode_new(processor.tokenizer, out[0, inputs["input_ids"].shape[1] :], ids) == answer, doc[
            "id"
        ]
    # the video went in as video tokens, sampled like training data: 8 frames at 4 fps -> 2 fps -> 4 frames
    (video,) = chat.prompts(conversations[:1])
    assert video.pixel_values_videos is not None and video.videos[0]["frames"] == 4
    assert video.video_grid_thw[0, 0].item() == 2
    if name == "mrope":  # generation settings (the same code path for every encoding)
        # nucleus sampling with a tiny top_p keeps only the most probable token: greedy again
        sampled = chat.generate(conversations[:4], max_new_tokens=5, temperature=0.8, top_p=1e-9)
        assert sampled == single[:4]
        # a stop string cuts the answer before it (and generation stops there)
        stop = next(a for a in single if len(a) > 2)[1:3]
        cut = chat.generate(conversations, max_new_tokens=5, until=[stop])
        assert cut == [a.split(stop)[0] for a in single]
        # model_args override the export's video sampling: at most 2 frames
        fewer = ChatModel(exports[name], max_num_frames=2).prompts(conversations[:1])[0]
        assert fewer.videos[0]["frames"] == 2 and fewer.video_grid_thw[0, 0].item() == 1


def _fake_sweep_job(job: Path, overrides: list[str], rope: dict) -> None:
    """The Hydra files of a sweep job folder (what `train.py -m` writes) around an in-process run."""
    hydra = job / ".hydra"
    hydra.mkdir(parents=True, exist_ok=True)
    (hydra / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (hydra / "config.yaml").write_text(
        yaml.safe_dump({"rope": rope, "trainer": {"output_dir": str(job.parent)}})
    )
    (hydra / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"override_dirname": job.name}}}))


class _TaskLoader(yaml.SafeLoader):
    """Reads a task YAML with its `!function` tags (as None)."""


_TaskLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class _BenchRun:
    """`python -m mmrope.eval.bench ARGS` in the background, started on demand (one thread: clean_env); its stdout
    and stderr go to files under `cwd` (a pipe nobody reads while the test works could fill and stall it)."""

    def __init__(self, *args: str, cwd: Path) -> None:
        self.args, self.cwd, self.proc = args, cwd, None

    def start(self) -> _BenchRun:
        if self.proc is None:
            self.cwd.mkdir(parents=True, exist_ok=True)
            with open(self.cwd / "bench.stdout", "w") as out, open(self.cwd / "bench.stderr", "w") as err:
                cmd = [sys.executable, "-m", "mmrope.eval.bench", *self.args]
                self.proc = subprocess.Popen(cmd, cwd=self.cwd, env=clean_env(), stdout=out, stderr=err)
        return self

    def finish(self) -> subprocess.CompletedProcess:
        """Waits for the child (started now if it was not yet)."""
        proc = self.start().proc
        try:
            proc.wait(timeout=600)
        finally:
            self.kill()
        out, err = ((self.cwd / name).read_text() for name in ("bench.stdout", "bench.stderr"))
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def test_in_training_benchmark_then_bench_of_an_export_and_a_sweep(
    tmp_path, cache_dir, lmms_eval_bin, tasks_dir, exports, failing_bench
):
    from mmrope.eval.bench import safe_name
    from mmrope.eval.chat import ChatModel, gen_settings
    from mmrope.train.report import write_report
    from mmrope.train.run import build_session
    from tests.integration.test_eval_in_training import compose_cfg

    # 1. a tiny run (videorope + DIPE) of a "sweep": benchmark of the final checkpoint in the background
    sweep = tmp_path / "sweep"
    job_name = "rope=videorope,rope.dipe=true"
    overrides = (
        f"trainer.run_name='{job_name}'",
        "trainer.max_steps=2",
        "trainer.save_every=1",
        "trainer.log_every=1",
        "trainer.resume=never",
        "rope=videorope",
        "rope.dipe=true",
        "trainer.eval.benchmarks.tasks=[mmrope_shapes_mc]",
        "trainer.eval.benchmarks.every_saves=2",
        "trainer.eval.benchmarks.limit=1",  # one item gives a score; the bench below checks the answers
        f"trainer.eval.benchmarks.include_path=[{tasks_dir}]",
        f"trainer.eval.benchmarks.lmms_eval={lmms_eval_bin}",
    )
    s = build_session(compose_cfg(tiny_overrides(cache_dir, sweep, *overrides)))
    try:
        s.trainer.train()
    finally:
        s.metrics.close()
    job = sweep / job_name
    records = _records(job / "metrics.jsonl")
    bench = [r for r in records if "bench/mmrope_shapes_mc/accuracy" in r]
    assert len(bench) == 1, (records, (job / "bench" / "step_2.log").read_text()[-3000:])
    assert (
        bench[0]["step"] == 2 and bench[0]["bench/checkpoint_step"] == 2 and bench[0]["bench/failures"] == 0
    )
    assert 0.0 <= bench[0]["bench/mmrope_shapes_mc/accuracy"] <= 1.0
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2]  # training logged as usual
    _fake_sweep_job(job, ["rope=videorope", "rope.dipe=true"], {"name": "videorope", "dipe": True})

    # 2. the bench: an export and the sweep (its run's last checkpoint exported first), lmms-eval batch size 4
    out = sweep / "bench"
    tasks = "mmrope_shapes_mc,mmrope_shapes_qa"
    args = ["--checkpoint", str(exports["mrope"]), "--checkpoint", str(sweep), "--tasks", tasks]
    args += ["--include-path", str(tasks_dir), "--limit", str(LIMIT), "--batch-size", "4", "--out", str(out)]
    args += ["--lmms-eval", str(lmms_eval_bin)]
    bench_run = _BenchRun(*args, cwd=tmp_path / "bench_run").start()
    failing_bench.start()  # meanwhile, on the other core: test_a_failing_task_makes_the_bench_fail checks it

    # lmms-eval's answers (batch size 4) will be compared with ChatModel's at batch size 1 with the task's
    # generation settings: the mrope export's are computed while the bench runs (it uses one thread)
    task = yaml.load((tasks_dir / "mmrope_shapes_qa.yaml").read_text(), Loader=_TaskLoader)
    settings = gen_settings(task["generation_kwargs"])
    docs = _items(tasks_dir, "mmrope_shapes_qa")[:LIMIT]

    def answers(export: Path) -> list[str]:
        chat = ChatModel(export)
        return [chat.generate([_conversation(d)], **settings)[0] for d in docs]

    expected = {"mrope": answers(exports["mrope"])}
    done = bench_run.finish()
    assert done.returncode == 0, done.stdout + done.stderr
    with open(out / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["checkpoint"], r["encoding"], r["dipe"], r["task"], r["metric"], r["n"]) for r in rows] == [
        ("mrope", "mrope", "False", "mmrope_shapes_mc", "accuracy", str(LIMIT)),
        ("mrope", "mrope", "False", "mmrope_shapes_qa", "accuracy", str(LIMIT)),
        (job_name, "videorope", "True", "mmrope_shapes_mc", "accuracy", str(LIMIT)),
        (job_name, "videorope", "True", "mmrope_shapes_qa", "accuracy", str(LIMIT)),
    ]
    assert (out / "scores.png").stat().st_size > 10_000

    expected[job_name] = answers(out / "exports" / safe_name(job_name))  # the export the bench wrote
    for name, want in expected.items():
        (samples,) = (out / "lmms" / safe_name(name)).glob("**/*_samples_mmrope_shapes_qa.jsonl")
        logged = {r["doc_id"]: r["filtered_resps"] for r in _records(samples)}
        got = [logged[i] for i in range(LIMIT)]
        got = [g[0] if isinstance(g, list) else g for g in got]
        assert got == want, name

    # 3. the sweep report shows the scores
    md, _ = write_report(sweep, sweep / "report")
    text = md.read_text()
    assert "## Benchmarks (lmms-eval)" in text and f"`{job_name}` | videorope + DIPE" in text
    assert "mmrope_shapes_qa accuracy" in text and "../bench/scores.png" in text


def test_a_failing_task_makes_the_bench_fail(failing_bench):
    done = failing_bench.finish()  # started in the background by the previous test (else now)
    root = failing_bench.cwd
    assert done.returncode != 0
    assert "mmrope_broken" in done.stderr and "bench:" in done.stderr, done.stderr
    assert not (root / "out" / "scores.csv").exists()


@pytest.mark.parametrize(
    "override, key",
    [
        ("trainer.eval.benchmarks.every_saves=0", "trainer.eval.benchmarks.every_saves"),
        ("trainer.eval.benchmarks.limit=0", "trainer.eval.benchmarks.limit"),
        ("trainer.eval.benchmarks.tasks=['a,b']", "trainer.eval.benchmarks.tasks"),
        ("trainer.eval.benchmarks.include_path=[/no/such/folder]", "trainer.eval.benchmarks.include_path"),
        ("trainer.eval.benchmarks.lmms_eval=/no/such/lmms-eval", "trainer.eval.benchmarks.lmms_eval"),
    ],
)
def test_bad_benchmark_config_names_the_key(tmp_path, cache_dir, override, key):
    from tests.integration.test_eval_in_training import compose_cfg

    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        compose_cfg(tiny_overrides(cache_dir, tmp_path, override))
