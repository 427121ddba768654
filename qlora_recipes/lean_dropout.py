"""`lora.lean_dropout=true`: each LoRA layer's dropout and A projection as one op that keeps its input, not a copy.

PEFT computes a LoRA layer's side path as `lora_B(lora_A(dropout(x))) * scaling`. For its backward the A
projection keeps its own input, the dropped-out copy of `x` (2 bytes an element in bf16), and the dropout keeps
its mask. torch.compile's partitioner keeps the same: on one Llama-2-7B-shaped block the dropped-out copies are a
third of all the block keeps for its backward (bf16, 2,048 tokens: 428 MiB with them, 289 MiB with this module;
scripts/block_saved_bytes.py). Yet q, k and v read one input, as do gate and up.

Here `dropout(x) @ A.t()` is one custom op (`masked_linear`), opaque to the compiler. It keeps `x` itself, one
storage that the layers sharing an input share, and its bool mask, and recomputes the masked copy in the backward.
The arithmetic is PEFT's: the mask keeps an element with probability 1 - p and the kept ones are scaled by
1 / (1 - p). The masks come from torch's generator, as nn.Dropout's do, so a checkpoint's recompute draws them
again, but they are other draws than nn.Dropout's own.

Measured on an H200 (docs/gpu.md, twentieth session), beside the same run without it: 0.90-0.91x the tokens/s and
0.04 GiB less peak memory. At the GPU run's peak (an MLP backward) the 4-bit layers' outputs and the backward's
own buffers dominate, not dropped-out copies; and the opaque op stops the work around it from fusing (8,977 kernels a step against 7,697). So it is off
by default; the CPU figures above are what it keeps on CPU only.
"""

from __future__ import annotations

import functools
from typing import Any

import torch


@torch.library.custom_op("qlora_recipes::masked_linear", mutates_args=())
def masked_linear(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """(x * mask * scale) @ weight.t(): a dropout with a given mask, then a bias-free linear layer."""
    return (x * mask * scale) @ weight.t()


@masked_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    x, weight, mask, scale = inputs
    ctx.save_for_backward(x, weight, mask)
    ctx.scale = scale


def _backward(ctx: Any, grad: torch.Tensor) -> tuple:
    x, weight, mask = ctx.saved_tensors
    grad_x = (grad @ weight) * mask * ctx.scale if ctx.needs_input_grad[0] else None
    grad_weight = None
    if ctx.needs_input_grad[1]:
        dropped = (x * mask * ctx.scale).reshape(-1, x.shape[-1])
        grad_weight = grad.reshape(-1, grad.shape[-1]).t() @ dropped
    return grad_x, grad_weight, None, None


masked_linear.register_autograd(_backward, setup_context=_setup_context)


def draw_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """The elements a dropout of probability p keeps: each with probability 1 - p, from torch's generator."""
    return torch.rand_like(x) >= p


def forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """lora_A's forward with the dropout in front of it (which install took out of the layer) folded in."""
    if not self.training:
        return torch.nn.functional.linear(x, self.weight)
    return masked_linear(x, self.weight, draw_mask(x, self.dropout_p), 1.0 / (1.0 - self.dropout_p))


@functools.cache
def routed(cls: type) -> type:
    """The subclass of a lora_A class that folds the dropout in: one per class, so that every block's layers share
    one type and the compiled blocks one graph."""
    return type(cls.__name__, (cls,), {"forward": forward, "lean_dropout": True})


def install(model: Any) -> int:
    """Fold each LoRA layer's dropout (nn.Dropout with p > 0) into its A projection (a bias-free nn.Linear; other
    layers, such as embeddings', keep theirs): the dropout becomes an identity and lora_A a subclass of its class
    (names, weights and saving unchanged). Returns how many layers fold it."""
    from peft.tuners.lora import LoraLayer

    count = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for name, dropout in list(module.lora_dropout.items()):
            lora_a = module.lora_A[name] if name in module.lora_A else None
            if getattr(lora_a, "lean_dropout", False):
                count += 1
            elif (
                isinstance(dropout, torch.nn.Dropout)
                and dropout.p > 0
                and type(lora_a) is torch.nn.Linear
                and lora_a.bias is None
            ):
                lora_a.dropout_p = dropout.p
                lora_a.__class__ = routed(type(lora_a))
                module.lora_dropout[name] = torch.nn.Identity()
                count += 1
    return count
