"""lora.lean_dropout: each LoRA layer's dropout folded into its A projection, keeping the input, not a copy."""

import pytest
import torch
from conftest import (
    as_trained,
    checkpointed_grads_match,
    installs_without_changing_names_or_outputs,
    loss_and_grads,
    saved_bytes,
    tiny_model,
    trains_and_reloads,
)

from qlora_recipes import lean_dropout
from qlora_recipes.runner import tune_blocks


def test_masked_linear_is_dropout_then_linear_with_its_gradients():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 3, 5) >= 0.3
    scale = 1 / 0.7
    torch.testing.assert_close(lean_dropout.masked_linear(x, weight, mask, scale), (x * mask * scale) @ weight.t())
    assert torch.autograd.gradcheck(lambda x, w: lean_dropout.masked_linear(x, w, mask, scale), (x, weight))


def test_install_folds_each_dropout_and_changes_no_name_or_output(recipe_of, tiny_checkpoint):
    _, model = tiny_model(recipe_of, tiny_checkpoint, "quant=none", "lora.dropout=0.1")
    installs_without_changing_names_or_outputs(model, lean_dropout.install, 14)  # 7 projections x 2 blocks
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules())


def test_lean_layers_compute_peft_s_loss_and_gradients_for_the_same_masks(recipe_of, tiny_checkpoint, monkeypatch):
    """With the masks lean_dropout drew handed to PEFT's own layers in the same order, the loss and every gradient
    are PEFT's: the same arithmetic, only the saved tensors differ."""
    drawn = []
    draw = lean_dropout.draw_mask
    monkeypatch.setattr(lean_dropout, "draw_mask", lambda x, p: drawn.append(draw(x, p)) or drawn[-1])
    _, lean = tiny_model(recipe_of, tiny_checkpoint, "quant=none", "lora.dropout=0.3")
    as_trained(lean)
    lean_dropout.install(lean)
    loss, grads = loss_and_grads(lean)
    assert len(drawn) == 14 and 0.6 < torch.cat([m.flatten() for m in drawn]).float().mean() < 0.8

    class Replay(torch.nn.Module):  # nn.Dropout(0.3) with the recorded masks
        def forward(self, x):
            return x * drawn.pop(0) / 0.7

    _, peft = tiny_model(recipe_of, tiny_checkpoint, "quant=none", "lora.dropout=0.3")
    as_trained(peft)
    peft.load_state_dict(lean.state_dict())
    for module in peft.modules():
        if hasattr(module, "lora_dropout"):
            module.lora_dropout["default"] = Replay()
    peft_loss, peft_grads = loss_and_grads(peft)
    assert not drawn  # every mask used once
    torch.testing.assert_close(loss, peft_loss)
    assert grads.keys() == peft_grads.keys() and len(grads) == 28
    for name, grad in grads.items():
        torch.testing.assert_close(grad, peft_grads[name])


@pytest.mark.parametrize("compiled", [False, True])
def test_lean_dropout_keeps_less_and_a_checkpoint_recomputes_its_masks(recipe_of, tiny_checkpoint, compiled):
    """Through tune_blocks, eager and compiled: the forward keeps fewer bytes than PEFT's dropout (no dropped-out
    copies), and under reentrant checkpointing the recompute draws the forward's masks again: the gradients of the
    run without checkpointing, same seed."""
    compile_ = f"trainer.torch_compile={str(compiled).lower()}"
    torch._dynamo.reset()
    recipe, peft = tiny_model(recipe_of, tiny_checkpoint, "quant=none", "lora.dropout=0.1", compile_)
    as_trained(peft)
    tune_blocks(peft, recipe)
    loss_and_grads(peft)  # compiles
    peft_bytes = saved_bytes(peft)

    torch._dynamo.reset()
    recipe, lean = tiny_model(
        recipe_of, tiny_checkpoint, "quant=none", "lora.dropout=0.1", compile_, "lora.lean_dropout=true"
    )
    as_trained(lean)
    tune_blocks(lean, recipe)
    assert not any(isinstance(m, torch.nn.Dropout) for m in lean.modules())
    loss_and_grads(lean)
    lean_bytes = saved_bytes(lean)
    assert lean_bytes < 0.85 * peft_bytes
    checkpointed_grads_match(lean)


def test_a_run_with_lean_dropout_trains_and_saves_an_adapter_peft_loads(train_run):
    """Through the CLI on the 4-bit tiny model: the runner folds every layer's dropout, the run trains, and the saved
    adapter (PEFT's own format: lora_A stays an nn.Linear by name and weight) reloads to the same logits."""
    trains_and_reloads(
        train_run,
        "lora.dropout=0.1",
        "lora.lean_dropout=true",
        logged="lora.lean_dropout: 14 LoRA layers keep their input",
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_masked_linear_on_cuda_is_dropout_then_linear(device="cuda"):
    """On CUDA in bf16, compiled: the op is the dropout with its mask then the linear layer, gradients included, and
    it keeps no dropped-out copy (one 4,096-wide input read by three projections, as q/k/v are)."""
    torch.manual_seed(0)
    weights = [torch.randn(8, 4096, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    x = torch.randn(2048, 4096, device=device, dtype=torch.bfloat16, requires_grad=True)
    masks = [lean_dropout.draw_mask(x, 0.1) for _ in weights]

    def loss_of(x, masks):
        return sum(
            lean_dropout.masked_linear(x, w, m, 1 / 0.9).float().square().sum()
            for w, m in zip(weights, masks, strict=True)
        )

    step = torch.compile(loss_of)
    step(x, masks).backward()  # compiles
    x.grad = None
    for w in weights:
        w.grad = None
    ptrs = {w.untyped_storage().data_ptr() for w in weights}
    saved = {}  # storage -> bytes, the weights left out

    def pack(t):
        if t.untyped_storage().data_ptr() not in ptrs:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step(x, masks)
    loss.backward()
    grads = [x.grad.clone(), *(w.grad.clone() for w in weights)]
    x.grad = None
    for w in weights:
        w.grad = None
    reference = sum(
        torch.nn.functional.linear(x * m / 0.9, w).float().square().sum() for w, m in zip(weights, masks, strict=True)
    )
    reference.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-2, atol=0)
    for got, want in zip(grads, [x.grad, *(w.grad for w in weights)], strict=True):  # bf16: summed in other orders
        assert (got.float() - want.float()).norm() < 1e-2 * want.float().norm()
    assert sum(saved.values()) < 3 * x.nbytes  # x once and three bool masks: 2.5x; with bf16 copies besides: 5.5x
