"""A user's journey, as the README tells it ("Your data, end to end"), on generated LLaVA-style data.

From a fresh folder, the README's commands verbatim (only `trainer.max_steps=300` becomes 3): convert, a
2-encoding multirun with an extra override and wandb offline, the report, two exports, and VQA on a set with a
text-only item; then the two loading snippets of mmrope/train/README.md ("Export and loading"), each in a fresh
process where torchvision cannot be imported: mmrope's `from_pretrained` path and stock transformers passing `mm_token_type_ids`. They must
generate the same tokens.
"""

from __future__ import annotations

import csv
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from data.synthetic import COLOURS, POSITIONS, SHAPES, draw_shape
from tests.conftest import clean_env
from tests.readme import marked_block, run_readme_command, shell_commands

pytestmark = pytest.mark.slow

STEPS = 3  # the fewest that tell "step 1 and the last" (log_every 10) from "every step": [1, 3] vs [1, 2, 3]
NUM_RECORDS = 48
SWEEP = Path("runs/sweeps/first")


def fast(argv: list[str]) -> list[str]:
    """The README command with STEPS steps instead of 300 (also in the run folder names the export reads)."""
    return [a.replace("trainer.max_steps=300", f"trainer.max_steps={STEPS}") for a in argv]


def write_llava_data(root: Path) -> None:
    """`my_data/`: 48 LLaVA records over generated shape images (1-3 turns, one text-only, one without a
    placeholder, one whose image is missing) and a VQA set with a text-only item."""
    rng = random.Random(0)
    images = root / "my_data" / "images"
    images.mkdir(parents=True)
    facts = []
    for i in range(NUM_RECORDS):
        shape, (colour, background) = rng.choice(SHAPES), rng.sample(sorted(COLOURS), 2)
        position = rng.choice(POSITIONS)
        size = (rng.randint(56, 112), rng.randint(56, 112))
        draw_shape(shape, colour, background, size, position, 0.4).save(images / f"{i:04d}.png")
        facts.append((shape, colour, position))
    records = []
    for i, (shape, colour, position) in enumerate(facts):
        turns = [
            {"from": "human", "value": "<image>\nWhat shape is in the image?"},
            {"from": "gpt", "value": f"A {shape}."},
        ]
        if i % 3 == 1:
            turns += [
                {"from": "human", "value": f"What colour is the {shape}?"},
                {"from": "gpt", "value": f"It is {colour}."},
            ]
        if i % 5 == 2:
            turns += [
                {"from": "human", "value": f"Where is the {shape}?"},
                {"from": "gpt", "value": position},
            ]
        records.append({"id": f"shape-{i:04d}", "image": f"{i:04d}.png", "conversations": turns})
    records[7]["conversations"][0]["value"] = "Describe the shape."  # no placeholder: image goes first
    records[11] = {
        "id": "text-only",
        "conversations": [{"from": "human", "value": "What is 2 plus 3?"}, {"from": "gpt", "value": "5."}],
    }
    records[13]["image"] = "missing.png"  # rejected: 1 of 48 is under the default --max-reject-fraction
    (root / "my_data" / "llava.json").write_text(json.dumps(records, indent=1))

    items = [
        {
            "id": f"vqa-{i}",
            "image": f"images/{i:04d}.png",
            "question": "What shape is in the image?",
            "answer": facts[i][0],
        }
        for i in range(4)
    ]
    items.append(
        {
            "id": "vqa-options",
            "image": "images/0004.png",
            "question": "Which shape is it?",
            "answer": chr(ord("A") + SHAPES.index(facts[4][0])),
            "options": list(SHAPES),
        }
    )
    items.insert(2, {"id": "vqa-text-only", "question": "What is 2 plus 3?", "answer": "5"})
    (root / "my_data" / "vqa.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))


# A README snippet in a fresh interpreter where torchvision cannot be imported; dumps the generated ids.
HARNESS = """
import json, sys
sys.modules["torchvision"] = None  # the processors must not need it
snippet, out_file = open(sys.argv[1]).read(), sys.argv[2]
exec(compile(snippet, "README snippet", "exec"))
json.dump({"ids": out.tolist(), "mmrope_imported": "mmrope" in sys.modules}, open(out_file, "w"))
"""


def run_snippet(marker: str, cwd: Path) -> dict:
    (cwd / f"snippet_{marker}.py").write_text(marked_block(f"journey:{marker}"))
    proc = subprocess.run(
        [sys.executable, "-c", HARNESS, f"snippet_{marker}.py", f"snippet_{marker}.json"],
        cwd=cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads((cwd / f"snippet_{marker}.json").read_text())


def test_the_readme_journey(tmp_path):
    write_llava_data(tmp_path)
    convert, train, report, export_mrope, export_vanilla, vqa = map(
        fast, shell_commands(marked_block("journey:commands"))
    )

    # 1. convert: 47 samples, the one bad record counted; it says how to train on its shards (as the README does)
    out = run_readme_command(convert, tmp_path)
    assert "47 samples" in out and "1 of 48 records rejected {'missing_image': 1}" in out
    (shards_value,) = [a for a in train if a.startswith("data.shards=")]
    assert f"'{shards_value}'" in out

    # 2. the sweep: two encodings, an extra override in every run name, wandb offline
    run_readme_command(train, tmp_path, timeout=900)
    sweep = tmp_path / SWEEP
    job_dirs = sorted(p.parent for p in sweep.glob("*/metrics.jsonl"))
    assert [d.name for d in job_dirs] == [
        f"rope={enc},trainer.max_steps={STEPS}" for enc in ("mrope", "vanilla")
    ]
    for job in job_dirs:
        steps = [json.loads(line)["step"] for line in (job / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, STEPS]  # from step 1 (log_every is 10)
        assert (job / "checkpoints" / f"step_{STEPS}" / "manifest.json").is_file()
        (wandb_run,) = (job / "wandb").glob("offline-run-*")
        assert "," not in wandb_run.name
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        assert "trainer.wandb.group=first" in overrides

    # 3. the report
    run_readme_command(report, tmp_path)
    table = (sweep / "report" / "report.md").read_text()
    assert {row.split("|")[2].strip() for row in table.splitlines() if row.startswith("| `")} == {
        "mrope",
        "vanilla",
    }
    assert (sweep / "report" / "loss.png").stat().st_size > 1000

    # 4. exports: mrope is a stock checkpoint, vanilla needs mmrope
    run_readme_command(export_mrope, tmp_path)
    run_readme_command(export_vanilla, tmp_path)
    stock = {
        name: json.loads((tmp_path / "exported" / name / "mmrope_encoding.json").read_text())["stock"]
        for name in ("mrope", "vanilla")
    }
    assert stock == {"mrope": True, "vanilla": False}

    # 5. the loading snippets, fresh processes without torchvision: the same tokens
    ours = run_snippet("mmrope", tmp_path)
    theirs = run_snippet("stock", tmp_path)
    assert not theirs["mmrope_imported"], "the stock snippet must run without mmrope"
    assert ours["ids"] == theirs["ids"]
    assert len(ours["ids"][0]) > 16  # a prompt with an image, and generated tokens

    # 6. VQA of both exports, a text-only item in the set: skipped and counted, results written
    out = run_readme_command(vqa, tmp_path)
    assert out.count("skipped 1 of 6 items (no_image=1") == 2
    with (tmp_path / "vqa_report" / "vqa.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["checkpoint"], r["distance"], r["n"], r["skipped"]) for r in rows] == [
        (f"exported/{name}", d, "5", "1") for name in ("mrope", "vanilla") for d in ("0", "256")
    ]
    skipped = [
        json.loads(line) for line in (tmp_path / "vqa_report" / "skipped.jsonl").read_text().splitlines()
    ]
    assert {(s["key"], s["reason"]) for s in skipped} == {("vqa-text-only", "no_image")}
    predictions = (tmp_path / "vqa_report" / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 2 * 2 * 5
