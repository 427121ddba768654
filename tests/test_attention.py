"""`model.attn_implementation=varlen` on the CPU: the packed-row plumbing (layouts, grouped-query heads, scale,
causality within each sequence) against attention written out with an explicit mask, through stand-in kernels
of both torch signatures; and the registered implementation inside a model (its CPU fallback is sdpa).
The real kernel (CUDA) is compared with sdpa in tests/test_gpu.py."""

import math

import pytest
import torch
import torch.nn.functional as F

from qlora_recipes import attention

LENGTHS = (5, 3, 8)  # three sequences packed into one row of 16 tokens


def segment_attention(q, k, v, cu, scale, gqa):
    """varlen_attn's semantics, one sequence at a time: (tokens, heads, head_dim) in and out."""
    out = []
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        out.append(
            F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa).transpose(0, 1)
        )
    return torch.cat(out)


def kernel_after_2_10(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size=(-1, -1), scale=None, enable_gqa=False):
    assert tuple(window_size) == (-1, 0) and torch.equal(cu_q, cu_k) and max_q == max(LENGTHS)
    return segment_attention(q, k, v, cu_q, scale, enable_gqa)


def kernel_2_10(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, is_causal=False, scale=None):
    assert is_causal and q.shape[1] == k.shape[1]  # no enable_gqa here: the heads arrive repeated
    return segment_attention(q, k, v, cu_q, scale, False)


def written_out(query, key, value, scale):
    """(1, heads, tokens, dim) attention with the block-diagonal causal mask spelt out."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    segment = torch.cat([torch.full((n,), i) for i, n in enumerate(LENGTHS)])
    tokens = torch.arange(len(segment))
    allowed = (segment[:, None] == segment[None, :]) & (tokens[None, :] <= tokens[:, None])
    scores = (query @ key.transpose(-1, -2)) * scale
    out = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ value
    return out.transpose(1, 2)  # (1, tokens, heads, dim)


@pytest.mark.parametrize("kernel", [kernel_after_2_10, kernel_2_10])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_packed_row_attends_causally_within_each_sequence(kernel, kv_heads, packed_bounds):
    torch.manual_seed(0)
    tokens, dim = sum(LENGTHS), 8
    query = torch.randn(1, 4, tokens, dim)
    key, value = torch.randn(1, kv_heads, tokens, dim), torch.randn(1, kv_heads, tokens, dim)
    bounds = packed_bounds(LENGTHS)
    scale = 0.7 / math.sqrt(dim)  # not the default, so a dropped scale shows
    out = attention.packed_attention(query, key, value, bounds, scale, attention.Kernel.of(kernel))
    assert out.shape == (1, tokens, 4, dim)
    torch.testing.assert_close(out, written_out(query, key, value, scale))


def test_float32_queries_under_autocast_run_in_its_dtype(packed_bounds):
    """QLoRA hands attention float32 queries under bf16 autocast (float32 norms): the kernel gets bf16, like sdpa."""
    torch.manual_seed(0)
    tokens, dim = sum(LENGTHS), 8
    query, key, value = (torch.randn(1, 2, tokens, dim) for _ in range(3))
    bounds = packed_bounds(LENGTHS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dtype = attention.compute_dtype(query)
        out = attention.packed_attention(query, key, value, bounds, None, attention.Kernel.of(kernel_after_2_10), dtype)
    assert dtype == out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), written_out(query, key, value, dim**-0.5), atol=0.03, rtol=0.03)
    with pytest.raises(ValueError, match="needs bf16 or fp16"):
        attention.compute_dtype(query)


def test_options_follow_the_kernel_signature():
    after, before = attention.Kernel.of(kernel_after_2_10), attention.Kernel.of(kernel_2_10)
    assert after.options(None, 4) == ({"window_size": (-1, 0), "enable_gqa": True}, False)
    assert before.options(0.5, 4) == ({"is_causal": True, "scale": 0.5}, True)
    assert before.options(None, 1) == ({"is_causal": True}, False)


def test_registered_implementation_loads_and_falls_back_to_sdpa_off_cuda(tiny_checkpoint, packed_bounds):
    from transformers import AutoModelForCausalLM

    attention.register()
    models = {
        name: AutoModelForCausalLM.from_pretrained(
            tiny_checkpoint, attn_implementation=name, dtype=torch.float32
        ).eval()
        for name in ("sdpa", attention.NAME)
    }
    assert models[attention.NAME].config._attn_implementation == attention.NAME
    position_ids = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    input_ids = torch.randint(3, 100, position_ids.shape)
    bounds = packed_bounds(LENGTHS)
    with torch.no_grad():
        logits = {
            name: model(input_ids=input_ids, position_ids=position_ids, **bounds).logits
            for name, model in models.items()
        }
    torch.testing.assert_close(logits[attention.NAME], logits["sdpa"])


@torch.library.custom_op("qlora_recipes_test::segment_attention", mutates_args=())
def segment_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scale: float, gqa: bool
) -> torch.Tensor:
    return segment_attention(q, k, v, cu, scale, gqa)


@segment_attention_op.register_fake
def _(q, k, v, cu, scale, gqa):
    return torch.empty_like(q)


def opaque_kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size=(-1, -1), scale=None, enable_gqa=False):
    """The 2.11 signature around an opaque op, as torch's own varlen_attn wraps its custom op."""
    return segment_attention_op(q, k, v, cu_q, scale if scale is not None else q.shape[-1] ** -0.5, enable_gqa)


def test_packed_path_compiles_as_one_graph_for_any_packing(packed_bounds):
    """Inside a compiled decoder block (trainer.torch_compile) the packed path must trace whole, under autocast,
    with new lengths and boundaries every batch: no graph break, no recompile per packing."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    kernel = attention.Kernel.of(opaque_kernel)

    @torch.compile(backend=counter, fullgraph=True, dynamic=True)
    def block(query, key, value, bounds):
        return attention.packed_attention(query, key, value, bounds, None, kernel, attention.compute_dtype(query))

    for lengths in ((5, 3, 8), (7, 9, 2, 6), (11, 1)):
        tokens, bounds = sum(lengths), packed_bounds(lengths)
        # 6 query heads over 2 key/value heads, head_dim 32: sizes no packing here shares (dynamo would tie equal sizes)
        query, key, value = torch.randn(1, 6, tokens, 32), torch.randn(1, 2, tokens, 32), torch.randn(1, 2, tokens, 32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = block(query, key, value, bounds)
        assert out.dtype == torch.bfloat16 and out.shape == (1, tokens, 6, 32)
        expected = segment_attention(
            *(t[0].transpose(0, 1) for t in (query, key, value)), bounds["cu_seq_lens_q"], 32**-0.5, True
        )
        torch.testing.assert_close(out[0].float(), expected, atol=0.03, rtol=0.03)
    assert counter.frame_count == 1  # one graph for every packing
