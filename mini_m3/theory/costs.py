"""Appendix A / §1.4 cost model: write and read compute of the three memory formats, and bank storage.

The paper prices one piece of knowledge, written down as a single reference of ``l_ref`` tokens, in
each of three formats (Eq. 1): *implicit* memory (model parameters: written by training, read for
free), *explicit* memory (sparse attention key-values: written by a short forward pass, read by
attention) and *external* information (plain text for RAG: not written at all, read by encoding the
text again every time). Knowledge used ``n`` times costs ``cost_write + n * cost_read``; the format
with the lowest total wins, and explicit memory wins on the "advantage interval" ``(n⁻, n⁺)``.

Everything here is a pure function of a :class:`~mini_m3.config.Memory3Config`, in FLOPs (one
multiply and one add count as two). The notebook ``notebooks/01_cost_of_memory_formats.ipynb``
divides by 1e12 to show TFLOPs, as the paper does.

Symbols: d = ``d_model``, d_h = ``head_dim``, H_kv = ``n_kv_heads``, W = ``mlp_width``,
n_vocab = ``vocab_size``, L = ``n_layers``, l_ref = ``reference_length``,
l_mem = ``memory_tokens_per_head``, l_chunk = ``chunk_length``, l_train = ``train_length``.
Like the paper, the QO projections are counted as 2d², which assumes d = H·d_h (true for every preset).

**L_mem, generalised.** The paper's L_mem is both the *number* of memory layers and the *depth* of the
deepest one, because its memory layers are layers 0..21. If the memory layers sit elsewhere (say in
the middle of the network, as the paper's §3.3 suggests), encoding a reference still has to run every
layer up to the deepest memory layer. So we use

* ``depth = max(memory_layers) + 1`` for the encoding passes of cost_write^exp (attention and MLP), and
* ``n_mem = len(memory_layers)`` for the sparsification passes of cost_write^exp and for cost_read^exp.

At the paper's shape both are 22 and the formulas are the paper's, term for term.

**Storage** (§3.3): :func:`memory_bank_bytes` gives the size of one reference's memory and of a bank of
them, at each compression step (dense → sparse → sparse + vector quantization).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mini_m3.config import Memory3Config

__all__ = [
    "FORMATS",
    "PAPER_KNOWLEDGE_BASE_REFERENCES",
    "PAPER_TRAIN_LENGTH",
    "PAPER_VQ_CODE_BYTES",
    "implicit_write_cost",
    "explicit_write_cost",
    "explicit_read_cost",
    "external_read_cost",
    "memory_format_costs",
    "total_cost",
    "advantage_interval",
    "cheapest_format",
    "memory_bank_bytes",
    "default_vq_code_bytes",
    "format_bytes",
]

#: The three formats, ordered from cheapest write / dearest read to dearest write / cheapest read.
#: Ties in :func:`cheapest_format` go to the earlier one.
FORMATS: tuple[str, ...] = ("external", "explicit", "implicit")

#: Size of the paper's knowledge base: 1.1e8 references of at most 128 tokens (§4.4, Table 17).
PAPER_KNOWLEDGE_BASE_REFERENCES = 1.1e8

#: Length of one pretraining sample (l_train) used by Appendix A.
PAPER_TRAIN_LENGTH = 2048

#: Bytes per vector-quantized 80-dim key or value ("OPQ20x80-Residual2x14-PQ8x10", §3.3).
PAPER_VQ_CODE_BYTES = 14


# --------------------------------------------------------------------------- helpers
def _memory_layer_counts(cfg: Memory3Config) -> tuple[int, int]:
    """(depth, n_mem): layers an encoding pass must run, and number of memory layers."""
    if not cfg.memory_layers:
        raise ValueError(
            f"config {cfg.name!r} has no memory layers (memory_layers=()), so explicit-memory costs are undefined")
    return max(cfg.memory_layers) + 1, len(cfg.memory_layers)


def _check_positive_length(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{name}={value!r}: must be a positive number of tokens")


# --------------------------------------------------------------------------- the four formulas
def implicit_write_cost(cfg: Memory3Config, train_length: int = PAPER_TRAIN_LENGTH) -> float:
    """cost_write^imp: the share of one training step that falls on one reference (FLOPs).

        3·2·[ L( l_ref(2d² + 2·d·d_h·H_kv + 3dW) + 2·l_ref·(l_train/2)·d ) + l_ref·n_vocab·d ]

    Terms per layer: QO projections (2d²), KV projections (2·d·d_h·H_kv), gated MLP (3dW), attention
    (each of the l_ref tokens attends on average to l_train/2 earlier tokens, for scores and for
    values: 2·(l_train/2)·d); plus the LM head. 2 = multiply + add; 3 = forward + backward (2×).
    Assumes one training step is enough to store the knowledge.
    """
    _check_positive_length("train_length", train_length)
    L, d, dh, hkv, W = cfg.n_layers, cfg.d_model, cfg.head_dim, cfg.n_kv_heads, cfg.mlp_width
    l_ref, n_vocab = cfg.reference_length, cfg.vocab_size
    per_layer = l_ref * (2 * d * d + 2 * d * dh * hkv + 3 * d * W) + 2 * l_ref * (train_length / 2) * d
    return float(3 * 2 * (L * per_layer + l_ref * n_vocab * d))


def explicit_write_cost(cfg: Memory3Config) -> float:
    """cost_write^exp: encode one reference and sparsify its key-values (FLOPs).

        2·[ D( l_ref(2d² + 2·d·d_h·H_kv) + 2·(l_ref²/2)·d )      attention layers 0..D-1
            + (D − 1)(l_ref·3dW)                                   MLPs below the deepest memory layer
            + L_mem(l_ref²·d) ]                                     one full l_ref×l_ref score matrix
                                                                    per memory layer (top-l_mem choice)

    with D = max(memory_layers) + 1 and L_mem = len(memory_layers). The paper writes L_mem for both;
    they coincide when the memory layers are the first ones (the paper's 0..21: D = L_mem = 22).
    """
    depth, n_mem = _memory_layer_counts(cfg)
    d, dh, hkv, W, l_ref = cfg.d_model, cfg.head_dim, cfg.n_kv_heads, cfg.mlp_width, cfg.reference_length
    attention_layers = depth * (l_ref * (2 * d * d + 2 * d * dh * hkv) + 2 * (l_ref ** 2 / 2) * d)
    mlp_layers = (depth - 1) * (l_ref * 3 * d * W)
    sparsification = n_mem * (l_ref ** 2 * d)
    return float(2 * (attention_layers + mlp_layers + sparsification))


def explicit_read_cost(cfg: Memory3Config) -> float:
    """cost_read^exp: one l_chunk-token chunk attends to one memory's l_mem tokens (FLOPs).

        2·L_mem · 2·l_chunk·l_mem·d

    Per memory layer: scores and weighted values (2·), each l_chunk × l_mem × d multiply-adds,
    times 2 for multiply + add. L_mem = len(memory_layers).
    """
    _, n_mem = _memory_layer_counts(cfg)
    return float(2 * n_mem * 2 * cfg.chunk_length * cfg.memory_tokens_per_head * cfg.d_model)


def external_read_cost(cfg: Memory3Config) -> float:
    """cost_read^ext (a lower bound): re-encode the reference text every time it is used (FLOPs).

        2·[ L( l_ref(2d² + 2·d·d_h·H_kv) + 2·l_ref(l_ref/2 + l_chunk)·d ) + (L − 1)(l_ref·3dW) ]

    The reference passes through all L layers; it attends only to itself (l_ref/2 tokens on average)
    and only one l_chunk-token chunk attends to it, so the true cost is higher. The last layer's MLP
    is not needed (only the keys and values of the reference are read), hence L − 1 MLPs.
    Appendix A.3 prints this bound as "cost_write ≥"; it is the read cost (cost_write^ext = 0).
    """
    L, d, dh, hkv, W = cfg.n_layers, cfg.d_model, cfg.head_dim, cfg.n_kv_heads, cfg.mlp_width
    l_ref, l_chunk = cfg.reference_length, cfg.chunk_length
    per_layer = l_ref * (2 * d * d + 2 * d * dh * hkv) + 2 * l_ref * (l_ref / 2 + l_chunk) * d
    return float(2 * (L * per_layer + (L - 1) * (l_ref * 3 * d * W)))


def memory_format_costs(cfg: Memory3Config, *, train_length: int = PAPER_TRAIN_LENGTH) -> dict[str, dict[str, float]]:
    """Write and read cost of one reference in each format, in FLOPs.

    Returns ``{"implicit": {"write", "read"}, "explicit": {...}, "external": {...}}``. The implicit
    read cost is the paper's lower bound 0; the external write cost is 0; the external read cost is
    a lower bound (see :func:`external_read_cost`).
    """
    return {
        "implicit": {"write": implicit_write_cost(cfg, train_length), "read": 0.0},
        "explicit": {"write": explicit_write_cost(cfg), "read": explicit_read_cost(cfg)},
        "external": {"write": 0.0, "read": external_read_cost(cfg)},
    }


# --------------------------------------------------------------------------- total cost, interval
def _as_uses(n_uses: Any) -> np.ndarray:
    n = np.asarray(n_uses, dtype=float)
    if np.any(~np.isfinite(n)) or np.any(n < 0):
        raise ValueError(f"n_uses must be finite and non-negative, got {n_uses!r}")
    return n


def total_cost(cfg: Memory3Config, n_uses: Any, fmt: str, **kw: Any) -> float | np.ndarray:
    """c(n) = cost_write + n · cost_read for one format, in FLOPs (Fig 4's curves).

    ``n_uses`` may be a number (returns a float) or an array (returns an array of the same shape).
    ``fmt`` is "implicit", "explicit" or "external"; ``kw`` is passed to :func:`memory_format_costs`.
    For "implicit" and "external" this is the paper's lower bound.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown memory format {fmt!r}; expected one of {', '.join(FORMATS)}")
    n = _as_uses(n_uses)
    c = memory_format_costs(cfg, **kw)[fmt]
    out = c["write"] + n * c["read"]
    return float(out) if out.ndim == 0 else out


def advantage_interval(cfg: Memory3Config, **kw: Any) -> tuple[float, float]:
    """(n⁻, n⁺): the usage counts between which explicit memory is the cheapest format.

        n⁻ = cost_write^exp / (cost_read^ext − cost_read^exp)          (explicit vs RAG)
        n⁺ = (cost_write^imp − cost_write^exp) / cost_read^exp         (explicit vs parameters)

    Raises ValueError if explicit memory is never cheaper than RAG (cost_read^ext ≤ cost_read^exp)
    or if the interval is empty (n⁻ ≥ n⁺). ``kw`` is passed to :func:`memory_format_costs`.
    """
    c = memory_format_costs(cfg, **kw)
    w_exp, r_exp = c["explicit"]["write"], c["explicit"]["read"]
    w_imp, r_ext = c["implicit"]["write"], c["external"]["read"]
    if r_ext <= r_exp:  # cannot happen for a valid config (L_mem <= L, l_mem <= l_ref); kept as a guard
        raise ValueError(
            f"config {cfg.name!r}: reading external text ({r_ext:.4g} FLOPs) is not dearer than reading an explicit "
            f"memory ({r_exp:.4g} FLOPs), so explicit memory never beats RAG; no advantage interval")
    n_minus = w_exp / (r_ext - r_exp)
    n_plus = (w_imp - w_exp) / r_exp
    if n_minus >= n_plus:
        raise ValueError(
            f"config {cfg.name!r}: the advantage interval is empty (n- = {n_minus:.4g} >= n+ = {n_plus:.4g}); "
            "explicit memory is never the cheapest format")
    return float(n_minus), float(n_plus)


def cheapest_format(cfg: Memory3Config, n_uses: Any, **kw: Any) -> str | np.ndarray:
    """The format with the lowest total cost c(n) at usage count ``n_uses``.

    Returns "external", "explicit" or "implicit" (an array of these if ``n_uses`` is an array). Ties
    (exactly at n⁻ or n⁺) go to the format with the lower write cost, in the order of ``FORMATS``.
    Uses the paper's lower bounds for the implicit and external costs, as Fig 4 does.
    """
    n = _as_uses(n_uses)
    costs = np.stack([np.broadcast_to(total_cost(cfg, n, f, **kw), n.shape) for f in FORMATS])
    picked = np.asarray(FORMATS, dtype=object)[np.argmin(costs, axis=0)]  # argmin: first wins ties
    return str(picked) if n.ndim == 0 else picked


# --------------------------------------------------------------------------- storage (§3.3)
def default_vq_code_bytes(head_dim: int) -> int:
    """Bytes per vector-quantized key or value vector when none is given.

    The paper's quantizer turns an 80-dim vector into 14 bytes, i.e. 1.4 bits per dimension. For
    another head dimension we keep 1.4 bits per dimension and round up to whole bytes:
    ``ceil(14 · head_dim / 80)`` (exactly 14 at head_dim 80; 12 at 64; 6 at 32; 3 at 16).
    """
    return math.ceil(PAPER_VQ_CODE_BYTES * head_dim / 80)


def memory_bank_bytes(cfg: Memory3Config, n_references: float, *, dtype_bytes: float = 2,
                      vq_code_bytes: float | None = None, dense_as_paper: bool = True) -> dict[str, Any]:
    """Bytes of explicit memory for one reference and for ``n_references`` of them.

    Per reference:

    * ``dense``     = L × 2 × H × l_ref × d_h × dtype_bytes — the paper's count, over all H *query*
      heads (as if there were no GQA). With ``dense_as_paper=False`` it is the GQA count instead.
    * ``dense_gqa`` = L × 2 × H_kv × l_ref × d_h × dtype_bytes — what a GQA model actually caches.
    * ``sparse``    = L_mem × 2 × |memory_heads| × l_mem × d_h × dtype_bytes.
    * ``vq``        = L_mem × 2 × |memory_heads| × l_mem × vq_code_bytes (one code per key or value
      vector; default :func:`default_vq_code_bytes`, 14 at d_h = 80).

    Returns ``{"n_references", "dtype_bytes", "vq_code_bytes",
    "per_reference": {"dense", "dense_gqa", "sparse", "vq"}, "total": {same keys},
    "sparsity_factor", "compression_rate", "overall_reduction"}``, where
    ``sparsity_factor = dense / sparse`` (= (L/L_mem)(H/|memory_heads|)(l_ref/l_mem) with the paper's
    count: 2·5·16 = 160 at paper-2.4b), ``compression_rate = sparse / vq`` (= d_h·dtype_bytes /
    vq_code_bytes, ≈ 11.43 at paper-2.4b) and ``overall_reduction = dense / vq``. The ratios are
    the same per reference and in total. Bytes are plain numbers; use :func:`format_bytes` to print.
    """
    if not isinstance(n_references, (int, float, np.integer, np.floating)) or isinstance(n_references, bool) \
            or not n_references >= 0:
        raise ValueError(f"n_references={n_references!r}: must be a non-negative number")
    if not dtype_bytes > 0:
        raise ValueError(f"dtype_bytes={dtype_bytes!r}: must be positive")
    if vq_code_bytes is None:
        vq_code_bytes = default_vq_code_bytes(cfg.head_dim)
    if not vq_code_bytes > 0:
        raise ValueError(f"vq_code_bytes={vq_code_bytes!r}: must be positive")
    if not cfg.memory_layers:
        raise ValueError(f"config {cfg.name!r} has no memory layers, so it stores no explicit memory")

    L, H, hkv, dh, l_ref = cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.reference_length
    n_mem, n_heads_mem, l_mem = len(cfg.memory_layers), len(cfg.memory_heads), cfg.memory_tokens_per_head
    dense_paper = L * 2 * H * l_ref * dh * dtype_bytes
    dense_gqa = L * 2 * hkv * l_ref * dh * dtype_bytes
    vectors = n_mem * 2 * n_heads_mem * l_mem  # key and value vectors kept per reference
    per_ref = {
        "dense": dense_paper if dense_as_paper else dense_gqa,
        "dense_gqa": dense_gqa,
        "sparse": vectors * dh * dtype_bytes,
        "vq": vectors * vq_code_bytes,
    }
    return {
        "n_references": n_references,
        "dtype_bytes": dtype_bytes,
        "vq_code_bytes": vq_code_bytes,
        "per_reference": per_ref,
        "total": {k: v * n_references for k, v in per_ref.items()},
        "sparsity_factor": per_ref["dense"] / per_ref["sparse"],
        "compression_rate": per_ref["sparse"] / per_ref["vq"],
        "overall_reduction": per_ref["dense"] / per_ref["vq"],
    }


_BINARY_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB")
_DECIMAL_UNITS = ("B", "kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB")


def format_bytes(n: float, binary: bool = True) -> str:
    """``1.23 TiB``-style string. ``binary=True`` uses powers of 1024 (the paper's "TB" are binary,
    2⁴⁰ bytes, per the spec's reading); ``binary=False`` uses powers of 1000 (kB, MB, …)."""
    if not isinstance(n, (int, float, np.integer, np.floating)) or isinstance(n, bool) \
            or not math.isfinite(n) or n < 0:
        raise ValueError(f"format_bytes needs a finite non-negative number of bytes, got {n!r}")
    base, units = (1024.0, _BINARY_UNITS) if binary else (1000.0, _DECIMAL_UNITS)
    value, i = float(n), 0
    while value >= base and i < len(units) - 1:
        value /= base
        i += 1
    return f"{int(value)} B" if i == 0 else f"{value:.2f} {units[i]}"
