"""§2 Defs 1–3: computation graphs (weights checked against finite differences and ablations), homomorphisms
on hand-built graphs whose answer is known, and a planted induction circuit found by pattern search."""
import networkx as nx
import numpy as np
import pytest
import torch

from mini_m3.memory.encode import encode_reference_tokens
from mini_m3.model import zero_attention_edge, zero_mlp_neuron
from mini_m3.theory.circuits import (ablated_logliks, associated_inputs, associated_outputs, computation_graph,
                                     edge_specs, find_homomorphism, find_induction_heads,
                                     find_subgraphs_homomorphic_to, induction_pattern, induction_position_constraint,
                                     is_homomorphic, memory_kwargs, memory_read_graph, node, prune,
                                     repeated_random_tokens)


IDS = repeated_random_tokens(4, 512, seed=1)  # <s> a b c d a b c d: 8 inputs, 8 targets


def loglik(model, ids, hooks=(), **kw):
    """Σ log P(t_{i+1} | t_≤i) computed directly, the ℒ of Def 1."""
    inp, tgt = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    with torch.no_grad(), model.hooks(list(hooks)):
        logits = model(inp, impl="plain", **kw).logits.double()
    return float(torch.log_softmax(logits, -1).gather(-1, tgt[..., None]).sum())


# ----------------------------------------------------------------------------------------------- hand-built
def graph(*edges, nodes=()):
    """Edges ("attn", l, h, i, j) = x_i^{2l} -> x_j^{2l+1}; ("mlp", l, m, i) = x_i^{2l+1} -> x_i^{2l+2}."""
    G = nx.MultiDiGraph()
    for d, p in nodes:
        G.add_node(node(d, p), depth=d, position=p)
    for e in edges:
        if e[0] == "attn":
            _, l, h, i, j = e
            u, v, attrs = node(2 * l, i), node(2 * l + 1, j), dict(kind="attn", layer=l, head=h)
        else:
            _, l, m, i = e
            u, v, attrs = node(2 * l + 1, i), node(2 * l + 2, i), dict(kind="mlp", layer=l, neuron=m)
        for n in (u, v):
            G.add_node(n, depth=n[1], position=n[2])
        G.add_edge(u, v, key=(e[0], e[1], e[2]), weight=1.0, **attrs)
    return G


def test_head_labels_make_homomorphism_one_way():
    S1 = graph(("attn", 0, 0, 1, 2))
    S2 = graph(("attn", 0, 0, 1, 2), ("attn", 0, 1, 1, 2))
    assert is_homomorphic(S1, S2)
    assert find_homomorphism(S1, S2) == {node(0, 1): node(0, 1), node(1, 2): node(1, 2)}
    assert not is_homomorphic(S2, S1)  # nothing in S1 carries head 1
    S3 = graph(("attn", 0, 1, 5, 7))  # right positions shape, wrong head
    assert not is_homomorphic(S1, S3) and not is_homomorphic(S3, S1)


def test_depth_must_be_preserved():
    S1 = graph(("attn", 0, 0, 0, 1), nodes=[(2, 1)])  # plus an isolated node at depth 2
    S2 = graph(("attn", 0, 0, 0, 1))
    assert is_homomorphic(S2, S1) and not is_homomorphic(S1, S2)  # S2 has no depth-2 node to map it to
    # same label but between other depths (not a real Def 1 graph, but the map must still refuse it)
    S4 = nx.MultiDiGraph()
    S4.add_node(node(2, 0), depth=2, position=0)
    S4.add_node(node(3, 1), depth=3, position=1)
    S4.add_edge(node(2, 0), node(3, 1), key=("attn", 0, 0), kind="attn", layer=0, head=0)
    assert not is_homomorphic(S2, S4)
    assert not is_homomorphic(S2, S4, mapping={node(0, 0): node(2, 0), node(1, 1): node(3, 1)})


def test_nodes_at_one_position_must_go_to_one_position():
    # position 0 carries x^0 (source of an attention edge) and x^1 -> x^2 (an MLP edge)
    S1 = graph(("attn", 0, 0, 0, 1), ("mlp", 0, 5, 0))
    split = graph(("attn", 0, 0, 3, 4), ("mlp", 0, 5, 7))  # labels exist, but at positions 3 and 7
    joined = graph(("attn", 0, 0, 3, 4), ("mlp", 0, 5, 3))
    assert not is_homomorphic(S1, split)
    bad = {node(0, 0): node(0, 3), node(1, 1): node(1, 4), node(1, 0): node(1, 7), node(2, 0): node(2, 7)}
    assert not is_homomorphic(S1, split, mapping=bad)  # depth- and label-preserving, position-inconsistent
    f = find_homomorphism(S1, joined)
    assert f == {node(0, 0): node(0, 3), node(1, 1): node(1, 4), node(1, 0): node(1, 3), node(2, 0): node(2, 3)}
    assert is_homomorphic(S1, joined, mapping=f)


def test_non_injective_maps_are_allowed():
    S1 = graph(("mlp", 0, 5, 0), ("mlp", 0, 5, 1), ("attn", 0, 0, 0, 1))
    S2 = graph(("mlp", 0, 5, 3), ("attn", 0, 0, 3, 3))
    f = find_homomorphism(S1, S2)
    assert f is not None and {n[2] for n in f.values()} == {3}  # positions 0 and 1 both go to 3
    assert find_homomorphism(S1, S2, injective=True) is None
    assert not is_homomorphic(S2, S1)  # S1 has no attention edge from a position to itself


def test_two_induction_subgraphs_are_mutually_homomorphic():  # Fig 7 right
    a = induction_pattern(0, 1, 1, 2, i=3, j=9)
    b = induction_pattern(0, 1, 1, 2, i=5, j=12)
    assert is_homomorphic(a, b) and is_homomorphic(b, a)
    assert {n[2] for n in find_homomorphism(a, b).values()} == {5, 6, 12}
    other_head = induction_pattern(0, 1, 1, 3, i=5, j=12)
    other_layers = induction_pattern(1, 1, 2, 2, i=3, j=9)
    for c in (other_head, other_layers):
        assert not is_homomorphic(a, c) and not is_homomorphic(c, a)


def test_pattern_search_finds_the_induction_instances_in_a_hand_graph():
    noise = graph(("attn", 0, 1, 1, 3), ("attn", 0, 1, 5, 8), ("attn", 1, 3, 5, 9), ("mlp", 1, 4, 9))
    G = nx.compose_all([induction_pattern(0, 1, 1, 2, i=2, j=7), induction_pattern(0, 1, 1, 2, i=4, j=9), noise])
    pat = induction_pattern(0, 1, 1, 2)
    found = find_subgraphs_homomorphic_to(pat, G, constraint=induction_position_constraint(pat))
    assert sorted(tuple(r["positions"][p] for p in (0, 1, 2)) for r in found) == [(2, 3, 7), (4, 5, 9)]
    assert all(is_homomorphic(r["subgraph"], pat) and is_homomorphic(pat, r["subgraph"]) for r in found)
    # homomorphisms forget distances: without Example 4's "i+1" the head-1 edge 1 -> 3 also matches
    loose = find_subgraphs_homomorphic_to(pat, G)
    assert sorted(tuple(r["positions"][p] for p in (0, 1, 2)) for r in loose) == [(1, 3, 7), (2, 3, 7), (4, 5, 9)]
    # the noise edge on head (1, 3) completes one instance of a different circuit, and only one
    other = find_subgraphs_homomorphic_to(induction_pattern(0, 1, 1, 3), G)
    assert [tuple(r["positions"][p] for p in (0, 1, 2)) for r in other] == [(4, 5, 9)]
    assert find_subgraphs_homomorphic_to(induction_pattern(0, 2, 1, 3), G) == []
    assert len(find_subgraphs_homomorphic_to(pat, G, max_results=1)) == 1


# ----------------------------------------------------------------------------------------------- Def 1 on tiny
def test_graph_has_the_nodes_and_edges_of_def1(tiny):
    cfg = tiny.cfg
    L, H, W, T = cfg.n_layers, cfg.n_heads, cfg.mlp_width, len(IDS) - 1
    G = computation_graph(tiny, IDS)
    assert isinstance(G, nx.MultiDiGraph)
    assert G.number_of_nodes() == (2 * L + 1) * T
    assert {G.nodes[node(0, i)]["token"] for i in range(T)} == set(IDS[:-1])
    attn = [(u, v, d) for u, v, d in G.edges(data=True) if d["kind"] == "attn"]
    mlp = [(u, v, d) for u, v, d in G.edges(data=True) if d["kind"] == "mlp"]
    assert len(attn) == L * H * T * (T + 1) // 2 and len(mlp) == L * T * W
    for u, v, d in attn:
        assert u[1] == 2 * d["layer"] and v[1] == 2 * d["layer"] + 1 and u[2] <= v[2]
    for u, v, d in mlp:
        assert u[1] == 2 * d["layer"] + 1 and v[1] == u[1] + 1 and u[2] == v[2]
    # the logged objective is Def 1's log-likelihood
    assert G.graph["objective"] == pytest.approx(loglik(tiny, IDS), abs=1e-4)
    # attention to one query sums to < 1: the rest went to the "<s><ref>" prefix, which has no node
    a = sum(d["activation"] for u, v, d in attn if v == node(1, 3) and d["head"] == 0)
    assert 0 < a < 1
    sub = computation_graph(tiny, IDS, positions=[1, 2, 5], neuron_top_k=3)
    assert sub.number_of_nodes() == (2 * L + 1) * 3
    assert sum(d["kind"] == "attn" for *_, d in sub.edges(data=True)) == L * H * 6  # pairs i <= j of 3 positions
    assert sum(d["kind"] == "mlp" for *_, d in sub.edges(data=True)) == L * 3 * 3


def test_gradient_weights_match_central_differences(tiny):
    G = computation_graph(tiny, IDS, weight="gradient_x_activation")
    edges = sorted(G.edges(keys=True, data=True), key=lambda e: -abs(e[3]["weight"]))
    picks = [e for e in edges if e[3]["kind"] == "attn"][:3] + [e for e in edges if e[3]["kind"] == "mlp"][:3]
    eps = 0.05
    for u, v, k, d in picks:
        assert d["weight"] == pytest.approx(d["grad"] * d["activation"])

        def scaled(f):
            if d["kind"] == "attn":
                name, ix = f"blocks.{d['layer']}.attn.hook_pattern", (0, d["head"], v[2], tiny.key_index(d["layer"], u[2]))
            else:
                name, ix = f"blocks.{d['layer']}.mlp.hook_post", (0, u[2], d["neuron"])

            def fn(x, hook):
                x = x.clone()
                x[ix] = x[ix] * f
                return x
            return [(name, fn)]

        fd = (loglik(tiny, IDS, scaled(1 + eps)) - loglik(tiny, IDS, scaled(1 - eps))) / (2 * eps)
        assert abs(d["weight"]) > 1e-3
        assert fd == pytest.approx(d["weight"], rel=0.03)


def test_ablation_weights_are_the_causal_intervention(tiny):
    cands = [("attn", 0, 1, 2, 5), ("attn", 3, 2, 0, 7), ("attn", 1, 0, 4, 4), ("mlp", 2, 17, 3), ("mlp", 0, 99, 7)]
    G = computation_graph(tiny, IDS, weight="ablation", edges=cands)
    assert sorted(edge_specs(G)) == sorted(cands)
    base = loglik(tiny, IDS)
    for u, v, k, d in G.edges(keys=True, data=True):
        if d["kind"] == "attn":
            hook = zero_attention_edge(d["layer"], d["head"], v[2], tiny.key_index(d["layer"], u[2]))
        else:
            hook = zero_mlp_neuron(d["layer"], u[2], d["neuron"])
        assert d["weight"] == pytest.approx(base - loglik(tiny, IDS, [hook]), abs=2e-5)
    # to first order ablation = gradient x activation; at random init single edges are nearly linear
    Ga = computation_graph(tiny, IDS, weight="ablation", positions=[0, 3, 6, 7], neuron_top_k=4)
    Gg = computation_graph(tiny, IDS, weight="gradient_x_activation", positions=[0, 3, 6, 7], neuron_top_k=4)
    wa = {(u, v, k): d["weight"] for u, v, k, d in Ga.edges(keys=True, data=True)}
    wg = {(u, v, k): d["weight"] for u, v, k, d in Gg.edges(keys=True, data=True)}
    assert wa.keys() == wg.keys()
    a, g = np.array([wa[e] for e in wa]), np.array([wg[e] for e in wa])
    assert np.corrcoef(a, g)[0, 1] > 0.99
    big = np.abs(g) > 0.2 * np.abs(g).max()
    assert big.sum() >= 3 and (np.sign(a[big]) == np.sign(g[big])).all()


def test_prune_keeps_fewer_edges_as_the_threshold_rises(tiny):
    G = computation_graph(tiny, IDS, neuron_top_k=16)
    counts, prev = [], None
    for th in [0.0, 1e-4, 1e-3, 1e-2, 1e-1]:
        P = prune(G, threshold=th)
        kept = set(P.edges(keys=True))
        assert all(abs(d["weight"]) >= th for *_, d in P.edges(data=True))
        assert prev is None or kept <= prev
        counts.append(len(kept))
        prev = kept
    assert counts[0] == G.number_of_edges() and counts[-1] < counts[0]
    top = prune(G, top_k=10)
    assert top.number_of_edges() == 10
    assert min(abs(d["weight"]) for *_, d in top.edges(data=True)) >= \
        sorted((abs(d["weight"]) for *_, d in G.edges(data=True)), reverse=True)[9]
    assert all(top.degree(n) > 0 for n in top.nodes)  # isolated nodes dropped by default
    assert prune(G, threshold=1.0, drop_isolated=False).number_of_nodes() == G.number_of_nodes()


def test_memory_slots_are_skipped_on_the_key_axis(tiny):
    mem = encode_reference_tokens(tiny, [[40, 41, 42, 43, 44, 45, 46, 47, 48, 49]])
    G = computation_graph(tiny, IDS, memory=mem, neuron_top_k=0)
    G0 = computation_graph(tiny, IDS, neuron_top_k=0)
    T = len(IDS) - 1
    slots = mem.tokens_per_head
    from mini_m3.theory.circuits import memory_kwargs
    _, cache = tiny.run_with_cache(torch.tensor([IDS[:-1]]), names=["blocks.0.attn.hook_pattern"],
                                   **memory_kwargs(mem, T))
    d = G.edges[node(0, 2), node(1, 5), ("attn", 0, 3)]
    assert d["activation"] == pytest.approx(float(cache["blocks.0.attn.hook_pattern"][0, 3, 5, tiny.key_index(0, 2, slots)]))
    d0 = G0.edges[node(0, 2), node(1, 5), ("attn", 0, 3)]
    assert d["activation"] != pytest.approx(d0["activation"], abs=1e-6)  # memory took some attention


def test_memory_read_edges_are_ablations_of_memory_slots(tiny):
    cfg = tiny.cfg
    refs = [[40, 41, 42, 43, 44, 45, 46, 47, 48, 49], [60, 61, 62, 63, 64, 65]]
    mem = encode_reference_tokens(tiny, refs, tokens_per_head=4)
    k, T, p0 = mem.tokens_per_head, len(IDS) - 1, cfg.prefix_length
    kw = memory_kwargs(mem, T)

    def target_loglik(hooks=(), at=7):  # log P(t_{at+1} | t_<=at) reading the memory
        inp, tgt = torch.tensor([IDS[:-1]]), torch.tensor([IDS[1:]])
        with torch.no_grad(), tiny.hooks(list(hooks)):
            logits = tiny(inp, impl="plain", **kw).logits.double()
        return float(torch.log_softmax(logits, -1)[0, at, tgt[0, at]])

    G = memory_read_graph(tiny, IDS, mem, query_positions=[5, 7], loss_positions=[7], reference_tokens=refs)
    n_slots = int(mem.mask.sum())  # valid (memory, memory layer, KV head, token) slots
    assert G.number_of_edges() == n_slots * cfg.n_query_groups * 2  # every query head of a memory KV head, 2 j's
    assert G.graph["objective"] == pytest.approx(target_loglik(), abs=1e-5)
    _, cache = tiny.run_with_cache(torch.tensor([IDS[:-1]]), names=lambda n: n.endswith("hook_pattern"),
                                   impl="plain", **kw)
    for u, v, key, d in list(G.edges(keys=True, data=True))[::5]:
        l, h, s, j = d["layer"], d["head"], d["slot"], v[2]
        assert l in cfg.memory_layers and u[1] == 2 * l and v == node(2 * l + 1, j) and j in (5, 7)
        b, t = divmod(s, k)  # slot s = memory b, kept token t
        li, hi = cfg.memory_layers.index(l), cfg.memory_heads.index(h // cfg.n_query_groups)
        assert (d["memory"], d["ref_position"]) == (b, int(mem.positions[b, li, hi, t]) - p0) == (u[2], u[3])
        assert G.nodes[u]["token"] == refs[b][d["ref_position"]] and G.nodes[u]["position"] < 0
        assert d["activation"] == pytest.approx(float(cache[f"blocks.{l}.attn.hook_pattern"][0, h, j, p0 + s]))
        hook = zero_attention_edge(l, h, j, p0 + s)
        assert d["weight"] == pytest.approx(target_loglik() - target_loglik([hook]), abs=2e-5)
    # slot None ablates the head's whole memory read at j: the same as zeroing all its memory slots
    l, h = cfg.memory_layers[-1], 1
    b0, abl = ablated_logliks(tiny, IDS, [("mem", l, h, None, 7)], memory=mem)

    def zero_all(p, hook):
        p = p.clone()
        p[:, h, 7, p0:p0 + len(mem) * k] = 0
        return p
    want = target_loglik() - target_loglik([(f"blocks.{l}.attn.hook_pattern", zero_all)])
    assert float(b0[7] - abl[0, 7]) == pytest.approx(want, abs=2e-5) and abs(want) > 1e-6
    with pytest.raises(ValueError):
        ablated_logliks(tiny, IDS, [("mem", l, h, len(mem) * k, 7)], memory=mem)  # no such slot
    # j = None: the head reads no memory anywhere; earlier targets change too, and the last one as above
    _, abl_all = ablated_logliks(tiny, IDS, [("mem", l, h, None, None), ("mem", l, h, None, 7)], memory=mem)

    def zero_everywhere(p, hook):
        p = p.clone()
        p[:, h, :, p0:p0 + len(mem) * k] = 0
        return p
    with torch.no_grad(), tiny.hooks([(f"blocks.{l}.attn.hook_pattern", zero_everywhere)]):
        logits = tiny(torch.tensor([IDS[:-1]]), impl="plain", **kw).logits.double()
    ll = torch.log_softmax(logits, -1)[0].gather(-1, torch.tensor(IDS[1:])[:, None])[:, 0]
    assert torch.allclose(abl_all[0], ll, atol=2e-5)
    assert not torch.allclose(abl_all[0, :7], abl_all[1, :7], atol=1e-6)  # only j = None moved targets 0..6
    # per_head: one edge per (layer, head, query), weighted by the whole read's ablation
    Gh = memory_read_graph(tiny, IDS, mem, query_positions=[7], loss_positions=[7], per_head=True)
    assert Gh.number_of_edges() == len(cfg.memory_layers) * cfg.n_heads
    (d,) = [d for *_, d in Gh.edges(data=True) if (d["layer"], d["head"]) == (l, h)]
    assert d["slot"] is None and d["weight"] == pytest.approx(want, abs=2e-5)
    pat = cache[f"blocks.{l}.attn.hook_pattern"][0, h, 7, p0:p0 + len(mem) * k]
    assert d["activation"] == pytest.approx(float(pat.sum()), abs=1e-6) and d["top_slot"] == int(pat.argmax())
    # Def 2 on memory reads: a pruned part maps into the graph; a read relabelled to another head does not
    S = prune(G, top_k=3)
    assert is_homomorphic(S, G)
    (u, v, key, d), = list(S.edges(keys=True, data=True))[:1]
    other = nx.MultiDiGraph()
    other.add_node(u, **S.nodes[u])
    other.add_node(v, **S.nodes[v])
    other.add_edge(u, v, key=("mem", d["layer"], 99), **{**d, "head": 99})
    assert not is_homomorphic(other, G)
    assert all(e[0] == "mem" and len(e) == 5 for e in edge_specs(S))


# ----------------------------------------------------------------------------------------------- a planted circuit
def planted_hooks(model, ids, prev=(0, 1), ind=(1, 2)):
    """Overwrite two heads' patterns: `prev` attends to the previous token, `ind` from a repeated token to the
    token after its earlier occurrence (Example 2 / Fig 6 right)."""
    T = len(ids) - 1
    inp = ids[:-1]
    rules = {prev: {j: j - 1 for j in range(1, T)}, ind: {}}
    for j in range(T):
        earlier = [k for k in range(j) if inp[k] == inp[j]]
        if earlier:
            rules[ind][j] = earlier[-1] + 1
    hooks = []
    for (l, h), rule in rules.items():
        def fn(p, hook, l=l, h=h, rule=rule):
            p = p.clone()
            for j, i in rule.items():
                p[:, h, j, :] = 0
                p[:, h, j, model.key_index(l, i)] = 1
            return p
        hooks.append((f"blocks.{l}.attn.hook_pattern", fn))
    return hooks, rules


def test_planted_induction_circuit_is_found(tiny):
    ids = repeated_random_tokens(6, 512, seed=3)  # <s> r1..r6 r1..r6
    hooks, rules = planted_hooks(tiny, ids)
    with tiny.hooks(hooks):
        scores = find_induction_heads(tiny, ids[:-1])
        G = computation_graph(tiny, ids, attention_threshold=0.9, neuron_top_k=0)
    assert scores[(1, 2)] == pytest.approx(1.0)
    assert max(s for k, s in scores.items() if k != (1, 2)) < 0.5
    assert all((d["layer"], d["head"]) in [(0, 1), (1, 2)] for *_, d in G.edges(data=True))
    pat = induction_pattern(0, 1, 1, 2)
    found = find_subgraphs_homomorphic_to(pat, prune(G, threshold=0.0), constraint=induction_position_constraint(pat))
    # r_k at position k (k = 1..6) and again at 6 + k: instances i = k, i+1 = k+1, j = 6 + k for k = 1..5
    assert sorted(tuple(r["positions"][p] for p in (0, 1, 2)) for r in found) == [(k, k + 1, 6 + k) for k in range(1, 6)]


def test_associated_inputs_and_outputs_respect_causality(tiny):
    G = computation_graph(tiny, IDS, neuron_top_k=8)
    sub = G.edge_subgraph([(node(2, 2), node(3, 5), ("attn", 1, 0)),
                           next(e for e in G.edges(node(1, 3), keys=True) if e[2][0] == "mlp")]).copy()
    T = len(IDS) - 1
    t_in = associated_inputs(tiny, IDS, sub, top_k=T)
    assert len(t_in) == T and [s for *_, s in t_in] == sorted((s for *_, s in t_in), reverse=True)
    score = {i: s for i, _, s in t_in}
    assert all(tok == IDS[i] for i, tok, _ in t_in)
    # the edges sit at query 5 (attention) and position 3 (MLP): later inputs cannot influence them
    assert all(score[i] == 0 for i in (6, 7)) and all(score[i] > 0 for i in range(6))
    t_out = associated_outputs(tiny, IDS, sub, top_k=T)
    assert all(tok == IDS[k] for k, tok, _ in t_out)
    delta = {k: d for k, _, d in t_out}
    assert sorted(delta) == list(range(1, T + 1))
    # zeroing them changes the predictions made at positions >= 3 only (targets t_4 ... t_8)
    assert all(delta[k] == 0 for k in (1, 2, 3)) and all(delta[k] != 0 for k in range(4, T + 1))
    assert associated_inputs(tiny, IDS, nx.MultiDiGraph()) == []


def test_induction_score_of_a_random_model_is_low(tiny):
    ids = repeated_random_tokens(8, 512, seed=5)
    s = find_induction_heads(tiny, ids)
    assert len(s) == tiny.cfg.n_layers * tiny.cfg.n_heads and all(0 < v < 0.3 for v in s.values())
    with pytest.raises(ValueError, match="no token repeats"):
        find_induction_heads(tiny, [1, 10, 11, 12])


def test_weights_do_not_need_trainable_parameters_and_leave_no_grads(tiny):
    G = computation_graph(tiny, IDS, neuron_top_k=2)
    flags = [p.requires_grad for p in tiny.parameters()]
    try:
        for p in tiny.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            G2 = computation_graph(tiny, IDS, neuron_top_k=2)
    finally:
        for p, f in zip(tiny.parameters(), flags):
            p.requires_grad_(f)
    w = {e[:3]: e[3]["weight"] for e in G.edges(keys=True, data=True)}
    w2 = {e[:3]: e[3]["weight"] for e in G2.edges(keys=True, data=True)}
    assert w.keys() == w2.keys() and all(w[k] == pytest.approx(w2[k], rel=1e-4, abs=1e-8) for k in w)
    assert all(p.grad is None for p in tiny.parameters())  # one torch.autograd.grad call, no .backward()
