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
