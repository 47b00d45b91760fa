"""§3.3 memory writing: token selection on known patterns, and the `all`-selector equivalence."""
import pytest
import torch

from _literal import literal_selection
from conftest import tiny_model
from mini_m3 import Memory3, Memory3Config, MemoryKV
from mini_m3.memory.encode import (ExplicitMemory, encode_reference_tokens, encode_references,
                                   question_selection_scores, select_top_tokens, selection_scores)


def hand_built(N=1, H=4, Hkv=2, R=12, d=8, hot=((3, 7, 9), (0, 5, 11))):
    """Queries all point along e0; key j of KV head g is large along e0 iff j is one of hot[g]."""
    q = torch.zeros(N, H, R, d)
    q[..., 0] = 1.0
    k = torch.zeros(N, Hkv, R, d)
    for g, toks in enumerate(hot):
        k[:, g, list(toks), 0] = 6.0
    return q, k


@pytest.mark.parametrize("selector", ["attention", "exp"])
def test_selector_keeps_exactly_the_tokens_that_receive_attention(selector):
    q, k = hand_built()
    valid = torch.ones(1, 12, dtype=torch.bool)
    scores = selection_scores(q, k, valid, n_groups=2, selector=selector)
    idx, kept = select_top_tokens(scores, valid, 3, selector)
    assert idx[0, 0].tolist() == [3, 7, 9] and idx[0, 1].tolist() == [0, 5, 11]
    assert kept.all()


def test_scores_sum_over_the_query_group_and_ignore_padding():
    q, k = hand_built(hot=((2,), (4,)))
    q[:, 3, :, 0] = 0.0  # in the second group, head 2 looks at token 4 and head 3...
    q[:, 3, :, 1] = 1.0
    k[:, 1, 6, 1] = 50.0  # ...except one head of it, which looks at token 6
    valid = torch.ones(1, 12, dtype=torch.bool)
    valid[:, 6] = False  # but token 6 is padding: it may neither be kept nor steal attention
    s = selection_scores(q, k, valid, n_groups=2)
    assert torch.isinf(s[0, 1, 6]) and s[0, 1, 6] < 0
    idx, _ = select_top_tokens(s, valid, 1)
    assert idx[0, 0].item() == 2 and idx[0, 1].item() == 4
    # each KV head's scores sum to (#valid queries) x (#query heads in its group): softmax rows sum to 1
    finite = torch.where(torch.isfinite(s), s, torch.zeros_like(s))
    torch.testing.assert_close(finite.sum(-1), torch.full((1, 2), 11.0 * 2, dtype=torch.float64))


def test_headmax_keeps_a_token_one_query_head_needs_where_the_sum_outvotes_it():
    """The "headmax" selector (a named lever, open choice 2's other reading): per KV head, the largest of its query
    heads' attention-received sums instead of their sum. One KV head, three query heads, 12 tokens, top-4: heads 0
    and 1 give all their attention to tokens 2-5 (~3 each); head 2 favours token 9 (~3.2) but gives tokens 2-5
    ~1.9 each. Summed, 2-5 win (~7.9 against ~3.2) and token 9 is dropped; max keeps it."""
    R, d = 12, 8
    q = torch.zeros(1, 3, R, d)
    k = torch.zeros(1, 1, R, d)
    q[:, :2, :, 0] = 1.0
    k[:, 0, 2:6, 0] = 8.0 * d ** 0.5  # logits q·k/√d_h: 8 here, 2.5 and 3 below
    q[:, 2, :, 1] = 1.0
    k[:, 0, 2:6, 1] = 2.5 * d ** 0.5
    k[:, 0, 9, 1] = 3.0 * d ** 0.5
    valid = torch.ones(1, R, dtype=torch.bool)
    per_head = [selection_scores(q[:, h:h + 1], k, valid, n_groups=1) for h in range(3)]
    torch.testing.assert_close(selection_scores(q, k, valid, n_groups=3), sum(per_head))
    torch.testing.assert_close(selection_scores(q, k, valid, n_groups=3, selector="headmax"),
                               torch.stack(per_head).amax(0))

    def top(sel):
        return select_top_tokens(selection_scores(q, k, valid, 3, selector=sel), valid, 4, sel)[0].flatten().tolist()

    assert top("attention") == [2, 3, 4, 5]
    assert top("headmax") == [2, 3, 4, 9]  # head 2's token kept (ties among 2-5 go to the earlier tokens)
    # one query head per KV head: "headmax" is the paper's score
    k3 = k.expand(1, 3, R, d)
    torch.testing.assert_close(selection_scores(q, k3, valid, 1, selector="headmax"), selection_scores(q, k3, valid, 1))


def test_short_reference_leaves_empty_slots():
    scores = torch.randn(1, 2, 5)
    valid = torch.tensor([[True, True, True, False, False]])
    idx, kept = select_top_tokens(scores.masked_fill(~valid[:, None], float("-inf")), valid, 4)
    assert kept.sum(-1).tolist() == [[3, 3]]
    assert set(idx[0, 0][kept[0, 0]].tolist()) == {0, 1, 2}


@pytest.mark.parametrize("selector", ["attention", "exp", "headmax", "random", "first", "all"])
def test_encode_shapes_positions_and_prefix_never_kept(tiny, selector):
    cfg = tiny.cfg
    refs = [torch.randint(4, cfg.vocab_size, (n,)).tolist() for n in (20, 5, 128)]
    mem = encode_reference_tokens(tiny, refs, selector=selector, generator=torch.Generator().manual_seed(0))
    k = cfg.reference_length if selector == "all" else cfg.memory_tokens_per_head
    assert mem.keys.shape == (3, len(cfg.memory_layers), len(cfg.memory_heads), k, cfg.head_dim)
    assert mem.positions.shape == mem.mask.shape == mem.keys.shape[:-1]
    p = cfg.prefix_length
    pos = mem.positions[mem.mask]
    assert pos.min() >= p  # the "<s>Reference:" prefix is never kept
    assert mem.mask[1].sum(-1).max() == min(5, k)  # 5-token reference: at most 5 real slots per head
    assert (mem.positions[1][mem.mask[1]] < p + 5).all()  # never a padding position
    if selector == "first":
        assert mem.positions[0, 0, 0].tolist() == list(range(p, p + 8))


def test_all_selector_equals_attending_to_the_references_full_kv(tiny):
    """Reading a memory that keeps every token = attending to the reference's own K/V, computed by the same
    layers at the same positions (taken here from hooks on an ordinary forward of the reference)."""
    cfg = tiny.cfg
    ref = torch.randint(4, cfg.vocab_size, (1, 30))
    mem = encode_reference_tokens(tiny, ref.tolist(), selector="all")
    names = [f"blocks.{l}.attn.hook_{w}" for l in cfg.memory_layers for w in "kv"]
    _, c = tiny.run_with_cache(ref, positions=torch.arange(30) - cfg.reference_length, names=names)
    p = cfg.prefix_length
    keys = torch.stack([c[f"blocks.{l}.attn.hook_k"][:, :, p:] for l in cfg.memory_layers], 1)  # (1, L, H, 30, d)
    values = torch.stack([c[f"blocks.{l}.attn.hook_v"][:, :, p:] for l in cfg.memory_layers], 1)
    direct = MemoryKV(keys[:, None], values[:, None])
    ctx = torch.randint(4, cfg.vocab_size, (1, 40))
    expected = tiny(ctx, memory=direct).logits
    got = tiny(ctx, memory=mem.to_memory_kv(torch.tensor([[[0]]]))).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - tiny(ctx).logits).abs().max() > 1e-3  # and the memory does change the output


def test_to_memory_kv_layout_and_missing_memories(tiny):
    cfg = tiny.cfg
    mem = encode_reference_tokens(tiny, [torch.randint(4, 500, (16,)).tolist() for _ in range(4)])
    kv = mem.to_memory_kv(torch.tensor([[[0, 2, -1], [3, -1, -1]]]))
    k = cfg.memory_tokens_per_head
    assert kv.keys.shape == (1, 2, len(cfg.memory_layers), len(cfg.memory_heads), 3 * k, cfg.head_dim)
    torch.testing.assert_close(kv.keys[0, 0, :, :, k:2 * k], mem.keys[2])
    assert kv.mask[0, 0, ..., 2 * k:].sum() == 0 and kv.mask[0, 1, ..., k:].sum() == 0
    assert kv.mask[0, 1, ..., :k].all()


@pytest.mark.parametrize("selector", ["attention", "exp", "headmax"])
def test_selection_matches_the_literal_rule(selector):
    """§3.3 written out in tests/_literal.py (loops, float64, no RoPE and no causal mask in the score, prefix and
    padding excluded): the batched encoder keeps a top-k set of the literal scores, and stores the keys (after
    RoPE, at p + j) and values of those tokens. Weights at std 0.1 give attention with clear winners."""
    model = tiny_model(0, init_std=0.1)
    cfg, k = model.cfg, model.cfg.memory_tokens_per_head
    g = torch.Generator().manual_seed(1)
    refs = [torch.randint(4, cfg.vocab_size, (n,), generator=g).tolist() for n in (37, 5, 128, 90)]
    mem = encode_reference_tokens(model, refs, selector=selector)  # one padded batch
    for r, ref in enumerate(refs):
        lit = literal_selection(model, ref, softmax=selector != "exp", pool="max" if selector == "headmax" else "sum")
        n = min(k, len(ref))
        kept = mem.mask[r]
        assert kept.sum(-1).eq(n).all()
        for li in range(len(cfg.memory_layers)):
            for hi in range(len(cfg.memory_heads)):
                w = lit["scores"][li, hi]
                got = mem.positions[r, li, hi][kept[li, hi]] - cfg.prefix_length
                kth = w.sort(descending=True).values[n - 1]
                tol = 1e-6 * kth.abs()  # the encoder's float32 q/k against float64 here
                rest = torch.ones(len(ref), dtype=torch.bool)
                rest[got] = False
                where = (r, li, hi, got.tolist(), lit["index"][li, hi, :n].tolist())
                assert (w[got] >= kth - tol).all() and (w[rest] <= kth + tol).all(), where  # a top-k set
                torch.testing.assert_close(mem.keys[r, li, hi][kept[li, hi]].double(), lit["all_keys"][li, hi, got],
                                           atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(mem.values[r, li, hi][kept[li, hi]].double(),
                                           lit["all_values"][li, hi, got], atol=1e-5, rtol=1e-5)


def test_equal_tokens_tie_and_the_earlier_ones_are_kept_whatever_the_batch():
    """In the first layer a token's key, and so the attention it receives, depends on the token alone: repeats of
    a word tie exactly, and the earlier ones must be kept. Float rounding that depends on the batch shape must
    not break those ties (it did: a reference encoded alone and in a batch kept different tokens, and the
    2-rank micro-batch run diverged from the single process on some machines)."""
    model = tiny_model(0)
    cfg = model.cfg
    assert cfg.memory_layers[0] == 0
    g = torch.Generator().manual_seed(0)
    refs = []
    for _ in range(40):  # few distinct tokens: many ties
        n, distinct = int(torch.randint(60, 128, (1,), generator=g)), int(torch.randint(8, 60, (1,), generator=g))
        refs.append(torch.randint(4, 4 + distinct, (n,), generator=g).tolist())
    batched = encode_reference_tokens(model, refs).positions
    for r, ref in enumerate(refs):
        alone = encode_reference_tokens(model, [ref]).positions[0]
        assert torch.equal(alone, batched[r]), f"reference {r}: kept tokens depend on the batch"
        for h in range(len(cfg.memory_heads)):
            kept = set((alone[0, h] - cfg.prefix_length).tolist())
            for t in set(ref):
                flags = [j in kept for j, u in enumerate(ref) if u == t]
                assert flags == sorted(flags, reverse=True), f"reference {r}, head {h}: a later {t} kept first"


def test_gradients_flow_into_live_encoded_memories():
    """Continual training backpropagates through the encoding. With untied embeddings, tokens that occur only in
    the reference can get a gradient through nothing but the memory: zero if the memory were detached."""
    model = Memory3(Memory3Config.from_name("tiny", tie_embeddings=False)).train()
    ref, ctx = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [1, 20, 21, 22, 23]
    grads = {}
    for detached in (False, True):
        model.zero_grad()
        mem = encode_reference_tokens(model, [ref])
        mem = mem.detach() if detached else mem
        out = model(torch.tensor([ctx[:-1]]), memory=mem.to_memory_kv(torch.tensor([[[0]]])),
                    targets=torch.tensor([ctx[1:]]))
        out.loss.backward()
        grads[detached] = model.tok_emb.weight.grad[ref].abs().sum(-1)
    assert grads[False].sum() > 0  # through the kept keys and values
    assert (grads[True] == 0).all()  # (the control: no other path reaches these rows)


def test_encode_references_text_api_and_errors(tiny):
    from mini_m3 import Tokenizer
    tok = Tokenizer.train(["Alice Smith was born in Paris in 1980."] * 20 + ["Bob Jones works at Acme."] * 20,
                          vocab_size=300)
    mem = encode_references(tiny, tok, ["Alice Smith was born in Paris.", "Bob Jones works at Acme."], batch_size=1)
    assert len(mem) == 2 and mem.reference_ids.tolist() == [0, 1]
    with pytest.raises(ValueError, match="empty"):
        encode_references(tiny, tok, ["fine", ""])
    with pytest.raises(ValueError, match="reference_length"):
        encode_references(tiny, tok, ["word " * 400])
    with pytest.raises(ValueError, match="selector"):
        encode_references(tiny, tok, ["x"], selector="oracle")
    with pytest.raises(TypeError):
        encode_references(tiny, tok, "just one string")
    assert isinstance(ExplicitMemory.cat([mem[0], mem[1]]), ExplicitMemory)


def test_float32_selection_scores_match_float64_and_pick_the_same_tokens():
    """Continual training scores in float32 (speed); banks in float64. On random references the scores agree to
    float32 precision and (barring exact near-ties) select the same tokens."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(6, 4, 40, 16, generator=g), torch.randn(6, 2, 40, 16, generator=g)
    valid = torch.ones(6, 40, dtype=torch.bool)
    valid[:, 33:] = False
    exact = selection_scores(q, k, valid, n_groups=2)
    fast = selection_scores(q, k, valid, n_groups=2, dtype=torch.float32)
    assert fast.dtype == torch.float32 and exact.dtype == torch.float64
    ok = valid[:, None, :].expand_as(exact)
    torch.testing.assert_close(fast[ok].double(), exact[ok], rtol=1e-5, atol=1e-5)
    assert torch.equal(select_top_tokens(fast, valid, 8)[0], select_top_tokens(exact, valid, 8)[0])


def test_forced_tokens_are_kept_in_every_head_and_the_rest_follow_the_ranking(tiny):
    """`force=` (a diagnostic: the answer forced into the kept set) keeps the forced tokens in every memory head,
    fills the other slots as the plain top-k would, and changes nothing when it forces nothing."""
    cfg = tiny.cfg
    k, p = cfg.memory_tokens_per_head, cfg.prefix_length
    refs = [torch.randint(4, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
            for n in (60, 40)]
    plain = encode_reference_tokens(tiny, refs)
    none = encode_reference_tokens(tiny, refs, force=torch.zeros(2, 60, dtype=torch.bool))
    assert torch.equal(none.positions, plain.positions) and torch.equal(none.keys, plain.keys)
    force = torch.zeros(2, 60, dtype=torch.bool)
    force[0, [50, 51, 52]] = True
    force[1, [45]] = True  # padding in the 40-token reference: never kept
    mem = encode_reference_tokens(tiny, refs, force=force)
    for layer in range(len(cfg.memory_layers)):
        for h in range(len(cfg.memory_heads)):
            kept = set(mem.positions[0, layer, h][mem.mask[0, layer, h]].tolist())
            before = plain.positions[0, layer, h][plain.mask[0, layer, h]].tolist()
            assert {p + 50, p + 51, p + 52} <= kept
            # the other slots: the plain top-k's best tokens that are not forced, in its rank order
            assert len(kept) == k and len(kept - {p + 50, p + 51, p + 52}) == k - 3
            assert kept - {p + 50, p + 51, p + 52} <= set(before)
    assert torch.equal(mem.positions[1], plain.positions[1])
    with pytest.raises(ValueError, match="shape"):
        encode_reference_tokens(tiny, refs, force=torch.zeros(2, 59, dtype=torch.bool))
    with pytest.raises(ValueError, match="hard scored top-k"):
        encode_reference_tokens(tiny, refs, force=force, selector="all")
    with pytest.raises(ValueError, match="relaxed"):
        encode_reference_tokens(tiny, refs, force=force, soft_temperature=0.5)


def test_question_aimed_selection_with_the_references_own_queries_is_the_papers(tiny):
    """`score_queries=` ranks tokens by the attention they receive from given queries; given one reference's own
    queries (no RoPE) it must keep the same tokens as the paper's score, and other queries keep other tokens."""
    cfg = tiny.cfg
    ref = torch.randint(4, cfg.vocab_size, (50,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        layers = tiny.encode_reference_layers(torch.tensor([ref]))
    own = [layer["q_raw"][0].transpose(0, 1) for layer in layers]  # (R, H, d_h): every token asks
    valid = torch.ones(1, 50, dtype=torch.bool)
    for layer, q in zip(layers, own):
        paper = selection_scores(layer["q_raw"], layer["k_raw"], valid, cfg.n_query_groups)
        asked = question_selection_scores(q, layer["k_raw"], valid, cfg.n_query_groups)
        assert torch.allclose(asked, paper, rtol=1e-9, atol=1e-12)
    plain = encode_reference_tokens(tiny, [ref])
    same = encode_reference_tokens(tiny, [ref], score_queries=own)
    assert torch.equal(same.positions, plain.positions) and torch.equal(same.keys, plain.keys)
    one = [q[7:8] for q in own]  # only token 7 asks: its favourite tokens, not the whole reference's
    other = encode_reference_tokens(tiny, [ref], score_queries=one)
    assert not torch.equal(other.positions, plain.positions)
    with pytest.raises(ValueError, match="one \\(P, H, d_h\\) tensor per memory layer"):
        encode_reference_tokens(tiny, [ref], score_queries=own[:1])
    with pytest.raises(ValueError, match="hard 'attention' top-k"):
        encode_reference_tokens(tiny, [ref], score_queries=own, selector="exp")
    with pytest.raises(ValueError, match="queries must be"):
        question_selection_scores(own[0][:, :1], layers[0]["k_raw"], valid, cfg.n_query_groups)
