"""§3.1–3.5 the Memory³ network: a Llama-style decoder whose attention also reads explicit memories (Eq. 4).

One readable file, in the spirit of nanoGPT's model.py:

- RMSNorm, RoPE, grouped-query attention, gated SiLU MLP, no biases (§3.2 leaves these open; Llama's choices).
- **Eq. 4** (`Attention.forward`, `Attention.eq4`): in the *memory heads* of the *memory layers*, the keys/values
  of the explicit memories retrieved for a chunk are joined in front of the context keys/values under one softmax.
- **Modified BOS** (§3.5): the "<s>Reference:" prefix sits in front of the context in every head of every layer;
  its K/V depend only on the weights, so they are computed once and cached (`Memory3.prefix_kv`).
- **Parallel positions** (design.md): prefix at 0..p-1, every memory in the shared interval p..p+127 (keys are
  stored after RoPE, so they carry those positions), context from p+128 on.
- Fast paths for the same equation: the fused chunkwise prefill (`attention_fast.py`; `prefill_chunk_loop` is the
  per-chunk loop it replaces) and decoding over the KV cache (`kv_cache.py`). Hooks: `hooks.py`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention_fast import NO_WEIGHT, attend_prefill
from .config import Memory3Config
from .hooks import HookedModel, HookFn, HookPoint, zero_attention_edge, zero_mlp_neuron
from .kv_cache import KVCache, LayerCache, attend_cached, row_chunks
from .memory_kv import MemoryKV, scatter_heads

__all__ = ["Memory3", "MemoryKV", "KVCache", "ModelOutput", "HookPoint", "HookFn", "prefill_chunk_loop",
           "zero_attention_edge", "zero_mlp_neuron", "rope_tables", "apply_rope", "NO_WEIGHT"]


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
        if self.is_memory_layer and cfg.memory_selection_queries:  # the "learned" selector's queries (a lever)
            self.select_q = nn.Parameter(torch.empty(cfg.memory_selection_queries, H, dh))  # (P, H, d_h)
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
                impl: str, collect: dict | None = None, layer_cache: LayerCache | None = None):
        """Eq. 4. In a memory head of a memory layer, query i of chunk c reads the memories of c before the context:

            Y_i = softmax( X_i W_Q · concat(K_0, …, K_4, X_[:i] W_K)ᵀ / √d_h )
                  · concat(V_0, …, V_4, X_[:i] W_V) · W_O

        (K_j, V_j: the sparse keys/values of memory j). Every head of every layer also reads the "<s>Reference:"
        prefix first (modified BOS); other heads and layers read no memory. `eq4` is this equation as written; the
        fused prefill (`attention_fast.attend_prefill`) and the decoding step (`kv_cache.attend_cached`) compute it
        faster (equal up to float rounding), unless impl="plain" or a hook on q/k/v, scores or pattern is active.
        Returns the output (B, T, d) and this call's k, v (B, H_kv, T, d_h), after RoPE.
        """
        B, T, _ = x.shape
        q_raw, k_raw, v = self.project(x)  # X_i W_Q (B, H, T, d_h); X W_K, X W_V (B, H_kv, T, d_h)
        q, k = apply_rope(q_raw, cos, sin), apply_rope(k_raw, cos, sin)
        if collect is not None:  # reference encoding: the un-rotated q/k select tokens (§3.3), k and v are stored
            collect.update(q_raw=q_raw, k_raw=k_raw, v=v, k=k)
        if layer_cache is not None:
            layer_cache.append(k, v)  # in place; past_kv stays a view of the old length
        if not (self.is_memory_layer and memory is not None and memory.slots > 0):
            memory = None  # this layer reads no memory
        hooked = any(h.active for h in (self.hook_q, self.hook_k, self.hook_v, self.hook_attn_scores,
                                         self.hook_pattern))
        fast, chunks = impl == "sdpa" and not hooked, None
        if fast and memory is not None and past_kv is not None and memory.n_chunks > 1:
            chunks = row_chunks(query_chunks, B)  # with cached context each row must read one chunk
            fast = chunks is not None
        if not fast:
            z = self.eq4(q, k, v, prefix_kv, past_kv, context_mask, memory, query_chunks, impl)
        elif past_kv is None:
            z = attend_prefill(self.cfg, self.layer, q, k, v, prefix_kv, context_mask, memory, query_chunks)
        else:
            z = attend_cached(self.cfg, self.layer, q, k, v, prefix_kv, past_kv, context_mask, memory, chunks,
                              layer_cache)
        z = self.hook_z(z)  # (B, H, T, d_h)
        if self.hook_result.active:  # per-head contributions, only computed when someone looks
            w_o = self.wo.weight.view(self.cfg.d_model, self.cfg.n_heads, self.cfg.head_dim)  # (d, H, d_h)
            out = self.hook_result(torch.einsum("bhtk,dhk->bthd", z, w_o)).sum(2)
        else:
            out = self.wo(z.transpose(1, 2).reshape(B, T, -1))  # · W_O
        return out, (k, v)

    def eq4(self, q, k, v, prefix_kv, past_kv, context_mask, memory, query_chunks, impl):
        """Eq. 4 as written: one key axis [ prefix | K_0…K_4 of every chunk | X_[:i] W_K ], one mask (query i sees the
        prefix, the valid memory slots of its own chunk in memory heads, and context keys up to i), one softmax."""
        B, H, T, dh = q.shape
        Hkv, g = self.cfg.n_kv_heads, self.cfg.n_query_groups
        pk, pv = prefix_kv  # "<s>Reference:" (1, H_kv, p, d_h)
        keys, values = [pk.expand(B, -1, -1, -1)], [pv.expand(B, -1, -1, -1)]
        sees = [torch.ones(B, Hkv, T, pk.shape[2], dtype=torch.bool, device=q.device)]  # (B, H_kv, T, p)
        log_w = None  # MemoryKV.bias: soft selection in training only
        if memory is not None:  # K_j, V_j: (B, H_kv, C·M, d_h); which query sees which slot: (B, H_kv, T, C·M)
            mk, mv, m_sees, log_w = self.memory_slots(memory, query_chunks, T)
            keys.append(mk); values.append(mv); sees.append(m_sees)
        S_past = 0 if past_kv is None else past_kv[0].shape[2]
        if past_kv is not None:  # context keys/values of earlier calls (B, H_kv, S_past, d_h)
            keys.append(past_kv[0]); values.append(past_kv[1])
        keys.append(k); values.append(v)  # X W_K, X W_V of this call (B, H_kv, T, d_h)
        causal = torch.ones(T, S_past + T, dtype=torch.bool, device=q.device).tril(diagonal=S_past)
        ctx_sees = causal[None, None].expand(B, Hkv, T, S_past + T)  # X_[:i]
        if context_mask is not None:  # (B, S_past + T): hide padding keys
            ctx_sees = ctx_sees & context_mask[:, None, None, :]
        sees.append(ctx_sees)
        keys, values, sees = torch.cat(keys, 2), torch.cat(values, 2), torch.cat(sees, 3)  # (B, H_kv, T|S, ...)
        keys, values, q = self.hook_k(keys), self.hook_v(values), self.hook_q(q)
        # GQA: each KV head serves its group of g query heads -> (B, H, S, d_h), mask (B, H, T, S)
        keys_h, values_h, sees_h = (t.repeat_interleave(g, dim=1) for t in (keys, values, sees))
        if log_w is not None:  # the mask becomes additive: -inf where unseen, log g_j on memory slot j, else 0
            log_w = F.pad(log_w, (pk.shape[2], keys.shape[2] - pk.shape[2] - log_w.shape[-1])).repeat_interleave(g, 1)
            sees_h = torch.zeros_like(sees_h, dtype=q.dtype).masked_fill(~sees_h, float("-inf")) + log_w.to(q.dtype)
        if impl == "plain" or self.hook_attn_scores.active or self.hook_pattern.active:
            scores = (q @ keys_h.transpose(-1, -2)) / math.sqrt(dh)  # (B, H, T, S)
            scores = scores + sees_h if sees_h.is_floating_point() else scores.masked_fill(~sees_h, float("-inf"))
            pattern = self.hook_pattern(torch.softmax(self.hook_attn_scores(scores).float(), dim=-1).type_as(q))
            return pattern @ values_h  # (B, H, T, d_h)
        return F.scaled_dot_product_attention(q, keys_h, values_h, attn_mask=sees_h)  # the same, one kernel

    def memory_slots(self, memory: MemoryKV, query_chunks: torch.Tensor, T: int):
        """This layer's memory K/V for all chunks side by side (B, H_kv, C·M, d_h) x2, which query sees which slot
        (B, H_kv, T, C·M: valid slots of its own chunk, memory heads only), slot log-weights (B, H_kv, 1, C·M)|None."""
        cfg, li = self.cfg, self.cfg.memory_layers.index(self.layer)

        def side_by_side(t):  # (B, C, H_mem, M, ...) -> (B, H_kv, C·M, ...), memory heads over all KV heads
            return None if t is None else scatter_heads(t, cfg.memory_heads, cfg.n_kv_heads, 2).transpose(1, 2).flatten(2, 3)
        keys, values, valid, log_w = map(side_by_side, (*memory.layer(li), memory.layer_bias(li)))
        slot_chunk = torch.arange(memory.n_chunks, device=keys.device).repeat_interleave(memory.slots)  # (C·M,)
        same_chunk = query_chunks[..., :, None] == slot_chunk  # (T, C·M) or (B, T, C·M)
        same_chunk = same_chunk[None, None] if same_chunk.dim() == 2 else same_chunk[:, None]
        return keys, values, same_chunk & valid[:, :, None], None if log_w is None else log_w[:, :, None]


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
class Memory3(HookedModel):
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
        self.name_hook_points()
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

    def num_parameters(self, non_embedding: bool = True) -> int:
        """Parameter count; non_embedding=True leaves out the token embedding and an untied LM head."""
        n = sum(p.numel() for p in self.parameters())  # tied weights are counted once
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

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
        impl:         "sdpa" (fast paths) or "plain" (`Attention.eq4`; also chosen when score/pattern hooks are on).
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
            query_chunks = memory.chunk_of_queries(query_chunks, past, B, T, cfg.chunk_length, idx.device)
        if context_mask is not None and tuple(context_mask.shape) != (B, past + T):
            raise ValueError(f"context_mask must be ({B}, {past + T}), got {tuple(context_mask.shape)}")
        if context_mask is None and cache is not None and cache.context_mask is not None:
            context_mask = torch.cat([cache.context_mask, torch.ones(B, T, dtype=torch.bool, device=idx.device)], 1)
        if context_mask is not None and not context_mask.is_meta and bool(context_mask.all()):
            context_mask = None  # no padding: plain causal attention (is_causal) is cheaper than a mask

        prefix = self.prefix_kv()
        x = self.tok_emb(idx)
        slots = [memory.slots if memory is not None and l in cfg.memory_layers else 0 for l in range(cfg.n_layers)]
        layer_caches = None  # decoding without autograd writes into per-layer buffers; with autograd, concatenates
        if use_cache and not torch.is_grad_enabled():
            layer_caches = [LayerCache.for_call(cache, l, prefix[l], B, T, slots[l], cfg.max_seq_len)
                            for l in range(cfg.n_layers)]
        new_kv = []
        for l, block in enumerate(self.blocks):
            x, kv = block(x, cos, sin, prefix_kv=prefix[l], past_kv=None if cache is None else cache.past(l),
                          context_mask=context_mask, memory=memory, query_chunks=query_chunks, impl=impl,
                          layer_cache=None if layer_caches is None else layer_caches[l])
            new_kv.append(kv if use_cache else None)
        new_cache = KVCache.after_call(cache, new_kv, layer_caches, context_mask) if use_cache else None
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
