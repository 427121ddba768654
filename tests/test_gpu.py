"""The same runner on CUDA: QLoRA in bf16 with bitsandbytes' GPU kernels. Skipped without a GPU."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("quant", ["nf4", "int8", "none"])
def test_qlora_trains_on_gpu(train_run, quant):
    run_dir, metrics = train_run(f"quant={quant}", "trainer.max_steps=40")
    recipe = (run_dir / "recipe.yaml").read_text()
    assert "dtype: bfloat16" in recipe and "precision: bf16" in recipe
    assert metrics["eval"]["loss_after"] < 0.8 * metrics["eval"]["loss_before"]
    assert metrics["memory"]["peak_allocated_gib"] > 0


def test_added_chatml_tokens_train_on_gpu(train_run):
    base = ["+recipe=llama2_chatml", "model=tiny_llama", "data=demo_dates", "data.max_eval_samples=8", "logger=none"]
    _, metrics = train_run("trainer.max_steps=6", base=base)
    assert metrics["train"]["steps"] == 6


def test_varlen_attention_matches_sdpa_on_a_packed_row(tiny_checkpoint, packed_bounds):
    """The real varlen kernel against sdpa's block-diagonal mask: same logits and LoRA-free input gradients (bf16)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from qlora_recipes import attention

    attention.register()
    lengths = (300, 17, 600, 107)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None].cuda()
    vocab = AutoConfig.from_pretrained(tiny_checkpoint).vocab_size
    input_ids = torch.randint(3, vocab, position_ids.shape, device="cuda")
    bounds = packed_bounds(lengths, device="cuda")
    results = {}
    for name in ("sdpa", attention.NAME):
        model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, attn_implementation=name, dtype=torch.bfloat16)
        model = model.cuda()
        embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):  # as in training (float32 queries: tests/test_attention.py)
            logits = model(inputs_embeds=embeds.float(), position_ids=position_ids, **bounds).logits.float()
        logits.logsumexp(-1).sum().backward()
        results[name] = (logits.detach(), embeds.grad.float())
    (logits_sdpa, grad_sdpa), (logits_varlen, grad_varlen) = results["sdpa"], results[attention.NAME]
    assert (logits_varlen - logits_sdpa).abs().max() < 0.05 * logits_sdpa.abs().max()
    assert (grad_varlen - grad_sdpa).abs().max() < 0.05 * grad_sdpa.abs().max()
    # a kernel that let sequences see each other would differ by far more: check the test can tell
    leaky = AutoModelForCausalLM.from_pretrained(
        tiny_checkpoint, attn_implementation="sdpa", dtype=torch.bfloat16
    ).cuda()
    with torch.no_grad():
        one_row = leaky(input_ids=input_ids, position_ids=torch.arange(input_ids.shape[1], device="cuda")[None]).logits
    assert (one_row.float() - logits_sdpa).abs().max() > 0.05 * logits_sdpa.abs().max()
