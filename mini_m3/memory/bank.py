"""§3.4 storing explicit memory: `MemoryBank`, a directory of memory-mapped memories with a RAM LRU cache.

Layout of a bank directory:

    manifest.json                 format/version, model fingerprint (Remark 9), tokenizer hash, selector,
                                  storage (raw dtype or VQ codes), shards with sizes and sha256, counts
    shard-00000.keys.npy          (n, L_mem, H_mem, k, d_h) raw keys   (or shard-00000.codes.npy: (n, 2, L_mem,
    shard-00000.values.npy        (n, L_mem, H_mem, k, d_h) raw values      H_mem, k, code_size) uint8 VQ codes)
    shard-00000.positions.npy     (n, L_mem, H_mem, k) int16, -1 = empty slot
    shard-00000.ids.npy           (n,) reference ids held by the shard
    quantizer-g<gen>.bin          the trained quantizer (VQ banks): a codebook per (key/value, layer, head), or one
    texts-<gen>.jsonl             reference texts, one JSON object per line
    retriever-<gen>/              the retrieval index over those texts

Every file is written under a new name and `manifest.json` is replaced last, so a process killed mid-build
or mid-append leaves the previous bank readable. Files are checked against the manifest on `open`.
"Warm start" (`build`) encodes everything up front; "cold start" (`build(..., encode=False)`) stores only
texts and index, encodes a reference the first time `get` asks for it, and `flush()` writes those to disk.
`build(..., memories=...)` stores memories computed elsewhere, one shard per batch. Shards are memory-mapped
with read-ahead off (`MADV_RANDOM`), since `get` reads scattered rows (experiments/bench_bank_scale.py).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import time
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from ..checkpoint import weights_fingerprint
from ..utils import atomic_path, atomic_write_text
from ..model import Memory3
from .encode import ExplicitMemory, encode_references
from .quantize import GroupedQuantizer, VectorQuantizer, default_factory, load_quantizer
from .retrieve import Retriever

BANK_FORMAT = "mini_m3.memory_bank"
BANK_FORMAT_VERSION = 2  # 2: references tokenized with the space after "Reference:" (Tokenizer.encode_reference)
STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}  # bf16 kept as raw bits


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _save_npy(path: Path, array: np.ndarray) -> dict:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(array))
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


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


class MemoryBank:
    """Explicit memories of a set of references, on disk, for one model (see the module docstring)."""

    def __init__(self, path: Path, manifest: dict, model: Memory3, tokenizer=None, cache_size: int = 4096):
        self.path, self.manifest, self.model, self.tokenizer = Path(path), manifest, model, tokenizer
        self.cache_size = cache_size
        self._cache: OrderedDict[int, tuple[torch.Tensor, ...]] = OrderedDict()
        self.hits = self.misses = self.cold_encodes = 0
        self._arrays: dict[str, np.ndarray] = {}
        self._pending: dict[int, tuple[torch.Tensor, ...]] = {}  # cold-start memories not yet on disk
        self._where = _Locations()  # reference id -> (shard index, row)
        for s, shard in enumerate(manifest["shards"]):
            self._where.set(self._array(shard, "ids"), s)
        self.texts = self._read_texts()
        self.retriever = Retriever.load(self.path / manifest["retriever_dir"])
        qf = manifest.get("quantizer")
        self.quantizer = load_quantizer(self.path / qf["file"]) if qf else None
        self._vq_groups = "auto"

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, path: str | os.PathLike, model: Memory3, tokenizer, texts: Sequence[str], *,
              quantizer: VectorQuantizer | GroupedQuantizer | str | None = None, vq_groups: str = "auto",
              selector: str = "attention",
              tokens_per_head: int | None = None, storage_dtype: str = "bfloat16", retriever: Retriever | None = None,
              encode: bool = True, batch_size: int = 64, shard_size: int = 65536, vq_train_references: int = 4096,
              cache_size: int = 4096, overwrite: bool = False, seed: int = 0, progress: bool = True,
              memories: Iterable[ExplicitMemory] | None = None) -> "MemoryBank":
        """Encode `texts` with `model` and write a new bank at `path`.

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
        if path.exists() and any(path.iterdir()):
            if not overwrite:
                raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True or use append()")
            if not (path / "manifest.json").exists():
                raise FileExistsError(f"{path} is not empty and is not a memory bank; refusing to overwrite it")
        if storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage_dtype must be one of {sorted(STORAGE_DTYPES)}, got {storage_dtype!r}")
        texts = _check_texts(texts)
        cfg = model.cfg
        if vq_groups not in ("auto", "per_head", "shared"):
            raise ValueError(f"vq_groups must be 'auto', 'per_head' or 'shared', got {vq_groups!r}")
        if isinstance(quantizer, str):
            factory = default_factory(cfg.head_dim) if quantizer == "default" else quantizer
            n_groups = 2 * len(cfg.memory_layers) * len(cfg.memory_heads)
            quantizer = (VectorQuantizer(factory, cfg.head_dim) if vq_groups == "shared"
                         else GroupedQuantizer(factory, cfg.head_dim, n_groups))
        path.mkdir(parents=True, exist_ok=True)
        old_generation = 0
        if overwrite and (path / "manifest.json").exists():  # new files get new names; the old bank stays
            try:                                               # readable until the new manifest replaces it
                old_generation = int(json.loads((path / "manifest.json").read_text())["generation"])
            except (ValueError, KeyError, TypeError):
                old_generation = 0
        manifest = {
            "format": BANK_FORMAT, "version": BANK_FORMAT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "generation": old_generation, "model_fingerprint": weights_fingerprint(model), "config": cfg.to_dict(),
            "tokenizer_fingerprint": tokenizer.fingerprint() if tokenizer is not None else None,
            "selector": selector, "tokens_per_head": (cfg.reference_length if selector == "all"
                                                      else tokens_per_head or cfg.memory_tokens_per_head),
            "storage": "vq" if quantizer is not None else "raw", "dtype": storage_dtype, "quantizer": None,
            "seed": seed, "shards": [], "n_references": 0, "texts_file": None, "retriever_dir": None,
        }
        bank = cls.__new__(cls)
        bank.path, bank.manifest, bank.model, bank.tokenizer = path, manifest, model, tokenizer
        bank.cache_size, bank._cache, bank._arrays, bank._pending = cache_size, OrderedDict(), {}, {}
        bank._where = _Locations()
        bank.hits = bank.misses = bank.cold_encodes = 0
        bank.texts, bank.quantizer, bank._vq_groups = [], quantizer, vq_groups
        bank.retriever = retriever if retriever is not None else Retriever()
        bank._add(texts, encode=encode, batch_size=batch_size, shard_size=shard_size,
                  vq_train_references=vq_train_references, progress=progress, first=True, memories=memories)
        return bank

    def append(self, texts: Sequence[str], *, batch_size: int = 64, shard_size: int = 65536,
               progress: bool = True) -> list[int]:
        """Add references (new ids follow the old ones); returns their ids. Encoded unless the bank is cold."""
        texts = _check_texts(texts)
        start = len(self.texts)
        self._add(texts, encode=self.manifest["shards"] != [] or not self.texts, batch_size=batch_size,
                  shard_size=shard_size, vq_train_references=0, progress=progress, first=False)
        return list(range(start, start + len(texts)))

    def _add(self, texts, *, encode, batch_size, shard_size, vq_train_references, progress, first,
             memories: Iterable[ExplicitMemory] | None = None) -> None:
        m = self.manifest
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
        if first:
            self.retriever.fit(all_texts, progress=progress)
        else:
            self.retriever.add(list(texts), progress=progress)
        retriever_dir = f"retriever-{gen:05d}"
        self.retriever.save(self.path / retriever_dir)
        if self.quantizer is not None and m["quantizer"] is None:
            qfile = f"quantizer-g{gen:05d}.bin"
            self.quantizer.save(self.path / qfile)
            m["quantizer"] = {"file": qfile, "factory": self.quantizer.factory, "dim": self.quantizer.dim,
                              "code_size": self.quantizer.code_size, "sha256": _sha256(self.path / qfile),
                              "groups": getattr(self.quantizer, "n_groups", 1)}
        m.update(generation=gen, texts_file=texts_file, retriever_dir=retriever_dir, n_references=len(all_texts),
                 texts_sha256=_sha256(self.path / texts_file), shards=m["shards"] + new_shards)
        self._write_manifest()  # the commit point
        self._remove_unreferenced()
        self.texts = all_texts
        for j, sh in enumerate(new_shards):
            self._where.set(self._array(sh, "ids"), len(m["shards"]) - len(new_shards) + j)

    def _check_memories(self, mem: ExplicitMemory, start: int) -> None:
        cfg, m = self.model.cfg, self.manifest
        want = (len(cfg.memory_layers), len(cfg.memory_heads), m["tokens_per_head"], cfg.head_dim)
        n = len(mem)
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
        m = self.manifest
        return encode_references(self.model, self.tokenizer, texts, selector=m["selector"],
                                 tokens_per_head=m["tokens_per_head"], batch_size=batch_size,
                                 seed=m["seed"], reference_ids=ids, progress=progress)

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

    def _write_manifest(self) -> None:
        atomic_write_text(self.path / "manifest.json", json.dumps(self.manifest, indent=1))

    def _remove_unreferenced(self) -> None:
        """Delete bank files of earlier generations (and leftovers of killed writers) after a commit."""
        m = self.manifest
        keep = {"manifest.json", m["texts_file"], m["retriever_dir"]}
        keep |= {f"{sh['name']}.{kind}.npy" for sh in m["shards"] for kind in sh["files"]}
        if m["quantizer"]:
            keep.add(m["quantizer"]["file"])
        for p in self.path.iterdir():
            ours = p.name.startswith(("shard-", "texts-", "retriever-", "quantizer-", ".shard-", ".texts-"))
            if ours and p.name not in keep:
                shutil.rmtree(p) if p.is_dir() else p.unlink()

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | os.PathLike, model: Memory3, tokenizer=None, *, cache_size: int = 4096,
             verify: str = "auto") -> "MemoryBank":
        """Open a bank for `model`. Refuses a model whose weights or config differ from the one that built it
        (explicit memories are only readable by that model: rebuild after any weight change, Remark 9).
        verify: "full" (sha256 of every file), "size", or "auto" (full below 512 MB)."""
        path = Path(path)
        mpath = path / "manifest.json"
        if not mpath.exists():
            raise FileNotFoundError(f"no memory bank at {path} (manifest.json missing)")
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BankError(f"{mpath} is damaged: {e}") from None
        if manifest.get("format") != BANK_FORMAT:
            raise BankError(f"{path} is not a mini_m3 memory bank (format={manifest.get('format')!r})")
        if manifest.get("version") != BANK_FORMAT_VERSION:
            raise BankError(f"bank format version {manifest.get('version')} is not supported "
                            f"(this mini_m3 reads version {BANK_FORMAT_VERSION}; version 1 banks tokenized "
                            f"references differently: rebuild the bank)")
        fp = weights_fingerprint(model)
        if fp != manifest["model_fingerprint"]:
            raise BankError(f"the memory bank at {path} was built by a different model (fingerprint "
                            f"{manifest['model_fingerprint'][:12]}…, this model {fp[:12]}…). Explicit memories are "
                            f"only readable by the weights that wrote them (paper Remark 9): rebuild the bank with "
                            f"MemoryBank.build(..., overwrite=True) or `mini-m3 build-bank`.")
        if tokenizer is not None and manifest["tokenizer_fingerprint"] not in (None, tokenizer.fingerprint()):
            raise BankError(f"the memory bank at {path} was built with a different tokenizer")
        cls._verify(path, manifest, verify)
        return cls(path, manifest, model, tokenizer, cache_size)

    @staticmethod
    def _verify(path: Path, manifest: dict, verify: str) -> None:
        if verify not in ("auto", "full", "size", "none"):
            raise ValueError(f"verify must be 'auto', 'full', 'size' or 'none', got {verify!r}")
        files = [(f"{sh['name']}.{kind}.npy", meta) for sh in manifest["shards"] for kind, meta in sh["files"].items()]
        if manifest.get("texts_sha256"):
            files.append((manifest["texts_file"], {"sha256": manifest["texts_sha256"]}))
        if manifest.get("quantizer"):
            files.append((manifest["quantizer"]["file"], {"sha256": manifest["quantizer"]["sha256"]}))
        total = sum(meta.get("bytes", 0) for _, meta in files)
        full = verify == "full" or (verify == "auto" and total < 512 * 2 ** 20)
        for name, meta in files:
            p = path / name
            if not p.exists():
                raise BankError(f"memory bank file {p} is missing")
            if "bytes" in meta and verify != "none" and p.stat().st_size != meta["bytes"]:
                raise BankError(f"memory bank file {p} has {p.stat().st_size} bytes, the manifest says "
                                f"{meta['bytes']}: it is truncated or was altered; rebuild the bank")
            if full and _sha256(p) != meta["sha256"]:
                raise BankError(f"memory bank file {p} does not match its checksum in the manifest: it was "
                                f"altered or damaged; rebuild the bank")

    def _array(self, shard: dict, kind: str) -> np.ndarray:
        key = f"{shard['name']}.{kind}"
        if key not in self._arrays:
            try:
                arr = np.load(self.path / f"{key}.npy", mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError) as e:
                raise BankError(f"cannot read {self.path / (key + '.npy')}: {e}") from None
            if kind != "ids":  # memories are read at random: no kernel read-ahead around each row
                _advise_random(arr)
            self._arrays[key] = arr
        return self._arrays[key]

    def _read_texts(self) -> list[str]:
        texts = []
        with open(self.path / self.manifest["texts_file"], encoding="utf-8") as f:
            for line in f:
                texts.append(json.loads(line)["text"])
        if len(texts) != self.manifest["n_references"]:
            raise BankError(f"{self.manifest['texts_file']} has {len(texts)} texts, manifest says "
                            f"{self.manifest['n_references']}")
        return texts

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return len(self.texts)

    def search(self, queries: Sequence[str], k: int, *, leakage_threshold: float | None = None) -> np.ndarray:
        """Reference ids (n, k), best first, for each query text (optionally leakage-filtered, Eq. 6)."""
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
        ids = sorted(self._pending)
        k, v, pos, mask = (torch.stack([self._pending[i][j] for i in ids]) for j in range(4))
        shard = self._write_shard(ExplicitMemory(k, v, pos, mask, torch.tensor(ids)))
        self.manifest["shards"].append(shard)
        self.manifest["generation"] += 1
        self._write_manifest()
        self._where.set(ids, len(self.manifest["shards"]) - 1)
        self._pending.clear()
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
