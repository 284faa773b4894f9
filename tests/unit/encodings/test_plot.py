"""`python -m mmrope.encodings.plot`: the figure renders to a sane PNG, and the decay curves are the
spec's."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mmrope.encodings as encodings_pkg
from mmrope.encodings import plot
from mmrope.encodings.frequencies import make_rotary

REPO = Path(__file__).resolve().parents[3]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def spec_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def test_decay_curves_are_mean_cos_over_owned_pairs():
    rotary = make_rotary("chunked", head_dim=64, rope_theta=1e4, mrope_section=[8, 12, 12])
    decay = plot.decay_curves(rotary, max_distance=500, num_points=50)
    inv = spec_inv_freq(64, 1e4).double()
    d = decay.distance[:, None]
    torch.testing.assert_close(decay.curves["t"], torch.cos(d * inv[:8]).mean(-1), rtol=0, atol=1e-5)
    torch.testing.assert_close(decay.curves["w"], torch.cos(d * inv[20:]).mean(-1), rtol=0, atol=1e-5)
    assert decay.owners == {"t": "8 pairs", "h": "12 pairs", "w": "12 pairs"}
    assert decay.distance[0] == 1 and decay.distance[-1] == 500


def test_decay_marks_nope_and_heads():
    hope = plot.decay_curves(make_rotary("hope", head_dim=128, rope_theta=1e6), max_distance=100)
    assert hope.owners["t"] == "NoPE" and torch.all(hope.curves["t"] == 1)
    assert hope.owners["h"] == "24 pairs" and hope.owners["w"] == "23 pairs"
    mh = plot.decay_curves(make_rotary("multihead", head_dim=64, rope_theta=1e6), max_distance=100)
    assert mh.owners == {"t": "2 heads x 32 pairs", "h": "3 heads x 32 pairs", "w": "3 heads x 32 pairs"}
    axis = plot.decay_curves(
        make_rotary("grape", head_dim=64, rope_theta=1e6, grape_mode="axis"), max_distance=100, num_points=30
    )
    assert axis.owners["t"] == "32 planes"
    one_d = plot.decay_curves(make_rotary("1d", head_dim=64, rope_theta=1e6), max_distance=100, num_points=30)
    torch.testing.assert_close(axis.curves["t"], one_d.curves["t"], rtol=0, atol=1e-5)  # same planes at init


def test_example_sequence_layout():
    example = plot.example_sequence()
    ids = example.input_ids_BL[0]
    assert int((ids == 151655).sum()) == 16 and int((ids == 151656).sum()) == 32
    assert example.image_grid_thw.tolist() == [[1, 8, 8]] and example.video_grid_thw.tolist() == [[2, 8, 8]]
    for start, end, _ in example.spans:
        assert ids[start - 1] == 151652 and ids[end] == 151653


def test_parse_hparams():
    assert plot._parse_hparams(["temporal_stride=2.0", "mrope_section=[2,3,3]", "method=circle"]) == {
        "temporal_stride": 2.0,
        "mrope_section": [2, 3, 3],
        "method": "circle",
    }
    with pytest.raises(ValueError, match="hparams"):
        plot._parse_hparams(["temporal_stride"])


class _StubEncoding:
    """Stands in for the registry's Encoding (contract: position_ids, rotary, hparams) with hand-made
    positions."""

    def __init__(self, allocation: str, **hparams):
        self.allocation, self.hparams = allocation, hparams

    def position_ids(self, input_ids_BL, **kwargs):
        L = input_ids_BL.shape[1]
        pos = torch.arange(L).repeat(3, 1)
        pos[1, 7:23] = 7 + torch.arange(16) // 4
        pos[2, 7:23] = 7 + torch.arange(16) % 4
        return pos[:, None], torch.zeros(1, 1, dtype=torch.long)

    def rotary(self, *, head_dim, rope_theta, partial_rotary_factor=1.0, num_key_value_heads=None):
        return make_rotary(self.allocation, head_dim=head_dim, rope_theta=rope_theta, **self.hparams)


@pytest.mark.parametrize(("allocation", "hparams"), [("chunked", {}), ("grape", {"grape_mode": "mixed"})])
def test_render_with_stub_encoding(tmp_path, monkeypatch, allocation, hparams):
    monkeypatch.setattr(
        encodings_pkg, "build", lambda name, **hp: _StubEncoding(allocation, **hp), raising=False
    )
    out = plot.plot_encoding("stub", tmp_path / "sub" / "fig.png", hparams, max_distance=256, dpi=50)
    width, height = png_size(out)
    assert (width, height) == (13 * 50, 10 * 50)
    assert out.stat().st_size > 10_000


@pytest.mark.parametrize(
    ("name", "hparams"),
    [("mrope", []), ("videorope", []), ("mhrope", ["spatial_reset=True"])],
)
def test_cli_renders_registry_encodings(tmp_path, name, hparams):
    if not hasattr(encodings_pkg, "build"):
        pytest.skip("mmrope.encodings.build (the registry) is not available yet")
    out = tmp_path / f"{name}.png"
    plot.main(
        ["--rope", name, "--out", str(out), "--dpi", "40", "--max-distance", "512", "--hparams", *hparams]
    )
    width, height = png_size(out)
    assert (width, height) == (13 * 40, 10 * 40)
    assert out.stat().st_size > 8_000


def test_cli_compares_text_axes(tmp_path):
    """`--compare`: one layout panel per option set (the README's ILRoPE text_axes figure)."""
    out = tmp_path / "cmp.png"
    plot.main(
        [
            "--rope",
            "ilrope",
            "--out",
            str(out),
            "--dpi",
            "40",
            "--compare",
            "text_axes=diagonal",
            "text_axes=temporal",
        ]
    )
    width, height = png_size(out)
    assert (width, height) == (13 * 40, round(2 * 3.4 * 40))
    assert out.stat().st_size > 8_000


def test_encodings_do_not_import_matplotlib():
    code = (
        "import sys, mmrope.encodings, mmrope.encodings.frequencies; "
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={"PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
