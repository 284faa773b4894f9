"""`python train.py --help`: the config groups, every key with its description, and a sweep example.

The descriptions are the schema's own comments (mmrope/train/config.py, mmrope/model/config.py, data/video.py):
the comment lines above a field and the comment at its end. One source, so the help cannot drift from the code.
Registered as Hydra's help config (`hydra/help: mmrope`, selected in configs/train.yaml).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
import typing
from functools import cache

WIDTH = 110
SKIP_COMMENTS = ("fmt:", "noqa", "type:")


@cache
def field_comments(cls: type) -> dict[str, str]:
    """{field: its comments} of a dataclass, read from its source (lines above the field, then the trailing one)."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        text = tok.string.lstrip("#").strip()
        if tok.type == tokenize.COMMENT and not text.startswith(SKIP_COMMENTS):
            comments[tok.start[0]] = text
    out = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, line = [], node.lineno - 1
        while line in comments and lines[line - 1].lstrip().startswith("#"):
            above.insert(0, comments[line])
            line -= 1
        trailing = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        out[node.target.id] = " ".join(above + trailing)
    return out


def _type_name(tp) -> str:
    text = tp if isinstance(tp, str) else getattr(tp, "__name__", str(tp))
    return str(text).replace("typing.", "")


def key_descriptions(schema: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, type, description) for every key of `schema`, nested dataclasses flattened with dots; a nested
    section is listed as (key, "section", its docstring's first line) before its keys."""
    hints = typing.get_type_hints(schema)
    comments = field_comments(schema)
    leaves, sections = [], []  # a section's own keys first, then its subsections
    for f in dataclasses.fields(schema):
        key, tp = prefix + f.name, hints.get(f.name, f.type)
        if dataclasses.is_dataclass(tp):
            doc = inspect.getdoc(tp) or ""
            if doc.startswith(
                tp.__name__ + "("
            ):  # the signature dataclasses writes for a class without a docstring
                doc = ""
            sections.append((key, "section", comments.get(f.name) or doc.split("\n\n")[0].replace("\n", " ")))
            sections += key_descriptions(tp, key + ".")
        else:
            leaves.append((key, _type_name(f.type), comments.get(f.name, "")))
    return leaves + sections


def keys_text(schema: type) -> str:
    lines = []
    for key, tp, text in key_descriptions(schema):
        if tp == "section":
            lines.append(f"\n  {key}: {text}" if text else f"\n  {key}:")
            continue
        head = f"    {key} ({tp})"
        if not text:
            lines.append(head)
            continue
        wrapped = textwrap.wrap(text, WIDTH - 8)
        if len(head) + 2 + len(wrapped[0]) <= WIDTH:
            lines.append(f"{head}  {wrapped[0]}")
            wrapped = textwrap.wrap(" ".join(wrapped[1:]), WIDTH - 8) if len(wrapped) > 1 else []
        else:
            lines.append(head)
        lines += [f"        {w}" for w in wrapped]
    return "\n".join(lines).lstrip("\n")


HEADER = """\
train.py: fine-tune a Qwen-VL style model with a selectable multimodal position encoding (mmrope).

  python train.py                                       the embedded default: tiny model, synthetic data, CPU
  python train.py rope=vanilla trainer.max_steps=20     pick a group option, set any key below
  python train.py data=shards 'data.shards=["/data/sft/shard-{000000..000511}.tar"]'   your shards (quoted)
  python train.py -m rope=mrope,vanilla trainer.max_steps=300 hydra.job.name=first     a sweep: one run per value
  python -m mmrope.train.report runs/sweeps/first       compare the sweep's runs (table + loss plot)
"""

FOOTER = """\
Every key is checked against the typed schema before anything is built, a `+key=value` too (except inside open
maps such as rope.hparams, which the encoding checks); errors name the key. Use --hydra-help for Hydra's flags.
"""


def help_config(schema: type) -> dict:
    """Hydra's help config (`hydra/help`): header, the groups, the keys of `schema` (the training config's
    dataclass) with descriptions, this call's config."""
    keys = keys_text(schema).replace("${", "\\${")  # a comment quoting an interpolation stays literal
    template = (
        "${hydra.help.header}\n"
        "== Config groups (group=option) ==\n$APP_CONFIG_GROUPS\n\n"
        "== Keys (key=value; the values this call would use are below) ==\n" + keys + "\n\n"
        "== Config of this call ==\n$CONFIG\n"
        "${hydra.help.footer}"
    )
    return {"app_name": "train.py", "header": HEADER, "footer": FOOTER, "template": template}
