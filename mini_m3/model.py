"""§3.1–3.5 the Memory³ network: a Llama-style decoder whose attention also reads explicit memories (Eq. 4).

One readable file, in the spirit of nanoGPT's model.py:

- RMSNorm, RoPE, grouped-query attention, gated SiLU MLP, no biases (§3.2 leaves these open; Llama's choices).
- **Eq. 4**: in the *memory heads* of the *memory layers*, the keys/values of the explicit memories retrieved
  for a chunk are joined in front of the context keys/values under one softmax. No new parameters.
- **Modified BOS** (§3.5): the "<s>Reference:" prefix sits in front of the context in every head of every
  layer. Its K/V depend only on the weights, so they are computed once and cached.
- **Parallel positions** (design.md): prefix at 0..p-1, every memory in the shared interval p..p+127 (keys
  are stored after RoPE, so they carry those positions), context from p+128 on.
- **Chunkwise reading**: a prompt of many 64-token chunks, each with its own memories, goes through one
  forward with no per-chunk loop. Per layer: one causal SDPA call (`is_causal`) over prefix + context, and
  one batched (chunks x 64 queries x M slots) attention over each chunk's own memories; the two are one
  softmax, merged through the memories' log-sum-exp (`Attention._attend_prefill`). `prefill_chunk_loop`
  is the per-chunk reference used by the tests.
- **Decoding**: the KV cache is a preallocated buffer per layer, [prefix | memory slots | context], written
  in place; a step attends to one view of it (`_LayerCache`).
- Reference path: a dense mask over the whole key axis and a plain softmax. `impl="plain"` selects it, and
  it is used automatically whenever a hook on q/k/v, scores or patterns is active (TransformerLens-style).

Key layout seen by hooks (the last axis of `hook_attn_scores` / `hook_pattern`):
    [ prefix (p) | memory slots (C·M, memory layers only) | cached context | new context ]
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import Memory3Config

HookFn = Callable[[torch.Tensor, "HookPoint"], "torch.Tensor | None"]


# ----------------------------------------------------------------------------------------------- hooks
class HookPoint(nn.Module):
    """Identity module with a name; functions added to it may read or replace the tensor passing through."""

    def __init__(self) -> None:
        super().__init__()
        self.name = ""
        self.fns: list[HookFn] = []

    def add_hook(self, fn: HookFn) -> None:
        self.fns.append(fn)

    def remove_hooks(self) -> None:
        self.fns.clear()

    @property
    def active(self) -> bool:
        return bool(self.fns)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fn in self.fns:
            out = fn(x, self)
            if out is not None:
                x = out
        return x


# ----------------------------------------------------------------------------------------------- inputs
@dataclass
class MemoryKV:
    """Explicit memories as one attention call reads them.

    keys, values: (B, C, L_mem, H_mem, M, d_h) — C chunks, M = memory slots per chunk (memories x tokens),
                  keys already rotated by RoPE at their reference positions.
    mask:         (B, C, M) or (B, C, L_mem, H_mem, M) bool, True where a slot holds a real token; None = all.
    Query t of a forward call reads chunk `query_chunks[t]` (default: t // chunk_length, clipped to C-1).
    """

    keys: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor | None = None

    @property
    def n_chunks(self) -> int:
        return self.keys.shape[1]

    @property
    def slots(self) -> int:
        return self.keys.shape[-2]

    def validate(self, cfg: Memory3Config, batch: int, dtype: torch.dtype) -> None:
        want = (batch, "C", len(cfg.memory_layers), len(cfg.memory_heads), "M", cfg.head_dim)
        for name, t in (("keys", self.keys), ("values", self.values)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"MemoryKV.{name} must be a torch.Tensor, got {type(t).__name__}")
            ok = t.dim() == 6 and t.shape[0] == batch and tuple(t.shape[2:4]) == want[2:4] and t.shape[5] == want[5]
            if not ok:
                raise ValueError(f"MemoryKV.{name} has shape {tuple(t.shape)}; expected {want} "
                                 f"(batch, chunks, memory layers, memory heads, slots, head_dim)")
            if t.dtype != dtype:
                raise ValueError(f"MemoryKV.{name} has dtype {t.dtype}; the model runs in {dtype}")
        if self.keys.shape != self.values.shape:
            raise ValueError(f"MemoryKV keys {tuple(self.keys.shape)} and values {tuple(self.values.shape)} differ")
        if self.mask is not None:
            B, C, Lm, Hm, M, _ = self.keys.shape
            if self.mask.dtype != torch.bool or tuple(self.mask.shape) not in ((B, C, M), (B, C, Lm, Hm, M)):
                raise ValueError(f"MemoryKV.mask must be bool of shape {(B, C, M)} or {(B, C, Lm, Hm, M)}, "
                                 f"got {self.mask.dtype} {tuple(self.mask.shape)}")

    def full_mask(self) -> torch.Tensor:
        B, C, Lm, Hm, M, _ = self.keys.shape
        if self.mask is None:
            return torch.ones(B, C, Lm, Hm, M, dtype=torch.bool, device=self.keys.device)
        if self.mask.dim() == 3:
            return self.mask[:, :, None, None, :].expand(B, C, Lm, Hm, M)
        return self.mask


@dataclass
class KVCache:
    """Context keys (after RoPE) and values per layer, for decoding. The prefix lives in the model.

    keys[l], values[l]: (B, H_kv, S, d_h). Caches made by the model without gradients are views of a
    preallocated per-layer buffer that later calls write into in place (grown by doubling); a cache that was
    extended once is copied, not overwritten, if it is extended again (so branching from it stays safe).
    """

    keys: list[torch.Tensor | None]
    values: list[torch.Tensor | None]
    context_mask: torch.Tensor | None = None  # (B, S) True = real token (left-padded batches)
    _layers: list["_LayerCache"] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def empty(cls, n_layers: int) -> "KVCache":
        return cls([None] * n_layers, [None] * n_layers)

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]


_UNSET = object()


class _LayerCache:
    """One layer's decoding buffer, laid out [prefix (p) | memory slots (n_slots) | context (n) | free], so
    that a decoding step attends to one view of it. The slots hold the memories of the latest call; they
    are rewritten only when the MemoryKV object (or the chunk each row reads) changes."""

    def __init__(self, prefix, batch: int, n_slots: int, capacity: int) -> None:
        pk, pv = prefix  # (1, H_kv, p, d_h)
        self.p, self.n_slots, self.n = pk.shape[2], n_slots, 0
        shape = (batch, pk.shape[1], self.p + n_slots + capacity, pk.shape[3])
        self.k, self.v = pk.new_zeros(shape), pv.new_zeros(shape)  # zeros: masked slots must stay finite
        self.prefix = None
        self.set_prefix(prefix)
        self.slots_of: object = _UNSET  # (memory, its tensors, chunks) the slots hold; None = no memory
        self.slot_off: torch.Tensor | None = None  # (B, H, n_slots) True = hidden slot; None = all visible

    @property
    def start(self) -> int:
        return self.p + self.n_slots

    @classmethod
    def for_call(cls, cache: KVCache | None, layer: int, prefix, batch: int, T: int, n_slots: int,
                 limit: int) -> "_LayerCache":
        """The buffer this call appends T tokens to: the cache's own when this cache is its latest state and
        there is room, else a fresh copy (capacity doubles, up to `limit` context tokens)."""
        past_k = None if cache is None else cache.keys[layer]
        S = 0 if past_k is None else past_k.shape[2]
        old = None if cache is None or cache._layers is None else cache._layers[layer]
        if old is not None and S > 0 and old.n == S and old.k.shape[0] == batch and n_slots <= old.n_slots \
                and old.start + S + T <= old.k.shape[2] and past_k.data_ptr() == old.k[:, :, old.start:].data_ptr() \
                and cache.values[layer].data_ptr() == old.v[:, :, old.start:].data_ptr() \
                and (torch.is_inference_mode_enabled() or not old.k.is_inference()):
            old.set_prefix(prefix)
            return old
        slots = max(n_slots, 0 if old is None else old.n_slots)
        new = cls(prefix, batch, slots, min(limit, max(2 * (S + T), S + T + 64)))
        if S:
            new.k[:, :, new.start:new.start + S] = past_k
            new.v[:, :, new.start:new.start + S] = cache.values[layer]
            new.n = S
        return new

    def set_prefix(self, prefix) -> None:
        if self.prefix is not prefix[0]:  # the model's prefix K/V changed (new weights)
            self.k[:, :, :self.p] = prefix[0]
            self.v[:, :, :self.p] = prefix[1]
            self.prefix = prefix[0]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        at = self.start + self.n
        self.k[:, :, at:at + k.shape[2]] = k
        self.v[:, :, at:at + k.shape[2]] = v
        self.n += k.shape[2]

    def context(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[:, :, self.start:self.start + self.n], self.v[:, :, self.start:self.start + self.n]

    def full(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[:, :, :self.start + self.n], self.v[:, :, :self.start + self.n]

    def load_memory(self, attn: "Attention", memory: MemoryKV | None, chunks: torch.Tensor | None):
        """Write the slots `attn` reads in this call if they changed (chunks: (B,) chunk of each row, None =
        the only chunk); returns which slots each query head must not see, (B, H, n_slots), or None."""
        if self.n_slots == 0:
            return None
        key = None if memory is None else (memory, memory.keys, memory.values, memory.mask,
                                            None if chunks is None else tuple(chunks.tolist()))
        old = self.slots_of
        if old is not _UNSET and (key is None) == (old is None) and (
                key is None or (all(a is b for a, b in zip(key[:4], old[:4])) and key[4] == old[4])):
            return self.slot_off
        B, Hkv = self.k.shape[:2]
        ok = torch.zeros(B, Hkv, self.n_slots, dtype=torch.bool, device=self.k.device)
        if memory is not None:
            mk, mv, valid = attn._row_slots(memory, chunks)  # (B, H_kv, M, d_h)
            M = mk.shape[2]
            self.k[:, :, self.p:self.p + M] = mk
            self.v[:, :, self.p:self.p + M] = mv
            ok[:, :, :M] = valid
        self.slots_of = key
        self.slot_off = None if bool(ok.all()) else ~ok.repeat_interleave(attn.cfg.n_query_groups, 1)
        return self.slot_off


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, vocab)
    loss: torch.Tensor | None = None
    cache: KVCache | None = None
    hidden: torch.Tensor | None = None  # final hidden state (B, T, d), before the LM head


# ----------------------------------------------------------------------------------------------- layers
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(head_dim: int, n_positions: int, base: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables of shape (n_positions, head_dim/2)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(n_positions, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]). x: (B, h, T, d_h); cos/sin broadcastable to (B, 1, T, d_h/2).
    One complex product: (x1 + i x2)(cos + i sin) = (x1 cos - x2 sin) + i (x1 sin + x2 cos)."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, h, T, d_h/2)
    return torch.view_as_real(xc * torch.complex(cos, sin)).flatten(-2).type_as(x)


NO_WEIGHT = -1e4  # log-sum-exp standing for "no memory slot": exp(-1e4) is 0 next to any real score


class Attention(nn.Module):
    """GQA self-attention; in a memory layer its memory heads also attend to explicit memories (Eq. 4)."""

    def __init__(self, cfg: Memory3Config, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.is_memory_layer = layer in cfg.memory_layers
        H, Hkv, dh, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
        self.wq = nn.Linear(d, H * dh, bias=False)
        self.wk = nn.Linear(d, Hkv * dh, bias=False)
        self.wv = nn.Linear(d, Hkv * dh, bias=False)
        self.wo = nn.Linear(H * dh, d, bias=False)
        self.hook_q = HookPoint()  # (B, H, T, d_h) after RoPE
        self.hook_k = HookPoint()  # (B, H_kv, S, d_h) all keys of the call, after RoPE
        self.hook_v = HookPoint()  # (B, H_kv, S, d_h)
        self.hook_attn_scores = HookPoint()  # (B, H, T, S) pre-softmax, masked entries = -inf
        self.hook_pattern = HookPoint()  # (B, H, T, S) softmax
        self.hook_z = HookPoint()  # (B, H, T, d_h) each head's output before W_O
        self.hook_result = HookPoint()  # (B, T, H, d) each head's contribution to the residual stream

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, d) -> q (B, H, T, d_h), k, v (B, H_kv, T, d_h), before RoPE."""
        B, T, _ = x.shape
        dh = self.cfg.head_dim
        q = self.wq(x).view(B, T, -1, dh).transpose(1, 2)
        k = self.wk(x).view(B, T, -1, dh).transpose(1, 2)
        v = self.wv(x).view(B, T, -1, dh).transpose(1, 2)
        return q, k, v

    def forward(self, x, cos, sin, *, prefix_kv, past_kv, context_mask, memory, query_chunks,
                impl: str, collect: dict | None = None, layer_cache: "_LayerCache | None" = None):
        cfg = self.cfg
        B, T, _ = x.shape
        H = cfg.n_heads
        q_raw, k_raw, v = self.project(x)
        if collect is not None:  # reference encoding needs the un-rotated q/k for token selection (§3.3)
            collect.update(q_raw=q_raw, k_raw=k_raw, v=v)
        q, k = apply_rope(q_raw, cos, sin), apply_rope(k_raw, cos, sin)
        if collect is not None:
            collect["k"] = k
        if layer_cache is not None:
            layer_cache.append(k, v)  # in place; past_kv stays a view of the old length
        if not self.is_memory_layer:
            memory = None
        reads = memory is not None and memory.slots > 0
        hooked = any(h.active for h in (self.hook_q, self.hook_k, self.hook_v, self.hook_attn_scores,
                                         self.hook_pattern))
        chunks, per_row = None, True  # with cached context, each row must read one chunk (None = the only one)
        if reads and past_kv is not None and memory.n_chunks > 1:
            chunks = self._row_chunks(query_chunks, B)
            per_row = chunks is not None
        if impl == "plain" or hooked or not per_row:
            z = self._attend_dense(q, k, v, prefix_kv, past_kv, context_mask, memory, query_chunks, impl)
        elif past_kv is None:
            z = self._attend_prefill(q, k, v, prefix_kv, context_mask, memory if reads else None, query_chunks)
        else:
            z = self._attend_cached(q, k, v, prefix_kv, past_kv, context_mask, memory if reads else None, chunks,
                                    layer_cache)
        z = self.hook_z(z)  # (B, H, T, d_h)
        if self.hook_result.active:  # per-head contributions, only computed when someone looks
            w_o = self.wo.weight.view(cfg.d_model, H, cfg.head_dim)  # (d, H, d_h)
            result = self.hook_result(torch.einsum("bhtk,dhk->bthd", z, w_o))
            out = result.sum(2)
        else:
            out = self.wo(z.transpose(1, 2).reshape(B, T, H * cfg.head_dim))
        return out, (k, v)

    # ---------------------------------------------------------------- the reference path (hooks, impl="plain")
    def _attend_dense(self, q, k, v, prefix_kv, past_kv, context_mask, memory, query_chunks, impl):
        """One key axis [prefix | memory slots of all chunks | past | new] with a dense mask; the only path
        that exposes q/k/v, scores and patterns to hooks."""
        cfg = self.cfg
        B, H, T, _ = q.shape
        Hkv, g = cfg.n_kv_heads, cfg.n_query_groups
        k_parts, v_parts, m_parts = [], [], []
        if prefix_kv is not None:
            pk, pv = prefix_kv  # (1, H_kv, p, d_h)
            k_parts.append(pk.expand(B, -1, -1, -1)); v_parts.append(pv.expand(B, -1, -1, -1))
            m_parts.append(torch.ones(B, Hkv, T, pk.shape[2], dtype=torch.bool, device=q.device))
        if memory is not None:
            mk, mv, mmask = self._memory_slots(memory, query_chunks, T)
            k_parts.append(mk); v_parts.append(mv); m_parts.append(mmask)
        if past_kv is not None:
            k_parts.append(past_kv[0]); v_parts.append(past_kv[1])
        k_parts.append(k); v_parts.append(v)
        S_past = 0 if past_kv is None else past_kv[0].shape[2]
        causal = torch.ones(T, S_past + T, dtype=torch.bool, device=q.device).tril(diagonal=S_past)
        ctx_mask = causal[None, None].expand(B, Hkv, T, S_past + T)
        if context_mask is not None:  # (B, S_past + T): hide padding keys
            ctx_mask = ctx_mask & context_mask[:, None, None, :]
        m_parts.append(ctx_mask)
        keys, values, mask = torch.cat(k_parts, 2), torch.cat(v_parts, 2), torch.cat(m_parts, 3)
        keys, values = self.hook_k(keys), self.hook_v(values)
        q = self.hook_q(q)
        # GQA by repeating each KV head for its group of query heads
        keys_h = keys.repeat_interleave(g, dim=1)
        values_h = values.repeat_interleave(g, dim=1)
        mask_h = mask.repeat_interleave(g, dim=1)  # (B, H, T, S)
        if impl == "plain" or self.hook_attn_scores.active or self.hook_pattern.active:
            scores = (q @ keys_h.transpose(-1, -2)) / math.sqrt(cfg.head_dim)
            scores = self.hook_attn_scores(scores.masked_fill(~mask_h, float("-inf")))
            pattern = self.hook_pattern(torch.softmax(scores.float(), dim=-1).type_as(q))
            return pattern @ values_h
        return F.scaled_dot_product_attention(q, keys_h, values_h, attn_mask=mask_h)

    def _memory_slots(self, memory: MemoryKV, query_chunks: torch.Tensor, T: int):
        """Memory K/V of this layer for all chunks laid side by side, and the block mask that lets query t
        see only the slots of its own chunk, in memory heads only. Returns (B, H_kv, C·M, d_h) x2 and
        the mask (B, H_kv, T, C·M)."""
        cfg = self.cfg
        li = cfg.memory_layers.index(self.layer)
        mk, mv = memory.keys[:, :, li], memory.values[:, :, li]  # (B, C, H_mem, M, d_h)
        valid = memory.full_mask()[:, :, li]  # (B, C, H_mem, M)
        B, C, Hm, M, dh = mk.shape
        if Hm != cfg.n_kv_heads:  # memory heads are a subset of the KV heads: other heads get empty slots
            heads = torch.tensor(cfg.memory_heads, device=mk.device)
            full_k = mk.new_zeros(B, C, cfg.n_kv_heads, M, dh).index_copy(2, heads, mk)
            full_v = mv.new_zeros(B, C, cfg.n_kv_heads, M, dh).index_copy(2, heads, mv)
            full_valid = valid.new_zeros(B, C, cfg.n_kv_heads, M).index_copy(2, heads, valid)
            mk, mv, valid = full_k, full_v, full_valid
        keys = mk.permute(0, 2, 1, 3, 4).reshape(B, cfg.n_kv_heads, C * M, dh)
        values = mv.permute(0, 2, 1, 3, 4).reshape(B, cfg.n_kv_heads, C * M, dh)
        slot_chunk = torch.arange(C, device=mk.device).repeat_interleave(M)  # (C·M,)
        same_chunk = query_chunks[..., :, None] == slot_chunk  # (T, C·M) or (B, T, C·M)
        same_chunk = same_chunk[None, None] if same_chunk.dim() == 2 else same_chunk[:, None]
        slot_valid = valid.permute(0, 2, 1, 3).reshape(B, cfg.n_kv_heads, 1, C * M)
        return keys, values, same_chunk & slot_valid

    # ---------------------------------------------------------------- fast path, no cached context (prefill)
    def _attend_prefill(self, q, k, v, prefix_kv, context_mask, memory, query_chunks):
        """Causal attention over [prefix | context] with SDPA's is_causal (the queries are front-padded so
        the diagonal lines up). Each chunk's memories are attended to separately (`_read_memory`) and join
        the same softmax as one extra "sink" key per query: its score is their log-sum-exp, its value a
        unit vector in an extra dimension, so SDPA returns the memories' share of the softmax there."""
        B, H, T, dh = q.shape
        keys, values = k, v  # (B, H_kv, T, d_h)
        if prefix_kv is not None:
            keys = torch.cat([prefix_kv[0].expand(B, -1, -1, -1), k], 2)  # (B, H_kv, p + T, d_h)
            values = torch.cat([prefix_kv[1].expand(B, -1, -1, -1), v], 2)
        front = keys.shape[2] - T
        if memory is not None:
            o_mem, lse_mem = self._read_memory(q, memory, query_chunks)  # (B, H, T, d_h), (B, H, T)
            q = torch.cat([q, lse_mem.unsqueeze(-1).to(q.dtype)], -1)  # (B, H, T, d_h + 1)
            sink_k = keys.new_zeros(B, keys.shape[1], 1, dh + 1)
            sink_v = sink_k.clone()
            sink_k[..., dh] = math.sqrt(dh)  # score = lse_mem under SDPA's 1/sqrt(d_h)
            sink_v[..., dh] = 1.0
            keys = torch.cat([sink_k, F.pad(keys, (0, 1))], 2)  # (B, H_kv, 1 + p + T, d_h + 1)
            values = torch.cat([sink_v, F.pad(values, (0, 1))], 2)
            front += 1
        scale = 1 / math.sqrt(dh)
        if context_mask is None:
            z = F.scaled_dot_product_attention(F.pad(q, (0, 0, front, 0)), keys, values, is_causal=True,
                                               scale=scale, enable_gqa=True)[:, :, front:]
        else:  # padding keys hidden: an explicit (B, 1, T, front + T) mask
            mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril() & context_mask[:, None, None, :]
            z = F.scaled_dot_product_attention(q, keys, values, attn_mask=F.pad(mask, (front, 0), value=True),
                                               scale=scale, enable_gqa=True)
        if memory is not None:
            z = z[..., :dh] + z[..., dh:] * o_mem
        return z

    def _read_memory(self, q: torch.Tensor, memory: MemoryKV, query_chunks: torch.Tensor):
        """Each query's attention over the memory slots of its own chunk alone. Returns the output (B, H, T, d_h)
        and the log-sum-exp (B, H, T); NO_WEIGHT where a query has no valid slot and in non-memory heads."""
        cfg = self.cfg
        B, H, T, dh = q.shape
        Hkv, g, cl = cfg.n_kv_heads, cfg.n_query_groups, cfg.chunk_length
        li = cfg.memory_layers.index(self.layer)
        mk, mv = memory.keys[:, :, li], memory.values[:, :, li]  # (B, C, H_mem, M, d_h)
        valid = memory.full_mask()[:, :, li]  # (B, C, H_mem, M)
        C, Hm, M = mk.shape[1], mk.shape[2], mk.shape[3]
        qg = q.reshape(B, Hkv, g, T, dh)
        if Hm != Hkv:
            qg = qg[:, list(cfg.memory_heads)]
        qg = qg * (1 / math.sqrt(dh))  # (B, H_mem, g, T, d_h)
        blocks = C > 1 and T <= C * cl and bool((query_chunks == torch.arange(T, device=q.device) // cl).all())
        if blocks:  # query t reads chunk t // chunk_length: a batch of (g·cl, M) attentions, one per chunk
            n = C * cl
            qb = F.pad(qg, (0, 0, 0, n - T)).reshape(B, Hm, g, C, cl, dh).transpose(2, 3)
            s = qb.reshape(B, Hm, C, g * cl, dh) @ mk.permute(0, 2, 1, 4, 3)  # (B, H_mem, C, g·cl, M)
            s = s.masked_fill(~valid.transpose(1, 2)[:, :, :, None, :], float("-inf"))
            lse = s.logsumexp(-1, keepdim=True).clamp(min=NO_WEIGHT)
            o = torch.exp(s - lse) @ mv.transpose(1, 2)  # (B, H_mem, C, g·cl, d_h)
            o = o.view(B, Hm, C, g, cl, dh).transpose(2, 3).reshape(B, Hm, g, n, dh)[:, :, :, :T]
            lse = lse.view(B, Hm, C, g, cl).transpose(2, 3).reshape(B, Hm, g, n)[..., :T]
        else:  # any other layout: score every slot of the call, keep the query's own chunk
            keys = mk.transpose(1, 2).reshape(B, Hm, 1, C * M, dh)
            values = mv.transpose(1, 2).reshape(B, Hm, 1, C * M, dh)
            ok = valid.transpose(1, 2).reshape(B, Hm, 1, 1, C * M)
            if C > 1:
                own = query_chunks[..., :, None] == torch.arange(C, device=q.device).repeat_interleave(M)
                ok = ok & (own[None, None, None] if own.dim() == 2 else own[:, None, None])  # (B, H_mem, 1, T, C·M)
            s = (qg @ keys.transpose(-1, -2)).masked_fill(~ok, float("-inf"))  # (B, H_mem, g, T, C·M)
            lse = s.logsumexp(-1, keepdim=True).clamp(min=NO_WEIGHT)
            o = torch.exp(s - lse) @ values  # (B, H_mem, g, T, d_h)
            lse = lse.squeeze(-1)
        if Hm != Hkv:  # non-memory heads read nothing
            heads = torch.tensor(cfg.memory_heads, device=q.device)
            o = o.new_zeros(B, Hkv, g, T, dh).index_copy(1, heads, o)
            lse = lse.new_full((B, Hkv, g, T), NO_WEIGHT).index_copy(1, heads, lse)
        return o.reshape(B, H, T, dh), lse.reshape(B, H, T)

    # ---------------------------------------------------------------- fast path with cached context (decoding)
    def _row_chunks(self, query_chunks: torch.Tensor, B: int) -> torch.Tensor | None:
        """(B,) the chunk each row reads, or None when some row's queries read different chunks."""
        qc = query_chunks if query_chunks.dim() == 2 else query_chunks[None].expand(B, -1)
        return qc[:, 0] if bool((qc == qc[:, :1]).all()) else None

    def _row_slots(self, memory: MemoryKV, chunks: torch.Tensor | None):
        """Memory K/V of this layer for chunk `chunks[b]` of each row (None: the only chunk): (B, H_kv, M, d_h)
        x2 and the slot validity (B, H_kv, M); heads that are not memory heads get invalid slots."""
        cfg = self.cfg
        li = cfg.memory_layers.index(self.layer)
        if chunks is None:
            mk, mv, ok = memory.keys[:, 0, li], memory.values[:, 0, li], memory.full_mask()[:, 0, li]
        else:
            rows = torch.arange(len(chunks), device=chunks.device)
            mk, mv = memory.keys[rows, chunks, li], memory.values[rows, chunks, li]
            ok = memory.full_mask()[rows, chunks, li]
        B, Hm, M, dh = mk.shape
        if Hm != cfg.n_kv_heads:
            heads = torch.tensor(cfg.memory_heads, device=mk.device)
            mk = mk.new_zeros(B, cfg.n_kv_heads, M, dh).index_copy(1, heads, mk)
            mv = mv.new_zeros(B, cfg.n_kv_heads, M, dh).index_copy(1, heads, mv)
            ok = ok.new_zeros(B, cfg.n_kv_heads, M).index_copy(1, heads, ok)
        return mk, mv, ok

    def _attend_cached(self, q, k, v, prefix_kv, past_kv, context_mask, memory, chunks, layer_cache):
        """One attention over [prefix | this row's memory slots | past | new]. With a layer cache the keys are
        one view of its buffer (nothing is concatenated); without, they are concatenated here."""
        B, H, T, dh = q.shape
        g = self.cfg.n_query_groups
        if layer_cache is not None:
            slot_off = layer_cache.load_memory(self, memory, chunks)  # (B, H, n_slots) or None
            keys, values = layer_cache.full()
            p, front = layer_cache.p, layer_cache.start
        else:
            k_parts, v_parts, slot_off = [past_kv[0], k], [past_kv[1], v], None
            if memory is not None:
                mk, mv, ok = self._row_slots(memory, chunks)
                k_parts.insert(0, mk); v_parts.insert(0, mv)
                slot_off = None if bool(ok.all()) else ~ok.repeat_interleave(g, 1)
            p = 0 if prefix_kv is None else prefix_kv[0].shape[2]
            if prefix_kv is not None:
                k_parts.insert(0, prefix_kv[0].expand(B, -1, -1, -1))
                v_parts.insert(0, prefix_kv[1].expand(B, -1, -1, -1))
            keys, values = torch.cat(k_parts, 2), torch.cat(v_parts, 2)
            front = keys.shape[2] - past_kv[0].shape[2] - T
        n = keys.shape[2]
        if T == 1:  # one new token: two batched matmuls beat SDPA's CPU kernel here (2x at batch 16)
            Hkv = keys.shape[1]
            s = torch.bmm((q * (1 / math.sqrt(dh))).reshape(B * Hkv, g, dh),
                          keys.reshape(B * Hkv, n, dh).transpose(1, 2))  # (B·H_kv, g, S')
            s_h = s.view(B, H, n)
            if slot_off is not None:
                s_h[:, :, p:front].masked_fill_(slot_off, float("-inf"))
            if context_mask is not None:
                s_h[:, :, front:].masked_fill_(~context_mask[:, None, :], float("-inf"))
            return torch.bmm(torch.softmax(s, -1), values.reshape(B * Hkv, n, dh)).view(B, H, 1, dh)
        mask = torch.ones(B, 1 if slot_off is None else H, T, n, dtype=torch.bool, device=q.device)
        if slot_off is not None:
            mask[:, :, :, p:front] = ~slot_off[:, :, None]
        S = n - front
        mask[:, :, :, front:] = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        if context_mask is not None:
            mask[:, :, :, front:] &= context_mask[:, None, None, :]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)


class MLP(nn.Module):
    """Gated two-layer MLP without bias (SwiGLU): W_down(silu(W_gate x) * W_up x)."""

    def __init__(self, cfg: Memory3Config) -> None:
        super().__init__()
        self.w_gate = nn.Linear(cfg.d_model, cfg.mlp_width, bias=False)
        self.w_up = nn.Linear(cfg.d_model, cfg.mlp_width, bias=False)
        self.w_down = nn.Linear(cfg.mlp_width, cfg.d_model, bias=False)
        self.hook_post = HookPoint()  # (B, T, W) neuron activations, the MLP edges of Def 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(self.hook_post(F.silu(self.w_gate(x)) * self.w_up(x)))


class Block(nn.Module):
    def __init__(self, cfg: Memory3Config, layer: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.hook_resid_pre = HookPoint()  # (B, T, d) x^{2l} of Def 1
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()  # x^{2l+1}
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()  # x^{2l+2}

    def forward(self, x, cos, sin, **attn_kw):
        x = self.hook_resid_pre(x)
        a, new_kv = self.attn(self.attn_norm(x), cos, sin, **attn_kw)
        x = self.hook_resid_mid(x + self.hook_attn_out(a))
        x = self.hook_resid_post(x + self.hook_mlp_out(self.mlp(self.mlp_norm(x))))
        return x, new_kv


# ----------------------------------------------------------------------------------------------- model
class Memory3(nn.Module):
    """Llama-style decoder that reads explicit memories (paper §3).

    >>> cfg = Memory3Config.from_name("tiny"); model = Memory3(cfg)
    >>> out = model(torch.tensor([[1, 50, 60]]))          # no memory: an ordinary causal LM
    >>> out.logits.shape
    torch.Size([1, 3, 512])
    """

    def __init__(self, cfg: Memory3Config) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, l) for l in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_position, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.register_buffer("prefix_ids", torch.tensor(cfg.reference_prefix_ids, dtype=torch.long),
                             persistent=False)
        self._prefix_cache: tuple[tuple, list] | None = None
        self._owners: list[nn.Module] | None = None
        for name, mod in self.named_modules():
            if isinstance(mod, HookPoint):
                mod.name = name
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    def reset_parameters(self, seed: int | None = None) -> None:
        """Normal(0, init_std) weights; output projections scaled by 1/sqrt(2L) (GPT-2) for stable depth."""
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            else:
                s = std / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("wo.weight", "w_down.weight")) else std
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen) * s)
        self._prefix_cache = None

    def with_memory_format(self, *, selector: str | None = None, tokens_per_head: int | None = None,
                           memories_per_chunk: int | None = None) -> "Memory3":
        """This model under another explicit-memory format (`Memory3Config.with_memory_format`; None keeps a field),
        for ablations that write or read memories in a format the model was not trained in. The two objects share
        every submodule, parameter and buffer (training one trains the other); only `cfg` differs, so a bank in
        that format opens for the returned model and is refused by this one."""
        other = copy.copy(self)  # a new Memory3 whose attributes are this one's (the same submodule dicts)
        other.cfg = self.cfg.with_memory_format(selector, tokens_per_head, memories_per_chunk)
        return other

    # ------------------------------------------------------------------ bookkeeping
    def num_parameters(self, non_embedding: bool = True) -> int:
        """Parameter count; non_embedding=True leaves out the token embedding and an untied LM head."""
        n = sum(p.numel() for p in self.parameters())  # tied weights are counted once
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def hook_points(self) -> dict[str, HookPoint]:
        return {m.name: m for m in self.modules() if isinstance(m, HookPoint)}

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Iterable[tuple[str, HookFn]]) -> Iterator["Memory3"]:
        """Temporarily add hook functions: `with model.hooks([("blocks.0.attn.hook_pattern", fn)]): ...`."""
        points = self.hook_points()
        added = []
        try:
            for name, fn in fwd_hooks:
                if name not in points:
                    raise KeyError(f"no hook point named {name!r}; see model.hook_points()")
                points[name].add_hook(fn)
                added.append((points[name], fn))
            yield self
        finally:
            for hp, fn in added:
                hp.fns.remove(fn)

    def run_with_cache(self, idx: torch.Tensor, *, names: Iterable[str] | Callable[[str], bool] | None = None,
                       keep_grad: bool = False, fwd_hooks: Iterable[tuple[str, HookFn]] = (), **kw):
        """Forward pass that records activations at hook points: returns (ModelOutput, {name: tensor}).

        keep_grad=True keeps the recorded tensors in the autograd graph and retains their gradients, so
        after `out.loss.backward()` each `cache[name].grad` is d loss / d activation (Def 1 edge weights).
        """
        points = self.hook_points()
        if names is None:
            selected = list(points)
        elif callable(names):
            selected = [n for n in points if names(n)]
        else:
            selected = list(names)
            missing = [n for n in selected if n not in points]
            if missing:
                raise KeyError(f"no hook points named {missing}")
        cache: dict[str, torch.Tensor] = {}

        def record(x: torch.Tensor, hook: HookPoint) -> torch.Tensor | None:
            if not keep_grad:
                cache[hook.name] = x.detach()
                return None
            if not x.requires_grad:  # frozen weights: make the activation a leaf so it still gets a gradient
                x = x.detach().requires_grad_(True)
            x.retain_grad()
            cache[hook.name] = x
            return x

        with self.hooks(list(fwd_hooks) + [(n, record) for n in selected]):
            out = self(idx, **kw)
        return out, cache

    def key_index(self, layer: int, context_pos: int, memory_slots: int = 0) -> int:
        """Index along the key axis of layer `layer`'s scores/pattern for context position `context_pos`
        (memory_slots = C·M of the call, counted only in memory layers)."""
        mem = memory_slots if layer in self.cfg.memory_layers else 0
        return self.cfg.prefix_length + mem + context_pos

    @contextlib.contextmanager
    def _hooks_suspended(self) -> Iterator[None]:
        saved = {hp: hp.fns for hp in self.hook_points().values()}
        try:
            for hp in saved:
                hp.fns = []
            yield
        finally:
            for hp, fns in saved.items():
                hp.fns = fns

    # ------------------------------------------------------------------ the constant prefix
    def prefix_kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """K/V of "<s>Reference:" at every layer, each (1, H_kv, p, d_h). Depends only on the weights, so it
        is cached; the cache is keyed on the parameters' version counters, so any update invalidates it, and on the
        autocast dtype (a bf16 prefix must not reach a float32 pass). When gradients are being recorded it is
        recomputed, so the prefix is trained like any token."""
        if self._owners is None:  # modules that hold parameters, found once (walking all modules is slow)
            self._owners = [m for m in self.modules() if m._parameters]
        params = [p for m in self._owners for p in m._parameters.values() if p is not None]
        training = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        dev = self.rope_cos.device.type
        autocast = dev != "meta" and torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev)
        key = tuple(p._version for p in params) + (self.rope_cos.device, self.rope_cos.dtype,
                                                   self.tok_emb.weight.dtype, autocast)
        if not training and self._prefix_cache is not None and self._prefix_cache[0] == key:
            return self._prefix_cache[1]
        ids = self.prefix_ids[None]  # (1, p)
        p = ids.shape[1]
        cos, sin = self.rope_cos[:p], self.rope_sin[:p]
        x = self.tok_emb(ids)
        kvs = []
        with self._hooks_suspended():  # hook users see the context pass, not this constant one
            for block in self.blocks:
                x, kv = block(x, cos, sin, prefix_kv=None, past_kv=None, context_mask=None, memory=None,
                              query_chunks=None, impl="sdpa")
                kvs.append(kv)
        if not training:
            self._prefix_cache = (key, kvs)
        return kvs

    # ------------------------------------------------------------------ forward
    def forward(self, idx: torch.Tensor, *, targets: torch.Tensor | None = None, memory: MemoryKV | None = None,
                query_chunks: torch.Tensor | None = None, cache: KVCache | None = None,
                context_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                impl: str = "sdpa", use_cache: bool = False, target_logits_only: bool = False) -> ModelOutput:
        """Causal LM over context tokens `idx` (B, T), reading `memory` in the memory heads of memory layers.

        targets:      (B, T) next-token ids, -100 = ignored, gives `loss` (mean cross-entropy).
        target_logits_only: with `targets`, run the LM head only where a target is not -100 (training: padding
                      costs no logits); `logits` is then (N_targets, V) in row-major order of those positions.
        memory:       `MemoryKV` for C chunks; query t reads chunk `query_chunks[..., t]` ((T,) or (B, T)), by default
                      (cache.length + t) // chunk_length - first chunk of this call, clipped to [0, C-1].
        cache:        `KVCache` from an earlier call (decoding); `use_cache=True` returns the updated cache.
        context_mask: (B, S_past + T) bool, False = padding token (never attended to).
        positions:    (T,) or (B, T) context indices (0 = first context token); default follow the cache.
        impl:         "sdpa" or "plain" (the reference softmax; also chosen when score/pattern hooks are on).
        """
        cfg = self.cfg
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"idx must be a (batch, time) integer tensor, got "
                             f"{getattr(idx, 'dtype', type(idx))} {tuple(getattr(idx, 'shape', ()))}")
        B, T = idx.shape
        if T == 0:
            raise ValueError("idx has no tokens")
        if impl not in ("sdpa", "plain"):
            raise ValueError(f"impl must be 'sdpa' or 'plain', got {impl!r}")
        if not idx.is_meta:
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= cfg.vocab_size:
                raise ValueError(f"token id {lo if lo < 0 else hi} out of range [0, vocab_size={cfg.vocab_size})")
        past = cache.length if cache is not None else 0
        if past + T > cfg.max_seq_len:
            raise ValueError(f"sequence of {past + T} tokens (cached {past} + new {T}) exceeds "
                             f"max_seq_len={cfg.max_seq_len}")
        if positions is None:
            positions = torch.arange(past, past + T, device=idx.device)
        elif positions.shape[-1] != T:
            raise ValueError(f"positions has {positions.shape[-1]} entries for {T} tokens")
        pos = positions + cfg.context_offset  # absolute RoPE positions
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]
        if pos.dim() == 2:  # per-row positions (B, T) -> (B, 1, T, d_h/2)
            cos, sin = cos[:, None], sin[:, None]
        if memory is not None:
            if not cfg.memory_layers:
                raise ValueError("this config has no memory layers, so it cannot read memory")
            memory.validate(cfg, B, self.tok_emb.weight.dtype)
            if query_chunks is None:
                first = past // cfg.chunk_length
                query_chunks = ((torch.arange(past, past + T, device=idx.device) // cfg.chunk_length) - first)
                query_chunks = query_chunks.clamp(0, memory.n_chunks - 1)
            elif (tuple(query_chunks.shape) not in ((T,), (B, T)) or int(query_chunks.min()) < 0
                  or int(query_chunks.max()) >= memory.n_chunks):
                raise ValueError(f"query_chunks must be ({T},) or ({B}, {T}) with values in [0, {memory.n_chunks})")
        if context_mask is not None and tuple(context_mask.shape) != (B, past + T):
            raise ValueError(f"context_mask must be ({B}, {past + T}), got {tuple(context_mask.shape)}")
        if context_mask is None and cache is not None and cache.context_mask is not None:
            context_mask = torch.cat([cache.context_mask, torch.ones(B, T, dtype=torch.bool, device=idx.device)], 1)
        if context_mask is not None and not context_mask.is_meta and bool(context_mask.all()):
            context_mask = None  # no padding: plain causal attention (is_causal) is cheaper than a mask

        prefix = self.prefix_kv()
        x = self.tok_emb(idx)
        new_cache = KVCache.empty(cfg.n_layers) if use_cache else None
        layer_caches = None
        if use_cache and not torch.is_grad_enabled():  # in-place buffers; with autograd, plain concatenation
            layer_caches = [_LayerCache.for_call(cache, l, prefix[l], B, T, memory.slots if memory is not None
                                                 and l in cfg.memory_layers else 0, cfg.max_seq_len)
                            for l in range(cfg.n_layers)]
        for l, block in enumerate(self.blocks):
            past_kv = None if cache is None or cache.keys[l] is None else (cache.keys[l], cache.values[l])
            x, (k, v) = block(x, cos, sin, prefix_kv=prefix[l], past_kv=past_kv, context_mask=context_mask,
                              memory=memory, query_chunks=query_chunks, impl=impl,
                              layer_cache=None if layer_caches is None else layer_caches[l])
            if layer_caches is not None:
                new_cache.keys[l], new_cache.values[l] = layer_caches[l].context()
            elif use_cache:
                new_cache.keys[l] = k if past_kv is None else torch.cat([past_kv[0], k], 2)
                new_cache.values[l] = v if past_kv is None else torch.cat([past_kv[1], v], 2)
        if use_cache:
            new_cache.context_mask = context_mask
            new_cache._layers = layer_caches
        h = self.norm(x)
        if targets is not None and targets.shape != idx.shape:
            raise ValueError(f"targets {tuple(targets.shape)} must match idx {tuple(idx.shape)}")
        if target_logits_only and targets is None:
            raise ValueError("target_logits_only needs targets")
        loss = None
        if target_logits_only:  # the LM head is ~40 % of a tiny model's step; a third of its rows are padding
            keep = targets != -100  # (B, T)
            logits = self.lm_head(h[keep])  # (N, V)
            loss = F.cross_entropy(logits.float(), targets[keep])
        else:
            logits = self.lm_head(h)
            if targets is not None:
                loss = F.cross_entropy(logits.float().view(-1, cfg.vocab_size), targets.reshape(-1), ignore_index=-100)
        return ModelOutput(logits=logits, loss=loss, cache=new_cache, hidden=h)

    # ------------------------------------------------------------------ reference encoding (§3.3)
    def encode_reference_layers(self, ref_ids: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Run "<s>Reference:" + reference tokens through the memory layers only (stop after the last one).

        ref_ids: (N, R) right-padded reference tokens, R <= reference_length; token j sits at position p + j.
        Returns one dict per memory layer with q_raw (N, H, R, d_h), k_raw/k/v (N, H_kv, R, d_h): q/k before
        RoPE (for the position-free selection score) and k after RoPE, v (what the memory stores). Right
        padding is harmless here: under the causal mask no real token sees a later pad token.
        """
        cfg = self.cfg
        if ref_ids.dim() != 2:
            raise ValueError(f"ref_ids must be (n_references, length), got {tuple(ref_ids.shape)}")
        N, R = ref_ids.shape
        if R > cfg.reference_length:
            raise ValueError(f"references of {R} tokens exceed reference_length={cfg.reference_length}")
        if not cfg.memory_layers:
            raise ValueError("this config has no memory layers")
        lo, hi = int(ref_ids.min()), int(ref_ids.max())
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(f"token id {lo if lo < 0 else hi} out of range [0, vocab_size={cfg.vocab_size})")
        pos = torch.arange(R, device=ref_ids.device) + cfg.prefix_length
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]
        prefix = self.prefix_kv()
        x = self.tok_emb(ref_ids)
        out = []
        for l in range(cfg.memory_layers[-1] + 1):
            collect = {} if l in cfg.memory_layers else None
            x, _ = self.blocks[l](x, cos, sin, prefix_kv=prefix[l], past_kv=None, context_mask=None, memory=None,
                                  query_chunks=None, impl="sdpa", collect=collect)
            if collect is not None:
                out.append(collect)
        return out


def prefill_chunk_loop(model: Memory3, idx: torch.Tensor, memory: MemoryKV, impl: str = "sdpa") -> ModelOutput:
    """Reference for the fused chunkwise prefill: one forward per 64-token chunk, each with its own memories,
    carrying the context through the KV cache (how the paper's Python loop read memory, Remark 8)."""
    cl = model.cfg.chunk_length
    cache, logits = None, []
    for c, start in enumerate(range(0, idx.shape[1], cl)):
        mem_c = MemoryKV(memory.keys[:, c:c + 1], memory.values[:, c:c + 1],
                         None if memory.mask is None else memory.mask[:, c:c + 1])
        chunk = idx[:, start:start + cl]
        out = model(chunk, memory=mem_c, cache=cache, use_cache=True, impl=impl,
                    query_chunks=torch.zeros(chunk.shape[1], dtype=torch.long, device=idx.device))
        cache = out.cache
        logits.append(out.logits)
    return ModelOutput(logits=torch.cat(logits, 1), cache=cache)


def zero_attention_edge(layer: int, head: int, query_pos: int, key_index: int,
                        batch_index: int | None = None) -> tuple[str, HookFn]:
    """Hook that zeroes one attention edge a_{i,j}^{l,h} (after softmax), as in Def 1's causal weight.
    key_index is along the key axis (see `Memory3.key_index`); batch_index limits it to one batch row, so
    one batch can ablate a different edge per row."""
    rows = slice(None) if batch_index is None else batch_index

    def fn(pattern: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        pattern = pattern.clone()
        pattern[rows, head, query_pos, key_index] = 0
        return pattern
    return f"blocks.{layer}.attn.hook_pattern", fn


def zero_mlp_neuron(layer: int, position: int, neuron: int, batch_index: int | None = None) -> tuple[str, HookFn]:
    """Hook that zeroes MLP neuron m of layer l at one position (an MLP edge of Def 1)."""
    rows = slice(None) if batch_index is None else batch_index

    def fn(act: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        act = act.clone()
        act[rows, position, neuron] = 0
        return act
    return f"blocks.{layer}.mlp.hook_post", fn
