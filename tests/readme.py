"""The docs' commands and code, as tests run them: verbatim, so that what a user copies is what CI ran.

The docs are the front door (README.md) and the README.md next to the code each part describes, under
mmrope/, data/, launch/ and tests/. A block is found by its `<!-- marker -->` comment in any of them (markers
are unique across the docs) or, for commands, by what the command starts with.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, clean_env

README = ROOT / "README.md"
DOCS = [README] + sorted(
    p for top in ("mmrope", "data", "launch", "tests") for p in (ROOT / top).rglob("README.md")
)
MARKER = re.compile(r"<!-- (\S+) -->\n```\w*\n(.*?)^```", flags=re.S | re.M)


def fenced_blocks(language: str) -> list[str]:
    """Bodies of the docs' ```<language> blocks, in order (README.md first)."""
    return [
        block
        for doc in DOCS
        for block in re.findall(rf"^```{language}\n(.*?)^```", doc.read_text(), flags=re.S | re.M)
    ]


def marked_blocks() -> dict[str, tuple[Path, str]]:
    """Every `<!-- marker -->` block of the docs: marker -> (doc, body); a marker used twice is an error."""
    found: dict[str, tuple[Path, str]] = {}
    for doc in DOCS:
        for marker, body in MARKER.findall(doc.read_text()):
            if marker in found:
                raise LookupError(f"<!-- {marker} --> marks a block in both {found[marker][0]} and {doc}")
            found[marker] = (doc, body)
    return found


def marked_block(marker: str) -> str:
    """The fenced block right after `<!-- marker -->` in the docs (markers are invisible when rendered)."""
    blocks = marked_blocks()
    if marker not in blocks:
        raise LookupError(
            f"no doc ({', '.join(str(d.relative_to(ROOT)) for d in DOCS)}) has a block marked <!-- {marker} -->"
        )
    return blocks[marker][1]


def shell_commands(block: str) -> list[list[str]]:
    """A bash block as argv lists: `\\` continuations joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [argv for line in joined.splitlines() if (argv := shlex.split(line, comments=True))]


def readme_commands(*prefix: str) -> list[list[str]]:
    """Every command in the docs' bash blocks whose argv starts with `prefix`."""
    return [
        argv
        for block in fenced_blocks("bash")
        for argv in shell_commands(block)
        if tuple(argv[: len(prefix)]) == prefix
    ]


def run_readme_command(argv: list[str], cwd: Path, *extra: str, timeout: int = 600) -> str:
    """A docs command as a user runs it from `cwd` (`python` is this interpreter, `train.py` the repo's),
    wandb offline; returns its output, asserting it succeeded."""
    assert argv[0] == "python"
    script = [str(ROOT / argv[1])] if argv[1].endswith(".py") else argv[1:2]
    cmd = [sys.executable, *script, *argv[2:], *extra]
    proc = subprocess.run(
        cmd, cwd=cwd, env=clean_env(WANDB_MODE="offline"), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{cmd}\n" + proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr
