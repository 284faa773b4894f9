"""Scoring generated VQA answers: exact match, option letter, normalised string match.

    score("The answer is (B).", "B", options=["cat", "dog", "cow", "pig"])   # True: option letter
    score("A red circle.", "red circle")                                       # True: normalised match

An item with options is scored by the option letter extracted from the generation; an item without by the
normalised string match (lowercase, no punctuation, no articles a/an/the, single spaces; the SQuAD/VQA
convention), which contains exact match.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def exact_match(prediction: str, answer: str) -> bool:
    """Same string up to surrounding whitespace."""
    return prediction.strip() == answer.strip()


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace.

    >>> normalize_answer("  The Red, circle! ")
    'red circle'
    """
    text = text.lower().translate(_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def normalized_match(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)


def option_letters(num_options: int) -> str:
    if not 1 <= num_options <= 26:
        raise ValueError(f"options: need 1 to 26 options, got {num_options}")
    return string.ascii_uppercase[:num_options]


def extract_option(
    prediction: str, options: Sequence[str] | None = None, *, num_options: int = 4
) -> str | None:
    """The option letter a generated answer picks, or None.

    In order: the whole answer is a letter ("B", "(B)", "B."); an explicit "answer is B" / "Answer: (B)";
    a leading letter with a delimiter ("B. dog", "(B) dog", "B) dog", "B: dog"); the answer equal to one
    option's text (normalised); exactly one distinct standalone letter in the text ("I think B"). Letters
    range over the options (A-D without options).

    >>> extract_option("The answer is B.")
    'B'
    >>> extract_option("dog", ["cat", "dog"])
    'B'
    """
    letters = option_letters(len(options) if options else num_options)
    klass = f"[{letters}]"
    text = prediction.strip()
    patterns = (
        rf"^\(?({klass})\)?[.:)]?$",
        rf"\b(?i:answer)\s*(?:is|:)?\s*:?\s*\(?({klass})\)?(?![A-Za-z])",
        rf"^\(?({klass})(?:\)|[.:])\s",
    )
    for pattern in patterns:
        match = re.search(pattern, text)
        if match:
            return match.group(1)
    if options:
        normalized = normalize_answer(text)
        hits = [letters[i] for i, option in enumerate(options) if normalize_answer(option) == normalized]
        if len(hits) == 1:
            return hits[0]
    # "A" followed by a lowercase word is the article ("A dog sits"), not an option.
    standalone = {
        m.group(0)
        for m in re.finditer(rf"(?<![A-Za-z]){klass}(?![A-Za-z])", text)
        if not (m.group(0) == "A" and re.match(r" [a-z]", text[m.end() :]))
    }
    if len(standalone) == 1:
        return standalone.pop()
    return None


def answer_letter(answer: str, options: Sequence[str]) -> str:
    """The gold letter of an option item: the answer as a letter ("B", "(B)") or as one option's text."""
    letters = option_letters(len(options))
    match = re.fullmatch(rf"\(?([{letters}])\)?\.?", answer.strip())
    if match:
        return match.group(1)
    normalized = normalize_answer(answer)
    hits = [letters[i] for i, option in enumerate(options) if normalize_answer(option) == normalized]
    if len(hits) != 1:
        raise ValueError(
            f"answer: {answer!r} is neither an option letter nor exactly one of the options {options}"
        )
    return hits[0]


def option_match(prediction: str, answer: str, options: Sequence[str]) -> bool:
    return extract_option(prediction, options) == answer_letter(answer, options)


def score(prediction: str, answer: str, options: Sequence[str] | None = None) -> bool:
    """The item's scorer: option letter if it has options, otherwise the normalised string match."""
    if options:
        return option_match(prediction, answer, options)
    return normalized_match(prediction, answer)
