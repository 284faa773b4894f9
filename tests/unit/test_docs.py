"""The docs hold together: every relative link (and `#section` anchor) between README.md and the READMEs beside
the code points at something that exists, and the `<!-- marker -->` blocks the tests run are found, once each."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import ROOT
from tests.readme import DOCS, README, marked_blocks

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
FENCE = re.compile(r"^```.*?^```", flags=re.S | re.M)


def links(doc: Path) -> list[str]:
    """Relative link targets of a markdown file, code blocks left out (a `[x](y)` there is code, not a link)."""
    text = FENCE.sub("", doc.read_text())
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]  # http:, https:, mailto:


def anchors(doc: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but `-` and `_` dropped, spaces to `-`."""
    headings = re.findall(r"^#{1,6} (.+)$", FENCE.sub("", doc.read_text()), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_the_docs_are_found():
    names = {str(d.relative_to(ROOT)) for d in DOCS}
    assert DOCS[0] == README
    assert {
        "mmrope/encodings/README.md",
        "mmrope/model/README.md",
        "mmrope/train/README.md",
        "mmrope/eval/README.md",
        "data/README.md",
        "launch/README.md",
    } <= names


def test_relative_links_resolve():
    broken = []
    for doc in DOCS:
        for target in links(doc):
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            if not dest.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such section)")
    assert not broken, "\n".join(broken)


def test_link_checker_sees_a_broken_link(tmp_path):
    doc = tmp_path / "README.md"
    doc.write_text(
        "# A page\n\n[ok](#a-page) [gone](missing.md) ![img](fig.png)\n```\n[code](not/a/link)\n```\n"
    )
    assert links(doc) == ["#a-page", "missing.md", "fig.png"]
    assert anchors(doc) == {"a-page"}


def test_markers_are_unique_and_the_journey_blocks_exist():
    blocks = marked_blocks()  # raises when a marker marks blocks in two places
    assert {"journey:commands", "journey:mmrope", "journey:stock"} <= set(blocks)
    assert blocks["journey:commands"][0] == README  # the front door keeps the journey
