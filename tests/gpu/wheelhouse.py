"""Download the wheels the GPU box lacks into `.whl/` (run here, where PyPI is reachable): `make wheelhouse`.

The GPU box (one H200, Python 3.12, x86_64) has torch, tokenizers, safetensors, numpy, PIL, tqdm, psutil, ninja,
but no registry and none of DeepSpeed, Hydra, OmegaConf, webdataset. Each package below is fetched at exactly
the version installed in this checkout's `.venv`, so the box runs what CI tested; transformers is carried too
(the box has 5.17; CI tests the pinned one). Packages PyPI ships only as source (DeepSpeed, antlr4) are
built into pure-Python wheels here. `make gpu-check` installs `.whl/*.whl` with `pip --no-index` on the box.
wandb is left out: the check runs with `trainer.wandb.mode=disabled`, which never imports it.
liger-kernel (pure Python; its Triton comes with the box's CUDA torch) is for `loss.backend=liger` and its parity
test: CI's `.venv` does not have it (it would pull Triton in), so it is fetched at the version that test was
written against, or at the one in `.venv` when a developer installed it there. bitsandbytes (`adapter=qlora`) the
same way.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEST = ROOT / ".whl"
PYTHON = "3.12"
# The box's python is CPython 3.12 on glibc x86_64; pip matches manylinux tags exactly, so list the usual ones.
PLATFORMS = [
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
]
PLATFORMS += ["manylinux_2_24_x86_64", "manylinux1_x86_64"]
BINARY = [
    "transformers",
    "hydra-core",
    "omegaconf",
    "webdataset",
    "braceexpand",
    "hjson",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "typing-extensions",
    "regex",
    "peft",  # adapter=lora|qlora
    "accelerate",  # peft's dependency
]
SOURCE_ONLY = ["deepspeed", "antlr4-python3-runtime"]
# not in CI's .venv: this version unless .venv has one. bitsandbytes: adapter=qlora (CUDA only), tests/gpu/test_qlora.py
OPTIONAL = {"liger-kernel": "0.8.5", "bitsandbytes": "0.50.2"}


def installed_or(name: str, fallback: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return fallback


def main() -> None:
    DEST.mkdir(exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    pins = [f"{name}=={version(name)}" for name in BINARY]
    pins += [f"{name}=={installed_or(name, fallback)}" for name, fallback in OPTIONAL.items()]
    platform_args = [arg for p in PLATFORMS for arg in ("--platform", p)]
    print("downloading:", " ".join(pins))
    subprocess.run(
        [
            *pip,
            "download",
            "-q",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            PYTHON,
            "--implementation",
            "cp",
            *platform_args,
            "-d",
            str(DEST),
            *pins,
        ],
        check=True,
    )
    for name in SOURCE_ONLY:
        pin = f"{name}=={version(name)}"
        print("building a wheel:", pin)
        # No build isolation: DeepSpeed's setup imports torch (the local one) only to describe the build; ops are
        # compiled just in time on the box, so the wheel itself is pure Python.
        subprocess.run(
            [*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(DEST), pin],
            check=True,
            env={**__import__("os").environ, "DS_BUILD_OPS": "0"},
        )
    wheels = sorted(DEST.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"{len(wheels)} wheels, {total:.1f} MiB in {DEST}:")
    for w in wheels:
        print("  ", w.name)
    if shutil.which("git"):
        subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", ".whl"], check=True)  # never committed


if __name__ == "__main__":
    main()
