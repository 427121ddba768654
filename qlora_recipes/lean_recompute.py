"""`trainer.lean_recompute=true`: a sublayer's recompute skips the work whose result nothing reads.

With `trainer.checkpoint_sublayers` each decoder block is checkpointed as attention, then MLP, with reentrant
checkpointing: the first forward runs without grad, and the backward runs the sublayer again with grad, only for the
tensors its backward needs, then backpropagates from the recomputed output. The value of that output is thrown away.
A sublayer ends in one LoRA layer (o_proj, down_proj) whose result is only added to the residual: in the recompute,
that layer's frozen base projection and its LoRA B projection, scale and add feed nothing but the discarded output.
Their backward needs none of it either: the input gradient of a frozen projection is `grad @ W`, and LoRA B's
gradients need its input (`lora_A(dropout(x))`, still computed) and its weight.

So in the recompute those two layers run the LoRA A side as PEFT does (the same dropout draws, in the same order:
they are each sublayer's last random numbers) and replace the rest by `DiscardedOutput`, whose forward returns
zeros and whose backward computes what autograd would have from PEFT's code: the base layer's input gradient, as
bitsandbytes' MatMul4Bit, the routed nf4 layer (dequant.py) or nn.Linear compute it, and LoRA B's. On the Llama-2-7B
shape the two are 31% of a block's weights (62M of 202M), so the recompute loses 31% of its matrix products, about
a tenth of a checkpointed step's, with their dequantizations and element-wise passes. Measured on an H200 with the
offload, sublayer checkpoints and micro-batch 4: 1.07x the same without it, 31.2% MFU (docs/gpu.md call BH).

The first forward (no grad) is untouched, as is any forward outside a recompute. Layers it does not know how to
replace (DoRA and other variants, LoRA bias, merged or disabled adapters, mixed adapters, a trainable base
weight, 8-bit bases) run PEFT's forward in the recompute too.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch


class _Recompute:
    """Whether a sublayer's recompute is running; read inside the compiled sublayers, so each of the two states is
    its own graph (dynamo guards on the value)."""

    active = False


RECOMPUTE = _Recompute()


@contextlib.contextmanager
def discarding() -> Any:
    RECOMPUTE.active = True
    try:
        yield
    finally:
        RECOMPUTE.active = False


def run_region(region: Any, block: Any, hidden_states: Any, **kwargs: Any) -> Any:
    """A sublayer as reentrant checkpointing calls it: without grad the first time, with grad in the backward."""
    if not torch.is_grad_enabled():
        return region(block, hidden_states, **kwargs)
    with discarding():
        return region(block, hidden_states, **kwargs)


def base_input_grad(base: Any, grad: torch.Tensor, x_dtype: torch.dtype, autocast: Any) -> torch.Tensor:
    """The input gradient of a frozen base layer, as its own backward computes it (in x's dtype)."""
    weight = base.weight
    state = getattr(weight, "quant_state", None)
    if state is None:  # nn.Linear, under autocast on weight and input cast to its dtype
        dtype = autocast or weight.dtype
        return (grad.to(dtype) @ weight.to(dtype)).to(x_dtype)
    grad = grad.to(base.compute_dtype or x_dtype)  # Linear4bit's input cast, backwards
    if getattr(base, "routed", False):  # dequant.py's Matmul4bit
        from qlora_recipes import dequant

        grad_x = dequant.input_grad(grad, weight, dequant.block_absmax(state), state.code, state.blocksize, state.shape)
    else:  # bitsandbytes' MatMul4Bit
        import bitsandbytes.functional as F

        grad_x = torch.matmul(grad, F.dequantize_4bit(weight.view(-1, 1), state).to(grad.dtype))
    return grad_x.to(x_dtype)


@torch.library.custom_op("qlora_recipes::placeholder", mutates_args=())
def placeholder(x: torch.Tensor, hidden: torch.Tensor, features: int, dtype: torch.dtype) -> torch.Tensor:
    """Zeros in place of a layer's discarded output, as an op opaque to the compiler that reads `hidden`: written
    as zeros the compiler sees that nothing of the forward needs the LoRA A side (needed only by the backward) and
    moves it, dropout included, into the backward graph, which runs after the checkpoint has put the random number
    generator's state back, so the dropout would draw other masks (seen on CPU: tests/test_tune_blocks.py)."""
    return x.new_zeros((*x.shape[:-1], features), dtype=dtype)


@placeholder.register_fake
def _(x: torch.Tensor, hidden: torch.Tensor, features: int, dtype: torch.dtype) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], features), dtype=dtype)


class DiscardedOutput(torch.autograd.Function):
    """`base(x) + lora_B(hidden) * scaling` in a recompute, whose value nothing reads: zeros of the sum's dtype
    forward, the sum's gradients backward (for x through the frozen base layer only: x's LoRA side has its own
    graph). `autocast` is the autocast dtype the forward ran under, or None."""

    @staticmethod
    def forward(ctx, x, hidden, lora_weight, scaling, base, autocast, dtype):
        ctx.save_for_backward(hidden, lora_weight)
        ctx.scaling, ctx.base, ctx.x_dtype, ctx.autocast = scaling, base, x.dtype, autocast
        return placeholder(x, hidden, lora_weight.shape[0], dtype)

    @staticmethod
    def backward(ctx, grad):
        hidden, lora_weight = ctx.saved_tensors
        grad_x = base_input_grad(ctx.base, grad, ctx.x_dtype, ctx.autocast)
        dtype = ctx.autocast or lora_weight.dtype  # lora_B's matmul dtype
        lora_grad = grad.to(dtype) * ctx.scaling
        grad_hidden = (lora_grad @ lora_weight.to(dtype)).to(hidden.dtype)
        flat = lora_grad.reshape(-1, lora_grad.shape[-1]).t() @ hidden.reshape(-1, hidden.shape[-1]).to(dtype)
        return grad_x, grad_hidden, flat.to(lora_weight.dtype), None, None, None, None


def replaceable(layer: Any) -> str | None:
    """The active adapter of a LoRA layer whose recompute DiscardedOutput can stand in for, else None (checked at
    every recompute: adapters can be switched)."""
    base = layer.base_layer
    adapters = [name for name in layer.active_adapters if name in layer.lora_A]
    if layer.disable_adapters or layer.merged or len(adapters) != 1 or adapters[0] in layer.lora_variant:
        return None
    if base.weight.requires_grad or layer.lora_B[adapters[0]].bias is not None:
        return None
    state = getattr(base.weight, "quant_state", None)
    if state is None:
        kind_ok = type(base) is torch.nn.Linear
    else:
        kind_ok = getattr(base, "routed", False) or len(state.shape) == 2
    return adapters[0] if kind_ok else None


def forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """PEFT's forward, except in a sublayer's recompute (see the module's docstring)."""
    adapter = RECOMPUTE.active and torch.is_grad_enabled() and not args and not kwargs and replaceable(self)
    if not adapter:
        return super(type(self), self).forward(x, *args, **kwargs)
    lora_A, lora_B = self.lora_A[adapter], self.lora_B[adapter]
    device = x.device.type
    autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    # PEFT's dtypes: a 4-bit base returns x's dtype, nn.Linear its weight's (or autocast's); the LoRA side runs in
    # its weights' dtype (autocast's under autocast) and is added to the base's result
    quantized = getattr(self.base_layer.weight, "quant_state", None) is not None
    base_dtype = x.dtype if quantized else (autocast or self.base_layer.weight.dtype)
    dtype = torch.promote_types(base_dtype, autocast or base_dtype)
    lora_x = x if autocast else self._cast_input_dtype(x, lora_A.weight.dtype)
    hidden = lora_A(self.lora_dropout[adapter](lora_x))
    return DiscardedOutput.apply(x, hidden, lora_B.weight, self.scaling[adapter], self.base_layer, autocast, dtype)


@functools.cache
def routed(cls: type) -> type:
    """The subclass of a LoRA layer class that skips the discarded work: one per class, so that every block's layers
    share one type and the compiled sublayers one graph."""
    return type(cls.__name__, (cls,), {"forward": forward, "lean_recompute": True})


def last_layers(block: Any) -> list[Any]:
    """The layers that end a Llama-style block's two sublayers: the attention's output and the MLP's down projection."""
    return [block.self_attn.o_proj, block.mlp.down_proj]


def install(blocks: list[Any]) -> int:
    """Route each sublayer's last layer that is a LoRA layer of a replaceable kind through `forward`; returns how
    many layers."""
    from peft.tuners.lora import LoraLayer

    count = 0
    for block in blocks:
        for layer in last_layers(block):
            if isinstance(layer, LoraLayer) and replaceable(layer):
                if not getattr(layer, "lean_recompute", False):
                    layer.__class__ = routed(type(layer))
                count += 1
    return count
