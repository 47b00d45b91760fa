"""Soft token selection in continual training (a named lever, `TrainConfig.soft_selection`): slot log-weights in
Eq. 4 (`MemoryKV.bias`), the relaxed top-k (`soft_selection_bias`) and its schedule."""
import dataclasses

import pytest
import torch

from mini_m3 import Memory3, Memory3Config
from mini_m3.memory.encode import encode_reference_tokens, select_top_tokens, selection_scores, soft_selection_bias
from mini_m3.model import MemoryKV
from mini_m3.train import TrainConfig, soft_temperature


def small_cfg(**kw):
    return Memory3Config(name="soft-test", vocab_size=97, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8,
                         d_model=32, mlp_width=48, max_seq_len=200, memory_layers=(0, 1), **kw)


def memory(cfg, B, C, M, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (B, C, len(cfg.memory_layers), len(cfg.memory_heads), M, cfg.head_dim)
    return MemoryKV(torch.randn(shape, generator=g), torch.randn(shape, generator=g),
                    torch.ones(B, C, M, dtype=torch.bool))


@pytest.mark.parametrize("impl", ["sdpa", "plain"])
@pytest.mark.parametrize("chunks", [1, 3])  # the fused path's one-chunk and chunk-batched layouts
@torch.no_grad()
def test_a_log2_bias_counts_a_slot_twice(impl, chunks):
    """Exact meaning of the bias: weight 2 on slot j (bias log 2) = slot j written twice, in every attention path."""
    cfg = small_cfg()
    model = Memory3(cfg).eval()
    idx = torch.randint(0, 97, (2, 50 * chunks))
    mem = memory(cfg, 2, chunks, 6)
    bias = torch.zeros(mem.keys.shape[:-1])
    bias[..., 2] = torch.log(torch.tensor(2.0))
    doubled = MemoryKV(torch.cat([mem.keys, mem.keys[..., 2:3, :]], -2), torch.cat([mem.values, mem.values[..., 2:3, :]], -2))
    want = model(idx, memory=doubled, impl="plain").logits
    got = model(idx, memory=MemoryKV(mem.keys, mem.values, mem.mask, bias), impl=impl).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    assert (model(idx, memory=mem, impl=impl).logits - want).abs().max() > 1e-3  # the bias does change the output


@torch.no_grad()
def test_a_minus_inf_bias_removes_a_slot():
    cfg = small_cfg()
    model = Memory3(cfg).eval()
    idx = torch.randint(0, 97, (1, 130))
    mem = memory(cfg, 1, 3, 5, seed=1)
    bias = torch.zeros(mem.keys.shape[:-1])
    bias[..., 1] = float("-inf")
    mask = torch.ones(mem.keys.shape[:-1], dtype=torch.bool)
    mask[..., 1] = False
    want = model(idx, memory=MemoryKV(mem.keys, mem.values, mask), impl="plain").logits
    for impl in ("sdpa", "plain"):
        got = model(idx, memory=MemoryKV(mem.keys, mem.values, None, bias), impl=impl).logits
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_bias_is_validated_and_refused_by_decoding():
    cfg = small_cfg()
    model = Memory3(cfg).eval()
    mem = memory(cfg, 1, 1, 4)
    with pytest.raises(ValueError, match="bias must be float of shape"):
        model(torch.randint(0, 97, (1, 10)), memory=MemoryKV(mem.keys, mem.values, None, torch.zeros(1, 1, 4)))
    biased = MemoryKV(mem.keys, mem.values, None, torch.zeros(mem.keys.shape[:-1]))
    out = model(torch.randint(0, 97, (1, 10)), memory=biased, use_cache=True)  # a prefill reads it
    with pytest.raises(ValueError, match="decoding reads memories in the hard format"):
        with torch.no_grad():
            model(torch.randint(0, 97, (1, 1)), memory=biased, cache=out.cache, use_cache=True)


def test_soft_bias_tends_to_the_hard_top_k():
    torch.manual_seed(0)
    N, H, R, d, k = 3, 2, 20, 8, 5
    q, kk = torch.randn(N, 2 * H, R, d), torch.randn(N, H, R, d)
    valid = torch.ones(N, R, dtype=torch.bool)
    valid[0, 15:] = False  # a shorter reference
    scores = selection_scores(q, kk, valid, 2, "attention", torch.float32)
    hard, _ = select_top_tokens(scores, valid, k)
    index, kept = select_top_tokens(scores, valid, R)  # every token, in reading order
    log_g = soft_selection_bias(scores, index, kept, k, "attention", temperature=1e-4)
    chosen = torch.zeros(N, H, R, dtype=torch.bool).scatter_(-1, hard, True).gather(-1, index) & kept
    assert torch.all(log_g[chosen] > -1e-3) and torch.all(log_g[~chosen & kept] < -10)
    warm = soft_selection_bias(scores, index, kept, k, "attention", temperature=1.0)
    assert torch.all(warm[~chosen & kept] > -60) and torch.all(warm <= 0)  # at T = 1 every token is read a bit


def test_soft_selection_sends_gradient_into_the_selection_score():
    """Hard top-k: the last memory layer's W_Q only scores tokens, so the memory does not depend on it. Soft: the
    slot weights do, so training can move which tokens the hard top-k keeps."""
    cfg = small_cfg()
    model = Memory3(cfg).train()
    refs = torch.randint(4, 97, (3, 30))
    wq = model.blocks[cfg.memory_layers[-1]].attn.wq.weight
    for temperature in (0.0, 0.5):
        model.zero_grad()
        mem = encode_reference_tokens(model, refs, soft_temperature=temperature, score_dtype=torch.float32)
        total = mem.keys.sum() + mem.values.sum() + (0 if mem.bias is None else mem.bias.sum())
        total.backward()
        if temperature == 0:
            assert mem.bias is None and (wq.grad is None or wq.grad.abs().max() == 0)
            assert mem.tokens_per_head == cfg.memory_tokens_per_head
        else:
            assert mem.tokens_per_head == 30 and wq.grad.abs().max() > 0


def test_soft_selection_refuses_an_unscored_selector():
    model = Memory3(small_cfg())
    with pytest.raises(ValueError, match="soft selection relaxes a scored top-k"):
        encode_reference_tokens(model, torch.randint(4, 97, (2, 12)), selector="random", soft_temperature=1.0)


def test_soft_temperature_schedule_and_validation():
    cfg = TrainConfig(stage="continual", steps=100, soft_selection=2.0, soft_selection_until=0.5)
    temps = [soft_temperature(s, cfg) for s in range(100)]
    assert temps[0] == 2.0 and temps[25] == pytest.approx(1.0) and all(t == 0 for t in temps[50:])
    assert soft_temperature(None, cfg) == 0.0  # evaluation reads the hard format
    assert soft_temperature(3, dataclasses.replace(cfg, soft_selection=0.0)) == 0.0
    for bad in ({"soft_selection": -1.0}, {"soft_selection_until": 0.0}, {"soft_selection_until": 1.5}):
        with pytest.raises(ValueError, match="soft_selection"):
            TrainConfig(**bad)
