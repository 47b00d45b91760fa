"""§7 evaluation at mini scale: QA exact match and log-likelihood, LM loss (also held-out text), Table 21 throughput.

QA exact match is computed by teacher forcing, which gives exactly what greedy decoding would: an answer is
correct iff, fed the prompt, the model's argmax reproduces every answer token and then ends the answer
(a newline or `</s>`). One forward pass per batch instead of one per token. Memory mode retrieves with the
prompt alone (the answer never reaches the retriever), drops references overlapping the prompt by more than
2/3 (§4.3), and reads the 5 memories in every answer position, as the first decoded chunk does (§7.5).

`user_qa_eval` is `mini-m3 evaluate --qa`: questions a user brings (`read_qa_jsonl`), asked in the model's QA
prompt (`world.qa_prompt`) with memory (the model's memories per chunk), with memory off and in RAG mode.

`heldout_lm_eval` measures next-token loss on held-out documents of one's own corpus (`train --text-dir`): every
64-token chunk reads 5 memories retrieved with the chunk before it (§3.4), under the same 2/3 filter.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import iter_jsonl
from .data.world import qa_prompt
from .inference import MODES, check_memories_per_chunk, generate_batch, memory_for
from .memory.overlap import EVAL_LEAKAGE_THRESHOLD, exceeds_overlap
from .model import Memory3
from .train import TrainConfig, evaluate_loss


@torch.inference_mode()
def qa_eval(model: Memory3, tokenizer, items: Sequence, *, mode: str = "none", bank=None, batch_size: int = 64,
            leakage_threshold: float | None = EVAL_LEAKAGE_THRESHOLD, memories_per_chunk: int | None = None,
            progress: bool = False) -> dict:
    """Exact match and mean answer log-likelihood over QA items (objects with `.prompt` and `.answer`: a world
    `QAItem`, or a `UserQuestion`). RAG mode puts the retrieved texts before the prompt, leaving out the
    lowest-ranked ones that do not fit `max_seq_len` ("rag_references_read": how many were read, on average).
    "correct": each item's exact match (every answer token greedy-right, then an end); "pieces": for each item, whether
    each answer token is the greedy prediction given the true tokens before it (teacher forced); "logliks": each
    item's answer log-likelihood (their mean is "answer_loglik")."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode != "none" and bank is None:
        raise ValueError(f"mode={mode!r} needs a memory bank")
    cfg = model.cfg
    n_mem = memories_per_chunk or cfg.memories_per_chunk
    dev = model.tok_emb.weight.device
    newline_ids = {i for i in range(tokenizer.vocab_size) if (tokenizer.id_to_token(i) or "").startswith("Ċ")}
    correct, pieces, loglik, retrieved, rag_read = [], [], [], [], []
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
            a = tokenizer.encode(" " + it.answer)
            if mode == "rag":
                p, n_read = _rag_row(tokenizer, bank, ids_table[b].tolist(), it.prompt, cfg.max_seq_len - len(a))
                rag_read.append(n_read)
            else:
                p = [tokenizer.bos_id] + tokenizer.encode(it.prompt)
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
            hit = (pred[b, a0 - 1:a1 - 1] == tgt).tolist()  # teacher forced: piece j right given pieces < j
            end = int(pred[b, a1 - 1])
            ok = all(hit) and (end == tokenizer.eos_id or end in newline_ids)
            correct.append(ok)
            pieces.append(hit)
            loglik.append(float(ll))
    out = {"accuracy": float(np.mean(correct)) if correct else float("nan"), "n": len(correct),
           "answer_loglik": float(np.mean(loglik)) if loglik else float("nan"), "correct": correct,
           "pieces": pieces, "logliks": loglik}
    if retrieved:
        out["retrieved"] = retrieved
    if rag_read:
        out["rag_references_read"] = float(np.mean(rag_read))
    return out


def _rag_row(tokenizer, bank, ids: list[int], prompt: str, budget: int) -> tuple[list[int], int]:
    """<s>, the retrieved texts (best first, each followed by a newline) and the prompt, as token ids: the
    lowest-ranked texts are left out until the row holds at most `budget` tokens. Returns the ids and the number
    of texts kept."""
    used = [i for i in ids if i >= 0]
    while True:
        row = [tokenizer.bos_id] + tokenizer.encode("".join(bank.texts[i] + "\n" for i in used) + prompt)
        if len(row) <= budget or not used:
            return row, len(used)
        used.pop()


# ---- questions a user brings (`mini-m3 evaluate --qa`) -------------------------------------------------------------

QA_FIELDS = ("question", "answer", "reference")


@dataclass(frozen=True)
class UserQuestion:
    """One line of an `evaluate --qa` file: a question, its answer (exact match, as `world.exact_match`) and,
    optionally, the index of the bank reference that holds the answer. Asked as `world.qa_prompt(question)`."""

    question: str
    answer: str
    reference: int | None = None
    where: str = ""  # file:line, for errors

    @property
    def prompt(self) -> str:
        return qa_prompt(self.question)


def read_qa_jsonl(path: str | os.PathLike) -> list[UserQuestion]:
    """The questions of a JSONL file, one `{"question": str, "answer": str, "reference": int (optional)}` per line
    (blank lines skipped). Any bad line is a ValueError naming file:line: not JSON, not an object, an unknown,
    missing, empty or mistyped field, an answer of several lines (exact match reads one line), "reference" on
    some lines only. A file without questions is an error too."""
    items = []
    for n, obj in iter_jsonl(path):
        where = f"{path}:{n}"
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object {{\"question\": ..., \"answer\": ...}}, got "
                             f"{type(obj).__name__}")
        unknown = sorted(set(obj) - set(QA_FIELDS))
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}; a line holds {list(QA_FIELDS)} ('reference' "
                             f"optional)")
        for f in ("question", "answer"):
            if not isinstance(obj.get(f), str) or not obj[f].strip():
                got = "missing" if f not in obj else f"{type(obj[f]).__name__} {str(obj[f])[:40]!r}"
                raise ValueError(f"{where}: field {f!r} must be a non-empty string, got {got}")
        answer = obj["answer"].strip()
        if "\n" in answer:
            raise ValueError(f"{where}: the answer spans several lines; exact match compares one line")
        ref = obj.get("reference")
        if "reference" in obj and (isinstance(ref, bool) or not isinstance(ref, int) or ref < 0):
            raise ValueError(f"{where}: field 'reference' must be an integer >= 0 (a bank reference index), "
                             f"got {ref!r}")
        if items and (ref is None) != (items[0].reference is None):
            first = items[0].where if ref is None else where
            raise ValueError(f"{where}: 'reference' is given on some lines only ({first} has one): give it on "
                             f"every line or on none")
        items.append(UserQuestion(obj["question"].strip(), answer, ref, where))
    if not items:
        raise ValueError(f"{path} holds no questions (one JSON object {{\"question\": ..., \"answer\": ...}} "
                         f"per line)")
    return items


def user_qa_eval(model: Memory3, tokenizer, bank, items: Sequence[UserQuestion], *, batch_size: int = 64,
                 progress: bool = False) -> dict:
    """Exact match of `items` in three modes: "memory" (the bank, `cfg.memories_per_chunk` memories), "memory_off"
    (no memory) and "rag" (the retrieved texts in the prompt), each through `qa_eval`; the memory format read from
    the model; and retrieval top-1: the share of questions whose top-1 retrieved reference (memory mode, after the
    leakage filter) is their "reference" when the lines give one, else the share whose top-1 text contains the
    answer."""
    if not items:
        raise ValueError("no questions to ask")
    limit = model.cfg.max_seq_len
    for it in items:
        if it.reference is not None and it.reference >= len(bank):
            raise ValueError(f"{it.where}: reference {it.reference} is not in the bank of {len(bank)} references "
                             f"(0..{len(bank) - 1})")
        n = 1 + len(tokenizer.encode(it.prompt)) + len(tokenizer.encode(" " + it.answer))
        if n > limit:
            raise ValueError(f"{it.where}: the prompt and answer take {n} tokens > max_seq_len={limit}")
    runs = {name: qa_eval(model, tokenizer, items, mode=mode, bank=None if mode == "none" else bank,
                          batch_size=batch_size, progress=progress)
            for name, mode in (("memory", "memory"), ("memory_off", "none"), ("rag", "rag"))}
    top1 = [ids[0] if ids else -1 for ids in runs["memory"]["retrieved"]]
    by_reference = items[0].reference is not None
    hits = [t == it.reference if by_reference else (t >= 0 and it.answer in bank.texts[t])
            for it, t in zip(items, top1)]
    return {
        "n": len(items),
        "exact_match": {name: r["accuracy"] for name, r in runs.items()},
        "memory_settings": model.cfg.memory_format,
        "retrieval_top1": float(np.mean(hits)),
        "retrieval_top1_definition": ("the top-1 retrieved reference is the line's 'reference'" if by_reference else
                                      "the top-1 retrieved reference's text contains the answer"),
        "memories_read": min(model.cfg.memories_per_chunk, len(bank)),
        "rag_references_read": runs["rag"]["rag_references_read"],
        "leakage_threshold": EVAL_LEAKAGE_THRESHOLD,
        "answer_loglik": {name: r["answer_loglik"] for name, r in runs.items()},
        "questions": [{"question": it.question, "answer": it.answer, "reference": it.reference, "top1": t,
                       **{name: r["correct"][i] for name, r in runs.items()}}
                      for i, (it, t) in enumerate(zip(items, top1))],
    }


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
                      batch_size: int = 1, prompt_tokens: int = 128, new_tokens: int = 128, repeats: int = 1,
                      memories_per_chunk: int | None = None) -> dict:
    """Table 21 protocol: `batch_size` prompts of `prompt_tokens` tokens, `new_tokens` generated tokens each,
    wall time including retrieval; returns generated tokens per second (and the raw timings). One mode alone:
    to compare modes on a machine other jobs share, use `compare_decode_throughput`. memories_per_chunk: the
    memories (or, with mode "rag", reference texts) read per retrieval; None: the model's own
    (`cfg.memories_per_chunk`, 5 in the paper's format). The result records the number used."""
    if batch_size < 1 or repeats < 1:
        raise ValueError(f"batch_size and repeats must be >= 1, got batch_size={batch_size}, repeats={repeats}")
    prompts = cut_prompts(tokenizer, prompt_texts, batch_size, prompt_tokens)
    if len(prompts) < batch_size:
        raise ValueError(f"need {batch_size} prompt texts of at least {prompt_tokens} tokens, found {len(prompts)}")
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = generate_batch(model, tokenizer, prompts, bank=bank, mode=mode, max_new_tokens=new_tokens,
                             stop_at_eos=False, memories_per_chunk=memories_per_chunk)
        times.append(time.perf_counter() - t0)
    n = sum(len(r.tokens) for r in res)
    best = min(times)
    return {"tokens_per_s": n / best, "seconds": best, "generated_tokens": n, "batch_size": batch_size,
            "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "mode": mode,
            "memories_per_chunk": memories_per_chunk or model.cfg.memories_per_chunk}


def _decode_runs(modes, bank) -> dict:
    """label -> (mode, bank) for `compare_decode_throughput`, checked before anything is timed."""
    if isinstance(modes, str):
        raise ValueError(f"modes must be a list of mode names or a dict label -> (mode, bank), got {modes!r}")
    if isinstance(modes, dict):
        runs = dict(modes)
    else:
        modes = list(modes)
        if len(set(modes)) != len(modes):
            raise ValueError(f"modes must not repeat, got {modes}")
        runs = {m: (m, None if m == "none" else bank) for m in modes}
    if not runs:
        raise ValueError(f"modes is empty: name at least one of {MODES}")
    for label, spec in runs.items():
        if not isinstance(spec, tuple) or len(spec) != 2:
            raise ValueError(f"modes[{label!r}] must be a (mode, bank) pair, got {spec!r}")
        if spec[0] not in MODES:
            raise ValueError(f"unknown decoding mode {spec[0]!r} (label {label!r}): must be one of {MODES}")
        if spec[0] != "none" and spec[1] is None:
            raise ValueError(f"mode {label!r} reads a memory bank: pass bank=...")
    return runs


def _spread(xs: Sequence[float]) -> dict:
    q1, med, q3 = np.percentile(xs, [25, 50, 75])
    return {"median": float(med), "min": float(min(xs)), "q1": float(q1), "q3": float(q3), "max": float(max(xs))}


def compare_decode_throughput(model: Memory3, tokenizer, prompt_texts: Sequence[str],
                              modes=("memory", "none", "rag"), bank=None, *, rounds: int = 9, batch_size: int = 1,
                              prompt_tokens: int = 128, new_tokens: int = 128, ratios=None,
                              memories_per_chunk: int | None = None, progress: bool = False) -> dict:
    """Table 21 protocol for several modes, fair on a machine other jobs share: the modes take turns, one
    `decode_throughput` call each per round, the order rotated every round (memory, none, rag; none, rag, memory;
    rag, memory, none; ...), after one warm-up round that is not counted (allocator, the bank's LRU cache). Load
    from other jobs thus hits every mode alike. Returns per mode the median tokens/s over the rounds
    ("tokens_per_s"), its spread (min, quartiles, max) and the per-round values; per ratio (default memory / none
    and memory / rag) the ratio within each round, summarised by its median and spread ("ratios").

    modes: mode names (each reads `bank`; "none" reads nothing), or a dict label -> (mode, bank) to compare several
    banks. ratios: (numerator, denominator) label pairs, keyed "{numerator}_over_{denominator}" in the result.
    memories_per_chunk: as in `decode_throughput`, the same for every mode.
    """
    runs = _decode_runs(modes, bank)
    labels = list(runs)
    if ratios is None:
        ratios = [("memory", d) for d in ("none", "rag") if "memory" in runs and d in runs]
    bad = [p for p in ratios if len(p) != 2 or not set(p) <= set(runs)]
    if bad:
        raise ValueError(f"ratios must be (numerator, denominator) pairs of the compared modes {labels}, got {bad}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1 (no tokens, no speed), got {new_tokens}")
    check_memories_per_chunk(memories_per_chunk)  # before anything is timed
    kw = dict(batch_size=batch_size, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
              memories_per_chunk=memories_per_chunk)
    tps, order, used = {m: [] for m in labels}, [], memories_per_chunk
    bar = tqdm(total=(rounds + 1) * len(labels), disable=not progress, desc="decode", unit="run")
    for r in range(-1, rounds):  # round -1 is the warm-up
        turn = labels[max(r, 0) % len(labels):] + labels[:max(r, 0) % len(labels)]
        for m in turn:
            res = decode_throughput(model, tokenizer, prompt_texts, mode=runs[m][0], bank=runs[m][1], **kw)
            used = res.get("memories_per_chunk", used)
            if r >= 0:
                tps[m].append(res["tokens_per_s"])
            bar.update(1)
        if r >= 0:
            order.append(turn)
    bar.close()
    per_round = {f"{a}_over_{b}": [x / y for x, y in zip(tps[a], tps[b])] for a, b in ratios}
    return {"tokens_per_s": {m: _spread(v)["median"] for m, v in tps.items()},
            "spread": {m: _spread(v) for m, v in tps.items()}, "tokens_per_s_rounds": tps,
            "ratios": {k: {**_spread(v), "rounds": v} for k, v in per_round.items()},
            "modes": {m: runs[m][0] for m in labels}, "order": order, "rounds": rounds, "warmup_rounds": 1,
            **kw, "memories_per_chunk": used,  # the number the runs read (None given: the model's own)
            "method": f"median of {rounds} interleaved rounds (order rotated each round, after 1 warm-up round)"}


@torch.inference_mode()
def lm_loss(model: Memory3, data, *, with_memory: bool, batch_size: int = 16, max_batches: int = 8) -> float:
    """Mean LM loss on `ChunkedData`, with or without the chunks' retrieved memories."""
    cfg = TrainConfig(stage="continual" if with_memory else "warmup", batch_size=batch_size)
    return evaluate_loss(model, data, cfg, max_batches=max_batches)


# ---- held-out next-token loss on one's own corpus ---------------------------------------------------------------


def _chunk_retrieval(bank, tokenizer, x: list[int], targets: list[int], chunk_length: int, k: int,
                     leakage_threshold: float | None, ref_ids: dict) -> tuple[list[list[int]], int]:
    """References for every chunk of a document (input ids `x`, next-token `targets`), retrieved as in §3.4 from
    the text before the chunk: chunk c's query is chunk c-1 (chunk 0 reads none). The evaluation leakage filter
    (§4.3) drops a candidate holding more than `leakage_threshold` of the query or of the chunk's own target
    tokens (a bank that holds this very document must not hand a chunk its own sentences).
    `ref_ids` caches the references' token ids. Returns the ids per chunk and how many candidates the filter removed."""
    n_chunks = -(-len(x) // chunk_length)
    plain = lambda ids: [t for t in ids if t > 3]  # special tokens are not text
    queries = [tokenizer.decode(plain(x[(c - 1) * chunk_length:c * chunk_length])) for c in range(1, n_chunks)]
    out, removed = [[]], 0
    if not queries or k == 0:
        return out + [[] for _ in queries], 0
    fetch = min(len(bank), k if leakage_threshold is None else 4 * k)
    found = bank.search(queries, fetch)
    for c, cand in enumerate(found.tolist(), start=1):
        query = plain(x[(c - 1) * chunk_length:c * chunk_length])
        own = plain(targets[c * chunk_length:(c + 1) * chunk_length])
        kept = []
        for r in cand:
            if r < 0 or len(kept) == k:
                continue
            if r not in ref_ids:
                ref_ids[r] = tokenizer.encode(bank.texts[r])
            ref = ref_ids[r]
            if leakage_threshold is not None and any(
                    s and exceeds_overlap(ref, s, leakage_threshold) for s in (query, own)):
                removed += 1
                continue
            kept.append(r)
        out.append(kept)
    return out, removed


def _token_nll(model: Memory3, row: list[int], targets: list[int], memory=None, query_chunks=None) -> torch.Tensor:
    """Per-token negative log-likelihood of `targets` (same length as `row`) given the context `row`."""
    dev = model.tok_emb.weight.device
    logits = model(torch.tensor([row], device=dev), memory=memory,
                   query_chunks=None if memory is None else query_chunks.to(dev)).logits[0].float()
    return F.cross_entropy(logits, torch.tensor(targets, device=dev), reduction="none").cpu()


def document_nll(model: Memory3, tokenizer, x: list[int], y: list[int], mode: str, bank, refs: list[list[int]],
                 k: int) -> torch.Tensor:
    """Per-token NLL (nats, (len(y),)) of one document, inputs `x` and next-token targets `y`, as
    `evaluate --text-dir` sums it per document. mode "memory" reads `refs[c]` (the bank ids chunk c retrieved,
    `k` of them, from `bank`) in chunk c; "none" reads nothing: both in windows of whole chunks up to max_seq_len,
    each read on its own. "rag": one forward per chunk, the chunk's reference texts put before as much preceding
    text as fits."""
    cfg = model.cfg
    cl = cfg.chunk_length
    if mode == "rag":
        parts = []
        for c in range(len(refs)):
            s, e = c * cl, min(len(x), (c + 1) * cl)
            used = list(refs[c])
            while True:
                prefix = tokenizer.encode("".join(bank.texts[i] + "\n" for i in used)) if used else []
                room = cfg.max_seq_len - 1 - len(prefix) - (e - s)
                if room >= 0 or not used:
                    break
                used.pop()  # the lowest-ranked reference goes first when the context is full
            start = max(1 if prefix else 0, s - max(room, 0))
            row = ([tokenizer.bos_id] + prefix if prefix else []) + x[start:e]
            nll = _token_nll(model, row, [-100] * (len(row) - (e - start)) + y[start:e])
            parts.append(nll[len(row) - (e - s):])
        return torch.cat(parts)
    W = (cfg.max_seq_len // cl) * cl
    parts = []
    for w in range(0, len(x), W):
        row, tgt = x[w:w + W], y[w:w + W]
        memory = query_chunks = None
        if mode == "memory":
            chunks = refs[w // cl:w // cl + -(-len(row) // cl)]
            table = torch.full((1, len(chunks), max(k, 1)), -1, dtype=torch.long)
            for c, ids in enumerate(chunks):
                table[0, c, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            memory = memory_for(bank, table)
            query_chunks = torch.arange(len(row)) // cl
        parts.append(_token_nll(model, row, tgt, memory, query_chunks))
    return torch.cat(parts)


def _loss_entry(total_nll: float, n_tokens: int) -> dict:
    loss = total_nll / n_tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": n_tokens}


@torch.inference_mode()
def heldout_lm_eval(model: Memory3, tokenizer, documents: Sequence[dict], *, bank=None, control: Memory3 | None = None,
                    memories_per_chunk: int | None = None, leakage_threshold: float | None = EVAL_LEAKAGE_THRESHOLD,
                    progress: bool = False) -> dict:
    """Next-token loss and perplexity on held-out documents (dicts with doc_id and text), per document and overall
    (token-weighted), for Memory³ with memory (5 memories per 64-token chunk, retrieved with the previous chunk,
    §3.4), Memory³ without memory ("none"), RAG with the same references as text, and a `control` model."""
    cfg = model.cfg
    k = min(memories_per_chunk or cfg.memories_per_chunk, len(bank)) if bank is not None else 0
    runs = [("memory", model), ("none", model), ("rag", model)] if bank is not None else [("none", model)]
    if control is not None:
        runs.append(("control", control))
    model.eval()
    if control is not None:
        control.eval()
    per_doc, totals, removed, chunks_with_memory, n_chunks, ref_ids = [], {}, 0, 0, 0, {}
    for doc in tqdm(documents, disable=not progress, desc="held-out documents", unit="doc"):
        ids = [tokenizer.bos_id] + tokenizer.encode(doc["text"]) + [tokenizer.eos_id]
        x, y = ids[:-1], ids[1:]
        refs = [[] for _ in range(-(-len(x) // cfg.chunk_length))]
        if bank is not None:
            refs, r = _chunk_retrieval(bank, tokenizer, x, y, cfg.chunk_length, k, leakage_threshold, ref_ids)
            removed += r
        n_chunks += len(refs)
        chunks_with_memory += sum(1 for ids_ in refs if ids_)
        entry = {"doc_id": doc["doc_id"], "references_per_chunk": refs}
        for name, m in runs:
            nll = document_nll(m, tokenizer, x, y, "none" if name == "control" else name, bank, refs, k)
            entry[name] = _loss_entry(float(nll.sum()), len(y))
            t = totals.setdefault(name, [0.0, 0])
            t[0] += float(nll.sum())
            t[1] += len(y)
        per_doc.append(entry)
    return {"overall": {name: _loss_entry(*totals[name]) for name, _ in runs} if per_doc else {},
            "documents": per_doc,
            "retrieval": {"query": "previous chunk (chunk 0 reads no memory)", "chunk_length": cfg.chunk_length,
                          "memories_per_chunk": k, "leakage_threshold": leakage_threshold,
                          "references_removed_by_leakage_filter": removed, "chunks": n_chunks,
                          "chunks_with_memory": chunks_with_memory}}


def plot_heldout(result: dict, out_png) -> None:
    """Per-document held-out loss of each mode (bars) with the overall loss in the legend."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend (a notebook's inline one) is left alone
    modes = list(result["overall"])
    docs = result["documents"]
    fig = Figure(figsize=(max(6.0, 0.5 * len(docs) * len(modes) / 2), 4))
    ax = fig.subplots()
    width = 0.8 / max(1, len(modes))
    for j, m in enumerate(modes):
        ax.bar([i + j * width for i in range(len(docs))], [d[m]["loss"] for d in docs], width,
               label=f"{m} (overall {result['overall'][m]['loss']:.3f})")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(docs))])
    ax.set_xticklabels([str(d["doc_id"])[-24:] for d in docs], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("held-out next-token loss (nats)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
