"""`trainer.offload_checkpoints`: the block inputs that reentrant gradient checkpointing keeps for the backward are
held in pinned host memory between a micro-batch's forward and its backward, so the GPU keeps no block's checkpoint.

Forward: each checkpointed block's input is copied to host memory on a side stream while the next block computes
(no host-GPU sync). The offloader holds the input until the next block's input is stored; then the compute stream
waits for the first copy (long done by then) and the memory goes back to the allocator, to be reused at once in the
host's order. (Marking the tensor with `record_stream` instead leaves its memory unusable until the host sees the
copy complete; the host runs far ahead of a GPU-bound forward, so every input it is ahead by sat in fresh memory.
On the 7B shape at micro-batch 4 with two checkpoints a block that reserved 7.30 GiB at 5.69 allocated; released in
stream order, 6.13: docs/gpu.md calls BE, BF.)
The last input stored is still on the GPU when the backward starts, which needs it first: it is used in place.
Backward: the blocks come back in reverse order, and fetching one block's input also starts the copy of the block
before it, so each is on the GPU before its recompute needs it and at most two are there at once.

It takes reentrant checkpointing (`torch.utils.checkpoint` with use_reentrant=True), whose checkpoint function saves
the block's tensor inputs with `save_for_backward`, where saved-tensor hooks reach them; the non-reentrant
checkpoint keeps its inputs by reference instead. Without CUDA the same bookkeeping runs with plain copies (tests)."""

from __future__ import annotations

import functools
import weakref
from typing import Any

MIN_BYTES = 1 << 20  # smaller saved tensors (none of a block's hidden states) stay where they are


class Stored:
    """One offloaded tensor: its host copy and the event that says the copy is complete; the device tensor itself
    until the offloader releases it; while fetched, its device copy and the event that says it has arrived; and
    (weakly) the tensor offloaded just before it, which the backward needs next."""

    __slots__ = ("host", "copied", "source", "fetched", "ready", "previous", "__weakref__")

    def __init__(self, host: Any, copied: Any, source: Any, previous: Any) -> None:
        self.host = host
        self.copied = copied
        self.source = source
        self.fetched = None
        self.ready = None
        self.previous = previous


class CheckpointOffload:
    """Saved-tensor hooks for the checkpointed blocks of one model on one device (`install` puts them in place);
    `stored` and `fetched` count tensors moved each way."""

    def __init__(self, device: Any) -> None:
        import torch

        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # accelerate's device on one GPU is "cuda", tensors' cuda:N
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.last: Any = None  # weak reference to the latest Stored: the next one's predecessor
        self.held: Stored | None = None  # the latest Stored while its device tensor is kept
        self.stored = 0
        self.fetched = 0

    def worth(self, tensor: Any) -> bool:
        import torch

        return (
            tensor.device == self.device
            and not isinstance(tensor, torch.nn.Parameter)
            and tensor.is_contiguous()
            and tensor.numel() * tensor.element_size() >= MIN_BYTES
        )

    def pack(self, tensor: Any) -> Any:
        if not self.worth(tensor):
            return tensor
        import torch

        self.release()
        source = tensor.detach()
        copied = None
        if self.stream is None:
            host = source.clone()
        else:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the block that made it has run
            with torch.cuda.stream(self.stream):
                host = torch.empty(source.shape, dtype=source.dtype, pin_memory=True)
                host.copy_(source, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(self.stream)
        item = Stored(host, copied, source, self.last)
        self.last = weakref.ref(item)
        self.held = item
        self.stored += 1
        return item

    def release(self) -> None:
        """Give the held tensor's memory back: the compute stream's later work waits for its copy to the host."""
        item, self.held = self.held, None
        if item is None or item.source is None:
            return
        if item.copied is not None:
            import torch

            torch.cuda.current_stream(self.device).wait_event(item.copied)
        item.source = None

    def unpack(self, item: Any) -> Any:
        if not isinstance(item, Stored):
            return item
        if item.source is not None:  # the last one stored, still on the device: no fetch
            tensor = item.source
            self.release()  # only the held one has a source; its memory stays in use by the backward's reference
            self.fetch_previous(item)
            return tensor
        self.fetch(item)
        self.fetch_previous(item)
        tensor, item.fetched = item.fetched, None
        if self.stream is not None:
            import torch

            torch.cuda.current_stream(self.device).wait_event(item.ready)
        return tensor

    def fetch_previous(self, item: Stored) -> None:
        previous = item.previous() if item.previous is not None else None
        if previous is not None:
            self.fetch(previous)  # the block the backward reaches next

    def fetch(self, item: Stored) -> None:
        if item.fetched is not None:
            return
        self.fetched += 1
        if self.stream is None:
            item.fetched = item.host.clone()
            return
        import torch

        # Allocated on the compute stream, which uses it: side-stream allocations sit in that stream's own pool. On
        # the 7B shape at micro-batch 4 they left 7.21 GiB reserved at 6.38 allocated; this way, 6.78 (docs/gpu.md,
        # calls AW and AX)
        current = torch.cuda.current_stream(self.device)
        item.fetched = torch.empty(item.host.shape, dtype=item.host.dtype, device=self.device)
        self.stream.wait_stream(current)  # the compute stream's earlier uses of that memory come first
        with torch.cuda.stream(self.stream):  # after this stream's copy to the host, so the host copy is complete
            item.fetched.copy_(item.host, non_blocking=True)
            item.ready = torch.cuda.Event()
            item.ready.record(self.stream)

    def checkpoint(self, checkpoint_func: Any, function: Any, *args: Any, **kwargs: Any) -> Any:
        """A module's `_gradient_checkpointing_func`, with what it saves for the backward offloaded."""
        import torch

        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            return checkpoint_func(function, *args, **kwargs)

    def install(self, blocks: list[Any]) -> int:
        """Route each gradient-checkpointed block through `checkpoint`, after gradient checkpointing was enabled
        (which sets each block's `_gradient_checkpointing_func`). Returns how many blocks are routed."""
        count = 0
        for block in blocks:
            func = getattr(block, "_gradient_checkpointing_func", None)
            if func is None or not getattr(block, "gradient_checkpointing", False):
                continue
            if not (isinstance(func, functools.partial) and func.func == self.checkpoint):
                block._gradient_checkpointing_func = functools.partial(self.checkpoint, func)
            count += 1
        return count
