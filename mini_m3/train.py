"""§3.6 and §5 pretraining: the warmup stage (no memory) and the continual stage (with explicit memory).

Training data are sequences of 64-token chunks. In the continual stage each chunk comes with the id of
one retrieved reference (retrieval happens once, before training, since it does not depend on the model;
references overlapping the sequence by more than 90 % are dropped, Eq. 6). Chunk c reads the references
of chunks c-4..c (5 memories, as at inference); the first chunks of a sequence read fewer. References
are encoded live by the model being trained, through the memory layers only, and gradients flow into
that encoding (our reading of §3.6: the writer and the reader are the same weights; the top-k choice
itself is not differentiable). Optimiser: AdamW with a warmup-stable-decay (WSD) schedule (MiniCPM, §5).

Checkpoints are directories `step-0000100/` (zero-padded step) with safetensors (model, optimizer) and JSON (config, train
config, tokenizer, step, RNG), written to a temporary name and renamed, plus a `latest` pointer file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .checkpoint import load_weights, save_weights
from .config import Memory3Config, atomic_write_text
from .data.text import training_sequences
from .memory.encode import encode_reference_tokens
from .memory.retrieve import TRAIN_LEAKAGE_THRESHOLD, exceeds_overlap
from .model import Memory3
from .tokenizer import Tokenizer

TRAIN_STATE_VERSION = 1


# ----------------------------------------------------------------------------------------------- data
@dataclass
class ChunkedData:
    """Training sequences cut into chunks, with one retrieved reference per chunk.

    tokens:    (N, T) long, T = chunks_per_sequence x chunk_length
    targets:   (N, T) long, next-token targets, -100 where no loss is taken (padding)
    chunk_refs:(N, C) long, id of the reference each chunk retrieved (-1 = none)
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
                        leakage_threshold: float = TRAIN_LEAKAGE_THRESHOLD, progress: bool = True) -> torch.Tensor:
    """For each chunk, the best retrieved reference that does not overlap the chunk's sequence by more than
    `leakage_threshold` (Eq. 6 on token ids, §4.4). Returns (N, C) reference ids, -1 for empty chunks."""
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
    out = torch.full((N, C), -1, dtype=torch.long)
    if not queries:
        return out
    k = min(candidates, len(retriever))
    ids_all = []
    for i in tqdm(range(0, len(queries), 4096), disable=not progress, desc="retrieve for chunks", unit="batch"):
        ids_all.append(retriever.search(queries[i:i + 4096], k)[1])
    found = np.concatenate(ids_all)
    for (s, c), cand in zip(where, found):
        seq = [t for t in tokens[s].tolist() if t > 3]
        for r in cand.tolist():
            if r >= 0 and not exceeds_overlap(seq, reference_tokens[r], leakage_threshold):
                out[s, c] = r
                break
    return out


def memory_index(chunk_refs: torch.Tensor, memories_per_chunk: int) -> torch.Tensor:
    """(B, C) retrieved ids -> (B, C, n) ids each chunk reads: its own and the previous n-1 chunks' (-1 pad)."""
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
    selector: str = "attention"
    tokens_per_head: int | None = None
    memory_grad: bool = True
    eval_every: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 10
    threads: int | None = None
    quiet: bool = False

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if self.stage not in ("warmup", "continual"):
            raise ValueError(f"TrainConfig.stage={self.stage!r}: must be 'warmup' or 'continual'")
        for f in ("steps", "batch_size"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) <= 0:
                raise ValueError(f"TrainConfig.{f}={getattr(self, f)!r}: must be a positive integer")
        if not 0 <= self.decay_fraction <= 1:
            raise ValueError(f"TrainConfig.decay_fraction={self.decay_fraction}: must be in [0, 1]")
        if self.lr <= 0:
            raise ValueError(f"TrainConfig.lr={self.lr}: must be positive")


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


def make_optimizer(model: Memory3, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms (1-D gains), as is usual."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)


# ----------------------------------------------------------------------------------------------- steps
def batch_order(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Sequence indices of batch `step`: epochs of seeded permutations, so any step is reproducible alone."""
    per_epoch = max(1, n // batch_size)
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[i * batch_size:(i + 1) * batch_size]


def continual_memory(model: Memory3, data: ChunkedData, rows: torch.Tensor, cfg: TrainConfig):
    """Encode the references a batch reads (live, through the memory layers) and lay them out per chunk."""
    mcfg = model.cfg
    refs = data.chunk_refs[rows]  # (B, C)
    index = memory_index(refs, mcfg.memories_per_chunk)  # (B, C, n) reference ids
    used = sorted({int(r) for r in index.flatten().tolist() if r >= 0})
    if not used:
        return None
    row_of = {r: i for i, r in enumerate(used)}
    with torch.set_grad_enabled(cfg.memory_grad and torch.is_grad_enabled()):
        mem = encode_reference_tokens(model, [data.references[r] for r in used], selector=cfg.selector,
                                      tokens_per_head=cfg.tokens_per_head,
                                      generator=torch.Generator().manual_seed(cfg.seed))
    local = index.clone().apply_(lambda r: row_of.get(r, -1) if r >= 0 else -1)
    return mem.to_memory_kv(local.to(mem.keys.device))


def train_step(model: Memory3, data: ChunkedData, rows: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    dev = model.tok_emb.weight.device
    memory = continual_memory(model, data, rows, cfg) if cfg.stage == "continual" else None
    out = model(data.tokens[rows].to(dev), targets=data.targets[rows].to(dev), memory=memory,
                target_logits_only=True)
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
def save_checkpoint(out_dir: str | os.PathLike, model: Memory3, optimizer, step: int, cfg: TrainConfig,
                    tokenizer: Tokenizer | None = None, extra: dict | None = None) -> Path:
    """Write `out_dir/step-<7-digit step>/` atomically and point `out_dir/latest` at it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"step-{step:07d}"
    tmp = out_dir / f".tmp-step-{step:07d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_weights(model, tmp / "model.safetensors")
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
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    state = {"format": "mini_m3.train_state", "version": TRAIN_STATE_VERSION, "step": step,
             "train_config": dataclasses.asdict(cfg), "param_groups": groups, **(extra or {})}
    atomic_write_text(tmp / "train_state.json", json.dumps(state, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(out_dir / "latest", final.name)
    old = sorted(p for p in out_dir.glob("step-*") if p.is_dir() and p != final)
    for p in old[:max(0, len(old) - (cfg.keep_checkpoints - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    out_dir = Path(out_dir)
    pointer = out_dir / "latest"
    if not pointer.exists():
        return None
    path = out_dir / pointer.read_text().strip()
    return path if (path / "train_state.json").exists() else None


def load_checkpoint(path: str | os.PathLike, model: Memory3, optimizer=None) -> dict:
    """Restore weights (and optimizer + RNG state if an optimizer is given); returns the train state dict.
    Refuses a checkpoint written for another model config."""
    path = Path(path)
    state_file = path / "train_state.json"
    if not state_file.exists():
        raise FileNotFoundError(f"{path} is not a training checkpoint (train_state.json missing)")
    state = json.loads(state_file.read_text())
    if state.get("format") != "mini_m3.train_state" or state.get("version") != TRAIN_STATE_VERSION:
        raise ValueError(f"{path}: unsupported checkpoint format {state.get('format')!r} v{state.get('version')}")
    ck_cfg = Memory3Config.from_json(path / "config.json")
    if ck_cfg.replace(name=model.cfg.name) != model.cfg:
        raise ValueError(f"checkpoint {path} was written for a different model config "
                         f"({ck_cfg.name}: {ck_cfg.to_dict()}) than this model ({model.cfg.name})")
    load_weights(model, path / "model.safetensors")
    if optimizer is not None:
        tensors = load_file(str(path / "optimizer.safetensors"))
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


# ----------------------------------------------------------------------------------------------- loop
def train(model: Memory3, data: ChunkedData, cfg: TrainConfig, *, out_dir: str | os.PathLike | None = None,
          tokenizer: Tokenizer | None = None, resume: bool = True, eval_data: ChunkedData | None = None,
          eval_fn: Callable[[Memory3, int], dict] | None = None, log_name: str | None = None) -> dict:
    """Run one stage for `cfg.steps` steps. With `out_dir`: JSONL log, checkpoints, and (resume=True)
    continuation from the latest checkpoint of this stage. Returns a summary with losses and step times."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.stage == "continual" and (data.chunk_refs < 0).all():
        raise ValueError("continual training needs retrieved references (data.chunk_refs is all -1)")
    torch.manual_seed(cfg.seed)
    model.train()
    opt = make_optimizer(model, cfg)
    start = 0
    out = Path(out_dir) if out_dir is not None else None
    log_path = out / (log_name or f"{cfg.stage}.jsonl") if out is not None else None
    ck = latest_checkpoint(out) if out is not None and resume else None
    if ck is not None and json.loads((ck / "train_state.json").read_text())["train_config"]["stage"] == cfg.stage:
        start = load_checkpoint(ck, model, opt)["step"]  # exact resume: weights, optimizer, RNG, data order
        model.train()
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        if start == 0 and log_path.exists():
            log_path.unlink()
        elif start > 0 and log_path.exists():  # drop log lines after the checkpoint we resume from
            lines = [l for l in log_path.read_text().splitlines() if l and json.loads(l).get("step", 0) < start]
            log_path.write_text("".join(l + "\n" for l in lines))
    losses, times = [], []
    bar = tqdm(range(start, cfg.steps), disable=cfg.quiet, desc=f"{cfg.stage}", unit="step", initial=start,
               total=cfg.steps)
    for step in bar:
        t0 = time.perf_counter()
        lr = wsd_lr(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        rows = batch_order(len(data), cfg.batch_size, step, cfg.seed)
        loss = train_step(model, data, rows, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        dt = time.perf_counter() - t0
        losses.append(loss.item())
        times.append(dt)
        record = {"step": step, "stage": cfg.stage, "loss": losses[-1], "lr": lr, "grad_norm": float(gnorm),
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
            save_checkpoint(out, model, opt, step + 1, cfg, tokenizer)
    model.eval()
    steady = times[min(len(times) - 1, 3):] if times else []
    return {"losses": losses, "final_loss": losses[-1] if losses else None, "steps_run": len(losses),
            "step_time": float(np.median(steady)) if steady else None}


def plot_losses(log_paths: Sequence[str | os.PathLike], out_png: str | os.PathLike, labels: Sequence[str] | None = None,
                title: str = "training loss") -> None:
    """Plot loss curves from JSONL logs (one curve per log, steps concatenated in order given)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, p in enumerate(log_paths):
        recs = [json.loads(l) for l in Path(p).read_text().splitlines() if l]
        ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], label=labels[i] if labels else Path(p).stem, lw=1)
    ax.set_xlabel("step"); ax.set_ylabel("loss"); ax.set_title(title); ax.legend(); ax.grid(alpha=.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":  # `torchrun --nproc_per_node=N -m mini_m3.train ...`: see mini_m3/distributed.py
    from mini_m3.distributed import main
    raise SystemExit(main())
