"""§2 Def 1 hook points: read or replace any activation of the network (TransformerLens-style), for circuits.

`HookPoint` is an identity module with a name; a `HookedModel` can add hook functions for a while (`hooks`) and
record activations, with their gradients if asked (`run_with_cache`: Def 1's edge weights). `zero_attention_edge`
and `zero_mlp_neuron` build the ablations behind Def 1's causal weights.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator

import torch
import torch.nn as nn

HookFn = Callable[[torch.Tensor, "HookPoint"], "torch.Tensor | None"]


class HookPoint(nn.Module):
    """Identity module with a name; functions added to it may read or replace the tensor passing through."""

    def __init__(self) -> None:
        super().__init__()
        self.name = ""
        self.fns: list[HookFn] = []

    def add_hook(self, fn: HookFn) -> None:
        self.fns.append(fn)

    def remove_hooks(self) -> None:
        self.fns.clear()

    @property
    def active(self) -> bool:
        return bool(self.fns)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fn in self.fns:
            out = fn(x, self)
            if out is not None:
                x = out
        return x


class HookedModel(nn.Module):
    """A model whose `HookPoint`s are named by their module path (`name_hook_points`, once built); `key_index`
    reads `self.cfg` (a Memory3Config) for the layout of the attention key axis."""

    def name_hook_points(self) -> None:
        for name, mod in self.named_modules():
            if isinstance(mod, HookPoint):
                mod.name = name

    def hook_points(self) -> dict[str, HookPoint]:
        return {m.name: m for m in self.modules() if isinstance(m, HookPoint)}

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Iterable[tuple[str, HookFn]]) -> Iterator["HookedModel"]:
        """Temporarily add hook functions: `with model.hooks([("blocks.0.attn.hook_pattern", fn)]): ...`."""
        points = self.hook_points()
        added = []
        try:
            for name, fn in fwd_hooks:
                if name not in points:
                    raise KeyError(f"no hook point named {name!r}; see model.hook_points()")
                points[name].add_hook(fn)
                added.append((points[name], fn))
            yield self
        finally:
            for hp, fn in added:
                hp.fns.remove(fn)

    def run_with_cache(self, idx: torch.Tensor, *, names: Iterable[str] | Callable[[str], bool] | None = None,
                       keep_grad: bool = False, fwd_hooks: Iterable[tuple[str, HookFn]] = (), **kw):
        """Forward pass that records activations at hook points: returns (ModelOutput, {name: tensor}).

        keep_grad=True keeps the recorded tensors in the autograd graph and retains their gradients, so
        after `out.loss.backward()` each `cache[name].grad` is d loss / d activation (Def 1 edge weights).
        """
        points = self.hook_points()
        if names is None:
            selected = list(points)
        elif callable(names):
            selected = [n for n in points if names(n)]
        else:
            selected = list(names)
            missing = [n for n in selected if n not in points]
            if missing:
                raise KeyError(f"no hook points named {missing}")
        cache: dict[str, torch.Tensor] = {}

        def record(x: torch.Tensor, hook: HookPoint) -> torch.Tensor | None:
            if not keep_grad:
                cache[hook.name] = x.detach()
                return None
            if not x.requires_grad:  # frozen weights: make the activation a leaf so it still gets a gradient
                x = x.detach().requires_grad_(True)
            x.retain_grad()
            cache[hook.name] = x
            return x

        with self.hooks(list(fwd_hooks) + [(n, record) for n in selected]):
            out = self(idx, **kw)
        return out, cache

    def key_index(self, layer: int, context_pos: int, memory_slots: int = 0) -> int:
        """Index along the key axis of layer `layer`'s scores/pattern for context position `context_pos`
        (memory_slots = C·M of the call, counted only in memory layers)."""
        mem = memory_slots if layer in self.cfg.memory_layers else 0
        return self.cfg.prefix_length + mem + context_pos

    @contextlib.contextmanager
    def _hooks_suspended(self) -> Iterator[None]:
        saved = {hp: hp.fns for hp in self.hook_points().values()}
        try:
            for hp in saved:
                hp.fns = []
            yield
        finally:
            for hp, fns in saved.items():
                hp.fns = fns


def zero_attention_edge(layer: int, head: int, query_pos: int, key_index: int,
                        batch_index: int | None = None) -> tuple[str, HookFn]:
    """Hook that zeroes one attention edge a_{i,j}^{l,h} (after softmax), as in Def 1's causal weight.
    key_index is along the key axis (see `Memory3.key_index`); batch_index limits it to one batch row, so
    one batch can ablate a different edge per row."""
    rows = slice(None) if batch_index is None else batch_index

    def fn(pattern: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        pattern = pattern.clone()
        pattern[rows, head, query_pos, key_index] = 0
        return pattern
    return f"blocks.{layer}.attn.hook_pattern", fn


def zero_mlp_neuron(layer: int, position: int, neuron: int, batch_index: int | None = None) -> tuple[str, HookFn]:
    """Hook that zeroes MLP neuron m of layer l at one position (an MLP edge of Def 1)."""
    rows = slice(None) if batch_index is None else batch_index

    def fn(act: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        act = act.clone()
        act[rows, position, neuron] = 0
        return act
    return f"blocks.{layer}.mlp.hook_post", fn
