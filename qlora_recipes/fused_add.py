"""`lora.fused_add=true`: each LoRA layer's B product, scale and add to the base output as one matrix product.

PEFT computes a LoRA layer as `base(x) + lora_B(lora_A(dropout(x))) * scaling`. lora_B's product writes a
full-width tensor (tokens x out_features), which the scale and the add read back (fused into one kernel when the
block is compiled); in the backward, the scale multiplies the full-width gradient before lora_B's two products read
it. Here the three are one `torch.addmm(base, h, lora_B.weight.t(), alpha=scaling)`: the GEMM reads the base output
and writes the sum, and its backward passes the gradient to the base output as it is and scales only lora_B's small
results (tokens x r and out_features x r). Per layer that is one full-width tensor written and read less in the
forward (and in each recompute), and one full-width scaling pass less in the backward.

The arithmetic is PEFT's to float rounding: the same dropout draws in the same order (the base layer, then the LoRA
side), the same products and dtypes; the GEMM scales and adds in float32 before its one rounding. lora_A's side
runs through its own module, so `lora.lean_dropout` composes with it.

Layers it does not know (DoRA and other variants, LoRA bias, merged or disabled adapters, mixed adapters, extra
forward arguments, a lora_B that is not a bias-free nn.Linear) run PEFT's forward; a base output and LoRA side of
different dtypes take PEFT's own ops after the base layer.

Measured on an H200 beside bench's `optimized` in one call (docs/gpu.md call BX): 0.94x the tokens/s at 0.21 GiB less
reserved memory. cuBLAS's GEMM with an inner dimension of 8 does not beat the product and the compiler's fused add.
On CPU the two were within the noise. So it is off by default: a memory option.
"""

from __future__ import annotations

import functools
from typing import Any

import torch


def adapter_of(layer: Any) -> str | None:
    """The active adapter of a LoRA layer that `forward` computes, else None (checked at every call: adapters can
    be switched, merged or disabled)."""
    adapters = [name for name in layer.active_adapters if name in layer.lora_A]
    if layer.disable_adapters or layer.merged or len(adapters) != 1 or adapters[0] in layer.lora_variant:
        return None
    lora_B = layer.lora_B[adapters[0]]
    return adapters[0] if type(lora_B) is torch.nn.Linear and lora_B.bias is None else None


def forward(self: Any, peft_forward: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """PEFT's LoRA forward (`peft_forward`, the layer class's own) with lora_B's product, scale and add as one addmm
    (see the module's docstring)."""
    adapter = not args and not kwargs and adapter_of(self)
    if not adapter:
        return peft_forward(self, x, *args, **kwargs)
    from peft.tuners.lora import Linear as LoraLinear

    result = self.base_layer(x)
    lora_A, lora_B = self.lora_A[adapter], self.lora_B[adapter]
    # PEFT's input cast for the LoRA side: its nn.Linear layer always casts, its 4- and 8-bit layers not under
    # (CUDA's) autocast
    cast = isinstance(self, LoraLinear) or not torch.is_autocast_enabled()
    h = lora_A(self.lora_dropout[adapter](self._cast_input_dtype(x, lora_A.weight.dtype) if cast else x))
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else lora_B.weight.dtype
    if not result.dtype == h.dtype == dtype:  # addmm takes one dtype: PEFT's own ops on these
        output = lora_B(h) * self.scaling[adapter]
        if isinstance(self, LoraLinear):
            return (result + output).to(result.dtype)
        return result + (output.to(result.dtype) if cast else output)
    flat = torch.addmm(
        result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), lora_B.weight.t(), alpha=self.scaling[adapter]
    )
    return flat.view(result.shape)


def kinds() -> tuple[type, ...]:
    """PEFT's LoRA layer classes on a linear base (nn.Linear, bitsandbytes' 4- and 8-bit)."""
    from peft.tuners.lora import Linear as LoraLinear

    try:
        from peft.tuners.lora.bnb import Linear4bit, Linear8bitLt
    except ImportError:  # no bitsandbytes
        return (LoraLinear,)
    return (LoraLinear, Linear4bit, Linear8bitLt)


def subclass(cls: type, routed_forward: Any, flag: str) -> type:
    """A subclass of the LoRA layer class `cls`, of the same name and marked by the attribute `flag`, whose forward is
    `routed_forward(self, cls.forward, x, ...)`: the class's own forward is what it falls back on."""

    def forward_(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return routed_forward(self, cls.forward, x, *args, **kwargs)

    return type(cls.__name__, (cls,), {"forward": forward_, flag: True})


@functools.cache
def routed(cls: type) -> type:
    """The subclass of a LoRA layer class whose forward fuses the add: one per class, so that every block's layers
    share one type and a compiled block one graph. Other routings (lean_recompute's) subclass it."""
    return subclass(cls, forward, "fused_add")


def install(model: Any) -> int:
    """Route every LoRA layer of a known kind whose adapter `forward` computes; returns how many layers."""
    count, known = 0, kinds()
    for module in model.modules():
        if isinstance(module, known) and adapter_of(module):
            if not getattr(module, "fused_add", False):
                module.__class__ = routed(type(module))
            count += 1
    return count
