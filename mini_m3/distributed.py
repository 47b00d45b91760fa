"""§5 pretraining at scale: the two stages of §3.6 on many processes (FSDP2), with distributed checkpoints.

The library behind `mini-m3 train` under torchrun (the command is in cli.py):

    torchrun --nproc_per_node=N -m mini_m3 train --world 2000 --preset small --out runs/dist
    torchrun --nproc_per_node=N -m mini_m3 train --data DIR --preset paper-2.4b --meta-init --bf16 ...

With WORLD_SIZE > 1 the command
- starts a process group (gloo on CPU, NCCL on GPU) and shards the model with FSDP2 `fully_shard`: every
  transformer block is one unit, then the root (embedding, final norm, LM head); optional
  `MixedPrecisionPolicy` (bf16 parameters for compute, fp32 master weights and gradient reduction; off on CPU
  by default);
- gives each rank a disjoint slice of every global batch (`batch_order` of the single-process loop), and weights
  each rank's loss by its share of the batch's target tokens, so the averaged gradient is the gradient of the
  single-process loss: the global batch, the loss curve and the update are those of one process (up to float
  summation order);
- in the continual stage, encodes each rank's references live through `Memory3.encode_reference_layers`,
  registered as an FSDP forward method. A rank whose slice reads no reference (while others do) encodes one
  dummy reference and masks it out, so every rank runs the same sequence of FSDP collectives;
- checkpoints with `torch.distributed.checkpoint` (DCP): weights and AdamW state, each rank writing its own
  shards, plus JSON for the step, the configs and the optimizer's hyperparameters and one small safetensors
  file of RNG state per rank. The layout mirrors `train.save_checkpoint`: `step-0000100/`, a `latest` pointer,
  written under a temporary name, verified against its manifest and renamed. Resume is exact (the data order is a
  function of the step) and checked as in `train.train` (same run config, data and tokenizer).
  Loading is tensors-only: DCP's `.metadata` pickle is read with an allow-list unpickler and any non-tensor
  item is refused, so a checkpoint cannot run code (our rule: no pickles).

With WORLD_SIZE = 1 the same command runs the single-process loop `mini_m3.train.train` unchanged.
At the end the full model is gathered and written as an ordinary model directory (`OUT/model`,
`checkpoint.load_pretrained` reads it, `gather_and_save`); `export_model` does the same for any DCP checkpoint,
at any world size. `save_chunked_data` / `load_chunked_data` hold the training data every rank reads, and
`prepare_world_data` writes the knowledge world's (`train --world N`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import pickle
import shutil
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .checkpoint import read_config, save_pretrained
from .config import Memory3Config
from .model import Memory3, rope_tables
from .tokenizer import Tokenizer
from .train import (ChunkedData, TrainConfig, batch_order, check_finite_step, checkpoint_to_resume, continual_memory,
                    data_fingerprint, file_manifest, make_optimizer, memory_index, prepare_log, publish_checkpoint,
                    read_train_state, verify_checkpoint, wsd_lr)
from .utils import atomic_path, atomic_write_text
from .world_data import WorldSettings, build_world_data, setup_world

DIST_STATE_FORMAT = "mini_m3.dist_train_state"
DIST_STATE_VERSION = 2  # 2: file manifest, data and tokenizer fingerprints
DATA_FORMAT = "mini_m3.chunked_data"


# ----------------------------------------------------------------------------------------------- process group
def world_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the torchrun environment (0, 1, 0 when not launched by torchrun)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(device: str | None = None) -> torch.device:
    """Start the default process group (NCCL for CUDA, gloo for CPU) and return this rank's device."""
    rank, world, local = world_info()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device, local) if device == "cuda" else torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    return dev


def barrier() -> None:
    """Wait for every rank (a no-op in one process)."""
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------------------------- model
def restore_buffers(model: Memory3) -> Memory3:
    """Recompute the non-persistent buffers (RoPE tables, prefix ids) and re-tie the LM head to the embedding:
    both are lost by `to_empty` from the meta device."""
    cfg = model.cfg
    if cfg.tie_embeddings and model.lm_head.weight is not model.tok_emb.weight:
        model.lm_head.weight = model.tok_emb.weight
    cos, sin = rope_tables(cfg.head_dim, cfg.max_position, cfg.rope_base)
    dev = model.rope_cos.device
    model.rope_cos = cos.to(dev)
    model.rope_sin = sin.to(dev)
    model.prefix_ids = torch.tensor(cfg.reference_prefix_ids, dtype=torch.long, device=dev)
    model._prefix_cache = None
    return model


@torch.no_grad()
def init_parameters_(model: Memory3, seed: int) -> None:
    """`Memory3.reset_parameters(seed)` for a model whose parameters may be FSDP-sharded DTensors: each full
    tensor is drawn on the CPU from the same generator stream, and each rank keeps its shard. The result equals
    the single-process initialisation with that seed, whatever the world size (one tensor at a time in RAM)."""
    gen = torch.Generator().manual_seed(seed)
    std = model.cfg.init_std
    for name, p in model.named_parameters():
        if p.dim() == 1:
            full = torch.ones(p.shape)
        else:
            s = std / math.sqrt(2 * model.cfg.n_layers) if name.endswith(("wo.weight", "w_down.weight")) else std
            full = torch.randn(p.shape, generator=gen) * s
        if hasattr(p, "device_mesh"):  # DTensor: keep this rank's shard
            from torch.distributed.tensor import distribute_tensor
            local = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
            p.to_local().copy_(local)
        else:
            p.copy_(full)
    model._prefix_cache = None


def build_model(cfg: Memory3Config, seed: int, *, meta: bool = False) -> Memory3:
    """A model initialised by `reset_parameters(seed)` (its own generator, so the weights depend on the seed
    alone); meta=True allocates nothing, and `shard_model` draws the same weights shard by shard."""
    if meta:
        with torch.device("meta"):
            return Memory3(cfg)
    model = Memory3(cfg)
    model.reset_parameters(seed)
    return model


def shard_model(model: Memory3, device: torch.device, *, bf16: bool = False, seed: int | None = None) -> Memory3:
    """FSDP2: `fully_shard` every block, then the root; `encode_reference_layers` becomes an FSDP forward
    method (it is called outside `forward` in the continual stage). A meta-device model is materialised on
    `device` after sharding and initialised with `init_parameters_(seed)`."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    _, world, _ = world_info()
    mesh = init_device_mesh(device.type, (world,))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
          if bf16 else MixedPrecisionPolicy())
    meta = any(p.is_meta for p in model.parameters())
    # blocks return (x, (k, v)) with k, v transposed views; nothing writes into them in place, so FSDP2's
    # generic warning about in-place ops on views does not apply here
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    register_fsdp_forward_method(model, "encode_reference_layers")
    if meta:
        model.to_empty(device=device)
        restore_buffers(model)
        init_parameters_(model, 0 if seed is None else seed)
    return model


# ----------------------------------------------------------------------------------------------- one step
def rank_rows(rows: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's contiguous slice of a global batch (slices are disjoint and cover the batch)."""
    return rows.tensor_split(world)[rank]


def _rank_memory(model: Memory3, data: ChunkedData, rows: torch.Tensor, cfg: TrainConfig, global_rows: torch.Tensor):
    """Memory for this rank's rows; None when no row of the *global* batch reads a reference (then every rank
    skips encoding, as the single process would). A rank that reads nothing while others do encodes reference
    0 and masks it out: same computation as no memory, same FSDP collectives as the other ranks."""
    n = model.cfg.memories_per_chunk
    if not (memory_index(data.chunk_refs[global_rows], n) >= 0).any():
        return None
    mem = continual_memory(model, data, rows, cfg)
    if mem is not None:
        return mem
    dummy = ChunkedData(data.tokens[rows], data.targets[rows],
                        torch.full_like(data.chunk_refs[rows], -1), data.references)
    dummy.chunk_refs[0, 0] = 0
    mem = continual_memory(model, dummy, torch.arange(len(rows)), cfg)
    mem.mask = torch.zeros_like(mem.full_mask())  # read nothing
    return mem


def micro_batches(rows: torch.Tensor, rank: int, world: int, micro_batch: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split a global batch into (this rank's rows, all ranks' rows) per micro-batch (gradient accumulation).
    Every rank gets the same number of micro-batches, as FSDP's collectives require."""
    slices = [rank_rows(rows, r, world) for r in range(world)]
    if not micro_batch:
        return [(slices[rank], rows)]
    if len(rows) % (world * micro_batch):
        raise ValueError(f"batch_size={len(rows)} must be a multiple of world size x micro batch = "
                         f"{world} x {micro_batch}")
    m = micro_batch
    return [(slices[rank][j:j + m], torch.cat([s[j:j + m] for s in slices])) for j in range(0, len(slices[0]), m)]


def _local_loss(model: Memory3, data: ChunkedData, rows: torch.Tensor, micro_rows: torch.Tensor,
                batch_rows: torch.Tensor, cfg: TrainConfig, world: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to backpropagate, this rank's summed token loss) for `rows`, one rank's part of the micro-batch
    `micro_rows` of the global batch `batch_rows`. The first is scaled so that FSDP's gradient average over
    ranks, summed over micro-batches, equals the gradient of the global-batch mean loss."""
    memory = _rank_memory(model, data, rows, cfg, micro_rows) if cfg.stage == "continual" else None
    targets = data.targets[rows].to(device)
    out = model(data.tokens[rows].to(device), targets=targets, memory=memory)
    n_local = int((targets != -100).sum())
    n_global = int((data.targets[batch_rows] != -100).sum())
    if n_local == 0:  # keep the graph (and so the collectives) of the other ranks
        zero = out.logits.float().sum() * 0.0
        return zero, zero.detach()
    summed = out.loss * n_local
    return summed * (world / max(n_global, 1)), summed.detach()


def _clip_grad_norm_(params: Sequence[torch.nn.Parameter], max_norm: float) -> float:
    """Global gradient norm over all shards (one all-reduce) and clipping, as `clip_grad_norm_` does."""
    grads = [p.grad for p in params if p.grad is not None]
    local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
    sq = torch.stack([g.float().pow(2).sum() for g in local]).sum() if local else torch.zeros(())
    if dist.is_initialized():
        sq = sq.to(local[0].device if local else "cpu")
        dist.all_reduce(sq)
    norm = float(sq.sqrt())
    coef = min(1.0, max_norm / (norm + 1e-6))
    for g in local:
        g.mul_(coef)
    return norm


# ----------------------------------------------------------------------------------------------- checkpoints
class _SafeUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata only, by an allow-list of exact (module, name) pairs: the dataclasses of
    torch.distributed.checkpoint that a tensors-only checkpoint's metadata holds, torch.Size, dtypes, the layout
    lookup, paths and plain containers. Everything else is refused, and so is any dotted name: pickle protocol 4
    resolves `("allowed.module", "os.system")` attribute by attribute, so a prefix rule would let through any
    object reachable from an allowed module (os.system, pickle.loads, ...)."""

    _DCP = "torch.distributed.checkpoint.metadata"
    _ALLOWED = frozenset({
        (_DCP, "Metadata"), (_DCP, "MetadataIndex"), (_DCP, "StorageMeta"), (_DCP, "TensorProperties"),
        (_DCP, "TensorStorageMetadata"), (_DCP, "ChunkStorageMetadata"), (_DCP, "_MEM_FORMAT_ENCODING"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.serialization", "_get_layout"),  # a dict lookup of torch.layout objects by their string name
        ("torch", "Size"),
        *(("torch", dt) for dt in ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16",
                                   "int8", "uint8", "bool")),
        ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
        ("pathlib", "PureWindowsPath"),
        ("collections", "OrderedDict"),
        *(("builtins", b) for b in ("set", "frozenset", "tuple", "list", "dict", "int", "float", "str", "bytes")),
    })

    def find_class(self, module: str, name: str):
        if "." not in name and (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint's metadata "
                                     f"(only the exact classes of DCP tensor metadata are allowed)")


def _safe_reader(path: Path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            rank = kwargs.get("rank")
            meta_path = self._get_metadata_path(rank)
            try:
                with open(meta_path, "rb") as f:
                    metadata = _SafeUnpickler(f).load()
            except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError,
                    IndexError, OSError) as e:
                raise ValueError(f"{meta_path}: not a readable mini_m3 checkpoint metadata file: {e}") from None
            if type(metadata) is not Metadata or not isinstance(metadata.state_dict_metadata, dict):
                raise ValueError(f"{meta_path}: holds a {type(metadata).__name__}, not DCP checkpoint metadata")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def _tensor_only_planner():
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class TensorOnly(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            raise ValueError(f"checkpoint item {read_item.dest_index.fqn!r} is a pickled object; mini_m3 "
                             f"checkpoints hold tensors only and refuse to unpickle anything else")

    return TensorOnly()


def _dcp_load(state: dict, path: Path) -> None:
    """dcp.load with the safe reader and the tensors-only planner; DCP's CheckpointException (a BaseException
    that every rank raises) becomes a ValueError naming the checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    try:
        dcp.load(state, storage_reader=_safe_reader(path), planner=_tensor_only_planner())
    except CheckpointException as e:
        raise ValueError(f"cannot load the distributed checkpoint {path}: {e}") from None


def _state_for_dcp(model: Memory3, opt) -> tuple[dict, list]:
    """{"model": weights, "optim": AdamW state per parameter name} (tensors only) and the param groups."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    osd = get_optimizer_state_dict(model, opt)
    return {"model": get_model_state_dict(model), "optim": osd["state"]}, osd["param_groups"]


def _json_groups(groups: list) -> list:
    return [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in groups]


def save_dist_checkpoint(out_dir: str | os.PathLike, model: Memory3, opt, step: int, cfg: TrainConfig,
                         tokenizer: Tokenizer | None = None, extra: dict | None = None) -> Path:
    """Collective: every rank writes its shards to `out_dir/.tmp-step-N/`; rank 0 adds JSON (with a manifest of
    every file), verifies it and renames it to `step-N/`, then points `latest` at it and prunes old checkpoints
    (keep `cfg.keep_checkpoints`), as `train.save_checkpoint` does."""
    import torch.distributed.checkpoint as dcp
    rank, world, _ = world_info()
    out = Path(out_dir)
    final, tmp = out / f"step-{step:07d}", out / f".tmp-step-{step:07d}"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    state, groups = _state_for_dcp(model, opt)
    dcp.save(state, checkpoint_id=str(tmp))
    with atomic_path(tmp / f"rng-rank{rank:05d}.safetensors") as f:
        save_file({"torch": torch.get_rng_state()}, f)
    barrier()
    error = None
    if rank == 0:
        try:
            model.cfg.to_json(tmp / "config.json")
            if tokenizer is not None:
                tokenizer.save(tmp / "tokenizer.json")
            meta = {"format": DIST_STATE_FORMAT, "version": DIST_STATE_VERSION, "step": step, "world_size": world,
                    "train_config": dataclasses.asdict(cfg), "param_groups": _json_groups(groups),
                    "tokenizer_fingerprint": tokenizer.fingerprint() if tokenizer is not None else None,
                    **(extra or {}), "files": file_manifest(tmp)}
            atomic_write_text(tmp / "train_state.json", json.dumps(meta, indent=1))
            publish_checkpoint(tmp, final, cfg.keep_checkpoints)
        except (OSError, ValueError) as e:  # every rank must hear of it, or the others wait forever
            error = e
    failed = torch.tensor([float(error is not None)], device=model.rope_cos.device)
    if dist.is_initialized():
        dist.all_reduce(failed)
    if error is not None:
        raise error
    if float(failed):
        raise ValueError(f"rank 0 could not write the checkpoint {final} (its error says why)")
    return final


def _read_state(path: Path) -> dict:
    state = read_train_state(path)
    if state["format"] != DIST_STATE_FORMAT:
        raise ValueError(f"{path}: not a mini_m3 distributed checkpoint (format {state.get('format')!r} "
                         f"v{state.get('version')})")
    return state


def load_dist_checkpoint(path: str | os.PathLike, model: Memory3, opt) -> dict:
    """Collective: restore weights, AdamW state, param groups and this rank's RNG; returns train_state.json.
    DCP reshards on load, so the world size may differ from the one that saved (the RNG of a new rank is then
    rank 0's). Every file but `.metadata` is checked against the manifest first (`.metadata`, whatever it holds,
    is only ever read by the allow-list unpickler)."""
    from torch.distributed.checkpoint.state_dict import set_state_dict
    path = Path(path)
    state = _read_state(path)
    verify_checkpoint(path, state, skip=(".metadata",))
    ck_cfg = read_config(path / "config.json")
    if ck_cfg.replace(name=model.cfg.name) != model.cfg:
        raise ValueError(f"checkpoint {path} was written for a different model config ({ck_cfg.name}) than "
                         f"this model ({model.cfg.name})")
    sd, _ = _state_for_dcp(model, opt)
    _dcp_load(sd, path)
    groups = [{k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()}
              for g in state["param_groups"]]
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict={"state": sd["optim"],
                                                                               "param_groups": groups})
    rank, _, _ = world_info()
    rng = path / f"rng-rank{rank:05d}.safetensors"
    rng = rng if rng.exists() else path / "rng-rank00000.safetensors"
    try:
        torch.set_rng_state(load_file(str(rng))["torch"])
    except (SafetensorError, OSError, KeyError) as e:
        raise ValueError(f"{rng} is not a readable RNG state file (truncated or corrupt?): {e}") from None
    model._prefix_cache = None
    return state


def export_model(checkpoint: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """A DCP checkpoint (any world size) -> an ordinary model directory (`checkpoint.load_pretrained`), in one
    process without a process group: DCP gathers the shards into full tensors."""
    checkpoint = Path(checkpoint)
    _read_state(checkpoint)
    cfg = Memory3Config.from_json(checkpoint / "config.json")
    with torch.device("meta"):
        model = Memory3(cfg)
    model = restore_buffers(model.to_empty(device="cpu"))
    sd = {"model": {k: v for k, v in model.state_dict().items()}}
    with warnings.catch_warnings():  # "no process group: loading in a single process" is the intent here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        _dcp_load(sd, checkpoint)
    model.load_state_dict(sd["model"])
    tok = checkpoint / "tokenizer.json"
    return save_pretrained(model.eval(), out_dir, Tokenizer.load(tok) if tok.exists() else None)


def gather_and_save(model: Memory3, out_dir: Path, tokenizer: Tokenizer | None) -> None:
    """Collective: full weights to rank 0's CPU, written as a model directory."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if world_info()[0] == 0:
        with torch.device("meta"):
            full = Memory3(model.cfg)
        full = restore_buffers(full.to_empty(device="cpu"))
        full.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
        save_pretrained(full.eval(), out_dir, tokenizer)
    barrier()


# ----------------------------------------------------------------------------------------------- the loop
def train_distributed(model: Memory3, data: ChunkedData, cfg: TrainConfig, *, out_dir: str | os.PathLike | None = None,
                      tokenizer: Tokenizer | None = None, resume: bool = True, stop_at: int | None = None,
                      micro_batch: int | None = None, log_name: str | None = None) -> dict:
    """`mini_m3.train.train` for an FSDP-sharded model (call `shard_model` first), one process per rank.
    Same global batches, schedule, clipping, log lines and summary. `micro_batch=m`: each rank runs its slice
    m sequences at a time and accumulates gradients (same update, less activation memory). `stop_at=k` ends
    the run after step k-1 as if the job were killed there (only the periodic checkpoints exist)."""
    rank, world, _ = world_info()
    if cfg.batch_size < world:
        raise ValueError(f"batch_size={cfg.batch_size} is smaller than the world size {world}: every rank needs rows")
    if cfg.stage == "continual" and (data.chunk_refs < 0).all():
        raise ValueError("continual training needs retrieved references (data.chunk_refs is all -1)")
    if cfg.format_mix:
        raise ValueError(f"format_mix={cfg.format_mix}: format mixing is a one-process lever (mini_m3.train.train)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = model.rope_cos.device
    model.train()
    opt = make_optimizer(model, cfg)
    params = list(model.parameters())
    out = Path(out_dir) if out_dir is not None else None
    log_path = out / (log_name or f"{cfg.stage}.jsonl") if out is not None else None
    start = 0
    data_fp = data_fingerprint(data) if out is not None else None
    ck = checkpoint_to_resume(out, cfg, data_fp, tokenizer, resume)
    if ck is not None:
        start = load_dist_checkpoint(ck, model, opt)["step"]
        model.train()
    if log_path is not None and rank == 0:
        prepare_log(log_path, start)
    barrier()
    end = cfg.steps if stop_at is None else min(cfg.steps, stop_at)
    losses, times = [], []
    for step in range(start, end):
        t0 = time.perf_counter()
        lr = wsd_lr(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        rows = batch_order(len(data), cfg.batch_size, step, cfg.seed, cfg.memory_groups)
        opt.zero_grad(set_to_none=True)
        summed = torch.zeros((), dtype=torch.float64)
        for mine, micro_rows in micro_batches(rows, rank, world, micro_batch):
            model._prefix_cache = None
            loss, part = _local_loss(model, data, mine, micro_rows, rows, cfg, world, device)
            loss.backward()
            summed += float(part)
        gnorm = _clip_grad_norm_(params, cfg.grad_clip)
        check_finite_step(cfg.stage, step, lr, grad_norm=gnorm)  # the global norm: every rank stops together
        opt.step()
        total = summed.reshape(1).to(device)
        dist.all_reduce(total)
        n_tok = int((data.targets[rows] != -100).sum())
        dt = time.perf_counter() - t0
        losses.append(float(total) / max(n_tok, 1))
        check_finite_step(cfg.stage, step, lr, loss=losses[-1])
        times.append(dt)
        if rank == 0:
            if not cfg.quiet and step % cfg.log_every == 0:
                print(f"{cfg.stage} step {step}: loss {losses[-1]:.4f} lr {lr:.2e} {dt:.2f}s", flush=True)
            if log_path is not None:
                rec = {"step": step, "stage": cfg.stage, "loss": losses[-1], "lr": lr, "grad_norm": gnorm,
                       "step_time": dt, "tokens": n_tok, "world_size": world}
                with open(log_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
        if out is not None and cfg.checkpoint_every and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
            save_dist_checkpoint(out, model, opt, step + 1, cfg, tokenizer, extra={"data_fingerprint": data_fp})
    model.eval()
    steady = times[min(len(times) - 1, 3):] if times else []
    return {"losses": losses, "final_loss": losses[-1] if losses else None, "steps_run": len(losses),
            "step_time": float(np.median(steady)) if steady else None}


# ----------------------------------------------------------------------------------------------- data on disk
def save_chunked_data(data: ChunkedData, directory: str | os.PathLike, tokenizer: Tokenizer | None = None) -> Path:
    """Training data as safetensors (+ tokenizer), so every rank reads the same arrays instead of rebuilding them."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    lens = torch.tensor([len(r) for r in data.references], dtype=torch.long)
    flat = torch.tensor([t for r in data.references for t in r], dtype=torch.long)
    from .utils import atomic_path
    with atomic_path(d / "data.safetensors") as tmp:
        # the targets may share the tokens' storage (shifted by one, `train --text-dir`): safetensors refuses that
        save_file({"tokens": data.tokens.contiguous(), "targets": data.targets.clone(),
                   "chunk_refs": data.chunk_refs.contiguous(), "reference_lengths": lens, "reference_tokens": flat},
                  tmp, metadata={"format": DATA_FORMAT})
    if tokenizer is not None:
        tokenizer.save(d / "tokenizer.json")
    return d


def load_chunked_data(directory: str | os.PathLike) -> tuple[ChunkedData, Tokenizer | None]:
    d = Path(directory)
    t = load_file(str(d / "data.safetensors"))
    offsets = np.concatenate([[0], np.cumsum(t["reference_lengths"].numpy())])
    flat = t["reference_tokens"].tolist()
    refs = [flat[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
    tok = Tokenizer.load(d / "tokenizer.json") if (d / "tokenizer.json").exists() else None
    return ChunkedData(t["tokens"], t["targets"], t["chunk_refs"], refs), tok


def prepare_world_data(directory: str | os.PathLike, n_people: int, *, preset: str, chunks_per_sequence: int,
                       vocab_size: int, seed: int, progress: bool, chunk_length: int | None = None) -> Path:
    """The demo's synthetic knowledge world as training data (tokenizer, documents, retrieved references), in
    chunks of `chunk_length` tokens (None: the preset's)."""
    s = WorldSettings(seed=seed, preset=preset, n_people=n_people, vocab_size=vocab_size, n_docs=12 * n_people,
                      chunks_per_sequence=chunks_per_sequence)
    w = setup_world(s)
    data = build_world_data(w.world, w.tokenizer, s, chunk_length or w.cfg.chunk_length, w.retriever,
                            w.reference_tokens, progress)
    return save_chunked_data(data, directory, w.tokenizer)
