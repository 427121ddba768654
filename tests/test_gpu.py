"""The same runner on CUDA: QLoRA in bf16 with bitsandbytes' GPU kernels. Skipped without a GPU."""

import json

import pytest
import torch

from qlora_recipes import cli

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("quant", ["nf4", "int8", "none"])
def test_qlora_trains_on_gpu(tmp_path, quant):
    run_dir = tmp_path / "run"
    args = [
        "run",
        "model=tiny_llama",
        "template.add_tokens=false",
        "lora.last_n_layers=null",
        f"quant={quant}",
        "trainer.max_steps=40",
        "trainer.learning_rate=1e-2",
        "trainer.loss_on=all",
        "trainer.task_eval_samples=4",
        "trainer.max_new_tokens=4",
        "data.max_train_samples=160",
        "data.max_eval_samples=16",
        "report_to=[]",
        f"output_dir={run_dir}",
    ]
    assert cli.main(args) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    recipe = (run_dir / "recipe.yaml").read_text()
    assert "dtype: bfloat16" in recipe and "precision: bf16" in recipe
    assert metrics["eval"]["loss_after"] < 0.8 * metrics["eval"]["loss_before"]
    assert metrics["memory"]["peak_allocated_gib"] > 0


def test_added_chatml_tokens_train_on_gpu(tmp_path):
    run_dir = tmp_path / "run"
    args = [
        "run",
        "+recipe=llama2_chatml",
        "model=tiny_llama",
        "data=demo_dates",
        "trainer.max_steps=6",
        "data.max_eval_samples=8",
        "report_to=[]",
        f"output_dir={run_dir}",
    ]
    assert cli.main(args) == 0
    assert json.loads((run_dir / "metrics.json").read_text())["train"]["steps"] == 6
