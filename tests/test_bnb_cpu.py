"""bitsandbytes 0.50 on CPU: an eval-mode forward repacks 4-bit weights into a format whose kernel has no
autograd, so later training drops the gradient through frozen 4-bit layers. setup_model prevents it."""

import pytest
import torch

from qlora_recipes import runner

OVERRIDES = ("model=tiny_llama", "template.add_tokens=false", "quant=nf4", "lora.last_n_layers=null", "lora.dropout=0")


def lora_grads(recipe_of, tiny_checkpoint, eval_first, keep_fix=True, monkeypatch=None):
    resolved = recipe_of(*OVERRIDES)
    tokenizer, new_ids = runner.setup_tokenizer(resolved.recipe, tiny_checkpoint)
    if not keep_fix:
        monkeypatch.setattr(runner, "keep_cpu_4bit_differentiable", lambda model: None)
    torch.manual_seed(0)
    model = runner.setup_model(resolved, tiny_checkpoint, tokenizer, new_ids)
    for name, param in model.named_parameters():  # non-zero B so gradients reach the lower layer's A
        if "lora_B" in name:
            param.data.normal_(0, 0.1)
    batch = tokenizer(["<|im_start|>user\nMarch 5, 2021<|im_end|>\n"], return_tensors="pt")
    if eval_first:
        model.eval()
        with torch.no_grad():
            model(**batch)
    model.train()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if "layers.0." in n and p.grad is not None}


def test_training_after_eval_keeps_gradients_through_4bit_layers(recipe_of, tiny_checkpoint):
    plain = lora_grads(recipe_of, tiny_checkpoint, eval_first=False)
    after_eval = lora_grads(recipe_of, tiny_checkpoint, eval_first=True)
    assert plain and plain.keys() == after_eval.keys()
    for name in plain:
        torch.testing.assert_close(after_eval[name], plain[name], rtol=1e-4, atol=1e-6)


def test_the_upstream_bug_is_real_here(recipe_of, tiny_checkpoint, monkeypatch):
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here")
    plain = lora_grads(recipe_of, tiny_checkpoint, eval_first=False)
    broken = lora_grads(recipe_of, tiny_checkpoint, eval_first=True, keep_fix=False, monkeypatch=monkeypatch)
    assert any(not torch.allclose(broken[n], plain[n], rtol=1e-4, atol=1e-6) for n in plain)


@pytest.mark.parametrize("upcast", [True, False])
def test_upcast_unquantized_sets_the_residual_dtype_and_adapters_still_learn(recipe_of, tiny_checkpoint, upcast):
    """quant.upcast_unquantized=false skips k-bit preparation's float32 cast: embeddings, norms and LM head stay
    in the model dtype (bf16 here), so does the residual stream, and the trainer's gradient checkpointing (as
    SFTTrainer enables it) still carries gradients into every layer's adapter."""
    resolved = recipe_of(*OVERRIDES, "model.dtype=bfloat16", f"quant.upcast_unquantized={upcast}")
    tokenizer, new_ids = runner.setup_tokenizer(resolved.recipe, tiny_checkpoint)
    torch.manual_seed(0)
    model = runner.setup_model(resolved, tiny_checkpoint, tokenizer, new_ids)
    expected = torch.float32 if upcast else torch.bfloat16
    assert model.get_input_embeddings().weight.dtype == expected
    assert model.get_output_embeddings().weight.dtype == expected
    assert {m.weight.dtype for n, m in model.named_modules() if n.endswith("norm")} == {expected}
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    for name, param in model.named_parameters():  # non-zero B so gradients reach every A
        if "lora_B" in name:
            param.data.normal_(0, 0.1)
    model.train()
    batch = tokenizer(["<|im_start|>user\nMarch 5, 2021<|im_end|>\n"], return_tensors="pt")
    hidden = model(**batch, output_hidden_states=True).hidden_states
    assert hidden[1].dtype == expected
    model(**batch, labels=batch["input_ids"]).loss.backward()
    lora = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(g is not None and g.abs().sum() > 0 for g in lora.values())
