"""§3.5 explicit memories as one attention call reads them (`MemoryKV`), and the memory-head scatter.

Only the memory heads of the memory layers hold memories; `scatter_heads` spreads them over all KV heads
(the other heads get empty slots), the one place every attention path does that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .config import Memory3Config


@dataclass
class MemoryKV:
    """Explicit memories as one attention call reads them.

    keys, values: (B, C, L_mem, H_mem, M, d_h) — C chunks, M = memory slots per chunk (memories x tokens),
                  keys already rotated by RoPE at their reference positions.
    mask:         (B, C, M) or (B, C, L_mem, H_mem, M) bool, True where a slot holds a real token; None = all.
    bias:         (B, C, L_mem, H_mem, M) float or None: a log-weight added to each slot's attention score. Only
                  the soft token selection of continual training sets it (`TrainConfig.soft_selection`: a slot
                  whose token is barely selected weighs little); a bias of log 2 counts a slot twice. The
                  paper's hard format, banks and decoding have none.
    usage:        None, or a dict the fused prefill fills with each memory layer's attention received per slot
                  ({layer: (B, C, H_mem, M)}, no gradient; `TrainConfig.selection_distill` reads it).
    probe:        None, or the zero tensor (B, C, L_mem, H_mem, M), with autograd, added to `bias` so that the
                  loss's gradient with respect to each slot's log-weight can be read
                  (`TrainConfig.selection_target="attribution"`; training only).
    Query t of a forward call reads chunk `query_chunks[t]` (default: t // chunk_length, clipped to C-1).
    """

    keys: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    usage: dict | None = None
    probe: torch.Tensor | None = None

    @property
    def n_chunks(self) -> int:
        return self.keys.shape[1]

    @property
    def slots(self) -> int:
        return self.keys.shape[-2]

    def validate(self, cfg: Memory3Config, batch: int, dtype: torch.dtype) -> None:
        want = (batch, "C", len(cfg.memory_layers), len(cfg.memory_heads), "M", cfg.head_dim)
        for name, t in (("keys", self.keys), ("values", self.values)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"MemoryKV.{name} must be a torch.Tensor, got {type(t).__name__}")
            ok = t.dim() == 6 and t.shape[0] == batch and tuple(t.shape[2:4]) == want[2:4] and t.shape[5] == want[5]
            if not ok:
                raise ValueError(f"MemoryKV.{name} has shape {tuple(t.shape)}; expected {want} "
                                 f"(batch, chunks, memory layers, memory heads, slots, head_dim)")
            if t.dtype != dtype:
                raise ValueError(f"MemoryKV.{name} has dtype {t.dtype}; the model runs in {dtype}")
        if self.keys.shape != self.values.shape:
            raise ValueError(f"MemoryKV keys {tuple(self.keys.shape)} and values {tuple(self.values.shape)} differ")
        if self.mask is not None:
            B, C, Lm, Hm, M, _ = self.keys.shape
            if self.mask.dtype != torch.bool or tuple(self.mask.shape) not in ((B, C, M), (B, C, Lm, Hm, M)):
                raise ValueError(f"MemoryKV.mask must be bool of shape {(B, C, M)} or {(B, C, Lm, Hm, M)}, "
                                 f"got {self.mask.dtype} {tuple(self.mask.shape)}")
        if self.bias is not None:
            B, C, Lm, Hm, M, _ = self.keys.shape
            if not self.bias.is_floating_point() or tuple(self.bias.shape) != (B, C, Lm, Hm, M):
                raise ValueError(f"MemoryKV.bias must be float of shape {(B, C, Lm, Hm, M)}, "
                                 f"got {self.bias.dtype} {tuple(self.bias.shape)}")

    def full_mask(self) -> torch.Tensor:
        B, C, Lm, Hm, M, _ = self.keys.shape
        if self.mask is None:
            return torch.ones(B, C, Lm, Hm, M, dtype=torch.bool, device=self.keys.device)
        if self.mask.dim() == 3:
            return self.mask[:, :, None, None, :].expand(B, C, Lm, Hm, M)
        return self.mask

    def layer(self, li: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Memory layer `li`'s keys and values (B, C, H_mem, M, d_h) and which slots hold a token (B, C, H_mem, M)."""
        return self.keys[:, :, li], self.values[:, :, li], self.full_mask()[:, :, li]

    def layer_bias(self, li: int) -> torch.Tensor | None:
        """Memory layer `li`'s slot log-weights (B, C, H_mem, M), or None (the hard format: every slot weighs 1)."""
        return None if self.bias is None else self.bias[:, :, li]

    def chunk_of_queries(self, query_chunks: torch.Tensor | None, past: int, B: int, T: int, chunk_length: int,
                         device) -> torch.Tensor:
        """The chunk each of a call's T queries reads: `query_chunks` ((T,) or (B, T)) checked, by default
        (past + t) // chunk_length - the first chunk of the call, clipped to [0, C-1]."""
        if query_chunks is None:
            first = past // chunk_length
            query_chunks = ((torch.arange(past, past + T, device=device) // chunk_length) - first)
            return query_chunks.clamp(0, self.n_chunks - 1)
        if (tuple(query_chunks.shape) not in ((T,), (B, T)) or int(query_chunks.min()) < 0
                or int(query_chunks.max()) >= self.n_chunks):
            raise ValueError(f"query_chunks must be ({T},) or ({B}, {T}) with values in [0, {self.n_chunks})")
        return query_chunks


def scatter_heads(x: torch.Tensor, heads: Sequence[int], n_kv_heads: int, dim: int, fill: float = 0) -> torch.Tensor:
    """`x`, whose axis `dim` runs over the memory heads `heads`, laid out over all `n_kv_heads` KV heads; the other
    heads hold `fill` (an empty slot; a log-sum-exp of "no slot"). `x` itself when every KV head is a memory head."""
    if x.shape[dim] == n_kv_heads:
        return x
    shape = list(x.shape)
    shape[dim] = n_kv_heads
    return x.new_full(shape, fill).index_copy(dim, torch.tensor(heads, device=x.device), x)
