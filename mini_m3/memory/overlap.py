"""Paper §4.3/§4.4, Eq. 6: the windowed longest-common-subsequence overlap and the leakage filter built on it.

A reference must not leak the text it is supposed to help predict. Eq. 6 measures how much of a reference `r`
appears, in order, inside a window of 2|r| + 1 items of a text `t`; training drops a pairing above 0.9 (§4.4), and
evaluation drops a reference above 2/3 (§4.3). Used by the retriever (`Retriever.search_with_leakage_filter`), the
training data (`train.retrieve_for_chunks`), the data pipeline's leakage rule and the held-out evaluation.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

TRAIN_LEAKAGE_THRESHOLD = 0.9  # §4.4: no training sequence is paired with a reference overlapping it > 90 %
EVAL_LEAKAGE_THRESHOLD = 2 / 3  # §4.3: at evaluation a reference overlapping the question > 2/3 is dropped

# -----------------------------------------------------------------------------
# Eq. 6: windowed LCS overlap


def _to_ids(t, r) -> tuple[np.ndarray, np.ndarray]:
    """Map two sequences of hashable items to int64 ids in a shared vocabulary.

    Strings become arrays of code points (one item per character); integer arrays/lists are used as
    they are (renumbered if negative); anything else goes through a dictionary.
    """
    if isinstance(t, str) and isinstance(r, str):
        as_codes = lambda s: np.frombuffer(s.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        return as_codes(t), as_codes(r)
    if not isinstance(t, str) and not isinstance(r, str):
        ta, ra = np.asarray(t), np.asarray(r)
        if ta.ndim == 1 and ra.ndim == 1 and ta.dtype.kind in "iub" and ra.dtype.kind in "iub":
            ta, ra = ta.astype(np.int64), ra.astype(np.int64)
            both = np.concatenate([ta, ra])
            if len(both) and both.min() < 0:  # keep negative ids free: -1 pads windows
                ids = np.unique(both, return_inverse=True)[1].reshape(-1)
                ta, ra = ids[: len(ta)], ids[len(ta) :]
            return ta, ra
    vocab: dict = {}
    to_ids = lambda seq: np.fromiter((vocab.setdefault(x, len(vocab)) for x in seq), dtype=np.int64)
    return to_ids(t), to_ids(r)


# LCS by bit-parallelism (Allison & Dix 1986; Hyyrö 2004). Keep a |r|-bit vector V, bit j = 1 when
# LCS(prefix of t, r[:j+1]) did not grow at column j; start with all ones, and for each item x of t:
#     U = V & match(x)          match(x): bit j set iff r[j] == x
#     V = (V + U) | (V - U)     the carry of + moves each "new match" to its leftmost free column
# then LCS = number of zero bits of V. Same result as the DP row update
# new[j] = max(new[j-1], old[j], old[j-1] + match[j]), with |r|/64 machine words instead of |r| cells.


def _lcs_few_windows(t: np.ndarray, r: np.ndarray, starts: np.ndarray, width: int) -> int:
    """Max LCS over windows t[a : a + width], a in starts, one window at a time with Python big ints."""
    masks: dict[int, int] = {}
    for j, x in enumerate(r.tolist()):
        masks[x] = masks.get(x, 0) | (1 << j)
    full, t_list, best = (1 << len(r)) - 1, t.tolist(), 0
    for a in starts.tolist():
        v = full
        for x in t_list[a : a + width]:
            u = v & masks.get(x, 0)
            v = ((v + u) | (v - u)) & full
        best = max(best, len(r) - v.bit_count())
    return best


def _lcs_many_windows(t: np.ndarray, r: np.ndarray, starts: np.ndarray, width: int) -> int:
    """Max LCS over windows t[a : a + width], a in starts, all windows at once in numpy.

    V is stored as (n_words, n_windows) uint64, so every step is a few SIMD ops across windows; the
    carry of V + U ripples through the n_words = ceil(|r| / 64) words.
    """
    n_r, n_words = len(r), (len(r) + 63) // 64
    symbols, r_sym = np.unique(r, return_inverse=True)
    match = np.zeros((len(symbols) + 1, n_words), dtype=np.uint64)  # last row: item not in r
    bit = np.uint64(1) << (np.arange(n_r) % 64).astype(np.uint64)
    np.bitwise_or.at(match, (r_sym.reshape(-1), np.arange(n_r) // 64), bit)
    padded = np.concatenate([t, np.full(width - 1, -1, dtype=t.dtype)])  # -1: never in r
    window_items = padded[np.arange(width)[:, None] + starts]  # (width, n_windows)
    sym = np.searchsorted(symbols, window_items)
    in_r = symbols[np.minimum(sym, len(symbols) - 1)] == window_items
    sym = np.where(in_r, sym, len(symbols))

    v = np.full((n_words, len(starts)), np.iinfo(np.uint64).max, dtype=np.uint64)
    top = np.uint64((1 << (n_r - 64 * (n_words - 1))) - 1)  # valid bits of the last word
    v[-1] &= top
    for k in range(min(width, len(t) - int(starts[0]))):  # later steps only see padding
        u = match[sym[k]].T & v  # (n_words, n_windows)
        carry = np.zeros(len(starts), dtype=np.uint64)
        for w in range(n_words):
            total = v[w] + u[w] + carry
            carry = ((total < v[w]) | ((total == v[w]) & (carry > 0))).astype(np.uint64)
            v[w] = total | (v[w] ^ u[w])  # V - U = V ^ U because U is a submask of V
        v[-1] &= top
    ones = np.unpackbits(v.view(np.uint8).reshape(n_words, len(starts), 8), axis=-1).sum(axis=(0, 2))
    return int(n_r - ones.min())


def _lcs_windowed(t: np.ndarray, r: np.ndarray, few: int | None = None) -> int:
    """max over windows t[a : a + 2|r| + 1] of LCS(window, r).

    Only windows that start on an item of r matter (an optimal subsequence starts at i1 with
    t[i1] in r, and [i1, i1 + 2|r|] contains it), which prunes most windows for real token ids;
    a window running past the end of t is inside the last full one, so starts are clipped there.
    Up to `few` windows (default 32 per 64 items of r, about where the costs cross) run one by
    one on Python ints, more run together in numpy.
    """
    width = 2 * len(r) + 1  # |i_N - i_1| <= 2|r| means at most 2|r| + 1 positions
    starts = np.flatnonzero(np.isin(t, r))
    if len(starts) == 0:
        return 0
    starts = np.unique(np.minimum(starts, max(len(t) - width, 0)))
    few = 32 * ((len(r) + 63) // 64) if few is None else few
    lcs = _lcs_few_windows if len(starts) <= few else _lcs_many_windows
    return lcs(t, r, starts, width)


def overlap(t: Sequence, r: Sequence) -> float:
    """Eq. 6: windowed longest-common-subsequence overlap of reference `r` with text `t`.

    overlap(t, r) = (1/|r|) max{N : i_1 < ... < i_N, j_1 < ... < j_N, |i_N - i_1| <= 2|r|,
    t[i_k] == r[j_k]}, i.e. the best LCS between r and any window of 2|r| + 1 items of t, as a
    fraction of |r|. The window keeps the value from growing with |t|.

    Parameters
    ----------
    t : sequence of hashable items, shape (|t|,)
        Token ids (list / int array) or a string (compared character by character).
    r : sequence of hashable items, shape (|r|,), non-empty

    Returns
    -------
    float in [0, 1]
    """
    if len(r) == 0:
        raise ValueError("overlap(t, r) is undefined for an empty reference r")
    t_ids, r_ids = _to_ids(t, r)
    return _lcs_windowed(t_ids, r_ids) / len(r_ids)


def overlap_upper_bound(t: Sequence, r: Sequence) -> float:
    """Cheap upper bound on `overlap(t, r)`: size of the multiset intersection of t and r over |r|."""
    if len(r) == 0:
        raise ValueError("overlap(t, r) is undefined for an empty reference r")
    t_ids, r_ids = _to_ids(t, r)
    return _multiset_intersection(t_ids, r_ids) / len(r_ids)


def _multiset_intersection(t: np.ndarray, r: np.ndarray) -> int:
    vocab, inverse = np.unique(np.concatenate([t, r]), return_inverse=True)
    t_counts = np.bincount(inverse[: len(t)], minlength=len(vocab))
    r_counts = np.bincount(inverse[len(t) :], minlength=len(vocab))
    return int(np.minimum(t_counts, r_counts).sum())


def exceeds_overlap(t: Sequence, r: Sequence, threshold: float) -> bool:
    """True iff overlap(t, r) > threshold; skips the exact LCS when the multiset bound already fails."""
    if len(r) == 0:
        raise ValueError("overlap(t, r) is undefined for an empty reference r")
    t_ids, r_ids = _to_ids(t, r)
    if _multiset_intersection(t_ids, r_ids) / len(r_ids) <= threshold:
        return False
    return _lcs_windowed(t_ids, r_ids) / len(r_ids) > threshold


LEAKAGE_DIRECTIONS = ("reference_in_query", "query_in_reference")


def check_direction(direction: str) -> None:
    """A clear error for a `direction` that `leakage_filter` does not know."""
    if direction not in LEAKAGE_DIRECTIONS:
        raise ValueError(f"direction must be one of {LEAKAGE_DIRECTIONS}, got {direction!r}")


def leakage_filter(
    query: Sequence,
    candidates: Sequence[Sequence],
    threshold: float,
    *,
    direction: str = "reference_in_query",
) -> list[bool]:
    """Which candidates survive the leakage filter (True = keep, i.e. overlap <= threshold).

    The paper drops a candidate whose overlap is strictly greater than the threshold
    (`TRAIN_LEAKAGE_THRESHOLD` = 0.9, `EVAL_LEAKAGE_THRESHOLD` = 2/3).

    Parameters
    ----------
    query : sequence, shape (|q|,)
    candidates : sequence of sequences, each shape (|c_i|,)
    threshold : float
    direction : "reference_in_query" (default) scores overlap(query, candidate): the share of the
        reference found in the query text, as for training (§4.4, t = training text). Use
        "query_in_reference" to score overlap(candidate, query): the share of the question found
        in the reference, which matches the evaluation numbers of §4.3 (a reference containing
        the question scores >= 80 %).
    """
    check_direction(direction)
    if direction == "reference_in_query":
        return [not exceeds_overlap(query, c, threshold) for c in candidates]
    return [not exceeds_overlap(c, query, threshold) for c in candidates]
