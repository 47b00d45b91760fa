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


def test_a_value_gate_scales_each_value_by_its_weight():
    """soft_gate="logit+value": the same keys, slots and log-weights as "logit", each value times g_j = exp(log g_j),
    so a barely selected token is barely read whatever attention it gets (as T -> 0, g_j -> the hard top-k's 0/1:
    `test_soft_bias_tends_to_the_hard_top_k`); the gradient reaches the selection score through the values too."""
    cfg = small_cfg()
    model = Memory3(cfg).train()
    refs = torch.randint(4, 97, (3, 30))
    for temperature in (0.5, 1e-4):
        logit = encode_reference_tokens(model, refs, soft_temperature=temperature, score_dtype=torch.float32)
        gated = encode_reference_tokens(model, refs, soft_temperature=temperature, score_dtype=torch.float32,
                                        soft_gate="logit+value")
        torch.testing.assert_close(gated.keys, logit.keys)
        torch.testing.assert_close(gated.bias, logit.bias)
        torch.testing.assert_close(gated.values, logit.values * logit.bias.exp()[..., None])
        assert (gated.values - logit.values).abs().max() > 1e-3  # the gate does change the values
    model.zero_grad()
    wq = model.blocks[cfg.memory_layers[-1]].attn.wq.weight
    encode_reference_tokens(model, refs, soft_temperature=0.5, score_dtype=torch.float32,
                            soft_gate="logit+value").values.sum().backward()
    assert wq.grad.abs().max() > 0  # W_Q of the last memory layer only scores: it reaches the values via the gate
    with pytest.raises(ValueError, match="soft_gate must be one of"):
        encode_reference_tokens(model, refs, soft_temperature=0.5, soft_gate="value")
    with pytest.raises(ValueError, match="soft_selection_gate"):
        TrainConfig(soft_selection_gate="values")


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


# ---------------------------------------------------------------- selection distillation (TrainConfig.selection_distill)
@pytest.mark.parametrize("chunks", [1, 3])
@torch.no_grad()
def test_memory_usage_is_the_attention_eq4_pays_each_slot(chunks):
    """The fused prefill's per-slot attention (MemoryKV.usage) equals Eq. 4's softmax pattern summed over queries
    and query heads on the memory columns, read from the literal path's hook."""
    cfg = small_cfg()
    model = Memory3(cfg).eval()
    idx = torch.randint(0, 97, (2, 50 * chunks))
    mem = memory(cfg, 2, chunks, 6, seed=3)
    mem.mask[0, 0, 1] = False  # an empty slot gets no attention
    bias = torch.randn(mem.keys.shape[:-1])
    fused = MemoryKV(mem.keys, mem.values, mem.mask, bias, usage={})
    model(idx, memory=fused)
    _, cache = model.run_with_cache(idx, memory=MemoryKV(mem.keys, mem.values, mem.mask, bias), impl="plain",
                                    names=lambda n: n.endswith("hook_pattern"))
    p, M, g = cfg.prefix_length, 6, cfg.n_query_groups  # keys: [prefix (p) | C·M memory slots | context]
    for li, layer in enumerate(cfg.memory_layers):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]  # (B, H, T, S)
        slots = pattern[..., p:p + chunks * M].sum(2)  # (B, H, C·M)
        want = slots.view(2, cfg.n_kv_heads, g, chunks, M).sum(2).transpose(1, 2)  # (B, C, H_kv, M)
        torch.testing.assert_close(fused.usage[layer], want[:, :, list(cfg.memory_heads)], atol=1e-4, rtol=1e-4)
        assert fused.usage[layer][0, 0, :, 1].abs().max() == 0


def test_selection_distillation_fits_the_score_to_the_readers_attention():
    """One reference, one layer/head: the loss is 0 when the selection distribution equals the attention the reader
    paid, positive otherwise, and gradient steps on the scores alone move them toward the reader's choice."""
    from mini_m3.memory.encode import ExplicitMemory
    from mini_m3.train import selection_distill_loss
    R = 6
    usage = torch.tensor([0.0, 3.0, 0.0, 1.0, 0.0, 0.0])
    target = torch.cat([usage, usage]).view(1, 1, 1, 1, 2 * R)  # (B, C, L_mem, H_mem, n·R): read twice by a chunk
    local = torch.tensor([[[0, 0]]])

    def loss_for(scores):
        mem = ExplicitMemory(*(torch.zeros(1) for _ in range(5)), selection=scores.view(1, 1, 1, R))
        return selection_distill_loss(target, mem, local)
    assert float(loss_for(torch.log(torch.tensor([1e-9, 0.75, 1e-9, 0.25, 1e-9, 1e-9])))) < 1e-6
    scores = torch.zeros(R, requires_grad=True)
    first = loss_for(scores).item()
    opt = torch.optim.SGD([scores], lr=1.0)
    for _ in range(50):
        opt.zero_grad()
        loss_for(scores).backward()
        opt.step()
    assert first > 0.5 and loss_for(scores).item() < first / 4
    assert scores.argsort(descending=True)[:2].tolist() == [1, 3]  # the top-2 are now the tokens the reader used


def _distill_setup():
    """A model reading 2 memories per chunk, 4 rows of tokens and 6 references of 20 tokens (continual stage)."""
    from mini_m3.train import ChunkedData
    cfg = small_cfg(memories_per_chunk=2)
    torch.manual_seed(0)
    model = Memory3(cfg).train()
    refs = [torch.randint(4, 97, (20,)).tolist() for _ in range(6)]
    tokens = torch.randint(4, 97, (4, 64))
    data = ChunkedData(tokens, tokens.roll(-1, 1), torch.tensor([[[0, 1]], [[2, 3]], [[4, 5]], [[1, 2]]]), refs)
    return cfg, model, data, torch.arange(4)


def test_distillation_trains_the_selection_score_and_then_reads_the_hard_format():
    from mini_m3.train import continual_memory, train_step
    cfg, model, data, rows = _distill_setup()
    tc = TrainConfig(stage="continual", steps=10, selection_distill=1.0, soft_selection_until=0.5)
    wq = model.blocks[cfg.memory_layers[-1]].attn.wq.weight
    with_distill = train_step(model, data, rows, tc, step=0)
    with_distill.backward()
    assert wq.grad.abs().max() > 0  # the selection score is trained
    model.zero_grad()
    plain = train_step(model, data, rows, dataclasses.replace(tc, selection_distill=0.0), step=0)
    assert with_distill.item() > plain.item()  # the KL term joined the loss
    hard = continual_memory(model, data, rows, tc)  # after the phase (and in evaluation): the paper's top-k
    assert hard.slots == 2 * cfg.memory_tokens_per_head and hard.usage is None
    kv, mem, local = continual_memory(model, data, rows, tc, distill=True)
    assert kv.slots == 2 * 20 and mem.selection.shape == (6, len(cfg.memory_layers), len(cfg.memory_heads), 20)


# ---------------------------------------------------------------- the attribution target (TrainConfig.selection_target)
def test_attribution_target_is_the_loss_gradient_on_each_slots_log_weight():
    """selection_targets("attribution") = max(0, -dL/d bias_slot), checked against central finite differences of
    the model's loss in each slot's log-weight."""
    from mini_m3.train import selection_targets
    cfg = small_cfg()
    torch.manual_seed(0)
    model = Memory3(cfg).eval()
    idx = torch.randint(0, 97, (2, 40))
    mem = memory(cfg, 2, 1, 5, seed=4)
    keys, values = mem.keys, mem.values
    probe = torch.zeros(keys.shape[:-1], requires_grad=True)
    kv = MemoryKV(keys, values, mem.mask, probe, probe=probe)
    loss = model(idx, targets=idx.roll(-1, 1), memory=kv).loss
    target = selection_targets(kv, loss, cfg.memory_layers)
    assert target.shape == keys.shape[:-1] and (target >= 0).all() and target.max() > 0

    def loss_at(bias):
        with torch.no_grad():
            return model(idx, targets=idx.roll(-1, 1), memory=MemoryKV(keys, values, mem.mask, bias)).loss.item()
    assert target.max() > 1e-3  # some slots matter to the loss: the check below is not on zeros alone
    eps = 1e-2
    for slot in target.flatten().argsort(descending=True)[:3].tolist() + target.flatten().argsort()[:3].tolist():
        slot = torch.unravel_index(torch.tensor(slot), target.shape)
        bump = torch.zeros_like(probe.detach())
        bump[slot] = eps
        slope = (loss_at(bump) - loss_at(-bump)) / (2 * eps)
        assert target[slot].item() == pytest.approx(max(0.0, -slope), abs=2e-4, rel=2e-2), slot


def test_attribution_distillation_trains_the_selection_score():
    from mini_m3.train import continual_memory, train_step
    cfg, model, data, rows = _distill_setup()
    tc = TrainConfig(stage="continual", steps=10, selection_distill=1.0, selection_target="attribution")
    kv, mem, local = continual_memory(model, data, rows, tc, distill=True)
    assert kv.probe is not None and kv.usage is None and kv.probe.shape == kv.keys.shape[:-1]
    wq = model.blocks[cfg.memory_layers[-1]].attn.wq.weight
    loss = train_step(model, data, rows, tc, step=0)
    loss.backward()
    assert wq.grad.abs().max() > 0
    model.zero_grad()
    plain = train_step(model, data, rows, dataclasses.replace(tc, selection_distill=0.0), step=0)
    assert loss.item() > plain.item()  # the KL term joined the loss
    with pytest.raises(ValueError, match="selection_target"):
        TrainConfig(selection_target="labels")
