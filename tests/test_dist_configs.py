"""Generated accelerate configs for FSDP / ZeRO (golden, from PEFT's examples/sft files) and their QLoRA rules."""

import pytest

from qlora_recipes import plan
from qlora_recipes.errors import RecipeError
from qlora_recipes.resolve import Device

GPUS = Device(kind="cuda", count=2, bf16=True)
SHARDED_QLORA = ("+recipe=llama2_chatml", "trainer.batch_size=8")  # bf16 storage = compute, as required

# deepspeed_config_z3_qlora.yaml
ZERO3 = {
    "distributed_type": "DEEPSPEED",
    "mixed_precision": "bf16",
    "num_machines": 1,
    "num_processes": 2,
    "machine_rank": 0,
    "rdzv_backend": "static",
    "same_network": True,
    "deepspeed_config": {
        "deepspeed_multinode_launcher": "standard",
        "offload_optimizer_device": "none",
        "offload_param_device": "none",
        "zero3_init_flag": True,
        "zero3_save_16bit_model": True,
        "zero_stage": 3,
    },
}
# fsdp_config_qlora.yaml (offload off by default here)
FSDP = {
    "distributed_type": "FSDP",
    "fsdp_config": {
        "fsdp_version": 1,
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_backward_prefetch": "BACKWARD_PRE",
        "fsdp_cpu_ram_efficient_loading": True,
        "fsdp_forward_prefetch": False,
        "fsdp_offload_params": False,
        "fsdp_sharding_strategy": "FULL_SHARD",
        "fsdp_state_dict_type": "SHARDED_STATE_DICT",
        "fsdp_sync_module_states": True,
        "fsdp_use_orig_params": False,
    },
}


@pytest.mark.parametrize("backend, golden", [("zero3", ZERO3), ("fsdp", FSDP)])
def test_golden_accelerate_configs(recipe_of, backend, golden):
    recipe = recipe_of(*SHARDED_QLORA, f"dist={backend}", "lora.train_new_tokens=false", device=GPUS).recipe
    config = plan.accelerate_config(recipe, on_cpu=False)
    for key, value in golden.items():
        assert config[key] == value, key


def test_offload_options(recipe_of):
    fsdp = recipe_of(
        *SHARDED_QLORA, "dist=fsdp", "dist.fsdp_offload_params=true", "lora.train_new_tokens=false", device=GPUS
    ).recipe
    assert plan.accelerate_config(fsdp, on_cpu=False)["fsdp_config"]["fsdp_offload_params"] is True
    zero = recipe_of(*SHARDED_QLORA, "dist=zero3_offload", device=GPUS).recipe
    ds = plan.accelerate_config(zero, on_cpu=False)["deepspeed_config"]
    assert (ds["offload_optimizer_device"], ds["offload_param_device"], ds["zero_stage"]) == ("cpu", "cpu", 3)
    zero2 = recipe_of(*SHARDED_QLORA, "dist=zero2", device=GPUS).recipe
    assert plan.accelerate_config(zero2, on_cpu=False)["deepspeed_config"]["zero_stage"] == 2


def test_multi_node_fields_flow_into_the_launch(recipe_of):
    recipe = recipe_of(
        *SHARDED_QLORA,
        "dist=zero3",
        "trainer.batch_size=16",
        "dist.num_machines=2",
        "dist.machine_rank=1",
        "dist.main_process_ip=10.1.2.3",
        "dist.main_process_port=29600",
        device=GPUS,
    ).recipe
    config = plan.accelerate_config(recipe, on_cpu=False)
    assert (config["num_machines"], config["machine_rank"], config["num_processes"]) == (2, 1, 4)
    assert (config["main_process_ip"], config["main_process_port"]) == ("10.1.2.3", 29600)
    assert plan.gradient_accumulation_steps(recipe) == 4  # 16 / (1 x 2 GPUs x 2 machines)
    assert plan.launch_command(recipe, "/r", on_cpu=False)[2:5] == [
        "accelerate.commands.launch",
        "--config_file",
        "/r/accelerate_config.yaml",
    ]


def test_sharded_loading_leaves_placement_to_the_backend(recipe_of):
    from qlora_recipes.materialize import from_pretrained_kwargs

    assert "device_map" not in from_pretrained_kwargs(recipe_of(*SHARDED_QLORA, "dist=zero3", device=GPUS))
    assert from_pretrained_kwargs(recipe_of(*SHARDED_QLORA, "dist=ddp", device=GPUS))["device_map"] == {"": 0}


def test_fsdp2_config_and_placement(recipe_of):
    """FSDP2 shards a 4-bit model that each process loaded on its own GPU; new-token rows may train."""
    from qlora_recipes.materialize import from_pretrained_kwargs

    resolved = recipe_of(*SHARDED_QLORA, "dist=fsdp", "dist.fsdp_version=2", device=GPUS)
    assert plan.lora_kwargs(resolved.recipe, new_token_ids=[32000, 32001])["trainable_token_indices"] == [32000, 32001]
    config = plan.accelerate_config(resolved.recipe, on_cpu=False)["fsdp_config"]
    assert config == {
        "fsdp_version": 2,
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_cpu_ram_efficient_loading": False,  # 4-bit weights cannot take the meta-device broadcast path
        "fsdp_offload_params": False,
        "fsdp_reshard_after_forward": True,
        "fsdp_state_dict_type": "SHARDED_STATE_DICT",
    }
    assert from_pretrained_kwargs(resolved)["device_map"] == {"": 0}
    unquantized = recipe_of(*SHARDED_QLORA, "dist=fsdp", "dist.fsdp_version=2", "quant=none", device=GPUS).recipe
    assert plan.accelerate_config(unquantized, on_cpu=False)["fsdp_config"]["fsdp_cpu_ram_efficient_loading"] is True
    kept = recipe_of(
        *SHARDED_QLORA, "dist=fsdp", "dist.fsdp_version=2", "dist.fsdp_reshard_after_forward=false", device=GPUS
    )
    assert plan.accelerate_config(kept.recipe, on_cpu=False)["fsdp_config"]["fsdp_reshard_after_forward"] is False


def test_zero3_fetch_settings_replace_accelerates_auto(recipe_of):
    recipe = recipe_of(*SHARDED_QLORA, "dist=zero3", device=GPUS).recipe
    assert plan.zero3_overrides(recipe) == {}  # untouched: the original's "auto"
    tuned = recipe_of(
        *SHARDED_QLORA,
        "dist=zero3",
        "dist.zero3_persistence_threshold=1000000",
        "dist.zero3_prefetch_bucket_size=50000000",
        "dist.zero3_reduce_bucket_size=2000000",
        device=GPUS,
    ).recipe
    assert plan.zero3_overrides(tuned) == {
        "stage3_param_persistence_threshold": 1000000,
        "stage3_prefetch_bucket_size": 50000000,
        "reduce_bucket_size": 2000000,
    }
    with pytest.raises(RecipeError, match="zero3_persistence_threshold with dist=ddp: only dist=zero3"):
        recipe_of(*SHARDED_QLORA, "dist=ddp", "dist.zero3_persistence_threshold=5", device=GPUS)  # not dropped unsaid


@pytest.mark.parametrize(
    "overrides, torch_linear",
    [
        ((), False),  # DeepSpeed's default
        (("dist.zero3_memory_efficient_linear=false",), True),
        (("trainer.torch_compile=true",), True),  # unset with compiled blocks: torch's (its backward recompiles them)
        (("trainer.torch_compile=true", "dist.zero3_memory_efficient_linear=true"), False),
    ],
)
def test_zero3_linear_follows_the_setting_or_the_compiled_blocks(recipe_of, overrides, torch_linear):
    recipe = recipe_of(*SHARDED_QLORA, "dist=zero3", *overrides, device=GPUS).recipe
    assert plan.zero3_torch_linear(recipe) is torch_linear
    assert plan.zero3_overrides(recipe) == ({"memory_efficient_linear": False} if torch_linear else {})


@pytest.mark.parametrize(
    "overrides, each",
    [
        (("dist=fsdp", "dist.fsdp_version=2"), True),  # FSDP2: reduced after every micro-batch unless told otherwise
        (("dist=fsdp", "dist.fsdp_version=2", "dist.sync_each_micro_batch=false"), False),
        (("dist=fsdp", "dist.fsdp_version=2", "dist.num_processes=1"), False),  # nothing to reduce with
        (("dist=fsdp",), False),  # FSDP v1: accelerate's no_sync, as the original
        (("dist=ddp",), False),
        (("dist=ddp", "dist.sync_each_micro_batch=true"), True),
        (("dist=zero3",), False),  # DeepSpeed's own accumulation
    ],
)
def test_gradients_reduced_each_micro_batch_under_fsdp2(recipe_of, tmp_path, overrides, each):
    import torch
    from transformers import Trainer
    from trl import SFTConfig

    recipe = recipe_of(
        *SHARDED_QLORA, "lora.train_new_tokens=false", "trainer.eval_strategy=no", *overrides, device=GPUS
    ).recipe
    assert plan.gradient_accumulation_steps(recipe) > 1
    assert plan.sync_each_micro_batch(recipe) is each
    args = SFTConfig(**{**plan.trainer_kwargs(recipe, tmp_path, on_cpu=True), "report_to": "none"})
    # the Trainer reads it from accelerate's gradient state when it decides whether to skip a micro-batch's sync
    state = Trainer(model=torch.nn.Linear(2, 2), args=args).accelerator.gradient_state
    assert state.plugin_kwargs.get("sync_each_batch", False) is each


@pytest.mark.parametrize(
    "overrides, device, message",
    [
        (("dist=zero3", "quant=int8"), GPUS, "8-bit weights"),
        (("dist=zero3", "quant.storage_dtype=uint8"), GPUS, "must be equal"),
        (("dist=fsdp", "quant.compute_dtype=float16", "lora.train_new_tokens=false"), GPUS, "must be equal"),
        (("dist=zero3", "dist.num_processes=2"), Device(), "needs CUDA GPUs"),
        (("dist=zero3", "dist.num_machines=2", "trainer.batch_size=16"), GPUS, "main_process_ip"),
        (("dist=zero3", "dist.machine_rank=1"), GPUS, "machine_rank=1"),
        (("dist=fsdp",), GPUS, "lora.train_new_tokens=false"),
        (("dist=fsdp", "dist.fsdp_version=3"), GPUS, "fsdp_version=3"),
        (("dist=fsdp", "lora.train_new_tokens=false", "trainer.torch_compile=true"), GPUS, "FSDP v1's separate units"),
        (("dist=ddp", "dist.zero3_leaf_blocks=true"), GPUS, "it is a ZeRO-3 setting"),
        (("dist=zero3", "dist.zero3_leaf_fast_sharding=true"), GPUS, "dist.zero3_leaf_blocks=false: it changes how"),
        (
            ("dist=ddp", "dist.zero3_leaf_blocks=true", "dist.zero3_leaf_fast_sharding=true"),
            GPUS,
            "with dist=ddp and",
        ),
        (("dist=ddp", "dist.zero3_memory_efficient_linear=false"), GPUS, "which linear function DeepSpeed runs"),
        (("dist=zero3", "dist.sync_each_micro_batch=true"), GPUS, "DeepSpeed decides itself"),
        (
            ("dist=fsdp", "lora.train_new_tokens=false", "dist.zero3_memory_efficient_linear=true"),
            GPUS,
            "leave it unset",
        ),
    ],
)
def test_sharded_qlora_rules(recipe_of, overrides, device, message):
    with pytest.raises(RecipeError, match=message):
        recipe_of(*SHARDED_QLORA, *overrides, device=device)


@pytest.mark.parametrize("backend, prepared", [("single", True), ("zero3", False)])
def test_kbit_preparation_only_without_sharding(recipe_of, tiny_checkpoint, backend, prepared):
    """prepare_model_for_kbit_training upcasts the unquantized weights to fp32; sharded backends skip it."""
    import torch

    from qlora_recipes.runner import setup_model, setup_tokenizer

    device = Device() if backend == "single" else GPUS  # the sharded one loads without a device_map: CPU is fine
    resolved = recipe_of(
        "+recipe=llama2_chatml", "model=tiny_llama", "template.add_tokens=false", f"dist={backend}", device=device
    )
    tokenizer, new_ids = setup_tokenizer(resolved.recipe, tiny_checkpoint)
    model = setup_model(resolved, tiny_checkpoint, tokenizer, new_ids)
    norm = next(p for n, p in model.named_parameters() if n.endswith("input_layernorm.weight"))
    assert norm.dtype == (torch.float32 if prepared else torch.bfloat16)


def test_fsdp2_refuses_trainable_new_rows_of_a_tied_embedding_before_loading(recipe_of):
    """accelerate's FSDP2 sharding fails on it (seen on an H200, docs/distributed.md); untied models train."""
    from qlora_recipes import models
    from qlora_recipes.runner import refuse_fsdp2_tied_new_rows

    tied = str(models.tiny_checkpoint())  # tie_word_embeddings=True, as SmolLM2
    fsdp2 = recipe_of(*SHARDED_QLORA, "model=tiny_llama", "dist=fsdp", "dist.fsdp_version=2", device=GPUS).recipe
    with pytest.raises(RecipeError, match="tied input/output embeddings.*lora.train_new_tokens=false"):
        refuse_fsdp2_tied_new_rows(fsdp2, tied, new_token_ids=[400, 401])
    refuse_fsdp2_tied_new_rows(fsdp2, tied, new_token_ids=[])  # no added tokens: nothing to refuse
    frozen_rows = recipe_of(
        *SHARDED_QLORA,
        "model=tiny_llama",
        "dist=fsdp",
        "dist.fsdp_version=2",
        "lora.train_new_tokens=false",
        device=GPUS,
    ).recipe
    refuse_fsdp2_tied_new_rows(frozen_rows, tied, new_token_ids=[400, 401])
    zero3 = recipe_of(*SHARDED_QLORA, "model=tiny_llama", "dist=zero3", device=GPUS).recipe
    refuse_fsdp2_tied_new_rows(zero3, tied, new_token_ids=[400, 401])
