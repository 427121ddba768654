"""trainer.offload_checkpoints (offload.py): checkpointed block inputs held off the device until the backward."""

import functools

import pytest
import torch
import torch.utils.checkpoint as cp
from conftest import loss_and_grads, tiny_model, train_checkpointed

from qlora_recipes import offload
from qlora_recipes.offload import CheckpointOffload, Stored
from qlora_recipes.runner import decoder_blocks

REENTRANT = functools.partial(cp.checkpoint, use_reentrant=True)


class Traced(CheckpointOffload):
    """Records each pack, unpack and fetch (by the order the tensors were stored) to check the backward's order."""

    def __init__(self, device):
        super().__init__(device)
        self.events, self.ids, self.items = [], {}, []

    def pack(self, tensor, side=False):
        item = super().pack(tensor, side=side)
        if isinstance(item, Stored):
            self.ids[id(item)] = len(self.ids)
            self.items.append(item)
            self.events.append(("pack", self.ids[id(item)]))
        return item

    def unpack(self, item):
        if isinstance(item, Stored):
            self.events.append(("unpack", self.ids[id(item)]))
        return super().unpack(item)

    def fetch(self, item):
        if item.fetched is None:
            self.events.append(("fetch", self.ids[id(item)]))
        super().fetch(item)


def chain(offloader, blocks, x):
    for block in blocks:
        x = offloader.checkpoint(REENTRANT, block, x) if offloader else REENTRANT(block, x)
    return x


def test_backward_fetches_each_block_input_one_block_ahead(monkeypatch):
    """Four checkpointed blocks: each input is stored once in the forward, and its device tensor let go when the next
    is stored, so after the forward only the last block's is held; the backward uses that one in place, and unpacking
    block k's input starts the fetch of block k-1's, so each other is fetched once, before its block's recompute
    asks for it; and the gradients are those of the checkpoints kept in memory."""
    monkeypatch.setattr(offload, "MIN_BYTES", 1024)
    torch.manual_seed(0)
    blocks = [torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh()) for _ in range(4)]
    x = torch.randn(32, 64, requires_grad=True)  # 8 KiB: stored
    chain(None, blocks, x).square().sum().backward()
    expected = [x.grad.clone(), *(p.grad.clone() for b in blocks for p in b.parameters())]
    x.grad = None
    for b in blocks:
        b.zero_grad()

    traced = Traced("cpu")
    out = chain(traced, blocks, x)
    assert [item.source is not None for item in traced.items] == [False, False, False, True]
    out.square().sum().backward()
    assert traced.events == [
        *(("pack", k) for k in range(4)),
        ("unpack", 3), ("fetch", 2),
        ("unpack", 2), ("fetch", 1),
        ("unpack", 1), ("fetch", 0),
        ("unpack", 0),
    ]  # fmt: skip
    assert traced.stored == 4 and traced.fetched == 3 and traced.held == []
    assert all(item.source is None for item in traced.items)
    got = [x.grad, *(p.grad for b in blocks for p in b.parameters())]
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)


def test_small_tensors_and_parameters_stay_where_they_are(monkeypatch):
    monkeypatch.setattr(offload, "MIN_BYTES", 1024)
    off = CheckpointOffload("cpu")
    small, param = torch.randn(4, 4), torch.nn.Parameter(torch.randn(64, 64))
    strided = torch.randn(64, 64).t()
    assert off.pack(small) is small and off.pack(param) is param and off.pack(strided) is strided
    big = torch.randn(64, 64)
    item = off.pack(big)
    assert isinstance(item, Stored) and torch.equal(off.unpack(item), big) and item.fetched is None
    assert off.unpack(small) is small


def test_a_new_forward_does_not_fetch_the_last_ones_inputs(monkeypatch):
    """Micro-batches one after another: the first input of a forward links to the last of the one before, whose graph
    has been freed by its backward; nothing is fetched for it (nor for each forward's last, used in place)."""
    monkeypatch.setattr(offload, "MIN_BYTES", 1024)
    blocks = [torch.nn.Linear(64, 64) for _ in range(3)]
    off = CheckpointOffload("cpu")
    for _ in range(3):
        chain(off, blocks, torch.randn(32, 64, requires_grad=True)).sum().backward()
    assert off.stored == 9 and off.fetched == 6


def test_install_routes_the_tiny_llamas_blocks_and_trains_identically(recipe_of, tiny_checkpoint, monkeypatch):
    """On the tiny 4-bit Llama under reentrant checkpointing (as the Trainer enables it): both decoder blocks go
    through the offloader, a second install wraps nothing twice, and loss and gradients equal those without it."""
    monkeypatch.setattr(offload, "MIN_BYTES", 1024)  # the tiny model's hidden states are 50 x 64 floats
    _, model = tiny_model(recipe_of, tiny_checkpoint)
    train_checkpointed(model)
    loss, grads = loss_and_grads(model)
    off = CheckpointOffload(model.device)  # the CUDA path where there is a GPU
    blocks = decoder_blocks(model)
    assert off.install(blocks) == len(blocks) == 2
    assert off.install(blocks) == 2
    assert all(b._gradient_checkpointing_func.args[0].func is cp.checkpoint for b in blocks)
    offloaded_loss, offloaded_grads = loss_and_grads(model)
    assert off.stored == 2 and off.fetched == 1  # the last block's input is used in place
    assert torch.equal(offloaded_loss, loss)
    assert offloaded_grads.keys() == grads.keys() and len(grads) == 28
    for name, grad in grads.items():
        assert torch.equal(offloaded_grads[name], grad), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offloaded_checkpoints_free_gpu_memory_and_keep_the_gradients():
    """On CUDA (side-stream copies, pinned memory), 8 checkpointed blocks with 64 MiB inputs: the same gradients as
    with the checkpoints kept on the GPU, and after the forward the GPU holds only the last of the 7 inputs the blocks
    made (the backward's first), and the forward reserves memory for a few of them, not for each."""
    torch.manual_seed(0)
    width, rows, n = 4096, 8192, 8
    size = rows * width * 2  # bf16
    blocks = [torch.nn.Linear(width, width, dtype=torch.bfloat16, device="cuda") for _ in range(n)]
    x = torch.randn(rows, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def run(offloader):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        start, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
        torch.cuda.reset_peak_memory_stats()
        out = chain(offloader, blocks, x)
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - start
        grown = torch.cuda.max_memory_reserved() - reserved
        out.float().square().sum().backward()
        torch.cuda.synchronize()
        grads = [x.grad.clone(), *(b.weight.grad.clone() for b in blocks)]
        x.grad = None
        for b in blocks:
            b.zero_grad(set_to_none=True)
        return held, grown, grads

    kept_held, _, kept = run(None)
    off = CheckpointOffload("cuda")
    offloaded_held, grown, offloaded = run(off)
    assert off.stored == n and off.fetched == n - 1  # x too, though its caller keeps it
    assert kept_held >= n * size and offloaded_held <= 2 * size + (1 << 20)  # the output and the last input
    # each block's output reuses an input let go of, instead of fresh memory for every input whose copy the host has
    # not yet seen complete (record_stream's rule)
    assert grown <= 4 * size
    for a, b in zip(offloaded, kept, strict=True):
        assert torch.equal(a, b)


def test_kept_projections_are_offloaded_beside_the_checkpoints_and_fetched_in_turn(
    recipe_of, tiny_checkpoint, monkeypatch
):
    """trainer.keep_projections with the offloader (tiny 4-bit Llama, sublayer checkpoints): q/k/v's kept outputs go
    through the same hooks as the checkpoints' inputs, five tensors a block in the forward, and the backward unpacks
    them in exactly the reverse order, each fetched once, one ahead; the loss and gradients equal those without it."""
    from qlora_recipes.runner import tune_blocks

    monkeypatch.setattr(offload, "MIN_BYTES", 1024)
    results = {}
    for keep in ("[]", "[q_proj,k_proj,v_proj]"):
        recipe, model = tiny_model(
            recipe_of,
            tiny_checkpoint,
            "lora.dropout=0.1",
            "trainer.gradient_checkpointing=true",
            "trainer.use_reentrant=true",
            "trainer.checkpoint_sublayers=true",
            f"trainer.keep_projections={keep}",
        )
        train_checkpointed(model)
        tune_blocks(model, recipe)
        traced = Traced(model.device)
        traced.install(decoder_blocks(model))
        torch.manual_seed(1)
        ids = torch.arange(3, 53).unsqueeze(0)
        loss = model(input_ids=ids, labels=ids).loss
        held = [item.source is not None for item in traced.items]  # between the forward and the backward
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results[keep] = loss.detach(), grads, traced, held
    (loss, grads, plain, _), (kept_loss, kept_grads, traced, held) = results["[]"], results["[q_proj,k_proj,v_proj]"]
    assert plain.stored == 4 and traced.stored == 10  # 2 blocks: 2 inputs, or 2 inputs and 3 kept outputs
    packs = [k for event, k in traced.events if event == "pack"]
    unpacks = [k for event, k in traced.events if event == "unpack"]
    fetches = [k for event, k in traced.events if event == "fetch"]
    assert packs == list(range(10)) and unpacks == packs[::-1]
    # each block stores its attention input, q, k, v, then its MLP input; after the forward the last block's kept
    # outputs and MLP input (6-9) are still held, and the backward uses them in place. Unpacking a checkpoint's
    # input fetches everything the backward unpacks before the next checkpoint input, that one included: after
    # the first block's MLP input (4), its v, k, q and attention input (3-0) at once
    assert held == [False] * 6 + [True] * 4
    assert fetches == [5, 4, 3, 2, 1, 0] and traced.fetched == 6 and traced.held == []
    mlp_input = traced.events.index(("unpack", 4))
    assert traced.events[mlp_input + 1 : mlp_input + 6] == [*(("fetch", k) for k in (3, 2, 1, 0)), ("unpack", 3)]
    for k in fetches:
        assert traced.events.index(("fetch", k)) < traced.events.index(("unpack", k))
    assert torch.equal(kept_loss, loss)
    assert kept_grads.keys() == grads.keys() and len(grads) == 28
    for name, grad in grads.items():
        torch.testing.assert_close(kept_grads[name], grad, rtol=1e-5, atol=1e-7)
