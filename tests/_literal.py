"""§3.3–3.5 written out literally from the paper text, for the tests: Eq. 4 and the top-k token choice.

Nothing here calls mini_m3: it reads a model's weight tensors and config fields and redoes the arithmetic with
Python loops over rows, heads and queries, in float64, so a test can hold the package's fast paths against it.

- `literal_forward`: a textbook Llama over ["<s>Reference:" ; context] (RMSNorm, RoPE, GQA, gated SiLU MLP), where
  in the memory heads of the memory layers query i of chunk c attends to softmax over concat(memory K of chunk c,
  context K[:i]) — Eq. 4: memories in front, every valid memory slot visible, causal over the context.
  Positions (paper §3.5, natural reading): prefix 0..p-1, memories p..p+127 (keys given already rotated),
  context from p+128 on.
- `literal_selection`: §3.3 token sparsification. For KV head h of memory layer l, w_j = Σ_i Σ_{query heads of h}
  softmax_j(X_i W_Q (X_j W_K)ᵀ / √d_h) over the reference's own tokens (no prefix, no padding), with no causal
  mask and no position encoding; keep the top k tokens (ties to the earlier one); store their keys after RoPE at
  their positions p + j and their values.
  With pool="max" (the "headmax" selector, a named lever), the largest of the query heads' sums instead of their sum.
- `literal_disjoint`: the "disjoint" selector's choice (deviation 74, not the paper's) from given scores: k rounds
  in which the KV heads of a layer, in order, each keep their best token no head keeps yet.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _rope(x: torch.Tensor, pos: torch.Tensor, cfg) -> torch.Tensor:
    """Rotate pairs (x[2m], x[2m+1]) of each row by pos · base^(-2m/d_h). x: (S, d_h), pos: (S,)."""
    inv = 1.0 / cfg.rope_base ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim)
    angle = pos[:, None].double() * inv  # (S, d_h/2)
    x1, x2 = x[:, 0::2], x[:, 1::2]
    out = torch.empty_like(x)
    out[:, 0::2] = x1 * angle.cos() - x2 * angle.sin()
    out[:, 1::2] = x1 * angle.sin() + x2 * angle.cos()
    return out


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w.double()


def _head(weight: torch.Tensor, head: int, dh: int) -> torch.Tensor:
    """Rows of a projection matrix that belong to one head, as float64: (d_h, d)."""
    return weight[head * dh:(head + 1) * dh].detach().double()


def _softmax_attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """One query's attention: softmax(q · keysᵀ / √d_h) · values."""
    s = keys @ q / math.sqrt(q.shape[0])
    a = torch.exp(s - s.max())
    return (a / a.sum()) @ values


def literal_forward(model, idx: torch.Tensor, memory=None, query_chunks: torch.Tensor | None = None, *,
                    positions: torch.Tensor | None = None, record: list | None = None) -> torch.Tensor:
    """Logits (B, T, V) of context `idx` (B, T) read after the "<s>Reference:" prefix, in float64.

    memory: anything with .keys/.values (B, C, L_mem, H_mem, M, d_h) (keys already rotated) and .mask (None,
    (B, C, M) or (B, C, L_mem, H_mem, M)); query t reads chunk query_chunks[t] (default t // chunk_length,
    clipped to C - 1). positions: (T,) context indices (default 0..T-1; the RoPE position is p + 128 + index).
    record: if a list, gets per layer {"h": (B, S, d) normed attention input, "k": (B, H_kv, S, d_h) keys after
    RoPE, "v": values} over the whole sequence [prefix ; context].
    """
    cfg = model.cfg
    p, dh, g = len(cfg.reference_prefix_ids), cfg.head_dim, cfg.n_heads // cfg.n_kv_heads
    B, T = idx.shape
    seq = torch.cat([torch.tensor(cfg.reference_prefix_ids).expand(B, -1), idx], 1)
    ctx_pos = torch.arange(T) if positions is None else positions
    pos = torch.cat([torch.arange(p), p + cfg.reference_length + ctx_pos])
    S = seq.shape[1]
    if memory is not None:
        C = memory.keys.shape[1]
        chunk = (torch.arange(T) // cfg.chunk_length).clamp(max=C - 1) if query_chunks is None else query_chunks
    x = model.tok_emb.weight.detach().double()[seq]  # (B, S, d)
    for layer, blk in enumerate(model.blocks):
        h = _rms(x, blk.attn_norm.weight, cfg.norm_eps)
        out = torch.zeros_like(x)
        ks = torch.zeros(B, cfg.n_kv_heads, S, dh, dtype=torch.float64)
        vs = torch.zeros_like(ks)
        for b in range(B):
            heads = []
            for hq in range(cfg.n_heads):
                hk = hq // g
                q = _rope(h[b] @ _head(blk.attn.wq.weight, hq, dh).T, pos, cfg)
                k = _rope(h[b] @ _head(blk.attn.wk.weight, hk, dh).T, pos, cfg)
                v = h[b] @ _head(blk.attn.wv.weight, hk, dh).T
                ks[b, hk], vs[b, hk] = k, v
                reads = memory is not None and layer in cfg.memory_layers and hk in cfg.memory_heads
                y = torch.zeros(S, dh, dtype=torch.float64)
                for i in range(S):
                    keys, values = k[:i + 1], v[:i + 1]  # causal over [prefix ; context]
                    if reads and i >= p:  # Eq. 4: this chunk's memories in front, all of them visible
                        li, hi = cfg.memory_layers.index(layer), cfg.memory_heads.index(hk)
                        c = int(chunk[b, i - p] if chunk.dim() == 2 else chunk[i - p])
                        mk, mv = memory.keys[b, c, li, hi].double(), memory.values[b, c, li, hi].double()
                        if memory.mask is not None:
                            ok = memory.mask[b, c] if memory.mask.dim() == 3 else memory.mask[b, c, li, hi]
                            mk, mv = mk[ok], mv[ok]
                        keys, values = torch.cat([mk, keys]), torch.cat([mv, values])
                    y[i] = _softmax_attend(q[i], keys, values)
                heads.append(y)
            out[b] = torch.cat(heads, -1) @ blk.attn.wo.weight.detach().double().T
        if record is not None:
            record.append({"h": h, "k": ks, "v": vs})
        x = x + out
        m = _rms(x, blk.mlp_norm.weight, cfg.norm_eps)
        w = blk.mlp
        act = F.silu(m @ w.w_gate.weight.detach().double().T) * (m @ w.w_up.weight.detach().double().T)
        x = x + act @ w.w_down.weight.detach().double().T
    x = _rms(x, model.norm.weight, cfg.norm_eps)
    return (x @ model.lm_head.weight.detach().double().T)[:, p:]


def literal_selection(model, ref: list[int], k: int | None = None, *, softmax: bool = True,
                      pool: str = "sum") -> dict[str, torch.Tensor]:
    """§3.3 for one reference (token ids, no prefix); softmax=False: the paper's un-normalised approximation w_j = Σ_i
    exp(q_i·k_j/√d_h) (ranked by its log). pool="max" (the "headmax" selector, with softmax): each query head's w_j
    apart, the largest over the query heads that share the KV head instead of their sum. Returns float64 tensors over
    (L_mem, H_mem, ...): scores (L_mem, H_mem, R) = w_j; index (L_mem, H_mem, k) kept tokens in reading order; positions
    = p + index; keys (after RoPE) and values (L_mem, H_mem, k, d_h) of the kept tokens; all_keys, all_values (L_mem,
    H_mem, R, d_h) of every token."""
    cfg = model.cfg
    k = k or cfg.memory_tokens_per_head
    p, dh, g, R = len(cfg.reference_prefix_ids), cfg.head_dim, cfg.n_heads // cfg.n_kv_heads, len(ref)
    record: list = []
    # the reference after "<s>Reference:": token j at position p + j, i.e. context index j - 128
    literal_forward(model, torch.tensor([ref]), positions=torch.arange(R) - cfg.reference_length, record=record)
    Lm, Hm = len(cfg.memory_layers), len(cfg.memory_heads)
    scores = torch.zeros(Lm, Hm, R, dtype=torch.float64)
    index = torch.zeros(Lm, Hm, k, dtype=torch.long)
    all_keys = torch.stack([record[l]["k"][0, list(cfg.memory_heads), p:] for l in cfg.memory_layers])
    all_values = torch.stack([record[l]["v"][0, list(cfg.memory_heads), p:] for l in cfg.memory_layers])
    for li, layer in enumerate(cfg.memory_layers):
        blk = model.blocks[layer]
        X = record[layer]["h"][0, p:]  # the reference's own tokens: the prefix takes no part
        for hi, hk in enumerate(cfg.memory_heads):
            K = X @ _head(blk.attn.wk.weight, hk, dh).T  # no RoPE
            for hq in range(hk * g, (hk + 1) * g):  # the query heads that share KV head hk
                Q = X @ _head(blk.attn.wq.weight, hq, dh).T
                w_head = torch.zeros(R, dtype=torch.float64)
                for i in range(R):  # no causal mask: every token i spreads one unit of attention over all j
                    s = K @ Q[i] / math.sqrt(dh)
                    w_head += torch.softmax(s, 0) if softmax else torch.exp(s)
                if pool == "max":
                    scores[li, hi] = torch.maximum(scores[li, hi], w_head)
                else:
                    scores[li, hi] += w_head
            if not softmax:
                scores[li, hi] = scores[li, hi].log()
            w = scores[li, hi].tolist()
            kept = sorted(sorted(range(R), key=lambda j: (-w[j], j))[:k])
            index[li, hi, :len(kept)] = torch.tensor(kept)
    pick = index[..., None].expand(-1, -1, -1, dh)
    return {"scores": scores, "index": index, "positions": index + p, "keys": all_keys.gather(2, pick),
            "values": all_values.gather(2, pick), "all_keys": all_keys, "all_values": all_values}


def literal_disjoint(scores: list[list[float]], n_valid: int, k: int) -> list[set[int]]:
    """One reference, written out: k rounds; in each, heads 0, 1, ... keep their best token no head keeps yet (the
    earliest on ties), or, once every token is kept by some head, their best token they do not keep themselves.
    scores: [head][token] (the first n_valid tokens are the reference's). Returns each head's kept token indices."""
    H = len(scores)
    own = [set() for _ in range(H)]
    for _ in range(min(k, n_valid)):
        for h in range(H):
            taken = set().union(*own)
            free = [j for j in range(n_valid) if j not in own[h]]
            fresh = [j for j in free if j not in taken]
            pool = fresh or free
            if pool:
                own[h].add(max(pool, key=lambda j: (scores[h][j], -j)))
    return own
