"""The "disjoint" selector (a named lever for issue 15, deviation 74): the KV heads of a memory layer take turns
keeping the paper's best-scored tokens, each a token no head keeps yet, so a layer keeps min(H k, R) distinct
tokens. Backed by a literal pure-Python loop; with one KV head it is the paper's top-k."""
import random

import pytest
import torch
from _literal import literal_disjoint, literal_selection

from mini_m3 import Memory3, Memory3Config
from mini_m3.memory.encode import disjoint_choice, encode_reference_tokens, select_top_tokens


@pytest.mark.parametrize("H,R,k", [(4, 40, 8), (4, 20, 8), (8, 30, 3), (3, 5, 4)])
def test_disjoint_choice_matches_the_literal_loop(H, R, k):
    rng = random.Random(H * 100 + R + k)
    N = 5
    scores = torch.tensor([[[float(rng.randint(0, 9)) for _ in range(R)] for _ in range(H)] for _ in range(N)])
    lens = [R, R - 1, max(1, R // 2), 1, max(1, R // 3)]  # ties (integer scores) and padding on purpose
    valid = torch.arange(R)[None] < torch.tensor(lens)[:, None]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    own = disjoint_choice(scores, valid, k)
    for n in range(N):
        want = literal_disjoint(scores[n].tolist(), lens[n], k)
        got = [set(torch.nonzero(own[n, h]).flatten().tolist()) for h in range(H)]
        assert got == want
        assert all(len(s) == min(k, lens[n]) for s in got)
        distinct = set().union(*got)
        assert len(distinct) == min(H * k, lens[n])  # a layer keeps every token, or H k distinct ones


def test_one_kv_head_keeps_the_papers_top_k_and_more_heads_keep_more_tokens():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(6, 1, 50, generator=g, dtype=torch.float64)
    valid = torch.ones(6, 50, dtype=torch.bool)
    assert torch.equal(select_top_tokens(scores, valid, 8, "disjoint")[0], select_top_tokens(scores, valid, 8)[0])
    scores = torch.rand(6, 4, 50, generator=g, dtype=torch.float64)
    scores[:, 1:] = scores[:, :1]  # heads that agree: the paper keeps the same 8 tokens in each
    paper, _ = select_top_tokens(scores, valid, 8)
    split, kept = select_top_tokens(scores, valid, 8, "disjoint")
    assert kept.all()
    for n in range(6):
        assert len(set(paper[n].flatten().tolist())) == 8
        assert len(set(split[n].flatten().tolist())) == 32
        assert set(split[n, 0].tolist()) <= set(torch.topk(scores[n, 0], 29).indices.tolist())  # head 0: 1st, 5th..


def cfg(**kw):
    return Memory3Config(name="disjoint-test", vocab_size=97, n_layers=4, n_heads=4, n_kv_heads=4, head_dim=8,
                         d_model=32, mlp_width=48, max_seq_len=200, memory_layers=(0, 1), **kw)


def test_a_model_in_the_disjoint_format_writes_distinct_tokens_per_layer_and_round_trips():
    model = Memory3(cfg(memory_selector="disjoint", memory_tokens_per_head=4)).eval()
    assert Memory3Config.from_json(model.cfg.to_json()) == model.cfg
    assert model.cfg.memory_format == {"selector": "disjoint", "tokens_per_head": 4, "memories_per_chunk": 5}
    refs = torch.randint(4, 97, (3, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        mem = encode_reference_tokens(model, refs)
        paper = encode_reference_tokens(model, refs, selector="attention")
    assert mem.mask.all()  # (N, L_mem, H, k)
    prefix = model.cfg.prefix_length
    for n in range(3):
        for li in range(2):
            assert len(set(mem.positions[n, li].flatten().tolist())) == 16  # 4 heads x 4 tokens, none twice
        # the tokens are the paper's keys and values, only chosen differently
        layers = model.encode_reference_layers(refs[n:n + 1])
        j = mem.positions[n, 0, 2] - prefix
        assert torch.equal(mem.keys[n, 0, 2], layers[0]["k"][0, 2, j])
    assert not torch.equal(mem.positions, paper.positions)
    # end to end: the paper's scores written out (tests/_literal.py), divided among the heads by the literal loop
    for n in range(3):
        lit = literal_selection(model, refs[n].tolist(), k=4)
        for li in range(2):
            want = [literal_disjoint(lit["scores"][li].tolist(), 30, 4)[h] for h in range(4)]
            got = [set((mem.positions[n, li, h] - prefix).tolist()) for h in range(4)]
            assert got == want
    with pytest.raises(ValueError, match="soft selection relaxes a scored top-k"):
        encode_reference_tokens(model, refs, soft_temperature=0.5)
