"""The "learned" selector (a named lever for issue 15, deviation 73): a reference's tokens ranked by the attention
the memory layer's learned selection queries (`Attention.select_q`) pay them, with the paper's softmax score."""
import pytest
import torch

from mini_m3 import Memory3, Memory3Config
from mini_m3.checkpoint import load_pretrained, save_pretrained
from mini_m3.memory.encode import encode_reference_tokens, init_selection_queries


def cfg_with(P, **kw):
    return Memory3Config(name="learned-test", vocab_size=97, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8,
                         d_model=32, mlp_width=48, max_seq_len=200, memory_layers=(0, 1),
                         memory_selection_queries=P, **kw)


def test_learned_queries_that_are_a_references_own_queries_keep_the_papers_tokens():
    """Equivalence: with the reference's own (un-rotated) queries as the learned ones, "learned" keeps exactly the
    tokens, keys and values of the paper's "attention" selector; with other queries, other tokens."""
    R = 30
    model = Memory3(cfg_with(R, memory_selector="learned")).eval()
    ref = torch.randint(4, 97, (1, R), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for li, layer in enumerate(model.encode_reference_layers(ref)):
            model.blocks[model.cfg.memory_layers[li]].attn.select_q.copy_(layer["q_raw"][0].transpose(0, 1))
        learned = encode_reference_tokens(model, ref)
        paper = encode_reference_tokens(model, ref, selector="attention")
        assert torch.equal(learned.positions, paper.positions)
        assert torch.equal(learned.keys, paper.keys) and torch.equal(learned.values, paper.values)
        for blk in model.blocks[:2]:
            blk.attn.select_q.copy_(torch.randn(blk.attn.select_q.shape, generator=torch.Generator().manual_seed(2)))
        assert not torch.equal(encode_reference_tokens(model, ref).positions, paper.positions)


def test_only_soft_selection_sends_gradient_into_the_learned_queries():
    model = Memory3(cfg_with(4, memory_selector="learned")).train()
    refs = torch.randint(4, 97, (3, 30))
    q = model.blocks[1].attn.select_q
    hard = encode_reference_tokens(model, refs, score_dtype=torch.float32)
    (hard.keys.sum() + hard.values.sum()).backward()
    assert q.grad is None or q.grad.abs().max() == 0  # the hard top-k is not differentiable
    soft = encode_reference_tokens(model, refs, soft_temperature=0.5, score_dtype=torch.float32,
                                   soft_gate="logit+value")
    soft.values.sum().backward()
    assert q.grad.abs().max() > 0


def test_the_learned_selector_needs_queries_and_the_queries_are_saved(tmp_path):
    with pytest.raises(ValueError, match="memory_selection_queries > 0"):
        cfg_with(0, memory_selector="learned")
    with pytest.raises(ValueError, match="memory_selection_queries"):
        cfg_with(-1)
    paper = Memory3(cfg_with(0))
    assert not any("select_q" in n for n, _ in paper.named_parameters())
    with pytest.raises(ValueError, match="needs a model with learned selection queries"):
        encode_reference_tokens(paper, torch.randint(4, 97, (1, 20)), selector="learned")
    model = Memory3(cfg_with(3, memory_selector="learned"))
    assert model.blocks[0].attn.select_q.shape == (3, 4, 8) and not hasattr(model.blocks[2].attn, "select_q")
    assert Memory3Config.from_json(model.cfg.to_json()) == model.cfg
    save_pretrained(model, tmp_path / "m")
    back, _ = load_pretrained(tmp_path / "m")
    assert back.cfg == model.cfg
    torch.testing.assert_close(back.blocks[1].attn.select_q, model.blocks[1].attn.select_q)


def test_init_selection_queries_takes_reference_tokens_queries():
    model = Memory3(cfg_with(5, memory_selector="learned")).eval()
    refs = [torch.randint(4, 97, (n,)).tolist() for n in (12, 20, 7)]
    init_selection_queries(model, refs, seed=0)
    with torch.no_grad():
        for li, l in enumerate(model.cfg.memory_layers):
            asked = model.blocks[l].attn.select_q  # (P, H, d_h)
            pool = torch.cat([model.encode_reference_layers(torch.tensor([r]))[li]["q_raw"][0].transpose(0, 1)
                              for r in refs])  # (every token, H, d_h)
            for p in range(5):
                assert (pool - asked[p]).abs().flatten(1).max(1).values.min() < 1e-5
    with pytest.raises(ValueError, match="no learned selection queries"):
        init_selection_queries(Memory3(cfg_with(0)), refs)
