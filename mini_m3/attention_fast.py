"""§3.5 Eq. 4, fast (Remark 8): the fused chunkwise prefill, every 64-token chunk reading its own memories in one pass.

Eq. 4 as `Attention.eq4` computes it (equal up to float rounding; tests/test_model.py checks it), without building
its dense key axis. Per layer: one causal SDPA call (`is_causal`) over [prefix | context], and one batched
(chunks x 64 queries x M slots) attention over each chunk's own memories (`read_memory`). The two are one softmax:
the memories join the SDPA call as a single "sink" key per query whose score is their log-sum-exp and whose value
is a unit vector in an extra dimension, so SDPA returns the memories' share of the softmax there, which scales
their output.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import Memory3Config
from .memory_kv import MemoryKV, scatter_heads

NO_WEIGHT = -1e4  # log-sum-exp standing for "no memory slot": exp(-1e4) is 0 next to any real score


def attend_prefill(cfg: Memory3Config, layer: int, q, k, v, prefix_kv, context_mask, memory: MemoryKV | None,
                   query_chunks) -> torch.Tensor:
    """Attention of a call with no cached context: q (B, H, T, d_h), k, v (B, H_kv, T, d_h) after RoPE; prefix_kv
    (1, H_kv, p, d_h) x2 or None; context_mask (B, T) or None; memory read in this layer or None. -> (B, H, T, d_h).
    The queries are front-padded so the diagonal of SDPA's is_causal lines up with the context keys."""
    B, H, T, dh = q.shape
    keys, values = k, v  # (B, H_kv, T, d_h)
    if prefix_kv is not None:
        keys = torch.cat([prefix_kv[0].expand(B, -1, -1, -1), k], 2)  # (B, H_kv, p + T, d_h)
        values = torch.cat([prefix_kv[1].expand(B, -1, -1, -1), v], 2)
    front = keys.shape[2] - T
    q_ctx = q
    if memory is not None:
        o_mem, lse_mem = read_memory(cfg, layer, q, memory, query_chunks)  # (B, H, T, d_h), (B, H, T)
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
        if memory.usage is not None:  # z[..., dh]: each query's share of the softmax that went to its memories
            memory.usage[layer] = memory_usage(cfg, layer, q_ctx, memory, query_chunks, z[..., dh])
        z = z[..., :dh] + z[..., dh:] * o_mem  # (B, H, T, d_h)
    return z


def all_slot_scores(qg: torch.Tensor, mk: torch.Tensor, valid: torch.Tensor, bias: torch.Tensor | None,
                    query_chunks: torch.Tensor) -> torch.Tensor:
    """Scores of scaled queries qg (B, H_mem, g, T, d_h) against every memory slot of the call, mk (B, C, H_mem, M,
    d_h), + the slot log-weights `bias` (B, C, H_mem, M) if any: (B, H_mem, g, T, C·M), -inf where a slot is empty
    (`valid` False) or belongs to another chunk than the query's (`query_chunks` (T,) or (B, T))."""
    B, C, Hm, M, dh = mk.shape
    s = qg @ mk.transpose(1, 2).reshape(B, Hm, 1, C * M, dh).transpose(-1, -2)
    if bias is not None:
        s = s + bias.transpose(1, 2).reshape(B, Hm, 1, 1, C * M).to(s.dtype)
    ok = valid.transpose(1, 2).reshape(B, Hm, 1, 1, C * M)
    if C > 1:
        own = query_chunks[..., :, None] == torch.arange(C, device=qg.device).repeat_interleave(M)
        ok = ok & (own[None, None, None] if own.dim() == 2 else own[:, None, None])  # (B, H_mem, 1, T, C·M)
    return s.masked_fill(~ok, float("-inf"))


@torch.no_grad()
def memory_usage(cfg: Memory3Config, layer: int, q: torch.Tensor, memory: MemoryKV, query_chunks: torch.Tensor,
                 share: torch.Tensor) -> torch.Tensor:
    """The attention each memory slot receives in this layer (Eq. 4's softmax weight), summed over the call's
    queries and the query heads of its KV head: share (B, H, T) x the softmax over the query's own chunk's slots.
    -> (B, C, H_mem, M). One dense (T, C·M) score matrix per head: for training's selection distillation."""
    B, H, T, dh = q.shape
    li = cfg.memory_layers.index(layer)
    mk, _, valid = memory.layer(li)  # (B, C, H_mem, M, d_h), (B, C, H_mem, M)
    C, Hm, M = mk.shape[1], mk.shape[2], mk.shape[3]
    heads = list(cfg.memory_heads)
    qg = q.reshape(B, cfg.n_kv_heads, cfg.n_query_groups, T, dh)[:, heads] / math.sqrt(dh)  # (B, H_mem, g, T, d_h)
    s = all_slot_scores(qg, mk, valid, memory.layer_bias(li), query_chunks)  # (B, H_mem, g, T, C·M)
    p = torch.softmax(s.float(), -1).nan_to_num(0.0)
    w = share.reshape(B, cfg.n_kv_heads, cfg.n_query_groups, T)[:, heads].float()  # (B, H_mem, g, T)
    return (p * w[..., None]).sum((2, 3)).view(B, Hm, C, M).transpose(1, 2)


def read_memory(cfg: Memory3Config, layer: int, q: torch.Tensor, memory: MemoryKV, query_chunks: torch.Tensor):
    """Each query's attention over the memory slots of its own chunk alone. Returns the output (B, H, T, d_h)
    and the log-sum-exp (B, H, T); NO_WEIGHT where a query has no valid slot and in non-memory heads."""
    B, H, T, dh = q.shape
    Hkv, g, cl = cfg.n_kv_heads, cfg.n_query_groups, cfg.chunk_length
    li = cfg.memory_layers.index(layer)
    mk, mv, valid = memory.layer(li)  # (B, C, H_mem, M, d_h) x2, (B, C, H_mem, M)
    bias = memory.layer_bias(li)  # (B, C, H_mem, M) log-weights (soft selection in training) or None
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
        if bias is not None:
            s = s + bias.transpose(1, 2)[:, :, :, None, :].to(s.dtype)
        s = s.masked_fill(~valid.transpose(1, 2)[:, :, :, None, :], float("-inf"))
        lse = s.logsumexp(-1, keepdim=True).clamp(min=NO_WEIGHT)
        o = torch.exp(s - lse) @ mv.transpose(1, 2)  # (B, H_mem, C, g·cl, d_h)
        o = o.view(B, Hm, C, g, cl, dh).transpose(2, 3).reshape(B, Hm, g, n, dh)[:, :, :, :T]
        lse = lse.view(B, Hm, C, g, cl).transpose(2, 3).reshape(B, Hm, g, n)[..., :T]
    else:  # any other layout: score every slot of the call, keep the query's own chunk
        s = all_slot_scores(qg, mk, valid, bias, query_chunks)  # (B, H_mem, g, T, C·M)
        values = mv.transpose(1, 2).reshape(B, Hm, 1, C * M, dh)
        lse = s.logsumexp(-1, keepdim=True).clamp(min=NO_WEIGHT)
        o = torch.exp(s - lse) @ values  # (B, H_mem, g, T, d_h)
        lse = lse.squeeze(-1)
    o = scatter_heads(o, cfg.memory_heads, Hkv, dim=1)  # non-memory heads read nothing
    lse = scatter_heads(lse, cfg.memory_heads, Hkv, dim=1, fill=NO_WEIGHT)
    return o.reshape(B, H, T, dh), lse.reshape(B, H, T)
