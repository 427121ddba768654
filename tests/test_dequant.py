"""quant.compiled_dequant (dequant.py): bitsandbytes' 4-bit arithmetic in torch ops, checked against bitsandbytes."""

import pytest
import torch

from qlora_recipes import dequant


def quantized_linear(storage, nested, quant_type="nf4", out_features=96, in_features=128):
    import bitsandbytes as bnb

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(
        in_features, out_features, bias=True, compute_dtype=torch.float32, quant_type=quant_type, quant_storage=storage
    )
    weight = torch.randn(out_features, in_features)
    layer.weight = bnb.nn.Params4bit(
        weight, requires_grad=False, compress_statistics=nested, quant_type=quant_type, quant_storage=storage
    )._quantize("cpu")
    layer.bias.data.normal_()
    return layer


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("again", [False, True])
def test_dequantize_is_bitsandbytes_bit_for_bit(storage, nested, dtype, again):
    import bitsandbytes.functional as F

    layer = quantized_linear(storage, nested)
    state = layer.weight.quant_state
    ours = dequant.dequantize(
        layer.weight, dequant.block_absmax(state), state.code, state.blocksize, state.shape, dtype, again=again
    )
    assert torch.equal(ours, F.dequantize_4bit(layer.weight, state).to(dtype))


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
@pytest.mark.parametrize("nested", [False, True])
def test_routed_layer_matches_bitsandbytes_forward_and_backward(storage, nested):
    import bitsandbytes as bnb

    layer = quantized_linear(storage, nested)
    saved = set(layer.state_dict())
    x = torch.randn(2, 7, 128, requires_grad=True)
    expected = layer(x)
    expected.square().sum().backward()
    expected_grad, x.grad = x.grad.clone(), None
    assert dequant.install(layer) == 1
    assert isinstance(layer, bnb.nn.Linear4bit) and layer.routed
    out = layer(x)
    out.square().sum().backward()
    assert torch.equal(out, expected) and torch.equal(x.grad, expected_grad)
    assert set(layer.state_dict()) == saved  # what an adapter or checkpoint saves is unchanged


def test_install_routes_only_nf4_and_shares_one_class_per_class():
    model = torch.nn.ModuleDict(
        {
            "a": quantized_linear(torch.uint8, True),
            "b": quantized_linear(torch.uint8, True),
            "fp4": quantized_linear(torch.uint8, True, quant_type="fp4"),
            "plain": torch.nn.Linear(4, 4),
        }
    )
    assert dequant.install(model) == 2
    assert type(model["a"]) is type(model["b"])  # compiled blocks would recompile per class otherwise
    assert not getattr(model["fp4"], "routed", False) and type(model["plain"]) is torch.nn.Linear
    assert dequant.install(model) == 2 and type(model["a"]).__mro__[1].__name__ == "Linear4bit"  # idempotent


def test_compiled_layer_keeps_no_dequantized_weight_for_the_backward():
    """Compiled, the backward must dequantize again rather than keep the forward's weight (GPU call L: merged by
    the compiler, the kept weights cost 0.3 GiB on the 7B shape): nothing of the weight's shape is saved."""
    layer = quantized_linear(torch.bfloat16, True)
    dequant.install(layer)
    saved = []

    def pack(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    x = torch.randn(2, 7, 128, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = torch.compile(layer, fullgraph=True, dynamic=True)(x)
    assert saved and (96, 128) not in saved, saved
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
