"""§4.2 filtering step 3: the model-based quality filter, at toy scale.

The paper had XinYu-70B grade 10,000 sampled documents 0-5 for informativeness,
fine-tuned TinyBERT on those grades, scored the whole corpus with it and kept
the top share (§4.2). Here:

* the grader is `heuristic_grade`, a hand-written 0-5 rubric. It is a STAND-IN
  for the 70B grader when you have no labels, not a measure of truth: it
  rewards text that looks like natural prose and nothing more;
* the small model is `LogisticQualityScorer`: logistic regression in numpy
  (mini-batch gradient descent, L2, seeded) over hashed word unigrams/bigrams
  plus a few dense style features; it accepts 0/1 labels or 0-5 grades (read as
  soft targets grade/5);
* `select_by_quality` is the paper's recipe: score everything in one streaming
  pass keeping only one float per document, then keep exactly the top share.

Any object with `score(texts) -> np.ndarray` (higher = better) can replace the
scorer (`QualityScorer` protocol), e.g. a fine-tuned transformer.
"""

from __future__ import annotations

import json
import math
import string
from dataclasses import dataclass
from typing import Iterable, Protocol, Sequence, runtime_checkable

import numpy as np
from tqdm.auto import tqdm

from mini_m3.data.filters import DEFAULT_RULES, DocStats, apply_rules
from mini_m3.data.text import batched, mix64, word_hashes
from mini_m3.utils import atomic_write_text

# Function words of English and Chinese: natural prose is full of them, lists and salad are not.
STOPWORDS = frozenset(
    "a an the and or but if of to in on at by for with from as is are was were be been being it its this that "
    "these those he she they we you i his her their our your my not no so than then there here which who whom "
    "what when where why how all any some can could will would should may might must do does did has have had "
    "also into about over after before more most such only other".split()
) | frozenset("的了是在和有我不这也就人都一上他们中到说你她它与及而或但")
_PUNCTUATION = string.punctuation + "，。！？；：、“”‘’（）《》—…"
_DELETE_PUNCT = str.maketrans("", "", _PUNCTUATION)
_DELETE_DIGITS = str.maketrans("", "", string.digits)
_SENTENCE_END = ".!?。！？"


# ---- the stand-in grader -----------------------------------------------------


def heuristic_grade(text: str) -> int:
    """0-5 "informativeness" grade from a fixed rubric (stand-in for the paper's 70B grader).

    0 if any default rule drops the text, else one point each for: function words in the
    natural range (15-70 % of words), sentences of 5-40 words, few digits/symbols (< 10 %
    of characters), lexical variety without salad (window type/token ratio 0.35-0.85 and
    entropy >= 4.5 bits), and a start point for passing the rules.
    """
    stats = DocStats(text)
    if apply_rules(text, DEFAULT_RULES) is not None:
        return 0
    grade = 1
    stop_ratio = sum(w in STOPWORDS for w in stats.words) / stats.n_words
    grade += 0.15 <= stop_ratio <= 0.70
    sentences = max(1, sum(text.count(c) for c in _SENTENCE_END))
    grade += 5 <= stats.n_words / sentences <= 40
    symbols = _punctuation_count(text) + _digit_count(text)
    grade += symbols / max(1, len("".join(text.split()))) < 0.10
    grade += 0.35 <= stats.unique_word_fraction <= 0.85 and stats.unigram_entropy >= 4.5
    return int(grade)


def _punctuation_count(text: str) -> int:
    return len(text) - len(text.translate(_DELETE_PUNCT))


def _digit_count(text: str) -> int:
    return len(text) - len(text.translate(_DELETE_DIGITS))


# ---- the scorer --------------------------------------------------------------


@runtime_checkable
class QualityScorer(Protocol):
    def score(self, texts: Sequence[str]) -> np.ndarray:
        """One float per text, higher = better quality."""
        ...


DENSE_FEATURES = ("log_words", "mean_word_length", "punctuation_ratio", "digit_ratio", "stopword_ratio",
                  "unigram_entropy", "unique_word_fraction", "uppercase_ratio", "log_words_per_sentence")


def dense_features(text: str) -> list[float]:
    """Style features, in the order of DENSE_FEATURES."""
    stats = DocStats(text)
    n_words = max(1, stats.n_words)
    n_chars = max(1, len("".join(text.split())))
    sentences = max(1, sum(text.count(c) for c in _SENTENCE_END))
    return [math.log1p(stats.n_words), stats.mean_word_length, _punctuation_count(text) / n_chars,
            _digit_count(text) / n_chars, sum(w in STOPWORDS for w in stats.words) / n_words,
            stats.unigram_entropy, stats.unique_word_fraction, sum(map(str.isupper, text)) / n_chars,
            math.log1p(n_words / sentences)]


@dataclass
class _Features:
    """A batch as a CSR matrix of hashed n-gram features (indptr, indices, values) + dense."""

    indptr: np.ndarray
    indices: np.ndarray
    values: np.ndarray
    dense: np.ndarray

    def rows(self, which: np.ndarray) -> "_Features":
        starts, ends = self.indptr[which], self.indptr[which + 1]
        take = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)]) if len(which) else np.zeros(0, int)
        indptr = np.concatenate([[0], np.cumsum(ends - starts)])
        return _Features(indptr, self.indices[take], self.values[take], self.dense[which])


class LogisticQualityScorer:
    """Logistic regression p(good | text) over hashed uni/bigrams + standardised dense features.

    The hashed part is log(1 + count) with a random sign per bucket (so collisions cancel
    on average) and L2-normalised per document, so long documents do not dominate.
    """

    def __init__(self, n_hash: int = 2 ** 16, l2: float = 1e-4, learning_rate: float = 0.5, epochs: int = 40,
                 batch_size: int = 64, seed: int = 0):
        self.n_hash, self.l2, self.learning_rate = n_hash, l2, learning_rate
        self.epochs, self.batch_size, self.seed = epochs, batch_size, seed
        self.hash_weights = np.zeros(n_hash)
        self.dense_weights = np.zeros(len(DENSE_FEATURES))
        self.bias = 0.0
        self.dense_mean = np.zeros(len(DENSE_FEATURES))
        self.dense_std = np.ones(len(DENSE_FEATURES))

    # ---- features

    def _hashed(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        h = word_hashes(DocStats(text).words)
        grams = np.concatenate([h, mix64(h[:-1] ^ mix64(h[1:]))])  # unigrams, then bigrams
        if len(grams) == 0:
            return np.zeros(0, np.int64), np.zeros(0)
        buckets, counts = np.unique(grams % np.uint64(self.n_hash), return_counts=True)
        signs = np.where(mix64(buckets) & np.uint64(1), 1.0, -1.0)
        values = signs * np.log1p(counts)
        return buckets.astype(np.int64), values / np.linalg.norm(values)

    def _features(self, texts: Sequence[str]) -> _Features:
        hashed = [self._hashed(t) for t in texts]
        indptr = np.concatenate([[0], np.cumsum([len(i) for i, _ in hashed])]).astype(np.int64)
        indices = np.concatenate([i for i, _ in hashed]) if hashed else np.zeros(0, np.int64)
        values = np.concatenate([v for _, v in hashed]) if hashed else np.zeros(0)
        dense = np.array([dense_features(t) for t in texts], dtype=float).reshape(len(texts), len(DENSE_FEATURES))
        return _Features(indptr, indices, values, dense)

    def _logits(self, f: _Features) -> np.ndarray:
        per_entry = f.values * self.hash_weights[f.indices]
        row_of_entry = np.repeat(np.arange(len(f.indptr) - 1), np.diff(f.indptr))
        sparse = np.bincount(row_of_entry, weights=per_entry, minlength=len(f.indptr) - 1)
        dense = (f.dense - self.dense_mean) / self.dense_std
        return sparse + dense @ self.dense_weights + self.bias

    # ---- training / scoring

    def fit(self, texts: Sequence[str], labels: Sequence[float], *, progress: bool = True) -> "LogisticQualityScorer":
        """Fit on labels in [0, 1] (0/1 classes or soft targets; use `fit_grades` for 0-5)."""
        y = np.asarray(labels, dtype=float)
        if len(y) != len(texts) or len(y) == 0:
            raise ValueError(f"need one label per text, got {len(y)} labels for {len(texts)} texts")
        if y.min() < 0 or y.max() > 1:
            raise ValueError("labels must be in [0, 1]; for 0-5 grades use fit_grades")
        f = self._features(list(texts))
        self.dense_mean = f.dense.mean(axis=0)
        self.dense_std = f.dense.std(axis=0) + 1e-6
        rng = np.random.default_rng(self.seed)
        for _ in tqdm(range(self.epochs), desc="quality scorer", disable=not progress, leave=False):
            order = rng.permutation(len(y))
            for start in range(0, len(y), self.batch_size):
                rows = order[start:start + self.batch_size]
                batch = f.rows(rows)
                error = 1 / (1 + np.exp(-self._logits(batch))) - y[rows]  # d(log loss)/d(logit)
                row_of_entry = np.repeat(np.arange(len(rows)), np.diff(batch.indptr))
                grad_hash = np.bincount(batch.indices, weights=batch.values * error[row_of_entry],
                                        minlength=self.n_hash) / len(rows)
                dense = (batch.dense - self.dense_mean) / self.dense_std
                self.hash_weights -= self.learning_rate * (grad_hash + self.l2 * self.hash_weights)
                self.dense_weights -= self.learning_rate * (dense.T @ error / len(rows) + self.l2 * self.dense_weights)
                self.bias -= self.learning_rate * error.mean()
        return self

    def fit_grades(self, texts: Sequence[str], grades: Sequence[int], max_grade: int = 5,
                   *, progress: bool = True) -> "LogisticQualityScorer":
        """Fit on 0..max_grade grades (e.g. from `heuristic_grade`), as soft targets grade/max_grade."""
        return self.fit(texts, np.asarray(grades, dtype=float) / max_grade, progress=progress)

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """p(good) per text."""
        texts = list(texts)
        if not texts:
            return np.zeros(0)
        return 1 / (1 + np.exp(-self._logits(self._features(texts))))

    # ---- persistence

    def save(self, path) -> None:
        """Atomic JSON: hyperparameters, dense standardisation and the non-zero weights."""
        nonzero = np.flatnonzero(self.hash_weights)
        state = {
            "format": "mini_m3.LogisticQualityScorer", "version": 1,
            "config": {"n_hash": self.n_hash, "l2": self.l2, "learning_rate": self.learning_rate,
                       "epochs": self.epochs, "batch_size": self.batch_size, "seed": self.seed},
            "dense_features": list(DENSE_FEATURES),
            "dense_mean": self.dense_mean.tolist(), "dense_std": self.dense_std.tolist(),
            "dense_weights": self.dense_weights.tolist(), "bias": self.bias,
            "hash_indices": nonzero.tolist(), "hash_values": self.hash_weights[nonzero].tolist(),
        }
        atomic_write_text(path, json.dumps(state))

    @classmethod
    def load(cls, path) -> "LogisticQualityScorer":
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
        if state.get("format") != "mini_m3.LogisticQualityScorer" or state.get("version") != 1:
            raise ValueError(f"{path}: not a mini_m3 LogisticQualityScorer v1 file")
        if state["dense_features"] != list(DENSE_FEATURES):
            raise ValueError(f"{path}: saved with dense features {state['dense_features']}, expected {DENSE_FEATURES}")
        scorer = cls(**state["config"])
        scorer.dense_mean, scorer.dense_std = np.array(state["dense_mean"]), np.array(state["dense_std"])
        scorer.dense_weights, scorer.bias = np.array(state["dense_weights"]), float(state["bias"])
        scorer.hash_weights[np.array(state["hash_indices"], dtype=np.int64)] = state["hash_values"]
        return scorer


# ---- evaluation and selection -------------------------------------------------


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the ROC curve = P(score of a random positive > random negative), ties 1/2."""
    y, s = np.asarray(labels, dtype=bool), np.asarray(scores, dtype=float)
    n_pos, n_neg = y.sum(), (~y).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # 1-based ranks, ties get their average
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def evaluate(scorer: QualityScorer, texts: Sequence[str], labels: Sequence[int], threshold: float = 0.5) -> dict:
    """Held-out accuracy (score >= threshold means good) and AUC against 0/1 labels."""
    scores = scorer.score(list(texts))
    y = np.asarray(labels, dtype=bool)
    return {"accuracy": float(((scores >= threshold) == y).mean()), "auc": roc_auc(y, scores), "n": len(y)}


@dataclass
class QualitySelection:
    scores: np.ndarray  # one per input, in input order
    keep: np.ndarray  # bool mask, exactly round(keep_fraction * n) True
    threshold: float  # lowest kept score

    @property
    def kept_indices(self) -> np.ndarray:
        return np.flatnonzero(self.keep)


def select_by_quality(texts: Iterable[str], scorer: QualityScorer, keep_fraction: float, *, batch_size: int = 256,
                      progress: bool = True) -> QualitySelection:
    """Score every text in one streaming pass (only the scores stay in memory) and keep the
    top `keep_fraction` share: exactly round(keep_fraction * n) documents, ties broken in
    favour of the earlier document. A second pass over the source then keeps `keep[i]`."""
    if not 0.0 <= keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in [0, 1], got {keep_fraction}")
    batches = batched(tqdm(texts, desc="quality", unit="doc", disable=not progress), batch_size)
    scores = np.concatenate([np.zeros(0)] + [np.asarray(scorer.score(batch), dtype=float) for batch in batches])
    n_keep = int(round(keep_fraction * len(scores)))
    keep = np.zeros(len(scores), dtype=bool)
    keep[np.argsort(-scores, kind="stable")[:n_keep]] = True
    threshold = float(scores[keep].min()) if n_keep else float("inf")
    return QualitySelection(scores, keep, threshold)
