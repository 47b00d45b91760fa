"""§3.4 storing explicit memory: `MemoryBank`, a directory of memory-mapped memories with a RAM LRU cache.

Layout of a bank directory:

    manifest.json                 format/version, model fingerprint (Remark 9), tokenizer hash, memory format
                                  (selector, tokens per head), storage (raw dtype or VQ codes), counts, and the
                                  size and sha256 of every file
    shard-00000.keys.npy          (n, L_mem, H_mem, k, d_h) raw keys   (or shard-00000.codes.npy: (n, 2, L_mem,
    shard-00000.values.npy        (n, L_mem, H_mem, k, d_h) raw values      H_mem, k, code_size) uint8 VQ codes)
    shard-00000.positions.npy     (n, L_mem, H_mem, k) int16, -1 = empty slot
    shard-00000.ids.npy           (n,) reference ids held by the shard
    quantizer-g<gen>.bin          the trained quantizer (VQ banks): a codebook per (key/value, layer, head), or one
    texts-<gen>.jsonl             reference texts, one JSON object per line
    retriever-<gen>/              the retrieval index over those texts

Writers (`build`, `append`, `flush`) hold an exclusive `flock` on the bank directory for the whole write, so two
processes writing one bank take turns; a writer first reads in what other processes committed since it opened
the bank, and deletes the temporary files of writers that were killed. Every file is written under a new name
and `manifest.json` is replaced last, so a process killed mid-build or mid-append leaves the previous bank
readable; a write that fails leaves the `MemoryBank` object as it was. `open` refuses a manifest that is not
what `build` writes (fields, types, allowed values, file names inside the bank), checks every file against its
size and sha256 before numpy or faiss parses it (shards, memory-mapped and read row by row, only by size above
512 MB), and checks that manifest, texts, retrieval index and shards agree on the references and their shapes.
The memory format is the model's (`Memory3Config.memory_selector` / `memory_tokens_per_head`): `build` writes it
and `open` refuses a model whose config says another format (`Memory3.with_memory_format` gives the same weights
under another format, for ablations). "Warm start" (`build`) encodes everything up front; "cold start"
(`build(..., encode=False)`) stores only texts and index, encodes a reference the first time `get` asks for it, and
`flush()` writes those to disk. Memories are encoded on the model's device and kept on the host (files, RAM cache);
`get` hands them over on the model's device and in its dtype.
`build(..., memories=...)` stores memories computed elsewhere, one shard per batch. Shards are memory-mapped
with read-ahead off (`MADV_RANDOM`), since `get` reads scattered rows (experiments/bench_bank_scale.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import mmap
import os
import re
import shutil
import time
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from ..checkpoint import weights_fingerprint
from ..config import parse_json
from ..utils import atomic_path, atomic_write_text, remove_stale_temps, sha256_file
from ..model import Memory3
from .encode import SELECTORS, ExplicitMemory, encode_references
from .quantize import GroupedQuantizer, VectorQuantizer, default_factory, load_quantizer
from .retrieve import _FILES as RETRIEVER_FILES
from .retrieve import Retriever

BANK_FORMAT = "mini_m3.memory_bank"
BANK_FORMAT_VERSION = 4  # 2: references tokenized with the space after "Reference:"; 3: every file checksummed;
# 4: the memory format is the model's, checked at build and open (and left out of the model fingerprint)
STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}  # bf16 kept as raw bits
VERIFY_MODES = ("auto", "full", "size", "none")
FULL_VERIFY_BYTES = 512 * 2 ** 20  # verify="auto" checks shards by sha256 below this many bytes of shards


def _file_meta(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _save_npy(path: Path, array: np.ndarray) -> dict:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(array))
    return _file_meta(path)


def _to_storage(t: torch.Tensor, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return t.detach().to(torch.bfloat16).cpu().view(torch.int16).numpy().view(np.uint16)
    return t.detach().float().cpu().numpy().astype(STORAGE_DTYPES[dtype])


def _from_storage(a: np.ndarray, dtype: str) -> torch.Tensor:
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(np.asarray(a, dtype=np.float32))


def _encode_kv(q, kv: np.ndarray) -> np.ndarray:
    """Memory K/V stacked as (N, 2, L_mem, H_mem, k, d) -> codes (N, 2, L_mem, H_mem, k, code_size).
    A GroupedQuantizer's groups are the flattened (2, L_mem, H_mem) axes."""
    if isinstance(q, GroupedQuantizer):
        N, _, L, H, S, d = kv.shape
        x = kv.reshape(N, 2 * L * H, S, d).transpose(0, 2, 1, 3).reshape(N * S, 2 * L * H, d)
        return q.encode(x).reshape(N, S, 2 * L * H, -1).transpose(0, 2, 1, 3).reshape(N, 2, L, H, S, -1)
    return q.encode(kv.reshape(-1, kv.shape[-1])).reshape(*kv.shape[:-1], -1)


def _decode_kv(q, codes: np.ndarray) -> np.ndarray:
    """The inverse of `_encode_kv`: codes (N, 2, L_mem, H_mem, k, c) -> float32 (N, 2, L_mem, H_mem, k, d)."""
    if isinstance(q, GroupedQuantizer):
        N, _, L, H, S, c = codes.shape
        x = codes.reshape(N, 2 * L * H, S, c).transpose(0, 2, 1, 3).reshape(N * S, 2 * L * H, c)
        return q.decode(x).reshape(N, S, 2 * L * H, -1).transpose(0, 2, 1, 3).reshape(N, 2, L, H, S, -1)
    return q.decode(codes.reshape(-1, codes.shape[-1])).reshape(*codes.shape[:-1], -1)


def _advise_random(arr: np.ndarray) -> None:
    """madvise(MADV_RANDOM) on a memory-mapped array. Without it every page fault reads ahead (128 KiB by default)
    around a row of a few KiB; at 10^6 references that made a cold `get` of 160 memories 12x slower
    (experiments/bench_bank_scale.py). No-op where the platform or numpy does not expose it."""
    m = getattr(arr, "_mmap", None)
    if m is not None and hasattr(m, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        try:
            m.madvise(mmap.MADV_RANDOM)
        except OSError:
            pass


class BankError(ValueError):
    """A bank that cannot be used as it is: wrong model, damaged file, unsupported version."""


class _Locations:
    """Reference id -> (shard, row) in two numpy arrays: 8 bytes per reference, filled from each shard's ids
    array without a Python loop, so opening a bank of millions of references does not build millions of
    Python tuples. Unlocated ids (cold start) hold shard -1."""

    def __init__(self) -> None:
        self.shard = np.full(0, -1, dtype=np.int32)
        self.row = np.zeros(0, dtype=np.int32)
        self.n = 0

    def set(self, ids, shard: int) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return
        need = int(ids.max()) + 1
        if need > len(self.shard):
            size = max(need, 2 * len(self.shard))
            self.shard = np.concatenate([self.shard, np.full(size - len(self.shard), -1, dtype=np.int32)])
            self.row = np.concatenate([self.row, np.zeros(size - len(self.row), dtype=np.int32)])
        self.n += int((self.shard[np.unique(ids)] < 0).sum())
        self.shard[ids] = shard
        self.row[ids] = np.arange(len(ids), dtype=np.int32)

    def __contains__(self, i: int) -> bool:
        return 0 <= i < len(self.shard) and self.shard[i] >= 0

    def __getitem__(self, i: int) -> tuple[int, int]:
        return int(self.shard[i]), int(self.row[i])

    def __len__(self) -> int:
        return self.n


@contextlib.contextmanager
def _write_lock(path: Path) -> Iterator[None]:
    """An exclusive `flock` on the bank directory itself (no lock file to leave behind or to mistake for bank
    content), held until the block ends or the process dies: a second writer waits for the first to commit."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


# ---------------------------------------------------------------------------------------- the manifest, checked
_HEX64 = re.compile(r"[0-9a-f]{64}")
_NAMES = {"texts_file": re.compile(r"texts-\d{5,}\.jsonl"), "retriever_dir": re.compile(r"retriever-\d{5,}"),
          "quantizer": re.compile(r"quantizer-g\d{5,}\.bin"), "shard": re.compile(r"shard-\d{5,}-g\d{5,}")}
_SHARD_KINDS = {"raw": {"keys", "values", "positions", "ids"}, "vq": {"codes", "positions", "ids"}}


def _is_int(v, low: int | None = None) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and (low is None or v >= low)


def _is_name(v, kind: str) -> bool:
    """One of the names `build` gives files: no path separator, no "..", so it stays inside the bank."""
    return isinstance(v, str) and _NAMES[kind].fullmatch(v) is not None


def _is_meta(v) -> bool:
    return (isinstance(v, dict) and _is_int(v.get("bytes"), 0) and isinstance(v.get("sha256"), str)
            and _HEX64.fullmatch(v["sha256"]) is not None)


def _is_shard(v) -> bool:
    return (isinstance(v, dict) and _is_name(v.get("name"), "shard") and _is_int(v.get("n"), 1)
            and isinstance(v.get("files"), dict) and all(map(_is_meta, v["files"].values())))


_FIELDS = {  # field: (test, what it must be)
    "generation": (lambda v: _is_int(v, 0), "an integer >= 0"),
    "model_fingerprint": (lambda v: isinstance(v, str), "a string"),
    "config": (lambda v: isinstance(v, dict), "an object"),
    "tokenizer_fingerprint": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "selector": (lambda v: v in SELECTORS, f"one of {list(SELECTORS)}"),
    "tokens_per_head": (lambda v: _is_int(v, 1), "an integer >= 1"),
    "storage": (lambda v: v in ("raw", "vq"), "'raw' or 'vq'"),
    "dtype": (lambda v: v in STORAGE_DTYPES, f"one of {sorted(STORAGE_DTYPES)}"),
    "seed": (_is_int, "an integer"),
    "n_references": (lambda v: _is_int(v, 1), "an integer >= 1"),
    "texts_file": (lambda v: _is_name(v, "texts_file"), "a file name texts-<generation>.jsonl"),
    "texts_bytes": (lambda v: _is_int(v, 0), "an integer >= 0"),
    "texts_sha256": (lambda v: isinstance(v, str) and _HEX64.fullmatch(v) is not None, "64 hex digits"),
    "retriever_dir": (lambda v: _is_name(v, "retriever_dir"), "a directory name retriever-<generation>"),
    "retriever_files": (lambda v: isinstance(v, dict) and set(v) == set(RETRIEVER_FILES.values())
                        and all(map(_is_meta, v.values())),
                        f"{{name: {{bytes, sha256}}}} for exactly {sorted(RETRIEVER_FILES.values())}"),
    "quantizer": (lambda v: v is None or (isinstance(v, dict) and _is_name(v.get("file"), "quantizer")
                                          and _is_meta(v) and _is_int(v.get("code_size"), 1)),
                  "null or {file: quantizer-g<generation>.bin, bytes, sha256, code_size, ...}"),
    "shards": (lambda v: isinstance(v, list) and all(map(_is_shard, v)),
               "a list of {name: shard-<index>-g<generation>, n >= 1, files: {kind: {bytes, sha256}}}"),
}


def _check_manifest(m, mpath: Path) -> dict:
    """`m` if it is a manifest as `build` writes it, else a BankError naming the field."""
    if not isinstance(m, dict):
        raise BankError(f"{mpath} is damaged: not a JSON object")
    if m.get("format") != BANK_FORMAT:
        raise BankError(f"{mpath.parent} is not a mini_m3 memory bank (format={m.get('format')!r})")
    if m.get("version") != BANK_FORMAT_VERSION:
        raise BankError(f"bank format version {m.get('version')} is not supported (this mini_m3 reads version "
                        f"{BANK_FORMAT_VERSION}; version 1 banks tokenized references differently, version 2 banks "
                        f"have no checksum of their texts and retrieval index, version 3 banks were not checked "
                        f"against the model's memory format): rebuild the bank")
    damaged = "the manifest was altered or damaged: rebuild the bank"
    missing = [k for k in _FIELDS if k not in m]
    if missing:
        raise BankError(f"{mpath} lacks the field(s) {missing}: {damaged}")
    for key, (ok, want) in _FIELDS.items():
        if not ok(m[key]):
            raise BankError(f"{mpath}: field {key!r} is {repr(m[key])[:80]}, expected {want}: {damaged}")
    if (m["storage"] == "vq") != (m["quantizer"] is not None):
        raise BankError(f"{mpath}: storage {m['storage']!r} with quantizer {m['quantizer']!r}: {damaged}")
    for sh in m["shards"]:
        if set(sh["files"]) != _SHARD_KINDS[m["storage"]]:
            raise BankError(f"{mpath}: shard {sh['name']} has files {sorted(sh['files'])}, a {m['storage']} bank "
                            f"needs {sorted(_SHARD_KINDS[m['storage']])}: {damaged}")
    if len({sh["name"] for sh in m["shards"]}) != len(m["shards"]):
        raise BankError(f"{mpath}: two shards have the same name: {damaged}")
    return m


def _read_manifest(path: Path) -> dict:
    mpath = path / "manifest.json"
    if not mpath.exists():
        raise FileNotFoundError(f"no memory bank at {path} (manifest.json missing)")
    try:
        manifest = parse_json(mpath.read_text(encoding="utf-8"), str(mpath))  # refuses hostile nesting too
    except (ValueError, UnicodeDecodeError) as e:
        raise BankError(f"{mpath} is damaged: {e}") from None
    return _check_manifest(manifest, mpath)


def _same(a, b) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


# ---------------------------------------------------------------------------------------- the files, checked
def _data_files(m: dict) -> list[tuple[str, dict, bool]]:
    """(name, {bytes, sha256}, read whole?) of the texts, quantizer and shard files `m` lists."""
    files = [(m["texts_file"], {"bytes": m["texts_bytes"], "sha256": m["texts_sha256"]}, True)]
    if m["quantizer"]:
        files.append((m["quantizer"]["file"], m["quantizer"], True))
    return files + [(f"{sh['name']}.{kind}.npy", meta, False)
                    for sh in m["shards"] for kind, meta in sh["files"].items()]


def _verify(path: Path, files: list[tuple[str, dict, bool]], verify: str) -> None:
    """Size and sha256 of each file against the manifest. Files read whole (texts, quantizer, retrieval index)
    are always checked in full, before anything parses them; memory-mapped shards as `verify` says: "full"
    (sha256), "size", "none", or "auto" (sha256 below FULL_VERIFY_BYTES of shards, else size)."""
    shard_bytes = sum(meta["bytes"] for _, meta, whole in files if not whole)
    full = verify == "full" or (verify == "auto" and shard_bytes < FULL_VERIFY_BYTES)
    for name, meta, whole in files:
        p = path / name
        if not p.is_file():
            raise BankError(f"memory bank file {p} is missing")
        if (whole or verify != "none") and p.stat().st_size != meta["bytes"]:
            raise BankError(f"memory bank file {p} has {p.stat().st_size} bytes, the manifest says "
                            f"{meta['bytes']}: it is truncated or was altered; rebuild the bank")
        if (whole or full) and sha256_file(p) != meta["sha256"]:
            raise BankError(f"memory bank file {p} does not match its checksum in the manifest: it was "
                            f"altered or damaged; rebuild the bank")


def _load_npy(path: Path, random_access: bool) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise BankError(f"cannot read {path}: {e}") from None
    if random_access:  # memories are read at random: no kernel read-ahead around each row
        _advise_random(arr)
    return arr


def _read_texts(path: Path, m: dict) -> list[str]:
    p, texts = path / m["texts_file"], []
    try:
        with open(p, encoding="utf-8") as f:
            for i, line in enumerate(f):
                row = json.loads(line)
                if not isinstance(row, dict) or row.get("id") != i or not isinstance(row.get("text"), str):
                    raise ValueError(f"line {i + 1} is not {{\"id\": {i}, \"text\": \"...\"}}")
                texts.append(row["text"])
    except (ValueError, UnicodeDecodeError) as e:
        raise BankError(f"{p} is damaged: {e}") from None
    if len(texts) != m["n_references"]:
        raise BankError(f"{p} has {len(texts)} texts, manifest says {m['n_references']}")
    return texts


def _load_retriever(path: Path, m: dict, texts: list[str], verify: str) -> Retriever:
    """The retrieval index `m` names, checksummed before faiss reads it, holding exactly `texts`."""
    d = path / m["retriever_dir"]
    _verify(path, [(f"{d.name}/{name}", meta, True) for name, meta in m["retriever_files"].items()], verify)
    try:
        retriever = Retriever.load(d)
    except (ValueError, RuntimeError) as e:
        raise BankError(f"cannot read the retrieval index {d}: {e}") from None
    if len(retriever) != len(texts) or retriever.texts != texts:
        raise BankError(f"the retrieval index {d} holds {len(retriever)} references, the bank "
                        f"{len(texts)}{' (other texts)' if len(retriever) == len(texts) else ''}: rebuild the bank")
    return retriever


def _check_format(path: Path, model: Memory3, selector: str, tokens_per_head: int, verb: str) -> None:
    """A BankError unless (selector, tokens_per_head) is the memory format of `model`'s config."""
    fmt = model.cfg.memory_format
    if (selector, tokens_per_head) != (fmt["selector"], fmt["tokens_per_head"]):
        raise BankError(f"the memory bank at {path} {verb} format selector={selector!r}, tokens_per_head="
                        f"{tokens_per_head}, but the model's config says selector={fmt['selector']!r}, tokens_per_head="
                        f"{fmt['tokens_per_head']} (the memory format is part of the model): build the bank from this "
                        f"model's config (mini-m3 build-bank, or MemoryBank.build without selector/tokens_per_head), "
                        f"or, to use that format on purpose, pass model.with_memory_format(selector={selector!r}"
                        f"{'' if selector == 'all' else f', tokens_per_head={tokens_per_head}'})")


class MemoryBank:
    """Explicit memories of a set of references, on disk, for one model (see the module docstring).
    Made by `MemoryBank.open` or `MemoryBank.build`."""

    def __init__(self, path: Path, model: Memory3, tokenizer=None, *, cache_size: int = 4096, verify: str = "auto"):
        self.path, self.model, self.tokenizer = Path(path), model, tokenizer
        self.cache_size, self._verify_mode = cache_size, verify
        self.manifest: dict = {}
        self.texts: list[str] = []
        self.retriever: Retriever | None = None  # None after a failed write could not read the index back
        self.quantizer = None
        self._vq_groups = "auto"
        self._cache: OrderedDict[int, tuple[torch.Tensor, ...]] = OrderedDict()
        self.hits = self.misses = self.cold_encodes = 0
        self._arrays: dict[str, np.ndarray] = {}
        self._pending: dict[int, tuple[torch.Tensor, ...]] = {}  # cold-start memories not yet on disk
        self._where = _Locations()  # reference id -> (shard index, row)

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, path: str | os.PathLike, model: Memory3, tokenizer, texts: Sequence[str], *,
              quantizer: VectorQuantizer | GroupedQuantizer | str | None = None, vq_groups: str = "auto",
              selector: str | None = None, tokens_per_head: int | None = None, storage_dtype: str = "bfloat16",
              retriever: Retriever | None = None,
              encode: bool = True, batch_size: int = 64, shard_size: int = 65536, vq_train_references: int = 4096,
              cache_size: int = 4096, overwrite: bool = False, seed: int = 0, progress: bool = True,
              memories: Iterable[ExplicitMemory] | None = None) -> "MemoryBank":
        """Encode `texts` with `model` and write a new bank at `path`, in the model's memory format.

        selector, tokens_per_head: None (the model's format); anything else must name the model's format, or the
        build is refused (BankError): to write another format on purpose, pass `model.with_memory_format(...)`.

        quantizer: None (raw `storage_dtype`), a `VectorQuantizer` or `GroupedQuantizer` (trained or not), or a
        faiss factory string ("default" picks `default_factory(head_dim)`); an untrained quantizer is trained on
        the K/V vectors of the first `vq_train_references` references. encode=False makes a cold-start bank.
        vq_groups (factory strings only): "per_head" trains one codebook per (key/value, memory layer, memory
        head), "shared" one for all, "auto" per head unless a group has fewer training vectors than its
        k-means has centroids (tiny banks), then shared.
        memories: the explicit memories of `texts`, already computed (encoded on other machines, or synthesized
        for a storage benchmark), as an iterable of `ExplicitMemory` batches in reference order (reference_ids
        0, 1, ...); each batch becomes one shard file, streamed to disk, and `model` is not run.
        """
        path = Path(path)
        if storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage_dtype must be one of {sorted(STORAGE_DTYPES)}, got {storage_dtype!r}")
        cfg = model.cfg
        selector, tokens_per_head = cfg.written_format(selector, tokens_per_head)
        _check_format(path, model, selector, tokens_per_head, "would be written in")
        texts = _check_texts(texts)
        if vq_groups not in ("auto", "per_head", "shared"):
            raise ValueError(f"vq_groups must be 'auto', 'per_head' or 'shared', got {vq_groups!r}")
        if isinstance(quantizer, str):
            factory = default_factory(cfg.head_dim) if quantizer == "default" else quantizer
            n_groups = 2 * len(cfg.memory_layers) * len(cfg.memory_heads)
            quantizer = (VectorQuantizer(factory, cfg.head_dim) if vq_groups == "shared"
                         else GroupedQuantizer(factory, cfg.head_dim, n_groups))
        path.mkdir(parents=True, exist_ok=True)
        with _write_lock(path):  # checked under the lock: another process may have just built here
            if any(path.iterdir()):
                if not overwrite:
                    raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True or use append()")
                if not (path / "manifest.json").exists():
                    raise FileExistsError(f"{path} is not empty and is not a memory bank; refusing to overwrite it")
            remove_stale_temps(path)
            old_generation = 0
            if overwrite and (path / "manifest.json").exists():  # new files get new names; the old bank stays
                try:                                               # readable until the new manifest replaces it
                    old_generation = int(json.loads((path / "manifest.json").read_text())["generation"])
                except (ValueError, KeyError, TypeError):
                    old_generation = 0
            bank = cls(path, model, tokenizer, cache_size=cache_size)
            bank.manifest = {
                "format": BANK_FORMAT, "version": BANK_FORMAT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "generation": old_generation, "model_fingerprint": weights_fingerprint(model),
                "config": cfg.to_dict(),
                "tokenizer_fingerprint": tokenizer.fingerprint() if tokenizer is not None else None,
                "selector": selector, "tokens_per_head": tokens_per_head,
                "storage": "vq" if quantizer is not None else "raw", "dtype": storage_dtype, "quantizer": None,
                "seed": seed, "shards": [], "n_references": 0, "texts_file": None, "retriever_dir": None,
            }
            bank.quantizer, bank._vq_groups = quantizer, vq_groups
            bank.retriever = retriever if retriever is not None else Retriever()
            bank._add(texts, encode=encode, batch_size=batch_size, shard_size=shard_size,
                      vq_train_references=vq_train_references, progress=progress, first=True, memories=memories)
        return bank

    def append(self, texts: Sequence[str], *, batch_size: int = 64, shard_size: int = 65536,
               progress: bool = True) -> list[int]:
        """Add references (new ids follow the old ones, including those other processes appended since this
        object opened the bank); returns their ids. Encoded unless the bank is cold."""
        texts = _check_texts(texts)
        with self._writing():
            start = len(self.texts)
            self._add(texts, encode=self.manifest["shards"] != [] or not self.texts, batch_size=batch_size,
                      shard_size=shard_size, vq_train_references=0, progress=progress, first=False)
        return list(range(start, start + len(texts)))

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Hold the bank's write lock; delete what killed writers left; catch up with other writers' commits."""
        with _write_lock(self.path):
            remove_stale_temps(self.path)
            self._refresh()
            yield

    def _add(self, texts, *, encode, batch_size, shard_size, vq_train_references, progress, first,
             memories: Iterable[ExplicitMemory] | None = None) -> None:
        """Write `texts` (and their memories) as the next generation and commit it. Until the commit nothing
        of this object changes but the retrieval index, which is read back from disk if the commit fails."""
        m = dict(self.manifest)  # the next manifest; self.manifest stays the committed one
        if self.tokenizer is not None:  # refuse over-long references up front, also in cold-start banks
            limit = self.model.cfg.reference_length
            for i, ids in enumerate(self.tokenizer.encode_references(list(texts))):
                if len(ids) > limit:
                    raise ValueError(f"reference {i} has {len(ids)} tokens > reference_length={limit}; "
                                     f"split it first (mini_m3.data.text.chunk_references)")
        start = len(self.texts)
        new_shards = []
        if memories is not None:
            expected = start
            for mem in memories:
                mem = mem.detach().to("cpu")  # the bank's files and RAM cache live on the host
                self._check_memories(mem, expected)
                if self.quantizer is not None and not self.quantizer.trained:
                    self._train_quantizer(mem[list(range(min(len(mem), max(1, vq_train_references))))])
                new_shards.append(self._write_shard(mem, len(m["shards"]) + len(new_shards)))
                expected += len(mem)
            if expected != start + len(texts):
                raise ValueError(f"memories cover {expected - start} references, texts has {len(texts)}")
        elif encode:
            ids = list(range(start, start + len(texts)))
            if self.quantizer is not None and not self.quantizer.trained:
                n_train = min(len(texts), max(1, vq_train_references))
                self._train_quantizer(self._encode(texts[:n_train], ids[:n_train], batch_size, progress=False))
            for s in range(0, len(texts), shard_size):
                mem = self._encode(texts[s:s + shard_size], ids[s:s + shard_size], batch_size, progress)
                new_shards.append(self._write_shard(mem, len(m["shards"]) + len(new_shards)))
        gen = m["generation"] + 1
        all_texts = self.texts + list(texts)
        texts_file = f"texts-{gen:05d}.jsonl"
        atomic_write_text(self.path / texts_file,
                          "".join(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n"
                                  for i, t in enumerate(all_texts)))
        retriever_dir = self.path / f"retriever-{gen:05d}"
        if retriever_dir.exists():  # left by a writer that died before its commit
            shutil.rmtree(retriever_dir)
        indexed = len(self.retriever)
        try:
            if first:
                self.retriever.fit(all_texts, progress=progress)
            else:
                self.retriever.add(list(texts), progress=progress)
            self.retriever.save(retriever_dir)
            if self.quantizer is not None and m["quantizer"] is None:
                qfile = f"quantizer-g{gen:05d}.bin"
                self.quantizer.save(self.path / qfile)
                m["quantizer"] = {"file": qfile, "factory": self.quantizer.factory, "dim": self.quantizer.dim,
                                  "code_size": self.quantizer.code_size, **_file_meta(self.path / qfile),
                                  "groups": getattr(self.quantizer, "n_groups", 1)}
            tmeta = _file_meta(self.path / texts_file)
            m.update(generation=gen, texts_file=texts_file, texts_bytes=tmeta["bytes"], texts_sha256=tmeta["sha256"],
                     retriever_dir=retriever_dir.name, n_references=len(all_texts), shards=m["shards"] + new_shards,
                     retriever_files={n: _file_meta(retriever_dir / n) for n in RETRIEVER_FILES.values()})
            self._commit(m)
        except BaseException:
            if not first and (len(self.retriever) != indexed or len(self.retriever.texts) != indexed):
                self._reload_retriever()
            raise
        self.texts = all_texts
        first_id = start
        for j, sh in enumerate(new_shards):  # shards hold consecutive ids, in order
            self._where.set(np.arange(first_id, first_id + sh["n"]), len(m["shards"]) - len(new_shards) + j)
            first_id += sh["n"]
        self._remove_unreferenced()

    def _write_manifest(self) -> None:
        atomic_write_text(self.path / "manifest.json", json.dumps(self.manifest, indent=1))

    def _commit(self, m: dict) -> None:
        """Make `m` the bank's manifest: on disk (the commit point) and here; on failure neither changes."""
        old, self.manifest = self.manifest, m
        try:
            self._write_manifest()
        except BaseException:
            self.manifest = old
            raise

    def _remove_unreferenced(self) -> None:
        """Delete bank files of earlier generations (and leftovers of killed writers) after a commit. The
        commit stands if this fails, so a failure is a warning."""
        m = self.manifest
        keep = {"manifest.json", m["retriever_dir"]} | {name for name, _, _ in _data_files(m)}
        try:
            for p in self.path.iterdir():
                if p.name.startswith(("shard-", "texts-", "retriever-", "quantizer-")) and p.name not in keep:
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        except OSError as e:
            warnings.warn(f"the write to {self.path} is committed, but an old file could not be deleted: {e}")

    def _reload_retriever(self) -> None:
        """After a write failed with the in-memory retrieval index extended: read the committed one back."""
        try:
            self.retriever = _load_retriever(self.path, self.manifest, self.texts, self._verify_mode)
        except Exception:  # the write's own error is the one raised; `search` and the next write say this one
            self.retriever = None

    def _refresh(self) -> None:
        """Under the write lock: read in what other processes committed since this object read the bank (their
        appends and flushes); refuse a bank that was rebuilt since."""
        disk = _read_manifest(self.path)
        if self.retriever is not None and _same(disk, self.manifest):
            return
        fixed = ("created", "model_fingerprint", "config", "tokenizer_fingerprint", "selector", "tokens_per_head",
                 "storage", "dtype", "seed", "quantizer")
        changed = [k for k in fixed if not _same(disk.get(k), self.manifest.get(k))]
        state = None if changed or disk["n_references"] < len(self.texts) else self._read_state(disk)
        if state is None or state[0][:len(self.texts)] != self.texts:
            raise BankError(f"the bank at {self.path} was rebuilt by another process since this MemoryBank read it "
                            f"({', '.join(changed) or 'texts'} changed): open it again")
        self._set_state(disk, state)
        for i in [i for i in self._pending if i in self._where]:  # another process flushed them
            del self._pending[i]

    def _check_memories(self, mem: ExplicitMemory, start: int) -> None:
        cfg, m = self.model.cfg, self.manifest
        want = (len(cfg.memory_layers), len(cfg.memory_heads), m["tokens_per_head"], cfg.head_dim)
        n = len(mem)
        if mem.bias is not None:
            raise ValueError("these memories carry soft-selection weights (training only): a bank stores the hard "
                             "format; encode them with encode_references")
        if (tuple(mem.keys.shape[1:]) != want or mem.values.shape != mem.keys.shape
                or tuple(mem.positions.shape) != (n, *want[:3]) or tuple(mem.mask.shape) != (n, *want[:3])):
            raise ValueError(f"memories of shape {tuple(mem.keys.shape)} do not fit this model: expected "
                             f"(n, {', '.join(map(str, want))}) keys/values and (n, {', '.join(map(str, want[:3]))}) "
                             f"positions and mask")
        if not torch.equal(mem.reference_ids.cpu(), torch.arange(start, start + n)):
            raise ValueError(f"memories must come in reference order: expected ids {start}..{start + n - 1}")

    def _encode(self, texts, ids, batch_size, progress) -> ExplicitMemory:
        if self.tokenizer is None:
            raise ValueError("encoding references needs the tokenizer: pass tokenizer= to MemoryBank.open")
        m = self.manifest  # encoded on the model's device; shards, quantizer and RAM cache live on the host
        return encode_references(self.model, self.tokenizer, texts, selector=m["selector"],
                                 tokens_per_head=m["tokens_per_head"], batch_size=batch_size,
                                 seed=m["seed"], reference_ids=ids, progress=progress).to("cpu")

    def _write_shard(self, mem: ExplicitMemory, index: int | None = None) -> dict:
        """Write one shard; `index` numbers it (several shards written in one generation need distinct names)."""
        m = self.manifest
        index = len(m["shards"]) if index is None else index
        name = f"shard-{index:05d}-g{m['generation'] + 1:05d}"
        files = {}
        if m["storage"] == "vq":
            codes = _encode_kv(self.quantizer, torch.stack([mem.keys, mem.values], 1).float().numpy())
            files["codes"] = _save_npy(self.path / f"{name}.codes.npy", codes)
        else:
            files["keys"] = _save_npy(self.path / f"{name}.keys.npy", _to_storage(mem.keys, m["dtype"]))
            files["values"] = _save_npy(self.path / f"{name}.values.npy", _to_storage(mem.values, m["dtype"]))
        pos = mem.positions.masked_fill(~mem.mask, -1).numpy().astype(np.int16)
        files["positions"] = _save_npy(self.path / f"{name}.positions.npy", pos)
        files["ids"] = _save_npy(self.path / f"{name}.ids.npy", mem.reference_ids.numpy().astype(np.int64))
        return {"name": name, "n": len(mem), "files": files}

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | os.PathLike, model: Memory3, tokenizer=None, *, cache_size: int = 4096,
             verify: str = "auto") -> "MemoryBank":
        """Open a bank for `model`. Refuses a model whose weights or config differ from the one that built it
        (explicit memories are only readable by that model: rebuild after any weight change, Remark 9).
        verify: how shards are checked: "full" (sha256), "size", "none", or "auto" (sha256 below 512 MB of
        shards). The texts, quantizer and retrieval index are always checked by sha256 before they are parsed."""
        path = Path(path)
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        bank = cls(path, model, tokenizer, cache_size=cache_size, verify=verify)
        for attempt in range(3):
            manifest = _read_manifest(path)
            bank._check_model(manifest)
            try:
                state = bank._read_state(manifest)
                break
            except (BankError, OSError):  # a writer that committed meanwhile may have deleted a file: read again
                if attempt == 2 or _same(_read_manifest(path), manifest):
                    raise
        bank._set_state(manifest, state)
        return bank

    def _check_model(self, m: dict) -> None:
        fp = weights_fingerprint(self.model)
        if fp != m["model_fingerprint"]:
            raise BankError(f"the memory bank at {self.path} was built by a different model (fingerprint "
                            f"{m['model_fingerprint'][:12]}…, this model {fp[:12]}…). Explicit memories are "
                            f"only readable by the weights that wrote them (paper Remark 9): rebuild the bank with "
                            f"MemoryBank.build(..., overwrite=True) or `mini-m3 build-bank`.")
        _check_format(self.path, self.model, m["selector"], m["tokens_per_head"], "holds memories in")
        if self.tokenizer is not None and m["tokenizer_fingerprint"] not in (None, self.tokenizer.fingerprint()):
            raise BankError(f"the memory bank at {self.path} was built with a different tokenizer")

    def _read_state(self, m: dict) -> tuple:
        """What manifest `m` describes, read and checked: every file against `m` before it is parsed, then the
        counts and shapes of texts, retrieval index and shards against `m` and the model."""
        _verify(self.path, _data_files(m), self._verify_mode)
        texts = _read_texts(self.path, m)
        retriever = _load_retriever(self.path, m, texts, self._verify_mode)
        quantizer = None
        if m["quantizer"]:
            qpath = self.path / m["quantizer"]["file"]
            try:
                quantizer = load_quantizer(qpath)
            except (ValueError, RuntimeError, OSError) as e:
                raise BankError(f"cannot read the quantizer {qpath}: {e}") from None
            if quantizer.code_size != m["quantizer"]["code_size"]:
                raise BankError(f"the quantizer {qpath} has code size {quantizer.code_size}, the manifest says "
                                f"{m['quantizer']['code_size']}: rebuild the bank")
        cfg = self.model.cfg
        mem = (len(cfg.memory_layers), len(cfg.memory_heads), m["tokens_per_head"])
        want = {"keys": (mem + (cfg.head_dim,), STORAGE_DTYPES[m["dtype"]]), "positions": (mem, np.int16),
                "values": (mem + (cfg.head_dim,), STORAGE_DTYPES[m["dtype"]]), "ids": ((), np.int64),
                "codes": ((2, *mem, quantizer.code_size if quantizer else 0), np.uint8)}
        arrays, where, stored = {}, _Locations(), 0
        for s, sh in enumerate(m["shards"]):
            for kind in sh["files"]:
                p = self.path / f"{sh['name']}.{kind}.npy"
                arr = arrays[f"{sh['name']}.{kind}"] = _load_npy(p, random_access=kind != "ids")
                shape, dtype = (sh["n"], *want[kind][0]), np.dtype(want[kind][1])
                if arr.shape != shape or arr.dtype != dtype:
                    raise BankError(f"{p} holds {arr.dtype} {arr.shape}; the manifest and the model say {dtype} "
                                    f"{shape}: the manifest was altered or the file damaged; rebuild the bank")
            ids = arrays[f"{sh['name']}.ids"]
            if ids.min() < 0 or ids.max() >= len(texts):
                raise BankError(f"shard {sh['name']} holds reference ids outside 0..{len(texts) - 1}: rebuild the bank")
            where.set(ids, s)
            stored += len(ids)
        if len(where) != stored:
            raise BankError(f"the shards of {self.path} hold {stored} memories of {len(where)} references (some "
                            f"twice): rebuild the bank")
        return texts, retriever, quantizer, arrays, where

    def _set_state(self, m: dict, state: tuple) -> None:
        self.manifest = m
        self.texts, self.retriever, self.quantizer, self._arrays, self._where = state

    def _array(self, shard: dict, kind: str) -> np.ndarray:
        key = f"{shard['name']}.{kind}"
        if key not in self._arrays:
            self._arrays[key] = _load_npy(self.path / f"{key}.npy", random_access=kind != "ids")
        return self._arrays[key]

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return len(self.texts)

    def search(self, queries: Sequence[str], k: int, *, leakage_threshold: float | None = None) -> np.ndarray:
        """Reference ids (n, k), best first, for each query text (optionally leakage-filtered, Eq. 6)."""
        if self.retriever is None:
            raise BankError(f"the retrieval index of {self.path} could not be read back after a failed write: "
                            f"open the bank again")
        if leakage_threshold is None:
            return self.retriever.search(queries, k)[1]
        # §4.3: drop a reference that contains (most of) the query: overlap(reference, query) > threshold,
        # measured on tokens (characters would flag any English text of similar letters)
        tokenize = self.tokenizer.encode if self.tokenizer is not None else str.split
        return self.retriever.search_with_leakage_filter(queries, k, leakage_threshold, tokenize,
                                                         direction="query_in_reference")[1]

    def get(self, ids: Sequence[int]) -> ExplicitMemory:
        """Explicit memories of the given reference ids (in order), as the model's dtype and device."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < len(self.texts)]
        if bad:
            raise IndexError(f"reference ids {bad[:5]} are not in this bank of {len(self.texts)} references")
        rows: dict[int, tuple] = {}
        missing = []
        for i in ids:
            if i in self._cache:
                self._cache.move_to_end(i)
                rows[i] = self._cache[i]
                self.hits += 1
            elif i not in rows:
                self.misses += 1
                missing.append(i)
        missing = list(dict.fromkeys(missing))
        if missing:
            rows.update(self._load(missing))
        for i in missing:
            self._cache[i] = rows[i]
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        dev, dtype = self.model.tok_emb.weight.device, self.model.tok_emb.weight.dtype
        k, v, pos, mask = (torch.stack([rows[i][j] for i in ids]) for j in range(4))
        return ExplicitMemory(k.to(dev, dtype), v.to(dev, dtype), pos.to(dev), mask.to(dev),
                              torch.tensor(ids, dtype=torch.long, device=dev))

    def _load(self, ids: list[int]) -> dict[int, tuple]:
        out = {}
        cold = [i for i in ids if i not in self._where and i not in self._pending]
        if cold:  # cold start: encode on first retrieval, keep until flush()
            mem = self._encode([self.texts[i] for i in cold], cold, 64, progress=False)
            keys, values = self._as_stored(mem.keys, mem.values)  # same as after flush + reopen
            for j, i in enumerate(cold):
                self._pending[i] = (keys[j], values[j], mem.positions[j], mem.mask[j])
            self.cold_encodes += len(cold)
        m = self.manifest
        by_shard: dict[int, list[int]] = {}
        for i in ids:
            if i in self._pending:
                out[i] = self._pending[i]
            else:
                by_shard.setdefault(self._where[i][0], []).append(i)
        for s, sids in by_shard.items():
            shard = m["shards"][s]
            rws = np.array([self._where[i][1] for i in sids])
            pos = torch.from_numpy(np.asarray(self._array(shard, "positions")[rws], dtype=np.int64))
            mask = pos >= 0
            if m["storage"] == "vq":
                kv = torch.from_numpy(_decode_kv(self.quantizer, np.asarray(self._array(shard, "codes")[rws])))
                keys, values = kv[:, 0], kv[:, 1]
            else:
                keys = _from_storage(self._array(shard, "keys")[rws], m["dtype"])
                values = _from_storage(self._array(shard, "values")[rws], m["dtype"])
            keys, values = keys * mask[..., None], values * mask[..., None]
            for j, i in enumerate(sids):
                out[i] = (keys[j], values[j], pos[j].clamp(min=0), mask[j])
        return out

    def _as_stored(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values as they read back from this bank's storage (dtype rounding or VQ), so a memory
        encoded on first retrieval (cold start) is the same before and after `flush()`."""
        m = self.manifest
        if m["storage"] != "vq":
            return tuple(_from_storage(_to_storage(t, m["dtype"]), m["dtype"]) for t in (keys, values))
        if self.quantizer is None or not self.quantizer.trained:
            return keys.float(), values.float()
        kv = torch.stack([keys, values], 1).detach().float().cpu().numpy()
        kv = torch.from_numpy(_decode_kv(self.quantizer, _encode_kv(self.quantizer, kv)))
        return kv[:, 0], kv[:, 1]

    def _train_quantizer(self, sample: ExplicitMemory) -> None:
        """Train the bank's untrained quantizer on the kept K/V vectors of `sample`."""
        q, seed = self.quantizer, self.manifest["seed"]
        if isinstance(q, GroupedQuantizer):
            groups = [t[:, l, h][sample.mask[:, l, h]].float().numpy() for t in (sample.keys, sample.values)
                      for l in range(t.shape[1]) for h in range(t.shape[2])]  # the order of _encode_kv's groups
            if getattr(self, "_vq_groups", "auto") != "auto" or min(map(len, groups)) >= q.min_training_vectors:
                q.train(groups, seed=seed)
                return
            q = self.quantizer = VectorQuantizer(q.factory, q.dim)  # too few vectors per group: one codebook
        q.train(torch.cat([sample.keys[sample.mask], sample.values[sample.mask]]).float().numpy(), seed=seed)

    def flush(self) -> int:
        """Write memories encoded on first retrieval (cold start) to disk; returns how many were written."""
        if not self._pending:
            return 0
        if self.quantizer is not None and not self.quantizer.trained:
            raise ValueError("a cold-start VQ bank needs a trained quantizer before flush()")
        with self._writing():  # drops the pending memories another process has flushed meanwhile
            ids = sorted(self._pending)
            if ids:
                k, v, pos, mask = (torch.stack([self._pending[i][j] for i in ids]) for j in range(4))
                shard = self._write_shard(ExplicitMemory(k, v, pos, mask, torch.tensor(ids)))
                m = self.manifest
                self._commit({**m, "shards": m["shards"] + [shard], "generation": m["generation"] + 1})
                self._where.set(ids, len(self.manifest["shards"]) - 1)
                self._pending.clear()
                self._remove_unreferenced()
        return len(ids)

    def cache_info(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "size": len(self._cache), "capacity": self.cache_size,
                "cold_encodes": self.cold_encodes, "encoded_on_disk": len(self._where)}

    def bytes_per_memory(self) -> dict:
        """Bytes one reference's memory takes on disk (keys + values + positions), and as raw bf16 for scale."""
        cfg, m = self.model.cfg, self.manifest
        n_vec = len(cfg.memory_layers) * len(cfg.memory_heads) * m["tokens_per_head"]
        kv = (2 * n_vec * m["quantizer"]["code_size"] if m["storage"] == "vq"
              else 2 * n_vec * cfg.head_dim * np.dtype(STORAGE_DTYPES[m["dtype"]]).itemsize)
        return {"stored": kv, "positions": 2 * n_vec, "raw_bf16": 2 * n_vec * cfg.head_dim * 2}


def _check_texts(texts) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not one string")
    texts = list(texts)
    if not texts:
        raise ValueError("no reference texts given")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"reference {i} is a {type(t).__name__}, not a str")
        if not t.strip():
            raise ValueError(f"reference {i} is empty")
    return texts
