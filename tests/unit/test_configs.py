"""Every shipped YAML composes against the typed schema and validates; bad values name their key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mmrope.train.config import LossConfig, register_configs, validate
from tests.conftest import ROOT, clean_env

CONFIGS = ROOT / "configs"
# Values a user must supply (local paths, shard lists) are `???` in the YAML: fill them with dummies.
DUMMY = {"shards": "['/data/shard-{000..003}.tar']"}


def missing_values(node, prefix: str) -> list[str]:
    out = []
    for k, v in node.items_ex(resolve=False) if hasattr(node, "items_ex") else node.items():
        key = f"{prefix}{k}"
        if OmegaConf.is_dict(v):
            out += missing_values(v, key + ".")
        elif OmegaConf.is_missing(node, k):
            out.append(f"{key}={DUMMY.get(k, '/models/' + k)}")
    return out


register_configs()
TINY_8_KV_HEADS = [
    "model.tiny.hidden_size=1024",
    "model.tiny.num_attention_heads=8",
    "model.tiny.num_key_value_heads=8",
]


def group_options() -> list[tuple[str, str]]:
    out = []
    for path in sorted(CONFIGS.rglob("*.yaml")):
        rel = path.relative_to(CONFIGS)
        if rel.parts[0] == "hydra" or rel == Path("train.yaml"):
            continue
        out.append(("/".join(rel.parts[:-1]), rel.stem))
    return out


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=overrides)


# mhrope assigns whole KV heads to t/h/w: its shipped config (8 KV heads) needs a tiny model with 8 KV heads.
FITTING_MODEL = {"rope=mhrope": TINY_8_KV_HEADS}  # whole KV heads per axis: 8 of them, head_dim 128


def test_there_is_something_to_compose():
    groups = {g for g, _ in group_options()}
    assert {"model", "rope", "data", "deepspeed", "trainer"} <= groups


@pytest.mark.parametrize("group,option", group_options())
def test_every_yaml_composes_and_validates(group, option):
    raw = OmegaConf.load(CONFIGS / group / f"{option}.yaml")
    prefix = "" if group == "experiment" else f"{group.replace('/', '.')}."
    extra = missing_values(raw, prefix)
    extra += FITTING_MODEL.get(f"{group}={option}", [])
    if (group, option) == ("adapter", "qlora") and not torch.cuda.is_available():  # composes; refused here
        with pytest.raises(ValueError, match=r"`adapter=qlora`"):
            validate(compose_cfg([f"{group}={option}", *extra]), check_paths=False)
        return
    cfg = validate(compose_cfg([f"{group}={option}", *extra]), check_paths=False)  # placeholder shards
    if group == "rope":
        assert cfg.rope.name == OmegaConf.load(CONFIGS / "rope" / f"{option}.yaml").name


def test_default_is_the_embedded_tiny_run():
    cfg = validate(compose_cfg([]))
    assert cfg.model.kind == "tiny" and not cfg.data.shards and cfg.trainer.wandb.mode == "offline"
    assert cfg.deepspeed.stage == 2 and cfg.model.freeze.vision and not cfg.model.freeze.llm


def test_issue_example_overrides_compose():
    cfg = validate(compose_cfg(["rope=vanilla", "trainer.max_steps=20", "deepspeed=zero3"]))
    assert (cfg.rope.name, cfg.trainer.max_steps, cfg.deepspeed.stage) == ("vanilla", 20, 3)


@pytest.mark.parametrize(
    "override,key",
    [
        ("trainer.optim.min_lr=1.0", "trainer.optim.min_lr"),
        ("trainer.resume=sometimes", "trainer.resume"),
        ("model.attn_backend=magic", "model.attn_backend"),
        ("rope.name=nope", "rope.name"),
        ("deepspeed.offload_param=true", "deepspeed.offload_param"),
        ("data.error_policy=ignore", "data.error_policy"),
        ("trainer.run_name=a/b", "trainer.run_name"),
        ("loss.backend=fused", "loss.backend"),
        ("loss.chunk_size=0", "loss.chunk_size"),
        # the encoding's hyperparameters, also their fit to the model's heads (before anything is built)
        ("rope.hparams.mrope_section=[8,8,8]", "rope.hparams.mrope_section"),
        ("rope.hparams.mrope_section=[8,8]", "rope.hparams.mrope_section"),
        ("+rope.hparams.not_a_knob=1", "rope.hparams.not_a_knob"),
        ("rope=mhrope", "rope.hparams.num_key_value_heads"),  # built for 8 KV heads, the tiny model has 1
    ],
)
def test_bad_values_name_their_key(override, key):
    with pytest.raises(ValueError, match=f"`{key}`"):
        validate(compose_cfg([override]))


def test_loss_section_defaults_and_overrides():
    assert validate(compose_cfg([])).loss == LossConfig(backend="chunked", chunk_size=4096)
    assert validate(compose_cfg(["loss.chunk_size=128"])).loss.chunk_size == 128


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal without CUDA")
def test_liger_loss_without_cuda_is_refused_at_validation():
    """`python train.py loss.backend=liger` on a machine without CUDA: refused by validate(), naming the key and
    both ways out, before anything is built (export reads the config without validate(): it must still load)."""
    cfg = compose_cfg(["loss.backend=liger"])
    with pytest.raises(
        ValueError, match=r"config key `loss\.backend`: liger cannot run here: .*needs CUDA"
    ) as e:
        validate(cfg)
    assert "pip install liger-kernel" in str(e.value) and "loss.backend=chunked" in str(e.value)
    assert OmegaConf.to_object(cfg).loss.backend == "liger"  # the schema itself takes it (export, report)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal without CUDA")
def test_train_py_with_liger_loss_fails_fast_without_cuda(tmp_path):
    """The command itself: exit status 1 with the message, and no data generated (it stopped at validation)."""
    cache, out = tmp_path / "cache", tmp_path / "runs"
    proc = subprocess.run(
        [
            sys.executable,
            "train.py",
            "loss.backend=liger",
            f"data.cache_dir={cache}",
            f"trainer.output_dir={out}",
        ],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "config key `loss.backend`: liger cannot run here" in proc.stderr
    assert not cache.exists() and not (out / "tiny-default" / "checkpoints").exists()
    assert not (out / "tiny-default").exists()  # a refused new run leaves no (empty) run folder behind


def test_unknown_key_fails_at_compose_time():
    with pytest.raises(Exception, match="trainer.not_a_key"):
        compose_cfg(["trainer.not_a_key=1"])


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "+trainer.max_step=4",
            "`trainer.max_step`: not a key of `trainer`; did you mean `trainer.max_steps`?",
        ),
        (
            "+model.tiny.hidden=3",
            "`model.tiny.hidden`: not a key of `model.tiny`; did you mean `model.tiny.hidden_size`",
        ),
        ("+max_steps=4", "`max_steps`: not a key at the top level"),
    ],
)
def test_keys_added_with_plus_are_validated_like_any_other(override, message):
    """`+trainer.max_step=4` (what Hydra suggests for the typo) used to compose, then vanish: 300 steps."""
    cfg = compose_cfg([override])  # Hydra accepts an added key ...
    with pytest.raises(ValueError) as e:  # ... the schema check refuses it, naming it
        validate(cfg)
    assert message in str(e.value)


def test_keys_added_with_plus_inside_open_maps_are_kept():
    """`rope.hparams` and `deepspeed.overrides` are open maps: a `+` key there is passed on (and checked by the
    encoding, or by DeepSpeed), not refused by the schema."""
    added = ["~rope.hparams.spatial_reset", "+rope.hparams.spatial_reset=true", "+deepspeed.overrides.x=1"]
    cfg = validate(compose_cfg(["rope=mrope_i", *added]))
    assert cfg.rope.hparams["spatial_reset"] is True and cfg.deepspeed.overrides == {"x": 1}


def test_missing_or_unreadable_shards_are_refused_at_validation_naming_key_and_full_path(
    tmp_path, monkeypatch
):
    """Before any processor, model or engine is built: every shard of data.shards, data.mixture and
    trainer.eval.shards exists and is readable, else the key and the full paths are named."""
    import os

    for i in (0, 2):
        (tmp_path / f"shard-{i:06d}.tar").write_bytes(b"")
    (tmp_path / "shard-000003.tar").mkdir()
    monkeypatch.chdir(tmp_path)  # a relative shard is named by its full path
    pattern = "'data.shards=[\"shard-{000000..000003}.tar\"]'"
    with pytest.raises(ValueError) as e:
        validate(compose_cfg(["data=shards", pattern.strip("'")]))
    text = str(e.value)
    assert text.startswith("config key `data.shards`: 2 shard(s) cannot be read")
    assert f"{tmp_path}/shard-000001.tar: not found" in text
    assert f"{tmp_path}/shard-000003.tar: not a file" in text and "shard-000000" not in text
    ok = f"data.shards=[{tmp_path}/shard-000000.tar]"
    with pytest.raises(
        ValueError, match=r"^config key `trainer.eval.shards`: 1 shard.*/held-out.tar: not found"
    ):
        validate(compose_cfg(["data=shards", ok, f"trainer.eval.shards=[{tmp_path}/held-out.tar]"]))
    mixture = f"data.mixture=[{{shards: [{tmp_path}/shard-000002.tar]}}, {{shards: [/nowhere/x.tar]}}]"
    with pytest.raises(
        ValueError, match=r"^config key `data.mixture\[1\].shards`: .*/nowhere/x.tar: not found"
    ):
        validate(compose_cfg(["data=shards", mixture.replace("]}", "], weight: 1}")]))
    if os.getuid() != 0:  # root reads everything
        os.chmod(tmp_path / "shard-000002.tar", 0)
        with pytest.raises(ValueError, match="shard-000002.tar: not readable"):
            validate(compose_cfg(["data=shards", f"data.shards=[{tmp_path}/shard-000002.tar]"]))
    assert validate(compose_cfg(["data=shards", ok])).data.shards == [f"{tmp_path}/shard-000000.tar"]


def test_global_batch_must_divide():
    cfg = validate(compose_cfg(["trainer.global_batch_size=3"]))
    with pytest.raises(ValueError, match="trainer.global_batch_size"):
        cfg.grad_accum_steps(world_size=2)


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["model.family=qwen3_5", "rope=mhrope"], "rope.hparams.num_key_value_heads"),  # 1 KV head, mhrope 8
        (["rope=ilrope", "rope.hparams.text_axes=spatial"], "rope.hparams.text_axes"),
        (["rope=mrope", "+rope.hparams.text_axes=temporal"], "rope.hparams.text_axes"),  # not an mrope one
        (
            ["rope=mrope", "rope.hparams.mrope_section=[16,24,8]"],
            "rope.hparams.mrope_section",
        ),  # 48 != 64 pairs
        (["model.family=qwen9"], "model.family"),
    ],
)
def test_encoding_that_does_not_fit_the_model_names_its_key(overrides, key):
    with pytest.raises(ValueError, match=f"`{key}`"):
        validate(compose_cfg(overrides))


def test_real_qwen3_5_geometry_is_read_from_the_checkpoint_config(tmp_path):
    """A Qwen3.5 checkpoint rotates head_dim 256 x 0.25 = 32 pairs: the shipped chunked mrope ([16, 24, 24]) is
    refused before anything is loaded, naming the key and a fitting section; mrope_i and a fitted mrope pass."""
    from transformers import Qwen3_5Config

    Qwen3_5Config(
        text_config={"head_dim": 256, "rope_parameters": {"rope_type": "default", "rope_theta": 1e7}}
    ).save_pretrained(tmp_path)
    base = ["model=qwen3_5", f"model.path={tmp_path}"]
    with pytest.raises(ValueError, match=r"`rope\.hparams\.mrope_section`.*32 pairs.*\[8, 12, 12\]"):
        validate(compose_cfg([*base, "rope=mrope"]))
    validate(compose_cfg([*base, "rope=mrope_i"]))
    validate(compose_cfg([*base, "rope=mrope", "rope.hparams.mrope_section=[8,12,12]"]))
    with pytest.raises(ValueError, match="`model.family`"):
        validate(
            compose_cfg(
                ["model=composed", "model.family=qwen3_5", "model.vision_path=/v", "model.llm_path=/l"]
            )
        )


@pytest.mark.parametrize(
    "family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"]
)
def test_every_family_takes_the_tiny_model_and_its_layout(family):
    cfg = validate(compose_cfg([f"model.family={family}", "rope=mrope_i"]))
    expected = {"qwen2_vl": "qwen2", "qwen2_5_vl": "qwen2_5"}.get(family, "qwen3")
    assert cfg.model.family == family and cfg.rope_layout() == expected


def test_warmup_longer_than_the_run_is_clamped_with_a_note(capsys):
    cfg = validate(compose_cfg(["trainer.max_steps=2"]))  # the default warmup is longer than 2 steps
    assert OmegaConf.load(CONFIGS / "trainer" / "default.yaml").optim.warmup_steps > 2
    assert cfg.trainer.optim.warmup_steps == 2
    out = capsys.readouterr().out
    assert "trainer.optim.warmup_steps" in out and "clamped to 2" in out
    # a warmup that fits is left alone, silently
    cfg = validate(compose_cfg(["trainer.max_steps=50", "trainer.optim.warmup_steps=5"]))
    assert cfg.trainer.optim.warmup_steps == 5 and "clamped" not in capsys.readouterr().out


def test_peak_tflops_is_detected_by_default_and_settable():
    assert validate(compose_cfg([])).trainer.peak_tflops is None  # detect (H100, H200, A100), else MFU n/a
    assert validate(compose_cfg(["trainer.peak_tflops=400"])).trainer.peak_tflops == 400
    with pytest.raises(ValueError, match="`trainer.peak_tflops`"):
        validate(compose_cfg(["trainer.peak_tflops=0"]))


def test_data_shards_without_shards_fails_naming_the_key():
    """`data=shards` alone used to train silently on the synthetic set."""
    with pytest.raises(ValueError, match=r"`data\.shards`"):
        validate(compose_cfg(["data=shards"]))
    with pytest.raises(ValueError, match=r"`data\.shards`"):
        validate(compose_cfg(["data=shards", "data.shards=[]"]))


def readme_data_commands() -> list[str]:
    """Every `python train.py ...` command of the docs (README.md and the READMEs beside the code) that sets
    data.shards or data.mixture, verbatim."""
    from tests.readme import DOCS

    commands = []
    for block in [b for doc in DOCS for b in doc.read_text().split("```")[1::2]]:  # fenced code blocks
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("python train.py") and ("data.shards=" in line or "data.mixture=" in line):
                commands.append(line)
    return commands


def test_readme_brace_and_mixture_commands_work_verbatim():
    import shlex

    import braceexpand
    from hydra.core.override_parser.overrides_parser import OverridesParser

    commands = readme_data_commands()
    assert any("{" in c and "data.shards=" in c for c in commands), "the docs lost their brace example"
    assert any("data.mixture=" in c for c in commands), "the docs lost their mixture example"
    parser = OverridesParser.create()
    for command in commands:
        overrides = [a for a in shlex.split(command)[2:] if "=" in a and not a.startswith("-")]
        parsed = parser.parse_overrides(overrides)  # Hydra's own grammar: raises on what the shell hands it
        # A multirun's sweep (rope=mrope,vanilla) is one job per value; the data settings are what is checked here.
        cfg = validate(
            compose_cfg([o.input_line for o in parsed if not o.is_sweep_override()]), check_paths=False
        )
        assert cfg.data.shards or cfg.data.mixture, command
        urls = [u for pattern in cfg.data.shards for u in braceexpand.braceexpand(pattern)]
        urls += [
            u for m in cfg.data.mixture for pattern in m["shards"] for u in braceexpand.braceexpand(pattern)
        ]
        if "{0" in command:  # a brace range (not the mixture's own braces) expands to more URLs than patterns
            assert len(urls) > len(cfg.data.shards) + len(cfg.data.mixture), (
                f"no brace range expanded: {command}"
            )
        assert all("{" not in u for u in urls)


def test_help_lists_every_key_with_its_description_and_a_sweep_example():
    """`python train.py --help`: the groups, every schema key (described from the schema's own comments) and the
    commands for a run, the user's shards (quoted) and a sweep."""
    from mmrope.train.config import TrainConfig
    from mmrope.train.help import key_descriptions

    proc = subprocess.run(
        [sys.executable, "train.py", "--help"], cwd=ROOT, env=clean_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "python train.py -m rope=mrope,vanilla trainer.max_steps=300 hydra.job.name=first" in out
    assert "'data.shards=[\"/data/sft/shard-{000000..000511}.tar\"]'" in out
    assert "rope: circlerope, grape, hope" in out  # the groups and their options
    keys = [k for k, tp, _ in key_descriptions(TrainConfig) if tp != "section"]
    assert len(keys) > 80 and all(f"    {k} (" in out for k in keys)
    assert "trainer.max_steps (int)  optimizer steps of the whole run" in out
    assert "trainer.resume (str)  auto | must | never" in out
    assert "data.num_slots (Any)\n        Virtual slots (data/loader.py)" in out  # a comment above its field
