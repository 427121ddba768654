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

Side tensors (`hooks(side=True)`: the outputs keep_projections.py saves right after a checkpoint, for that
checkpoint's recompute) are stored back to back, with no compute between them. So a side tensor is held until the
next checkpoint input after the one that follows it (the next sublayer has run by then) instead of being let go by
the next store, whose wait on its copy would stall the compute stream; and fetching a tensor fetches all the side
tensors before it together with the next checkpoint input, which the backward unpacks back to back (on the Llama-2-7B
shape, waiting for each in turn made the step 1.22x longer: docs/gpu.md call BO).

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

    __slots__ = ("host", "copied", "source", "fetched", "ready", "previous", "side", "__weakref__")

    def __init__(self, host: Any, copied: Any, source: Any, previous: Any, side: bool = False) -> None:
        self.host = host
        self.copied = copied
        self.source = source
        self.fetched = None
        self.ready = None
        self.previous = previous
        self.side = side


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
        self.held: list[Stored] = []  # the Stored whose device tensors are kept, oldest first
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

    def pack(self, tensor: Any, side: bool = False) -> Any:
        if not self.worth(tensor):
            return tensor
        import torch

        if not side:  # let go of all but the side tensors stored since the last checkpoint input
            last = max((k for k, item in enumerate(self.held) if not item.side), default=-1)
            for item in self.held[: last + 1]:
                self.release(item)
            self.held = self.held[last + 1 :]
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
        item = Stored(host, copied, source, self.last, side)
        self.last = weakref.ref(item)
        self.held.append(item)
        self.stored += 1
        return item

    def release(self, item: Stored) -> None:
        """Give a held tensor's memory back: the compute stream's later work waits for its copy to the host."""
        if item.source is None:
            return
        if item.copied is not None:
            import torch

            torch.cuda.current_stream(self.device).wait_event(item.copied)
        item.source = None

    def unpack(self, item: Any) -> Any:
        if not isinstance(item, Stored):
            return item
        if item.source is not None:  # among the last ones stored, still on the device: no fetch
            tensor = item.source
            self.held = [other for other in self.held if other is not item]
            self.release(item)  # its memory stays in use by the backward's reference
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
        """Start fetching what the backward reaches next: the tensors stored before `item`, up to and including the
        first that is not a side tensor (the input of the checkpoint before)."""
        previous = item.previous() if item.previous is not None else None
        while previous is not None:
            if previous.source is None:  # not still held on the device
                self.fetch(previous)
            if not previous.side:
                return
            previous = previous.previous() if previous.previous is not None else None

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
        with self.hooks():
            return checkpoint_func(function, *args, **kwargs)

    def hooks(self, side: bool = False) -> Any:
        """The saved-tensor hooks that move what is saved under them; `side`: tensors saved right after a checkpoint,
        for its recompute (keep_projections.py)."""
        import torch

        return torch.autograd.graph.saved_tensors_hooks(functools.partial(self.pack, side=side), self.unpack)

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


def side_hooks(checkpoint_func: Any) -> Any:
    """The saved-tensor hooks for side tensors of `checkpoint_func`'s checkpoints: the offloader's, when it is one of
    the functions `CheckpointOffload.install` set, else none (a context that does nothing)."""
    import contextlib

    offloader = getattr(getattr(checkpoint_func, "func", None), "__self__", None)
    if isinstance(checkpoint_func, functools.partial) and isinstance(offloader, CheckpointOffload):
        return offloader.hooks(side=True)
    return contextlib.nullcontext()
