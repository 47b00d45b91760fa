"""§3.4 / §7.5 inference: chunkwise prefill with per-chunk memories, re-retrieval while decoding, RAG, batching.

A random `tiny` model generates nonsense, which is fine here: these tests check which memories each token
reads, that batching and the fused prefill change nothing, and the errors.
"""
import contextlib

import pytest
import torch

from conftest import tiny_model
from mini_m3.inference import generate, generate_batch
from mini_m3.memory.bank import BankError, MemoryBank
from mini_m3.model import prefill_chunk_loop

N_REFS = 40


@pytest.fixture(scope="module")
def refs(world):
    return world.references()


@pytest.fixture(scope="module")
def model(tiny):
    return tiny


@pytest.fixture(scope="module")
def bank(tmp_path_factory, model, tok, refs):
    return MemoryBank.build(tmp_path_factory.mktemp("bank") / "b", model, tok, refs[:N_REFS], progress=False)


@contextlib.contextmanager
def recorded_calls(model):
    """Every forward call of `model` inside the block: (idx, kwargs, output)."""
    calls = []
    handle = model.register_forward_hook(lambda m, args, kwargs, out: calls.append((args[0], kwargs, out)),
                                         with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def n_chunks(tok, prompt, cl=64):
    return -(-(len(tok.encode(prompt)) + 1) // cl)  # + 1 for the context's <s>


def same_memory(a, b) -> bool:
    return (a is not None and b is not None and torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
            and torch.equal(a.full_mask(), b.full_mask()))


# ----------------------------------------------------------------------------------------------- modes
def test_memory_mode_retrieves_per_prompt_chunk_then_every_64_decoded_tokens(model, tok, bank, refs):
    prompt = refs[50]  # ~110 tokens: 2 prompt chunks
    C, N = n_chunks(tok, prompt), 130
    assert C == 2 and len(tok.encode(prompt)) + 1 + N <= model.cfg.max_seq_len
    with recorded_calls(model) as calls:
        r = generate(model, tok, prompt, bank=bank, mode="memory", max_new_tokens=N)
    assert isinstance(r.text, str) and len(r.tokens) == N
    assert r.text == tok.decode([t for t in r.tokens if t != tok.eos_id])
    # one entry per prompt chunk, then one per 64 decoded tokens after the first (which inherits)
    assert r.chunk_kinds == ["prompt"] * C + ["decode"] * ((N - 1) // 64)
    assert all(len(ids) == model.cfg.memories_per_chunk for ids in r.references)
    ids = [tok.bos_id] + tok.encode(prompt)
    for c in range(C):  # each prompt chunk is the query for its own memories
        assert r.references[c] == bank.search([tok.decode(ids[c * 64:(c + 1) * 64])], 5)[0].tolist()
    decode_queries = [tok.decode(r.tokens[:64]), tok.decode(r.tokens[64:128])]
    assert r.references[C:] == [bank.search([q], 5)[0].tolist() for q in decode_queries]
    # which memory each forward call read
    assert len(calls) == N  # prefill + one call per fed token (the last sampled token is not fed)
    prefill_mem = calls[0][1]["memory"]
    assert prefill_mem.n_chunks == C
    last_prompt_chunk = type(prefill_mem)(prefill_mem.keys[:, C - 1:], prefill_mem.values[:, C - 1:],
                                          prefill_mem.mask[:, C - 1:])
    for step in range(N - 1):  # call step + 1 feeds decoded token `step`
        mem = calls[step + 1][1]["memory"]
        if step < 63:  # the first 64 decoded tokens: the last prompt chunk's memories (§7.5)
            assert same_memory(mem, last_prompt_chunk), step
        else:  # after 64 generated tokens: the memories those tokens retrieved, then again after 128
            entry = r.references[C] if step < 127 else r.references[C + 1]
            want = bank.get(entry).to_memory_kv(torch.arange(len(entry))[None, None])
            assert same_memory(mem, want), step
    assert not same_memory(calls[64][1]["memory"], last_prompt_chunk)


def test_none_mode_reads_no_memory(model, tok, bank, refs):
    with recorded_calls(model) as calls:
        r = generate(model, tok, refs[3], bank=None, mode="none", max_new_tokens=10)
    assert isinstance(r.text, str) and len(r.tokens) == 10
    assert r.references == [] and r.chunk_kinds == []
    assert all(kw["memory"] is None for _, kw, _ in calls)


def test_rag_mode_puts_the_retrieved_texts_in_front_of_the_prompt(model, tok, bank, world):
    q = world.eval_questions("memory")[0]
    assert q.person < N_REFS
    with recorded_calls(model) as calls:
        r = generate(model, tok, q.prompt, bank=bank, mode="rag", max_new_tokens=5, memories_per_chunk=2)
    ids = bank.search([q.prompt], 2)[0].tolist()
    assert q.person in ids
    assert r.references == [ids] and r.chunk_kinds == ["prompt"]
    idx = calls[0][0][0].tolist()
    assert calls[0][1]["memory"] is None  # RAG reads texts, not explicit memories
    front = "".join(bank.texts[i] + "\n" for i in ids)
    assert idx == [tok.bos_id] + tok.encode(front + q.prompt)
    assert len(idx) > len(tok.encode(q.prompt)) + 1 + 100  # two ~100-token biographies in front
    assert isinstance(r.text, str) and len(r.tokens) == 5


def test_rag_leakage_filter_drops_a_reference_that_contains_the_prompt(model, tok, bank, refs):
    prompt = refs[7]  # the bank holds this very text: overlap 1 > 2/3
    plain = generate(model, tok, prompt, bank=bank, mode="rag", max_new_tokens=1, memories_per_chunk=1)
    assert plain.references == [[7]]
    filtered = generate(model, tok, prompt, bank=bank, mode="rag", max_new_tokens=1, memories_per_chunk=1,
                        leakage_threshold=2 / 3)
    assert filtered.references[0] and 7 not in filtered.references[0]


# ----------------------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("mode", ["memory", "none"])
def test_greedy_is_deterministic_and_seeded_sampling_reproducible(model, tok, bank, refs, mode):
    prompt = refs[11][:120]
    a = generate(model, tok, prompt, bank=bank, mode=mode, max_new_tokens=20)
    b = generate(model, tok, prompt, bank=bank, mode=mode, max_new_tokens=20)
    assert a.tokens == b.tokens and a.references == b.references
    kw = dict(bank=bank, mode=mode, max_new_tokens=20, temperature=1.0, top_k=100)
    s1 = generate(model, tok, prompt, seed=3, **kw)
    s2 = generate(model, tok, prompt, seed=3, **kw)
    s3 = generate(model, tok, prompt, seed=4, **kw)
    assert s1.tokens == s2.tokens
    assert s1.tokens != s3.tokens  # 20 draws from a near-uniform distribution over 100 tokens
    assert s1.tokens != a.tokens


@pytest.mark.parametrize("mode", ["memory", "none"])
def test_batched_generation_equals_one_by_one(model, tok, bank, refs, world, mode):
    prompts = [world.eval_questions("memory")[3].prompt, refs[45], refs[46][:150]]
    lengths = [len(tok.encode(p)) for p in prompts]
    assert len(set(lengths)) == 3 and len({n_chunks(tok, p) for p in prompts}) == 2  # 1 and 2 chunks
    N = 70  # crosses one re-retrieval while decoding
    with recorded_calls(model) as batch_calls:
        batch = generate_batch(model, tok, prompts, bank=bank, mode=mode, max_new_tokens=N)
    # next-token logits of every call: prefill (left padding puts every row's last prompt token at the end),
    # then each decoding step; a random model's greedy tokens hide small errors, the logits do not
    batch_logits = torch.stack([out.logits[:, -1] for _, _, out in batch_calls], 1)  # (B, N, vocab)
    for b, p in enumerate(prompts):
        with recorded_calls(model) as calls:
            one = generate(model, tok, p, bank=bank, mode=mode, max_new_tokens=N)
        one_logits = torch.stack([out.logits[0, -1] for _, _, out in calls])
        torch.testing.assert_close(batch_logits[b], one_logits, atol=1e-5, rtol=1e-4)
        assert batch[b].tokens == one.tokens and len(one.tokens) == N
        assert batch[b].references == one.references and batch[b].chunk_kinds == one.chunk_kinds
        assert batch[b].text == one.text
    if mode == "memory":
        assert [k.count("prompt") for k in (r.chunk_kinds for r in batch)] == [n_chunks(tok, p) for p in prompts]
        assert all(r.chunk_kinds[-1] == "decode" for r in batch)


# ----------------------------------------------------------------------------------------------- prefill
def test_fused_prefill_uses_each_chunks_own_memories(model, tok, bank, refs):
    prompt = refs[20] + " " + refs[21]  # two biographies of the bank, ~210 tokens: 4 chunks, the last partial
    C = n_chunks(tok, prompt)
    assert C == 4 and (len(tok.encode(prompt)) + 1) % 64 != 0
    with recorded_calls(model) as calls:
        generate(model, tok, prompt, bank=bank, mode="memory", max_new_tokens=2)
    idx, kw, out = calls[0]
    memory = kw["memory"]
    assert memory.n_chunks == C and idx.shape[1] == len(tok.encode(prompt)) + 1
    r = generate(model, tok, prompt, bank=bank, mode="memory", max_new_tokens=1)
    # the chunks retrieved different sets of memories (not just reordered: attention ignores slot order)
    assert set(r.references[0]) != set(r.references[C - 1])
    with torch.no_grad():
        loop = prefill_chunk_loop(model, idx, memory)  # one forward per chunk, each with its own memory
        torch.testing.assert_close(out.logits, loop.logits, atol=1e-5, rtol=1e-4)
        # the comparison is sensitive: without memory, or with the chunks' memories shifted, logits differ
        plain = model(idx).logits
        assert (plain - out.logits).abs().max() > 1e-3
        order = torch.roll(torch.arange(C), 1)
        shifted = type(memory)(memory.keys[:, order], memory.values[:, order], memory.mask[:, order])
        assert (prefill_chunk_loop(model, idx, shifted).logits - out.logits).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------- errors
def test_a_bank_built_by_another_model_is_refused(bank, tok):
    with pytest.raises(BankError, match="rebuild"):
        MemoryBank.open(bank.path, tiny_model(seed=1), tok)


def test_bad_arguments(model, tok, bank, refs):
    with pytest.raises(ValueError, match="bank"):
        generate(model, tok, "hello", bank=None, mode="memory")
    with pytest.raises(ValueError, match="bank"):
        generate(model, tok, "hello", bank=None, mode="rag")
    with pytest.raises(ValueError, match="mode"):
        generate(model, tok, "hello", bank=bank, mode="memories")
    too_long = " ".join(refs[:3])
    assert len(tok.encode(too_long)) > model.cfg.max_seq_len
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, tok, too_long, bank=bank, mode="memory")
    with pytest.raises(ValueError, match="max_seq_len"):  # fits alone, not with the new tokens
        generate(model, tok, refs[0], bank=bank, mode="none", max_new_tokens=200)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, tok, "hello", bank=bank, mode="none", max_new_tokens=-1)
    with pytest.raises(TypeError):
        generate_batch(model, tok, "one string", bank=bank, mode="none")
    with pytest.raises(TypeError):
        generate(model, tok, ["a list"], bank=bank, mode="none")


def test_generation_runs_in_inference_mode(model, tok, bank, refs):
    """Every forward of a generation builds no autograd graph (the decorator sits on generate_batch itself)."""
    seen = []
    handle = model.register_forward_hook(lambda m, args, out: seen.append(torch.is_inference_mode_enabled()))
    try:
        generate_batch(model, tok, [refs[0][:40]], bank=bank, mode="memory", max_new_tokens=2)
    finally:
        handle.remove()
    assert seen and all(seen)
    with pytest.raises(ValueError, match="memories_per_chunk must be an integer >= 1"):
        generate_batch(model, tok, [refs[0][:40]], bank=bank, mode="memory", max_new_tokens=2, memories_per_chunk=0)
