"""Each quantization / adapter / precision setting trains a few steps on CPU through the real runner."""

import json

import pytest
import torch

from qlora_recipes import cli

SHORT = [
    "model=tiny_llama",
    "template.add_tokens=false",
    "lora.last_n_layers=null",
    "trainer.max_steps=4",
    "trainer.learning_rate=1e-2",
    "trainer.save_steps=4",
    "trainer.task_eval_samples=0",
    "trainer.eval_before_train=false",
    "data.max_train_samples=64",
    "data.max_eval_samples=8",
    "logger=none",
]


def short_run(tmp_path, *overrides):
    run_dir = tmp_path / "run"
    assert cli.main(["run", *SHORT, *overrides, f"output_dir={run_dir}"]) == 0
    return run_dir, json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.parametrize(
    "overrides",
    [
        ("quant=fp4",),
        ("quant=nf4", "quant.double_quant=false"),
        ("quant=int8",),
        ("quant=none", "lora.use_dora=true"),
        ("quant=nf4", "lora.use_rslora=true", "lora.r=16", "lora.bias=lora_only"),
        ("quant=nf4", "lora.target_modules=[q_proj,v_proj]"),
        ("quant=nf4", "trainer.gradient_checkpointing=true", "trainer.use_reentrant=true"),
        ("quant=nf4", "trainer.gradient_checkpointing=true", "trainer.use_reentrant=false"),
        ("quant=nf4", "trainer.packing=true", "trainer.loss_on=all"),
        ("quant=none", "model.dtype=bfloat16", "trainer.precision=bf16"),
    ],
    ids=lambda o: " ".join(o),
)
def test_setting_trains(tmp_path, overrides):
    run_dir, metrics = short_run(tmp_path, *overrides)
    assert metrics["train"]["steps"] == 4
    assert all(torch.isfinite(torch.tensor(p["loss"])) for p in metrics["train"]["loss_curve"])
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_full_fine_tuning_saves_a_whole_model(tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir, metrics = short_run(tmp_path, "lora=none", "quant=none")
    assert metrics["trainable_params"] == metrics["total_params"]
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    assert model.config.num_hidden_layers == 2


def test_targets_restrict_adapters(recipe_of, tiny_checkpoint):
    from qlora_recipes.runner import setup_model, setup_tokenizer

    resolved = recipe_of(*SHORT[:2], "lora.target_modules=[q_proj,v_proj]", "lora.last_n_layers=1")
    tokenizer, new_ids = setup_tokenizer(resolved.recipe, tiny_checkpoint)
    model = setup_model(resolved, tiny_checkpoint, tokenizer, new_ids)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".layers.1." in n and ("q_proj" in n or "v_proj" in n) for n in names)


def test_trust_remote_code_is_opt_in(recipe_of):
    from qlora_recipes import plan

    assert plan.model_kwargs(recipe_of().recipe)["trust_remote_code"] is False
    assert plan.model_kwargs(recipe_of("model.trust_remote_code=true").recipe)["trust_remote_code"] is True


def test_show_params_lists_trainable_parameters(capsys):
    assert cli.main(["show", "--params", *SHORT[:3], "lora.target_modules=[q_proj]"]) == 0
    out = capsys.readouterr().out
    assert "# trainable params:" in out
    rows = [line for line in out.splitlines() if "lora_" in line and "\t" in line]
    assert len(rows) == 4 and all("float32" in row for row in rows)  # 2 layers x (A, B)


def test_disable_cache_turns_off_datasets_caching(recipe_of, tiny_checkpoint):
    import datasets

    from qlora_recipes import data as data_mod
    from qlora_recipes.runner import setup_tokenizer

    resolved = recipe_of(*SHORT[:2], "data.disable_cache=true")
    tokenizer, _ = setup_tokenizer(resolved.recipe, tiny_checkpoint)
    try:
        data_mod.prepare(resolved.recipe, tokenizer)
        assert not datasets.is_caching_enabled()
    finally:
        datasets.enable_caching()
