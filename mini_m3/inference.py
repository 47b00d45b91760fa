"""§3.4 and §7.5 inference: chunkwise prefill with per-chunk memories, decoding with re-retrieval, RAG and none.

Modes (the paper's Table 21 compares them):
- "memory": the prompt is cut into 64-token chunks; each chunk retrieves its 5 memories with its own text
  as the query, and all chunks are prefilled in one attention call. Decoding keeps the last prompt chunk's
  memories for the first 64 new tokens (§7.5), then every 64 generated tokens are the query for 5 new ones.
- "rag": one retrieval with the whole prompt; the 5 reference texts are put in front of the prompt.
- "none": the plain model.
Prompts in a batch are left-padded; positions and a padding mask keep each row exactly as if it ran alone.
Everything runs on the model's device and in its dtype (or under the caller's autocast); memories come from the
bank's host RAM cache to the device once per retrieval.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .memory.encode import reference_rows
from .model import Memory3

MODES = ("memory", "rag", "none")


@dataclass
class GenerationResult:
    text: str  # the generated continuation (prompt excluded)
    tokens: list[int]
    references: list[list[int]] = field(default_factory=list)  # reference ids used by each chunk, in order
    chunk_kinds: list[str] = field(default_factory=list)  # "prompt" or "decode" for each entry of references
    timings: dict = field(default_factory=dict)


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=generator).squeeze(-1)


def _retrieve(bank, queries: list[str], k: int, leakage_threshold: float | None) -> torch.Tensor:
    k = min(k, len(bank))
    return torch.as_tensor(bank.search(queries, k, leakage_threshold=leakage_threshold), dtype=torch.long)


def check_memories_per_chunk(n) -> None:
    """A per-call override of the memories read per retrieval: an integer >= 1, or None for the model's own."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"memories_per_chunk must be an integer >= 1 or None (the model's), got {n!r}")


@torch.inference_mode()
def generate_batch(model: Memory3, tokenizer, prompts: Sequence[str], *, bank=None, mode: str = "memory",
                   max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
                   seed: int | None = None, stop_at: str | None = None, memories_per_chunk: int | None = None,
                   leakage_threshold: float | None = None, stop_at_eos: bool = True) -> list[GenerationResult]:
    """Generate continuations for several prompts at once (greedy when temperature == 0).

    bank: a `MemoryBank` (needed by "memory" and "rag"). stop_at: stop a row once its text contains this
    string (e.g. "\\n"); the returned text is cut there. stop_at_eos=False keeps going past `</s>`
    (benchmarks). leakage_threshold: drop retrieved references whose Eq. 6 overlap with the query exceeds
    it (2/3 in evaluation, §4.3).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings; use generate() for one prompt")
    if mode != "none" and bank is None:
        raise ValueError(f"mode={mode!r} needs a memory bank (bank=...)")
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be >= 0")
    if not 0 <= temperature < math.inf:  # NaN fails too (it would reach torch.multinomial)
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    check_memories_per_chunk(memories_per_chunk)
    cfg = model.cfg
    n_mem = memories_per_chunk or cfg.memories_per_chunk
    dev = model.tok_emb.weight.device
    gen = torch.Generator(device=dev).manual_seed(seed) if seed is not None else None  # samples where the logits are
    model.eval()
    t0 = time.perf_counter()
    timings = {"retrieval": 0.0, "prefill": 0.0, "decode": 0.0}
    B = len(prompts)
    rows = [tokenizer.encode(p) for p in prompts]
    references: list[list[list[int]]] = [[] for _ in range(B)]
    kinds: list[list[str]] = [[] for _ in range(B)]
    if mode == "rag":  # one retrieval with the prompt; reference texts go in front of it
        t = time.perf_counter()
        ids = _retrieve(bank, list(prompts), n_mem, leakage_threshold)
        timings["retrieval"] += time.perf_counter() - t
        for b in range(B):
            used = [i for i in ids[b].tolist() if i >= 0]
            refs = "".join(bank.texts[i] + "\n" for i in used)
            rows[b] = tokenizer.encode(refs + prompts[b])
            references[b].append(used)
            kinds[b].append("prompt")
    rows = [[tokenizer.bos_id] + r for r in rows]
    lens = [len(r) for r in rows]
    T = max(lens)
    if T + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"prompt of {T} tokens + {max_new_tokens} new tokens exceeds max_seq_len={cfg.max_seq_len}")
    idx = torch.full((B, T), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, r in enumerate(rows):  # left padding
        idx[b, T - len(r):] = torch.tensor(r)
        mask[b, T - len(r):] = True
    pad = torch.tensor([T - n for n in lens])
    positions = (torch.arange(T)[None] - pad[:, None]).clamp(min=0)  # each row's own context positions
    idx, mask, positions = idx.to(dev), mask.to(dev), positions.to(dev)

    memory, last_chunk_ids = None, None
    query_chunks = None
    if mode == "memory":
        cl = cfg.chunk_length
        n_chunks = [(n + cl - 1) // cl for n in lens]
        C = max(n_chunks)
        queries, owners = [], []
        for b, r in enumerate(rows):
            for c in range(n_chunks[b]):
                queries.append(tokenizer.decode(r[c * cl:(c + 1) * cl]))
                owners.append((b, c))
        t = time.perf_counter()
        found = _retrieve(bank, queries, n_mem, leakage_threshold)  # (n_queries, n_mem)
        timings["retrieval"] += time.perf_counter() - t
        table = torch.full((B, C, found.shape[1]), -1, dtype=torch.long)
        for (b, c), ids in zip(owners, found):
            table[b, c] = ids
            references[b].append([i for i in ids.tolist() if i >= 0])
            kinds[b].append("prompt")
        memory = memory_for(bank, table)
        query_chunks = (positions // cl).clamp(max=C - 1)  # chunk of each real token, per row
        last_chunk_ids = torch.stack([table[b, n_chunks[b] - 1] for b in range(B)])[:, None]  # (B, 1, n)

    t = time.perf_counter()
    out = model(idx, memory=memory, query_chunks=query_chunks, context_mask=mask, positions=positions,
                use_cache=True)
    timings["prefill"] += time.perf_counter() - t
    cache = out.cache
    next_tok = _sample(out.logits[:, -1], temperature, top_k, gen)
    generated = [[] for _ in range(B)]
    done = [False] * B
    decode_memory = None
    if mode == "memory":  # the first decoded chunk keeps the last prompt chunk's memories (§7.5)
        decode_memory = memory_for(bank, last_chunk_ids)
    pos = torch.tensor(lens, device=dev)
    t = time.perf_counter()
    zero_chunk = torch.zeros(B, 1, dtype=torch.long, device=dev)  # decoding reads the one chunk it is given
    for step in range(max_new_tokens):
        for b, tok in enumerate(next_tok.tolist()):
            if not done[b]:
                generated[b].append(tok)
                if (stop_at_eos and tok == tokenizer.eos_id) or (
                        stop_at and stop_at in tokenizer.decode(generated[b][-8:])):
                    done[b] = True
        if all(done) or step == max_new_tokens - 1:
            break
        if mode == "memory" and (step + 1) % cfg.chunk_length == 0:  # 64 tokens written: re-retrieve
            t_r = time.perf_counter()
            queries = [tokenizer.decode(g[-cfg.chunk_length:]) for g in generated]
            found = _retrieve(bank, queries, n_mem, leakage_threshold)
            timings["retrieval"] += time.perf_counter() - t_r
            for b in range(B):
                references[b].append([i for i in found[b].tolist() if i >= 0])
                kinds[b].append("decode")
            decode_memory = memory_for(bank, found[:, None])
        o = model(next_tok[:, None].to(dev), memory=decode_memory, cache=cache, use_cache=True,
                  positions=pos[:, None], query_chunks=None if decode_memory is None else zero_chunk)
        cache = o.cache
        pos = pos + 1
        next_tok = _sample(o.logits[:, -1], temperature, top_k, gen)
    timings["decode"] += time.perf_counter() - t - 0.0
    timings["total"] = time.perf_counter() - t0
    results = []
    for b in range(B):
        toks = [x for x in generated[b] if x != tokenizer.eos_id]
        text = tokenizer.decode(toks)
        if stop_at and stop_at in text:
            text = text[:text.index(stop_at)]
        results.append(GenerationResult(text, generated[b], references[b], kinds[b], dict(timings)))
    return results


def memory_for(bank, table: torch.Tensor):
    """MemoryKV for a (B, C, n) table of reference ids (-1 = none), read through the bank's cache;
    None when the table holds no reference at all."""
    used, index = reference_rows(table)
    if not used:
        return None
    mem = bank.get(used)
    return mem.to_memory_kv(index.to(mem.keys.device))


def generate(model: Memory3, tokenizer, prompt: str, *, bank=None, mode: str = "memory",
             max_new_tokens: int = 64, **kw) -> GenerationResult:
    """Generate a continuation of one prompt. See `generate_batch` for the options."""
    if not isinstance(prompt, str):
        raise TypeError("prompt must be a string")
    return generate_batch(model, tokenizer, [prompt], bank=bank, mode=mode, max_new_tokens=max_new_tokens, **kw)[0]
