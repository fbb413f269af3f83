"""Decontamination: does a training text share a word n-gram with a held-out item?

Texts are normalised to lower-case word tokens (``\\w+``, so punctuation, case and spacing do
not matter). A text overlaps the index when it shares any ``N``-word sequence (8, between the
13-grams of GPT-3's decontamination and the short questions of PIQA) with a held-out item, or,
for an item shorter than ``N`` words but at least ``MIN_WORDS`` long, contains all of it. Only
sequences of which at least half the words hold a letter count: arithmetic such as GSM8K's
``35/7=5<<35/7=5>>5`` is shared by chance (counted, it flagged 11 % of GSM8K's training rows
against its test split; with words required, and a target's question only, 1.5 % against every
default held-out source). A
held-out item is its scored context and gold answer (``forgetless.mixing.heldout_texts``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

N = 8
MIN_WORDS = 4
_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """The normalised word tokens of ``text``."""
    return _WORD.findall(text.lower())


def normalized(text: str) -> str:
    """One spelling per text for deduplication: its words joined by single spaces."""
    return " ".join(words(text))


class OverlapIndex:
    """Hashed word n-grams of held-out texts; ``overlaps(text)`` asks one training text."""

    def __init__(self, texts: Iterable[str], n: int = N, min_words: int = MIN_WORDS) -> None:
        self.n = n
        self.grams: set[int] = set()
        self.short: dict[int, set[int]] = {}  # length -> whole short items
        self.items = 0
        for text in texts:
            tokens = words(text)
            self.items += 1
            if len(tokens) >= n:
                self.grams.update(_grams(tokens, n))
            elif len(tokens) >= min_words and _wordy(tokens):
                self.short.setdefault(len(tokens), set()).add(hash(tuple(tokens)))

    def overlaps(self, text: str) -> bool:
        tokens = words(text)
        if not self.grams.isdisjoint(_grams(tokens, self.n)):
            return True
        return any(not items.isdisjoint(_grams(tokens, length))
                   for length, items in self.short.items())


def _wordy(tokens: list[str]) -> bool:
    return 2 * sum(any(c.isalpha() for c in token) for token in tokens) >= len(tokens)


def _grams(tokens: list[str], n: int) -> set[int]:
    """Hashes of the ``n``-word sequences of ``tokens`` with words in at least half."""
    return {hash(gram) for i in range(len(tokens) - n + 1)
            if _wordy(list(gram := tuple(tokens[i:i + n])))}
