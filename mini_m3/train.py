"""§3.6 and §5 pretraining: the warmup stage (no memory) and the continual stage (with explicit memory).

Training data are sequences of 64-token chunks. In the continual stage each chunk comes with the id of
one retrieved reference (retrieval happens once, before training, since it does not depend on the model;
references overlapping the sequence by more than 90 % are dropped, Eq. 6). Chunk c reads the references
of chunks c-4..c (5 memories, as at inference); the first chunks of a sequence read fewer. References
are encoded live by the model being trained, through the memory layers only, and gradients flow into
that encoding (our reading of §3.6: the writer and the reader are the same weights; the top-k choice
itself is not differentiable; `soft_selection` and `selection_distill` are training-time levers around it, off by
default). Optimiser: AdamW with a warmup-stable-decay (WSD) schedule (MiniCPM, §5);
`two_stage_configs` gives both stages' configs under one such schedule.
`TrainConfig.device` moves the model (None: it stays where it is); `dtype="bfloat16"` runs the forward pass, the live
reference encoding and the loss under `torch.autocast`, with float32 master weights, gradients and AdamW state.

Checkpoints are directories `step-0000100/` (zero-padded step) with safetensors (model, optimizer) and JSON (config, train
config, tokenizer, step, RNG), written to a temporary name, verified and renamed, plus a `latest` pointer file.
`train_state.json` holds a manifest (size and sha256 of every other file) and fingerprints of the training data and
tokenizer: a damaged latest checkpoint, or a resume with other data or another run config, is a clear error, never
a silent restart. A NaN/inf loss or gradient norm stops training at that step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .checkpoint import autocast_to, fsync_dir, load_weights, read_config, resolve_device, save_weights
from .config import MEMORY_SELECTORS
from .utils import atomic_path, atomic_write_text, sha256_file
from .data.text import training_sequences
from .memory.encode import SOFT_GATES, encode_reference_tokens, reference_rows
from .memory.overlap import TRAIN_LEAKAGE_THRESHOLD, exceeds_overlap
from .model import Memory3
from .tokenizer import Tokenizer

TRAIN_STATE_FORMAT, TRAIN_STATE_VERSION = "mini_m3.train_state", 2  # 2: file manifest, data/tokenizer fingerprints
STATE_FORMATS = (TRAIN_STATE_FORMAT, "mini_m3.dist_train_state")
STATE_FILE = "train_state.json"
# TrainConfig fields a resume may change: they set how a run is watched or stored, not what it computes
RESUME_FREE_FIELDS = ("quiet", "log_every", "threads", "eval_every", "checkpoint_every", "keep_checkpoints", "device")
# fields older checkpoints lack, and the values they ran with
LATER_FIELDS = {"device": None, "dtype": "float32", "memory_groups": 1}
TRAIN_DTYPES = ("float32", "bfloat16")
SELECTION_TARGETS = ("attention", "attribution")  # TrainConfig.selection_target


# ----------------------------------------------------------------------------------------------- data
@dataclass
class ChunkedData:
    """Training sequences cut into chunks, with one retrieved reference per chunk.

    tokens:    (N, T) long, T = chunks_per_sequence x chunk_length
    targets:   (N, T) long, next-token targets, -100 where no loss is taken (padding)
    chunk_refs:(N, C) long, id of the reference each chunk retrieved (-1 = none), or (N, C, m): the m references
               each chunk retrieved (`retrieve_for_chunks(memories=m)`), read as they are (see `memory_index`)
    references:list of token-id lists, the reference texts the ids point to
    """

    tokens: torch.Tensor
    targets: torch.Tensor
    chunk_refs: torch.Tensor
    references: list[list[int]]

    def __len__(self) -> int:
        return self.tokens.shape[0]


def pack_documents(docs: Sequence[Sequence[int]], chunk_length: int, chunks_per_sequence: int, *,
                   bos_id: int, eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One document per chunk: `<s> doc </s>` padded to `chunk_length` (a document that is too long is cut).
    Chunks are grouped into sequences of `chunks_per_sequence`; leftover documents are dropped."""
    n_seq = len(docs) // chunks_per_sequence
    if n_seq == 0:
        raise ValueError(f"{len(docs)} documents are fewer than one sequence of {chunks_per_sequence} chunks")
    T = chunk_length * chunks_per_sequence
    tokens = torch.full((n_seq, T), pad_id, dtype=torch.long)
    targets = torch.full((n_seq, T), -100, dtype=torch.long)
    for d, doc in enumerate(docs[:n_seq * chunks_per_sequence]):
        s, c = divmod(d, chunks_per_sequence)
        ids = ([bos_id] + list(doc) + [eos_id])[:chunk_length]
        start = c * chunk_length
        tokens[s, start:start + len(ids)] = torch.tensor(ids)
        targets[s, start:start + len(ids) - 1] = torch.tensor(ids[1:])
    return tokens, targets


def pack_stream(docs: Sequence[Sequence[int]], seq_len: int, *, bos_id: int, eos_id: int,
                with_documents: bool = False) -> tuple[torch.Tensor, ...]:
    """Documents back to back (`<s> doc </s> <s> doc </s> ...`, `data.text.training_sequences` cut at
    `seq_len` + 1 tokens) as (tokens, next-token targets) of `seq_len`, with no padding: a chunk boundary can fall
    anywhere in a document (the layout of ordinary pretraining, where the retrieval interval decides how much text
    shares one retrieval). The last, partial sequence is dropped. `with_documents` adds a third (N, seq_len)
    tensor: the index in `docs` of the document each input token belongs to (for analysis)."""
    rows = list(training_sequences(docs, seq_len + 1, bos_id=bos_id, eos_id=eos_id))
    if not rows:
        raise ValueError(f"{sum(len(d) + 2 for d in docs)} tokens are fewer than one sequence of {seq_len} (+1 target)")
    flat = torch.tensor(rows, dtype=torch.long)
    out = flat[:, :-1].contiguous(), flat[:, 1:].contiguous()
    if not with_documents:
        return out
    # the same stream, one document index per token (<s> and </s> included), cut into the same rows
    owner = [i for i, d in enumerate(docs) for _ in range(len(d) + 2)]
    documents = torch.tensor(owner[:flat.numel()], dtype=torch.long).view(flat.shape)
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts.view(-1)[1:] = documents.view(-1)[1:] != documents.view(-1)[:-1]
    assert bool((flat[starts & (documents > 0)] == bos_id).all()), "document index out of step with the stream"
    return (*out, documents[:, :-1].contiguous())


def retrieve_for_chunks(tokens: torch.Tensor, chunk_length: int, tokenizer: Tokenizer, retriever,
                        reference_tokens: Sequence[Sequence[int]], *, candidates: int = 4,
                        leakage_threshold: float = TRAIN_LEAKAGE_THRESHOLD, progress: bool = True,
                        memories: int = 1) -> torch.Tensor:
    """For each chunk, the best retrieved reference that does not overlap the chunk's sequence by more than
    `leakage_threshold` (Eq. 6 on token ids, §4.4). Returns (N, C) reference ids, -1 for empty chunks.
    memories > 1: the best `memories` such references of each chunk, (N, C, memories), -1 padded (§3.6: a chunk
    reads the memories retrieved for it; `candidates` is raised to at least 2 x memories)."""
    N, T = tokens.shape
    C = T // chunk_length
    chunks = tokens.view(N, C, chunk_length)
    queries, where = [], []
    for s in range(N):
        for c in range(C):
            ids = [t for t in chunks[s, c].tolist() if t > 3]  # drop special tokens
            if ids:
                queries.append(tokenizer.decode(ids))
                where.append((s, c))
    out = torch.full((N, C, memories), -1, dtype=torch.long)
    if not queries:
        return out[..., 0] if memories == 1 else out
    k = min(max(candidates, 2 * memories), len(retriever))
    ids_all = []
    for i in tqdm(range(0, len(queries), 4096), disable=not progress, desc="retrieve for chunks", unit="batch"):
        ids_all.append(retriever.search(queries[i:i + 4096], k)[1])
    found = np.concatenate(ids_all)
    for (s, c), cand in zip(where, found):
        seq = [t for t in tokens[s].tolist() if t > 3]
        kept = [r for r in cand.tolist() if r >= 0 and not exceeds_overlap(seq, reference_tokens[r], leakage_threshold)]
        kept = kept[:memories]
        out[s, c, :len(kept)] = torch.tensor(kept, dtype=torch.long)
    return out[..., 0] if memories == 1 else out


def share_memories(chunk_refs: torch.Tensor, group: int, *, seed: int = 0, tokens: torch.Tensor | None = None,
                   references: Sequence[Sequence[int]] | None = None,
                   leakage_threshold: float = TRAIN_LEAKAGE_THRESHOLD) -> tuple[torch.Tensor, torch.Tensor]:
    """§3.6's saving for one-chunk sequences: `group` chunks read one shared set of references, each chunk's own
    (its top-1 retrieval) among them, so a batch encodes about one reference per chunk instead of `group` (the paper:
    each chunk retrieves 1 reference and reads its own and the previous 4 chunks').

    chunk_refs: (N, 1, m) each chunk's retrieved reference ids, best first (`retrieve_for_chunks(memories=m)`).
    A group starts at a leader chunk (in a seeded order) and gathers, for each other reference the leader retrieved
    (look-alikes, as retrieval found them), a chunk whose top-1 is that reference; it is filled with the next chunks
    of the seeded order. Each chunk then reads its own top-1 first, then the other members' top-1s (distinct, -1
    padded to `group`); with `tokens` and `references`, a reference whose text overlaps the chunk's sequence
    beyond `leakage_threshold` is dropped, as retrieval drops it (Eq. 6). No labels: only retrieval's ids.
    Returns (order (N,): rows in group order, group g = order[g·group:(g+1)·group], only the last group may be
    shorter; refs (N, 1, group): what row order[i] reads, in the new order). Batches keep groups whole with
    `TrainConfig.memory_groups = group` (`batch_order`)."""
    if chunk_refs.dim() != 3 or chunk_refs.shape[1] != 1:
        raise ValueError(f"share_memories needs (sequences, 1 chunk, memories) references, got "
                         f"{tuple(chunk_refs.shape)}")
    if group < 1:
        raise ValueError(f"share_memories: group={group} must be >= 1")
    if (tokens is None) != (references is None):
        raise ValueError("share_memories: the leakage check needs both tokens and references")
    N = chunk_refs.shape[0]
    retrieved = chunk_refs[:, 0].tolist()
    own = [r[0] for r in retrieved]
    visit = np.random.default_rng(seed).permutation(N).tolist()
    pool: dict[int, list[int]] = {}
    for j in reversed(visit):  # each reference's chunks, the first of the seeded order last (popped first)
        pool.setdefault(own[j], []).append(j)
    taken = [False] * N
    fill = iter(visit)
    order = []
    for i in visit:
        if taken[i]:
            continue
        members, owns = [i], {own[i]}
        taken[i] = True
        for r in retrieved[i][1:]:
            stack = pool.get(r, [])
            while stack and taken[stack[-1]]:
                stack.pop()
            if len(members) == group or r < 0 or r in owns or not stack:
                continue
            members.append(stack.pop())
            taken[members[-1]] = True
            owns.add(r)
        while len(members) < group:  # then the next free chunks of the seeded order (other people)
            j = next(fill, None)
            if j is None:
                break
            if not taken[j]:
                members.append(j)
                taken[j] = True
        order.extend(members)
    out = torch.full((N, 1, group), -1, dtype=torch.long)
    for g in range(0, N, group):
        members = order[g:g + group]
        for k, j in enumerate(members):
            ids = list(dict.fromkeys([own[j]] + [own[m] for m in members if m != j]))
            ids = [r for r in ids if r >= 0]
            if tokens is not None:
                seq = [t for t in tokens[j].tolist() if t > 3]
                ids = [r for r in ids if not exceeds_overlap(seq, references[r], leakage_threshold)]
            out[g + k, 0, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return torch.tensor(order, dtype=torch.long), out


def memory_index(chunk_refs: torch.Tensor, memories_per_chunk: int) -> torch.Tensor:
    """(B, C) retrieved ids -> (B, C, n) ids each chunk reads: its own and the previous n-1 chunks' (-1 pad).
    (B, C, m) ids (each chunk's own top-m retrieval, `retrieve_for_chunks(memories=m)`) -> the first n of them."""
    if chunk_refs.dim() == 3:
        return chunk_refs[..., :memories_per_chunk]
    B, C = chunk_refs.shape
    n = memories_per_chunk
    padded = torch.cat([torch.full((B, n - 1), -1, dtype=torch.long), chunk_refs], 1)
    return torch.stack([padded[:, c:c + n] for c in range(C)], 1).flip(-1)  # own reference first


# ----------------------------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    """One training stage. `stage="warmup"` trains without memory, `"continual"` with memory (§3.6)."""

    stage: str = "warmup"
    steps: int = 200
    batch_size: int = 16
    lr: float = 2e-3
    warmup_steps: int = 20  # linear warmup (skip it when continuing: warmup_steps=0)
    decay_fraction: float = 0.1  # WSD: the last 10 % of steps decay to min_lr_ratio x lr
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = 0
    selector: str | None = None  # None: the model's memory format (Memory3Config.memory_selector); else an override
    tokens_per_head: int | None = None  # None: the model's (Memory3Config.memory_tokens_per_head)
    memory_grad: bool = True
    # soft selection (a named lever, not the paper's): a training-time relaxation of the top-k token choice whose
    # temperature starts here and falls linearly to 0 at `soft_selection_until` x steps; the hard top-k after that
    # and at inference. 0 = the paper's hard top-k throughout. See `encode.soft_selection_bias`.
    soft_selection: float = 0.0
    soft_selection_until: float = 0.5  # also ends selection distillation's phase
    # what the soft weight g_j of a slot scales (a named lever): "logit" (its attention score: the reader can outbid
    # a small weight) or "logit+value" (also its value: only raising the token's selection score lets it be read).
    # See `encode.encode_reference_tokens`.
    soft_selection_gate: str = "logit"
    # selection distillation (a named lever, not the paper's): until soft_selection_until x steps every reference
    # token is kept, and this weight x KL(attention the reader pays each token || the selection score's
    # distribution) joins the loss, so the top-k learns to keep what the reader reads; the hard top-k after that.
    # 0 = off. See `selection_distill_loss`.
    selection_distill: float = 0.0
    # what selection distillation fits the selection score to (a named lever): "attention", the attention the
    # reader pays each token; "attribution", how much the loss would fall if the reader attended more to the token
    # (-dL/d slot bias, clipped at 0): useful tokens rather than the attention sink. See `selection_targets`.
    selection_target: str = "attention"
    # format mixing (a named lever, not the paper's): this share of the continual steps, evenly spaced
    # (`mixed_step`), reads an easier memory format, `mix_selector` tokens of the first `mix_memories` memories
    # per chunk (default: every token of the chunk's own reference, the format that forms the readers fastest),
    # the other steps the model's format; evaluation always reads the model's. 0 = off.
    format_mix: float = 0.0
    mix_selector: str = "all"
    mix_memories: int = 1
    # sequences lie in groups of this many consecutive rows that read one set of references (`share_memories`, the
    # paper's one reference encoded per chunk); batches keep the groups whole (`batch_order`). 1 = no groups.
    memory_groups: int = 1
    eval_every: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 10
    threads: int | None = None
    quiet: bool = False
    device: str | None = None  # "cpu", "cuda", "cuda:N", "mps": train() moves the model there; None: where it is
    dtype: str = "float32"  # "bfloat16": autocast around forward and loss, float32 master weights

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if self.stage not in ("warmup", "continual"):
            raise ValueError(f"TrainConfig.stage={self.stage!r}: must be 'warmup' or 'continual'")
        if self.selector is not None and self.selector not in MEMORY_SELECTORS:
            raise ValueError(f"TrainConfig.selector={self.selector!r}: must be None (the model's) or one of "
                             f"{list(MEMORY_SELECTORS)}")
        for f in ("steps", "batch_size"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) <= 0:
                raise ValueError(f"TrainConfig.{f}={getattr(self, f)!r}: must be a positive integer")
        if not 0 <= self.decay_fraction <= 1:
            raise ValueError(f"TrainConfig.decay_fraction={self.decay_fraction}: must be in [0, 1]")
        if self.soft_selection < 0 or self.selection_distill < 0 or not 0 < self.soft_selection_until <= 1:
            raise ValueError(f"TrainConfig.soft_selection={self.soft_selection} and selection_distill="
                             f"{self.selection_distill} must be >= 0 and soft_selection_until="
                             f"{self.soft_selection_until} in (0, 1]")
        if self.soft_selection_gate not in SOFT_GATES:
            raise ValueError(f"TrainConfig.soft_selection_gate={self.soft_selection_gate!r}: must be one of "
                             f"{list(SOFT_GATES)}")
        if self.selection_target not in SELECTION_TARGETS:
            raise ValueError(f"TrainConfig.selection_target={self.selection_target!r}: must be one of "
                             f"{list(SELECTION_TARGETS)}")
        if self.lr <= 0:
            raise ValueError(f"TrainConfig.lr={self.lr}: must be positive")
        if isinstance(self.memory_groups, bool) or not isinstance(self.memory_groups, int) or self.memory_groups < 1:
            raise ValueError(f"TrainConfig.memory_groups={self.memory_groups!r} must be an integer >= 1")
        if not 0 <= self.format_mix <= 1 or self.mix_selector not in MEMORY_SELECTORS or isinstance(
                self.mix_memories, bool) or not isinstance(self.mix_memories, int) or self.mix_memories < 1:
            raise ValueError(f"TrainConfig.format_mix={self.format_mix} must be in [0, 1], mix_selector="
                             f"{self.mix_selector!r} one of {list(MEMORY_SELECTORS)} and mix_memories="
                             f"{self.mix_memories!r} an integer >= 1")
        k = self.keep_checkpoints
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"TrainConfig.keep_checkpoints={self.keep_checkpoints!r}: must be an integer >= 1")
        if self.dtype not in TRAIN_DTYPES:
            why = " (float16 would need loss scaling, which training does not do)" if self.dtype == "float16" else ""
            raise ValueError(f"TrainConfig.dtype={self.dtype!r}: must be one of {list(TRAIN_DTYPES)}{why}")
        if self.device is not None:
            try:
                resolve_device(self.device)
            except ValueError as e:
                raise ValueError(f"TrainConfig.device={self.device!r}: {e}") from None


def wsd_lr(step: int, cfg: TrainConfig) -> float:
    """Warmup-stable-decay: linear warmup, a constant plateau, then a linear decay over the last
    `decay_fraction` of the steps to `min_lr_ratio` x peak."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = int(round(cfg.decay_fraction * cfg.steps))
    start = cfg.steps - decay_steps
    if decay_steps == 0 or step < start:
        return cfg.lr
    frac = (step - start + 1) / decay_steps
    return cfg.lr * (1 - frac * (1 - cfg.min_lr_ratio))


def stage_lr_warmup(warmup_steps: int) -> int:
    """LR warmup steps when each stage is scheduled on its own (`mini-m3 train`, the demo, the reading runs): 10 % of
    the warmup stage (at least 1), none without one; for `two_stage_configs(..., lr_warmup=)`."""
    return max(1, warmup_steps // 10) if warmup_steps else 0


def two_stage_configs(warmup_steps: int, continual_steps: int, *, lr_warmup: int | None = None,
                      last_decay_fraction: float | None = None, stages: tuple[str, str] = ("warmup", "continual"),
                      **common) -> tuple[TrainConfig | None, TrainConfig | None]:
    """The TrainConfigs of the warmup stage (no memory) and the continual stage (with memory) of §3.6, None for a
    stage of 0 steps; `common`: the other TrainConfig fields, the same in both stages.

    The rule: both stages follow the one WSD schedule of a single run of all warmup + continual steps (the
    no-memory control's, so every step of every arm has the same learning rate): a linear LR warmup over the
    first max(1, total // 10) steps, in the first stage, and the decay over the last 10 % of all steps
    (`TrainConfig.decay_fraction`), in the last stage. A warmup longer than the first stage is cut at the switch
    (the second stage starts at the peak); a decay longer than the last stage spans all of it.
    Call sites that keep another schedule say so: `lr_warmup` (LR warmup steps) and `last_decay_fraction` (the
    decay_fraction of the last stage) replace the rule's; `stages` gives the arms of Fig 11 (both stages without
    memory, or both with it)."""
    for name, v in (("warmup_steps", warmup_steps), ("continual_steps", continual_steps), ("lr_warmup", lr_warmup)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ValueError(f"two_stage_configs: {name}={v!r} must be an integer >= 0")
    set_here = sorted({"stage", "steps", "decay_fraction"} & set(common))
    if set_here:
        raise ValueError(f"two_stage_configs sets {set_here} itself (use stages=, lr_warmup=, last_decay_fraction=)")
    if len(stages) != 2:
        raise ValueError(f"two_stage_configs: stages={stages!r} must name two stages")
    steps = (warmup_steps, continual_steps)
    total = warmup_steps + continual_steps
    if total == 0:
        raise ValueError("two_stage_configs: warmup_steps and continual_steps are both 0: nothing to train")
    first, last = (0 if warmup_steps else 1), (1 if continual_steps else 0)
    ramp = max(1, total // 10) if lr_warmup is None else lr_warmup
    if last_decay_fraction is None:
        share, n = TrainConfig.decay_fraction, steps[last]  # a single run's share: its last 10 % of steps
        last_decay_fraction = share if n == total else min(1.0, share * total / n)
    return tuple(None if n == 0 else
                 TrainConfig(stage=stage, steps=n, warmup_steps=ramp if i == first else 0,
                             decay_fraction=last_decay_fraction if i == last else 0.0, **common)
                 for i, (stage, n) in enumerate(zip(stages, steps)))


def make_optimizer(model: Memory3, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms (1-D gains), as is usual."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)


# ----------------------------------------------------------------------------------------------- steps
def batch_order(n: int, batch_size: int, step: int, seed: int, block: int = 1) -> torch.Tensor:
    """Sequence indices of batch `step`: epochs of seeded permutations, so any step is reproducible alone.
    block > 1: the permutation moves blocks of `block` consecutive rows (the groups of `share_memories`) whole."""
    per_epoch = max(1, n // batch_size)
    epoch, i = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    if block == 1:
        perm = torch.randperm(n, generator=gen)
    else:
        blocks = torch.randperm(-(-n // block), generator=gen)
        perm = (blocks[:, None] * block + torch.arange(block)).flatten()
        perm = perm[perm < n]
    return perm[i * batch_size:(i + 1) * batch_size]


def soft_temperature(step: int | None, cfg: TrainConfig) -> float:
    """The soft-selection temperature at `step`: cfg.soft_selection falling linearly to 0 at soft_selection_until x
    steps (0: the hard top-k). None (an evaluation, not a training step) reads the hard format."""
    if step is None or cfg.soft_selection == 0:
        return 0.0
    return max(0.0, cfg.soft_selection * (1 - step / (cfg.soft_selection_until * cfg.steps)))


def distill_phase(step: int | None, cfg: TrainConfig) -> bool:
    """Whether `step` is in selection distillation's phase (the first soft_selection_until x steps)."""
    return step is not None and cfg.selection_distill > 0 and step < cfg.soft_selection_until * cfg.steps


def mixed_step(step: int | None, cfg: TrainConfig) -> bool:
    """Whether continual step `step` reads format mixing's easier format (`TrainConfig.format_mix`): the steps where
    floor((step + 1) x share) rises, evenly spaced (share 0.5: steps 1, 3, 5, ...); an evaluation (None) never."""
    share = cfg.format_mix
    return step is not None and share > 0 and math.floor((step + 1) * share) > math.floor(step * share)


def continual_memory(model: Memory3, data: ChunkedData, rows: torch.Tensor, cfg: TrainConfig,
                     temperature: float = 0.0, distill: bool = False, mixed: bool = False):
    """Encode the references a batch reads (live, through the memory layers) and lay them out per chunk: in the
    model's memory format (memories per chunk, selector, tokens per head) unless `cfg` overrides the latter two;
    `temperature` > 0: soft selection (`soft_temperature`). mixed=True: format mixing's format instead
    (`cfg.mix_selector`, the first `cfg.mix_memories` memories; `mixed_step`). distill=True: every token kept, and
    returns (MemoryKV collecting each slot's attention, the ExplicitMemory with its selection scores, the (B, C, n)
    rows)."""
    mcfg = model.cfg
    refs = data.chunk_refs[rows]  # (B, C)
    index = memory_index(refs, cfg.mix_memories if mixed else mcfg.memories_per_chunk)  # (B, C, n) reference ids
    used, local = reference_rows(index)
    if not used:
        return (None, None, None) if distill else None
    with torch.set_grad_enabled(cfg.memory_grad and torch.is_grad_enabled()):
        mem = encode_reference_tokens(model, [data.references[r] for r in used],
                                      selector=cfg.mix_selector if mixed else cfg.selector,
                                      tokens_per_head=cfg.tokens_per_head,
                                      generator=torch.Generator().manual_seed(cfg.seed),
                                      score_dtype=torch.float32,  # 2-3x faster selection; see selection_scores
                                      soft_temperature=temperature, keep_scores=distill,
                                      soft_gate=cfg.soft_selection_gate)
    mem = mem.to(model.tok_emb.weight.dtype)  # under autocast the encoding comes out in bf16; the model reads its own
    kv = mem.to_memory_kv(local.to(mem.keys.device))
    if not distill:
        return kv
    if cfg.selection_target == "attention":
        kv.usage = {}
    else:  # "attribution": a zero log-weight on every slot, whose gradient says which slots the loss wants read
        probe = torch.zeros(kv.keys.shape[:-1], dtype=kv.keys.dtype, device=kv.keys.device,
                            requires_grad=True)  # (B, C, L_mem, H_mem, n·R)
        kv.bias = probe if kv.bias is None else kv.bias + probe
        kv.probe = probe
    return kv, mem, local


def selection_targets(kv, loss: torch.Tensor | None, memory_layers) -> torch.Tensor:
    """Selection distillation's per-slot target weights (B, C, L_mem, H_mem, n·R), no gradient:
    "attention" (kv.usage, filled by the fused prefill): the attention the context's queries paid each slot;
    "attribution" (kv.probe, the zero slot bias of `continual_memory`): max(0, -dL/d bias), the first-order fall
    of the loss if the reader attended more to the slot. Attention on a sink slot that carries nothing the loss
    needs scores ~0 here; a slot the answer is copied from scores high. Only the LM loss decides: no labels."""
    if kv.probe is not None:
        (g,) = torch.autograd.grad(loss, kv.probe, retain_graph=True)
        return (-g).clamp_min(0).float()
    missing = [l for l in memory_layers if l not in (kv.usage or {})]
    if missing:
        raise RuntimeError(f"selection distillation needs the fused prefill's attention in memory layers {missing}")
    return torch.stack([kv.usage[l] for l in memory_layers], 2)  # (B, C, L_mem, H_mem, n·R)


def selection_distill_loss(usage: torch.Tensor, mem, local: torch.Tensor) -> torch.Tensor:
    """Selection distillation: for each reference read in the batch, memory layer and memory head, the target
    weight of each of its tokens (`selection_targets`: `usage` (B, C, L_mem, H_mem, n·R), summed over every chunk
    that read it; no gradient) is the target distribution, and the selection score's own distribution over the
    reference's tokens (w_j / Σ w, from `ExplicitMemory.selection`) is fitted to it: mean KL(target || selection)
    over the (reference, layer, head) triples whose target is not all zero. No labels: the reader decides."""
    N, Lm, Hm, R = mem.selection.shape
    B, C, n = local.shape
    u = usage.view(B, C, Lm, Hm, n, R).permute(0, 1, 4, 2, 3, 5).reshape(B * C * n, Lm, Hm, R)
    rows = local.reshape(-1).to(u.device)
    target = u.new_zeros(N, Lm, Hm, R).index_add_(0, rows[rows >= 0], u[rows >= 0])
    total = target.sum(-1, keepdim=True)
    read = total.squeeze(-1) > 0  # (N, L_mem, H_mem)
    target = target / total.clamp_min(1e-12)
    log_p = torch.log_softmax(mem.selection.float(), -1)
    kl = (target * (target.clamp_min(1e-12).log() - log_p)).sum(-1)  # (N, L_mem, H_mem)
    return kl[read].mean() if bool(read.any()) else log_p.sum() * 0


def train_step(model: Memory3, data: ChunkedData, rows: torch.Tensor, cfg: TrainConfig,
               step: int | None = None) -> torch.Tensor:
    """The loss of batch `rows` (forward only), in `cfg.dtype` on the model's device; the caller runs backward.
    `step` sets the soft-selection temperature (`soft_temperature`) and format mixing (`mixed_step`); None reads
    the model's hard format."""
    dev = model.tok_emb.weight.device
    mixed = cfg.stage == "continual" and mixed_step(step, cfg)  # format mixing's easier format: no soft selection
    distill = cfg.stage == "continual" and distill_phase(step, cfg) and not mixed
    with autocast_to(dev, cfg.dtype):
        memory = (continual_memory(model, data, rows, cfg, 0.0 if mixed else soft_temperature(step, cfg), distill,
                                   mixed) if cfg.stage == "continual" else None)
        if distill:
            memory, mem, local = memory
        out = model(data.tokens[rows].to(dev), targets=data.targets[rows].to(dev), memory=memory,
                    target_logits_only=True)
    if distill and memory is not None:
        target = selection_targets(memory, out.loss, model.cfg.memory_layers)
        return out.loss + cfg.selection_distill * selection_distill_loss(target, mem, local)
    return out.loss


@torch.no_grad()
def evaluate_loss(model: Memory3, data: ChunkedData, cfg: TrainConfig, *, max_batches: int = 8,
                  with_memory: bool | None = None) -> float:
    """Mean LM loss over the first batches of `data` (with memory in the continual stage by default)."""
    was = model.training
    model.eval()
    stage = cfg.stage if with_memory is None else ("continual" if with_memory else "warmup")
    c = dataclasses.replace(cfg, stage=stage)
    losses = []
    for b in range(min(max_batches, math.ceil(len(data) / cfg.batch_size))):
        rows = torch.arange(b * cfg.batch_size, min(len(data), (b + 1) * cfg.batch_size))
        losses.append(float(train_step(model, data, rows, c)))
    model.train(was)
    return float(np.mean(losses))


# ----------------------------------------------------------------------------------------------- checkpoints
def file_manifest(directory: Path) -> dict:
    """{name: {"bytes", "sha256"}} of every file of a checkpoint directory but train_state.json (which holds it)."""
    return {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(directory.iterdir()) if p.is_file() and p.name != STATE_FILE}


def data_fingerprint(data: ChunkedData) -> str:
    """sha256 of the training data (tokens, targets, retrieved ids, reference tokens): checkpoints record it,
    and a resume on other data is refused."""
    h = hashlib.sha256()
    for t in (data.tokens, data.targets, data.chunk_refs):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    h.update(np.array([len(r) for r in data.references], dtype=np.int64).tobytes())
    h.update(np.fromiter(itertools.chain.from_iterable(data.references), dtype=np.int64).tobytes())
    return h.hexdigest()


def read_train_state(path: str | os.PathLike) -> dict:
    """train_state.json of a checkpoint directory (single-process or distributed), checked; errors name the file."""
    path = Path(path)
    state_file = path / STATE_FILE
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not state_file.is_file():
        raise FileNotFoundError(f"{path} is not a training checkpoint ({STATE_FILE} missing)")
    try:
        state = json.loads(state_file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{state_file} is not valid JSON (truncated or corrupt?): {e}") from None
    if not isinstance(state, dict) or state.get("format") not in STATE_FORMATS or state.get("version") not in (1, 2):
        fmt, ver = (state.get("format"), state.get("version")) if isinstance(state, dict) else (None, None)
        raise ValueError(f"{path}: unsupported checkpoint format {fmt!r} v{ver}")
    if not isinstance(state.get("step"), int) or not isinstance(state.get("train_config"), dict):
        raise ValueError(f"{state_file}: no integer 'step' or no 'train_config'")
    return state


def verify_checkpoint(path: Path, state: dict, *, hashes: bool = True, skip: Sequence[str] = ()) -> None:
    """Check every file against the manifest written with the checkpoint: present, of its size and (hashes)
    of its sha256. Raises ValueError naming the first damaged file. Version-1 checkpoints have no manifest."""
    for name, rec in (state.get("files") or {}).items():
        if name in skip:
            continue
        f = path / name
        if not f.is_file():
            raise ValueError(f"checkpoint {path} is damaged: {name} is missing")
        if f.stat().st_size != rec["bytes"]:
            raise ValueError(f"checkpoint {path} is damaged: {f} has {f.stat().st_size} bytes, {rec['bytes']} were "
                             f"written (truncated?)")
        if hashes and sha256_file(f) != rec["sha256"]:
            raise ValueError(f"checkpoint {path} is damaged: {f} does not match the sha256 recorded when it was "
                             f"written (corrupt?)")


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` is not an intact checkpoint (cheap: files present and of their sizes), or None."""
    try:
        verify_checkpoint(path, read_train_state(path), hashes=False)
    except (OSError, ValueError) as e:
        return str(e)
    return None


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    """The `step-N` directories of `out_dir`, by step."""
    found = [p for p in out_dir.glob("step-*") if re.fullmatch(r"step-\d+", p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def prune_checkpoints(out_dir: Path, newest: Path, keep: int) -> None:
    """Remove the checkpoints older than `newest` but the `keep` - 1 newest intact ones (damaged ones go too),
    and the temporary directories of killed writes. Call it only once `newest` is written and verified."""
    older = [p for p in checkpoint_dirs(out_dir) if int(p.name[5:]) < int(newest.name[5:])]
    intact = [p for p in older if checkpoint_problem(p) is None]
    kept = set(intact[-(keep - 1):]) if keep > 1 else set()
    leftovers = list(out_dir.glob(".tmp-step-*")) + list(out_dir.glob(".old-step-*"))
    for p in [p for p in older if p not in kept] + leftovers:
        shutil.rmtree(p, ignore_errors=True)


def publish_checkpoint(tmp: Path, final: Path, keep: int) -> None:
    """Verify the fully written checkpoint `tmp` (as a resume will read it), rename it to `final`, point `latest`
    at it, and only then prune the older ones. A kill at any point leaves `latest` naming an intact checkpoint."""
    out_dir = final.parent
    verify_checkpoint(tmp, read_train_state(tmp), hashes=True)
    fsync_dir(tmp)
    if final.exists():  # rewriting a step after resuming from an earlier checkpoint: swap, keep `latest` valid
        aside = out_dir / f".old-{final.name}-{os.getpid()}"
        os.replace(final, aside)
        os.replace(tmp, final)
        shutil.rmtree(aside)
    else:
        os.replace(tmp, final)
    fsync_dir(out_dir)
    atomic_write_text(out_dir / "latest", final.name)
    prune_checkpoints(out_dir, final, keep)


def save_checkpoint(out_dir: str | os.PathLike, model: Memory3, optimizer, step: int, cfg: TrainConfig,
                    tokenizer: Tokenizer | None = None, extra: dict | None = None) -> Path:
    """Write `out_dir/step-<7-digit step>/` (weights, optimizer + RNG, configs, tokenizer, and a train_state.json
    with a manifest of the other files), verify it, point `out_dir/latest` at it, prune old ones."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"step-{step:07d}"
    tmp = out_dir / f".tmp-step-{step:07d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_weights(model, tmp / "model.safetensors", tokenizer=tokenizer)
    model.cfg.to_json(tmp / "config.json")
    if tokenizer is not None:
        tokenizer.save(tmp / "tokenizer.json")
    tensors, groups = {}, []
    params = list(model.parameters())
    pid = {id(p): i for i, p in enumerate(params)}
    for p, st in optimizer.state.items():
        for k, v in st.items():
            tensors[f"state.{pid[id(p)]}.{k}"] = v.detach().cpu().contiguous() if torch.is_tensor(v) else torch.tensor(v)
    for g in optimizer.param_groups:
        groups.append({k: v for k, v in g.items() if k != "params"} | {"params": [pid[id(p)] for p in g["params"]]})
    tensors["rng.torch"] = torch.get_rng_state()
    with atomic_path(tmp / "optimizer.safetensors") as f:
        save_file(tensors, f)
    state = {"format": TRAIN_STATE_FORMAT, "version": TRAIN_STATE_VERSION, "step": step,
             "train_config": dataclasses.asdict(cfg), "param_groups": groups,
             "tokenizer_fingerprint": tokenizer.fingerprint() if tokenizer is not None else None, **(extra or {}),
             "files": file_manifest(tmp)}
    atomic_write_text(tmp / STATE_FILE, json.dumps(state, indent=1))
    publish_checkpoint(tmp, final, cfg.keep_checkpoints)
    return final


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint to resume from: the one `out_dir/latest` names, which must be intact (a damaged one is an
    error naming it and the newest intact one, never a silent restart). Without a `latest` pointer (a kill between
    the first checkpoint's rename and the pointer's write): the newest intact `step-N`, with a warning. None when
    `out_dir` holds no checkpoint."""
    out_dir = Path(out_dir)
    pointer = out_dir / "latest"
    found = checkpoint_dirs(out_dir) if out_dir.is_dir() else []
    if pointer.exists():
        try:
            name = pointer.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            name, problem = "", f"{pointer} is unreadable: {e}"
        else:
            problem = (checkpoint_problem(out_dir / name) if re.fullmatch(r"step-\d+", name)
                       else f"{pointer} does not name a step-N directory")
        if problem is None:
            return out_dir / name
        intact = [p for p in reversed(found) if checkpoint_problem(p) is None]
        hint = (f"the newest intact checkpoint is {intact[0]}: to resume from it, write {intact[0].name!r} into "
                f"{pointer}" if intact else f"no intact checkpoint is left in {out_dir}")
        raise ValueError(f"the latest checkpoint ({pointer} -> {name!r}) is damaged: {problem}; {hint}")
    for p in reversed(found):
        if checkpoint_problem(p) is None:
            warnings.warn(f"{out_dir} has no 'latest' pointer (killed while writing its first checkpoint?); "
                          f"using the newest intact checkpoint, {p.name}")
            return p
    if found:
        raise ValueError(f"{out_dir} holds checkpoints but none is intact: {checkpoint_problem(found[-1])}")
    return None


def load_checkpoint(path: str | os.PathLike, model: Memory3, optimizer=None) -> dict:
    """Restore weights (and optimizer + RNG state if an optimizer is given); returns the train state dict.
    Refuses a damaged checkpoint (every file is checked against its manifest) and one written for another
    model config."""
    path = Path(path)
    state = read_train_state(path)
    if state["format"] != TRAIN_STATE_FORMAT:
        raise ValueError(f"{path} is a distributed checkpoint: load it with mini_m3.distributed.load_dist_checkpoint")
    verify_checkpoint(path, state)
    ck_cfg = read_config(path / "config.json")
    if ck_cfg.replace(name=model.cfg.name) != model.cfg:
        raise ValueError(f"checkpoint {path} was written for a different model config "
                         f"({ck_cfg.name}: {ck_cfg.to_dict()}) than this model ({model.cfg.name})")
    tensors = None
    if optimizer is not None:  # read before touching the model: a bad file changes nothing
        opt_file = path / "optimizer.safetensors"
        try:
            tensors = load_file(str(opt_file))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{opt_file} is not a readable safetensors file (truncated or corrupt?): {e}") from None
        if "rng.torch" not in tensors:
            raise ValueError(f"{opt_file} holds no RNG state: not a mini_m3 optimizer file")
    load_weights(model, path / "model.safetensors")
    if optimizer is not None:
        params = list(model.parameters())
        optimizer.state.clear()
        for key, v in tensors.items():
            if key.startswith("state."):
                _, i, k = key.split(".", 2)
                optimizer.state[params[int(i)]][k] = v.to(params[int(i)].device) if k != "step" else v
        for g, saved in zip(optimizer.param_groups, state["param_groups"]):
            for k, v in saved.items():
                if k != "params":
                    g[k] = tuple(v) if isinstance(v, list) else v
        torch.set_rng_state(tensors["rng.torch"])
    return state


def check_resume(ck: Path, state: dict, cfg: TrainConfig, data_fp: str, tokenizer: Tokenizer | None) -> None:
    """Refuse to continue checkpoint `ck` as another run. Fields that only change how a run is watched or stored
    (RESUME_FREE_FIELDS) may change; `steps` may change when the LR schedule of the steps already taken stays
    the same (a WSD run extended or shortened); every other field, the data and the tokenizer must be the
    checkpoint's."""
    saved, now = {**LATER_FIELDS, **state["train_config"]}, json.loads(json.dumps(dataclasses.asdict(cfg)))
    problems = [f"{k}={saved.get(k)!r} there, {now[k]!r} now" for k in now
                if k not in RESUME_FREE_FIELDS + ("steps",) and saved.get(k) != now[k]]
    step = state["step"]
    if not problems and saved.get("steps") != cfg.steps:
        if step > cfg.steps:
            problems.append(f"it is at step {step}, past steps={cfg.steps}")
        elif any(wsd_lr(s, dataclasses.replace(cfg, steps=saved["steps"])) != wsd_lr(s, cfg) for s in range(step)):
            problems.append(f"steps={saved['steps']} there, {cfg.steps} now, which changes the learning rate of "
                            f"the {step} steps already taken")
    if state.get("data_fingerprint") not in (None, data_fp):
        problems.append("the training data differ from those it was trained on")
    saved_tok, tok_fp = state.get("tokenizer_fingerprint"), tokenizer.fingerprint() if tokenizer is not None else None
    if saved_tok and tok_fp and saved_tok != tok_fp:
        problems.append("the tokenizer differs from the one it was trained with")
    if problems:
        raise ValueError(f"cannot resume from {ck}: {'; '.join(problems)}. Resume with the settings and data it "
                         f"was written with, or train into another out_dir")
    if state.get("data_fingerprint") is None:
        warnings.warn(f"{ck} records no fingerprint of its training data (an older mini_m3 wrote it): "
                      f"the data cannot be checked")


def checkpoint_to_resume(out: Path | None, cfg: TrainConfig, data_fp: str | None, tokenizer: Tokenizer | None,
                         resume: bool) -> Path | None:
    """The checkpoint of this stage that a run in `out` continues from (checked by `check_resume`), or None
    for a fresh start. With resume=False, a directory that holds this stage's checkpoints is refused rather
    than overwritten. A checkpoint of another stage (both stages in one directory) is not resumed."""
    ck = latest_checkpoint(out) if out is not None else None
    if ck is None:
        return None
    state = read_train_state(ck)
    if state["train_config"].get("stage") != cfg.stage:
        return None
    if not resume:
        raise ValueError(f"{out} holds checkpoints of an earlier {cfg.stage} run (latest: {ck.name}); resume=False "
                         f"would overwrite them and their log: train into another out_dir, or remove {out}")
    check_resume(ck, state, cfg, data_fp, tokenizer)
    return ck


def prepare_log(log_path: Path, start: int) -> None:
    """Make the JSONL log hold exactly the steps before `start`: a fresh run (no checkpoint of this stage, so
    start 0) starts a new log; a resumed one drops the lines of the steps it will redo. A torn last line (a kill
    mid-write) is dropped with a warning; any other unreadable line is an error naming the file and line."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if not log_path.exists():
        return
    if start == 0:
        log_path.unlink()
        return
    rows = log_path.read_bytes().decode("utf-8", "replace").split("\n")
    keep = []
    for i, line in enumerate(rows):
        if not line.strip():
            continue
        try:
            step = json.loads(line)["step"]
            ok = isinstance(step, int)
        except (json.JSONDecodeError, TypeError, KeyError):
            ok = False
        if not ok and i == len(rows) - 1:  # the last line has no newline: it was being written when killed
            warnings.warn(f"{log_path}: dropped its torn last line {line[:60]!r} (killed while writing it)")
        elif not ok:
            raise ValueError(f"{log_path}, line {i + 1}: not a log record ({line[:60]!r}); fix or remove the line")
        elif step < start:
            keep.append(line)
    atomic_write_text(log_path, "".join(l + "\n" for l in keep))


def check_finite_step(stage: str, step: int, lr: float, **values: float) -> None:
    """Stop a diverged run at once: a ValueError naming the step when the loss or gradient norm is NaN or inf."""
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        raise ValueError(f"training diverged at {stage} step {step}: {', '.join(f'{k} = {v}' for k, v in bad.items())}"
                         f" (lr {lr:.3g}); stopped, nothing after the last checkpoint was saved: lower the learning "
                         f"rate")


# ----------------------------------------------------------------------------------------------- loop
def train(model: Memory3, data: ChunkedData, cfg: TrainConfig, *, out_dir: str | os.PathLike | None = None,
          tokenizer: Tokenizer | None = None, resume: bool = True, eval_data: ChunkedData | None = None,
          eval_fn: Callable[[Memory3, int], dict] | None = None, log_name: str | None = None) -> dict:
    """Run one stage for `cfg.steps` steps. With `out_dir`: JSONL log, checkpoints, and (resume=True)
    continuation from the latest checkpoint of this stage. The model is first moved to `cfg.device` (when set) and
    stays there. Returns a summary with losses and step times."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.stage == "continual" and (data.chunk_refs < 0).all():
        raise ValueError("continual training needs retrieved references (data.chunk_refs is all -1)")
    if cfg.device is not None:
        model.to(resolve_device(cfg.device))
    torch.manual_seed(cfg.seed)
    model.train()
    opt = make_optimizer(model, cfg)
    start = 0
    out = Path(out_dir) if out_dir is not None else None
    log_path = out / (log_name or f"{cfg.stage}.jsonl") if out is not None else None
    data_fp = data_fingerprint(data) if out is not None else None
    ck = checkpoint_to_resume(out, cfg, data_fp, tokenizer, resume)
    if ck is not None:
        start = load_checkpoint(ck, model, opt)["step"]  # exact resume: weights, optimizer, RNG, data order
        model.train()
    if log_path is not None:
        prepare_log(log_path, start)
    losses, times = [], []
    bar = tqdm(range(start, cfg.steps), disable=cfg.quiet, desc=f"{cfg.stage}", unit="step", initial=start,
               total=cfg.steps)
    for step in bar:
        t0 = time.perf_counter()
        lr = wsd_lr(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        rows = batch_order(len(data), cfg.batch_size, step, cfg.seed, cfg.memory_groups)
        loss = train_step(model, data, rows, cfg, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        losses.append(loss.item())
        check_finite_step(cfg.stage, step, lr, loss=losses[-1], grad_norm=gnorm)
        opt.step()
        dt = time.perf_counter() - t0
        times.append(dt)
        record = {"step": step, "stage": cfg.stage, "loss": losses[-1], "lr": lr, "grad_norm": gnorm,
                  "step_time": dt, "tokens": int((data.targets[rows] != -100).sum())}
        if eval_data is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            record["eval_loss"] = evaluate_loss(model, eval_data, cfg)
        if eval_fn is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            record.update(eval_fn(model, step))
            model.train()
        if step % cfg.log_every == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{lr:.1e}")
        if log_path is not None:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if out is not None and cfg.checkpoint_every and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
            save_checkpoint(out, model, opt, step + 1, cfg, tokenizer, extra={"data_fingerprint": data_fp})
    model.eval()
    steady = times[min(len(times) - 1, 3):] if times else []
    return {"losses": losses, "final_loss": losses[-1] if losses else None, "steps_run": len(losses),
            "step_time": float(np.median(steady)) if steady else None}


def plot_losses(log_paths: Sequence[str | os.PathLike], out_png: str | os.PathLike, labels: Sequence[str] | None = None,
                title: str = "training loss") -> None:
    """Plot loss curves from JSONL logs (one curve per log, steps concatenated in order given)."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend (a notebook's inline one) is left alone
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    for i, p in enumerate(log_paths):
        recs = [json.loads(l) for l in Path(p).read_text().splitlines() if l]
        ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], label=labels[i] if labels else Path(p).stem, lw=1)
    ax.set_xlabel("step"); ax.set_ylabel("loss"); ax.set_title(title); ax.legend(); ax.grid(alpha=.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)


if __name__ == "__main__":  # a library module: the pretraining command is `mini-m3 train` (imports go one way)
    raise SystemExit("python -m mini_m3.train is no command: run `mini-m3 train ...` (one process) or "
                     "`torchrun --nproc_per_node=N -m mini_m3 train ...` (FSDP2)")
