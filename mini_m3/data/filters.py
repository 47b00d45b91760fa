"""§4.2 filtering step 2: the paper's rule filters, each a named rule with its threshold.

The paper drops documents with "fewer than 50 words; mean word length above 10
characters; 70 % non-alphabetic characters; a disproportionately high
unique-word fraction; excessively low unigram entropy" (§4.2). The first two
numbers and 70 % are the paper's; the last two rules give no number, so the
thresholds below are our choice (reasons next to each rule).

Rules run in order and the first failing rule drops the document (`apply_rules`
returns its name; `RuleFilter` keeps per-rule counts).

How text is measured (`DocStats`):
* words come from `mini_m3.data.text.words`: runs of letters/digits in any
  script, and each Chinese/Japanese character counts as one word (those scripts
  have no spaces, so otherwise every CJK document would fail `min_words`);
* "alphabetic" is `str.isalpha`, i.e. letters of every script (Latin, Cyrillic,
  CJK ideographs, ...); digits, punctuation and symbols are non-alphabetic, and
  whitespace is ignored in the ratio.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Iterable, Sequence

from mini_m3.data.text import words

UNIQUE_WINDOW = 100  # words per window for the length-independent unique-word fraction


class DocStats:
    """The measurements the rules need, each computed once and only if asked for."""

    def __init__(self, text: str):
        self.text = text

    @cached_property
    def words(self) -> list[str]:
        return words(self.text)

    @cached_property
    def n_words(self) -> int:
        return len(self.words)

    @cached_property
    def mean_word_length(self) -> float:
        return sum(map(len, self.words)) / self.n_words if self.words else 0.0

    @cached_property
    def non_alphabetic_fraction(self) -> float:
        non_space = "".join(self.text.split())
        return (len(non_space) - sum(map(str.isalpha, non_space))) / len(non_space) if non_space else 1.0

    @cached_property
    def unique_word_fraction(self) -> float:
        """Mean type/token ratio over consecutive windows of UNIQUE_WINDOW words (the
        whole text if shorter; a trailing partial window is ignored). A plain ratio
        falls with length (Heaps' law), so a single threshold would be unfair to long
        documents; a fixed window makes the number comparable across lengths."""
        w = self.words
        if len(w) <= UNIQUE_WINDOW:
            return len(set(w)) / len(w) if w else 0.0
        windows = [w[i:i + UNIQUE_WINDOW] for i in range(0, len(w) - UNIQUE_WINDOW + 1, UNIQUE_WINDOW)]
        return sum(len(set(win)) for win in windows) / (len(windows) * UNIQUE_WINDOW)

    @cached_property
    def unigram_entropy(self) -> float:
        """Shannon entropy (bits) of the word frequency distribution."""
        counts = Counter(self.words).values()
        n = self.n_words
        return -sum(c / n * math.log2(c / n) for c in counts) if n else 0.0


@dataclass(frozen=True)
class Rule:
    """`fn(stats, threshold)` is True when the document VIOLATES the rule (is dropped)."""

    name: str
    description: str
    threshold: float
    fn: Callable[[DocStats, float], bool]

    def violated(self, text_or_stats: "str | DocStats") -> bool:
        stats = text_or_stats if isinstance(text_or_stats, DocStats) else DocStats(text_or_stats)
        return self.fn(stats, self.threshold)


DEFAULT_RULES: tuple[Rule, ...] = (
    Rule("min_words", "fewer than 50 words (paper)", 50,
         lambda s, t: s.n_words < t),
    Rule("mean_word_length", "mean word length above 10 characters (paper): tables, hashes, base64, URLs", 10,
         lambda s, t: s.mean_word_length > t),
    Rule("non_alphabetic", "at least 70 % of the non-whitespace characters are not letters (paper)", 0.70,
         lambda s, t: s.non_alphabetic_fraction >= t),
    # Ours: natural text in 100-word windows has a type/token ratio of about 0.5-0.8 (function
    # words repeat); keyword lists and word salad from a large vocabulary reach 0.95-1.0.
    Rule("unique_word_fraction", "more than 90 % of the words in each 100-word window are distinct "
         "(word salad, keyword/tag lists)", 0.90,
         lambda s, t: s.unique_word_fraction > t),
    # Ours: 3 bits = the entropy of 8 equally frequent words; 50+ words of natural text score 5+ bits,
    # "buy now buy now ..." spam scores 1-2 bits.
    Rule("unigram_entropy", "unigram entropy of the words below 3.0 bits (repetitive spam)", 3.0,
         lambda s, t: s.unigram_entropy < t),
)


def apply_rules(text: str, rules: Sequence[Rule] = DEFAULT_RULES) -> str | None:
    """Name of the first rule the text violates (the one that drops it), or None if kept."""
    stats = DocStats(text)
    for rule in rules:
        if rule.fn(stats, rule.threshold):
            return rule.name
    return None


class RuleFilter:
    """`apply_rules` plus per-rule drop counts, for reports."""

    def __init__(self, rules: Sequence[Rule] = DEFAULT_RULES):
        self.rules = tuple(rules)
        self.dropped_by_rule: dict[str, int] = {rule.name: 0 for rule in self.rules}
        self.kept = 0

    def check(self, text: str) -> str | None:
        """Like `apply_rules`, and count the outcome."""
        failed = apply_rules(text, self.rules)
        if failed is None:
            self.kept += 1
        else:
            self.dropped_by_rule[failed] += 1
        return failed

    def filter(self, documents: Iterable) -> Iterable:
        """Yield the `Document`s (anything with .text) that pass every rule."""
        for doc in documents:
            if self.check(doc.text) is None:
                yield doc

    @property
    def dropped(self) -> int:
        return sum(self.dropped_by_rule.values())
