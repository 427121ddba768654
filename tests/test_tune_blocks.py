"""Per-block speed settings (runner.tune_blocks): regional torch.compile and ZeRO-3 leaf blocks."""

import pytest
import torch
from torch._logging._internal import log_state

from qlora_recipes.errors import RecipeError
from qlora_recipes.resolve import Device
from qlora_recipes.runner import COMPILE_VARIANTS, decoder_blocks, setup_model, setup_tokenizer, tune_blocks


def tiny_model(recipe_of, checkpoint, *overrides):
    resolved = recipe_of("model=tiny_llama", "template.add_tokens=false", "lora.dropout=0", *overrides)
    tokenizer, new_ids = setup_tokenizer(resolved.recipe, checkpoint)
    torch.manual_seed(0)
    return resolved.recipe, setup_model(resolved, checkpoint, tokenizer, new_ids)


def loss_and_grads(model, length=50):  # not 64, the hidden size: dynamo would equate the two
    ids = torch.arange(3, 3 + length).unsqueeze(0)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return loss.detach(), grads


def test_compiled_blocks_share_one_graph_and_train_like_eager(recipe_of, tiny_checkpoint):
    """Both blocks run one compiled graph (no per-block recompiles), checkpointed, with eager's loss and
    gradients; parameter names (what the adapter is saved under) do not change."""
    from torch._dynamo.utils import counters

    recipe, model = tiny_model(
        recipe_of, tiny_checkpoint, "quant=none", "trainer.gradient_checkpointing=true", "trainer.torch_compile=true"
    )
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})  # as the Trainer does
    model.enable_input_require_grads()
    model.train()
    for name, param in model.named_parameters():
        if "lora_B" in name:  # non-zero, so that lora_A's gradients are not zero in both runs
            torch.nn.init.normal_(param, std=0.02)
    names = [n for n, _ in model.named_parameters()]
    eager_loss, eager_grads = loss_and_grads(model)
    torch._dynamo.reset()
    counters.clear()
    tune_blocks(model, recipe)
    blocks = decoder_blocks(model)
    assert len(blocks) == 2 and all(b._compiled_call_impl is not None for b in blocks)
    for _ in range(2):
        loss, grads = loss_and_grads(model)
    assert counters["stats"]["unique_graphs"] == 1
    loss_and_grads(model, length=40)  # packed batches change length every step: still the same graph
    assert counters["stats"]["unique_graphs"] == 1
    assert torch._dynamo.config.recompile_limit >= COMPILE_VARIANTS
    assert log_state.is_artifact_enabled("recompiles")  # a stalled step's recompile is explained in the log
    assert [n for n, _ in model.named_parameters()] == names
    assert loss.item() == pytest.approx(eager_loss.item(), rel=1e-5)
    assert grads.keys() == eager_grads.keys() and len(grads) == 28
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-4, atol=1e-5)


def test_tune_blocks_names_what_it_cannot_find(recipe_of):
    recipe = recipe_of("trainer.torch_compile=true").recipe
    with pytest.raises(RecipeError, match="names no decoder block class"):
        tune_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)), recipe)


def test_zero3_leaf_blocks_mark_each_decoder_block(recipe_of, tiny_checkpoint):
    """DeepSpeed fetches a leaf module's parameters as one unit: every decoder block, nothing else."""
    ds_utils = pytest.importorskip("deepspeed.utils")  # the `deepspeed` extra; CUDA machines have it
    _, model = tiny_model(recipe_of, tiny_checkpoint, "quant=none")
    gpus = Device(kind="cuda", count=2, bf16=True)  # ZeRO-3 recipes resolve only for CUDA machines
    leaf = ("model=tiny_llama", "quant=none", "trainer.batch_size=16", "dist=zero3", "dist.zero3_leaf_blocks=true")
    recipe = recipe_of(*leaf, device=gpus).recipe
    tune_blocks(model, recipe)
    blocks = decoder_blocks(model)
    assert len(blocks) == 2 and all(ds_utils.z3_leaf_module(block) for block in blocks)
    assert sum(ds_utils.z3_leaf_module(m) for m in model.modules()) == 2
    assert all(b._compiled_call_impl is None for b in blocks)  # trainer.torch_compile is off


def test_compiled_dequant_blocks_share_one_graph_and_match_bitsandbytes(recipe_of, tiny_checkpoint):
    """quant.compiled_dequant: the nf4 layers (double-quantized, bf16 storage as llama2_chatml) are routed before the
    blocks compile; both blocks still share one graph, and loss and gradients are bitsandbytes' eager ones."""
    from torch._dynamo.utils import counters

    recipe, model = tiny_model(
        recipe_of,
        tiny_checkpoint,
        "quant=nf4",
        "quant.double_quant=true",
        "quant.storage_dtype=bfloat16",
        "model.dtype=float32",
        "trainer.torch_compile=true",
        "quant.compiled_dequant=true",
        "trainer.gradient_checkpointing=true",
    )
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})  # as the Trainer does
    model.enable_input_require_grads()
    model.train()
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    eager_loss, eager_grads = loss_and_grads(model)
    torch._dynamo.reset()
    counters.clear()
    tune_blocks(model, recipe)
    routed = [m for m in model.modules() if getattr(m, "routed", False)]
    assert len(routed) == 14  # 7 linear layers in each of the 2 blocks
    for length in (50, 50, 40):
        loss, grads = loss_and_grads(model, length)
        if length == 50:
            assert loss.item() == pytest.approx(eager_loss.item(), rel=1e-5)
            for name, grad in grads.items():
                torch.testing.assert_close(grad, eager_grads[name], rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
