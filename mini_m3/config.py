"""§3.2 model shape: `Memory3Config`, the one dataclass that sizes the model and its explicit memory.

Like litgpt's `Config`: named presets (`Memory3Config.from_name("paper-2.4b")`), validation with errors
that name the field and the rule, and a JSON round trip. Memory settings (§3.3–3.4) live here too,
because a memory bank is only readable by a model of the same shape. The memory *format* (which tokens a memory
keeps, how many per head, how many memories a chunk reads) is part of the model as well: training, banks,
retrieval and evaluation read it from here, and a bank written in another format is refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .utils import atomic_write_text

CONFIG_FORMAT_VERSION = 2  # 2: memory_selector (version 1 files load with the paper's "attention")
# §3.3 token selectors: "attention" (the paper: top tokens by attention received), "exp" (its un-normalised
# approximation), "learned" (attention received from the model's own learned selection queries instead of from the
# reference's tokens: a named lever, not the paper's; needs `memory_selection_queries`), "random", "first", and
# "all" (every reference token kept: no sparsification), and "disjoint" (the paper's attention score, but the KV heads
# of a memory layer take turns choosing, each its best token that no head keeps yet: a named lever, not the paper's),
# and "headmax" (the paper's attention score per query head, the max over the query heads that share a KV head
# instead of their sum: the other reading of the spec's open choice 2, a named lever)
MEMORY_SELECTORS = ("attention", "exp", "learned", "random", "first", "all", "disjoint", "headmax")
SCORED_SELECTORS = ("attention", "exp", "learned", "headmax")  # the selectors that rank tokens by a score
# the fields of the memory format: the same weights under another format are the same weights (the bank checks the
# format itself), so `checkpoint.weights_fingerprint` leaves these out
MEMORY_FORMAT_FIELDS = ("memory_selector", "memory_tokens_per_head", "memories_per_chunk")
MAX_JSON_DEPTH = 64  # our files nest 5 levels deep at most; the json module recurses once per level
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_JSON_BRACKET = re.compile(r"[\[\]{}]")


def parse_json(text: str, what: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """`json.loads` for files a user hands us: errors are ValueErrors that name `what` (a file, or file:line),
    and nesting deeper than `max_depth` is refused BEFORE parsing (hostile "[[[[..." would otherwise raise
    RecursionError from inside the json module)."""
    if text.count("[") + text.count("{") > max_depth:  # only then can it be too deep: count, strings excluded
        depth = 0
        for m in _JSON_BRACKET.finditer(_JSON_STRING.sub("", text)):
            depth += 1 if m.group() in "[{" else -1
            if depth > max_depth:
                raise ValueError(f"{what}: JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} is not valid JSON (corrupt or truncated?): {e}") from None


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) of every non-blank line of a JSONL file a user hands us; a line that is not
    UTF-8 or not JSON is a ValueError naming file:line (a missing file is an OSError naming the path)."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid UTF-8: {e}") from None
            if line.strip():
                yield n, parse_json(line, f"{path}:{n}")


def _int_tuple(value: Any, fld: str) -> tuple:
    """A JSON list (or a preset's tuple) as a tuple; anything else names the field, e.g. `memory_layers: 1`."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"Memory3Config.{fld}={value!r}: must be a list of integers")
    return tuple(value)


def parse_overrides(items) -> dict[str, Any]:
    """Command-line `KEY=VALUE` items as Memory3Config field overrides (litgpt's `--model_config.KEY`): VALUE is
    read as JSON (`64`, `[0, 1]`, `"all"`), else taken as a string (`memory_selector=all`). An unknown field, a
    repeated one, `name`, or an item without `=` is a ValueError naming it; the values are checked by the config."""
    known = {f.name for f in dataclasses.fields(Memory3Config)} - {"name"}
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, raw = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"config override {item!r}: expected KEY=VALUE, e.g. chunk_length=32")
        if key not in known:
            raise ValueError(f"config override {item!r}: {key!r} is not a Memory3Config field; "
                             f"fields: {', '.join(sorted(known))}")
        if key in out:
            raise ValueError(f"config override {item!r}: {key} is given twice")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


@dataclass
class Memory3Config:
    """Shape of a Llama-style Memory³ decoder and of its explicit memories.

    Fields follow the paper's symbols: L = ``n_layers``, H = ``n_heads``, H_kv = ``n_kv_heads``,
    d_h = ``head_dim``, d = ``d_model``, W = ``mlp_width``, l_mem = ``memory_tokens_per_head``,
    l_ref = ``reference_length``, l_chunk = ``chunk_length``.
    ``memory_layers``/``memory_heads`` of ``None`` mean the paper's defaults: the first half of the
    layers and every KV head. The memory format: ``memory_selector`` picks the ``memory_tokens_per_head``
    tokens each memory keeps per head ("all" keeps every reference token), and a chunk reads
    ``memories_per_chunk`` memories; `with_memory_format` gives a copy in another format.
    """

    name: str = "custom"
    vocab_size: int = 512
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 16
    d_model: int = 64
    mlp_width: int = 128
    rope_base: float = 10_000.0
    norm_eps: float = 1e-5
    max_seq_len: int = 256  # context tokens (the prefix and the memory interval come on top)
    tie_embeddings: bool = True
    init_std: float = 0.02
    # explicit memory (§3.3–3.5)
    memory_layers: tuple[int, ...] | None = None
    memory_heads: tuple[int, ...] | None = None
    memory_tokens_per_head: int = 8
    reference_length: int = 128
    chunk_length: int = 64
    memories_per_chunk: int = 5
    memory_selector: str = "attention"
    # learned selection queries per query head in each memory layer (`Attention.select_q`, weights of the model): the
    # "learned" selector ranks a reference's tokens by the attention these pay them. 0 = none (the paper's models)
    memory_selection_queries: int = 0
    # "<s>Reference:" as token ids: <s> and the reserved <ref> token of our Tokenizer
    reference_prefix_ids: tuple[int, ...] = (1, 3)

    def __post_init__(self) -> None:
        # JSON gives lists; presets give tuples; None means "paper default"
        if self.memory_layers is None:
            self.memory_layers = tuple(range(self.n_layers // 2)) if isinstance(self.n_layers, int) else ()
        if self.memory_heads is None:
            self.memory_heads = tuple(range(self.n_kv_heads)) if isinstance(self.n_kv_heads, int) else ()
        for f in ("memory_layers", "memory_heads", "reference_prefix_ids"):
            setattr(self, f, _int_tuple(getattr(self, f), f))
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def fail(fld: str, rule: str) -> None:
            raise ValueError(f"Memory3Config.{fld}={getattr(self, fld)!r}: {rule}")

        def is_int(i) -> bool:  # JSON `true` is not a layer index
            return isinstance(i, int) and not isinstance(i, bool)

        positive_ints = ("vocab_size", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_model",
                         "mlp_width", "max_seq_len", "memory_tokens_per_head", "reference_length",
                         "chunk_length", "memories_per_chunk")
        for f in positive_ints:
            v = getattr(self, f)
            if not is_int(v) or v <= 0:
                fail(f, "must be a positive integer")
        for f in ("rope_base", "norm_eps", "init_std"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < math.inf:
                fail(f, "must be a positive number (finite)")
        if not isinstance(self.tie_embeddings, bool):
            fail("tie_embeddings", "must be True or False")
        if self.n_heads % self.n_kv_heads:
            fail("n_heads", f"must be divisible by n_kv_heads={self.n_kv_heads} (grouped-query attention)")
        if self.head_dim % 2:
            fail("head_dim", "must be even (RoPE rotates pairs of dimensions)")
        if not all(is_int(i) and 0 <= i < self.n_layers for i in self.memory_layers):
            fail("memory_layers", f"every memory layer must be an integer in [0, n_layers={self.n_layers})")
        if len(set(self.memory_layers)) != len(self.memory_layers) or list(self.memory_layers) != sorted(self.memory_layers):
            fail("memory_layers", "must be strictly increasing (no duplicates)")
        if not all(is_int(h) and 0 <= h < self.n_kv_heads for h in self.memory_heads):
            fail("memory_heads", f"every memory head must be a KV-head index in [0, n_kv_heads={self.n_kv_heads})")
        if len(set(self.memory_heads)) != len(self.memory_heads) or list(self.memory_heads) != sorted(self.memory_heads):
            fail("memory_heads", "must be strictly increasing (no duplicates)")
        if bool(self.memory_layers) != bool(self.memory_heads):
            fail("memory_heads", "memory_layers and memory_heads must both be empty or both be non-empty")
        if self.memory_selector not in MEMORY_SELECTORS:
            fail("memory_selector", f"must be one of {list(MEMORY_SELECTORS)}")
        if not is_int(self.memory_selection_queries) or self.memory_selection_queries < 0:
            fail("memory_selection_queries", "must be an integer >= 0")
        if self.memory_selector == "learned" and not self.memory_selection_queries:
            fail("memory_selector", "'learned' ranks tokens by learned selection queries: set "
                                    "memory_selection_queries > 0")
        if self.memory_tokens_per_head > self.reference_length:
            fail("memory_tokens_per_head", f"cannot exceed reference_length={self.reference_length}")
        if not self.reference_prefix_ids or not all(
                is_int(i) and 0 <= i < self.vocab_size for i in self.reference_prefix_ids):
            fail("reference_prefix_ids", f"must be non-empty token ids in [0, vocab_size={self.vocab_size})")
        if not isinstance(self.name, str):
            fail("name", "must be a string")

    # ------------------------------------------------------------------ derived sizes
    @property
    def n_query_groups(self) -> int:
        """Query heads per KV head (5 in the paper: 40 / 8)."""
        return self.n_heads // self.n_kv_heads

    @property
    def prefix_length(self) -> int:
        """p: length of the "<s>Reference:" prefix; it occupies positions 0..p-1."""
        return len(self.reference_prefix_ids)

    @property
    def context_offset(self) -> int:
        """Position of the first context token: after the prefix and the 128-long memory interval."""
        return self.prefix_length + self.reference_length

    @property
    def max_position(self) -> int:
        return self.context_offset + self.max_seq_len

    @property
    def memory_slots_per_chunk(self) -> int:
        """Memory key/value slots one chunk reads per memory head: 5 memories x 8 tokens = 40."""
        return self.memories_per_chunk * self.written_format()[1]

    def written_format(self, selector: str | None = None, tokens_per_head: int | None = None) -> tuple[str, int]:
        """(selector, tokens kept per memory head) of memories written with these overrides (None: this config's).
        The selector "all" keeps every reference token: `reference_length` slots per head, whatever is asked."""
        selector = self.memory_selector if selector is None else selector
        if selector not in MEMORY_SELECTORS:
            raise ValueError(f"unknown selector {selector!r}; choose from {MEMORY_SELECTORS}")
        if selector == "learned" and not self.memory_selection_queries:
            raise ValueError("selector 'learned' needs a model with learned selection queries "
                             "(Memory3Config.memory_selection_queries > 0)")
        k = self.reference_length if selector == "all" else (tokens_per_head or self.memory_tokens_per_head)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.reference_length:
            raise ValueError(f"tokens_per_head={k!r} must be an integer in [1, reference_length="
                             f"{self.reference_length}]")
        return selector, k

    @property
    def memory_format(self) -> dict[str, Any]:
        """The model's memory format: {"selector", "tokens_per_head" (as stored), "memories_per_chunk"}."""
        selector, k = self.written_format()
        return {"selector": selector, "tokens_per_head": k, "memories_per_chunk": self.memories_per_chunk}

    def with_memory_format(self, selector: str | None = None, tokens_per_head: int | None = None,
                           memories_per_chunk: int | None = None) -> "Memory3Config":
        """A validated copy in another memory format (None keeps a field). `Memory3.with_memory_format` gives
        the model under it, sharing the weights: the explicit way to read memories of another format."""
        changes = {k: v for k, v in (("memory_selector", selector), ("memory_tokens_per_head", tokens_per_head),
                                     ("memories_per_chunk", memories_per_chunk)) if v is not None}
        return self.replace(**changes)

    def non_embedding_parameters(self) -> int:
        """P = L (2 d·H·d_h + 2 d·d_h·H_kv + 3 d·W) + norms; the paper's formula when d = H·d_h."""
        per_layer = (2 * self.d_model * self.n_heads * self.head_dim
                     + 2 * self.d_model * self.head_dim * self.n_kv_heads
                     + 3 * self.d_model * self.mlp_width + 2 * self.d_model)
        return self.n_layers * per_layer + self.d_model  # + final norm

    # ------------------------------------------------------------------ presets & JSON
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "Memory3Config":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
        kw = dict(PRESETS[name], name=name)
        kw.update(overrides)
        return cls(**kw)

    @staticmethod
    def available() -> list[str]:
        return sorted(PRESETS)

    def replace(self, **changes: Any) -> "Memory3Config":
        """A validated copy with some fields changed (memory_layers/heads re-derive if set to None)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("memory_layers", "memory_heads", "reference_prefix_ids"):
            d[k] = list(d[k])
        return d

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        text = json.dumps({"format": "mini_m3.config", "version": CONFIG_FORMAT_VERSION, **self.to_dict()},
                          indent=2, sort_keys=True)
        if path is not None:
            atomic_write_text(path, text)
        return text

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Memory3Config":
        """A config from its JSON object. Version 1 files predate `memory_selector` and load with the paper's
        "attention", the selector `MemoryBank.build` and `mini-m3 build-bank` used for such models; a model that was
        trained with another one needs it written into its config (re-save it with `with_memory_format`)."""
        d = dict(d)
        fmt, version = d.pop("format", "mini_m3.config"), d.pop("version", CONFIG_FORMAT_VERSION)
        if fmt != "mini_m3.config":
            raise ValueError(f"not a mini_m3 config (format={fmt!r})")
        if version not in (1, CONFIG_FORMAT_VERSION) or isinstance(version, bool):
            raise ValueError(f"config format version {version} is not supported (expected {CONFIG_FORMAT_VERSION}, "
                             f"or 1)")
        if version == 1 and "memory_selector" in d:
            raise ValueError("memory_selector is a field of config format version 2, not 1")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config fields: {unknown}")
        return cls(**d)

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike) -> "Memory3Config":
        """Accepts a JSON string or a path to a JSON file (`checkpoint.read_config` adds the path to errors)."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            raw = Path(text).read_bytes()  # OSError (missing, a directory, no permission) names the path itself
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"config is not UTF-8: {e}") from None
        d = parse_json(text, "config")
        if not isinstance(d, dict):
            raise ValueError("config JSON must be an object")
        return cls.from_dict(d)


def _paper_shape(n_layers: int, n_heads: int, head_dim: int, **kw: Any) -> dict[str, Any]:
    """A 2.1–2.4B-scale shape as in Fig 10: d = H·d_h, W = d, 8 KV heads, first half memory layers."""
    d = n_heads * head_dim
    return dict(vocab_size=60416, n_layers=n_layers, n_heads=n_heads, n_kv_heads=8, head_dim=head_dim,
                d_model=d, mlp_width=d, max_seq_len=2048, tie_embeddings=False, **kw)


PRESETS: dict[str, dict[str, Any]] = {
    # unit tests: ~0.2M parameters
    "tiny": dict(vocab_size=512, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, d_model=64,
                 mlp_width=128, max_seq_len=256),
    # tiny with the paper's head dim (80), so the paper's own codec "OPQ20_80,Residual2x14,PQ8x10" (14 B per
    # vector) runs on a trained model's memories (`mini-m3 demo --all-tokens --preset tiny-d80`)
    "tiny-d80": dict(vocab_size=512, n_layers=4, n_heads=2, n_kv_heads=2, head_dim=80, d_model=64,
                     mlp_width=128, max_seq_len=256),
    # the demo: ~1.7M parameters (1.5M non-embedding), trains on 2 CPU cores in minutes
    "small": dict(vocab_size=2048, n_layers=6, n_heads=4, n_kv_heads=2, head_dim=32, d_model=128,
                  mlp_width=512, max_seq_len=512),
    # §4.4 / Fig 11 controlled runs: L40 H32 d_h64, 20 memory layers ("l40-h32-d64-ml20")
    "paper-0.92b": dict(vocab_size=60416, n_layers=40, n_heads=32, n_kv_heads=8, head_dim=64, d_model=2048,
                        mlp_width=2048, max_seq_len=2048, tie_embeddings=False),
    # §3.2: Memory3-2B
    "paper-2.4b": _paper_shape(44, 40, 80),
    # Fig 10: six 2.1–2.4B shapes compared in the warmup stage (l44-h40-d80 is paper-2.4b)
    "fig10-l45-h24-d128": _paper_shape(45, 24, 128),
    "fig10-l48-h48-d64": _paper_shape(48, 48, 64),
    "fig10-l66-h32-d80": _paper_shape(66, 32, 80),
    "fig10-l44-h40-d80": _paper_shape(44, 40, 80),
    "fig10-l30-h48-d80": _paper_shape(30, 48, 80),
    "fig10-l30-h40-d96": _paper_shape(30, 40, 96),
}
