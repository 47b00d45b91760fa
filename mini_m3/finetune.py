"""§6 fine-tuning and alignment at mini scale: SFT (answer-only loss, cosine schedule) and DPO, with explicit memory.

**SFT** (`sft`): next-token loss on the answer tokens of each conversation only (prompts are masked), AdamW,
cosine learning rate with a linear warmup over the first 10 % of the steps (the paper's Table 15 recipe,
scaled: see `SFTConfig`). **DPO** (`dpo`): the standard loss
``-log σ(β · ((log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))))`` on the summed log-probabilities of
the chosen (c) and rejected (r) answers, against a frozen copy of the starting model, β = 0.01 (§6.2).

**Explicit memory during fine-tuning** (the paper is silent, spec §8 item 10; our choice is *with* memory,
``with_memory=False`` is the other arm). Each example retrieves its 5 references once, before training,
from a `MemoryBank` with its prompt as the query and the evaluation leakage filter (2/3, as `qa_eval`),
and every position reads them (``query_chunks`` = 0, as in `qa_eval`). The memories themselves are
**encoded live by the model being trained** (``memory_source="live"``, gradients flow into the writer as in
the continual stage, `train.continual_memory`): the bank's stored memories were written by the starting
weights and go stale after the first step (Remark 9). ``memory_source="bank"`` reads the stored (frozen)
memories through `inference.memory_for` instead. After fine-tuning, serve the new model with a bank of its
own (`bank_for_model`: a cold-start bank that encodes each reference the first time it is retrieved).

**Factuality probe** (`factuality_probe`, a mini Table 19): (a) people whose biographies are in the bank but
who never appeared in any training text: exact match; (b) people who exist nowhere: how often the model
asserts a specific attribute value (made up) instead of abstaining. With and without memory.

Checkpoints use `train.save_checkpoint` (safetensors + JSON, atomic, `latest` pointer) with ``kind`` =
"sft" / "dpo" in the train state; resuming continues the same schedule and data order exactly. SFT and DPO share one
loop built from pretraining's pieces (`_tune`): a NaN/inf loss or gradient norm stops it at that step."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .checkpoint import weights_fingerprint
from .data.bios import BioWorld
from .data.instructions import (PreferencePair, ProbeItem, SFTExample, answer_sentence, asserted_values,
                                chat_prompt, check_examples, completion, extract_reply, is_abstention,
                                probe_known_questions, probe_unknown_questions)
from .data.world import qa_prompt
from .inference import generate_batch, memory_for
from .memory.encode import encode_reference_tokens
from .memory.overlap import EVAL_LEAKAGE_THRESHOLD
from .model import Memory3
from .train import (batch_order, check_finite_step, latest_checkpoint, load_checkpoint, make_optimizer, prepare_log,
                    read_train_state, reference_rows, save_checkpoint)

MEMORY_SOURCES = ("live", "bank")
# config fields that do not change the result: they may differ between a run and its resumption
_FREE_FIELDS = ("quiet", "threads", "checkpoint_every", "keep_checkpoints", "log_every")


# ----------------------------------------------------------------------------------------------- configs
@dataclass
class _TuneConfig:
    """Fields shared by SFT and DPO (see SFTConfig for the recipe)."""

    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    warmup_fraction: float = 0.1
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = 0
    with_memory: bool = True
    memory_source: str = "live"
    memory_grad: bool = True
    leakage_threshold: float | None = EVAL_LEAKAGE_THRESHOLD
    memories_per_chunk: int | None = None
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 10
    threads: int | None = None
    quiet: bool = False

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        _validate_common(self, type(self).__name__)


@dataclass
class SFTConfig(_TuneConfig):
    """SFT hyperparameters. Paper (Table 15 text): cosine LR, max 5e-5, 10 % linear warmup, weight decay 0.1,
    batch 512, 3 epochs, for a 2.4B model; that peak equals the paper's continual-stage LR and is 1/16 of its
    warmup peak. Scaled: the demo pretrains both stages at 3e-3, SFT uses a third of it; the batch is 16
    conversations; the warmup fraction and weight decay are the paper's."""

    steps: int = 300
    lr: float = 1e-3


@dataclass
class DPOConfig(_TuneConfig):
    """DPO hyperparameters. Paper (§6.2): cosine LR, max 4e-6, β = 0.01; batch and epochs not stated.
    Scaled: the paper's DPO peak is 0.08x its SFT peak, so ours is 0.08 x 1e-3 = 8e-5; no weight decay."""

    steps: int = 100
    lr: float = 8e-5
    beta: float = 0.01
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not self.beta > 0:
            raise ValueError(f"DPOConfig.beta={self.beta!r}: must be a positive number")


def _validate_common(c, name: str) -> None:
    for f in ("steps", "batch_size"):
        v = getattr(c, f)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name}.{f}={v!r}: must be a positive integer")
    for f in ("checkpoint_every",):
        v = getattr(c, f)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name}.{f}={v!r}: must be a non-negative integer")
    if isinstance(c.keep_checkpoints, bool) or not isinstance(c.keep_checkpoints, int) or c.keep_checkpoints < 1:
        raise ValueError(f"{name}.keep_checkpoints={c.keep_checkpoints!r}: must be an integer >= 1")
    if not (isinstance(c.lr, (int, float)) and c.lr > 0):
        raise ValueError(f"{name}.lr={c.lr!r}: must be positive")
    if not 0 <= c.warmup_fraction <= 1:
        raise ValueError(f"{name}.warmup_fraction={c.warmup_fraction!r}: must be in [0, 1]")
    if not 0 <= c.min_lr_ratio <= 1:
        raise ValueError(f"{name}.min_lr_ratio={c.min_lr_ratio!r}: must be in [0, 1]")
    if c.memory_source not in MEMORY_SOURCES:
        raise ValueError(f"{name}.memory_source={c.memory_source!r}: must be one of {MEMORY_SOURCES}")
    if c.leakage_threshold is not None and not 0 < c.leakage_threshold <= 1:
        raise ValueError(f"{name}.leakage_threshold={c.leakage_threshold!r}: must be in (0, 1] or None")
    if c.memories_per_chunk is not None and (not isinstance(c.memories_per_chunk, int) or c.memories_per_chunk < 1):
        raise ValueError(f"{name}.memories_per_chunk={c.memories_per_chunk!r}: must be a positive integer or None")


def cosine_lr(step: int, cfg) -> float:
    """Linear warmup over the first ``warmup_fraction`` of the steps, then a cosine decay to
    ``min_lr_ratio`` x peak at the last step."""
    warm = int(round(cfg.warmup_fraction * cfg.steps))
    if warm and step < warm:
        return cfg.lr * (step + 1) / warm
    rest = max(1, cfg.steps - warm - 1)
    frac = min(1.0, (step - warm) / rest)
    lo = cfg.min_lr_ratio * cfg.lr
    return lo + 0.5 * (cfg.lr - lo) * (1 + math.cos(math.pi * frac))


# ----------------------------------------------------------------------------------------------- memory
class _MemoryReader:
    """Retrieval (once, with the leakage filter) and per-batch memories for fine-tuning."""

    def __init__(self, bank, tokenizer, model: Memory3, cfg, what: str):
        if bank is None:
            raise ValueError(f"{what} with_memory=True needs a memory bank (bank=...); pass "
                             f"{type(cfg).__name__}(with_memory=False) to fine-tune without memory")
        for attr in ("search", "texts", "manifest"):
            if not hasattr(bank, attr):
                raise TypeError(f"bank must be a MemoryBank, got {type(bank).__name__}")
        if len(bank) == 0:
            raise ValueError("the memory bank is empty")
        if bank.tokenizer is not None and bank.tokenizer.fingerprint() != tokenizer.fingerprint():
            raise ValueError("the memory bank was built with a different tokenizer than the one given")
        if bank.manifest.get("config", {}).get("head_dim", model.cfg.head_dim) != model.cfg.head_dim:
            raise ValueError("the memory bank was built for a model of another shape")
        self.bank, self.tokenizer, self.cfg = bank, tokenizer, cfg
        self.selector = bank.manifest["selector"]
        self.tokens_per_head = None if self.selector == "all" else bank.manifest["tokens_per_head"]
        self.k = min(cfg.memories_per_chunk or model.cfg.memories_per_chunk, len(bank))
        self._tokens: dict[int, list[int]] = {}

    def retrieve(self, queries: list[str], progress: bool) -> torch.Tensor:
        out = []
        for s in tqdm(range(0, len(queries), 512), disable=not progress, desc="retrieve", unit="batch"):
            out.append(np.asarray(self.bank.search(queries[s:s + 512], self.k,
                                                   leakage_threshold=self.cfg.leakage_threshold)))
        return torch.as_tensor(np.concatenate(out), dtype=torch.long)

    def memory(self, model: Memory3, table: torch.Tensor, grad: bool):
        """MemoryKV for a (B, n) table of reference ids (-1 = none), one chunk per row; None if empty."""
        table = table[:, None, :]
        if self.cfg.memory_source == "bank":
            return memory_for(self.bank, table)
        used, local = reference_rows(table)
        if not used:
            return None
        for i in used:
            if i not in self._tokens:
                self._tokens[i] = self.tokenizer.encode_reference(self.bank.texts[i])
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            mem = encode_reference_tokens(model, [self._tokens[i] for i in used], selector=self.selector,
                                          tokens_per_head=self.tokens_per_head, pad_id=self.tokenizer.pad_id,
                                          generator=torch.Generator().manual_seed(self.cfg.seed))
        return mem.to_memory_kv(local.to(mem.keys.device))


# ----------------------------------------------------------------------------------------------- batches
def sft_targets(ids: Sequence[int], mask: Sequence[bool]) -> list[int]:
    """Next-token targets with -100 wherever the next token is not an answer token (prompts are masked)."""
    return [ids[t + 1] if mask[t + 1] else -100 for t in range(len(ids) - 1)] + [-100]


def _pad(rows: list[list[int]], fill: int) -> torch.Tensor:
    T = max(len(r) for r in rows)
    out = torch.full((len(rows), T), fill, dtype=torch.long)
    for b, r in enumerate(rows):
        out[b, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def sft_batch(tokenizer, examples: Sequence[SFTExample]) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, targets) for a list of SFT examples, right-padded; targets are -100 outside answers."""
    enc = [e.encode(tokenizer) for e in examples]
    return _pad([i for i, _ in enc], tokenizer.pad_id), _pad([sft_targets(i, m) for i, m in enc], -100)


def _check_model_tokenizer(model, tokenizer, what: str) -> None:
    if not isinstance(model, Memory3):
        raise TypeError(f"{what} must be a Memory3 model, got {type(model).__name__}")
    for attr in ("encode", "bos_id", "pad_id", "vocab_size"):
        if not hasattr(tokenizer, attr):
            raise TypeError(f"tokenizer must be a mini_m3 Tokenizer, got {type(tokenizer).__name__}")
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {model.cfg.vocab_size}")


def _check_length(lengths: Sequence[int], model: Memory3, what: str) -> None:
    longest = int(np.argmax(lengths))
    if lengths[longest] > model.cfg.max_seq_len:
        raise ValueError(f"{what}[{longest}] has {lengths[longest]} tokens > max_seq_len={model.cfg.max_seq_len}")


def sequence_logprobs(model: Memory3, tokens: torch.Tensor, answer_mask: torch.Tensor, memory=None) -> torch.Tensor:
    """Summed log-probability of the masked (answer) tokens of each row: (B,)."""
    dev = model.tok_emb.weight.device
    tokens, answer_mask = tokens.to(dev), answer_mask.to(dev)
    qc = torch.zeros(tokens.shape[1], dtype=torch.long, device=dev) if memory is not None else None
    logits = model(tokens, memory=memory, query_chunks=qc).logits.float()
    logp = F.log_softmax(logits[:, :-1], -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    return (logp * answer_mask[:, 1:]).sum(-1)


# ----------------------------------------------------------------------------------------------- checkpoints
def _params_digest(model: Memory3) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _resume_step(out: Path | None, kind: str, cfg, model, opt, resume: bool, extra: dict) -> int:
    if out is None or not resume:
        return 0
    ck = latest_checkpoint(out)
    if ck is None:
        return 0
    state = read_train_state(ck)
    if state.get("kind") != kind:
        raise ValueError(f"{out} holds a {state.get('kind') or 'pretraining'} checkpoint ({ck.name}), not a {kind} "
                         f"one; use another out_dir or resume=False")
    now = json.loads(json.dumps(dataclasses.asdict(cfg)))
    saved = state.get("train_config", {})
    diff = [k for k in now if k not in _FREE_FIELDS and saved.get(k) != now[k]]
    if diff:
        raise ValueError(f"cannot resume {ck}: it was written with a different {kind} config "
                         f"({', '.join(f'{k}={saved.get(k)!r} now {now[k]!r}' for k in diff)}); use resume=False "
                         f"or another out_dir")
    for k, v in extra.items():
        if state.get(k) != v:
            raise ValueError(f"cannot resume {ck}: its {k} differs from this run's ({str(state.get(k))[:12]}… vs "
                             f"{str(v)[:12]}…)")
    return int(load_checkpoint(ck, model, opt)["step"])


def _prepare_log(out: Path | None, name: str, start: int) -> Path | None:
    if out is None:
        return None
    path = out / name
    prepare_log(path, start)  # as pretraining: a torn last line is dropped with a warning, the rewrite is atomic
    return path


def _tune(kind: str, model: Memory3, tokenizer, cfg, n_items: int, batch_loss, shown, *, out_dir, resume: bool,
          log_name: str, extra: dict) -> dict:
    """The loop SFT and DPO share, built from pretraining's pieces (`train.train`): AdamW without decay on gains
    (`make_optimizer`), the seeded batch order (`batch_order`), a diverged step stopped (`check_finite_step`), the log
    of a resumed run cut back (`prepare_log`) and checkpoints (`save_checkpoint`); the learning rate is cosine.
    `batch_loss(rows)` -> (the loss of the items `rows`, the step's own log fields); `shown(loss, lr, fields)`: the
    progress bar's fields; `extra`: recorded in every checkpoint and checked on resume."""
    torch.manual_seed(cfg.seed)
    model.train()
    opt = make_optimizer(model, cfg)
    out = Path(out_dir) if out_dir is not None else None
    start = _resume_step(out, kind, cfg, model, opt, resume, extra)
    model.train()
    log_path = _prepare_log(out, log_name, start)
    losses, times = [], []
    bar = tqdm(range(start, cfg.steps), disable=cfg.quiet, desc=kind, unit="step", initial=start, total=cfg.steps)
    for step in bar:
        t0 = time.perf_counter()
        lr = cosine_lr(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        loss, fields = batch_loss(batch_order(n_items, cfg.batch_size, step, cfg.seed))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        losses.append(loss.item())
        check_finite_step(kind, step, lr, loss=losses[-1], grad_norm=gnorm)
        opt.step()
        dt = time.perf_counter() - t0
        times.append(dt)
        if step % cfg.log_every == 0:
            bar.set_postfix(**shown(losses[-1], lr, fields))
        if log_path is not None:
            rec = {"step": step, "kind": kind, "loss": losses[-1], **fields, "lr": lr, "grad_norm": gnorm,
                   "step_time": dt}
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        if out is not None and cfg.checkpoint_every and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
            save_checkpoint(out, model, opt, step + 1, cfg, tokenizer, extra={"kind": kind, **extra})
    model.eval()
    steady = times[min(len(times) - 1, 3):] if times else []
    return {"losses": losses, "final_loss": losses[-1] if losses else None, "steps_run": len(losses),
            "start_step": start, "step_time": float(np.median(steady)) if steady else None}


# ----------------------------------------------------------------------------------------------- SFT
def sft(model: Memory3, tokenizer, examples: Sequence[SFTExample], cfg: SFTConfig | None = None, *, bank=None,
        out_dir: str | os.PathLike | None = None, resume: bool = True, log_name: str = "sft.jsonl") -> dict:
    """Supervised fine-tuning on `examples` (loss on answer tokens only), in place. With ``out_dir``: a JSONL
    log, checkpoints every ``cfg.checkpoint_every`` steps and (``resume=True``) continuation from the latest
    SFT checkpoint there. Returns losses, step times and the retrieved reference ids."""
    cfg = SFTConfig() if cfg is None else cfg
    if not isinstance(cfg, SFTConfig):
        raise TypeError(f"cfg must be an SFTConfig, got {type(cfg).__name__}")
    _check_model_tokenizer(model, tokenizer, "model")
    examples = check_examples(examples, SFTExample, "examples")
    encoded = [e.encode(tokenizer) for e in examples]
    _check_length([len(i) for i, _ in encoded], model, "examples")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    reader = _MemoryReader(bank, tokenizer, model, cfg, "sft") if cfg.with_memory else None
    table = reader.retrieve([e.query for e in examples], not cfg.quiet) if reader else None
    dev = model.tok_emb.weight.device

    def batch_loss(rows: torch.Tensor):
        tokens = _pad([encoded[i][0] for i in rows.tolist()], tokenizer.pad_id)
        targets = _pad([sft_targets(*encoded[i]) for i in rows.tolist()], -100)
        memory = reader.memory(model, table[rows], cfg.memory_grad) if reader else None
        qc = torch.zeros(tokens.shape[1], dtype=torch.long, device=dev) if memory is not None else None
        loss = model(tokens.to(dev), targets=targets.to(dev), memory=memory, query_chunks=qc).loss
        return loss, {"answer_tokens": int((targets != -100).sum()), "with_memory": cfg.with_memory}

    shown = lambda loss, lr, fields: {"loss": f"{loss:.3f}", "lr": f"{lr:.1e}"}
    r = _tune("sft", model, tokenizer, cfg, len(examples), batch_loss, shown, out_dir=out_dir, resume=resume,
              log_name=log_name, extra={})
    return {**r, "retrieved": table.tolist() if table is not None else None}


# ----------------------------------------------------------------------------------------------- DPO
def _encode_pair(tokenizer, p: PreferencePair) -> tuple[list[int], list[int], list[int], list[int]]:
    prompt = [tokenizer.bos_id] + tokenizer.encode(p.prompt)
    c, r = tokenizer.encode(completion(p.chosen)), tokenizer.encode(completion(p.rejected))
    return prompt + c, [0] * len(prompt) + [1] * len(c), prompt + r, [0] * len(prompt) + [1] * len(r)


def dpo(policy: Memory3, reference: Memory3 | None, tokenizer, pairs: Sequence[PreferencePair],
        cfg: DPOConfig | None = None, *, bank=None, out_dir: str | os.PathLike | None = None, resume: bool = True,
        log_name: str = "dpo.jsonl") -> dict:
    """Direct preference optimisation of `policy` (in place) against a frozen copy of `reference` (None: a
    copy of `policy` as it is now, before any resumed checkpoint is loaded). Returns per-step losses, implicit
    reward margins β·((π_c − ref_c) − (π_r − ref_r)) and preference accuracies."""
    cfg = DPOConfig() if cfg is None else cfg
    if not isinstance(cfg, DPOConfig):
        raise TypeError(f"cfg must be a DPOConfig, got {type(cfg).__name__}")
    _check_model_tokenizer(policy, tokenizer, "policy")
    if reference is not None:
        _check_model_tokenizer(reference, tokenizer, "reference")
        if reference.cfg != policy.cfg:
            raise ValueError("the reference model must have the same config as the policy")
        if reference is policy:
            reference = None
    ref = copy.deepcopy(reference if reference is not None else policy).eval()
    ref.requires_grad_(False)
    pairs = check_examples(pairs, PreferencePair, "pairs")
    for i, p in enumerate(pairs):
        if p.chosen == p.rejected:
            raise ValueError(f"pairs[{i}]: chosen and rejected answers are the same ({p.chosen!r})")
    encoded = [_encode_pair(tokenizer, p) for p in pairs]
    _check_length([max(len(e[0]), len(e[2])) for e in encoded], policy, "pairs")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    reader = _MemoryReader(bank, tokenizer, policy, cfg, "dpo") if cfg.with_memory else None
    table = reader.retrieve([p.query for p in pairs], not cfg.quiet) if reader else None
    ref_digest = _params_digest(ref)
    ref_cache: dict[int, tuple[float, float]] = {}
    margins, accs = [], []

    def logprobs(model, rows: list[int], grad: bool):
        toks = _pad([encoded[i][0] for i in rows] + [encoded[i][2] for i in rows], tokenizer.pad_id)
        mask = _pad([encoded[i][1] for i in rows] + [encoded[i][3] for i in rows], 0).float()
        memory = None
        if reader is not None:
            t = table[torch.tensor(rows)]
            memory = reader.memory(model, torch.cat([t, t]), grad)
        lp = sequence_logprobs(model, toks, mask, memory)
        return lp[:len(rows)], lp[len(rows):]

    def batch_loss(rows: torch.Tensor):
        rows = rows.tolist()
        need = [i for i in rows if i not in ref_cache]
        if need:
            with torch.no_grad():
                rc, rr = logprobs(ref, need, False)
            ref_cache.update({i: (float(a), float(b)) for i, a, b in zip(need, rc, rr)})
        dev = policy.tok_emb.weight.device
        ref_c = torch.tensor([ref_cache[i][0] for i in rows], device=dev)
        ref_r = torch.tensor([ref_cache[i][1] for i in rows], device=dev)
        pi_c, pi_r = logprobs(policy, rows, cfg.memory_grad)
        logits = (pi_c - ref_c) - (pi_r - ref_r)
        margins.append(float(cfg.beta * logits.detach().mean()))
        accs.append(float((logits.detach() > 0).float().mean()))
        return -F.logsigmoid(cfg.beta * logits).mean(), {
            "reward_margin": margins[-1], "reward_chosen": float(cfg.beta * (pi_c.detach() - ref_c).mean()),
            "reward_rejected": float(cfg.beta * (pi_r.detach() - ref_r).mean()), "preference_accuracy": accs[-1]}

    shown = lambda loss, lr, fields: {"loss": f"{loss:.4f}", "margin": f"{fields['reward_margin']:.4f}"}
    r = _tune("dpo", policy, tokenizer, cfg, len(pairs), batch_loss, shown, out_dir=out_dir, resume=resume,
              log_name=log_name, extra={"reference_digest": ref_digest})
    return {**r, "reward_margins": margins, "preference_accuracy": accs}


@torch.no_grad()
def reward_margin(policy: Memory3, reference: Memory3, tokenizer, pairs: Sequence[PreferencePair], *,
                  beta: float = 0.01, bank=None, with_memory: bool = True, batch_size: int = 32,
                  leakage_threshold: float | None = EVAL_LEAKAGE_THRESHOLD) -> dict:
    """Mean implicit reward margin β·((π_c − ref_c) − (π_r − ref_r)) and preference accuracy of `policy`
    over `pairs` (evaluation mode, no gradient; memories encoded live by each model)."""
    pairs = check_examples(pairs, PreferencePair, "pairs")
    cfg = DPOConfig(beta=beta, with_memory=with_memory, leakage_threshold=leakage_threshold, quiet=True)
    reader = _MemoryReader(bank, tokenizer, policy, cfg, "reward_margin") if with_memory else None
    table = reader.retrieve([p.query for p in pairs], False) if reader else None
    encoded = [_encode_pair(tokenizer, p) for p in pairs]
    was = policy.training, reference.training
    policy.eval(); reference.eval()
    diffs = []
    for s in range(0, len(pairs), batch_size):
        rows = list(range(s, min(len(pairs), s + batch_size)))
        toks = _pad([encoded[i][0] for i in rows] + [encoded[i][2] for i in rows], tokenizer.pad_id)
        mask = _pad([encoded[i][1] for i in rows] + [encoded[i][3] for i in rows], 0).float()
        lps = []
        for m in (policy, reference):
            memory = None
            if reader is not None:
                t = table[torch.tensor(rows)]
                memory = reader.memory(m, torch.cat([t, t]), False)
            lps.append(sequence_logprobs(m, toks, mask, memory))
        (pc, pr), (rc, rr) = [(lp[:len(rows)], lp[len(rows):]) for lp in lps]
        diffs.append(((pc - rc) - (pr - rr)).cpu())
    policy.train(was[0]); reference.train(was[1])
    d = torch.cat(diffs)
    return {"reward_margin": float(beta * d.mean()), "preference_accuracy": float((d > 0).float().mean()),
            "n": len(pairs)}


# ----------------------------------------------------------------------------------------------- banks
def bank_for_model(model: Memory3, tokenizer, source, path: str | os.PathLike, *, overwrite: bool = True,
                   progress: bool = False):
    """A cold-start bank at `path` holding `source`'s texts for `model` (same selector, tokens per head,
    storage dtype and retriever): a memory is encoded by `model` the first time it is retrieved, so a
    fine-tuned model reads memories it wrote itself (Remark 9). VQ sources give a raw bank."""
    from .memory.bank import MemoryBank
    from .memory.retrieve import Retriever
    m = source.manifest
    retriever = Retriever.load(Path(source.path) / m["retriever_dir"])
    return MemoryBank.build(path, model, tokenizer, list(source.texts), selector=m["selector"],
                            tokens_per_head=None if m["selector"] == "all" else m["tokens_per_head"],
                            storage_dtype=m.get("dtype", "bfloat16"), retriever=retriever, encode=False,
                            overwrite=overwrite, seed=m.get("seed", 0), progress=progress)


# ----------------------------------------------------------------------------------------------- probe
PROBE_FORMATS = ("chat", "qa")


def _score(items: Sequence[ProbeItem], replies: list[str], fmt: str) -> dict:
    exact, value_ok, made_up, abstain = [], [], [], []
    for it, reply in zip(items, replies):
        ab = is_abstention(reply)
        vals = [] if ab else asserted_values(reply, it.attribute, it.style, fmt)
        abstain.append(ab)
        if it.exists:
            expected = answer_sentence(it.name, it.attribute, it.answer, it.style) if fmt == "chat" else it.answer
            exact.append(reply == expected)
            value_ok.append(vals == [it.answer])
            made_up.append(bool(vals) and vals != [it.answer])
        else:
            made_up.append(bool(vals))
    mean = lambda xs: float(np.mean(xs)) if xs else float("nan")
    out = {"n": len(items), "made_up_rate": mean(made_up), "abstain_rate": mean(abstain)}
    if items and items[0].exists:
        out.update(accuracy=mean(exact), value_accuracy=mean(value_ok))
    else:
        out["other_rate"] = float(1 - out["made_up_rate"] - out["abstain_rate"]) if items else float("nan")
    out["samples"] = [{"question": it.question, "reply": r} for it, r in list(zip(items, replies))[:4]]
    return out


def _by_bio_family(world, items: Sequence[ProbeItem], replies: list[str], fmt: str) -> dict:
    """`_score` per wording family of each person's bank biography (a `BioWorld`'s held-out people are told in the
    training family or in the held-out one: two generalisation axes that one mean would mix)."""
    groups: dict[str, list[int]] = {}
    for k, it in enumerate(items):
        if it.person is not None and 0 <= it.person < len(world.people):
            groups.setdefault(world.people[it.person].bio_family, []).append(k)
    out = {}
    for fam, ks in sorted(groups.items()):
        sc = _score([items[k] for k in ks], [replies[k] for k in ks], fmt)
        out[fam] = {key: sc[key] for key in ("n", "accuracy", "value_accuracy", "made_up_rate", "abstain_rate")}
    return out


@torch.inference_mode()
def factuality_probe(model: Memory3, tokenizer, world=None, *, bank=None, modes: Sequence[str] = ("memory", "none"),
                     fmt: str = "chat", n_known: int = 60, n_unknown: int = 60, seed: int = 0,
                     known: Sequence[ProbeItem] | None = None, unknown: Sequence[ProbeItem] | None = None,
                     max_new_tokens: int = 32, batch_size: int = 32, phrasing: str = "heldout",
                     leakage_threshold: float | None = EVAL_LEAKAGE_THRESHOLD) -> dict:
    """Mini Table 19. (a) ``known``: people whose biography is in the bank and who appear in no training text
    (default: ``n_known`` questions about ``heldout`` people, evaluation-only phrasing): exact match of the
    greedy reply, plus value accuracy, made-up (wrong value) and abstention rates; with a `BioWorld`, also per
    wording family of the person's bank biography (``by_bio_family``). (b) ``unknown``: people
    who exist nowhere (probe-pool fake names): the rate of replies asserting a specific attribute value
    (``made_up_rate``) vs abstaining. ``fmt="chat"`` asks in the SFT chat format and expects the answer
    sentence; ``fmt="qa"`` asks in the pretraining format ("Q: ... A:") and expects the bare value (for the
    base model). ``phrasing``: the question wording of the default questions, "heldout" (never in training) or
    "train". ``world`` is a `World` or a `BioWorld` (`mini_m3.data.instructions`). Memory mode needs a bank built by
    this very model (see `bank_for_model`)."""
    if fmt not in PROBE_FORMATS:
        raise ValueError(f"fmt must be one of {PROBE_FORMATS}, got {fmt!r}")
    modes = tuple(modes)
    for m in modes:
        if m not in ("memory", "none"):
            raise ValueError(f"modes may contain 'memory' and 'none', got {m!r}")
    if "memory" in modes:
        if bank is None:
            raise ValueError("mode 'memory' needs a memory bank (bank=...)")
        if bank.manifest["model_fingerprint"] != weights_fingerprint(model):
            raise ValueError("the memory bank was built by another model; its memories are unreadable by this one "
                             "(Remark 9): build one with bank_for_model(model, tokenizer, bank, path)")
    if known is None or unknown is None:
        if world is None:
            raise ValueError("pass world=... or both known= and unknown= question lists")
        known = probe_known_questions(world, n_known, seed=seed, phrasing=phrasing) if known is None else known
        unknown = probe_unknown_questions(world, n_unknown, seed=seed, phrasing=phrasing) if unknown is None \
            else unknown
    known, unknown = list(known), list(unknown)
    if any(not it.exists for it in known) or any(it.exists for it in unknown):
        raise ValueError("known= must hold questions about existing people, unknown= about non-existent ones")
    prompt = chat_prompt if fmt == "chat" else qa_prompt
    result = {"fmt": fmt, "leakage_threshold": leakage_threshold}
    for mode in modes:
        res = {}
        for name, items in (("known", known), ("unknown", unknown)):
            replies = []
            for s in range(0, len(items), batch_size):
                gens = generate_batch(model, tokenizer, [prompt(it.question) for it in items[s:s + batch_size]],
                                      bank=bank if mode == "memory" else None, mode=mode,
                                      max_new_tokens=max_new_tokens, stop_at="\n",
                                      leakage_threshold=leakage_threshold)
                replies.extend(extract_reply(g.text) for g in gens)
            res[name] = _score(items, replies, fmt)
            if name == "known" and isinstance(world, BioWorld):  # the bank biography's wording family, apart
                res[name]["by_bio_family"] = _by_bio_family(world, items, replies, fmt)
        result[mode] = res
    return result


__all__ = ["DPOConfig", "SFTConfig", "bank_for_model", "cosine_lr", "dpo", "factuality_probe", "reward_margin",
           "sequence_logprobs", "sft", "sft_batch", "sft_targets"]
