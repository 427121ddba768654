"""Plan: resolved recipe -> plain keyword-argument dicts for each library object. Pure, no torch.

Dtypes are strings here ("bfloat16"); `materialize.py` turns them into torch dtypes and builds the
objects. Each builder is table-tested: recipe in, exact kwargs out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_recipes.schema import DistBackend, Logger, Precision, RecipeConfig, Strategy, TrainerKind

# Linear layers of a Llama-family decoder block; used only to describe a plan before a model is loaded.
LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelFacts:
    """What the LoRA plan needs to know about the architecture (read from the loaded model)."""

    num_layers: int
    linear_modules: tuple[str, ...] = LLAMA_LINEAR


def trains_new_token_rows(recipe: RecipeConfig) -> bool:
    """The template may add tokens and their embedding rows train (LoRA's trainable_token_indices)."""
    return recipe.template.add_tokens and recipe.lora.enabled and recipe.lora.train_new_tokens


def world_size(recipe: RecipeConfig) -> int:
    return recipe.dist.num_processes * recipe.dist.num_machines


def gradient_accumulation_steps(recipe: RecipeConfig) -> int:
    t = recipe.trainer
    return max(1, t.batch_size // (t.micro_batch_size * world_size(recipe)))


def model_kwargs(recipe: RecipeConfig) -> dict[str, Any]:
    """`from_pretrained` keywords besides the quantization config."""
    m = recipe.model
    kwargs: dict[str, Any] = {
        "dtype": m.dtype.value,
        "attn_implementation": m.attn_implementation.value,
        "trust_remote_code": m.trust_remote_code,
    }
    if m.revision:
        kwargs["revision"] = m.revision
    return kwargs


def bnb_kwargs(recipe: RecipeConfig) -> dict[str, Any] | None:
    """`BitsAndBytesConfig` keywords, or None for an unquantized model."""
    q = recipe.quant
    if q.load_in_4bit:
        return {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": q.quant_type.value,
            "bnb_4bit_use_double_quant": q.double_quant,
            "bnb_4bit_compute_dtype": q.compute_dtype.value,
            "bnb_4bit_quant_storage": q.storage_dtype.value,
        }
    if q.load_in_8bit:
        return {"load_in_8bit": True}
    return None


def lora_kwargs(
    recipe: RecipeConfig, facts: ModelFacts | None = None, new_token_ids: list[int] | tuple[int, ...] = ()
) -> dict[str, Any] | None:
    """`peft.LoraConfig` keywords, or None for full fine-tuning.

    `last_n_layers` needs the layer count and the linear module names (peft refuses layers_to_transform
    with the "all-linear" shorthand), hence `facts`. Rows of tokens the template added are made
    trainable through `trainable_token_indices`, so they do not stay random under LoRA.
    """
    lora = recipe.lora
    if not lora.enabled:
        return None
    targets: str | list[str] = list(lora.target_modules)
    all_linear = targets == ["all-linear"]
    kwargs: dict[str, Any] = {
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "bias": lora.bias.value,
        "task_type": "CAUSAL_LM",
        "use_dora": lora.use_dora,
        "use_rslora": lora.use_rslora,
    }
    if lora.last_n_layers is not None:
        facts = facts or ModelFacts(num_layers=lora.last_n_layers)
        first = max(0, facts.num_layers - lora.last_n_layers)
        kwargs["target_modules"] = list(facts.linear_modules) if all_linear else targets
        kwargs["layers_to_transform"] = list(range(first, facts.num_layers))
        kwargs["layers_pattern"] = "layers"
    else:
        kwargs["target_modules"] = "all-linear" if all_linear else targets
    if lora.modules_to_save:
        kwargs["modules_to_save"] = list(lora.modules_to_save)
    if new_token_ids and lora.train_new_tokens:
        kwargs["trainable_token_indices"] = sorted(new_token_ids)
    return kwargs


def sync_each_micro_batch(recipe: RecipeConfig) -> bool:
    """Whether gradients are reduced after every micro-batch (`dist.sync_each_micro_batch`; unset: under FSDP2 with
    more than one process)."""
    chosen = recipe.dist.sync_each_micro_batch
    return chosen if chosen is not None else is_fsdp2(recipe) and world_size(recipe) > 1


def training_kwargs(recipe: RecipeConfig, output_dir: str | Path, on_cpu: bool = False) -> dict[str, Any]:
    """The `transformers.TrainingArguments` part, shared by SFTConfig, DPOConfig and ORPOConfig."""
    t = recipe.trainer
    kwargs: dict[str, Any] = {
        "output_dir": str(output_dir),
        "seed": recipe.seed,
        "num_train_epochs": t.epochs,
        "max_steps": t.max_steps,
        "per_device_train_batch_size": t.micro_batch_size,
        "per_device_eval_batch_size": t.eval_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps(recipe),
        "learning_rate": t.learning_rate,
        "lr_scheduler_type": t.lr_scheduler.value,
        "warmup_steps": t.warmup_ratio,  # transformers 5: a value < 1 is a ratio of the total steps
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm,
        "optim": t.optim.value,
        "logging_strategy": "steps",
        "logging_steps": t.logging_steps,
        "log_level": t.log_level.value,
        "eval_strategy": t.eval_strategy.value,
        "save_strategy": t.save_strategy.value,
        "save_steps": t.save_steps,
        "save_total_limit": t.save_total_limit,
        "bf16": t.precision is Precision.bf16,
        "fp16": t.precision is Precision.fp16,
        "gradient_checkpointing": t.gradient_checkpointing,
        "max_length": t.max_seq_len,
        "report_to": [recipe.logger.value] if recipe.logger is not Logger.none else "none",
        "use_cpu": on_cpu,  # transformers refuses bf16 on a GPU-less machine unless told it is CPU on purpose
    }
    if t.eval_strategy is Strategy.steps:
        kwargs["eval_steps"] = t.eval_steps
    if t.lr_scheduler_kwargs:
        kwargs["lr_scheduler_kwargs"] = dict(t.lr_scheduler_kwargs)
    if t.lazy_metrics:  # the filter checks every micro-batch's loss on the host: a sync each (runner.sft_trainer_class)
        kwargs["logging_nan_inf_filter"] = False
    accelerator: dict[str, Any] = {}
    if t.async_inputs and not on_cpu:  # the DataLoader pins batches (transformers' default) for these async copies
        accelerator["non_blocking"] = True
    if sync_each_micro_batch(recipe):
        accelerator["gradient_accumulation_kwargs"] = {"sync_each_batch": True}
    if accelerator:
        kwargs["accelerator_config"] = accelerator
    if t.liger:  # TRL keeps its own fused LM head, so Liger's fused cross-entropy stays off
        kwargs["use_liger_kernel"] = True
    if t.gradient_checkpointing:
        kwargs["gradient_checkpointing_kwargs"] = {"use_reentrant": t.use_reentrant}
    if recipe.dist.backend is DistBackend.ddp and world_size(recipe) > 1:
        kwargs["ddp_find_unused_parameters"] = False  # frozen base weights are not "unused" parameters
    return kwargs


def allocator_settings(recipe: RecipeConfig, on_cuda: bool) -> str | None:
    """The CUDA caching allocator's settings for this run (PYTORCH_ALLOC_CONF syntax), None to leave them."""
    return "expandable_segments:True" if recipe.trainer.expandable_segments and on_cuda else None


def logger_env(recipe: RecipeConfig, run_dir: str | Path) -> tuple[dict[str, str], dict[str, str]]:
    """(set for this run, defaults the user's environment may override) for the chosen logger. TensorBoard
    writes in the run dir; MLflow to a local SQLite store runs/mlflow.db (no server, no network); wandb
    gets the project and keeps its local files in the run dir."""
    project = recipe.logger_project or recipe.name
    per_run = {"TENSORBOARD_LOGGING_DIR": str(Path(run_dir) / "tensorboard")}
    defaults: dict[str, str] = {}
    if recipe.logger is Logger.wandb:
        per_run["WANDB_DIR"] = str(run_dir)
        defaults["WANDB_PROJECT"] = project
    if recipe.logger is Logger.mlflow:
        # a local SQLite store (recent MLflow refuses its old ./mlruns file store unless told otherwise)
        store = Path("runs/mlflow.db").resolve()
        defaults |= {"MLFLOW_EXPERIMENT_NAME": project, "MLFLOW_TRACKING_URI": f"sqlite:///{store}"}
    return per_run, defaults


def sft_kwargs(recipe: RecipeConfig, output_dir: str | Path, on_cpu: bool = False) -> dict[str, Any]:
    """`trl.SFTConfig` keywords. The data arrives tokenized with labels (data.py), so TRL's own
    text handling (dataset_text_field, completion masks) is bypassed; packing and truncation still apply."""
    return {
        **training_kwargs(recipe, output_dir, on_cpu),
        "packing": recipe.trainer.packing,
        "dataset_text_field": recipe.data.text_field,
    }


def dpo_kwargs(recipe: RecipeConfig, output_dir: str | Path, on_cpu: bool = False) -> dict[str, Any]:
    """`trl.DPOConfig` keywords. The reference model is not configured here: with LoRA, TRL computes the
    reference log-probabilities with the adapter disabled (runner passes no ref_model)."""
    t = recipe.trainer
    return {**training_kwargs(recipe, output_dir, on_cpu), "beta": t.beta, "loss_type": [t.dpo_loss.value]}


def orpo_kwargs(recipe: RecipeConfig, output_dir: str | Path, on_cpu: bool = False) -> dict[str, Any]:
    """`ORPOConfig` keywords (trl.experimental.orpo): beta is ORPO's lambda, the weight of the odds-ratio term
    beside the chosen answers' language-model loss. No reference model exists in ORPO."""
    t = recipe.trainer
    kwargs = {**training_kwargs(recipe, output_dir, on_cpu), "beta": t.beta}
    if t.max_completion_len:
        kwargs["max_completion_length"] = t.max_completion_len
    return kwargs


TRAINER_KWARGS = {TrainerKind.sft: sft_kwargs, TrainerKind.dpo: dpo_kwargs, TrainerKind.orpo: orpo_kwargs}


def trainer_kwargs(recipe: RecipeConfig, output_dir: str | Path, on_cpu: bool = False) -> dict[str, Any]:
    """The config keywords of the recipe's trainer kind (SFTConfig, DPOConfig or ORPOConfig)."""
    return TRAINER_KWARGS[recipe.trainer.kind](recipe, output_dir, on_cpu)


SHARDED = (DistBackend.fsdp, DistBackend.zero3, DistBackend.zero3_offload)  # parameters split across GPUs
DEEPSPEED_STAGE = {DistBackend.zero2: 2, DistBackend.zero3: 3, DistBackend.zero3_offload: 3}


def shards_parameters(recipe: RecipeConfig) -> bool:
    return recipe.dist.backend in SHARDED


def loads_on_own_gpu(recipe: RecipeConfig) -> bool:
    """Whether each process loads the whole (quantized) model onto its GPU before training starts: all but
    FSDP v1 and ZeRO-3, which load on CPU/meta and shard as they go. FSDP2 shards a loaded 4-bit model."""
    return not shards_parameters(recipe) or is_fsdp2(recipe)


def is_fsdp2(recipe: RecipeConfig) -> bool:
    return recipe.dist.backend is DistBackend.fsdp and recipe.dist.fsdp_version == 2


def is_zero3(recipe: RecipeConfig) -> bool:
    return DEEPSPEED_STAGE.get(recipe.dist.backend) == 3


def zero3_leaf_blocks(recipe: RecipeConfig) -> bool:
    return recipe.dist.zero3_leaf_blocks and is_zero3(recipe)


def zero3_leaf_fast_sharding(recipe: RecipeConfig) -> bool:
    return recipe.dist.zero3_leaf_fast_sharding and zero3_leaf_blocks(recipe)


def zero3_torch_linear(recipe: RecipeConfig) -> bool:
    """Whether a ZeRO-3 run keeps torch's F.linear instead of DeepSpeed's replacement (dist.zero3_memory_efficient_linear;
    unset: keep torch's when the decoder blocks are compiled)."""
    chosen = recipe.dist.zero3_memory_efficient_linear
    return is_zero3(recipe) and (chosen is False or (chosen is None and recipe.trainer.torch_compile))


def zero3_overrides(recipe: RecipeConfig) -> dict[str, int | bool]:
    """Values for the DeepSpeed config's zero_optimization section that replace accelerate's "auto" or DeepSpeed's
    defaults (`memory_efficient_linear` only when torch's linear is kept, zero3_torch_linear; the runner also undoes
    what zero.Init did with it while the weights loaded: runner.restore_torch_linear)."""
    dist = recipe.dist
    if not is_zero3(recipe):
        return {}
    chosen: dict[str, int | bool | None] = {
        "stage3_param_persistence_threshold": dist.zero3_persistence_threshold,
        "stage3_prefetch_bucket_size": dist.zero3_prefetch_bucket_size,
        "reduce_bucket_size": dist.zero3_reduce_bucket_size,
        "memory_efficient_linear": False if zero3_torch_linear(recipe) else None,
    }
    return {key: value for key, value in chosen.items() if value is not None}


def accelerate_config(recipe: RecipeConfig, on_cpu: bool) -> dict[str, Any]:
    """The accelerate launch config (the fields of `accelerate config`'s YAML). FSDP and ZeRO fields follow
    PEFT's fsdp_config_qlora.yaml and deepspeed_config_z3_qlora.yaml."""
    dist = recipe.dist
    mixed = {Precision.bf16: "bf16", Precision.fp16: "fp16"}.get(recipe.trainer.precision, "no")
    config: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "NO",
        "num_machines": dist.num_machines,
        "num_processes": dist.num_processes * dist.num_machines,  # accelerate counts all machines
        "machine_rank": dist.machine_rank,
        "mixed_precision": mixed,
        "use_cpu": on_cpu,
        "downcast_bf16": "no",
        "rdzv_backend": "static",
        "same_network": True,
        "main_training_function": "main",
    }
    if dist.main_process_ip:
        config["main_process_ip"] = dist.main_process_ip
        config["main_process_port"] = dist.main_process_port
    if dist.backend is DistBackend.ddp and dist.num_processes * dist.num_machines > 1:
        config["distributed_type"] = "MULTI_CPU" if on_cpu else "MULTI_GPU"
    elif is_fsdp2(recipe):
        config["distributed_type"] = "FSDP"
        config["fsdp_config"] = {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",  # one unit per decoder block, its LoRA inside
            # 4-bit weights cannot go through accelerate's meta-device broadcast: every process loads its copy
            "fsdp_cpu_ram_efficient_loading": not recipe.quant.load_in_4bit,
            "fsdp_offload_params": dist.fsdp_offload_params,
            "fsdp_reshard_after_forward": dist.fsdp_reshard_after_forward,  # true = FULL_SHARD
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
        }
    elif dist.backend is DistBackend.fsdp:
        config["distributed_type"] = "FSDP"
        config["fsdp_config"] = {
            "fsdp_version": 1,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_backward_prefetch": "BACKWARD_PRE",
            "fsdp_cpu_ram_efficient_loading": True,
            "fsdp_forward_prefetch": False,
            "fsdp_offload_params": dist.fsdp_offload_params,
            "fsdp_sharding_strategy": "FULL_SHARD",
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            "fsdp_sync_module_states": True,
            "fsdp_use_orig_params": False,
        }
    elif dist.backend in DEEPSPEED_STAGE:
        stage = DEEPSPEED_STAGE[dist.backend]
        offload = "cpu" if dist.backend is DistBackend.zero3_offload else "none"
        config["distributed_type"] = "DEEPSPEED"
        config["deepspeed_config"] = {
            "deepspeed_multinode_launcher": "standard",
            "offload_optimizer_device": offload,
            "offload_param_device": offload,
            "zero3_init_flag": stage == 3,
            "zero3_save_16bit_model": stage == 3,
            "zero_stage": stage,
        }
    return config


def launch_command(recipe: RecipeConfig, run_dir: str | Path, on_cpu: bool, python: str = "python") -> list[str] | None:
    """How `run` starts the workers; None = train in-process (one process).

    Several GPUs: accelerate's launcher with the generated config (torchrun underneath: one failing rank
    ends the job). Several CPU processes (gloo; tests and CPU-only hosts): torchrun directly, since
    accelerate launches multi-CPU jobs only through mpirun."""
    processes = recipe.dist.num_processes
    if processes == 1 and recipe.dist.num_machines == 1 and recipe.dist.backend is DistBackend.single:
        return None
    worker = ["-m", "qlora_recipes", "train", str(run_dir)]
    if on_cpu:
        return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *worker]
    config = str(Path(run_dir) / "accelerate_config.yaml")
    return [python, "-m", "accelerate.commands.launch", "--config_file", config, *worker]
