"""`trainer.keep_projections=[q_proj,k_proj,v_proj]`: a sublayer's recompute reuses the frozen outputs of the named
projections from its first forward instead of computing them again.

With `trainer.checkpoint_sublayers` (reentrant) each decoder block is checkpointed as attention, then MLP: the first
forward runs without grad and keeps only the sublayer's input; the backward runs the sublayer again with grad. For a
projection that reads the sublayer's normalized input (q/k/v, gate/up) the recompute's frozen base product is the
same as the first forward's, and its backward does not need it: the input gradient of a frozen layer is `grad @ W`.
So the first forward keeps those base outputs, saved for the backward beside the checkpoint (in host memory with
`trainer.offload_checkpoints`, on the GPU without it), and the recompute uses them in place of the product.
Everything else in the recompute runs as before: the LoRA side (the same dropout draws), RoPE, attention, the norms.

On the Llama-2-7B shape at micro-batch 4 x 2,048 tokens, q/k/v's base outputs are 192 MiB a block and their
products a quarter of a block's weights (50M of 202M), ~14% of a checkpointed step's matrix products; offloaded,
they are copied over PCIe beside the sublayer inputs (128 MiB a block with sublayer checkpoints).

How the kept outputs travel: the first forward of a checkpointed sublayer runs with `KEPT.collect` set, and each
routed base layer appends its output to `KEPT.items` (inside the compiled sublayer too: a side effect the compiler
replays after its graph). Each output is then saved by a `Carry` node applied to the checkpoint's output, one node
a tensor, so the backward unpacks them in the reverse order of their saving (as the offloader prefetches).
Reached in the backward just before the sublayer's own checkpoint (nothing else lies between them), each `Carry`
puts its tensor back on `KEPT.items`, and the recompute's routed layers take them off, last saved first.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from qlora_recipes.schema import FIRST_PROJECTIONS


class _Kept:
    """The first forward's kept outputs (`collect` set: appended) and, in the backward, the ones the next recompute
    (`replay` set) takes (read inside the compiled sublayers, so each state is its own graph)."""

    collect = False
    replay = False
    items: list[torch.Tensor] = []


KEPT = _Kept()


class Replayed(torch.autograd.Function):
    """A frozen base layer's output taken from the first forward: `kept` forward, the input gradient backward (as
    the base layer's own backward computes it). `autocast` is the autocast dtype the layer ran under, or None."""

    @staticmethod
    def forward(ctx, x, kept, base, autocast):
        ctx.base, ctx.x_dtype, ctx.autocast = base, x.dtype, autocast
        return kept.view_as(kept)

    @staticmethod
    def backward(ctx, grad):
        from qlora_recipes.lean_recompute import base_input_grad

        return base_input_grad(ctx.base, grad, ctx.x_dtype, ctx.autocast), None, None, None


def forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The base layer's forward, except in a checkpointed sublayer's first forward (its output kept) and recompute
    (the kept output used)."""
    if KEPT.collect and not torch.is_grad_enabled():
        out = super(type(self), self).forward(x, *args, **kwargs)
        KEPT.items.append(out)
        return out
    if KEPT.replay and KEPT.items and torch.is_grad_enabled() and not args and not kwargs:
        kept = KEPT.items.pop()
        if kept.shape[:-1] != x.shape[:-1] or kept.shape[-1] != self.out_features:
            raise RuntimeError(
                f"trainer.keep_projections: the recompute of a {self.out_features}-wide projection on {tuple(x.shape)} "
                f"found a kept output of {tuple(kept.shape)}: the kept outputs and the recomputes are out of step"
            )
        device = x.device.type
        autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        return Replayed.apply(x, kept, self, autocast)
    return super(type(self), self).forward(x, *args, **kwargs)


@functools.cache
def routed(cls: type) -> type:
    """The subclass of a base layer class that keeps and replays its output: one per class, so that every block's
    layers share one type and the compiled sublayers one graph."""
    return type(cls.__name__, (cls,), {"forward": forward, "kept_output": True})


class Carry(torch.autograd.Function):
    """The identity on a checkpointed sublayer's output that saves one kept output for the backward, where it hands
    it to the sublayer's recompute."""

    @staticmethod
    def forward(ctx, out, kept):
        ctx.save_for_backward(kept)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        (kept,) = ctx.saved_tensors
        KEPT.items.append(kept)
        return grad, None


def replaying(function: Any, *args: Any) -> Any:
    """A checkpointed sublayer's function: in its recompute (with grad), the routed layers take the kept outputs."""
    if not torch.is_grad_enabled():
        return function(*args)
    KEPT.replay = True
    try:
        return function(*args)
    finally:
        KEPT.replay = False


def checkpoint(block: Any, function: Any, hidden_states: Any, count: int) -> Any:
    """`block._gradient_checkpointing_func(function, hidden_states)`, keeping the outputs of the sublayer's `count`
    routed layers for its recompute (only with grad: without, there is no backward to keep them for)."""
    checkpoint_func = block._gradient_checkpointing_func
    if not count or not torch.is_grad_enabled():
        return checkpoint_func(function, hidden_states)
    KEPT.items.clear()  # left by a backward that did not finish
    KEPT.collect = True
    try:
        out = checkpoint_func(functools.partial(replaying, function), hidden_states)
    finally:
        KEPT.collect = False
    kept = list(KEPT.items)
    KEPT.items.clear()
    if len(kept) != count:
        raise RuntimeError(
            f"trainer.keep_projections: the sublayer's first forward ran {len(kept)} of its {count} kept projections"
        )
    from qlora_recipes.offload import side_hooks

    with side_hooks(checkpoint_func):  # offloaded beside the checkpoint's own input
        for tensor in kept:
            out = Carry.apply(out, tensor)
    return out


def keepable(module: Any) -> bool:
    """A frozen base layer whose input gradient `Replayed` computes: nn.Linear, a 4-bit layer or a routed nf4 one."""
    if not isinstance(module, torch.nn.Module) or not hasattr(module, "weight") or module.weight.requires_grad:
        return False
    state = getattr(module.weight, "quant_state", None)
    if state is None:
        return type(module) is torch.nn.Linear or getattr(module, "kept_output", False)
    return getattr(module, "routed", False) or len(state.shape) == 2


def install(block: Any, names: list[str]) -> dict[str, int]:
    """Route the base layers of `names` in one block; returns how many each sublayer (`self_attn`, `mlp`) holds.
    Raises ValueError naming a layer the block lacks or cannot keep."""
    counts = {}
    for sublayer, first in FIRST_PROJECTIONS.items():
        counts[sublayer] = 0
        for name in first:
            if name not in names:
                continue
            layer = getattr(getattr(block, sublayer, None), name, None)
            base = getattr(layer, "base_layer", layer)
            if not keepable(base):
                raise ValueError(
                    f"{type(block).__name__}.{sublayer}.{name} is {type(base).__name__ if base is not None else 'missing'}: "
                    "not a frozen nn.Linear or 4-bit layer"
                )
            if not getattr(base, "kept_output", False):
                base.__class__ = routed(type(base))
            counts[sublayer] += 1
    return counts
