"""Memory3 network: equivalences (zero memories, fused vs loop, cache vs full, sdpa vs plain), counts, errors."""
import math

import pytest
import torch

from _literal import literal_forward
from mini_m3 import Memory3, Memory3Config, MemoryKV
from mini_m3.model import prefill_chunk_loop, zero_attention_edge, zero_mlp_neuron


def tiny_version(name: str) -> Memory3Config:
    """A few-thousand-parameter model with the same head grouping and memory layout rule as a preset."""
    big = Memory3Config.from_name(name)
    g = big.n_query_groups
    return Memory3Config(name=f"tiny-{name}", vocab_size=97, n_layers=4, n_heads=2 * g, n_kv_heads=2,
                         head_dim=8, d_model=16 * g, mlp_width=24, max_seq_len=200,
                         tie_embeddings=big.tie_embeddings)


FAMILIES = ["tiny", "small", "paper-0.92b", "paper-2.4b"] + [n for n in Memory3Config.available() if n.startswith("fig10")]


def random_memory(cfg, B, C, M, p_valid=0.7, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (B, C, len(cfg.memory_layers), len(cfg.memory_heads), M, cfg.head_dim)
    return MemoryKV(torch.randn(shape, generator=g), torch.randn(shape, generator=g),
                    torch.rand(B, C, M, generator=g) < p_valid)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_no_memory_equals_textbook_causal_attention(family):
    model = Memory3(tiny_version(family)).eval()
    idx = torch.randint(0, 97, (2, 37))
    ref = literal_forward(model, idx).float()  # textbook causal Llama over [prefix ; context], tests/_literal.py
    for impl in ("sdpa", "plain"):
        torch.testing.assert_close(model(idx, impl=impl).logits, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("memory_heads", [None, (1,)])
@torch.no_grad()
def test_memory_attention_equals_the_literal_eq4(memory_heads):
    """Eq. 4 written out (tests/_literal.py: per query, softmax over [this chunk's valid memory K ; context K[:i]]
    in the memory heads of the memory layers) against the fused prefill, the dense reference path and decoding."""
    cfg = Memory3Config.from_name("tiny", memory_heads=memory_heads, init_std=0.1)
    model = Memory3(cfg).eval()
    mem = holey_memory(cfg, 2, 3, 16)  # 3 chunks, empty slots, row 0's last chunk all empty
    idx = torch.randint(4, cfg.vocab_size, (2, 150))
    shifted = torch.stack([torch.arange(150) // 64, ((torch.arange(150) + 20) // 64).clamp(max=2)])  # per row
    want = {}
    for name, qc in (("own chunk", None), ("shifted", shifted)):
        want[name] = literal_forward(model, idx, mem, qc).float()
        for impl in ("sdpa", "plain"):
            torch.testing.assert_close(model(idx, memory=mem, query_chunks=qc, impl=impl).logits, want[name],
                                       atol=2e-5, rtol=1e-5, msg=lambda m: f"{name}, {impl}: {m}")
    # decoding: the last 10 tokens one at a time, each reading chunk 2, through the KV cache
    out = model(idx[:, :140], memory=mem, use_cache=True)
    steps, cache = [out.logits], out.cache
    for t in range(140, 150):
        o = model(idx[:, t:t + 1], memory=mem, cache=cache, use_cache=True, query_chunks=torch.full((1,), 2))
        steps.append(o.logits)
        cache = o.cache
    torch.testing.assert_close(torch.cat(steps, 1), want["own chunk"], atol=2e-5, rtol=1e-5)
    assert (want["own chunk"] - literal_forward(model, idx).float()).abs().max() > 0.1  # the memories matter here


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_memories_equal_plain_causal_attention(family):
    cfg = tiny_version(family)
    model = Memory3(cfg).eval()
    idx = torch.randint(0, 97, (2, 70))
    plain = model(idx).logits
    # memories present but every slot empty, and memories with zero slots: both must change nothing
    empty = random_memory(cfg, 2, 2, 5, p_valid=0.0)
    zero_slots = random_memory(cfg, 2, 2, 0)
    torch.testing.assert_close(model(idx, memory=empty).logits, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(idx, memory=zero_slots).logits, plain, atol=1e-5, rtol=1e-5)
    # ...while real memories do change the output (so the check above can fail)
    full = random_memory(cfg, 2, 2, 5, p_valid=1.0)
    assert (model(idx, memory=full).logits - plain).abs().max() > 1e-3


@pytest.mark.parametrize("memory_heads", [None, (1,)])
@pytest.mark.parametrize("T", [64 * 3, 64 * 2 + 17])
@torch.no_grad()
def test_fused_chunkwise_equals_per_chunk_loop(memory_heads, T):
    cfg = Memory3Config.from_name("tiny", memory_heads=memory_heads)
    model = Memory3(cfg).eval()
    C = math.ceil(T / cfg.chunk_length)
    mem = random_memory(cfg, 2, C, cfg.memory_slots_per_chunk)
    idx = torch.randint(0, cfg.vocab_size, (2, T))
    fused = model(idx, memory=mem)
    loop = prefill_chunk_loop(model, idx, mem)
    torch.testing.assert_close(fused.logits, loop.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(idx, memory=mem, impl="plain").logits, fused.logits, atol=1e-5, rtol=1e-5)


def test_each_chunk_reads_only_its_own_memories():
    cfg = Memory3Config.from_name("tiny")
    model = Memory3(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (1, 128))
    mem = random_memory(cfg, 1, 2, 8, p_valid=1.0)
    base = model(idx, memory=mem).logits
    changed = MemoryKV(mem.keys.clone(), mem.values.clone(), mem.mask)
    changed.values[:, 1] += 1.0  # alter chunk 1's memories only
    out = model(idx, memory=changed).logits
    torch.testing.assert_close(out[:, :64], base[:, :64])  # chunk 0 unaffected
    assert (out[:, 64:] - base[:, 64:]).abs().max() > 1e-3


def test_memory_is_read_only_in_memory_layers_and_heads():
    cfg = Memory3Config.from_name("tiny", memory_layers=(1,), memory_heads=(1,))
    model = Memory3(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (1, 20))
    mem = random_memory(cfg, 1, 1, 6, p_valid=1.0)
    _, c0 = model.run_with_cache(idx)
    _, c1 = model.run_with_cache(idx, memory=mem)
    torch.testing.assert_close(c0["blocks.0.hook_resid_post"], c1["blocks.0.hook_resid_post"])
    assert (c0["blocks.1.hook_resid_post"] - c1["blocks.1.hook_resid_post"]).abs().max() > 1e-4
    pat = c1["blocks.1.attn.hook_pattern"]  # (B, H, T, p + M + T)
    p, g = cfg.prefix_length, cfg.n_query_groups
    mem_cols = slice(p, p + 6)
    assert pat[:, :g, :, mem_cols].abs().max() == 0  # query heads of KV head 0: not a memory head
    assert pat[:, g:, :, mem_cols].sum() > 0
    torch.testing.assert_close(pat.sum(-1), torch.ones_like(pat.sum(-1)))


@torch.no_grad()
def test_kv_cache_decoding_equals_full_forward():
    cfg = Memory3Config.from_name("tiny")
    model = Memory3(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 90))
    full = model(idx).logits
    out = model(idx[:, :50], use_cache=True)
    steps = [out.logits]
    cache = out.cache
    for t in range(50, 90):
        o = model(idx[:, t:t + 1], cache=cache, use_cache=True)
        cache = o.cache
        steps.append(o.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 90


@torch.no_grad()
def test_kv_cache_decoding_with_memory_equals_full_forward():
    cfg = Memory3Config.from_name("tiny")
    model = Memory3(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (1, 40))
    mem = random_memory(cfg, 1, 1, 16)
    full = model(idx, memory=mem).logits
    out = model(idx[:, :30], memory=mem, use_cache=True)
    steps, cache = [out.logits], out.cache
    for t in range(30, 40):
        o = model(idx[:, t:t + 1], memory=mem, cache=cache, use_cache=True)
        steps.append(o.logits)
        cache = o.cache
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_left_padding_with_positions_and_context_mask():
    cfg = Memory3Config.from_name("tiny")
    model = Memory3(cfg).eval()
    a = torch.randint(4, cfg.vocab_size, (1, 12))
    b = torch.randint(4, cfg.vocab_size, (1, 7))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], 1)])
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, :5] = False
    positions = torch.stack([torch.arange(12), (torch.arange(12) - 5).clamp(min=0)])
    out = model(batch, context_mask=mask, positions=positions).logits
    torch.testing.assert_close(out[0], model(a).logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, 5:], model(b).logits[0], atol=1e-5, rtol=1e-5)


def expected_non_embedding(L, H, Hkv, dh, d, W):
    """From the shape alone: per layer W_Q, W_O (d x H d_h each), W_K, W_V (d x H_kv d_h each), gated MLP
    (3 d W), two RMSNorm gains (2d); plus the final norm (d)."""
    return L * (2 * d * H * dh + 2 * d * Hkv * dh + 3 * d * W + 2 * d) + d


def test_parameter_counts_of_paper_models_from_their_shapes():
    cases = {"paper-2.4b": (44, 40, 8, 80, 3200, 3200), "paper-0.92b": (40, 32, 8, 64, 2048, 2048)}
    for name, shape in cases.items():
        with torch.device("meta"):
            model = Memory3(Memory3Config.from_name(name))
        assert model.num_parameters(non_embedding=True) == expected_non_embedding(*shape)
    # the paper's own formula (no norms) gives the advertised sizes
    L, H, Hkv, dh, d, W = cases["paper-2.4b"]
    assert round(L * (2 * d * d + 2 * d * dh * Hkv + 3 * d * W) / 1e9, 1) == 2.4
    L, H, Hkv, dh, d, W = cases["paper-0.92b"]
    assert round(L * (2 * d * d + 2 * d * dh * Hkv + 3 * d * W) / 1e9, 2) == 0.92


def test_parameter_count_with_embeddings():
    cfg = Memory3Config.from_name("tiny")
    m = Memory3(cfg)
    assert m.num_parameters(non_embedding=False) - m.num_parameters() == cfg.vocab_size * cfg.d_model  # tied
    cfg2 = cfg.replace(tie_embeddings=False)
    m2 = Memory3(cfg2)
    assert m2.num_parameters(non_embedding=False) - m2.num_parameters() == 2 * cfg.vocab_size * cfg.d_model
    assert m.num_parameters() == sum(p.numel() for n, p in m.named_parameters() if "tok_emb" not in n)


def test_paper_24b_builds_on_meta_without_memory():
    with torch.device("meta"):
        model = Memory3(Memory3Config.from_name("paper-2.4b"))
    assert all(p.is_meta for p in model.parameters())
    assert all(b.is_meta for b in model.buffers())


def test_bad_inputs_get_clear_errors():
    cfg = Memory3Config.from_name("tiny")
    model = Memory3(cfg)
    with pytest.raises(ValueError, match="out of range"):
        model(torch.tensor([[1, cfg.vocab_size]]))
    with pytest.raises(ValueError, match="out of range"):
        model(torch.tensor([[-1, 5]]))
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model(torch.zeros(1, cfg.max_seq_len + 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(batch, time\) integer"):
        model(torch.zeros(5))
    with pytest.raises(ValueError, match=r"\(batch, time\) integer"):
        model(torch.zeros(1, 5))  # float ids
    idx = torch.zeros(2, 10, dtype=torch.long)
    good = random_memory(cfg, 2, 1, 8)
    with pytest.raises(ValueError, match="expected"):
        model(idx, memory=MemoryKV(good.keys[:, :, :1], good.values[:, :, :1]))  # wrong number of layers
    with pytest.raises(ValueError, match="expected"):
        model(idx, memory=MemoryKV(good.keys[:1], good.values[:1]))  # wrong batch
    with pytest.raises(ValueError, match="dtype"):
        model(idx, memory=MemoryKV(good.keys.double(), good.values.double()))
    with pytest.raises(ValueError, match="mask"):
        model(idx, memory=MemoryKV(good.keys, good.values, torch.ones(2, 1, 8)))
    with pytest.raises(ValueError, match="query_chunks"):
        model(idx, memory=good, query_chunks=torch.full((10,), 3))
    with pytest.raises(ValueError, match="no memory layers"):
        Memory3(cfg.replace(memory_layers=(), memory_heads=()))(idx, memory=good)


def test_hooks_cache_patterns_and_gradients():
    cfg = Memory3Config.from_name("tiny")
    model = Memory3(cfg)
    idx = torch.randint(0, cfg.vocab_size, (1, 12))
    tgt = torch.randint(0, cfg.vocab_size, (1, 12))
    out, cache = model.run_with_cache(idx, targets=tgt, keep_grad=True,
                                      names=lambda n: n.endswith(("hook_pattern", "hook_post", "hook_result", "hook_z")))
    assert set(cache) >= {"blocks.0.attn.hook_pattern", "blocks.3.mlp.hook_post", "blocks.2.attn.hook_result"}
    pat = cache["blocks.1.attn.hook_pattern"]
    assert pat.shape == (1, cfg.n_heads, 12, cfg.prefix_length + 12)
    out.loss.backward()
    assert cache["blocks.1.attn.hook_pattern"].grad is not None
    assert cache["blocks.0.mlp.hook_post"].grad.abs().sum() > 0
    # per-head results sum to the attention output
    _, c2 = model.run_with_cache(idx, names=["blocks.2.attn.hook_result", "blocks.2.hook_attn_out"])
    torch.testing.assert_close(c2["blocks.2.attn.hook_result"].sum(2), c2["blocks.2.hook_attn_out"], atol=1e-5, rtol=1e-5)
    with pytest.raises(KeyError):
        model.run_with_cache(idx, names=["nope"])
    assert all(not hp.active for hp in model.hook_points().values())  # hooks removed afterwards


def test_zeroing_an_edge_and_a_neuron_matches_gradient_sign_and_changes_loss():
    cfg = Memory3Config.from_name("tiny")
    model = Memory3(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (1, 10))
    tgt = torch.randint(0, cfg.vocab_size, (1, 10))
    base = model(idx, targets=tgt).loss
    layer, head, q = 1, 2, 7
    kidx = model.key_index(layer, 3)
    with model.hooks([zero_attention_edge(layer, head, q, kidx)]):
        out, cache = model.run_with_cache(idx, targets=tgt, names=[f"blocks.{layer}.attn.hook_pattern"])
    assert cache[f"blocks.{layer}.attn.hook_pattern"][0, head, q, kidx] == 0
    assert out.loss != base
    with model.hooks([zero_mlp_neuron(0, 4, 17)]):
        out2, c = model.run_with_cache(idx, targets=tgt, names=["blocks.0.mlp.hook_post"])
    assert c["blocks.0.mlp.hook_post"][0, 4, 17] == 0 and out2.loss != base
    # earlier positions are untouched by zeroing a neuron at position 4 (causality)
    with model.hooks([zero_mlp_neuron(0, 4, 17)]):
        l2 = model(idx).logits
    torch.testing.assert_close(l2[:, :4], model(idx).logits[:, :4])


def test_prefix_cache_follows_weight_updates():
    cfg = Memory3Config.from_name("tiny")
    model = Memory3(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (1, 8))
    with torch.no_grad():
        model(idx)
        model.blocks[0].attn.wk.weight.mul_(1.5)  # in-place update, as an optimizer does
        after = model(idx).logits
    fresh = Memory3(cfg).eval()
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(after, fresh(idx).logits)


def test_target_logits_only_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    cfg = Memory3Config.from_name("tiny")
    model = Memory3(cfg).train()
    idx = torch.randint(4, cfg.vocab_size, (3, 20))
    tgt = idx.roll(-1, 1).clone()
    tgt[0, 12:], tgt[2, 5:] = -100, -100  # right padding, as pack_documents makes
    grads = []
    for only in (False, True):
        model.zero_grad()
        out = model(idx, targets=tgt, target_logits_only=only)
        out.loss.backward()
        grads.append((out.loss.detach(), [p.grad.clone() for p in model.parameters()]))
        if only:
            assert out.logits.shape == (int((tgt != -100).sum()), cfg.vocab_size)
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="needs targets"):
        model(idx, target_logits_only=True)


def test_prefix_gets_gradients_in_training():
    cfg = Memory3Config.from_name("tiny")
    model = Memory3(cfg).train()
    idx = torch.randint(4, cfg.vocab_size, (1, 8))
    model(idx, targets=idx).loss.backward()
    assert model.tok_emb.weight.grad[cfg.reference_prefix_ids[1]].abs().sum() > 0  # <ref> only in the prefix


def test_reference_encoding_keys_match_a_full_forward():
    """Keys stored for memory are the keys of "<s>Reference:"+ref at positions p..p+R-1."""
    cfg = Memory3Config.from_name("tiny")
    model = Memory3(cfg).eval()
    ref = torch.randint(4, cfg.vocab_size, (1, 20))
    layers = model.encode_reference_layers(ref)
    assert len(layers) == len(cfg.memory_layers)
    _, cache = model.run_with_cache(ref, positions=torch.arange(20) - cfg.reference_length,
                                    names=[f"blocks.{l}.attn.hook_k" for l in cfg.memory_layers])
    for l, d in zip(cfg.memory_layers, layers):
        k_ctx = cache[f"blocks.{l}.attn.hook_k"][:, :, cfg.prefix_length:]
        torch.testing.assert_close(d["k"], k_ctx, atol=1e-5, rtol=1e-5)


def test_keep_grad_works_with_frozen_weights_and_batched_edge_ablation():
    cfg = Memory3Config.from_name("tiny")
    model = Memory3(cfg).eval().requires_grad_(False)
    idx = torch.randint(0, cfg.vocab_size, (2, 10))
    out, cache = model.run_with_cache(idx, targets=idx, keep_grad=True, names=["blocks.1.mlp.hook_post"])
    out.loss.backward()
    assert cache["blocks.1.mlp.hook_post"].grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    with model.hooks([zero_mlp_neuron(0, 4, 17, batch_index=1)]):
        _, c = model.run_with_cache(idx, names=["blocks.0.mlp.hook_post"])
    act = c["blocks.0.mlp.hook_post"]
    assert act[1, 4, 17] == 0 and act[0, 4, 17] != 0


# ----------------------------------------------------------------------------------------------- fast paths
def holey_memory(cfg, B, C, M, seed=0):
    """Random memories where some slots, and all of one chunk of row 0, hold no token."""
    mem = random_memory(cfg, B, C, M, p_valid=0.6, seed=seed)
    mem.mask[0, C - 1] = False
    return mem


@pytest.mark.parametrize("memory_heads", [None, (1,)])
@pytest.mark.parametrize("T", [1, 37, 64, 130, 300])
@torch.no_grad()
def test_fast_prefill_equals_plain_reference(memory_heads, T):
    """Causal SDPA + per-chunk memory attention merged by log-sum-exp == one dense softmax over all keys."""
    cfg = Memory3Config.from_name("tiny", memory_heads=memory_heads, max_seq_len=320)
    model = Memory3(cfg).eval()
    C = math.ceil(T / cfg.chunk_length) + 1  # one chunk more than needed: unused memories change nothing
    mem = holey_memory(cfg, 2, C, 40)
    idx = torch.randint(0, cfg.vocab_size, (2, T))
    shifted = torch.stack([torch.arange(T) // 64, (torch.arange(T) + 20) // 64]).clamp(max=C - 1)  # per-row
    for qc in (None, shifted):
        fast = model(idx, memory=mem, query_chunks=qc).logits
        torch.testing.assert_close(fast, model(idx, memory=mem, query_chunks=qc, impl="plain").logits,
                                   atol=1e-5, rtol=1e-5)
    # left padding: row 1 starts 9 tokens late
    if T > 10:
        mask = torch.ones(2, T, dtype=torch.bool)
        mask[1, :9] = False
        pos = torch.stack([torch.arange(T), (torch.arange(T) - 9).clamp(min=0)])
        kw = dict(memory=mem, context_mask=mask, positions=pos, query_chunks=(pos // 64).clamp(max=C - 1))
        fast = model(idx, **kw).logits
        torch.testing.assert_close(fast[1, 9:], model(idx, impl="plain", **kw).logits[1, 9:], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fast[0], model(idx, impl="plain", **kw).logits[0], atol=1e-5, rtol=1e-5)


def test_fast_prefill_gradients_equal_plain_reference():
    """Training goes through the fast path: its gradients must be the reference's."""
    cfg = Memory3Config.from_name("tiny", memory_heads=(1,))
    model = Memory3(cfg).train()
    mem = holey_memory(cfg, 2, 3, 16)
    idx = torch.randint(4, cfg.vocab_size, (2, 150))
    grads = []
    for impl in ("sdpa", "plain"):
        model.zero_grad()
        model(idx, targets=idx, memory=mem, impl=impl).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-4, msg=n)


@pytest.mark.parametrize("memory_heads", [None, (1,)])
@torch.no_grad()
def test_decoding_with_changing_memories_equals_plain_reference(memory_heads):
    """Steps read memories that stay, change, grow, vanish, differ per row; the in-place cache keeps its buffer."""
    cfg = Memory3Config.from_name("tiny", memory_heads=memory_heads)
    model = Memory3(cfg).eval()
    B, T0 = 2, 70
    idx = torch.randint(4, cfg.vocab_size, (B, T0 + 12))
    a, b = holey_memory(cfg, B, 1, 40, seed=1), holey_memory(cfg, B, 1, 24, seed=2)
    two = holey_memory(cfg, B, 2, 40, seed=3)
    row_chunks = torch.tensor([[1], [0]])  # row 0 reads chunk 1, row 1 chunk 0
    plan = [(a, None)] * 3 + [(b, None)] * 2 + [(None, None)] * 2 + [(two, row_chunks)] * 3 + [(a, None)] * 2
    out_f = model(idx[:, :T0], memory=two, use_cache=True)
    out_p = model(idx[:, :T0], memory=two, use_cache=True, impl="plain")
    torch.testing.assert_close(out_f.logits, out_p.logits, atol=1e-5, rtol=1e-5)
    cf, cp = out_f.cache, out_p.cache
    ptr = cf.keys[0].data_ptr()
    for t, (mem, qc) in enumerate(plan, start=T0):
        if mem is not None and qc is None:
            qc = torch.zeros(B, 1, dtype=torch.long)
        of = model(idx[:, t:t + 1], memory=mem, query_chunks=qc, cache=cf, use_cache=True)
        op = model(idx[:, t:t + 1], memory=mem, query_chunks=qc, cache=cp, use_cache=True, impl="plain")
        torch.testing.assert_close(of.logits, op.logits, atol=1e-5, rtol=1e-5, msg=f"step {t}")
        cf, cp = of.cache, op.cache
    assert cf.length == T0 + len(plan) and cf.keys[0].data_ptr() == ptr  # written in place, no copy


@torch.no_grad()
def test_two_continuations_of_one_cache_do_not_overwrite_each_other():
    cfg = Memory3Config.from_name("tiny")
    model = Memory3(cfg).eval()
    idx = torch.randint(4, cfg.vocab_size, (1, 40))
    cache = model(idx[:, :30], use_cache=True).cache
    a = model(idx[:, 30:31], cache=cache, use_cache=True).cache
    b = model(idx[:, 31:32], cache=cache, use_cache=True)  # same start, other token
    a2 = model(idx[:, 32:33], cache=a, use_cache=True).logits
    want_a = model(torch.cat([idx[:, :31], idx[:, 32:33]], 1)).logits[:, -1:]
    want_b = model(torch.cat([idx[:, :30], idx[:, 31:32]], 1)).logits[:, -1:]
    torch.testing.assert_close(a2, want_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.logits, want_b, atol=1e-5, rtol=1e-5)
    assert cache.length == 30 and a.length == 31


@torch.no_grad()
def test_hooks_on_a_decoding_step_with_memory_see_the_reference_layout():
    cfg = Memory3Config.from_name("tiny")
    model = Memory3(cfg).eval()
    idx = torch.randint(4, cfg.vocab_size, (1, 21))
    mem = holey_memory(cfg, 1, 1, 8)
    cache = model(idx[:, :20], memory=mem, use_cache=True).cache
    one = torch.zeros(1, 1, dtype=torch.long)
    plain = model(idx[:, 20:], memory=mem, cache=cache, query_chunks=one).logits
    out, rec = model.run_with_cache(idx[:, 20:], memory=mem, cache=cache, query_chunks=one,
                                    names=["blocks.0.attn.hook_pattern"])
    torch.testing.assert_close(out.logits, plain, atol=1e-5, rtol=1e-5)
    pat = rec["blocks.0.attn.hook_pattern"]
    assert pat.shape == (1, cfg.n_heads, 1, cfg.prefix_length + 8 + 21)
    assert pat[..., cfg.prefix_length:cfg.prefix_length + 8][..., ~mem.mask[0, 0]].abs().max() == 0
