"""One home per config default: the typed schema (mmrope/train/config.py, mmrope/model/config.py, data/video.py).

A shipped group YAML says only what differs from the dataclass defaults of the section it configures; an
experiment says only what differs from what it builds on (its `defaults:` list). The one key a group file may
restate is the one that says which option it is (`IDENTITY`: `rope.name`, `model.kind`, ...). Resume relevance is
field metadata on the schema (`must_match`), not a list of strings.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mmrope.train.config import TrainConfig, register_configs, resume_keys
from tests.conftest import ROOT

CONFIGS = ROOT / "configs"
# The key that names a group option (a file saying `kind: tiny` says what it is, not a default it repeats).
IDENTITY = {"rope.name", "model.kind", "model.family", "data.source", "deepspeed.stage", "adapter.name"}
# Whole-value fields: compared as a value, not key by key (their keys are not schema fields).
OPAQUE = {"rope.hparams", "deepspeed.overrides"}
register_configs()


def schema_default(dotted: str) -> Any:
    """The dataclass default of a dotted TrainConfig key (a nested dataclass as a plain dict)."""
    node: Any = TrainConfig()
    for part in dotted.split("."):
        node = getattr(node, part)
    return dataclasses.asdict(node) if dataclasses.is_dataclass(node) else node


def leaves(node: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in node.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in OPAQUE:
            out += leaves(v, key + ".")
        else:
            out.append((key, v))
    return out


def restated(values: dict, prefix: str, default_of) -> list[str]:
    """`key = value` lines of `values` (a YAML's body under `prefix`) equal to `default_of(key)`; `???` (a value the
    user must give) never counts."""
    return [
        f"{key} = {v!r}"
        for key, v in leaves(values, prefix)
        if v != "???" and key not in IDENTITY and _plain(default_of(key)) == _plain(v)
    ]


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def group_files() -> list[Path]:
    return [
        p
        for p in sorted(CONFIGS.rglob("*.yaml"))
        if p.relative_to(CONFIGS).parts[0] not in ("hydra", "experiment") and p.name != "train.yaml"
    ]


@pytest.mark.parametrize("path", group_files(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_group_yaml_says_only_what_differs_from_the_schema(path):
    body = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    section = path.relative_to(CONFIGS).parts[0]
    # `# @package _global_`: the file sets keys of several sections (e.g. adapter + model.freeze)
    prefix = "" if "@package _global_" in path.read_text().split("\n", 1)[0] else f"{section}."
    found = restated(body, prefix, schema_default)
    assert not found, f"{path.relative_to(ROOT)} restates schema defaults (delete these lines): {found}"


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=overrides)


def _parent_overrides(defaults: list) -> list[str]:
    """An experiment's `defaults:` list as overrides: `override /g: o` -> g=o, another experiment -> experiment=x."""
    out = []
    for item in defaults:
        if isinstance(item, str):
            out.append(f"experiment={item}")
            continue
        ((key, option),) = item.items()
        if key != "_self_":
            out.append(f"{key.removeprefix('override ').lstrip('/')}={option}")
    return [o for o in out if not o.startswith("_self_")]


@pytest.mark.parametrize("path", sorted((CONFIGS / "experiment").glob("*.yaml")), ids=lambda p: p.stem)
def test_experiment_says_only_what_differs_from_what_it_builds_on(path):
    body = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    parent = _compose(_parent_overrides(body.pop("defaults", [])))

    def parent_value(key: str) -> Any:
        value = OmegaConf.select(parent, key, throw_on_missing=False)
        return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value

    found = restated(body, "", parent_value)
    assert not found, f"{path.relative_to(ROOT)} restates what it builds on (delete these lines): {found}"


def test_the_check_catches_a_restated_default():
    """The checker itself: the schema's lr (the paper recipe) restated, and a value of the parent restated."""
    body = {"optim": {"lr": 1.0e-5, "min_lr": 2.0e-4}, "max_steps": 300, "run_name": "x"}
    assert restated(body, "trainer.", schema_default) == [
        "trainer.optim.lr = 1e-05",
        "trainer.max_steps = 300",
    ]
    assert restated({"hparams": {"temporal_stride": 2.0}}, "rope.", schema_default) == []  # vs {}: differs
    assert restated({"name": "mrope"}, "rope.", schema_default) == []  # the option's identity


def test_resume_keys_are_schema_metadata():
    """`must_match` fields, in schema order; a nested dataclass marked as a whole counts once (`model.tiny`)."""
    keys = resume_keys()
    assert {
        "model.kind",
        "model.tiny",
        "rope",
        "data.seed",
        "deepspeed.stage",
        "trainer.global_batch_size",
    } <= set(keys)
    assert "trainer.max_steps" not in keys and not any(k.startswith("model.tiny.") for k in keys)
    from mmrope.train.checkpoint import RESUME_KEYS

    assert RESUME_KEYS == keys
