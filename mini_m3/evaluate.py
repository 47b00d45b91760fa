"""§7 evaluation at mini scale: QA exact match and answer log-likelihood, LM loss, and Table 21's throughput.

QA exact match is computed by teacher forcing, which gives exactly what greedy decoding would: an answer is
correct iff, fed the prompt, the model's argmax reproduces every answer token and then ends the answer
(a newline or `</s>`). One forward pass per batch instead of one per token. Memory mode retrieves with the
prompt alone (the answer never reaches the retriever), drops references overlapping the prompt by more than
2/3 (§4.3), and reads the 5 memories in every answer position, as the first decoded chunk does (§7.5).
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .inference import MODES, generate_batch, memory_for
from .memory.retrieve import EVAL_LEAKAGE_THRESHOLD
from .model import Memory3


@torch.inference_mode()
def qa_eval(model: Memory3, tokenizer, items: Sequence, *, mode: str = "none", bank=None, batch_size: int = 64,
            leakage_threshold: float | None = EVAL_LEAKAGE_THRESHOLD, memories_per_chunk: int | None = None,
            progress: bool = False) -> dict:
    """Exact match and mean answer log-likelihood over QA items (objects with `.prompt` and `.answer`)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode != "none" and bank is None:
        raise ValueError(f"mode={mode!r} needs a memory bank")
    cfg = model.cfg
    n_mem = memories_per_chunk or cfg.memories_per_chunk
    dev = model.tok_emb.weight.device
    newline_ids = {i for i in range(tokenizer.vocab_size) if (tokenizer.id_to_token(i) or "").startswith("Ċ")}
    correct, loglik, retrieved = [], [], []
    model.eval()
    for s in tqdm(range(0, len(items), batch_size), disable=not progress, desc=f"QA ({mode})", unit="batch"):
        batch = items[s:s + batch_size]
        prompts = [it.prompt for it in batch]
        ids_table = None
        if mode != "none":
            k = min(n_mem, len(bank))
            ids_table = torch.as_tensor(bank.search(prompts, k, leakage_threshold=leakage_threshold))
            retrieved.extend(ids_table.tolist())
        rows, spans = [], []
        for b, it in enumerate(batch):
            text = it.prompt
            if mode == "rag":
                text = "".join(bank.texts[i] + "\n" for i in ids_table[b].tolist() if i >= 0) + text
            p = [tokenizer.bos_id] + tokenizer.encode(text)
            a = tokenizer.encode(" " + it.answer)
            rows.append(p + a)
            spans.append((len(p), len(p) + len(a)))
        T = max(len(r) for r in rows)
        if T > cfg.max_seq_len:
            raise ValueError(f"a QA row of {T} tokens exceeds max_seq_len={cfg.max_seq_len}")
        idx = torch.full((len(rows), T), tokenizer.pad_id, dtype=torch.long)
        for b, r in enumerate(rows):
            idx[b, :len(r)] = torch.tensor(r)
        memory = query_chunks = None
        if mode == "memory":
            memory = memory_for(bank, ids_table[:, None, :])
            query_chunks = torch.zeros(T, dtype=torch.long, device=dev) if memory is not None else None
        logits = model(idx.to(dev), memory=memory, query_chunks=query_chunks).logits.float()
        logp = F.log_softmax(logits, -1)
        pred = logits.argmax(-1)
        for b, (a0, a1) in enumerate(spans):
            tgt = idx[b, a0:a1].to(dev)
            ll = logp[b, a0 - 1:a1 - 1].gather(-1, tgt[:, None]).sum()
            ok = bool((pred[b, a0 - 1:a1 - 1] == tgt).all())
            end = int(pred[b, a1 - 1])
            ok = ok and (end == tokenizer.eos_id or end in newline_ids)
            correct.append(ok)
            loglik.append(float(ll))
    out = {"accuracy": float(np.mean(correct)) if correct else float("nan"), "n": len(correct),
           "answer_loglik": float(np.mean(loglik)) if loglik else float("nan"), "correct": correct}
    if retrieved:
        out["retrieved"] = retrieved
    return out


def retrieval_hit_rate(items: Sequence, retrieved: Sequence[Sequence[int]], k: int | None = None) -> float:
    """Fraction of items whose own person's reference (id == item.person) is among the retrieved ids."""
    hits = [it.person in (r if k is None else r[:k]) for it, r in zip(items, retrieved)]
    return float(np.mean(hits)) if hits else float("nan")


def cut_prompts(tokenizer, texts: Sequence[str], n: int, prompt_tokens: int) -> list[str]:
    """The first `n` texts long enough, each cut to `prompt_tokens` tokens once `<s>` is added."""
    prompts = []
    for t in texts:
        ids = tokenizer.encode(t)
        if len(ids) >= prompt_tokens:
            prompts.append(tokenizer.decode(ids[:prompt_tokens - 1]))
        if len(prompts) == n:
            break
    return prompts


@torch.inference_mode()
def decode_throughput(model: Memory3, tokenizer, prompt_texts: Sequence[str], *, mode: str, bank=None,
                      batch_size: int = 1, prompt_tokens: int = 128, new_tokens: int = 128, repeats: int = 1) -> dict:
    """Table 21 protocol: `batch_size` prompts of `prompt_tokens` tokens, `new_tokens` generated tokens each,
    wall time including retrieval; returns generated tokens per second (and the raw timings)."""
    prompts = cut_prompts(tokenizer, prompt_texts, batch_size, prompt_tokens)
    if len(prompts) < batch_size:
        raise ValueError(f"need {batch_size} prompt texts of at least {prompt_tokens} tokens, found {len(prompts)}")
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = generate_batch(model, tokenizer, prompts, bank=bank, mode=mode, max_new_tokens=new_tokens,
                             stop_at_eos=False)
        times.append(time.perf_counter() - t0)
    n = sum(len(r.tokens) for r in res)
    best = min(times)
    return {"tokens_per_s": n / best, "seconds": best, "generated_tokens": n, "batch_size": batch_size,
            "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "mode": mode}


@torch.inference_mode()
def lm_loss(model: Memory3, data, *, with_memory: bool, batch_size: int = 16, max_batches: int = 8) -> float:
    """Mean LM loss on `ChunkedData`, with or without the chunks' retrieved memories."""
    from .train import TrainConfig, evaluate_loss
    cfg = TrainConfig(stage="continual" if with_memory else "warmup", batch_size=batch_size)
    return evaluate_loss(model, data, cfg, max_batches=max_batches)
