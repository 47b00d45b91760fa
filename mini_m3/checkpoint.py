"""§5 checkpoints: weights in safetensors, config and tokenizer in JSON — no pickles, atomic writes.

A model directory holds `config.json`, `model.safetensors` and (optionally) `tokenizer.json`. The weights file
also carries, in its metadata, the config and the tokenizer's fingerprint it was saved with, and
`load_pretrained` refuses a directory whose parts disagree (an edited or cut config, another tokenizer). The
directory is written as one unit: every part goes into a temporary sibling directory that is then swapped in
(an atomic exchange on Linux), so a kill at any point leaves the previous model or the new one, never a mix.
Weights holding NaN or inf are never written and never loaded.

Where and in what precision a model computes (`--device`, `--dtype`): `resolve_device` checks a device name is usable
here, `autocast_to` runs a block in bf16/fp16 under `torch.autocast` with the weights left in float32 (training,
bank building, the CLI), and `cast_parameters` turns the weights themselves into bf16/fp16 for inference.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import hashlib
import json
import os
import secrets
import shutil
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model as _st_load_model
from safetensors.torch import save_model as _st_save_model

from .config import MEMORY_FORMAT_FIELDS, Memory3Config
from .model import Memory3
from .tokenizer import Tokenizer
from .utils import atomic_path, remove_stale_temps

CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "config.json", "model.safetensors", "tokenizer.json"
MODEL_FILES = (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE)
# files a save replaces along with the model's: a reading run's settings beside its weights (reading.RUN_FILE;
# the demo writes it after each save, so a rerun into the same folder must be able to replace the directory)
COMPANION_FILES = ("reading_run.json",)
WEIGHTS_FORMAT = "mini_m3.weights"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # what --dtype accepts


# ----------------------------------------------------------------------------------------------- device, dtype
def resolve_device(name: str | torch.device) -> torch.device:
    """A device name ("cpu", "cuda", "cuda:N", "mps") that this machine can run on, as a torch.device; otherwise a
    ValueError in one line saying what is missing (callers put the flag or field in front of it)."""
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name!r} is not a device name (cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = (f"this PyTorch, {torch.__version__}, is built without CUDA" if torch.version.cuda is None
                   else "no CUDA GPU is visible")
            raise ValueError(f"cannot use {name!r}: CUDA is not available ({why}); use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"cannot use {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"cannot use {name!r}: the Apple MPS backend is not available here; use cpu")
    elif dev.type != "cpu":
        raise ValueError(f"cannot use {name!r}: mini_m3 runs on cpu, cuda or mps")
    return dev


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """"float32", "bfloat16" or "float16" (or that torch.dtype) as a torch.dtype; a ValueError otherwise."""
    if isinstance(name, torch.dtype) and name in DTYPES.values():
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {list(DTYPES)}")
    return DTYPES[name]


def autocast_to(device: str | torch.device, dtype: str | torch.dtype):
    """Context in which forward passes on `device` compute in `dtype`: `torch.autocast` (matmuls and attention in
    bf16/fp16; norms, softmax statistics and the loss in float32; the weights stay float32, so checkpoints, weight
    fingerprints and banks are the same whatever the dtype). float32: no context at all (an enclosing one stays)."""
    dt = resolve_dtype(dtype)
    if dt == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dt)


def cast_parameters(model: Memory3, dtype: str | torch.dtype) -> Memory3:
    """Cast the model's weights to `dtype` in place (inference in bf16/fp16 without autocast). The RoPE tables stay
    float32 (`model.to(dtype)` would round them: in bf16, positions past 256 lose their low bits). Memories read
    from a bank follow the model's dtype (`MemoryBank.get`). A bank opens only for the weights that wrote it, dtype
    included (`weights_fingerprint`): open a bank of the float32 weights before casting them. Call it outside
    `torch.inference_mode` (weights cast there become inference tensors, which the prefix cache cannot key on)."""
    dt = resolve_dtype(dtype)
    for p in model.parameters():
        p.data = p.data.to(dt)
    model._prefix_cache = None
    return model


def _refuse_nonfinite(model: Memory3, what: str) -> None:
    sd = model.state_dict()
    bad = [n for n, t in sd.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"{what}: {len(bad)} of {len(sd)} weight tensors hold NaN or inf ({', '.join(bad[:3])}"
                         f"{', ...' if len(bad) > 3 else ''}); the training that made them diverged")


def read_config(path: str | os.PathLike) -> Memory3Config:
    """A config.json, with errors that name the file."""
    try:
        return Memory3Config.from_json(Path(path))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def save_weights(model: Memory3, path: str | os.PathLike, *, tokenizer: Tokenizer | None = None) -> None:
    """Write the model's weights as safetensors, atomically (tied embeddings are stored once). The metadata
    records the config and, if given, the tokenizer's fingerprint. Non-finite weights are refused."""
    _refuse_nonfinite(model, f"refusing to write {path}")
    metadata = {"format": WEIGHTS_FORMAT, "config": model.cfg.to_json()}
    if tokenizer is not None:
        metadata["tokenizer_fingerprint"] = tokenizer.fingerprint()
    with atomic_path(path) as tmp:
        _st_save_model(model, tmp, metadata=metadata)


def weights_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a safetensors weights file (format, config, tokenizer fingerprint)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no weights file at {path}")
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None


def load_weights(model: Memory3, path: str | os.PathLike) -> Memory3:
    """Load safetensors weights into `model`, refusing files of another shape or with NaN/inf, with a clear error."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no weights file at {path}")
    try:
        missing, unexpected = _st_load_model(model, str(path), strict=False)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    except RuntimeError as e:  # size mismatch
        raise ValueError(f"weights in {path} do not fit this model's config: {e}") from None
    if missing or unexpected:
        raise ValueError(f"weights in {path} do not fit this model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    _refuse_nonfinite(model, f"refusing {path}")
    model._prefix_cache = None
    return model


# ----------------------------------------------------------------------------------------------- directories
def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` (or the files of a new directory) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where that is unavailable."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if sys.platform == "linux" else None
    if renameat2 is None:
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a filesystem without exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_in(tmp: Path, directory: Path) -> None:
    """Put the complete directory `tmp` at `directory`; afterwards `tmp` holds the previous one (if any)."""
    if not directory.exists():
        os.rename(tmp, directory)
    elif not _exchange(tmp, directory):
        # no atomic exchange here: move the old directory aside first. A kill between the two renames leaves
        # the previous model whole in the `.old` sibling, which load_pretrained's error names.
        aside = tmp.with_suffix(".old")
        os.rename(directory, aside)
        os.rename(tmp, directory)
        os.rename(aside, tmp)


def save_pretrained(model: Memory3, directory: str | os.PathLike, tokenizer: Tokenizer | None = None) -> Path:
    """Write a model directory as one unit (see the module docstring). An existing directory is replaced whole,
    so one that holds anything but a model's files is refused rather than overwritten."""
    directory = Path(directory)
    _refuse_nonfinite(model, f"refusing to save {directory}")
    if directory.exists():
        if not directory.is_dir():
            raise NotADirectoryError(f"{directory} exists and is not a directory")
        remove_stale_temps(directory)  # temporary files of per-file writes killed in an older save
        foreign = sorted(p.name for p in directory.iterdir() if p.name not in MODEL_FILES + COMPANION_FILES)
        if foreign:
            raise FileExistsError(f"{directory} holds files that are not part of a model directory "
                                  f"({', '.join(foreign[:5])}); save_pretrained replaces the whole directory, "
                                  f"so it will not overwrite this one: choose a new or empty directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    for stale in directory.parent.glob(f".{glob.escape(directory.name)}.*.tmp"):  # killed saves of this directory
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    tmp = directory.parent / f".{directory.name}.{secrets.token_hex(6)}.tmp"
    os.mkdir(tmp)  # mode 0o777 less the umask, as for any new directory
    try:
        save_weights(model, tmp / WEIGHTS_FILE, tokenizer=tokenizer)
        model.cfg.to_json(tmp / CONFIG_FILE)
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER_FILE)
        fsync_dir(tmp)
        _swap_in(tmp, directory)
        fsync_dir(directory.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after the swap: the previous model
    return directory


def _check_config_matches(weights: Path, config_file: Path, cfg: Memory3Config, metadata: dict) -> None:
    if "config" not in metadata:  # weights written by something other than save_weights
        return
    try:
        embedded = Memory3Config.from_json(metadata["config"])
    except ValueError as e:
        raise ValueError(f"{weights}: the config in its metadata is invalid: {e}") from None
    if embedded != cfg:
        a, b = embedded.to_dict(), cfg.to_dict()
        diff = [f"{k}={a[k]!r} in the weights, {b[k]!r} in {CONFIG_FILE}" for k in a if a[k] != b[k]]
        raise ValueError(f"the weights in {weights} do not fit {config_file}: {'; '.join(diff)} "
                         f"(an edited or cut {CONFIG_FILE}, or parts of two different saves?)")


def load_pretrained(directory: str | os.PathLike, *, map_location: str | torch.device = "cpu"
                    ) -> tuple[Memory3, Tokenizer | None]:
    """Model (in eval mode) and tokenizer (None if the directory has none) from `save_pretrained`, after
    checking that config.json, the weights and the tokenizer belong together."""
    directory = Path(directory)
    config_file, weights, tok_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE, directory / TOKENIZER_FILE
    if not config_file.exists():
        aside = sorted(directory.parent.glob(f".{glob.escape(directory.name)}.*.old")) if directory.name else []
        hint = f" (an interrupted save left the previous model in {aside[-1]})" if aside else ""
        raise FileNotFoundError(f"{directory} has no {CONFIG_FILE}; is it a mini_m3 model directory?{hint}")
    cfg = read_config(config_file)
    metadata = weights_metadata(weights)
    _check_config_matches(weights, config_file, cfg, metadata)
    model = load_weights(Memory3(cfg), weights).to(map_location).eval()
    want = metadata.get("tokenizer_fingerprint")
    if not tok_path.exists():
        if want:
            raise FileNotFoundError(f"{tok_path} is missing, but the weights in {weights} were saved with a "
                                    f"tokenizer (fingerprint {want[:12]}…)")
        return model, None
    tokenizer = Tokenizer.load(tok_path)
    if want and tokenizer.fingerprint() != want:
        raise ValueError(f"{tok_path} is not the tokenizer the weights in {weights} were saved with "
                         f"(fingerprint {tokenizer.fingerprint()[:12]}…, the weights record {want[:12]}…)")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {cfg.vocab_size}")
    return model, tokenizer


def weights_fingerprint(model: Memory3, layers: list[int] | None = None) -> str:
    """sha256 of the config and of the weights that explicit memories depend on: the embedding and the
    blocks up to the last memory layer (Remark 9: memories must be rebuilt when these change). The memory format
    (`MEMORY_FORMAT_FIELDS`: selector, tokens per head, memories per chunk) is left out: the same weights in another
    format (`Memory3.with_memory_format`) have the same fingerprint, and a bank checks its format on its own."""
    cfg = model.cfg
    if layers is None:
        layers = list(range(cfg.memory_layers[-1] + 1)) if cfg.memory_layers else []
    shape = {k: v for k, v in cfg.to_dict().items() if k not in MEMORY_FORMAT_FIELDS}
    h = hashlib.sha256(json.dumps(shape, sort_keys=True).encode())
    named = dict(model.named_parameters())
    keep = ["tok_emb.weight"] + sorted(n for n in named if any(n.startswith(f"blocks.{l}.") for l in layers))
    for name in keep:
        t = named[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
