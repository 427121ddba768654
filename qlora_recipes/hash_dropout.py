"""`lora.hash_dropout=true`: each LoRA layer's dropout masks from an integer hash instead of Philox.

nn.Dropout's masks, eager or compiled, come from Philox4x32-10: about a hundred integer instructions an element
(inductor's `tl.rand` makes one Philox call for each element and uses one of its four outputs). On an H200 the
compiled kernel that normalises an attention sublayer's input and draws q/k/v's three masks takes 390 us at 8,192 x
4,096 tokens, against 41 us for the norm alone; it writes 416 MB, ~134 us at the norm's rate, so most of it is the
random numbers (docs/gpu.md, twenty-eighth session, scripts/norm_dropout_kernels.py).

Here each mask is a keyed hash of the element's index: a keyed affine map (an odd multiplier, so a bijection), then
a 32-bit xor-shift-multiply mixer. That is about a dozen int32 operations an element, fused by the compiler into the
kernel around it as Philox is. An element is kept when the low 24 bits of its hash are at least round(p * 2**24),
with probability 1 - p to within 2**-25; the kept ones are scaled by 1 / (1 - p), as nn.Dropout does. Each call
draws its two key words from torch's generator, so a checkpoint's recompute (which restores the generator's state)
draws the same keys and so the same masks. The masks are other draws than nn.Dropout's: a run with it and one
without are equally likely, not equal.

A compiled backward hashes the masks again from their keys instead of keeping them: nn.Dropout's masks are random
draws, so the partitioner must save each one, a bool tensor written in the forward and read in the backward. On
CPU one 7B-shaped compiled block keeps 359 instead of 428 MiB at 2,048 tokens, and under sublayer checkpointing each
attention and MLP recompute keeps 177 and 145 instead of 215 and 177 MiB (scripts/block_saved_bytes.py,
docs/performance.md; keep_mask says why it builds each index in two parts).

The keys must be drawn once, as a tensor: inductor inlines its own random ops into their consumers, so the hashing
kernel would draw both key words again for every element (a Philox call each). The runner therefore compiles with
inductor's `fallback_random` (aten's draws) when this is on. The first two GPU runs (docs/gpu.md calls BY, CB) had
the inlined keys: 0.99x and 1.04x. With the keys drawn once, on an H100 beside bench's off4slk: 1.04x (0.592 against
0.619 s a step; call CC, thirty-first session). scripts/norm_dropout_kernels.py's sublayer input side (8,192 x 4,096,
forward and backward) took 4.47 ms there against nn.Dropout's 4.62 and 4.11 without dropout. Recipes keep it off
(their masks stay PEFT's); bench's `optimized` turns it on on GPUs.
"""

from __future__ import annotations

from typing import Any

import torch

KEEP_BITS = 24  # the hash bits compared with the threshold


def mix(h: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit mixing function on int32 (xor-shift-multiply; the multiplications wrap around). The
    masks after each shift make it a logical one."""
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * 0x7FEB352D
    h = h ^ ((h >> 15) & 0x1FFFF)
    h = h * -0x7B935975  # 0x846CA68B as int32
    return h ^ ((h >> 16) & 0xFFFF)


def keep_mask(shape: torch.Size, key: torch.Tensor, p: float) -> torch.Tensor:
    """The elements a dropout of probability p keeps, for a tensor of `shape`, from `key` (two int32 words)."""
    numel = shape.numel()
    if numel >= 2**31:
        raise ValueError(f"hash dropout indexes elements with int32; this tensor has {numel} (2**31 or more)")
    # index * odd + key[1], a keyed affine map of the flat index (an odd multiplier: a bijection), then the mixer.
    # The index is row * cols + col, so the map is a row part plus a column part (int32 arithmetic wraps, so the two
    # agree bit for bit), each a small tensor with the key in it. A full-size index would be one tensor for all
    # masks of a shape (the compiler merges equal expressions), and the partitioner then saves each mask for the
    # backward instead of hashing it again from its key: a bool tensor per mask written and read back.
    cols = shape[-1] if shape else 1
    odd = key[0] | 1
    row = torch.arange(shape[:-1].numel(), dtype=torch.int32, device=key.device) * (odd * cols)
    col = torch.arange(cols, dtype=torch.int32, device=key.device) * odd + key[1]
    h = mix((row[:, None] + col).view(shape))
    return (h & (2**KEEP_BITS - 1)) >= round(p * 2**KEEP_BITS)


def draw_key(device: torch.device) -> torch.Tensor:
    """Two int32 words from torch's generator for `device`."""
    return torch.randint(-(2**31), 2**31 - 1, (2,), dtype=torch.int32, device=device)


class HashDropout(torch.nn.Dropout):
    """nn.Dropout with hashed masks (see the module's docstring); the same module otherwise, so code that checks for
    a dropout finds one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return x * keep_mask(x.shape, draw_key(x.device), self.p) * (1.0 / (1.0 - self.p))


def install(model: Any) -> int:
    """Replace each LoRA layer's dropout (an nn.Dropout with p > 0) by a HashDropout of the same p; returns how many
    layers have one."""
    from peft.tuners.lora import LoraLayer

    count = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for name, dropout in list(module.lora_dropout.items()):
            if type(dropout) is torch.nn.Dropout and dropout.p > 0:
                module.lora_dropout[name] = HashDropout(dropout.p).train(dropout.training)
            count += isinstance(module.lora_dropout[name], HashDropout)
    return count
