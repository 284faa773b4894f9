"""Registry: names, spec defaults, validation (ValueError naming the key), allocation forwarding, shipped YAMLs."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from mmrope.encodings import Encoding, available, build

ROPE_CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "rope"

# specs/encodings.md section 4 (c), written out by hand (plus the mmrope extras frequency_layout and
# fixed_temporal_scale).
SPEC_DEFAULTS = {
    "vanilla": {},
    "mrope": {"mrope_section": [16, 24, 24], "temporal_stride": 2.0},
    "mrope_i": {"mrope_section": [24, 20, 20], "temporal_stride": 1.0, "spatial_reset": False},
    "mhrope": {
        "mrope_section": [2, 3, 3],
        "num_key_value_heads": 8,
        "temporal_stride": 1.0,
        "spatial_reset": False,
    },
    "videorope": {"mrope_section": [16, 24, 24], "temporal_stride": 2.0, "frequency_layout": "package"},
    "hope": {
        "mrope_section": [16, 24, 24],
        "temporal_stride": 2.0,
        "temporal_stride_lst": [0.5, 0.75, 1.0, 1.25, 1.5],
        "fixed_temporal_scale": None,
        "frequency_layout": "package",
    },
    "circlerope": {
        "mrope_section": [16, 24, 24],
        "temporal_stride": 1.0,
        "move_to_origin": False,
        "move_to_positive": False,
        "dff_rate": False,
        "method": "circle",
        "radius": -1,
        "alpha": -1,
    },
    "v2pe": {"visual_stride": 16.0},
    "ilrope": {
        "mrope_section": [24, 20, 20],
        "temporal_stride": 1.0,
        "spatial_reset": True,
        "text_axes": "diagonal",
    },
    "omnirope": {"mrope_section": [16, 24, 24], "temporal_stride": 1.0, "text_axes": "diagonal"},
    "lumos": {"mrope_section": [16, 24, 24], "temporal_stride": 1.0, "position_scale": [1.0, 1.0, 1.0]},
    "grape": {
        "mrope_section": [16, 24, 24],
        "temporal_stride": 1.0,
        "log_freq_scale": 1.0,
        "frequency_allocation": "chunked",
        "grape_mode": "canonical",
        "num_planes": None,
        "block_size": 16,
        "planes_per_block": None,
        "rope_init": True,
        "learnable": True,
    },
}
ALLOCATIONS = {
    "vanilla": "1d",
    "mrope": "chunked",
    "mrope_i": "interleaved",
    "mhrope": "multihead",
    "videorope": "videorope",
    "hope": "hope",
    "circlerope": "chunked",
    "v2pe": "1d",
    "ilrope": "interleaved",
    "omnirope": "chunked",
    "lumos": "lumos",
    "grape": "grape",
}
ROTARY_KW = {  # what reaches make_rotary besides the model geometry
    "vanilla": set(),
    "v2pe": set(),
    "lumos": set(),
    "mrope": {"mrope_section"},
    "mrope_i": {"mrope_section"},
    "circlerope": {"mrope_section"},
    "ilrope": {"mrope_section"},
    "omnirope": {"mrope_section"},
    "mhrope": {"mrope_section", "num_key_value_heads"},
    "videorope": {"mrope_section", "frequency_layout"},
    "hope": {"mrope_section", "frequency_layout"},
    "grape": {
        "mrope_section",
        "log_freq_scale",
        "frequency_allocation",
        "grape_mode",
        "num_planes",
        "block_size",
        "planes_per_block",
        "rope_init",
        "learnable",
    },
}


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def test_available_names():
    assert available() == list(SPEC_DEFAULTS)


@pytest.mark.parametrize("name", list(SPEC_DEFAULTS))
def test_defaults_and_allocation(name):
    enc = build(name)
    assert isinstance(enc, Encoding) and enc.name == name
    assert {k: _plain(v) for k, v in enc.hparams.items()} == SPEC_DEFAULTS[name]
    assert enc.allocation == ALLOCATIONS[name]
    assert enc.is_1d == (name in ("vanilla", "v2pe"))


def test_unknown_name_and_key():
    with pytest.raises(ValueError, match="mrope2"):
        build("mrope2")
    with pytest.raises(ValueError, match="spatial_reset"):
        build("mrope", spatial_reset=True)  # only the MRoPE-I family has it
    with pytest.raises(ValueError, match="temporal_strid"):
        build("videorope", temporal_strid=1.0)


@pytest.mark.parametrize(
    "name,key,value",
    [
        ("mrope", "mrope_section", [16, 24]),
        ("mrope", "mrope_section", [16, 0, 48]),
        ("mrope", "temporal_stride", 0),
        ("mrope", "temporal_stride", "2"),
        ("mrope_i", "spatial_reset", 1),
        ("mhrope", "num_key_value_heads", 0),
        ("mhrope", "mrope_section", [4, 3, 3]),  # sums past num_key_value_heads = 8
        ("hope", "temporal_stride_lst", []),
        ("hope", "temporal_stride_lst", [1.0, -0.5]),
        ("hope", "fixed_temporal_scale", 0.0),
        ("videorope", "frequency_layout", "hf"),
        ("circlerope", "dff_rate", 1.5),
        ("circlerope", "method", "ellipse"),
        ("circlerope", "radius", "big"),
        ("circlerope", "radius", "auto-x"),
        ("circlerope", "alpha", 2.0),
        ("circlerope", "move_to_positive", -1.0),
        ("v2pe", "visual_stride", 0.0),
        ("ilrope", "spatial_reset", False),
        ("omnirope", "text_axes", "spatial"),
        ("ilrope", "text_axes", True),
        ("lumos", "position_scale", [4, 8]),
        ("grape", "grape_mode", "free"),
        ("grape", "frequency_allocation", "random"),
        ("grape", "log_freq_scale", -1.0),
        ("grape", "num_planes", 0),
        ("grape", "block_size", 0),
        ("grape", "rope_init", "yes"),
    ],
)
def test_invalid_values_name_the_key(name, key, value):
    with pytest.raises(ValueError, match=key):
        build(name, **{key: value})


def test_valid_non_default_values():
    assert (
        build("circlerope", radius="auto-2", dff_rate=0.25, alpha=0.5, move_to_positive="auto").hparams[
            "radius"
        ]
        == "auto-2"
    )
    assert build("mhrope", mrope_section=[1, 1, 1], num_key_value_heads=4).preserves_text_prior is False
    assert build("mhrope").preserves_text_prior is True  # 2 + 3 + 3 == 8: no NoPE head
    assert build("hope").preserves_text_prior is False
    assert build("grape").preserves_text_prior is True
    assert build("grape", grape_mode="axis").preserves_text_prior is False
    assert build("grape", log_freq_scale=2.0).preserves_text_prior is False


@pytest.fixture
def fake_frequencies(monkeypatch):
    """Stand-in for mmrope.encodings.frequencies recording make_rotary's arguments (independent of its status)."""
    calls = []

    class FakeRotary:
        def __call__(self, pos):
            return ("cos", pos), ("sin", pos)

    def make_rotary(allocation, *, head_dim, rope_theta, partial_rotary_factor=1.0, **kw):
        calls.append((allocation, head_dim, rope_theta, partial_rotary_factor, kw))
        return FakeRotary()

    from mmrope.encodings.frequencies.factory import ALLOCATION_KEYS  # the real table of knobs per allocation

    module = types.ModuleType("mmrope.encodings.frequencies")
    module.make_rotary = make_rotary
    module.ALLOCATION_KEYS = ALLOCATION_KEYS
    monkeypatch.setitem(sys.modules, "mmrope.encodings.frequencies", module)
    import mmrope.encodings as package

    monkeypatch.setattr(package, "frequencies", module, raising=False)
    return calls


@pytest.mark.parametrize("name", list(SPEC_DEFAULTS))
def test_rotary_forwards_allocation_hparams(fake_frequencies, name):
    enc = build(name)
    enc.rotary(head_dim=128, rope_theta=5e6, partial_rotary_factor=0.5)
    allocation, head_dim, theta, factor, kw = fake_frequencies[-1]
    assert (allocation, head_dim, theta, factor) == (ALLOCATIONS[name], 128, 5e6, 0.5)
    assert set(kw) == ROTARY_KW[name]
    assert all(_plain(kw[k]) == SPEC_DEFAULTS[name][k] for k in kw)
    pos = torch.zeros(3, 1, 2)
    assert enc.cos_sin(pos, head_dim=128, rope_theta=5e6, partial_rotary_factor=0.5)[0][1] is pos
    assert len(fake_frequencies) == 1  # cached per geometry


def test_rotary_validates_model_geometry(fake_frequencies):
    with pytest.raises(ValueError, match="num_key_value_heads"):
        build("mhrope").rotary(head_dim=128, rope_theta=1e6, num_key_value_heads=4)
    build("mhrope").rotary(head_dim=128, rope_theta=1e6, num_key_value_heads=8)
    with pytest.raises(ValueError, match="head_dim"):
        build("mrope").rotary(head_dim=127, rope_theta=1e6)
    with pytest.raises(ValueError, match="rope_theta"):
        build("mrope").rotary(head_dim=128, rope_theta=0.0)
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        build("mrope").rotary(head_dim=128, rope_theta=1e6, partial_rotary_factor=1.5)


@pytest.mark.parametrize("name", list(SPEC_DEFAULTS))
def test_shipped_yaml_matches_registry(name):
    path = ROPE_CONFIGS / f"{name}.yaml"
    config = yaml.safe_load(path.read_text())
    assert config["name"] == name and "dipe" not in config  # DIPE off: the schema's default, not restated
    hparams = config.get("hparams", {})
    assert hparams == SPEC_DEFAULTS[name]
    assert {k: _plain(v) for k, v in build(name, **hparams).hparams.items()} == SPEC_DEFAULTS[name]
    # one comment per hyperparameter line
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith("  ") and ":" in ln]
    assert len(lines) == len(SPEC_DEFAULTS[name]) and all("#" in ln for ln in lines)


def test_real_frequencies_if_available():
    frequencies = pytest.importorskip("mmrope.encodings.frequencies")
    enc = build("mrope_i")
    pos, _ = enc.position_ids(
        torch.tensor([[1000, 151652, 151655, 151653]]), image_grid_thw=torch.tensor([[1, 2, 2]])
    )
    cos, sin = enc.cos_sin(pos, head_dim=128, rope_theta=5e6)
    assert cos.shape == (1, 4, 128) and cos.dtype == torch.float32
    assert isinstance(enc.rotary(head_dim=128, rope_theta=5e6), frequencies.Rotary)
