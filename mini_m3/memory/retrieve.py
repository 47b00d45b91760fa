"""Paper §3.4 (retriever): dense retrieval of references, with the leakage filter of §4.3/§4.4 applied to the hits.

Memory³ retrieves, for every 64-token chunk, the references whose embedding is closest (cosine) to
the chunk's, using BGE-M3 [CLS] features and a FAISS index. This module provides

* `HashedNgramEmbedder` — a download-free stand-in for BGE-M3 (hashed word + character n-gram
  TF-IDF), and `SentenceTransformerEmbedder` for the real thing;
* `Retriever` — embedder + FAISS index (`"Flat"` exact, `"HNSW32"`, `"IVF{n},Flat"`,
  `"IVF{n},PQ{m}"`), with save/load and a leakage-filtered search (Eq. 6 lives in `mini_m3.memory.overlap`).
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
from mini_m3.memory.overlap import check_direction, leakage_filter
from mini_m3.memory.quantize import min_training_vectors, seeded_training

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
        check_direction(direction)
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
