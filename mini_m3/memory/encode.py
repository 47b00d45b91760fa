"""§3.3 writing explicit memory: `encode_references` turns reference texts into sparse attention key-values.

Each reference (≤ 128 tokens) runs, after the "<s>Reference:" prefix, through the memory layers only. For
every memory head (a KV head) of every memory layer we keep the `memory_tokens_per_head` tokens that receive
the most attention *within the reference*, scored with no causal mask and no RoPE so every position has an
equal chance (the prefix and padding take no part), summed over the query heads that share the KV head.
The kept keys are stored after RoPE, so they remain at their positions p..p+127 (parallel positions).

Selectors (for ablations): "attention" (the paper's softmax score), "exp" (the paper's un-normalised
approximation, ranked stably by log-sum-exp), "learned" (the same softmax score with the memory layer's learned
selection queries `Attention.select_q` as the askers: a named lever), "disjoint" (the softmax score, with the KV
heads of a layer taking turns to keep tokens no head keeps yet: a named lever), "headmax" (the softmax score of each
query head, the max over the query heads that share the KV head instead of their sum: a named lever), "random",
"first", and "all" (no token sparsification).
The selector and tokens per head default to the model's memory format (`Memory3Config.memory_selector`,
`memory_tokens_per_head`); explicit arguments override it (a bank refuses memories not in the model's format).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..config import MEMORY_SELECTORS as SELECTORS
from ..config import SCORED_SELECTORS
from ..model import Memory3, MemoryKV

LOG_SCORED = ("attention", "learned", "headmax")  # scored selectors whose score w_j > 0 is ranked as log w_j
SOFT_GATES = ("logit", "logit+value")  # what soft selection's slot weight g_j scales (encode_reference_tokens)


@dataclass
class ExplicitMemory:
    """Explicit memories of N references (shapes use L_mem memory layers, H_mem memory heads, k tokens).

    keys, values: (N, L_mem, H_mem, k, d_h) — keys after RoPE
    positions:    (N, L_mem, H_mem, k) long — absolute RoPE position of each kept token (p + index in reference)
    mask:         (N, L_mem, H_mem, k) bool — False for empty slots (reference shorter than k tokens)
    reference_ids:(N,) long — ids of the references in their bank (or -1)
    bias:         (N, L_mem, H_mem, k) float or None — soft selection in continual training only: each slot's
                  log-weight log g_j (see `soft_selection_bias`); None in the paper's hard format (banks, inference)
    selection:    (N, L_mem, H_mem, R) or None — selection distillation in training only: every token's log
                  selection score (log w_j, with autograd; the memory then keeps all R tokens in reading order)
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    reference_ids: torch.Tensor
    bias: torch.Tensor | None = None
    selection: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.keys.shape[0]

    @property
    def tokens_per_head(self) -> int:
        return self.keys.shape[3]

    FIELDS = ("keys", "values", "positions", "mask", "reference_ids", "bias", "selection")

    def _map(self, fn, fields=FIELDS) -> "ExplicitMemory":  # fn applied to the named fields that are set
        return ExplicitMemory(*(fn(getattr(self, f)) if f in fields and getattr(self, f) is not None
                                else getattr(self, f) for f in self.FIELDS))

    def __getitem__(self, idx) -> "ExplicitMemory":
        if isinstance(idx, int):
            idx = [idx]
        return self._map(lambda t: t[idx])

    @staticmethod
    def cat(memories: Sequence["ExplicitMemory"]) -> "ExplicitMemory":
        if not memories:
            raise ValueError("nothing to concatenate")
        for f in ("bias", "selection"):
            if len({getattr(m, f) is None for m in memories}) > 1:
                raise ValueError(f"cannot concatenate memories with and without {f} (training-only fields)")
        return ExplicitMemory(*(None if getattr(memories[0], f) is None else torch.cat([getattr(m, f) for m in memories])
                                for f in ExplicitMemory.FIELDS))

    def to(self, *args, **kw) -> "ExplicitMemory":
        """Move/cast keys and values (the other fields only move)."""
        dev = next((a for a in args if isinstance(a, (str, torch.device))), kw.get("device"))
        out = self._map(lambda t: t.to(*args, **kw), ("keys", "values"))
        return out if dev is None else out._map(lambda t: t.to(dev), self.FIELDS[2:])

    def detach(self) -> "ExplicitMemory":
        return self._map(lambda t: t.detach(), ("keys", "values", "bias", "selection"))

    def to_memory_kv(self, index: torch.Tensor) -> MemoryKV:
        """Lay memories out for one attention call. index: (B, C, n) rows of this object per chunk, -1 = none.
        Returns MemoryKV with keys (B, C, L_mem, H_mem, n·k, d_h) and the slot mask."""
        if index.dim() != 3:
            raise ValueError(f"index must be (batch, chunks, memories), got {tuple(index.shape)}")
        B, C, n = index.shape
        safe = index.clamp(min=0)
        k = self.keys[safe]  # (B, C, n, L, H, k, d)
        v = self.values[safe]
        m = self.mask[safe] & (index >= 0)[..., None, None, None]
        Lm, Hm, kk, d = k.shape[3:]
        k = k.permute(0, 1, 3, 4, 2, 5, 6).reshape(B, C, Lm, Hm, n * kk, d)
        v = v.permute(0, 1, 3, 4, 2, 5, 6).reshape(B, C, Lm, Hm, n * kk, d)
        m = m.permute(0, 1, 3, 4, 2, 5).reshape(B, C, Lm, Hm, n * kk)
        bias = None
        if self.bias is not None:  # soft selection: each slot's log-weight, laid out like the mask
            bias = self.bias[safe].permute(0, 1, 3, 4, 2, 5).reshape(B, C, Lm, Hm, n * kk)
        return MemoryKV(k, v, m, bias)


def reference_rows(index: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """Global reference ids -> rows of one freshly encoded batch: (the distinct ids `index` reads, sorted: encode
    them in this order; `index` with each id replaced by its row among them, -1 (none) kept)."""
    used = sorted({int(r) for r in index.flatten().tolist() if r >= 0})
    row_of = {r: i for i, r in enumerate(used)}
    return used, index.clone().apply_(lambda r: row_of.get(r, -1) if r >= 0 else -1)


def selection_scores(q_raw: torch.Tensor, k_raw: torch.Tensor, valid: torch.Tensor, n_groups: int,
                     selector: str = "attention", dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Score w_j of each reference token j for each KV head: the attention it receives from all tokens.

    q_raw: (N, H, R, d_h), k_raw: (N, H_kv, R, d_h), both without RoPE; valid: (N, R) real tokens.
    Returns (N, H_kv, R) — higher is better; invalid tokens get -inf.
    "attention": Σ_{i valid} Σ_{h in group} softmax_j(q_i·k_j/√d_h)  (softmax over valid j, no causal mask)
    "exp":       log Σ_{i, h} exp(q_i·k_j/√d_h)   (the paper's approximation; the log keeps the ranking)
    "headmax":   max_{h in group} Σ_{i valid} softmax_j(q_i·k_j/√d_h)  (a named lever: a token one query head
                 needs is not outvoted by the others; with one query head per KV head it is "attention")
    dtype: float64 (banks, evaluation): its rounding noise, which depends on the batch shape, stays far below
    select_top_tokens' float32 ranking, so a reference keeps the same tokens in any batch. float32 (continual
    training, 2-3x faster): near-ties may then break differently from batch to batch.
    The scores are computed in `dtype` on the inputs' device whatever autocast says (bf16 scores would tie often);
    on MPS, which has no float64, a float64 score is computed on the CPU.
    """
    device = q_raw.device
    if dtype == torch.float64 and device.type == "mps":  # no float64 there: score on the CPU, rank in float32 there
        with torch.autocast("cpu", enabled=False):
            scores = _selection_scores(q_raw.cpu(), k_raw.cpu(), valid.cpu(), n_groups, selector, dtype)
        return scores.float().to(device)
    with torch.autocast(device.type, enabled=False):
        return _selection_scores(q_raw, k_raw, valid, n_groups, selector, dtype)


def _selection_scores(q_raw, k_raw, valid, n_groups: int, selector: str, dtype: torch.dtype) -> torch.Tensor:
    N, H, R, dh = q_raw.shape
    k_rep = k_raw.to(dtype).repeat_interleave(n_groups, dim=1)  # (N, H, R, d)
    logits = q_raw.to(dtype) @ k_rep.transpose(-1, -2) / math.sqrt(dh)  # (N, H, R_i, R_j)
    key_ok = valid[:, None, None, :]
    query_ok = valid[:, None, :, None]
    if selector in ("attention", "headmax"):
        a = torch.softmax(logits.masked_fill(~key_ok, float("-inf")), dim=-1)
        a = a.masked_fill(~query_ok | ~key_ok, 0.0)
        per_head = a.sum(2).view(N, H // n_groups, n_groups, R)  # (N, H_kv, group, R) attention each head pays j
        w = per_head.sum(2) if selector == "attention" else per_head.amax(2)
    elif selector == "exp":
        lg = logits.masked_fill(~query_ok, float("-inf")).view(N, H // n_groups, n_groups * R, R)
        w = torch.logsumexp(lg, dim=2)
    else:
        raise ValueError(f"selection_scores handles 'attention', 'headmax' and 'exp', not {selector!r}")
    return w.masked_fill(~valid[:, None, :], float("-inf"))


def question_selection_scores(queries: torch.Tensor, k_raw: torch.Tensor, valid: torch.Tensor, n_groups: int,
                              dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The paper's score with other askers: w_j = Σ_p Σ_{h in group} softmax_j(u_p,h·k_j/√d_h), the attention
    token j receives from P given queries u (no RoPE, no mask) instead of from the reference's own tokens.

    queries: (P, H, d_h), e.g. the memory layer's queries where training text asks for an answer
    (`experiments/reading_levers.py questions`, a named lever, not the paper's format); k_raw: (N, H_kv, R, d_h)
    without RoPE; valid: (N, R). Returns (N, H_kv, R), -inf on padding. Given a reference's own queries (P = R,
    one reference, no padding) it is `selection_scores`."""
    N, Hkv, R, dh = k_raw.shape
    if queries.dim() != 3 or queries.shape[1] != Hkv * n_groups or queries.shape[2] != dh:
        raise ValueError(f"queries must be (P, {Hkv * n_groups}, {dh}), got {tuple(queries.shape)}")
    if dtype == torch.float64 and k_raw.device.type == "mps":  # no float64 there, as in `selection_scores`
        return question_selection_scores(queries.cpu(), k_raw.cpu(), valid.cpu(), n_groups, dtype).float().to(
            k_raw.device)
    with torch.autocast(k_raw.device.type, enabled=False):
        k_rep = k_raw.to(dtype).repeat_interleave(n_groups, dim=1)  # (N, H, R, d)
        logits = torch.einsum("phd,nhrd->nhpr", queries.to(k_rep), k_rep) / math.sqrt(dh)  # (N, H, P, R)
        a = torch.softmax(logits.masked_fill(~valid[:, None, None, :], float("-inf")), dim=-1)
        w = a.sum(2).view(N, Hkv, n_groups, R).sum(2)
    return w.masked_fill(~valid[:, None, :], float("-inf"))


def select_top_tokens(scores: torch.Tensor, valid: torch.Tensor, k: int, selector: str = "attention",
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the kept tokens per head, in reading order. scores: (N, H_kv, R) (ignored for "random" and
    "first"); valid: (N, R). Returns (index (N, H_kv, k) long, kept (N, H_kv, k) bool)."""
    N, Hkv, R = scores.shape
    if selector in SCORED_SELECTORS:
        # equal tokens (e.g. a repeated word in the first layer) have equal scores only up to float64 rounding,
        # which varies with the batch shape and the CPU: ranked in float32 they tie, and ties go to the earlier token
        s = scores.float()
    elif selector == "random":
        s = torch.rand(N, Hkv, R, generator=generator, dtype=torch.float64).to(scores.device)
        s = s.masked_fill(~valid[:, None, :], float("-inf"))
    elif selector in ("first", "all"):
        s = (-torch.arange(R, device=scores.device, dtype=torch.float64)).expand(N, Hkv, R)
        s = s.masked_fill(~valid[:, None, :], float("-inf"))
    elif selector == "disjoint":
        s = disjoint_choice(scores.float(), valid, k).double().log()  # 0 on the chosen tokens, -inf elsewhere
    else:
        raise ValueError(f"unknown selector {selector!r}; choose from {SELECTORS}")
    kk = min(k, R)
    values, order = s.sort(dim=-1, descending=True, stable=True)  # ties go to the earlier token
    values, index = values[..., :kk], order[..., :kk]
    kept = torch.isfinite(values)
    index = index.masked_fill(~kept, R)  # sort empty slots last
    index, order = index.sort(dim=-1)
    kept = kept.gather(-1, order)
    index = index.masked_fill(~kept, 0)
    if kk < k:  # reference shorter than k: pad with empty slots
        pad = k - kk
        index = torch.cat([index, index.new_zeros(N, Hkv, pad)], -1)
        kept = torch.cat([kept, kept.new_zeros(N, Hkv, pad)], -1)
    return index, kept


def disjoint_choice(scores: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """The "disjoint" selector's choice (a named lever, not the paper's): the KV heads of a memory layer divide a
    reference's tokens among themselves. In each of k rounds, heads 0, 1, ... in turn keep their best-scored token
    (by the paper's attention received) that no head keeps yet; once every token is kept by some head, a head takes
    its best token it does not keep itself. So a layer keeps min(H k, R) distinct tokens where the paper's top-k
    per head may keep the same token in several heads. scores: (N, H, R), -inf on padding; valid: (N, R).
    Returns (N, H, R) bool, at most k tokens per head; ties go to the earlier token."""
    N, H, R = scores.shape
    rows = torch.arange(N, device=scores.device)
    own = torch.zeros(N, H, R, dtype=torch.bool, device=scores.device)  # (N, H, R) kept by head h
    taken = torch.zeros(N, R, dtype=torch.bool, device=scores.device)  # (N, R) kept by any head
    for _ in range(min(k, R)):
        for h in range(H):
            free = valid & ~own[:, h]  # (N, R) tokens head h could still keep
            fresh = free & ~taken
            use = torch.where(fresh.any(-1, keepdim=True), fresh, free)
            j = scores[:, h].masked_fill(~use, float("-inf")).argmax(-1)  # (N,) the first best
            ok = use.any(-1)
            own[rows, h, j] |= ok
            taken[rows, j] |= ok
    return own


def soft_selection_bias(scores: torch.Tensor, index: torch.Tensor, kept: torch.Tensor, k: int, selector: str,
                        temperature: float) -> torch.Tensor:
    """Log-weights log g_j of the gathered tokens under soft selection, a training-time relaxation of the top-k
    (the paper leaves gradients through the selection open, spec open item 4):

        g_j = sigmoid((s_j - τ) / T),   s_j = log w_j ("attention", "learned", "headmax") or the "exp" score,

    τ halfway between the k-th and (k+1)-th best s of the head (no gradient). The k best tokens weigh ~1 and the
    others less the further they fall below; as T → 0 this is the paper's hard top-k. With T > 0 the loss reaches
    every token's selection score, so training can move which tokens the hard top-k keeps: no labels are used.
    scores: (N, H, R) selection scores (with autograd), -inf on padding; index, kept: (N, H, R') the gathered
    tokens (`select_top_tokens`). Returns (N, H, R') log-weights, 0 on empty slots."""
    if temperature <= 0:
        raise ValueError(f"soft selection needs a temperature > 0, got {temperature}")
    s = scores.clamp_min(1e-30).log() if selector in LOG_SCORED else scores.clamp_min(-1e30)
    best = s.detach().sort(dim=-1, descending=True).values  # (N, H, R)
    if best.shape[-1] <= k:  # a reference of at most k tokens keeps them all
        return torch.zeros(index.shape, dtype=s.dtype, device=s.device)
    tau = (best[..., k - 1:k] + best[..., k:k + 1]) / 2  # (N, H, 1)
    log_g = F.logsigmoid((s - tau) / temperature).gather(-1, index)  # (N, H, R')
    return log_g.masked_fill(~kept, 0.0)


@torch.no_grad()
def init_selection_queries(model: Memory3, ref_ids: Sequence[Sequence[int]], seed: int = 0) -> None:
    """Start the "learned" selector's queries (`Attention.select_q`, (P, H, d_h) per memory layer) as the paper's
    askers: each is the un-rotated query of a token drawn at random from `ref_ids` (references, as
    `Tokenizer.encode_references` gives them), so that training starts near the paper's score (attention received
    from a reference's own tokens) instead of from noise."""
    cfg = model.cfg
    P = cfg.memory_selection_queries
    if not P:
        raise ValueError("this model has no learned selection queries (Memory3Config.memory_selection_queries = 0)")
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randint(len(ref_ids), (P,), generator=gen).tolist()
    rows = [list(ref_ids[i]) for i in pick]
    R = max(map(len, rows))
    ids = torch.zeros(P, R, dtype=torch.long)  # right padding is harmless: no real token sees a later one
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.as_tensor(r)
    pos = torch.tensor([int(torch.randint(len(r), (1,), generator=gen)) for r in rows])
    device = model.tok_emb.weight.device
    for li, layer in enumerate(model.encode_reference_layers(ids.to(device))):
        q = layer["q_raw"][torch.arange(P), :, pos.to(device)]  # (P, H, d_h)
        model.blocks[cfg.memory_layers[li]].attn.select_q.copy_(q)


def encode_reference_tokens(model: Memory3, ref_ids: Sequence[Sequence[int]] | torch.Tensor, *,
                            selector: str | None = None, tokens_per_head: int | None = None,
                            generator: torch.Generator | None = None, pad_id: int = 0,
                            reference_ids: Sequence[int] | None = None,
                            score_dtype: torch.dtype = torch.float64,
                            soft_temperature: float = 0.0, keep_scores: bool = False,
                            force: torch.Tensor | None = None,
                            score_queries: Sequence[torch.Tensor] | None = None,
                            soft_gate: str = "logit") -> ExplicitMemory:
    """Encode references given as token ids (no BOS: the "<s>Reference:" prefix plays that role), in the model's
    memory format unless `selector` / `tokens_per_head` say otherwise.
    Gradients flow into keys and values when autograd is on (used by continual training, §3.6).
    score_dtype: precision of the selection scores (see `selection_scores`).
    soft_temperature > 0 (training only, `TrainConfig.soft_selection`): keep every token, each with the log-weight
    of `soft_selection_bias` in `ExplicitMemory.bias`, and let gradients reach the selection scores.
    soft_gate (with soft_temperature > 0; `TrainConfig.soft_selection_gate`): "logit" (the log-weight joins the slot's
    attention score only; the reader can outbid it with a larger q·k) or "logit+value" (the stored value is also
    multiplied by the weight g_j, so a barely selected token adds at most g_j v_j whatever attention it gets: the
    loss can only read it by raising its selection score). Both are the hard top-k as the temperature reaches 0.
    keep_scores (training only, `TrainConfig.selection_distill`): keep every token and return each token's log
    selection score, with autograd, in `ExplicitMemory.selection`.
    force: (N, R) bool, tokens every memory head keeps before the ranking fills its other slots (earliest first
    if more than k): a diagnostic of what a kept set holds (`experiments/reading_levers.py forced`), never part
    of the model's format. Only for the scored selectors ("attention", "exp", "learned") with a hard top-k.
    score_queries: one (P, H, d_h) tensor per memory layer: rank tokens by the attention they receive from these
    queries (`question_selection_scores`) instead of from the reference's own tokens; only with the "attention"
    selector and a hard top-k (a named lever for experiments, not the paper's format)."""
    cfg = model.cfg
    selector, k = cfg.written_format(selector, tokens_per_head)
    soft = soft_temperature > 0
    if (soft or keep_scores) and selector not in SCORED_SELECTORS:
        raise ValueError(f"soft selection relaxes a scored top-k {SCORED_SELECTORS}, not selector {selector!r}")
    if soft_gate not in SOFT_GATES:
        raise ValueError(f"soft_gate must be one of {list(SOFT_GATES)}, got {soft_gate!r}")
    device = model.tok_emb.weight.device
    if isinstance(ref_ids, torch.Tensor):
        ids = ref_ids.to(device)
        valid = ids != pad_id
    else:
        lens = [len(r) for r in ref_ids]
        for i, n in enumerate(lens):
            if n == 0:
                raise ValueError(f"reference {i} is empty")
            if n > cfg.reference_length:
                raise ValueError(f"reference {i} has {n} tokens > reference_length={cfg.reference_length}; "
                                 f"split it first (mini_m3.data.text.chunk_references)")
        R = max(lens)
        ids = torch.full((len(ref_ids), R), pad_id, dtype=torch.long)
        for i, r in enumerate(ref_ids):
            ids[i, :len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        ids = ids.to(device)
        valid = torch.arange(R, device=device)[None] < torch.tensor(lens, device=device)[:, None]
    N, R = ids.shape
    if force is not None:
        if soft or keep_scores or selector not in SCORED_SELECTORS:
            raise ValueError(f"force needs a hard scored top-k {SCORED_SELECTORS}, not selector {selector!r}"
                             + (" with a relaxed selection" if soft or keep_scores else ""))
        if tuple(force.shape) != (N, R) or force.dtype != torch.bool:
            raise ValueError(f"force must be a bool tensor of shape {(N, R)}, got {force.dtype} {tuple(force.shape)}")
        force = force.to(device) & valid
    if score_queries is not None:
        if soft or keep_scores or selector != "attention":
            raise ValueError(f"score_queries needs the hard 'attention' top-k, not selector {selector!r}"
                             + (" with a relaxed selection" if soft or keep_scores else ""))
        if len(score_queries) != len(cfg.memory_layers):
            raise ValueError(f"score_queries needs one (P, H, d_h) tensor per memory layer "
                             f"({len(cfg.memory_layers)}), got {len(score_queries)}")
    layers = model.encode_reference_layers(ids)
    heads = torch.tensor(cfg.memory_heads, device=device)
    keys, values, positions, masks, biases, log_scores = [], [], [], [], [], []
    relaxed = soft or keep_scores  # keep every token (training's relaxed selection)
    for li, layer in enumerate(layers):
        if score_queries is not None:
            scores = question_selection_scores(score_queries[li].to(device), layer["k_raw"].detach(), valid,
                                               cfg.n_query_groups, score_dtype)[:, heads]
        elif selector == "learned":  # attention received from the layer's learned selection queries (a lever)
            k_sel = layer["k_raw"] if relaxed else layer["k_raw"].detach()
            q_sel = model.blocks[cfg.memory_layers[li]].attn.select_q
            scores = question_selection_scores(q_sel if relaxed else q_sel.detach(), k_sel, valid, cfg.n_query_groups,
                                               score_dtype)[:, heads]
        elif selector in ("attention", "exp", "disjoint", "headmax"):
            # the hard top-k choice is not differentiable: scoring without autograd keeps its (N, H, R, R) matrices
            # out of the backward graph (~11 MiB per reference per memory layer at paper-2.4b); soft selection
            # needs them there
            qk = (layer["q_raw"], layer["k_raw"]) if relaxed else (layer["q_raw"].detach(), layer["k_raw"].detach())
            how = selector if selector in ("exp", "headmax") else "attention"  # "disjoint" divides the paper's score
            scores = selection_scores(*qk, valid, cfg.n_query_groups, how, score_dtype)[:, heads]
        else:
            scores = torch.zeros(N, len(cfg.memory_heads), R, device=device)
        if force is not None:  # above every score; earlier forced tokens first (ties go to the earlier token)
            scores = scores.masked_fill(force[:, None, :], 1e30)
        index, kept = select_top_tokens(scores.detach(), valid, R if relaxed else k, selector, generator)  # (N, H_mem, k)
        gate = None
        if soft:
            biases.append(soft_selection_bias(scores, index, kept, k, selector, soft_temperature))
            if soft_gate == "logit+value":
                gate = biases[-1].exp()[..., None]  # (N, H_mem, R, 1) g_j, 1 on empty slots (zeroed below)
        if keep_scores:  # (N, H_mem, R) log w_j, very negative on padding
            log_scores.append(scores.clamp_min(1e-30).log() if selector in LOG_SCORED
                              else scores.clamp_min(-1e4))
        gather = index[..., None].expand(-1, -1, -1, cfg.head_dim)
        keys.append(layer["k"][:, heads].gather(2, gather))
        values.append(layer["v"][:, heads].gather(2, gather) * (1 if gate is None else gate))
        positions.append(index + cfg.prefix_length)
        masks.append(kept)
    ref_tensor = torch.as_tensor(list(reference_ids) if reference_ids is not None else [-1] * N, dtype=torch.long)
    mem = ExplicitMemory(torch.stack(keys, 1), torch.stack(values, 1), torch.stack(positions, 1),
                         torch.stack(masks, 1), ref_tensor, torch.stack(biases, 1) if soft else None,
                         torch.stack(log_scores, 1) if keep_scores else None)
    mem.keys = mem.keys * mem.mask[..., None]  # empty slots hold zeros (they are masked out anyway)
    mem.values = mem.values * mem.mask[..., None]
    return mem


@torch.no_grad()
def encode_references(model: Memory3, tokenizer, texts: Sequence[str], *, selector: str | None = None,
                      tokens_per_head: int | None = None, batch_size: int = 64, seed: int = 0,
                      reference_ids: Sequence[int] | None = None, progress: bool = False) -> ExplicitMemory:
    """Encode reference texts into explicit memories (batched, no gradients), in the model's memory format unless
    `selector` / `tokens_per_head` say otherwise. See the module docstring.

    An empty reference, or one longer than `reference_length` tokens, is refused with a ValueError (split
    long texts with `mini_m3.data.text.chunk_references` first).
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not one string")
    if len(texts) == 0:
        raise ValueError("no references to encode")
    ids = tokenizer.encode_references(list(texts))  # with the space after "Reference:"
    ref_ids = list(reference_ids) if reference_ids is not None else list(range(len(texts)))
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    out = []
    try:
        from tqdm.auto import tqdm
        for s in tqdm(range(0, len(ids), batch_size), disable=not progress, desc="encode references", unit="batch"):
            out.append(encode_reference_tokens(model, ids[s:s + batch_size], selector=selector,
                                               tokens_per_head=tokens_per_head, generator=gen,
                                               pad_id=tokenizer.pad_id, reference_ids=ref_ids[s:s + batch_size]))
    except ValueError as e:
        raise ValueError(f"{e} (batch starting at text {s})") from None
    finally:
        model.train(was_training)
    return ExplicitMemory.cat(out)
