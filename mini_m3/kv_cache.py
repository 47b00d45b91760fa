"""§3.4 decoding (Fig 9): the KV cache and the attention of a decoding step over it.

One buffer per layer, laid out [prefix | memory slots | context | free] and written in place, so a step attends to
one view of it: Eq. 4 as `Attention.eq4` computes it (equal up to float rounding; tests/test_model.py checks it),
without concatenating keys at every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .config import Memory3Config
from .memory_kv import MemoryKV, scatter_heads


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
    _layers: list["LayerCache"] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def empty(cls, n_layers: int) -> "KVCache":
        return cls([None] * n_layers, [None] * n_layers)

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def past(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if self.keys[layer] is None else (self.keys[layer], self.values[layer])

    @classmethod
    def after_call(cls, cache: "KVCache | None", new_kv: list, layers: list["LayerCache"] | None,
                   context_mask: torch.Tensor | None) -> "KVCache":
        """The cache after a call that appended the keys/values `new_kv[l]` to `cache` (None: an empty one): views
        of the layer buffers when the call wrote into them (`layers`), else concatenations (under autograd)."""
        out = cls.empty(len(new_kv))
        for l, (k, v) in enumerate(new_kv):
            past = None if cache is None else cache.past(l)
            if layers is not None:
                out.keys[l], out.values[l] = layers[l].context()
            else:
                out.keys[l] = k if past is None else torch.cat([past[0], k], 2)
                out.values[l] = v if past is None else torch.cat([past[1], v], 2)
        out.context_mask, out._layers = context_mask, layers
        return out


_UNSET = object()


class LayerCache:
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
                 limit: int) -> "LayerCache":
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

    def load_memory(self, cfg: Memory3Config, layer: int, memory: MemoryKV | None, chunks: torch.Tensor | None):
        """Write the slots layer `layer` reads in this call if they changed (chunks: (B,) chunk of each row, None =
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
            mk, mv, valid = row_slots(cfg, layer, memory, chunks)  # (B, H_kv, M, d_h)
            M = mk.shape[2]
            self.k[:, :, self.p:self.p + M] = mk
            self.v[:, :, self.p:self.p + M] = mv
            ok[:, :, :M] = valid
        self.slots_of = key
        self.slot_off = None if bool(ok.all()) else ~ok.repeat_interleave(cfg.n_query_groups, 1)
        return self.slot_off


def row_chunks(query_chunks: torch.Tensor, B: int) -> torch.Tensor | None:
    """(B,) the chunk each row reads, or None when some row's queries read different chunks."""
    qc = query_chunks if query_chunks.dim() == 2 else query_chunks[None].expand(B, -1)
    return qc[:, 0] if bool((qc == qc[:, :1]).all()) else None


def row_slots(cfg: Memory3Config, layer: int, memory: MemoryKV, chunks: torch.Tensor | None):
    """Memory K/V of layer `layer` for chunk `chunks[b]` of each row (None: the only chunk): (B, H_kv, M, d_h)
    x2 and the slot validity (B, H_kv, M); heads that are not memory heads get invalid slots."""
    if memory.bias is not None:
        raise ValueError("MemoryKV.bias (the soft token selection of continual training) is read by a forward "
                         "without a cache; decoding reads memories in the hard format (bias=None)")
    mk, mv, ok = memory.layer(cfg.memory_layers.index(layer))  # (B, C, H_mem, M, d_h) x2, (B, C, H_mem, M)
    if chunks is None:
        mk, mv, ok = mk[:, 0], mv[:, 0], ok[:, 0]
    else:
        rows = torch.arange(len(chunks), device=chunks.device)
        mk, mv, ok = mk[rows, chunks], mv[rows, chunks], ok[rows, chunks]
    return tuple(scatter_heads(t, cfg.memory_heads, cfg.n_kv_heads, dim=1) for t in (mk, mv, ok))


def attend_cached(cfg: Memory3Config, layer: int, q, k, v, prefix_kv, past_kv, context_mask,
                  memory: MemoryKV | None, chunks: torch.Tensor | None, layer_cache: LayerCache | None):
    """One attention over [prefix | this row's memory slots | past | new] -> (B, H, T, d_h). With a layer cache the
    keys are one view of its buffer (nothing is concatenated); without (under autograd), they are concatenated."""
    B, H, T, dh = q.shape
    g = cfg.n_query_groups
    if layer_cache is not None:
        slot_off = layer_cache.load_memory(cfg, layer, memory, chunks)  # (B, H, n_slots) or None
        keys, values = layer_cache.full()
        p, front = layer_cache.p, layer_cache.start
    else:
        k_parts, v_parts, slot_off = [past_kv[0], k], [past_kv[1], v], None
        if memory is not None:
            mk, mv, ok = row_slots(cfg, layer, memory, chunks)
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
