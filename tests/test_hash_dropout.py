"""lora.hash_dropout: each LoRA layer's dropout masks from a keyed integer hash of the element's index."""

import pytest
import torch
import torch._inductor.config
from conftest import (
    as_trained,
    checkpointed_grads_match,
    installs_without_changing_names_or_outputs,
    loss_and_grads,
    tiny_model,
    train_checkpointed,
    trains_and_reloads,
)

from qlora_recipes import hash_dropout
from qlora_recipes.runner import tune_blocks


@pytest.fixture(autouse=True)
def _fallback_random_restored():
    """tune_blocks sets inductor's fallback_random process-wide for a compiled lora.hash_dropout run: each test here
    starts from it off and leaves it as it was."""
    with torch._inductor.config.patch(fallback_random=False):
        yield


def reference_mix(h):
    """hash_dropout.mix on Python integers, modulo 2**32."""
    h &= 0xFFFFFFFF
    h ^= h >> 16
    h = (h * 0x7FEB352D) & 0xFFFFFFFF
    h ^= h >> 15
    h = (h * 0x846CA68B) & 0xFFFFFFFF
    return h ^ (h >> 16)


def test_mix_is_the_32_bit_mixer_with_wrapping_int32_arithmetic():
    values = torch.tensor([0, 1, 2, 12345, -1, -(2**31), 2**31 - 1, 0x7FEB352D, -0x1234567], dtype=torch.int32)
    got = [v & 0xFFFFFFFF for v in hash_dropout.mix(values).tolist()]
    assert got == [reference_mix(v) for v in values.tolist()]
    assert len(set(got)) == len(got)  # a bijection: no two inputs alike


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_masks_keep_each_element_with_probability_one_minus_p_independently(p):
    shape = torch.Size([2048, 2048])
    g = torch.Generator().manual_seed(0)
    keys = [torch.randint(-(2**31), 2**31 - 1, (2,), dtype=torch.int32, generator=g) for _ in range(2)]
    first, second = (hash_dropout.keep_mask(shape, key, p).float() for key in keys)
    n = shape.numel()
    assert abs(first.mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
    limit = 5 / n**0.5  # correlations of independent masks: ~N(0, 1/n)

    def corr(a, b):
        return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()

    assert abs(corr(first.flatten()[:-1], first.flatten()[1:])) < limit  # neighbours in a row
    assert abs(corr(first[:-1], first[1:])) < limit  # neighbours in a column
    assert abs(corr(first, second)) < limit  # another key
    near = keys[0].clone()
    near[1] += 1  # a key one apart
    assert abs(corr(first, hash_dropout.keep_mask(shape, near, p).float())) < limit


@pytest.mark.parametrize("shape", [(3, 50, 16), (64, 257), (7,), (), (2, 0, 5), (4, 3, 0)])
def test_the_mask_hashes_each_element_s_flat_index(shape):
    """keep_mask splits the keyed map of the flat index into a row part and a column part: the same bits."""
    shape = torch.Size(shape)
    key = torch.tensor([-0x2468ACE, 0x13579BD], dtype=torch.int32)
    index = torch.arange(shape.numel(), dtype=torch.int32).view(shape)
    h = hash_dropout.mix(index * (key[0] | 1) + key[1])
    expected = (h & (2**hash_dropout.KEEP_BITS - 1)) >= round(0.1 * 2**hash_dropout.KEEP_BITS)
    got = hash_dropout.keep_mask(shape, key, 0.1)
    assert got.shape == shape and torch.equal(got, expected)


def test_the_compiled_backward_hashes_the_masks_again_instead_of_saving_them():
    """Three dropouts of one tensor (q/k/v's), compiled as tune_blocks compiles them: the forward saves each mask's
    key and two small index vectors, no mask (with a full-size index, one tensor for the three, the partitioner saved
    two of them), and the gradients are eager's, same seed."""

    class Three(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(8, 256)) for _ in range(3))
            self.drop = torch.nn.ModuleList(hash_dropout.HashDropout(0.1) for _ in range(3))

        def forward(self, x):
            y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
            return sum((d(y) @ a.t()).square().sum() for a, d in zip(self.a, self.drop, strict=True))

    model = Three().double()  # float64: the compiled and eager sums then agree to ~1e-12
    x = torch.randn(512, 256, dtype=torch.float64, requires_grad=True)

    def saved_and_grads(step):
        saved = []
        torch.manual_seed(5)
        hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t)
        with torch._inductor.config.patch(fallback_random=True), hooks:
            loss = step(x)
        return saved, torch.autograd.grad(loss, [x, *model.a])

    torch._dynamo.reset()
    saved, compiled = saved_and_grads(torch.compile(model, dynamic=True))
    assert not [t for t in saved if t.dtype == torch.bool]
    assert sorted({t.numel() for t in saved if t.dtype == torch.int32}) == [2, 256, 512]  # key, column, row
    _, eager = saved_and_grads(model)
    for got, expected in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, expected)


def test_forward_and_backward_are_a_dropout_with_the_hashed_mask():
    x = torch.randn(3, 50, 16, dtype=torch.float64, requires_grad=True)
    layer = hash_dropout.HashDropout(0.3)
    torch.manual_seed(7)
    mask = hash_dropout.keep_mask(x.shape, hash_dropout.draw_key(x.device), 0.3)
    torch.manual_seed(7)
    y = layer(x)
    torch.testing.assert_close(y, x * mask * (1 / 0.7), rtol=0, atol=0)  # nn.Dropout scales so too
    y.sum().backward()
    torch.testing.assert_close(x.grad, mask.double() * (1 / 0.7), rtol=0, atol=0)
    assert not torch.equal(layer(x), layer(x))  # a new key each call
    assert layer.eval()(x) is x and hash_dropout.HashDropout(0.0)(x) is x
    assert isinstance(layer, torch.nn.Dropout) and layer.p == 0.3


def test_the_index_must_fit_int32():
    with pytest.raises(ValueError, match="2\\*\\*31 or more"):
        hash_dropout.keep_mask(torch.Size([2**16, 2**15]), torch.zeros(2, dtype=torch.int32), 0.1)


def test_compiled_with_aten_s_random_draws_each_key_once_and_eager_s_masks():
    """With inductor's own random ops the key draw is inlined into the hashing kernel, every element drawing it
    again (Philox per element: what the hash replaces); with `fallback_random` (as tune_blocks sets) it is one aten
    draw and the compiled masks are eager's, same seed."""
    from torch._inductor.utils import run_and_get_code

    layer = hash_dropout.HashDropout(0.1)
    x = torch.randn(64, 256)
    for fallback in (False, True):
        with torch._inductor.config.patch(fallback_random=fallback):
            torch._dynamo.reset()
            torch.manual_seed(3)
            compiled, code = run_and_get_code(torch.compile(lambda x: layer(x * 2), dynamic=True), x)
        code = "\n".join(code)
        assert ("randint64" in code) is not fallback  # in the kernel, per element
        assert ("torch.ops.aten.randint.low(" in code) is fallback  # once, as a tensor
    torch.manual_seed(3)
    torch.testing.assert_close(compiled, layer(x * 2), rtol=0, atol=0)


def test_install_replaces_each_lora_dropout_and_changes_no_name_or_output(recipe_of, tiny_checkpoint):
    _, model = tiny_model(recipe_of, tiny_checkpoint, "quant=none", "lora.dropout=0.1")
    installs_without_changing_names_or_outputs(model, hash_dropout.install, 14)  # 7 projections x 2 blocks
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    assert len(dropouts) == 14 and all(type(m) is hash_dropout.HashDropout and not m.training for m in dropouts)


@pytest.mark.parametrize("compiled", [False, True])
def test_a_checkpoint_s_recompute_draws_the_forward_s_masks(recipe_of, tiny_checkpoint, compiled):
    """Through tune_blocks, eager and compiled: the masks are applied (the gradients differ from a step without
    dropout), and under reentrant checkpointing the recompute draws the forward's keys again: the gradients of the
    run without checkpointing, same seed."""
    torch._dynamo.reset()
    flag = f"trainer.torch_compile={str(compiled).lower()}"
    recipe, model = tiny_model(
        recipe_of, tiny_checkpoint, "quant=none", "lora.dropout=0.1", flag, "lora.hash_dropout=true"
    )
    as_trained(model)
    tune_blocks(model, recipe)
    assert torch._inductor.config.fallback_random is compiled
    assert sum(type(m) is hash_dropout.HashDropout for m in model.modules()) == 14
    loss_and_grads(model)  # compiles
    whole = checkpointed_grads_match(model)
    model.eval()  # no dropout: other gradients
    _, undropped = loss_and_grads(model)
    assert any(not torch.allclose(undropped[name], grad) for name, grad in whole.items())


def test_on_the_gpu_stack_each_recompute_hashes_the_forward_s_masks(recipe_of, tiny_checkpoint):
    """bench's GPU `optimized` on CPU (compiled, reentrant sublayer checkpoints, lean recompute, q/k/v's outputs kept;
    not the offload, which needs CUDA) with hashed masks: the loss and gradients of the same compiled model without
    checkpointing, same seed."""
    stack = (
        "trainer.gradient_checkpointing=true",
        "trainer.use_reentrant=true",
        "trainer.checkpoint_sublayers=true",
        "trainer.lean_recompute=true",
        "trainer.keep_projections=[q_proj,k_proj,v_proj]",
    )
    results = []
    for overrides in ((), stack):
        torch._dynamo.reset()
        recipe, model = tiny_model(
            recipe_of, tiny_checkpoint, "quant=none", "lora.dropout=0.1", "lora.hash_dropout=true",
            "trainer.torch_compile=true", *overrides,
        )  # fmt: skip
        (train_checkpointed if overrides else as_trained)(model)
        tune_blocks(model, recipe)
        loss_and_grads(model)  # compiles
        torch.manual_seed(1)
        results.append(loss_and_grads(model))
    (loss, grads), (stack_loss, stack_grads) = results
    torch.testing.assert_close(stack_loss, loss)
    assert stack_grads.keys() == grads.keys() and len(grads) == 28
    for name, grad in grads.items():
        torch.testing.assert_close(stack_grads[name], grad, rtol=1e-4, atol=1e-6)


def test_a_run_with_hash_dropout_trains_and_saves_an_adapter_peft_loads(train_run):
    """Through the CLI on the 4-bit tiny model: the runner replaces every LoRA layer's dropout, the run trains, and
    the saved adapter (the dropout has no weights) reloads to the same logits."""
    trains_and_reloads(
        train_run,
        "lora.dropout=0.1",
        "lora.hash_dropout=true",
        logged="lora.hash_dropout: 14 LoRA layers draw their dropout masks from a hash",
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_compiled_masks_are_eager_s_drawn_once_and_keep_one_minus_p(device="cuda"):
    """On CUDA in bf16, compiled with aten's random ops (as tune_blocks compiles with lora.hash_dropout): the Triton
    kernel hashes without drawing the keys, the masks and gradients are eager's, and 1 - p of the elements are kept."""
    from torch._inductor.utils import run_and_get_code

    layer = hash_dropout.HashDropout(0.1)
    x = torch.randn(8192, 4096, device=device, dtype=torch.bfloat16, requires_grad=True)
    with torch._inductor.config.patch(fallback_random=True):
        torch._dynamo.reset()
        torch.manual_seed(3)
        y, code = run_and_get_code(torch.compile(lambda x: layer(x * 2), dynamic=True), x)
    assert "tl.rand" not in "\n".join(code) and "randint64" not in "\n".join(code)
    y.float().sum().backward()
    compiled_grad, x.grad = x.grad, None
    torch.manual_seed(3)
    eager = layer(x * 2)
    eager.float().sum().backward()
    torch.testing.assert_close(y, eager, rtol=0, atol=0)
    torch.testing.assert_close(compiled_grad, x.grad, rtol=0, atol=0)
    kept = (eager != 0).float().mean().item()
    assert abs(kept - 0.9) < 5 * (0.09 / x.numel()) ** 0.5
