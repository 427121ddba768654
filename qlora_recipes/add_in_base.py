"""`lora.add_in_base=true`: each LoRA layer on a routed nf4 base (quant.compiled_dequant) has its scaled B output
added by the base product itself.

PEFT computes a LoRA layer as `base(x) + lora_B(lora_A(dropout(x))) * scaling`. Compiled, the base product and lora_B's
product each write a full-width tensor (tokens x out_features), and the kernel that consumes the layer's output
(the SwiGLU after gate/up, the residual add after o_proj and down_proj) reads both and adds them. Here lora_B's
product runs first and the base product is `torch.addmm(lora_B's output, x, W.t(), beta=scaling)`: the GEMM reads it
in its epilogue, where a compute-bound product has memory bandwidth to spare, and the consumer reads one tensor
instead of two. On the Llama-2-7B shape the MLP's three SwiGLU kernels read gate's and up's two outputs each (docs/
gpu.md call CH: 355-484 us a call at 8,132 tokens), the forward and each recompute: about 1 GB a block less to read.
lora.fused_add is the other order (the add in lora_B's rank-8 GEMM), which ran 0.94x on an H200.

The arithmetic is PEFT's to float rounding: the same dropout draws in the same order (the base layer draws none),
the same products; the GEMM scales and adds in float32 before its one rounding. Its backward passes the gradient on
to lora_B's output scaled, as PEFT's multiplication does.

Layers whose base the routing does not reach run PEFT's forward: bases not routed by dequant.py, bases whose output
trainer.keep_projections keeps for the recompute (the kept output must be the base's alone), inputs in a wider dtype
than the base's compute dtype, and every layer fused_add.py's `adapter_of` does not compute (DoRA and other
variants, LoRA bias, merged or disabled adapters).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from qlora_recipes.fused_add import adapter_of, subclass


def reaches(layer: Any) -> bool:
    """Whether the layer's base product can add its LoRA output: a routed nf4 base (dequant.py) without bias whose
    output no recompute reuses."""
    base = layer.base_layer
    return getattr(base, "routed", False) and not getattr(base, "kept_output", False) and base.bias is None


def forward(self: Any, peft_forward: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """PEFT's 4-bit LoRA forward (`peft_forward`, the layer class's own) with the scaled lora_B output added by the
    base product (see the module's docstring)."""
    # an input wider than the compute dtype (a float32 residual stream, quant.upcast_unquantized) would round the LoRA
    # output to the compute dtype with the base's, where PEFT adds it in the input's: PEFT's forward then
    same_dtype = (self.base_layer.compute_dtype or x.dtype) == x.dtype
    adapter = not args and not kwargs and same_dtype and reaches(self) and adapter_of(self)
    if not adapter:
        return peft_forward(self, x, *args, **kwargs)
    lora_A, lora_B = self.lora_A[adapter], self.lora_B[adapter]
    cast = not torch.is_autocast_enabled()  # PEFT's 4-bit layers cast the LoRA side's input only without autocast
    output = lora_B(lora_A(self.lora_dropout[adapter](self._cast_input_dtype(x, lora_A.weight.dtype) if cast else x)))
    return self.base_layer(x, add=output, beta=self.scaling[adapter])


@functools.cache
def routed(cls: type) -> type:
    """The subclass of a 4-bit LoRA layer class whose base product adds the LoRA output: one per class, so that
    every block's layers share one type and a compiled block one graph. lean_recompute's routing subclasses it."""
    return subclass(cls, forward, "add_in_base")


def install(model: Any) -> int:
    """Route every 4-bit LoRA layer on a routed nf4 base whose adapter the forward computes; returns how many."""
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:  # no bitsandbytes: no 4-bit layers
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, Linear4bit) and reaches(module) and adapter_of(module):
            if not getattr(module, "add_in_base", False):
                module.__class__ = routed(type(module))
            count += 1
    return count
