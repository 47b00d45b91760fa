"""Paper §3.3 (head-dimension vector quantization): compress each key/value head vector to a few bytes.

Memory³ stores every sparse key/value vector (head dim 80, bf16 = 160 bytes) as a 14-byte FAISS code
from the composite quantizer `OPQ20x80-Residual2x14-PQ8x10` (compression ≈ 11.4), decoded back to
floats when a memory is loaded. In current FAISS syntax that is "OPQ20_80,Residual2x14,PQ8x10":

* OPQ20_80     — a learned rotation that balances variance across 20 blocks (trained with a 20x8 PQ);
* Residual2x14 — coarse 2 x 14-bit multi-index (two k-means of 2^14 centroids on the two halves):
                 4 bytes of cell id;
* PQ8x10       — 8 sub-quantizers x 10 bits on the residual: 10 bytes.

`VectorQuantizer` wraps any FAISS `index_factory` string used as a standalone codec
(`sa_encode` / `sa_decode`), with seeded training, validation and (de)serialisation.
`GroupedQuantizer` keeps one such codec per group of a memory's vectors (keys / values x memory layer x
memory head): the paper does not say how its codebooks are shared, and separate ones reconstruct better at
the same bytes per vector (deviation 61). `load_quantizer` reads either.
"""
from __future__ import annotations

import json
import os
import struct
from contextlib import contextmanager
from pathlib import Path

import faiss
import numpy as np

from mini_m3.utils import atomic_write_bytes

PAPER_FACTORY = "OPQ20_80,Residual2x14,PQ8x10"
FORMAT = "mini_m3.vector_quantizer"
FORMAT_VERSION = 1
_MAGIC = b"MM3VQ\x00"
GROUPED_FORMAT = "mini_m3.grouped_quantizer"
_GROUPED_MAGIC = b"MM3GQ\x00"

# Presets for small head dims: a PQ with one byte per 4 dims (OPQ-rotated at 64), i.e. dim / 4 bytes,
# an 8x compression vs bf16 (dim * 2 bytes). Head dim 80 uses the paper's quantizer (14 B, 11.4x).
_PRESETS = {  # "np": no polysemous training, which makes faiss PQ training ~10x slower for nothing here
    16: "PQ4x8np",  # 4 B/vector, 8x
    32: "PQ8x8np",  # 8 B/vector, 8x
    64: "OPQ16_64,PQ16x8np",  # 16 B/vector, 8x
    80: PAPER_FACTORY,  # 14 B/vector, 11.4x (the paper's; needs >= 16384 training vectors)
}


def default_factory(dim: int) -> str:
    """FAISS factory string for head dim `dim`.

    Presets: 16 -> "PQ4x8np" (4 B, 8x vs bf16), 32 -> "PQ8x8np" (8 B, 8x),
    64 -> "OPQ16_64,PQ16x8np" (16 B, 8x), 80 -> the paper's "OPQ20_80,Residual2x14,PQ8x10"
    (14 B, 11.4x). Other multiples of 4 get the same 8x rule "PQ{dim/4}x8np". At d_h 16 an OPQ
    rotation measured no better than plain PQ on real memory K/V and trained ~10x slower.
    """
    if dim in _PRESETS:
        return _PRESETS[dim]
    if dim < 4 or dim % 4:
        raise ValueError(f"no default quantizer for dim={dim}: pass a factory string (dim must be a multiple of 4)")
    m = dim // 4
    return f"PQ{m}x8np"


# -----------------------------------------------------------------------------
# walking a composite faiss index


def _components(index) -> list:
    """The index and every sub-object that trains: vector transforms, sub-indexes, quantizers."""
    index = faiss.downcast_index(index)
    out = [index]
    if isinstance(index, faiss.IndexPreTransform):
        out += [faiss.downcast_VectorTransform(index.chain.at(i)) for i in range(index.chain.size())]
        out += _components(index.index)
    if isinstance(index, faiss.IndexIVF):
        out += _components(index.quantizer)
    if isinstance(index, faiss.Index2Layer):
        out += [index.q1] + _components(index.q1.quantizer)
    for name in ("pq", "rq", "lsq", "aq"):
        sub = getattr(index, name, None)
        if sub is not None and not isinstance(sub, faiss.Index):
            out.append(sub)
    return out


def _kmeans_sizes(index) -> list[int]:
    """Number of centroids of every k-means run when training `index`."""
    sizes = []
    for c in _components(index):
        if isinstance(c, faiss.OPQMatrix):
            sizes.append(256)  # OPQ learns its rotation with an internal M x 8-bit PQ
        elif isinstance(c, faiss.ProductQuantizer):
            sizes.append(int(c.ksub))
        elif isinstance(c, faiss.IndexIVF):
            sizes.append(int(c.nlist))
        elif isinstance(c, faiss.Level1Quantizer) and not isinstance(
                faiss.downcast_index(c.quantizer), faiss.MultiIndexQuantizer):  # multi-index counts its own PQ
            sizes.append(int(c.nlist))
        elif isinstance(c, faiss.AdditiveQuantizer):
            sizes.append(max(1 << int(c.nbits.at(i)) for i in range(c.nbits.size())))
    return sizes


def min_training_vectors(index) -> int:
    """Fewest training vectors `index` can be trained on: the size of its largest k-means.

    FAISS recommends 39x that (it prints a warning below), but trains from 1x.
    """
    return max(_kmeans_sizes(index), default=1)


@contextmanager
def seeded_training(index, seed: int = 0, opq_niter: int | None = None):
    """Context in which `index.train(x)` is seeded: `with seeded_training(index, seed): index.train(x)`.

    Seeds every k-means in `index` (FAISS defaults to a fixed 1234) and OPQ's initial rotation, and
    turns off PQ polysemous training, which index_factory enables for 8-bit PQs: it only reorders
    codes for Hamming-distance search, is useless here and can take minutes. `opq_niter`
    overrides the number of OPQ rotation updates (FAISS default 50).
    """
    keepalive = []  # OPQMatrix.pq is a borrowed pointer: keep our PQs alive during training
    for c in _components(index):
        cp = getattr(c, "cp", None)
        if isinstance(cp, faiss.ClusteringParameters):
            cp.seed = seed
        if hasattr(c, "do_polysemous_training"):
            c.do_polysemous_training = False
        if isinstance(c, faiss.OPQMatrix) and not c.is_trained:
            if opq_niter is not None:
                c.niter = opq_niter
            # OPQ starts from a random rotation drawn with seed 1234 and trains an internal
            # M x 8-bit PQ seeded 1234: draw both from our seed instead
            if c.d_out <= c.d_in:  # (FAISS pads the input when d_out > d_in; leave that case alone)
                q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((c.d_in, c.d_in)))
                faiss.copy_array_to_vector(np.ascontiguousarray(q[: c.d_out], dtype=np.float32).ravel(), c.A)
            pq = faiss.ProductQuantizer(c.d_out, c.M, 8)
            pq.cp.seed = seed
            keepalive.append(pq)
            c.pq = pq
    try:
        yield index
    finally:
        for c in _components(index):
            if isinstance(c, faiss.OPQMatrix):
                c.pq = None


def _as_float_matrix(x, dim: int, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise TypeError(f"{what} must be a floating-point array, got dtype {x.dtype}")
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"{what} must have shape (n, {dim}): expected dim {dim}, got shape {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{what} contains NaN or inf")
    return x


# -----------------------------------------------------------------------------
# the codec


class _Saved:
    """`save` / `load` for a class with `to_bytes` / `from_bytes`."""

    def save(self, path: str | os.PathLike) -> None:
        """Write `to_bytes()` atomically (temporary file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | os.PathLike):
        path = Path(path)
        try:
            return cls.from_bytes(path.read_bytes())
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e


def _error_stats(x: np.ndarray, x_hat: np.ndarray) -> dict[str, float]:
    sq_err = ((x - x_hat) ** 2).sum()
    norms = np.linalg.norm(x, axis=1) * np.linalg.norm(x_hat, axis=1)
    cosine = (x * x_hat).sum(1) / np.maximum(norms, 1e-30)
    return {"mse": float(sq_err / x.size), "relative_mse": float(sq_err / max((x**2).sum(), 1e-30)),
            "cosine": float(cosine.mean())}


class VectorQuantizer(_Saved):
    """A FAISS `index_factory` string used as a standalone vector codec.

    Parameters
    ----------
    factory : str
        e.g. "OPQ8_32,PQ8x8" or the paper's "OPQ20_80,Residual2x14,PQ8x10"; see `default_factory`.
    dim : int
        vector dimension (the attention head dim d_h).
    """

    def __init__(self, factory: str, dim: int):
        self.factory, self.dim = factory, int(dim)
        self.index = self._build()
        self.trained = False

    def _build(self) -> faiss.Index:
        try:
            index = faiss.index_factory(self.dim, self.factory)
            index.sa_code_size()  # fails for indexes that are not standalone codecs
        except RuntimeError as e:
            raise ValueError(f"faiss cannot build a codec from factory={self.factory!r} at dim={self.dim}: {e}") from e
        return index

    def __repr__(self) -> str:
        return (f"VectorQuantizer({self.factory!r}, dim={self.dim}, code_size={self.code_size}, "
                f"trained={self.trained})")

    @property
    def code_size(self) -> int:
        """Bytes per encoded vector."""
        return int(self.index.sa_code_size())

    @property
    def min_training_vectors(self) -> int:
        return min_training_vectors(self.index)

    def compression_ratio(self, source_bytes_per_element: float = 2) -> float:
        """Source bytes over code bytes; default source is bf16 (2 bytes/element)."""
        return self.dim * source_bytes_per_element / self.code_size

    def train(self, x: np.ndarray, *, seed: int = 0, max_train: int | None = None,
              opq_niter: int | None = None) -> "VectorQuantizer":
        """Train the codec from scratch on x (n, dim); same data + seed give the same codes.

        max_train caps the training set with a seeded random subsample. opq_niter overrides the
        number of OPQ rotation updates (FAISS default 50, each re-training the internal PQ; the
        dominant training cost). Returns self.
        """
        x = _as_float_matrix(x, self.dim, "training data")
        if max_train is not None and len(x) > max_train:
            rows = np.sort(np.random.default_rng(seed).choice(len(x), max_train, replace=False))
            x = x[rows]
        index = self._build()  # fresh, so retraining never starts from the previous solution
        need = min_training_vectors(index)
        if len(x) < need:
            raise ValueError(f"factory={self.factory!r} needs at least {need} training vectors (its largest "
                             f"k-means has {need} centroids; FAISS recommends {39 * need}), got {len(x)}")
        with seeded_training(index, seed, opq_niter):
            index.train(x)
        self.index, self.trained = index, True
        return self

    def _check_trained(self) -> None:
        if not self.trained:
            raise RuntimeError("quantizer was never trained: call train(x) first (or load a trained one)")

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Encode vectors.

        Parameters
        ----------
        x : float array, shape (n, dim)

        Returns
        -------
        np.ndarray, uint8, shape (n, code_size)
        """
        self._check_trained()
        x = _as_float_matrix(x, self.dim, "x")
        return self.index.sa_encode(x).reshape(len(x), self.code_size)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Decode codes.

        Parameters
        ----------
        codes : uint8 array, shape (n, code_size)

        Returns
        -------
        np.ndarray, float32, shape (n, dim)
        """
        self._check_trained()
        codes = np.asarray(codes)
        if codes.dtype != np.uint8 or codes.ndim != 2 or codes.shape[1] != self.code_size:
            raise ValueError(f"codes must be uint8 of shape (n, {self.code_size}): expected code size "
                             f"{self.code_size}, got dtype {codes.dtype} shape {codes.shape}")
        return self.index.sa_decode(np.ascontiguousarray(codes)).reshape(len(codes), self.dim)

    def reconstruction_error(self, x: np.ndarray) -> dict[str, float]:
        """Round-trip error on x (n, dim).

        Returns
        -------
        dict with `mse` (mean squared error per element), `relative_mse` (||x - x̂||² / ||x||²
        summed over all rows) and `cosine` (mean cosine similarity between x and x̂ rows).
        """
        x = _as_float_matrix(x, self.dim, "x").astype(np.float64)
        return _error_stats(x, self.decode(self.encode(x)).astype(np.float64))

    # -- serialisation --------------------------------------------------------------
    # layout: magic | uint32 little-endian header length | JSON header | faiss.serialize_index bytes

    def to_bytes(self) -> bytes:
        self._check_trained()
        header = json.dumps({"format": FORMAT, "version": FORMAT_VERSION, "factory": self.factory,
                             "dim": self.dim, "code_size": self.code_size}).encode("utf-8")
        payload = faiss.serialize_index(self.index).tobytes()
        return _MAGIC + struct.pack("<I", len(header)) + header + payload

    @classmethod
    def from_bytes(cls, data: bytes) -> "VectorQuantizer":
        data = bytes(data)
        start = len(_MAGIC) + 4
        if len(data) < start or not data.startswith(_MAGIC):
            raise ValueError("not a serialised VectorQuantizer (bad magic bytes)")
        (n_header,) = struct.unpack("<I", data[len(_MAGIC) : start])
        try:
            header = json.loads(data[start : start + n_header].decode("utf-8"))
            factory, dim, code_size, version = header["factory"], header["dim"], header["code_size"], header["version"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"corrupt VectorQuantizer header: {e!r}") from e
        if header.get("format") != FORMAT or version != FORMAT_VERSION:
            raise ValueError(f"unsupported VectorQuantizer format {header.get('format')!r} version {version!r} "
                             f"(this code reads {FORMAT!r} version {FORMAT_VERSION})")
        try:
            index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8, offset=start + n_header).copy())
        except RuntimeError as e:
            raise ValueError(f"corrupt VectorQuantizer payload: {e}") from e
        if index.d != dim or index.sa_code_size() != code_size or not index.is_trained:
            raise ValueError(f"VectorQuantizer payload does not match its header: index d={index.d}, "
                             f"code size {index.sa_code_size()}, trained={index.is_trained}; header says "
                             f"dim={dim}, code size {code_size}")
        vq = cls(factory, dim)
        vq.index, vq.trained = index, True
        return vq



# -----------------------------------------------------------------------------
# one codec per group of vectors


class GroupedQuantizer(_Saved):
    """One `VectorQuantizer` (same factory) per group of vectors; encodes (n, groups, dim) arrays.

    For memories the groups are the flattened (key/value, memory layer, memory head) axes: keys carry RoPE and
    values do not, and layer 0 sees bare embeddings, so their distributions differ and a shared codebook wastes
    its centroids. Same bytes per vector as one codec; the codebooks themselves are a fixed cost per bank.
    """

    def __init__(self, factory: str, dim: int, n_groups: int):
        if isinstance(n_groups, bool) or not isinstance(n_groups, int) or n_groups < 1:
            raise ValueError(f"n_groups must be a positive int, got {n_groups!r}")
        self.factory, self.dim, self.n_groups = factory, int(dim), n_groups
        self.parts = [VectorQuantizer(factory, dim) for _ in range(n_groups)]

    def __repr__(self) -> str:
        return (f"GroupedQuantizer({self.factory!r}, dim={self.dim}, n_groups={self.n_groups}, "
                f"code_size={self.code_size}, trained={self.trained})")

    @property
    def trained(self) -> bool:
        return all(q.trained for q in self.parts)

    @property
    def code_size(self) -> int:
        """Bytes per encoded vector (the same in every group)."""
        return self.parts[0].code_size

    @property
    def min_training_vectors(self) -> int:
        """Per group."""
        return self.parts[0].min_training_vectors

    def compression_ratio(self, source_bytes_per_element: float = 2) -> float:
        return self.parts[0].compression_ratio(source_bytes_per_element)

    def train(self, groups, *, seed: int = 0, max_train: int | None = None) -> "GroupedQuantizer":
        """Train group g on `groups[g]` (n_g, dim) with seed `seed + g`. Returns self."""
        groups = list(groups)
        if len(groups) != self.n_groups:
            raise ValueError(f"expected training data for {self.n_groups} groups, got {len(groups)}")
        for g, (q, x) in enumerate(zip(self.parts, groups)):
            try:
                q.train(x, seed=seed + g, max_train=max_train)
            except ValueError as e:
                raise ValueError(f"group {g}: {e}") from None
        return self

    def _check_grouped(self, x: np.ndarray, last: int, what: str) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != 3 or x.shape[1] != self.n_groups or x.shape[2] != last:
            raise ValueError(f"{what} must have shape (n, {self.n_groups}, {last}), got {x.shape}")
        return x

    def encode(self, x: np.ndarray) -> np.ndarray:
        """(n, n_groups, dim) float -> (n, n_groups, code_size) uint8."""
        x = self._check_grouped(x, self.dim, "x")
        return np.stack([q.encode(x[:, g]) for g, q in enumerate(self.parts)], 1)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """(n, n_groups, code_size) uint8 -> (n, n_groups, dim) float32."""
        codes = self._check_grouped(codes, self.code_size, "codes")
        return np.stack([q.decode(codes[:, g]) for g, q in enumerate(self.parts)], 1)

    def reconstruction_error(self, x: np.ndarray) -> dict[str, float]:
        """Round-trip error on x (n, n_groups, dim), over all groups (see `VectorQuantizer.reconstruction_error`)."""
        x = self._check_grouped(x, self.dim, "x").astype(np.float64)
        x_hat = self.decode(self.encode(x)).astype(np.float64)
        return _error_stats(x.reshape(-1, self.dim), x_hat.reshape(-1, self.dim))

    # layout: magic | uint32 header length | JSON header (with each part's byte length) | the parts' to_bytes()
    def to_bytes(self) -> bytes:
        if not self.trained:
            raise RuntimeError("quantizer was never trained: call train(groups) first (or load a trained one)")
        parts = [q.to_bytes() for q in self.parts]
        header = json.dumps({"format": GROUPED_FORMAT, "version": FORMAT_VERSION, "factory": self.factory,
                             "dim": self.dim, "code_size": self.code_size, "n_groups": self.n_groups,
                             "part_bytes": [len(b) for b in parts]}).encode("utf-8")
        return _GROUPED_MAGIC + struct.pack("<I", len(header)) + header + b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> "GroupedQuantizer":
        data = bytes(data)
        start = len(_GROUPED_MAGIC) + 4
        if len(data) < start or not data.startswith(_GROUPED_MAGIC):
            raise ValueError("not a serialised GroupedQuantizer (bad magic bytes)")
        (n_header,) = struct.unpack("<I", data[len(_GROUPED_MAGIC) : start])
        try:
            header = json.loads(data[start : start + n_header].decode("utf-8"))
            factory, dim, n_groups, sizes = header["factory"], header["dim"], header["n_groups"], header["part_bytes"]
            version = header["version"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"corrupt GroupedQuantizer header: {e!r}") from e
        if header.get("format") != GROUPED_FORMAT or version != FORMAT_VERSION:
            raise ValueError(f"unsupported GroupedQuantizer format {header.get('format')!r} version {version!r} "
                             f"(this code reads {GROUPED_FORMAT!r} version {FORMAT_VERSION})")
        if not isinstance(sizes, list) or len(sizes) != n_groups or start + n_header + sum(sizes) != len(data):
            raise ValueError("GroupedQuantizer payload does not match its header (truncated or padded file?)")
        gq = cls(factory, dim, n_groups)
        offset = start + n_header
        for g, size in enumerate(sizes):
            part = VectorQuantizer.from_bytes(data[offset : offset + size])
            if part.factory != factory or part.dim != dim:
                raise ValueError(f"GroupedQuantizer part {g} is {part!r}, header says {factory!r} at dim {dim}")
            gq.parts[g] = part
            offset += size
        return gq



def load_quantizer(path: str | os.PathLike) -> "VectorQuantizer | GroupedQuantizer":
    """A saved `VectorQuantizer` or `GroupedQuantizer`, told apart by the file's magic bytes."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(len(_GROUPED_MAGIC))
    return (GroupedQuantizer if head == _GROUPED_MAGIC else VectorQuantizer).load(path)

