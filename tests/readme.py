"""The README's commands and code, as tests run them: verbatim, so that what a user copies is what CI ran."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, clean_env

README = Path(__file__).resolve().parents[1] / "README.md"


def fenced_blocks(language: str) -> list[str]:
    """Bodies of the README's ```<language> blocks, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def marked_block(marker: str) -> str:
    """The fenced block right after `<!-- marker -->` in the README (markers are invisible when rendered)."""
    match = re.search(
        rf"<!-- {re.escape(marker)} -->\n```\w*\n(.*?)^```", README.read_text(), flags=re.S | re.M
    )
    if match is None:
        raise LookupError(f"README.md has no block marked <!-- {marker} -->")
    return match.group(1)


def shell_commands(block: str) -> list[list[str]]:
    """A bash block as argv lists: `\\` continuations joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [argv for line in joined.splitlines() if (argv := shlex.split(line, comments=True))]


def readme_commands(*prefix: str) -> list[list[str]]:
    """Every command in the README's bash blocks whose argv starts with `prefix`."""
    return [
        argv
        for block in fenced_blocks("bash")
        for argv in shell_commands(block)
        if tuple(argv[: len(prefix)]) == prefix
    ]


def run_readme_command(argv: list[str], cwd: Path, *extra: str, timeout: int = 600) -> str:
    """A README command as a user runs it from `cwd` (`python` is this interpreter, `train.py` the repo's),
    wandb offline; returns its output, asserting it succeeded."""
    assert argv[0] == "python"
    script = [str(ROOT / argv[1])] if argv[1].endswith(".py") else argv[1:2]
    cmd = [sys.executable, *script, *argv[2:], *extra]
    proc = subprocess.run(
        cmd, cwd=cwd, env=clean_env(WANDB_MODE="offline"), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{cmd}\n" + proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr
