"""`model.attn_implementation=varlen`: packed sequences through PyTorch's own flash-attention varlen kernel.

Padding-free packing (TRL's collator under `trainer.packing=true`) concatenates a micro-batch's sequences into
one row and sends their boundaries with it (`cu_seq_lens_q/k`, `max_length_q/k`, computed on the CPU). sdpa
cannot use them: it attends through a block-diagonal mask of the whole row, which either sends it to the cuDNN
kernel (~1 ms of host-side planning a call at a new length) or to the memory-efficient kernel (~3.7x cuDNN's
GPU time on the 7B shape; docs/gpu.md, seventh session). `torch.nn.attention.varlen.varlen_attn` (torch >= 2.10, CUDA)
runs flash attention over each sequence of the row, no mask, causal within each.

Registered with transformers as the attention implementation "varlen"; batches without boundaries (evaluation
without packing, generation) and tensors off CUDA (a trained adapter evaluated on the CPU) go through
transformers' sdpa, with sdpa's mask.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

NAME = "varlen"


def available() -> bool:
    """torch ships the varlen kernel (2.10 and later)."""
    import importlib.util

    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


@dataclass(frozen=True)
class Kernel:
    """A `varlen_attn` and how this torch spells its options, read once from its signature (inspect cannot run
    inside a compiled block): causal is `is_causal=True` in torch 2.10 and `window_size=(-1, 0)` later; grouped-
    query attention needs the key/value heads repeated where there is no `enable_gqa`."""

    fn: Any
    causal: tuple[tuple[str, Any], ...]
    enable_gqa: bool

    @classmethod
    def of(cls, fn: Any) -> Kernel:
        params = inspect.signature(fn).parameters
        causal = (("window_size", (-1, 0)),) if "window_size" in params else (("is_causal", True),)
        return cls(fn, causal, "enable_gqa" in params)

    def options(self, scale: float | None, groups: int) -> tuple[dict[str, Any], bool]:
        """Keywords for a call, and whether the caller must repeat the key/value heads first."""
        options = dict(self.causal)
        if scale is not None:
            options["scale"] = scale
        gqa = groups > 1 and self.enable_gqa
        if gqa:
            options["enable_gqa"] = True
        return options, groups > 1 and not gqa


def compute_dtype(query: Any) -> Any:
    """Flash attention runs in bf16/fp16. A QLoRA block hands it float32 queries (k-bit preparation keeps the norms
    in float32) under bf16 autocast, which the kernel, a custom op, does not see: cast to autocast's dtype, as sdpa
    is cast by autocast itself."""
    import torch

    if query.dtype in (torch.bfloat16, torch.float16):
        return query.dtype
    device = query.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    raise ValueError(
        f"model.attn_implementation=varlen: flash attention needs bf16 or fp16, got {query.dtype} outside autocast; "
        "train with trainer.precision=bf16"
    )


def packed_attention(
    query: Any, key: Any, value: Any, bounds: dict[str, Any], scale: Any, kernel: Kernel, dtype: Any = None
) -> Any:
    """Causal attention within each sequence of one packed row: (1, heads, tokens, head_dim) tensors in,
    (1, tokens, heads, head_dim) out in `dtype`, through `kernel` (varlen_attn's contract) with the collator's
    boundaries."""
    groups = query.shape[1] // key.shape[1]
    options, repeat = kernel.options(scale, groups)
    if repeat:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    q, k, v = (t[0].transpose(0, 1).to(dtype or query.dtype) for t in (query, key, value))  # (tokens, heads, head_dim)
    cu_q, cu_k, max_q, max_k = (bounds[name] for name in BOUNDS)
    return kernel.fn(q, k, v, cu_q, cu_k, max_q, max_k, **options).unsqueeze(0)


BOUNDS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")  # what TRL's padding-free collator adds


def varlen_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: Any = None,
    *,
    kernel: Kernel | None = None,
    **kwargs,
) -> tuple[Any, None]:
    """transformers' attention-function contract: query/key/value (batch, heads, tokens, head_dim) in, output
    (batch, tokens, heads, head_dim) out. A padding-free batch is one row, cut at its sequences' boundaries;
    `kernel` is bound by register()."""
    packed = all(kwargs.get(name) is not None for name in BOUNDS) and query.shape[0] == 1
    if kernel is None or not packed or dropout or not query.is_cuda:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    return packed_attention(query, key, value, kwargs, scaling, kernel, compute_dtype(query)), None


def register() -> None:
    """Make "varlen" a valid `attn_implementation` (idempotent), bound to this torch's kernel (none before torch
    2.10: sdpa throughout); its mask is sdpa's, for the sdpa fallback."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    kernel = None
    if available():
        from torch.nn.attention.varlen import varlen_attn

        kernel = Kernel.of(varlen_attn)
    AttentionInterface.register(NAME, functools.partial(varlen_attention, kernel=kernel))
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
