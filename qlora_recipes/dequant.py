"""`quant.compiled_dequant=true`: 4-bit weights dequantized by torch ops inside the compiled decoder blocks.

bitsandbytes' 4-bit matmul is an opaque custom op to torch.compile: every call runs its Python wrapper (checks,
buffer allocations, the nested-absmax dequantization, the 4-bit dequantization, then the matmul), ~235 us of host
time a call on the 7B shape, ~900 calls a step (docs/performance.md). Written as torch ops instead, inductor
fuses the whole dequantization (nested absmax included) into one kernel per weight and launches it and the matmul
from the compiled block's own code.

The arithmetic is bitsandbytes': element 2i of a weight sits in the high nibble of byte i and 2i+1 in the low
one, each indexes the 16-entry code (`quant_state.code`), times its block's absmax in float32, rounded once to the
compute dtype; a nested absmax is `state2.code[byte] * state2.absmax[block // 256] + offset`. The backward
dequantizes again instead of keeping the weight, as bitsandbytes' MatMul4Bit does, so memory stays the same.
Used for nf4 weights of one process per GPU (single, ddp); other layers keep bitsandbytes' path. On the Llama-2-7B
shape bitsandbytes' dequantization kernels take 22-23 ms of a GPU-bound 0.6 s step (docs/gpu.md call CH); this ran
1.02x and 1.01x beside it on two H100s (calls CE, CF) at equal memory, so bench's `optimized` turns it on on GPUs
(recipes keep it off).
"""

from __future__ import annotations

import functools
from typing import Any

import torch


def dequantize(packed: Any, absmax: Any, code: Any, blocksize: int, shape: Any, dtype: Any, again: bool = False) -> Any:
    """A 4-bit weight of `shape` in `dtype` from its packed bytes (any storage dtype) and float32 block absmax.

    `again` (the backward's call) splits the bytes with division instead of shifts: the same nibbles, but other
    ops, so that the compiler's common-subexpression pass does not merge it with the forward's dequantization, which
    would make the partitioner keep the forward's weight for the backward (a materialized weight is never
    recomputed) and hold a block's dequantized weights in memory, what re-dequantizing is for."""
    data = packed.reshape(-1).view(torch.uint8)
    high, low = (torch.div(data, 16, rounding_mode="floor"), data % 16) if again else (data >> 4, data & 0x0F)
    nibbles = torch.stack((high, low), dim=-1).reshape(-1).to(torch.int32)
    values = code[nibbles].view(-1, blocksize) * absmax.view(-1, 1)
    return values.to(dtype).view(shape)


def block_absmax(quant_state: Any) -> Any:
    """The float32 absmax of every block, dequantizing the nested (double-quantized) statistics when present."""
    if not quant_state.nested:
        return quant_state.absmax
    nested = quant_state.state2
    index = torch.arange(quant_state.absmax.numel(), device=quant_state.absmax.device) // nested.blocksize
    return nested.code[quant_state.absmax.to(torch.int32)] * nested.absmax[index] + quant_state.offset


class Matmul4bit(torch.autograd.Function):
    """x @ W.t() with W dequantized in the forward and again in the backward (only the packed weight is kept); with
    `add`, `beta * add + x @ W.t()` as one `addmm`, the GEMM reading `add` in its epilogue (lora.add_in_base)."""

    @staticmethod
    def forward(ctx, x, packed, absmax, code, blocksize, shape, add, beta):
        ctx.save_for_backward(packed, absmax, code)
        ctx.blocksize, ctx.shape, ctx.beta = blocksize, shape, beta
        weight = dequantize(packed, absmax, code, blocksize, shape, x.dtype)
        if add is None:
            return x @ weight.t()
        flat = torch.addmm(add.reshape(-1, add.shape[-1]), x.reshape(-1, x.shape[-1]), weight.t(), beta=beta)
        return flat.view(add.shape)

    @staticmethod
    def backward(ctx, grad):
        packed, absmax, code = ctx.saved_tensors
        grad_x = input_grad(grad, packed, absmax, code, ctx.blocksize, ctx.shape)
        grad_add = grad * ctx.beta if ctx.needs_input_grad[6] else None
        return grad_x, None, None, None, None, None, grad_add, None


def input_grad(grad: Any, packed: Any, absmax: Any, code: Any, blocksize: int, shape: Any) -> Any:
    """The input gradient of x @ W.t(), W dequantized again (also lean_recompute.py's, for the routed layers)."""
    return grad @ dequantize(packed, absmax, code, blocksize, shape, grad.dtype, again=True)


def eligible(module: Any) -> bool:
    """An nf4 Linear4bit whose weight splits into whole blocks: the layers this path computes."""
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    if state is None or state.quant_type != "nf4" or len(state.shape) != 2:
        return False
    rows, cols = state.shape
    return (rows * cols) % state.blocksize == 0


def forward(self: Any, x: Any, add: Any = None, beta: float = 1.0) -> Any:
    """Linear4bit.forward's contract (input cast to the compute dtype, output back to the input's dtype); `add`
    (x's shape but the output width), scaled by `beta`, is added by the product itself (lora.add_in_base)."""
    dtype = x.dtype
    x = x.to(self.compute_dtype or dtype)
    state = self.weight.quant_state
    add = None if add is None else add.to(x.dtype)
    out = Matmul4bit.apply(
        x, self.weight, block_absmax(state), state.code, state.blocksize, tuple(state.shape), add, beta
    )
    if self.bias is not None:
        out = out + self.bias.to(out.dtype)
    return out.to(dtype)


@functools.cache
def routed(cls: type) -> type:
    """The subclass of a Linear4bit class that computes through this path: one per class, so that every block's
    layers share one type and the compiled blocks one graph."""
    return type(cls.__name__, (cls,), {"forward": forward, "routed": True})


def install(model: Any) -> int:
    """Route every eligible 4-bit layer of `model` through this path (a subclass of its class, so isinstance checks
    and saving are unchanged); returns how many layers."""
    import bitsandbytes as bnb

    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and eligible(module):
            if not getattr(module, "routed", False):
                module.__class__ = routed(type(module))
            count += 1
    return count
