"""Distractor text for the long-context VQA protocol (specs/dipe.md section 7).

The DIPE paper plots accuracy against the "inter-modal distance": that many tokens of unrelated text (Paul
Graham essays there) placed between the image(s) and the question. Here:

    corpus = load_corpus(["essays/*.txt"])            # or load_corpus(None): the built-in generated text
    ids_N = distractor_ids(tokenizer, corpus, 4096)   # exactly 4096 token ids, no special tokens
    far = insert_distractor(sample, ids_N, tokens=tokens, encoding=encoding, layout="qwen3", dipe=True)

`insert_distractor` splices the ids right after the vision_end token of the last visual block before the first
supervised token and recomputes the positions with the encoding, so the spliced sample is exactly what
processing the spliced token sequence from scratch would give.
"""

from __future__ import annotations

import dataclasses
import glob
import random
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from data.processing import IGNORE_INDEX, Sample
from mmrope.encodings import Encoding, TokenIds, anchored_positions

# Word pools of the built-in corpus: enough variety that BPE sees ordinary English-like text.
_SUBJECTS = (
    "the startup",
    "a founder",
    "the investor",
    "my friend",
    "the committee",
    "every programmer",
    "the city",
    "our team",
    "the old professor",
    "a young writer",
    "the market",
    "most people",
    "the engineer",
    "the editor",
    "a small company",
    "the museum",
    "the farmer",
    "her neighbour",
    "the students",
    "the author",
)
_VERBS = (
    "noticed",
    "built",
    "wrote about",
    "argued for",
    "ignored",
    "discovered",
    "questioned",
    "explained",
    "rebuilt",
    "studied",
    "described",
    "funded",
    "abandoned",
    "remembered",
    "measured",
    "designed",
    "criticised",
    "admired",
    "sold",
    "compared",
)
_OBJECTS = (
    "a new kind of essay",
    "the problem of scale",
    "an unusual idea",
    "the history of painting",
    "a better programming language",
    "the cost of distraction",
    "a quiet morning routine",
    "the rules of the game",
    "a long list of questions",
    "the price of bread",
    "an empty warehouse",
    "the shape of the argument",
    "a map of the river",
    "the habits of good writers",
    "a cheaper solution",
    "the design of the library",
    "an old photograph",
    "the weather in spring",
    "a forgotten theorem",
    "the value of patience",
)
_TAILS = (
    "",
    "",
    "",
    " last year",
    " without much effort",
    " in a surprising way",
    " after a long debate",
    " before anyone else did",
    " because it seemed obvious",
    " for reasons nobody understood",
    " while the others waited",
    " during the summer",
    " with great care",
    " almost by accident",
)
_CONNECTIVES = (
    "However,",
    "Later,",
    "In the end,",
    "Meanwhile,",
    "Surprisingly,",
    "Of course,",
    "Then",
    "So",
)


def default_corpus(num_words: int = 50_000, seed: int = 0) -> str:
    """Built-in distractor text: seeded, plausible English-like sentences (no download), about `num_words` words.

    >>> default_corpus(12)[:40]  # doctest: +SKIP
    'The committee studied the rules of the g'
    """
    if num_words < 1:
        raise ValueError(f"num_words must be >= 1, got {num_words}")
    rng = random.Random(seed)
    sentences, count = [], 0
    while count < num_words:
        sentence = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}{rng.choice(_TAILS)}."
        if rng.random() < 0.25:
            sentence = f"{rng.choice(_CONNECTIVES)} {sentence}"
        sentence = sentence[0].upper() + sentence[1:]
        sentences.append(sentence)
        count += len(sentence.split())
    return " ".join(sentences)


def load_corpus(paths: list[str] | None) -> str:
    """Concatenate user text files (globs allowed, e.g. "essays/*.txt"; sorted within a glob) with newlines
    replaced by spaces, as the paper's `get_context` does; `None` -> `default_corpus()`."""
    if paths is None:
        return default_corpus()
    files: list[str] = []
    for pattern in paths:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if Path(m).is_file()]
        if not matches:
            raise ValueError(f"corpus: {pattern!r} matches no text file")
        files += matches
    texts = [Path(f).read_text(encoding="utf-8", errors="replace") for f in files]
    corpus = " ".join(" ".join(t.split("\n")) for t in texts)
    if not corpus.strip():
        raise ValueError(f"corpus: the files {files[:3]} hold no text")
    return corpus


# Tokenising a 50K-word corpus takes a moment; every (item, distance) pair reuses it.
_TOKEN_CACHE: dict[tuple[int, int, int], Tensor] = {}


def _corpus_ids(tokenizer: Any, corpus: str) -> Tensor:
    key = (id(tokenizer), len(corpus), hash(corpus))
    if key not in _TOKEN_CACHE:
        # split_special_tokens: a literal "<|image_pad|>" in a user's text must stay plain text, never a
        # placeholder that would break the visual grid.
        ids = tokenizer(corpus, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        special = set(getattr(tokenizer, "all_special_ids", []))
        ids_C = torch.tensor([i for i in ids if i not in special], dtype=torch.long)
        if ids_C.numel() == 0:
            raise ValueError("corpus: tokenises to no (non-special) tokens")
        if len(_TOKEN_CACHE) > 8:
            _TOKEN_CACHE.clear()
        _TOKEN_CACHE[key] = ids_C
    return _TOKEN_CACHE[key]


def distractor_ids(tokenizer: Any, corpus: str, num_tokens: int, *, offset: int = 0) -> Tensor:
    """Exactly `num_tokens` token ids [N] (int64) of `corpus`, starting at token `offset`; the corpus' token
    stream repeats when it is too short. Special tokens never occur."""
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if num_tokens == 0:
        return torch.zeros(0, dtype=torch.long)
    ids_C = _corpus_ids(tokenizer, corpus)
    index_N = (offset + torch.arange(num_tokens)) % ids_C.numel()
    return ids_C[index_N]


def insertion_index(input_ids_L: Tensor, labels_L: Tensor, tokens: TokenIds) -> int:
    """Index right after the vision_end token of the last visual block preceding the first supervised token
    (the whole sequence when nothing is supervised, e.g. a prompt). Raises ValueError if there is none.

    Example (`user: VS P P VE "q?" | assistant: "a"`, P = image placeholder, `a` supervised)::

        index:  0  1 2 3 4  5   6
        ids:    VS P P VE q ?   a       -> 4 (distractors go between VE and "q")
    """
    supervised = (labels_L != IGNORE_INDEX).nonzero()
    boundary = int(supervised[0]) if len(supervised) else int(input_ids_L.numel())
    head_L = input_ids_L[:boundary]
    visual = ((head_L == tokens.image_token_id) | (head_L == tokens.video_token_id)).nonzero()
    if len(visual) == 0:
        raise ValueError(
            "sample: no visual block before the first supervised token to insert distractors after"
        )
    last_visual = int(visual[-1])
    ends = (head_L[last_visual:] == tokens.vision_end_token_id).nonzero()
    if len(ends) == 0:
        raise ValueError("sample: the last visual block before the first supervised token has no vision_end")
    return last_visual + int(ends[0]) + 1


def insert_distractor(
    sample: Sample,
    ids_N: Tensor,
    *,
    tokens: TokenIds,
    encoding: Encoding,
    layout: str,
    dipe: bool = False,
    generator: torch.Generator | None = None,
) -> Sample:
    """A new Sample with `ids_N` spliced right after the vision_end of the last visual block that precedes the
    first supervised token (between the image(s) and the question); labels are IGNORE_INDEX there; positions
    (and DIPE's static positions if `dipe`) are recomputed by `encoding` for the new token layout. Pixels,
    grids, and the image, question and answer tokens are unchanged. `generator` seeds HoPE's random scales.

    Example (`mrope`, layout qwen3: T, VS, a 1x4x4 image -> 2x2 LLM tokens P, VE, question q; 2 distractors D)::

        before: T VS P P P P VE q          t row: 0 1 2 2 2 2 4 5
        after:  T VS P P P P VE D D q      t row: 0 1 2 2 2 2 4 5 6 7   (q moved 2 positions away)
    """
    if ids_N.dim() != 1:
        raise ValueError(f"ids_N must be 1D [N], got shape {tuple(ids_N.shape)}")
    reserved = (tokens.image_token_id, tokens.video_token_id, tokens.vision_start_token_id)
    if any(bool((ids_N == t).any()) for t in reserved):
        raise ValueError("ids_N: distractor ids must not contain vision_start / image / video token ids")
    cut = insertion_index(sample.input_ids, sample.labels, tokens)
    ids_N = ids_N.to(sample.input_ids)
    input_ids = torch.cat([sample.input_ids[:cut], ids_N, sample.input_ids[cut:]])
    ignore_N = torch.full_like(ids_N, IGNORE_INDEX)
    labels = torch.cat([sample.labels[:cut], ignore_N, sample.labels[cut:]])

    grid_thw = sample.image_grid_thw
    pos_3BL, _ = encoding.position_ids(
        input_ids[None],
        tokens=tokens,
        image_grid_thw=grid_thw if grid_thw is not None and len(grid_thw) else None,
        layout=layout,
        generator=generator,
    )
    static = None
    if dipe:
        visual_1L = (input_ids == tokens.image_token_id) | (input_ids == tokens.video_token_id)
        static = anchored_positions(pos_3BL, visual_1L[None])[:, 0]
    return dataclasses.replace(
        sample, input_ids=input_ids, labels=labels, position_ids=pos_3BL[:, 0], static_position_ids=static
    )
