"""§2 memory circuitry theory, Defs 1–3: computation graphs, their edge weights, homomorphisms and circuits.

**Def 1 (computation graph).** For a text t = (t_0 … t_n) the model reads the inputs t_0 … t_{n-1} and
predicts the targets t_1 … t_n. :func:`computation_graph` builds the weighted graph of that computation:

* nodes ``("x", depth, i)`` for depth 0 … 2L and input position i = 0 … n-1 (``i`` is also the index of
  the token t_i in the text). x^{2l} is the residual stream before attention layer l
  (``blocks.{l}.hook_resid_pre``), x^{2l+1} before MLP layer l (``hook_resid_mid``), x^{2L} the output.
  Node attributes: ``depth``, ``position``, ``token`` (the id of t_i).
* attention edges e_{i,j}^{l,h}: x_i^{2l} → x_j^{2l+1} for key position i ≤ query position j, one per head;
* MLP edges e_i^{l,m}: x_i^{2l+1} → x_i^{2l+2}, one per neuron m (the SwiGLU activation at ``mlp.hook_post``).

Several heads (and many neurons) join the same pair of nodes, so the graph is an
``nx.MultiDiGraph`` whose edge keys name the edge: ``("attn", l, h)`` or ``("mlp", l, m)``. Each edge also
carries ``kind``, ``layer``, ``head``/``neuron``, ``activation`` (the attention probability a_{j,i}^{l,h}
after softmax, or the neuron activation a_i^{l,m}), ``grad`` (∂ℒ/∂a) and ``weight``.

**The objective ℒ** is the log-likelihood of the targets, Σ_i log P(t_{i+1} | t_0 … t_i) (``reduction="sum"``,
the default; ``"mean"`` divides by the number of targets). ``loss_positions`` restricts the sum to some
input positions, e.g. the last one. It is a *log-likelihood*, so a positive weight means "this edge helps".

**Edge weight** (three options): ``"gradient"`` = ∂ℒ/∂a, from one backward pass through
``Memory3.run_with_cache(..., keep_grad=True)``; ``"gradient_x_activation"`` = a·∂ℒ/∂a, the first-order
estimate of the ablation effect; ``"ablation"`` = ℒ − ℒ|_{a=0}, the causal intervention, one forward pass
per edge (batched: each row of a batch zeroes a different edge). Attention edges are ablated *after* the
softmax without renormalising, exactly what the gradient differentiates.

**What is left out.** The "<s>Reference:" prefix keys (and, when ``memory`` is passed, the memory-slot keys)
sit in front of the context on the key axis but are not context positions, so they get no nodes and no
edges (their attention still takes part in the computation). Residual connections are not edges in Def 1,
and neither are they here.

**Memory reads.** :func:`memory_read_graph` adds what :func:`computation_graph` leaves out for explicit memory:
one node ``("m", 2l, b, r)`` per kept token (memory b, reference position r) at depth 2l of memory layer l,
and one *memory-read edge* per (query head h, memory slot, query position j) into ``x_j^{2l+1}``, labelled
``("mem", l, h)`` and weighted by ablation. Its nodes have negative ``position`` attributes, so the Def 2
search treats each kept reference token as one more position; ``nx.compose`` with a context graph joins the
two on the shared query nodes.

**Def 2 (homomorphism).** :func:`find_homomorphism` / :func:`is_homomorphic` search for a node map f that
keeps depths, sends all nodes of one position to one position (f(x_i^d) = x_{π(i)}^d for a position map π,
not necessarily injective) and sends every edge to an edge with the same label (kind, layer, head or neuron).
The search backtracks over π, pruned by node existence and edge labels.

**Def 3 (circuit)** is an equivalence class of mutually homomorphic subgraphs with non-negligible weights:
:func:`prune` keeps the heavy edges, :func:`find_subgraphs_homomorphic_to` finds the members of a pattern's
class inside a graph, :func:`induction_pattern` is Example 4's pattern, :func:`associated_inputs` and
:func:`associated_outputs` give Def 1's t_in(S) and t_out(S).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Hashable, Iterable, Iterator, Sequence

import networkx as nx
import torch

from ..memory.encode import ExplicitMemory
from ..model import Memory3, MemoryKV

WEIGHTS = ("gradient", "gradient_x_activation", "ablation")

# An edge of Def 1 as a plain tuple (used for candidate lists and ablations):
#   ("attn", layer, head, key_pos i, query_pos j)   or   ("mlp", layer, neuron, pos i)
# and a memory read: ("mem", layer, head, slot s, query_pos j), s along the call's C·M memory slots
#   (s = None: every slot, the head's whole memory read at j; j = None: at every query position)
EdgeSpec = tuple


def node(depth: int, position: int) -> tuple[str, int, int]:
    """The node x_position^depth of Def 1."""
    return ("x", depth, position)


# ----------------------------------------------------------------------------------------------- helpers
def _as_ids(ids) -> torch.Tensor:
    t = ids.detach().cpu() if isinstance(ids, torch.Tensor) else torch.as_tensor(list(ids))
    if t.dim() == 2 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 1 or t.numel() < 2:
        raise ValueError(f"ids must be one text of at least 2 token ids (inputs + targets), got shape {tuple(t.shape)}")
    return t.long()


def memory_kwargs(memory: ExplicitMemory | MemoryKV | None, n_tokens: int, batch: int = 1,
                  device: torch.device | None = None) -> dict:
    """Keyword arguments that make every one of ``n_tokens`` context tokens read ``memory``.

    ``ExplicitMemory``: all its memories go into one chunk that every token reads (``query_chunks`` = 0);
    ``MemoryKV``: passed as given (batch 1 is expanded to ``batch``), with the model's default chunking.
    """
    if memory is None:
        return {}
    if isinstance(memory, ExplicitMemory):
        n = len(memory)
        kv = memory.to_memory_kv(torch.arange(n, device=memory.keys.device).view(1, 1, n))
        qc = torch.zeros(n_tokens, dtype=torch.long, device=device if device is not None else memory.keys.device)
    elif isinstance(memory, MemoryKV):
        kv, qc = memory, None
    else:
        raise TypeError(f"memory must be ExplicitMemory or MemoryKV, got {type(memory).__name__}")
    if kv.keys.shape[0] != batch:
        if kv.keys.shape[0] != 1:
            raise ValueError(f"memory has batch {kv.keys.shape[0]}, need 1 or {batch}")
        kv = MemoryKV(kv.keys.expand(batch, *kv.keys.shape[1:]), kv.values.expand(batch, *kv.values.shape[1:]),
                      None if kv.mask is None else kv.mask.expand(batch, *kv.mask.shape[1:]))
    out = {"memory": kv}
    if qc is not None:
        out["query_chunks"] = qc
    return out


def _memory_slots(kw: dict) -> int:
    kv = kw.get("memory")
    return 0 if kv is None else kv.n_chunks * kv.slots


def _token_loglik(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log P(target) at every position, float64: (B, T, V), (B, T) -> (B, T)."""
    return torch.log_softmax(logits.double(), -1).gather(-1, targets[..., None])[..., 0]


def _reduce(ll: torch.Tensor, loss_mask: torch.Tensor, reduction: str) -> torch.Tensor:
    total = (ll * loss_mask).sum(-1)
    return total / loss_mask.sum() if reduction == "mean" else total


def _ensure_grad(x: torch.Tensor, hook) -> torch.Tensor | None:
    """Make a hooked activation a differentiable variable even when the parameters are frozen."""
    return None if x.requires_grad else x.detach().requires_grad_()


def _edge_hook_names(model: Memory3) -> list[str]:
    L = model.cfg.n_layers
    return [f"blocks.{l}.attn.hook_pattern" for l in range(L)] + [f"blocks.{l}.mlp.hook_post" for l in range(L)]


def _zero_entries(index: torch.Tensor) -> Callable:
    def fn(x: torch.Tensor, hook) -> torch.Tensor:
        x = x.clone()
        x[tuple(index)] = 0
        return x
    return fn


def ablated_logliks(model: Memory3, ids, edges: Sequence[EdgeSpec], *, memory=None, fwd_hooks=(),
                    batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-target log-likelihoods with each edge zeroed in turn (Def 1's causal intervention).

    Returns (base (T,), ablated (E, T)) in float64, where T = len(ids) - 1 and row e of ``ablated`` is the
    run with ``edges[e]`` zeroed. A memory-read edge ("mem", l, h, s, j) zeroes head h's attention from query
    j to memory slot s in memory layer l (s = None: to every slot; j = None: from every query position).
    Edges are batched ``batch_size`` at a time; every batch also carries one un-ablated row, so ``base`` and
    ``ablated`` come from identical arithmetic.
    """
    ids = _as_ids(ids)
    device = model.tok_emb.weight.device
    inp, tgt = ids[:-1][None].to(device), ids[1:][None].to(device)
    T = inp.shape[1]
    slots = _memory_slots(memory_kwargs(memory, T, 1, device))
    base, rows = None, []
    edges = list(edges)
    starts = range(0, max(len(edges), 1), batch_size)
    for s in starts:
        chunk = edges[s:s + batch_size]
        B = len(chunk) + 1  # row 0 = no ablation
        attn, mlp = defaultdict(list), defaultdict(list)
        for b, e in enumerate(chunk, start=1):
            if e[0] == "attn":
                _, l, h, i, j = e
                if not i <= j:
                    raise ValueError(f"attention edge {e} needs key position i <= query position j")
                attn[l].append((b, h, j, model.key_index(l, i, slots)))
            elif e[0] == "mlp":
                _, l, m, i = e
                mlp[l].append((b, i, m))
            elif e[0] == "mem":
                _, l, h, s_, j = e
                if l not in model.cfg.memory_layers or slots == 0:
                    raise ValueError(f"memory edge {e} needs a memory layer and a memory to read")
                for k in (range(slots) if s_ is None else [s_]):
                    if not 0 <= k < slots:
                        raise ValueError(f"memory edge {e}: slot must be in [0, {slots})")
                    for q in (range(T) if j is None else [j]):
                        attn[l].append((b, h, q, model.cfg.prefix_length + k))
            else:
                raise ValueError(f"unknown edge {e!r}; expected ('attn', l, h, i, j), ('mlp', l, m, i) "
                                 f"or ('mem', l, h, s, j)")
        hooks = list(fwd_hooks)
        hooks += [(f"blocks.{l}.attn.hook_pattern", _zero_entries(torch.tensor(r).T)) for l, r in attn.items()]
        hooks += [(f"blocks.{l}.mlp.hook_post", _zero_entries(torch.tensor(r).T)) for l, r in mlp.items()]
        with torch.no_grad(), model.hooks(hooks):
            out = model(inp.expand(B, T), impl="plain", **memory_kwargs(memory, T, B, device))
        ll = _token_loglik(out.logits, tgt.expand(B, T)).cpu()
        if base is None:
            base = ll[0]
        rows.append(ll[1:])
    return base, torch.cat(rows, 0)


# ----------------------------------------------------------------------------------------------- Def 1
def computation_graph(model: Memory3, ids, *, weight: str = "gradient", attention_threshold: float = 0.0,
                      neuron_top_k: int | None = None, positions: Iterable[int] | None = None,
                      memory: ExplicitMemory | MemoryKV | None = None, edges: Iterable[EdgeSpec] | None = None,
                      loss_positions: Iterable[int] | None = None, reduction: str = "sum",
                      fwd_hooks=(), ablation_batch_size: int = 256) -> nx.MultiDiGraph:
    """Def 1's weighted computation graph of ``model`` on one text ``ids`` (token ids, ``<s>`` included).

    weight:              "gradient" (∂ℒ/∂a), "gradient_x_activation" (a·∂ℒ/∂a) or "ablation" (ℒ − ℒ|_{a=0}).
    attention_threshold: keep attention edges whose probability a_{j,i}^{l,h} ≥ this (0 keeps every i ≤ j).
    neuron_top_k:        keep, per (layer, position), the k neurons with the largest |weight| (for "ablation",
                         the largest |a·∂ℒ/∂a|, chosen before ablating); None keeps all W neurons.
    positions:           restrict nodes and edges to these input positions (both ends of every edge).
    memory:              explicit memory read by the text (see :func:`memory_kwargs`); its slots get no nodes.
    edges:               optional candidate list of edge tuples ("attn", l, h, i, j) / ("mlp", l, m, i); only
                         these are put in the graph (the cheap way to ablate a few edges).
    loss_positions:      input positions whose next-token log-likelihood enters ℒ (default: all).
    reduction:           "sum" (total log-likelihood) or "mean".
    fwd_hooks:           extra (name, fn) hooks active during every pass (e.g. an intervention).

    The graph's ``graph`` dict records ``ids``, ``weight``, ``objective`` (ℒ), ``reduction``,
    ``loss_positions``, ``n_layers``.
    """
    if weight not in WEIGHTS:
        raise ValueError(f"weight must be one of {WEIGHTS}, got {weight!r}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    cfg = model.cfg
    L, W = cfg.n_layers, cfg.mlp_width
    ids = _as_ids(ids)
    device = model.tok_emb.weight.device
    inp, tgt = ids[:-1][None].to(device), ids[1:][None].to(device)
    T = inp.shape[1]
    pos = sorted(set(range(T) if positions is None else (int(p) for p in positions)))
    lpos = sorted(set(range(T) if loss_positions is None else (int(p) for p in loss_positions)))
    for name, ps in (("positions", pos), ("loss_positions", lpos)):
        if not ps or ps[0] < 0 or ps[-1] >= T:
            raise ValueError(f"{name} must be a non-empty subset of 0..{T - 1}, got {ps}")
    loss_mask = torch.zeros(T, dtype=torch.float64, device=device)
    loss_mask[lpos] = 1.0
    kw = memory_kwargs(memory, T, 1, device)
    slots = _memory_slots(kw)

    # ---- one forward, one backward: activations a and ∂ℒ/∂a at every hooked edge
    names = _edge_hook_names(model)
    with torch.enable_grad():
        out, cache = model.run_with_cache(inp, names=names, keep_grad=True, impl="plain",
                                          fwd_hooks=list(fwd_hooks) + [(n, _ensure_grad) for n in names], **kw)
        ll = _token_loglik(out.logits, tgt)[0]
        objective = _reduce(ll, loss_mask, reduction)
        tensors = [cache[n] for n in names]
        grads = torch.autograd.grad(objective, tensors, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads)]
    attn_a, attn_g, mlp_a, mlp_g = [], [], [], []
    for l in range(L):
        k0 = model.key_index(l, 0, slots)
        attn_a.append(tensors[l][0, :, :, k0:k0 + T].detach().double().cpu())  # (H, T_query j, T_key i)
        attn_g.append(grads[l][0, :, :, k0:k0 + T].double().cpu())
        mlp_a.append(tensors[L + l][0].detach().double().cpu())  # (T, W)
        mlp_g.append(grads[L + l][0].double().cpu())
    attn_a, attn_g = torch.stack(attn_a), torch.stack(attn_g)  # (L, H, T, T) indexed [l, h, j, i]
    mlp_a, mlp_g = torch.stack(mlp_a), torch.stack(mlp_g)  # (L, T, W)

    # ---- candidate edges
    in_pos = torch.zeros(T, dtype=torch.bool)
    in_pos[pos] = True
    keep_attn = torch.ones(T, T, dtype=torch.bool).tril() & in_pos[:, None] & in_pos[None, :]  # [j, i]
    keep_attn = keep_attn[None, None] & (attn_a >= attention_threshold)
    keep_mlp = in_pos[None, :, None].expand(L, T, W).clone()
    if edges is not None:
        want_attn = torch.zeros_like(keep_attn)
        want_mlp = torch.zeros_like(keep_mlp)
        for e in edges:
            if e[0] == "attn":
                _, l, h, i, j = e
                want_attn[l, h, j, i] = True
            elif e[0] == "mlp":
                _, l, m, i = e
                want_mlp[l, i, m] = True
            else:
                raise ValueError(f"unknown edge {e!r}")
        keep_attn &= want_attn
        keep_mlp &= want_mlp
    if weight == "gradient":
        attn_w, mlp_w = attn_g, mlp_g
    else:  # the first-order estimate, also used to rank neurons before an ablation
        attn_w, mlp_w = attn_g * attn_a, mlp_g * mlp_a
    if neuron_top_k is not None and neuron_top_k < W:
        score = mlp_w.abs().masked_fill(~keep_mlp, -1.0)
        top = score.topk(neuron_top_k, dim=-1).indices
        keep_mlp &= torch.zeros_like(keep_mlp).scatter(-1, top, True)
    attn_idx = keep_attn.nonzero().tolist()  # [l, h, j, i]
    mlp_idx = keep_mlp.nonzero().tolist()  # [l, i, m]
    if weight == "ablation":
        specs = [("attn", l, h, i, j) for l, h, j, i in attn_idx] + [("mlp", l, m, i) for l, i, m in mlp_idx]
        base, abl = ablated_logliks(model, ids, specs, memory=memory, fwd_hooks=fwd_hooks,
                                    batch_size=ablation_batch_size)
        lm = loss_mask.cpu()
        delta = _reduce(base[None], lm, reduction) - _reduce(abl, lm, reduction)  # ℒ − ℒ|_{a=0}
        attn_w = torch.zeros_like(attn_a)
        mlp_w = torch.zeros_like(mlp_a)
        for (l, h, j, i), d in zip(attn_idx, delta[:len(attn_idx)].tolist()):
            attn_w[l, h, j, i] = d
        for (l, i, m), d in zip(mlp_idx, delta[len(attn_idx):].tolist()):
            mlp_w[l, i, m] = d

    # ---- the graph
    G = nx.MultiDiGraph(ids=ids.tolist(), weight=weight, objective=float(objective.detach()), reduction=reduction,
                        loss_positions=lpos, n_layers=L)
    tokens = inp[0].tolist()
    for d in range(2 * L + 1):
        for i in pos:
            G.add_node(node(d, i), depth=d, position=i, token=tokens[i])
    for l, h, j, i in attn_idx:
        G.add_edge(node(2 * l, i), node(2 * l + 1, j), key=("attn", l, h), kind="attn", layer=l, head=h,
                   activation=float(attn_a[l, h, j, i]), grad=float(attn_g[l, h, j, i]),
                   weight=float(attn_w[l, h, j, i]))
    for l, i, m in mlp_idx:
        G.add_edge(node(2 * l + 1, i), node(2 * l + 2, i), key=("mlp", l, m), kind="mlp", layer=l, neuron=m,
                   activation=float(mlp_a[l, i, m]), grad=float(mlp_g[l, i, m]), weight=float(mlp_w[l, i, m]))
    return G


def memory_read_graph(model: Memory3, ids, memory: ExplicitMemory, *, query_positions: Iterable[int] | None = None,
                      loss_positions: Iterable[int] | None = None, reduction: str = "sum",
                      min_attention: float = 0.0, reference_tokens: Sequence[Sequence[int]] | None = None,
                      per_head: bool = False, fwd_hooks=(), ablation_batch_size: int = 256) -> nx.MultiDiGraph:
    """The memory reads of one text as a Def 1-style graph, each edge weighted by ablation.

    ``memory`` (an :class:`ExplicitMemory` of n memories) is read by every token, as in
    :func:`memory_kwargs`: one chunk of n·k slots, slot s = memory b·k + kept token t. For every memory layer
    l, query head h whose KV head is a memory head, query position j in ``query_positions`` (default: all) and
    valid slot s whose attention a ≥ ``min_attention``, the graph has an edge

        ("m", 2l, b, r)  →  x_j^{2l+1}   key ("mem", l, h, s), kind "mem", Def 2 label ("mem", l, h),

    from the kept token (memory b, position r in its reference) to the query's node of Def 1. Edge data:
    ``layer``, ``head``, ``slot`` s, ``memory`` b, ``ref_position`` r, ``activation`` a, ``weight`` =
    ℒ − ℒ|_{a=0} (ℒ as in :func:`computation_graph`, over ``loss_positions``). Memory nodes carry ``depth``
    2l, ``position`` −1 − (b·R + r) (R = one more than the largest reference position, so distinct tokens are
    distinct positions for Def 2), ``memory``, ``ref_position`` and ``token`` (the id from
    ``reference_tokens[b][r]`` when given, else None). The graph records ``ids``, ``weight`` ("ablation"),
    ``objective``, ``reduction``, ``loss_positions``, ``n_layers``.

    ``per_head=True`` merges the slots of one head: one edge per (l, h, j), ``slot`` None, ``activation`` the
    head's total attention to memory at j, ``weight`` the ablation of that whole read (every slot zeroed at
    once, so redundant slots count together), drawn from the node of the slot it attends most (``top_slot``).
    """
    if not isinstance(memory, ExplicitMemory):
        raise TypeError(f"memory must be an ExplicitMemory, got {type(memory).__name__}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    cfg = model.cfg
    ids = _as_ids(ids)
    device = model.tok_emb.weight.device
    T = len(ids) - 1
    qpos = sorted(set(range(T) if query_positions is None else (int(p) for p in query_positions)))
    lpos = sorted(set(range(T) if loss_positions is None else (int(p) for p in loss_positions)))
    for name, ps in (("query_positions", qpos), ("loss_positions", lpos)):
        if not ps or ps[0] < 0 or ps[-1] >= T:
            raise ValueError(f"{name} must be a non-empty subset of 0..{T - 1}, got {ps}")
    kw = memory_kwargs(memory, T, 1, device)
    names = [f"blocks.{l}.attn.hook_pattern" for l in cfg.memory_layers]
    with torch.no_grad():
        _, cache = model.run_with_cache(ids[:-1][None].to(device), names=names, impl="plain",
                                        fwd_hooks=list(fwd_hooks), **kw)
    k, p0 = memory.tokens_per_head, cfg.prefix_length
    R = int(memory.positions.max()) - p0 + 1
    g = cfg.n_query_groups
    specs, meta = [], []
    for li, l in enumerate(cfg.memory_layers):
        pat = cache[f"blocks.{l}.attn.hook_pattern"][0].double().cpu()  # (H, T, keys)
        for h in range(cfg.n_heads):
            if h // g not in cfg.memory_heads:
                continue
            hi = cfg.memory_heads.index(h // g)
            if per_head:
                valid = memory.mask[:, li, hi].reshape(-1).cpu()  # slot s = b·k + t
                for j in qpos:
                    a_s = pat[h, j, p0:p0 + valid.numel()] * valid
                    if float(a_s.sum()) >= min_attention:
                        top = int(a_s.argmax())
                        specs.append(("mem", l, h, None, j))
                        meta.append((li, hi, top // k, top % k, float(a_s.sum())))
                continue
            for b in range(len(memory)):
                for t in range(k):
                    if not bool(memory.mask[b, li, hi, t]):
                        continue
                    s = b * k + t
                    for j in qpos:
                        a = float(pat[h, j, p0 + s])
                        if a >= min_attention:
                            specs.append(("mem", l, h, s, j))
                            meta.append((li, hi, b, t, a))
    loss_mask = torch.zeros(T, dtype=torch.float64)
    loss_mask[lpos] = 1.0
    base, abl = ablated_logliks(model, ids, specs, memory=memory, fwd_hooks=fwd_hooks,
                                batch_size=ablation_batch_size)
    objective = float(_reduce(base, loss_mask, reduction))
    delta = (objective - _reduce(abl, loss_mask, reduction)).tolist() if specs else []
    G = nx.MultiDiGraph(ids=ids.tolist(), weight="ablation", objective=objective, reduction=reduction,
                        loss_positions=lpos, n_layers=cfg.n_layers)
    tokens = ids[:-1].tolist()
    for (_, l, h, s, j), (li, hi, b, t, a), w in zip(specs, meta, delta):
        r = int(memory.positions[b, li, hi, t]) - p0
        u = ("m", 2 * l, b, r)
        if u not in G:
            G.add_node(u, depth=2 * l, position=-1 - (b * R + r), memory=b, ref_position=r,
                       token=None if reference_tokens is None else int(reference_tokens[b][r]))
        v = node(2 * l + 1, j)
        if v not in G:
            G.add_node(v, depth=2 * l + 1, position=j, token=tokens[j])
        G.add_edge(u, v, key=("mem", l, h, s), kind="mem", layer=l, head=h, slot=s, memory=b, ref_position=r,
                   activation=a, weight=w, top_slot=b * k + t)
    return G


def prune(graph: nx.MultiDiGraph, threshold: float | None = None, top_k: int | None = None, *,
          drop_isolated: bool = True) -> nx.MultiDiGraph:
    """Keep the edges with |weight| ≥ ``threshold`` and then (if given) only the ``top_k`` largest |weight|.

    With ``drop_isolated`` nodes left without edges go too, giving the subgraph *induced by* the heavy edges
    (Def 3 (iii), Assumption 1). A larger threshold or smaller top_k never keeps more edges.
    """
    edges = [(u, v, k, abs(d.get("weight", 0.0))) for u, v, k, d in _edges(graph)]
    if threshold is not None:
        edges = [e for e in edges if e[3] >= threshold]
    if top_k is not None:
        edges = sorted(edges, key=lambda e: -e[3])[:max(top_k, 0)]
    H = graph.__class__()
    H.graph.update(graph.graph)
    if not drop_isolated:
        H.add_nodes_from(graph.nodes(data=True))
    for u, v, k, _ in edges:
        H.add_node(u, **graph.nodes[u])
        H.add_node(v, **graph.nodes[v])
        if graph.is_multigraph():
            H.add_edge(u, v, key=k, **graph.edges[u, v, k])
        else:
            H.add_edge(u, v, **graph.edges[u, v])
    return H


def edge_specs(subgraph: nx.Graph) -> list[EdgeSpec]:
    """The edges of a (sub)graph of Def 1 as tuples ("attn", l, h, i, j) / ("mlp", l, m, i), and memory reads
    of :func:`memory_read_graph` as ("mem", l, h, slot, j)."""
    out = []
    for u, v, k, d in _edges(subgraph):
        lab = edge_label(k, d)
        if lab[0] == "mem":
            out.append(("mem", lab[1], lab[2], d["slot"], _depth_pos(subgraph, v)[1]))
            continue
        iu, iv = _depth_pos(subgraph, u)[1], _depth_pos(subgraph, v)[1]
        out.append((lab[0], lab[1], lab[2], iu, iv) if lab[0] == "attn" else (lab[0], lab[1], lab[2], iu))
    return out


def _edge_activations(model: Memory3, cache: dict, specs: Sequence[EdgeSpec], slots: int) -> list[torch.Tensor]:
    acts = []
    for e in specs:
        if e[0] == "attn":
            _, l, h, i, j = e
            acts.append(cache[f"blocks.{l}.attn.hook_pattern"][0, h, j, model.key_index(l, i, slots)])
        elif e[0] == "mem":
            _, l, h, k, j = e
            pat = cache[f"blocks.{l}.attn.hook_pattern"][0, h, j]
            p0 = model.cfg.prefix_length
            acts.append(pat[p0:p0 + slots].sum() if k is None else pat[p0 + k])
        else:
            _, l, m, i = e
            acts.append(cache[f"blocks.{l}.mlp.hook_post"][0, i, m])
    return acts


def associated_inputs(model: Memory3, ids, subgraph: nx.Graph, top_k: int = 5, *, memory=None,
                      fwd_hooks=()) -> list[tuple[int, int, float]]:
    """Def 1's t_in(S): the input tokens t_i with the largest ‖∇_{x_i^0} a‖ over the edges a of S.

    Score of position i = max over edges of the Euclidean norm of the gradient of the edge's activation
    (attention probability or neuron activation) with respect to the input embedding x_i^0 (one backward
    pass per edge, so keep S small). Returns up to ``top_k`` tuples (position i, token id t_i, score),
    largest first.
    """
    ids = _as_ids(ids)
    device = model.tok_emb.weight.device
    inp = ids[:-1][None].to(device)
    T = inp.shape[1]
    specs = edge_specs(subgraph)
    if not specs:
        return []
    kw = memory_kwargs(memory, T, 1, device)
    x0_name = "blocks.0.hook_resid_pre"
    names = [x0_name] + _edge_hook_names(model)
    with torch.enable_grad():
        _, cache = model.run_with_cache(inp, names=names, keep_grad=True, impl="plain",
                                        fwd_hooks=list(fwd_hooks) + [(x0_name, _ensure_grad)], **kw)
        x0 = cache[x0_name]
        score = torch.zeros(T, dtype=torch.float64)
        for a in _edge_activations(model, cache, specs, _memory_slots(kw)):
            if not a.requires_grad:
                continue
            g = torch.autograd.grad(a, x0, retain_graph=True, allow_unused=True)[0]
            if g is not None:
                score = torch.maximum(score, g[0].double().norm(dim=-1).cpu())
    order = score.argsort(descending=True)[:top_k].tolist()
    return [(i, int(inp[0, i]), float(score[i])) for i in order]


def associated_outputs(model: Memory3, ids, subgraph: nx.Graph, top_k: int = 5, *, memory=None,
                       fwd_hooks=()) -> list[tuple[int, int, float]]:
    """Def 1's t_out(S): the target tokens whose log-likelihood ℒ_k changes most when an edge of S is zeroed.

    For each edge a of S (ablated on its own) and each target t_k (k = 1 … n), Δ = ℒ_k − ℒ_k|_{a=0}; the
    score of t_k is the Δ of largest magnitude over the edges (positive: the edge helps predict t_k).
    Returns up to ``top_k`` tuples (text index k, token id t_k, Δ), largest |Δ| first.
    """
    ids = _as_ids(ids)
    specs = edge_specs(subgraph)
    if not specs:
        return []
    base, abl = ablated_logliks(model, ids, specs, memory=memory, fwd_hooks=fwd_hooks)
    delta = base[None] - abl  # (E, T)
    best = delta.abs().argmax(0)
    signed = delta.gather(0, best[None])[0]
    order = signed.abs().argsort(descending=True)[:top_k].tolist()
    return [(i + 1, int(ids[i + 1]), float(signed[i])) for i in order]


# ----------------------------------------------------------------------------------------------- Def 2
def _edges(G: nx.Graph) -> Iterator[tuple]:
    if G.is_multigraph():
        yield from G.edges(keys=True, data=True)
    else:
        for u, v, d in G.edges(data=True):
            yield u, v, None, d


def _depth_pos(G: nx.Graph, n: Hashable) -> tuple[int, int]:
    d = G.nodes[n]
    if "depth" in d and "position" in d:
        return d["depth"], d["position"]
    if isinstance(n, tuple) and len(n) == 3 and n[0] == "x":
        return n[1], n[2]
    raise ValueError(f"node {n!r} has no depth/position attributes")


def edge_label(key, data: dict) -> tuple:
    """The label Def 2 must preserve: ("attn", layer, head), ("mlp", layer, neuron) or ("mem", layer, head)."""
    kind = data.get("kind")
    if kind == "attn":
        return ("attn", data["layer"], data["head"])
    if kind == "mlp":
        return ("mlp", data["layer"], data["neuron"])
    if kind == "mem":
        return ("mem", data["layer"], data["head"])
    if isinstance(key, tuple) and len(key) == 3:
        return key
    raise ValueError(f"edge with key {key!r} and data {data!r} has no (kind, layer, head/neuron) label")


class _Index:
    """Nodes by (depth, position) and labelled edges by positions, for the homomorphism search."""

    def __init__(self, G: nx.Graph) -> None:
        self.node_at: dict[tuple[int, int], Hashable] = {}
        self.depth_of: dict[Hashable, tuple[int, int]] = {}
        self.depths_at: dict[int, set[int]] = defaultdict(set)
        for n in G.nodes:
            d, p = _depth_pos(G, n)
            if (d, p) in self.node_at:
                raise ValueError(f"two nodes at depth {d}, position {p}: {self.node_at[(d, p)]!r} and {n!r}")
            self.node_at[(d, p)] = n
            self.depth_of[n] = (d, p)
            self.depths_at[p].add(d)
        self.positions = sorted(self.depths_at)
        self.edges: list[tuple[int, int, int, int, tuple]] = []  # (depth_u, pos_u, depth_v, pos_v, label)
        self.edge_key: dict[tuple, list] = defaultdict(list)
        for u, v, k, data in _edges(G):
            (du, pu), (dv, pv) = self.depth_of[u], self.depth_of[v]
            e = (du, pu, dv, pv, edge_label(k, data))
            self.edges.append(e)
            self.edge_key[e].append(k)
        self.edge_set = set(self.edges)
        self.pairs: dict[tuple, set[tuple[int, int]]] = defaultdict(set)  # (du, dv, label) -> {(pu, pv)}
        for du, pu, dv, pv, lab in self.edges:
            self.pairs[(du, dv, lab)].add((pu, pv))


def _position_maps(S1: nx.Graph, S2: nx.Graph, *, injective: bool = False,
                   constraint: Callable[[dict], bool] | None = None) -> Iterator[dict[int, int]]:
    """Every position map π of S1 into S2 that defines a homomorphism (Def 2), by backtracking."""
    A, B = _Index(S1), _Index(S2)
    incident: dict[int, list] = defaultdict(list)
    domain: dict[int, set[int]] = {}
    for i in A.positions:
        domain[i] = {p for p in B.positions if A.depths_at[i] <= B.depths_at[p]}
    for e in A.edges:
        du, pu, dv, pv, lab = e
        pairs = B.pairs.get((du, dv, lab), set())
        if pu == pv:
            domain[pu] &= {a for a, b in pairs if a == b}
        else:
            domain[pu] &= {a for a, _ in pairs}
            domain[pv] &= {b for _, b in pairs}
        incident[pu].append(e)
        if pv != pu:
            incident[pv].append(e)
    if any(not d for d in domain.values()):
        return

    def fits(i: int, p: int, pi: dict[int, int]) -> bool:
        if injective and p in pi.values():
            return False
        trial = {**pi, i: p}
        for du, pu, dv, pv, lab in incident[i]:
            if pu in trial and pv in trial and (du, trial[pu], dv, trial[pv], lab) not in B.edge_set:
                return False
        return True

    def search(pi: dict[int, int]) -> Iterator[dict[int, int]]:
        free = [i for i in A.positions if i not in pi]
        if not free:
            if constraint is None or constraint(dict(pi)):
                yield dict(pi)
            return
        options = {i: [p for p in sorted(domain[i]) if fits(i, p, pi)] for i in free}
        i = min(free, key=lambda k: len(options[k]))  # most constrained position first
        for p in options[i]:
            pi[i] = p
            yield from search(pi)
            del pi[i]

    yield from search({})


def _node_map(S1: nx.Graph, S2: nx.Graph, pi: dict[int, int]) -> dict:
    A, B = _Index(S1), _Index(S2)
    return {n: B.node_at[(d, pi[p])] for n, (d, p) in A.depth_of.items()}


def find_homomorphism(S1: nx.Graph, S2: nx.Graph, *, injective: bool = False,
                      constraint: Callable[[dict], bool] | None = None) -> dict | None:
    """A homomorphism f: S1 → S2 of Def 2 as a node map {node of S1: node of S2}, or None if none exists.

    ``injective=True`` asks for distinct image positions (Def 2 itself does not); ``constraint(π)`` can veto
    a complete position map (e.g. :func:`induction_position_constraint`).
    """
    pi = next(_position_maps(S1, S2, injective=injective, constraint=constraint), None)
    return None if pi is None else _node_map(S1, S2, pi)


def is_homomorphic(S1: nx.Graph, S2: nx.Graph, mapping: dict | None = None) -> bool:
    """Def 2: is S1 homomorphic to S2? With ``mapping`` (a node map), check that this particular f is one."""
    if mapping is None:
        return find_homomorphism(S1, S2) is not None
    A, B = _Index(S1), _Index(S2)
    pi: dict[int, int] = {}
    for n, (d, p) in A.depth_of.items():
        if n not in mapping or mapping[n] not in B.depth_of:
            return False
        d2, p2 = B.depth_of[mapping[n]]
        if d2 != d or pi.setdefault(p, p2) != p2:  # depth preserved; one position goes to one position
            return False
    return all((du, pi[pu], dv, pi[pv], lab) in B.edge_set for du, pu, dv, pv, lab in A.edges)


def find_subgraphs_homomorphic_to(pattern: nx.Graph, graph: nx.Graph, max_results: int = 100, *,
                                  injective: bool = False,
                                  constraint: Callable[[dict], bool] | None = None) -> list[dict]:
    """Images of homomorphisms pattern → graph: the members of the pattern's class found in ``graph``.

    Returns up to ``max_results`` dicts {"positions": π, "mapping": node map, "subgraph": the image (the
    graph's edges hit by the pattern's edges, with their data), "weight": Σ |weight| over the image},
    distinct images only, heaviest first. Search ``graph`` after :func:`prune`: on an unpruned graph every
    causal position map matches an attention-only pattern.
    """
    B = _Index(graph)
    A = _Index(pattern)
    seen, results = set(), []
    for pi in _position_maps(pattern, graph, injective=injective, constraint=constraint):
        image = []
        for du, pu, dv, pv, lab in A.edges:
            e = (du, pi[pu], dv, pi[pv], lab)
            u, v = B.node_at[(du, pi[pu])], B.node_at[(dv, pi[pv])]
            image.append((u, v, B.edge_key[e][0]) if graph.is_multigraph() else (u, v))
        key = frozenset(image)
        if key in seen:
            continue
        seen.add(key)
        sub = graph.edge_subgraph(image).copy()
        sub.graph.update(graph.graph)
        w = sum(abs(d.get("weight", 0.0)) for *_, d in _edges(sub))
        results.append({"positions": pi, "mapping": _node_map(pattern, graph, pi), "subgraph": sub, "weight": w})
        if len(results) >= max_results:
            break
    return sorted(results, key=lambda r: -r["weight"])


# ----------------------------------------------------------------------------------------------- Example 4
def induction_pattern(layer1: int, head1: int, layer2: int, head2: int, *, i: int = 0, j: int = 2) -> nx.MultiDiGraph:
    """Example 4's induction circuit: e_{i,i+1}^{layer1,head1} (the previous-token head: query i+1 reads key i)
    and e_{i+1,j}^{layer2,head2} (the induction head: query j reads key i+1).

    With the defaults the positions are symbolic (0 = i, 1 = i+1, 2 = j); pass other i, j for a concrete
    instance (Fig 7 right: two such instances are mutually homomorphic). Example 4 has layer2 = layer1 + 1;
    any later layer is allowed (the two heads then compose through the residual stream).
    """
    if not layer2 > layer1:
        raise ValueError(f"the induction head's layer ({layer2}) must come after the previous-token head's ({layer1})")
    if not j > i + 1:
        raise ValueError(f"need j > i + 1, got i={i}, j={j}")
    G = nx.MultiDiGraph(kind="induction", i=i, j=j)
    for d, p in ((2 * layer1, i), (2 * layer1 + 1, i + 1), (2 * layer2, i + 1), (2 * layer2 + 1, j)):
        G.add_node(node(d, p), depth=d, position=p)
    G.add_edge(node(2 * layer1, i), node(2 * layer1 + 1, i + 1), key=("attn", layer1, head1),
               kind="attn", layer=layer1, head=head1)
    G.add_edge(node(2 * layer2, i + 1), node(2 * layer2 + 1, j), key=("attn", layer2, head2),
               kind="attn", layer=layer2, head=head2)
    return G


def induction_position_constraint(pattern: nx.Graph) -> Callable[[dict], bool]:
    """Homomorphisms forget how far apart positions are; this constraint puts back Example 4's "i+1":
    π(i+1) = π(i) + 1 and π(j) > π(i+1)."""
    i, j = pattern.graph["i"], pattern.graph["j"]
    return lambda pi: pi[i + 1] == pi[i] + 1 and pi[j] > pi[i + 1]


def repeated_random_tokens(n: int, vocab_size: int, *, seed: int = 0, bos_id: int = 1, low: int = 4) -> list[int]:
    """``<s>`` followed by n random tokens (ids ≥ low, distinct from specials) repeated twice."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randint(low, vocab_size, (n,), generator=g).tolist()
    return [bos_id] + r + r


def find_induction_heads(model: Memory3, ids_with_repeats, *, memory=None) -> dict[tuple[int, int], float]:
    """Induction score per (layer, head): mean attention from a repeated token to the token after its
    earlier occurrence(s).

    For every query position j whose token occurred before at k < j, the score adds the attention from j to
    the positions k+1 (all earlier occurrences, each counted once); the result is averaged over such
    queries. An induction head scores near 1, a uniform head about 1/j. ``ids_with_repeats``: (T,) or (B, T).
    """
    t = ids_with_repeats.detach().cpu() if isinstance(ids_with_repeats, torch.Tensor) else torch.as_tensor(ids_with_repeats)
    if t.dim() == 1:
        t = t[None]
    t = t.long()
    Bn, T = t.shape
    L = model.cfg.n_layers
    kw = memory_kwargs(memory, T, Bn, model.tok_emb.weight.device)
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(L)]
    with torch.no_grad():
        _, cache = model.run_with_cache(t.to(model.tok_emb.weight.device), names=names, impl="plain", **kw)
    slots = _memory_slots(kw)
    total = torch.zeros(L, model.cfg.n_heads, dtype=torch.float64)
    count = 0
    for b in range(Bn):
        row = t[b].tolist()
        for j in range(T):
            targets = sorted({k + 1 for k in range(j) if row[k] == row[j]})
            if not targets:
                continue
            count += 1
            for l in range(L):
                keys = [model.key_index(l, p, slots) for p in targets]
                total[l] += cache[names[l]][b, :, j, keys].double().sum(-1).cpu()
    if count == 0:
        raise ValueError("no token repeats in ids_with_repeats, so there is nothing to score")
    total /= count
    return {(l, h): float(total[l, h]) for l in range(L) for h in range(model.cfg.n_heads)}
