"""Table tests of the pure builders: recipe in, exact kwargs out."""

import pytest

from qlora_recipes import plan
from qlora_recipes.resolve import Device

GPU = Device(kind="cuda", count=1, bf16=True)
OLD_GPU = Device(kind="cuda", count=1, bf16=False)


@pytest.mark.parametrize(
    "overrides, device, expected",
    [
        (
            (),
            Device(),
            {
                "load_in_4bit": True,
                "bnb_4bit_quant_type": "nf4",
                "bnb_4bit_use_double_quant": True,
                "bnb_4bit_compute_dtype": "float32",
                "bnb_4bit_quant_storage": "uint8",
            },
        ),
        (
            (),
            GPU,
            {
                "load_in_4bit": True,
                "bnb_4bit_quant_type": "nf4",
                "bnb_4bit_use_double_quant": True,
                "bnb_4bit_compute_dtype": "bfloat16",
                "bnb_4bit_quant_storage": "uint8",
            },
        ),
        (
            ("quant=fp4",),
            OLD_GPU,
            {
                "load_in_4bit": True,
                "bnb_4bit_quant_type": "fp4",
                "bnb_4bit_use_double_quant": False,
                "bnb_4bit_compute_dtype": "float16",
                "bnb_4bit_quant_storage": "uint8",
            },
        ),
        (
            ("quant.compute_dtype=bfloat16", "quant.storage_dtype=bfloat16"),
            GPU,
            {
                "load_in_4bit": True,
                "bnb_4bit_quant_type": "nf4",
                "bnb_4bit_use_double_quant": True,
                "bnb_4bit_compute_dtype": "bfloat16",
                "bnb_4bit_quant_storage": "bfloat16",
            },
        ),
        (("quant=int8",), GPU, {"load_in_8bit": True}),
        (("quant=none",), GPU, None),
    ],
)
def test_bnb_kwargs(recipe_of, overrides, device, expected):
    assert plan.bnb_kwargs(recipe_of(*overrides, device=device).recipe) == expected


BASE_LORA = {
    "r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "bias": "none",
    "task_type": "CAUSAL_LM",
    "use_dora": False,
    "use_rslora": False,
}


@pytest.mark.parametrize(
    "overrides, facts, new_ids, expected",
    [
        (("lora.last_n_layers=null",), None, (), {**BASE_LORA, "target_modules": "all-linear"}),
        (
            (
                "lora.last_n_layers=null",
                "lora.target_modules=[q_proj,v_proj]",
                "lora.r=16",
                "lora.alpha=32",
                "lora.dropout=0.1",
                "lora.use_dora=true",
                "lora.use_rslora=true",
                "lora.bias=lora_only",
            ),
            None,
            (),
            {
                **BASE_LORA,
                "r": 16,
                "lora_alpha": 32,
                "lora_dropout": 0.1,
                "bias": "lora_only",
                "use_dora": True,
                "use_rslora": True,
                "target_modules": ["q_proj", "v_proj"],
            },
        ),
        (
            ("lora.last_n_layers=2",),
            plan.ModelFacts(30, ("q_proj", "down_proj")),
            (),
            {
                **BASE_LORA,
                "target_modules": ["q_proj", "down_proj"],
                "layers_to_transform": [28, 29],
                "layers_pattern": "layers",
            },
        ),
        (
            ("lora.last_n_layers=null",),
            None,
            (50, 49),
            {**BASE_LORA, "target_modules": "all-linear", "trainable_token_indices": [49, 50]},
        ),
        (
            ("lora.last_n_layers=null", "lora.train_new_tokens=false"),
            None,
            (50,),
            {**BASE_LORA, "target_modules": "all-linear"},
        ),
        (
            ("lora.last_n_layers=null", "lora.modules_to_save=[lm_head]"),
            None,
            (),
            {**BASE_LORA, "target_modules": "all-linear", "modules_to_save": ["lm_head"]},
        ),
        (("lora=none", "quant=none"), None, (), None),
    ],
)
def test_lora_kwargs(recipe_of, overrides, facts, new_ids, expected):
    assert plan.lora_kwargs(recipe_of(*overrides).recipe, facts, new_ids) == expected


def test_sft_kwargs_exact(recipe_of):
    recipe = recipe_of(
        "trainer.batch_size=16",
        "trainer.micro_batch_size=4",
        "trainer.gradient_checkpointing=true",
        "trainer.eval_strategy=steps",
        "trainer.eval_steps=7",
        device=GPU,
    ).recipe
    assert plan.sft_kwargs(recipe, "/tmp/run") == {
        "output_dir": "/tmp/run",
        "seed": 42,
        "num_train_epochs": 1.0,
        "max_steps": 120,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8,
        "gradient_accumulation_steps": 4,
        "learning_rate": 1e-3,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "optim": "adamw_torch",
        "logging_strategy": "steps",
        "logging_steps": 5,
        "log_level": "info",
        "eval_strategy": "steps",
        "eval_steps": 7,
        "save_strategy": "steps",
        "save_steps": 40,
        "save_total_limit": 10,
        "bf16": True,
        "fp16": False,
        "gradient_checkpointing": True,
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
        "max_length": 128,
        "packing": False,
        "dataset_text_field": "content",
        "report_to": ["tensorboard"],
        "use_cpu": False,
    }


def test_dpo_kwargs_add_beta_and_loss_to_the_shared_training_arguments(recipe_of):
    recipe = recipe_of("+recipe=smollm2_dpo", "trainer.beta=0.2", "trainer.dpo_loss=ipo").recipe
    kwargs = plan.trainer_kwargs(recipe, "/tmp/run")
    assert kwargs == {**plan.training_kwargs(recipe, "/tmp/run"), "beta": 0.2, "loss_type": ["ipo"]}
    assert "packing" not in kwargs and "dataset_text_field" not in kwargs
    sft = recipe_of().recipe
    assert plan.trainer_kwargs(sft, "/tmp/run") == plan.sft_kwargs(sft, "/tmp/run")


def test_orpo_kwargs_carry_beta_and_build_trl_orpo_config(recipe_of):
    from qlora_recipes.materialize import trainer_config

    recipe = recipe_of(
        "+recipe=smollm2_dpo", "trainer=orpo", "trainer.beta=0.25", "trainer.max_completion_len=16"
    ).recipe
    kwargs = plan.trainer_kwargs(recipe, "/tmp/run")
    assert kwargs == {**plan.training_kwargs(recipe, "/tmp/run"), "beta": 0.25, "max_completion_length": 16}
    config = trainer_config(recipe, {**kwargs, "use_cpu": True})
    assert type(config).__name__ == "ORPOConfig" and config.beta == 0.25 and config.max_length == 128


@pytest.mark.parametrize(
    "device, precision, mixed",
    [(Device(), "fp32", "no"), (GPU, "bf16", "bf16"), (OLD_GPU, "fp16", "fp16")],
)
def test_precision_follows_device(recipe_of, device, precision, mixed):
    resolved = recipe_of(device=device)
    assert resolved.recipe.trainer.precision.value == precision
    accelerate = plan.accelerate_config(resolved.recipe, on_cpu=device.kind == "cpu")
    assert accelerate["mixed_precision"] == mixed
    assert accelerate["use_cpu"] == (device.kind == "cpu")
    if device is OLD_GPU:
        assert any("float16" in note and "bf16" in note for note in resolved.notes)


@pytest.mark.parametrize(
    "device, requested, expected",
    [
        (Device(), "auto", "sdpa"),
        (GPU, "auto", "sdpa"),
        (Device("cuda", 1, True, flash_attn=True), "auto", "flash_attention_2"),
        (GPU, "eager", "eager"),
    ],
)
def test_attention_choice(recipe_of, device, requested, expected):
    resolved = recipe_of(f"model.attn_implementation={requested}", device=device)
    assert plan.model_kwargs(resolved.recipe)["attn_implementation"] == expected
    if requested == "auto" and expected == "sdpa":
        assert any("sdpa" in note for note in resolved.notes)


@pytest.mark.parametrize(
    "device, overrides, expected, why",
    [
        (GPU, ("trainer.packing=true", "trainer.precision=bf16"), "varlen", "packed SFT"),
        (Device(), ("trainer.packing=true",), "sdpa", "needs a CUDA GPU"),
        (GPU, ("trainer.packing=false",), "sdpa", "needs trainer.packing=true"),
        (Device("cuda", 1, True, flash_attn=True), ("trainer.packing=false",), "flash_attention_2", "packing"),
        (GPU, ("trainer.packing=true", "trainer.precision=fp32"), "sdpa", "needs trainer.precision=bf16"),
    ],
)
def test_fastest_attention_is_varlen_where_the_run_can_use_it(recipe_of, device, overrides, expected, why):
    resolved = recipe_of("model.attn_implementation=fastest", *overrides, device=device)
    assert plan.model_kwargs(resolved.recipe)["attn_implementation"] == expected
    note = next(note for note in resolved.notes if note.startswith("model.attn_implementation fastest"))
    assert why in note


def test_torch_compile_is_ours_not_the_trainers(recipe_of):
    """The runner compiles the decoder blocks (tune_blocks); the Trainer's whole-model compile stays off."""
    assert "torch_compile" not in plan.training_kwargs(recipe_of("trainer.torch_compile=true").recipe, "out")


def test_expandable_segments_only_when_asked_and_on_cuda(recipe_of):
    asked = recipe_of("trainer.expandable_segments=true").recipe
    assert plan.allocator_settings(asked, on_cuda=True) == "expandable_segments:True"
    assert plan.allocator_settings(asked, on_cuda=False) is None  # no CUDA allocator to set
    assert plan.allocator_settings(recipe_of().recipe, on_cuda=True) is None  # torch's default allocator


def test_cudnn_attention_off_is_applied_process_wide(recipe_of):
    import torch

    from qlora_recipes import runner

    assert torch.backends.cuda.cudnn_sdp_enabled()
    try:
        runner.set_cuda_runtime(recipe_of("trainer.cudnn_attention=false"))
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        runner.set_cuda_runtime(recipe_of())  # the default turns it back on: a sweep's next run in this process
        assert torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)


def test_lazy_metrics_turn_off_the_per_micro_batch_nan_check(recipe_of):
    lazy = plan.trainer_kwargs(recipe_of("trainer.lazy_metrics=true").recipe, "out")
    assert lazy["logging_nan_inf_filter"] is False  # a NaN loss is logged as NaN; no host read a micro-batch
    assert "logging_nan_inf_filter" not in plan.trainer_kwargs(recipe_of().recipe, "out")


def test_async_inputs_ask_accelerate_for_non_blocking_copies_on_gpus(recipe_of, tmp_path):
    from trl import SFTConfig

    recipe = recipe_of("trainer.async_inputs=true", "trainer.precision=fp32").recipe
    assert "accelerator_config" not in plan.trainer_kwargs(recipe, tmp_path, on_cpu=True)  # nothing to overlap
    assert "accelerator_config" not in plan.trainer_kwargs(recipe_of().recipe, tmp_path, on_cpu=False)
    args = SFTConfig(**plan.trainer_kwargs(recipe, tmp_path, on_cpu=False))
    assert args.accelerator_config.non_blocking and args.dataloader_pin_memory  # copies from pinned batches
