"""§5 checkpoints: weights in safetensors, config and tokenizer in JSON — no pickles, atomic writes.

A model directory holds `config.json`, `model.safetensors` and (optionally) `tokenizer.json`. Every file is
written to a temporary name and renamed, so a crash leaves the previous checkpoint readable.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model as _st_load_model
from safetensors.torch import save_model as _st_save_model

from .config import Memory3Config
from .model import Memory3
from .tokenizer import Tokenizer
from .utils import atomic_path

CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "config.json", "model.safetensors", "tokenizer.json"


def save_weights(model: Memory3, path: str | os.PathLike) -> None:
    """Write the model's weights as safetensors, atomically (tied embeddings are stored once)."""
    with atomic_path(path) as tmp:
        _st_save_model(model, tmp, metadata={"format": "mini_m3.weights", "config": model.cfg.to_json()})


def load_weights(model: Memory3, path: str | os.PathLike) -> Memory3:
    """Load safetensors weights into `model`, refusing files of another shape with a clear error."""
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
    model._prefix_cache = None
    return model


def save_pretrained(model: Memory3, directory: str | os.PathLike, tokenizer: Tokenizer | None = None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_weights(model, directory / WEIGHTS_FILE)
    model.cfg.to_json(directory / CONFIG_FILE)
    if tokenizer is not None:
        tokenizer.save(directory / TOKENIZER_FILE)
    return directory


def load_pretrained(directory: str | os.PathLike, *, map_location: str | torch.device = "cpu"
                    ) -> tuple[Memory3, Tokenizer | None]:
    """Model (in eval mode) and tokenizer (None if the directory has none) from `save_pretrained`."""
    directory = Path(directory)
    if not (directory / CONFIG_FILE).exists():
        raise FileNotFoundError(f"{directory} has no {CONFIG_FILE}; is it a mini_m3 model directory?")
    cfg = Memory3Config.from_json(directory / CONFIG_FILE)
    model = load_weights(Memory3(cfg), directory / WEIGHTS_FILE).to(map_location).eval()
    tok_path = directory / TOKENIZER_FILE
    tokenizer = Tokenizer.load(tok_path) if tok_path.exists() else None
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {cfg.vocab_size}")
    return model, tokenizer


def weights_fingerprint(model: Memory3, layers: list[int] | None = None) -> str:
    """sha256 of the config and of the weights that explicit memories depend on: the embedding and the
    blocks up to the last memory layer (Remark 9: memories must be rebuilt when these change)."""
    cfg = model.cfg
    if layers is None:
        layers = list(range(cfg.memory_layers[-1] + 1)) if cfg.memory_layers else []
    h = hashlib.sha256(cfg.to_json().encode())
    named = dict(model.named_parameters())
    keep = ["tok_emb.weight"] + sorted(n for n in named if any(n.startswith(f"blocks.{l}.") for l in layers))
    for name in keep:
        t = named[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
