import pytest

from qlora_recipes.errors import RecipeError
from qlora_recipes.resolve import Device

GPU = Device(kind="cuda", count=1, bf16=True)


@pytest.mark.parametrize(
    "overrides, device, message",
    [
        (("lora.r=-1",), None, "lora.r=-1"),
        (("trainer.profile_python=true",), None, "trainer.profile_steps names none"),
        (("lora.dropout=1.0",), None, "lora.dropout=1.0"),
        (("trainer.learning_rate=0",), None, "trainer.learning_rate=0"),
        (("trainer.batch_size=6", "trainer.micro_batch_size=4"), None, "not a multiple"),
        (("quant.load_in_8bit=true",), None, "both set"),
        (("lora=none",), None, "full fine-tuning"),
        (("trainer.precision=fp16",), None, "needs a CUDA GPU"),
        (("trainer.precision=bf16",), Device("cuda", 1, False), "has no bf16"),
        (("backend=unsloth",), None, "unsloth needs a CUDA GPU"),
        (("backend=unsloth",), GPU, "unsloth package is not installed"),
        (("backend=unsloth", "dist.num_processes=2", "trainer.batch_size=16"), GPU, "single process"),
        (("model.attn_implementation=flash_attention_2",), GPU, "flash-attn is not installed"),
        (("trainer.torch_compile=true",), Device(compiler=False), "needs a C/C++ compiler on PATH"),
        (("model.attn_implementation=varlen",), None, "needs a CUDA GPU and torch >= 2.10"),
        (("model.attn_implementation=varlen", "trainer.packing=false"), GPU, "needs trainer.packing=true"),
        (("model.attn_implementation=varlen", "trainer.packing=true", "trainer.precision=fp32"), GPU, "bf16 or fp16"),
        (("quant.compiled_dequant=true",), None, "it needs trainer.torch_compile=true"),
        (("quant=none", "quant.compiled_dequant=true", "trainer.torch_compile=true"), None, "no 4-bit nf4 weights"),
        (("quant=fp4", "quant.compiled_dequant=true", "trainer.torch_compile=true"), None, "no 4-bit nf4 weights"),
        (
            ("quant.compiled_dequant=true", "trainer.torch_compile=true", "dist=zero3", "dist.num_processes=2"),
            GPU,
            "one whole model per GPU",
        ),
        (("trainer.liger=true",), None, "Triton GPU kernels, used here for SFT on CUDA only"),
        (("trainer.liger=true",), GPU, "liger-kernel package is not installed"),
        (("+recipe=smollm2_dpo", "trainer.liger=true"), GPU, "SFT on CUDA only"),
        (("trainer.liger=true", "trainer.torch_compile=true"), GPU, "fails in Liger's RMSNorm autograd function"),
        (("+recipe=smollm2_dpo", "trainer.lazy_metrics=true"), None, "DPO and ORPO read theirs as TRL does"),
        (("trainer.activation_memory_budget=0.5",), None, "used with trainer.torch_compile=true"),
        (("trainer.activation_memory_budget=0", "trainer.torch_compile=true"), None, "Set a value in (0, 1]"),
        (
            ("lora.dropout=0.1", "trainer.activation_memory_budget=0.5", "trainer.torch_compile=true"),
            None,
            "pytorch#190758",
        ),
        (("lora.lean_dropout=true", "lora.dropout=0"), None, "lora.lean_dropout=true folds"),
        (("lora.lean_dropout=true", "lora.dropout=0.1", "lora.use_dora=true"), None, "lora.use_dora=true, backend"),
        (("lora.lean_dropout=true", "lora=none"), None, "lora.enabled=false"),
        (
            ("lora.lean_dropout=true", "lora.dropout=0.1", "dist=zero3", "dist.num_processes=2"),
            GPU,
            "backend=hf, dist=zero3. It needs",
        ),
        (("lora.fused_add=true", "lora=none"), None, "lora.enabled=false, backend=hf"),
        (("lora.fused_add=true", "dist=zero3", "dist.num_processes=2"), GPU, "dist=zero3. It needs LoRA, backend=hf"),
        (("lora.hash_dropout=true", "lora.dropout=0"), None, "lora.hash_dropout=true draws"),
        (("lora.hash_dropout=true", "lora=none"), None, "lora.enabled=false, lora.dropout"),
        (("lora.hash_dropout=true", "lora.dropout=0.1", "lora.lean_dropout=true"), None, "lora.lean_dropout=true. It"),
        (("lora.hash_dropout=true", "lora.dropout=0.1", "backend=unsloth"), GPU, "backend=unsloth"),
        (("trainer.checkpoint_sublayers=true",), None, "trainer.gradient_checkpointing=false, backend=hf"),
        (
            ("+recipe=llama2_chatml", "trainer.checkpoint_sublayers=true", "dist=zero3", "dist.num_processes=2"),
            GPU,
            "dist=zero3. It needs gradient checkpointing",
        ),
        (("+recipe=llama2_chatml", "trainer.checkpoint_sublayers=true", "backend=unsloth"), GPU, "backend=unsloth"),
        (("trainer.lean_recompute=true",), None, "trainer.checkpoint_sublayers=false"),
        (
            ("+recipe=llama2_chatml", "trainer.checkpoint_sublayers=true", "trainer.lean_recompute=true")
            + ("trainer.use_reentrant=false",),
            None,
            "trainer.use_reentrant=false, lora.enabled=true",
        ),
        (
            ("+recipe=llama2_chatml", "trainer.checkpoint_sublayers=true", "trainer.lean_recompute=true", "lora=none"),
            None,
            "lora.enabled=false",
        ),
        (("trainer.offload_checkpoints=true",), GPU, "trainer.gradient_checkpointing=false, trainer.use_reentrant"),
        (
            ("+recipe=llama2_chatml", "trainer.offload_checkpoints=true", "trainer.use_reentrant=false"),
            GPU,
            "non-reentrant",
        ),
        (("+recipe=llama2_chatml", "trainer.offload_checkpoints=true"), None, "host memory already"),
        (("+recipe=llama2_chatml", "trainer.offload_checkpoints=true", "backend=unsloth"), GPU, "Unsloth offloads"),
        (("template=tokenizer", "template.add_tokens=true"), None, "add_tokens=false"),
        (("trainer.loss_on=assistant", "data.format=text"), None, "no assistant turns"),
        (("trainer.eval_strategy=steps",), None, "eval_steps"),
        (("data.metric=none",), None, "task_eval_samples"),
        (("resume_from_checkpoint=auto",), None, "output_dir"),
        (("data.test_fraction=1.5",), None, "test_fraction"),
        (("trainer.max_steps=0",), None, "max_steps=0"),
        (("trainer=dpo",), None, "data.format=messages"),  # the SFT demo data set with DPO
        (("data=demo_dates_pref",), None, "preference pairs train with trainer=dpo or orpo"),
        (("trainer=orpo",), None, "trainer=orpo with data.format=messages"),
        (("+recipe=smollm2_dpo", "trainer=orpo", "trainer.packing=true"), None, "trainer=orpo with trainer.packing"),
        (("+recipe=smollm2_dpo", "trainer=orpo", "trainer.liger=true"), GPU, "SFT on CUDA only"),
        (("+recipe=smollm2_dpo", "lora=none", "quant=none"), None, "second full copy"),
        (("+recipe=smollm2_dpo", "trainer.packing=true"), None, "not packed"),
        (("+recipe=smollm2_dpo", "template.add_tokens=true"), None, "lm_head.weight"),
        (("+recipe=smollm2_dpo", "trainer.beta=0"), None, "trainer.beta=0"),
        (("+recipe=smollm2_dpo", "trainer.max_prompt_len=0"), None, "trainer.max_prompt_len=0"),
    ],
)
def test_rule_violations_explain_the_fix(recipe_of, overrides, device, message):
    with pytest.raises(RecipeError) as info:
        recipe_of(*overrides, device=device)
    assert message in str(info.value)


def test_every_problem_is_reported_at_once(recipe_of):
    with pytest.raises(RecipeError) as info:
        recipe_of("lora.r=0", "lora.dropout=2", "trainer.learning_rate=-1", "quant.load_in_8bit=true")
    text = str(info.value)
    assert "4 problems" in text
    for key in ("lora.r=0", "lora.dropout=2", "trainer.learning_rate=-1.0", "load_in_8bit"):
        assert key in text


def test_valid_recipe_passes(recipe_of):
    assert recipe_of("lora.r=16", "trainer.batch_size=16", "trainer.micro_batch_size=4").recipe.lora.r == 16


def test_liger_reaches_the_trainer_config_when_installed(recipe_of, monkeypatch):
    import importlib.util

    from qlora_recipes import plan

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "liger_kernel" else real(name, *a)
    )
    recipe = recipe_of("trainer.liger=true", device=GPU).recipe
    assert plan.training_kwargs(recipe, "out")["use_liger_kernel"] is True
    assert "use_liger_kernel" not in plan.training_kwargs(recipe_of(device=GPU).recipe, "out")


def test_compiler_probe_reads_path_and_cxx(tmp_path, monkeypatch):
    from qlora_recipes.resolve import has_compiler

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    assert not has_compiler()
    tool = tmp_path / "my-cxx"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    monkeypatch.setenv("CXX", "my-cxx")
    assert has_compiler()


def test_checkpoint_offload_resolves_with_reentrant_checkpointing_on_a_gpu(recipe_of):
    recipe = recipe_of("+recipe=llama2_chatml", "trainer.offload_checkpoints=true", device=GPU).recipe
    assert recipe.trainer.offload_checkpoints and recipe.trainer.use_reentrant
