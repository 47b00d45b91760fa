"""Paper §3.4 (retriever) and §4.3/§4.4 (leakage filter, Eq. 6): dense retrieval of references.

Memory³ retrieves, for every 64-token chunk, the references whose embedding is closest (cosine) to
the chunk's, using BGE-M3 [CLS] features and a FAISS index. This module provides

* `overlap` — Eq. 6, the windowed longest-common-subsequence overlap used to stop a reference from
  leaking the text it is supposed to help predict (train: drop > 0.9, eval: drop > 2/3);
* `HashedNgramEmbedder` — a download-free stand-in for BGE-M3 (hashed word + character n-gram
  TF-IDF), and `SentenceTransformerEmbedder` for the real thing;
* `Retriever` — embedder + FAISS index (`"Flat"` exact, `"HNSW32"`, `"IVF{n},Flat"`,
  `"IVF{n},PQ{m}"`), with save/load and a leakage-filtered search.
"""
from __future__ import annotations

import base64
import json
import os
import re
import zlib
from pathlib import Path
from typing import Callable, Protocol, Sequence, runtime_checkable

import faiss
import numpy as np
from tqdm.auto import tqdm

from mini_m3.utils import atomic_path, atomic_write_text
from mini_m3.memory.quantize import min_training_vectors, seeded_training

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


_DIRECTIONS = ("reference_in_query", "query_in_reference")


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
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be one of {_DIRECTIONS}, got {direction!r}")
    if direction == "reference_in_query":
        return [not exceeds_overlap(query, c, threshold) for c in candidates]
    return [not exceeds_overlap(c, query, threshold) for c in candidates]


# -----------------------------------------------------------------------------
# embedders


@runtime_checkable
class Embedder(Protocol):
    """What the retriever needs from a text embedder."""

    dim: int
    name: str

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """float32 (n, dim), L2-normalised rows (inner product = cosine)."""
        ...

    def state_dict(self) -> dict:
        """JSON-serialisable state from which `from_state_dict` rebuilds the embedder."""
        ...

    @classmethod
    def from_state_dict(cls, state: dict) -> "Embedder": ...


_WORD = re.compile(r"\w+")
_SPACES = re.compile(r"\s+")
_MASK64 = (1 << 64) - 1


def _mix64(h: np.ndarray) -> np.ndarray:
    """murmur3 finaliser on uint64 (wrap-around arithmetic), so buckets depend on every input bit."""
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


class HashedNgramEmbedder:
    """Hashed word + character n-gram TF-IDF, a download-free stand-in for BGE-M3.

    Features are words (`\\w+`) and character n-grams (lengths `ngram_range`, over the text with
    whitespace collapsed and a space added at both ends), hashed into `dim` buckets with a fixed
    hash (crc32 for words, a polynomial hash + murmur mixing for n-grams: never Python's salted
    `hash()`), weighted by sublinear tf (1 + log count) times idf, then L2-normalised. Unfitted,
    idf = 1. An empty (or all-whitespace, too-short) text has no features and maps to the zero
    vector, whose cosine with anything is 0.
    """

    def __init__(self, dim: int = 8192, ngram_range: tuple[int, int] = (3, 5), use_words: bool = True,
                 lowercase: bool = True, batch_size: int = 128):
        lo, hi = ngram_range
        if dim < 1 or not 1 <= lo <= hi:
            raise ValueError(f"need dim >= 1 and 1 <= ngram_range[0] <= ngram_range[1], got {dim}, {ngram_range}")
        self.dim, self.ngram_range, self.use_words, self.lowercase = int(dim), (int(lo), int(hi)), use_words, lowercase
        self.batch_size = batch_size
        self.idf = np.ones(self.dim, dtype=np.float32)
        self.n_fit_docs = 0

    @property
    def name(self) -> str:
        lo, hi = self.ngram_range
        return f"hashed-ngram-{self.dim}-c{lo}{hi}{'-w' if self.use_words else ''}"

    def _bucket(self, h: np.ndarray) -> np.ndarray:
        """Mixed 64-bit hash -> bucket in [0, dim), via the top 32 bits (multiply-shift, no slow modulo)."""
        return ((_mix64(h) >> np.uint64(32)) * np.uint64(self.dim)) >> np.uint64(32)

    def _features(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Hashed features of a batch: (doc index, bucket) pairs, one per feature occurrence."""
        texts = [_SPACES.sub(" ", s.lower() if self.lowercase else s) for s in texts]
        padded = [f" {s.strip()} " for s in texts]
        lengths = np.array([len(p) for p in padded])
        codes = np.frombuffer("".join(padded).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        doc_of_pos = np.repeat(np.arange(len(texts)), lengths)
        docs, buckets = [], []
        lo, hi = self.ngram_range
        h = np.zeros_like(codes)
        for n in range(1, hi + 1):  # rolling polynomial hash: h_n[i] = h_{n-1}[i] * B + c[i + n - 1]
            h = h[: len(codes) - n + 1] * np.uint64(1_000_003) + codes[n - 1 :]
            if n < lo:
                continue
            same_doc = doc_of_pos[: len(h)] == doc_of_pos[n - 1 :]  # n-gram does not cross texts
            docs.append(doc_of_pos[: len(h)][same_doc])
            buckets.append(self._bucket(h[same_doc] + np.uint64(n * 0x9E3779B97F4A7C15 & _MASK64)))
        if self.use_words:
            words = [_WORD.findall(s) for s in texts]
            n_words = [len(w) for w in words]
            crc = (zlib.crc32(w.encode("utf-8")) for ws in words for w in ws)
            docs.append(np.repeat(np.arange(len(texts)), n_words))
            buckets.append(self._bucket(np.fromiter(crc, dtype=np.uint64, count=sum(n_words))))
        return np.concatenate(docs).astype(np.int64), np.concatenate(buckets).astype(np.int64)

    def _counts(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Sparse feature counts of a batch: flat positions doc * dim + bucket (sorted) and their counts."""
        docs, buckets = self._features(texts)
        counts = np.bincount(docs * self.dim + buckets, minlength=len(texts) * self.dim)
        flat = np.flatnonzero(counts)
        return flat, counts[flat]

    def fit(self, texts: Sequence[str]) -> "HashedNgramEmbedder":
        """Learn smoothed idf = log((1 + N) / (1 + df)) + 1 from `texts` (N documents)."""
        texts = _check_texts(texts)
        df = np.zeros(self.dim, dtype=np.int64)
        for i in range(0, len(texts), self.batch_size):
            flat, _ = self._counts(texts[i : i + self.batch_size])
            df += np.bincount(flat % self.dim, minlength=self.dim)
        self.idf = (np.log((1 + len(texts)) / (1 + df)) + 1).astype(np.float32)
        self.n_fit_docs = len(texts)
        return self

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts.

        Returns
        -------
        np.ndarray, float32, shape (n, dim), rows of unit L2 norm (zero rows for featureless texts)
        """
        texts = _check_texts(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), self.batch_size):
            batch = texts[start : start + self.batch_size]
            flat, counts = self._counts(batch)
            docs, buckets = np.divmod(flat, self.dim)
            weights = (1 + np.log(counts)) * self.idf[buckets]  # sublinear tf: repeated n-grams saturate
            norms = np.sqrt(np.bincount(docs, weights=weights**2, minlength=len(batch)))
            weights /= np.maximum(norms[docs], 1e-12)  # featureless texts stay zero rows, no NaN
            out.reshape(-1)[start * self.dim + flat] = weights
        return out

    def state_dict(self) -> dict:
        return {"dim": self.dim, "ngram_range": list(self.ngram_range), "use_words": self.use_words,
                "lowercase": self.lowercase, "n_fit_docs": self.n_fit_docs,
                "idf_float32_base64": base64.b64encode(self.idf.astype("<f4").tobytes()).decode("ascii")}

    @classmethod
    def from_state_dict(cls, state: dict) -> "HashedNgramEmbedder":
        try:
            emb = cls(dim=state["dim"], ngram_range=tuple(state["ngram_range"]), use_words=state["use_words"],
                      lowercase=state["lowercase"])
            idf = np.frombuffer(base64.b64decode(state["idf_float32_base64"]), dtype="<f4").astype(np.float32)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"invalid HashedNgramEmbedder state: {e!r}") from e
        if idf.shape != (emb.dim,):
            raise ValueError(f"invalid HashedNgramEmbedder state: idf has {idf.size} values, expected dim={emb.dim}")
        emb.idf, emb.n_fit_docs = idf, int(state.get("n_fit_docs", 0))
        return emb


class SentenceTransformerEmbedder:
    """BGE-M3 (or any sentence-transformers model), as in the paper (§3.4).

    The paper embeds queries and references with BGE-M3 and uses the [CLS] output feature; the
    sentence-transformers config of BAAI/bge-m3 uses exactly that ([CLS] pooling). Embeddings are
    L2-normalised so inner product = cosine. Needs `pip install mini_m3[embed]` and downloads
    the model on first use.
    """

    def __init__(self, model_name: str = "BAAI/bge-m3", *, device: str | None = None, batch_size: int = 32):
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise ImportError("SentenceTransformerEmbedder needs sentence-transformers: "
                              "pip install mini_m3[embed]") from e
        self.model_name, self.batch_size = model_name, batch_size
        self.model = SentenceTransformer(model_name, device=device)
        self.dim = int(self.model.get_sentence_embedding_dimension())

    @property
    def name(self) -> str:
        return self.model_name

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        texts = _check_texts(texts)
        x = self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                              convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(x, dtype=np.float32).reshape(len(texts), self.dim)

    def state_dict(self) -> dict:
        return {"model_name": self.model_name, "batch_size": self.batch_size}

    @classmethod
    def from_state_dict(cls, state: dict) -> "SentenceTransformerEmbedder":
        return cls(state["model_name"], batch_size=state.get("batch_size", 32))


_EMBEDDERS = {"HashedNgramEmbedder": HashedNgramEmbedder, "SentenceTransformerEmbedder": SentenceTransformerEmbedder}


def _check_texts(texts) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("expected a sequence of strings, got a single str (wrap it in a list)")
    texts = list(texts)
    bad = next((type(s).__name__ for s in texts if not isinstance(s, str)), None)
    if bad is not None:
        raise TypeError(f"expected a sequence of strings, found an item of type {bad}")
    return texts


# -----------------------------------------------------------------------------
# retriever

RETRIEVER_FORMAT = "mini_m3.retriever"
RETRIEVER_FORMAT_VERSION = 1
_FILES = {"index": "index.faiss", "embedder": "embedder.json", "texts": "texts.json", "manifest": "manifest.json"}


def _write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False))


class Retriever:
    """Embedder + FAISS inner-product index over L2-normalised vectors (= cosine retrieval).

    Parameters
    ----------
    embedder : Embedder, default `HashedNgramEmbedder()`
    index_factory : str
        FAISS factory string: "Flat" (exact), "HNSW32", "IVF{n},Flat", "IVF{n},PQ{m}", ...
    nprobe : int
        IVF lists visited per query.
    ef_search : int
        HNSW candidate-list size at search time (raised to k when smaller).
    batch_size : int
        texts embedded per batch when indexing.
    """

    def __init__(self, embedder: Embedder | None = None, index_factory: str = "Flat", *, nprobe: int = 8,
                 ef_search: int = 64, batch_size: int = 1024):
        self.embedder = embedder if embedder is not None else HashedNgramEmbedder()
        self.index_factory, self.nprobe, self.ef_search, self.batch_size = index_factory, nprobe, ef_search, batch_size
        self.index: faiss.Index | None = None
        self.texts: list[str] = []  # kept for the leakage filter (overlap needs the reference text)

    def __len__(self) -> int:
        return 0 if self.index is None else int(self.index.ntotal)

    def _new_index(self) -> faiss.Index:
        try:
            return faiss.index_factory(self.embedder.dim, self.index_factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            raise ValueError(f"faiss cannot build index_factory={self.index_factory!r} "
                             f"for dim={self.embedder.dim}: {e}") from e

    def _embed(self, texts: list[str], progress: bool, desc: str = "embedding") -> np.ndarray:
        out = np.empty((len(texts), self.embedder.dim), dtype=np.float32)
        with tqdm(total=len(texts), desc=desc, disable=not progress, unit="text") as bar:
            for i in range(0, len(texts), self.batch_size):
                batch = texts[i : i + self.batch_size]
                out[i : i + len(batch)] = self.embedder.embed(batch)
                bar.update(len(batch))
        return out

    def fit(self, texts: Sequence[str], *, progress: bool = False) -> "Retriever":
        """Fit the embedder (if it has `fit`), build and train the index, and index `texts`.

        Replaces any previous index. Returns self.
        """
        texts = _check_texts(texts)
        if not texts:
            raise ValueError("fit needs at least one reference text")
        if hasattr(self.embedder, "fit"):
            self.embedder.fit(texts)
        x = self._embed(texts, progress)
        index = self._new_index()
        if not index.is_trained:
            need = min_training_vectors(index)
            if len(x) < need:
                raise ValueError(f"index_factory={self.index_factory!r} needs at least {need} training vectors "
                                 f"(its largest k-means has {need} centroids), got {len(x)} texts; "
                                 "use fewer IVF lists / PQ bits or more references")
            with seeded_training(index, seed=0):  # deterministic IVF / PQ k-means, no polysemous pass
                index.train(x)
        index.add(x)
        self.index, self.texts = index, texts
        return self

    def add(self, texts: Sequence[str], *, progress: bool = False) -> "Retriever":
        """Append references; their ids continue after the existing ones. Returns self."""
        texts = _check_texts(texts)
        if self.index is None:
            index = self._new_index()
            if not index.is_trained:
                raise RuntimeError(f"index_factory={self.index_factory!r} needs training: call fit(texts) first")
            self.index = index
        if texts:
            self.index.add(self._embed(texts, progress))
            self.texts.extend(texts)
        return self

    def _set_search_params(self, k: int) -> None:
        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None:
            ivf.nprobe = min(self.nprobe, ivf.nlist)
        inner = faiss.downcast_index(self.index)
        if hasattr(inner, "hnsw"):
            inner.hnsw.efSearch = max(self.ef_search, k)

    def _check_k(self, k: int) -> None:
        if self.index is None or self.index.ntotal == 0:
            raise RuntimeError("the retriever is empty: call fit(texts) or add(texts) before searching")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if k > self.index.ntotal:
            raise ValueError(f"k={k} is larger than the number of indexed references ({self.index.ntotal})")

    def search(self, texts: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k references of each query by cosine similarity, best first.

        Returns
        -------
        scores : np.ndarray, float32, shape (n, k)
        ids : np.ndarray, int64, shape (n, k); -1 (score -inf) where an approximate index found
            fewer than k candidates
        """
        texts = _check_texts(texts)
        self._check_k(k)
        self._set_search_params(k)
        x = self._embed(texts, progress=False) if texts else np.zeros((0, self.embedder.dim), np.float32)
        scores, ids = self.index.search(x, k)
        scores = scores.astype(np.float32)
        scores[ids < 0] = -np.inf
        return scores, ids.astype(np.int64)

    def search_with_leakage_filter(
        self,
        query_texts: Sequence[str],
        k: int,
        threshold: float,
        tokenize: Callable[[str], Sequence[int]] | None = None,
        *,
        direction: str = "reference_in_query",
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k references per query after dropping those whose Eq. 6 overlap exceeds `threshold`.

        Searches k + extra candidates (doubling until k survive or the index is exhausted).
        Overlap is measured on characters, or on `tokenize(text)` ids when given; see
        `leakage_filter` for `direction`.

        Returns
        -------
        scores : float32 (n, k), ids : int64 (n, k); padded with -inf / -1 when fewer than k
            references survive the filter
        """
        query_texts = _check_texts(query_texts)
        self._check_k(k)
        if direction not in _DIRECTIONS:
            raise ValueError(f"direction must be one of {_DIRECTIONS}, got {direction!r}")
        seq = tokenize if tokenize is not None else (lambda s: s)
        out_scores = np.full((len(query_texts), k), -np.inf, dtype=np.float32)
        out_ids = np.full((len(query_texts), k), -1, dtype=np.int64)
        pending = list(range(len(query_texts)))
        fetch = min(len(self), max(2 * k, k + 16))
        query_seqs = [seq(q) for q in query_texts]
        while pending:
            scores, ids = self.search([query_texts[q] for q in pending], fetch)
            still = []
            for row, q in enumerate(pending):
                cand = [(s, i) for s, i in zip(scores[row], ids[row]) if i >= 0]
                keep = leakage_filter(query_seqs[q], [seq(self.texts[i]) for _, i in cand], threshold,
                                      direction=direction)
                kept = [c for c, ok in zip(cand, keep) if ok][:k]
                if len(kept) < k and fetch < len(self):
                    still.append(q)
                    continue
                for j, (s, i) in enumerate(kept):
                    out_scores[q, j], out_ids[q, j] = s, i
            pending, fetch = still, min(len(self), 2 * fetch)
        return out_scores, out_ids

    # -- persistence ----------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> None:
        """Write index.faiss, embedder.json, texts.json and manifest.json (each atomically)."""
        if self.index is None:
            raise RuntimeError("nothing to save: call fit(texts) first")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(directory / _FILES["index"]) as tmp:
            faiss.write_index(self.index, tmp)
        _write_json(directory / _FILES["embedder"], {"class": type(self.embedder).__name__,
                                                     "state": self.embedder.state_dict()})
        _write_json(directory / _FILES["texts"], self.texts)
        _write_json(directory / _FILES["manifest"], {  # written last: its presence marks a complete save
            "format": RETRIEVER_FORMAT, "version": RETRIEVER_FORMAT_VERSION, "index_factory": self.index_factory,
            "nprobe": self.nprobe, "ef_search": self.ef_search, "batch_size": self.batch_size,
            "dim": self.embedder.dim, "ntotal": len(self), "embedder_name": self.embedder.name, "files": _FILES})

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Retriever":
        """Load a retriever written by `save`, checking that its parts agree."""
        directory = Path(directory)

        def read_json(key):
            path = directory / _FILES[key]
            try:
                with open(path, encoding="utf-8") as f:
                    return json.load(f)
            except FileNotFoundError:
                raise ValueError(f"{path} is missing: not a saved Retriever directory") from None
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path} is corrupt (not valid JSON): {e}") from e

        manifest = read_json("manifest")
        if not isinstance(manifest, dict) or manifest.get("format") != RETRIEVER_FORMAT:
            raise ValueError(f"{directory / _FILES['manifest']} is not a {RETRIEVER_FORMAT} manifest")
        if manifest.get("version") != RETRIEVER_FORMAT_VERSION:
            raise ValueError(f"unsupported retriever format version {manifest.get('version')!r} "
                             f"(this code reads version {RETRIEVER_FORMAT_VERSION})")
        missing = {"index_factory", "nprobe", "ef_search", "dim", "ntotal"} - manifest.keys()
        if missing:
            raise ValueError(f"retriever manifest lacks keys {sorted(missing)}")
        emb_json = read_json("embedder")
        if not isinstance(emb_json, dict) or emb_json.get("class") not in _EMBEDDERS:
            raise ValueError(f"unknown embedder in {directory / _FILES['embedder']}; "
                             f"expected one of {sorted(_EMBEDDERS)}")
        embedder = _EMBEDDERS[emb_json["class"]].from_state_dict(emb_json["state"])
        texts = read_json("texts")
        try:
            index = faiss.read_index(str(directory / _FILES["index"]))
        except RuntimeError as e:
            raise ValueError(f"cannot read faiss index {directory / _FILES['index']}: {e}") from e
        if not (index.d == embedder.dim == manifest["dim"]):
            raise ValueError(f"dimension mismatch: index d={index.d}, embedder dim={embedder.dim}, "
                             f"manifest dim={manifest['dim']}")
        if not (index.ntotal == len(texts) == manifest["ntotal"]):
            raise ValueError(f"size mismatch: index has {index.ntotal} vectors, texts.json has {len(texts)} texts, "
                             f"manifest says {manifest['ntotal']}")
        ret = cls(embedder, manifest["index_factory"], nprobe=manifest["nprobe"], ef_search=manifest["ef_search"],
                  batch_size=manifest.get("batch_size", 1024))
        ret.index, ret.texts = index, list(texts)
        return ret
