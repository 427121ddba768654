"""Resolve: composed DictConfig -> typed Recipe with every `auto` made concrete, then cross-group checks.

`resolve` is pure given a `Device`; `probe_device` is the only place that looks at the hardware, and it
imports torch only when an NVIDIA driver is present. The resolved recipe is what gets written to the
run dir and what training processes read back, so they never re-resolve on other hardware.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from qlora_recipes import attention, plan
from qlora_recipes.errors import RecipeError
from qlora_recipes.schema import (
    FIRST_PROJECTIONS,
    SCHEDULER_ARGS,
    Attention,
    Backend,
    DataFormat,
    DistBackend,
    DType,
    LossOn,
    ModelSource,
    Precision,
    QuantConfig,
    QuantType,
    RecipeConfig,
    StorageDType,
    Strategy,
    TaskMetric,
    TemplateFormat,
    TrainerConfig,
    TrainerKind,
)


@dataclass(frozen=True)
class Device:
    kind: str = "cpu"  # "cuda" or "cpu"
    count: int = 0  # visible GPUs
    bf16: bool = False  # the GPU computes in bfloat16 natively
    flash_attn: bool = False  # the flash-attn package is importable
    memory_gib: float = 0.0  # total memory of the smallest visible GPU
    # a C/C++ compiler is on PATH: torch.compile builds its kernels (and Triton's launchers) with it
    compiler: bool = True

    def describe(self) -> str:
        if self.kind == "cpu":
            return "CPU"
        return f"{self.count} CUDA GPU(s), bf16 {'yes' if self.bf16 else 'no'}"


def has_compiler() -> bool:
    return any(shutil.which(name) for name in (os.environ.get("CXX"), "g++", "clang++", "c++") if name)


def probe_device() -> Device:
    """What this machine trains on. Cheap on machines without an NVIDIA driver (no torch import)."""
    compiler = has_compiler()
    if not Path("/proc/driver/nvidia").exists() or os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        return Device(compiler=compiler)
    import torch

    if not torch.cuda.is_available():
        return Device(compiler=compiler)
    count = torch.cuda.device_count()
    return Device(
        kind="cuda",
        count=count,
        bf16=torch.cuda.is_bf16_supported(),
        flash_attn=importlib.util.find_spec("flash_attn") is not None,
        memory_gib=min(torch.cuda.get_device_properties(i).total_memory for i in range(count)) / 2**30,
        compiler=compiler,
    )


@dataclass
class Resolved:
    recipe: RecipeConfig
    device: Device
    notes: list[str] = field(default_factory=list)  # what `auto` became and why; printed by show/run


def to_recipe(cfg: DictConfig) -> RecipeConfig:
    try:
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except Exception as exc:  # an interpolation or missing value the user left
        raise RecipeError(f"recipe cannot be resolved: {exc}") from None


def resolve(cfg: DictConfig | RecipeConfig, device: Device) -> Resolved:
    recipe = cfg if isinstance(cfg, RecipeConfig) else to_recipe(cfg)
    notes: list[str] = []

    dtype = recipe.model.dtype
    fp16_mixed = False  # float32 weights trained in fp16 mixed precision (full fine-tuning on a GPU without bf16)
    if dtype is DType.auto:
        if device.kind == "cpu":
            dtype = DType.float32
            notes.append("model.dtype auto -> float32 (CPU: bf16 is emulated there and several times slower)")
        elif device.bf16:
            dtype = DType.bfloat16
            notes.append("model.dtype auto -> bfloat16 (GPU supports it)")
        elif not recipe.lora.enabled:
            dtype, fp16_mixed = DType.float32, True
            notes.append(
                "model.dtype auto -> float32: this GPU has no bf16, and full fine-tuning in fp16 mixed precision "
                "needs float32 weights (its loss scaler cannot unscale fp16 gradients)"
            )
        else:
            dtype = DType.float16
            notes.append(
                "model.dtype auto -> float16: this GPU has no bf16. fp16 has a narrow range, so losses can "
                "overflow (the trainer scales them); bf16 GPUs (Ampere or newer) train more robustly."
            )
    compute = recipe.quant.compute_dtype
    if compute is DType.auto:
        compute = dtype

    precision = recipe.trainer.precision
    if precision is Precision.auto:
        precision = {DType.bfloat16: Precision.bf16, DType.float16: Precision.fp16}.get(dtype, Precision.fp32)
        why = f"follows model.dtype {dtype.value}"
        if fp16_mixed:
            precision, why = Precision.fp16, "mixed precision over the float32 weights"
        notes.append(f"trainer.precision auto -> {precision.value} ({why})")

    attn = recipe.model.attn_implementation
    if attn is Attention.fastest:
        unmet = varlen_unmet(device, recipe.trainer, precision)
        attn = Attention.auto if unmet else Attention.varlen
        why = "; ".join(reason.split(":")[0] for reason in unmet) or "CUDA, torch >= 2.10, packed SFT in bf16/fp16"
        notes.append(f"model.attn_implementation fastest -> {attn.value} ({why})")
    if attn is Attention.auto:
        if device.kind == "cuda" and device.flash_attn:
            attn = Attention.flash_attention_2
            notes.append("model.attn_implementation auto -> flash_attention_2 (flash-attn installed)")
        else:
            attn = Attention.sdpa
            why = "flash-attn is not installed" if device.kind == "cuda" else "CPU"
            notes.append(f"model.attn_implementation auto -> sdpa ({why}; PyTorch's fused attention)")

    processes = recipe.dist.num_processes
    if processes == 0:
        processes = max(device.count, 1)
        notes.append(f"dist.num_processes 0 -> {processes} (one per visible GPU)")

    recipe = replace(
        recipe,
        dist=replace(recipe.dist, num_processes=processes),
        model=replace(recipe.model, dtype=dtype, attn_implementation=attn),
        quant=replace(recipe.quant, compute_dtype=compute),
        trainer=replace(recipe.trainer, precision=precision),
    )
    if recipe.dist.backend is DistBackend.auto:
        recipe = auto_dist(recipe, device, notes)
    resolved = Resolved(recipe=recipe, device=device, notes=notes)
    validate(resolved)
    return resolved


# a whole model per GPU (DDP) while its estimate stays under this share of the GPU: the CUDA context, the
# allocator's slack and the estimate's error (docs in memory.py) take the rest
DDP_FITS = 0.8


def auto_dist(recipe: RecipeConfig, device: Device, notes: list[str]) -> RecipeConfig:
    """dist=auto: single for one process; else DDP when the model and its activations fit on one GPU (the
    fastest: no gathers), else FSDP (ZeRO-3 when the template's new-token rows train: FSDP v1 cannot shard
    them), with 4-bit weights stored in the compute dtype. Each choice is noted with its estimate."""
    from qlora_recipes import memory, models

    processes = recipe.dist.num_processes * recipe.dist.num_machines
    if processes == 1:
        notes.append("dist auto -> single (one process)")
        return replace(recipe, dist=replace(recipe.dist, backend=DistBackend.single))
    if device.kind != "cuda":
        notes.append("dist auto -> ddp (several CPU processes: DDP is the backend that runs on CPU)")
        return replace(recipe, dist=replace(recipe.dist, backend=DistBackend.ddp))
    shape = memory.ModelShape.from_config(models.config_dict(recipe.model))
    whole = memory.estimate(recipe, shape)
    budget = DDP_FITS * device.memory_gib
    if whole.total_gib <= budget:
        notes.append(f"dist auto -> ddp: a whole model per GPU needs {whole.describe()}; fits in {budget:.0f} GiB")
        return replace(recipe, dist=replace(recipe.dist, backend=DistBackend.ddp))
    if recipe.quant.load_in_8bit:
        raise RecipeError(
            f"dist=auto: a whole model per GPU needs {whole.describe()}, more than {budget:.0f} GiB, and 8-bit "
            "weights cannot be sharded. Use quant=nf4 (then dist=auto shards with FSDP), a smaller "
            "trainer.micro_batch_size or trainer.max_seq_len, or trainer.gradient_checkpointing=true"
        )
    sharded = memory.estimate(recipe, shape, shards=processes)
    if plan.trains_new_token_rows(recipe):
        # FSDP v1 cannot shard trainable new-token rows (validate says why); ZeRO-3 can
        notes.append(
            f"dist auto -> zero3: a whole model per GPU needs {whole.describe()}, over {budget:.0f} GiB, and the "
            f"template's new-token rows train, which FSDP v1 cannot shard; sharded over {processes} GPUs "
            f"{sharded.describe()}"
        )
        return replace(recipe, dist=replace(recipe.dist, backend=DistBackend.zero3), quant=sharded_quant(recipe, notes))
    notes.append(
        f"dist auto -> fsdp: a whole model per GPU needs {whole.describe()}, over {budget:.0f} GiB; sharded over "
        f"{processes} GPUs {sharded.describe()}"
    )
    return replace(recipe, dist=replace(recipe.dist, backend=DistBackend.fsdp), quant=sharded_quant(recipe, notes))


def sharded_quant(recipe: RecipeConfig, notes: list[str]) -> QuantConfig:
    """4-bit weights shard only when stored in the compute dtype (FSDP and ZeRO-3 flatten them with the rest)."""
    quant = recipe.quant
    if quant.load_in_4bit and quant.storage_dtype.value != quant.compute_dtype.value:
        quant = replace(quant, storage_dtype=StorageDType(quant.compute_dtype.value))
        notes.append(f"quant.storage_dtype -> {quant.storage_dtype.value} (sharded 4-bit weights: the compute dtype)")
    return quant


def varlen_unmet(device: Device, t: TrainerConfig, precision: Precision) -> list[str]:
    """Why a run cannot use the varlen kernel (empty when it can), each reason opening with what it needs."""
    unmet = []
    if not (device.kind == "cuda" and attention.available()):
        unmet.append("needs a CUDA GPU and torch >= 2.10: it runs torch's flash-attention varlen kernel")
    if not (t.packing and t.kind is TrainerKind.sft):
        unmet.append(
            "needs trainer.packing=true (SFT): it attends within each packed sequence from the boundaries that "
            "padding-free packing sends with the batch; without them every batch would fall back to sdpa"
        )
    if precision not in (Precision.bf16, Precision.fp16):
        unmet.append("needs trainer.precision=bf16 (or fp16): flash attention computes in bf16 or fp16")
    return unmet


def scheduler_problems(name: str, kwargs: dict[str, Any]) -> list[str]:
    """What trainer.lr_scheduler_kwargs lacks or has too much for the scheduler (transformers would fail at the first
    step, or ignore an argument silently)."""
    problems = []
    allowed = SCHEDULER_ARGS[name]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        takes = f"it takes {', '.join(allowed)}" if allowed else "it takes none"
        problems.append(
            f"trainer.lr_scheduler_kwargs has {', '.join(unknown)}, which lr_scheduler={name} does not use: {takes}"
        )
    if name == "cosine_with_min_lr" and ("min_lr" in kwargs) == ("min_lr_rate" in kwargs):
        problems.append(
            "trainer.lr_scheduler=cosine_with_min_lr needs one of min_lr (an absolute rate) or min_lr_rate (a share of "
            "trainer.learning_rate): e.g. +trainer.lr_scheduler_kwargs.min_lr_rate=0.1"
        )
    steps = kwargs.get("num_decay_steps")
    if name == "warmup_stable_decay" and not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
        problems.append(
            f"trainer.lr_scheduler=warmup_stable_decay needs num_decay_steps, a whole number of optimizer steps >= 1 "
            f"(got {steps!r}): e.g. +trainer.lr_scheduler_kwargs.num_decay_steps=100"
        )
    return problems


def unsloth_problems(r: RecipeConfig) -> list[str]:
    """What backend=unsloth cannot honour: its FastLanguageModel loads 4-bit or unquantized weights and wraps LoRA
    from the rank, alpha, dropout, targets, bias and rslora only (runner.setup_unsloth_model); the rest would be
    dropped silently."""
    lora = r.lora
    if not lora.enabled:
        return ["backend=unsloth with lora=none: its path trains LoRA adapters. Use backend=hf for full fine-tuning"]
    asked = {
        "quant=int8 (it loads 4-bit or unquantized weights; use quant=nf4 or quant=none)": r.quant.load_in_8bit,
        "lora.use_dora=true": lora.use_dora,
        "lora.last_n_layers": lora.last_n_layers is not None,
        "lora.modules_to_save": bool(lora.modules_to_save),
        "trainable new-token rows (set lora.train_new_tokens=false: the rows keep their initial values, as in the "
        "original's Unsloth path)": plan.trains_new_token_rows(r),
    }
    return [f"backend=unsloth does not support {what}, or use backend=hf" for what, on in asked.items() if on]


def validate(resolved: Resolved) -> None:
    """Every cross-group rule at once; raises one RecipeError listing each problem with its fix."""
    r, device = resolved.recipe, resolved.device
    q, lora, t, d, tpl = r.quant, r.lora, r.trainer, r.data, r.template
    problems: list[str] = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    # ranges
    need(lora.r > 0, f"lora.r={lora.r}: the rank must be a positive integer (typical 8-64)")
    need(lora.alpha > 0, f"lora.alpha={lora.alpha}: must be positive (typical 2*r)")
    need(0 <= lora.dropout < 1, f"lora.dropout={lora.dropout}: must be in [0, 1)")
    need(lora.last_n_layers is None or lora.last_n_layers > 0, "lora.last_n_layers must be >= 1 or null (all)")
    need(bool(lora.target_modules), "lora.target_modules is empty: use [all-linear] or module names like [q_proj]")
    need(t.learning_rate > 0, f"trainer.learning_rate={t.learning_rate}: must be > 0 (typical 1e-4 to 2e-4)")
    need(t.epochs > 0 or t.max_steps > 0, "trainer.epochs must be > 0, or trainer.max_steps > 0")
    need(t.max_steps != 0, "trainer.max_steps=0 trains nothing: use -1 (epochs decide) or a positive count")
    for key in ("batch_size", "micro_batch_size", "eval_batch_size", "logging_steps", "save_steps"):
        value = getattr(t, key)
        need(value >= 1, f"trainer.{key}={value}: must be >= 1")
    need(t.max_seq_len >= 16, f"trainer.max_seq_len={t.max_seq_len}: must be >= 16")
    need(0 <= t.warmup_ratio < 1, f"trainer.warmup_ratio={t.warmup_ratio}: must be in [0, 1)")
    problems += scheduler_problems(t.lr_scheduler.value, t.lr_scheduler_kwargs)
    need(t.weight_decay >= 0, f"trainer.weight_decay={t.weight_decay}: must be >= 0")
    need(t.max_grad_norm >= 0, f"trainer.max_grad_norm={t.max_grad_norm}: must be >= 0 (0 disables clipping)")
    need(t.task_eval_samples >= 0, "trainer.task_eval_samples must be >= 0")
    need(t.max_new_tokens >= 1, "trainer.max_new_tokens must be >= 1")
    need(r.dist.num_processes >= 1, f"dist.num_processes={r.dist.num_processes}: must be >= 1 (or 0 = all GPUs)")
    need(
        r.dist.backend is not DistBackend.single or r.dist.num_processes == 1,
        f"dist=single runs one process, not {r.dist.num_processes}: use dist=ddp for several",
    )
    need(
        r.dist.backend is not DistBackend.single or r.dist.num_machines == 1,
        f"dist=single runs on one machine, not dist.num_machines={r.dist.num_machines}: use dist=ddp (or fsdp, "
        "zero3) with dist.main_process_ip and dist.machine_rank on each machine",
    )
    need(
        device.kind == "cuda" or r.dist.num_machines == 1,
        f"dist.num_machines={r.dist.num_machines} on CPU: CPU processes are started on this machine only (torchrun "
        "--standalone); several machines need CUDA GPUs and accelerate's launcher",
    )
    if device.kind == "cuda":
        need(
            r.dist.num_processes <= device.count,
            f"dist.num_processes={r.dist.num_processes} but {device.count} GPU(s) are visible",
        )
    if t.batch_size >= 1 and t.micro_batch_size >= 1 and r.dist.num_processes >= 1 and r.dist.num_machines >= 1:
        per_step = t.micro_batch_size * r.dist.num_processes * r.dist.num_machines
        need(
            t.batch_size % per_step == 0,
            f"trainer.batch_size={t.batch_size} is not a multiple of micro_batch_size * processes = {per_step}: "
            f"gradient accumulation must be a whole number (try trainer.batch_size={per_step * max(1, t.batch_size // per_step)})",
        )
    need(r.dist.num_machines >= 1, f"dist.num_machines={r.dist.num_machines}: must be >= 1")
    need(
        0 <= r.dist.machine_rank < max(r.dist.num_machines, 1),
        f"dist.machine_rank={r.dist.machine_rank}: must be in [0, dist.num_machines={r.dist.num_machines})",
    )
    need(
        r.dist.num_machines == 1 or bool(r.dist.main_process_ip),
        "dist.num_machines > 1 needs dist.main_process_ip (the rank-0 machine's address)",
    )
    need(
        t.eval_strategy is not Strategy.steps or (t.eval_steps or 0) >= 1,
        "trainer.eval_strategy=steps needs trainer.eval_steps >= 1",
    )
    if d.test_fraction is not None:
        need(0 < d.test_fraction < 1, f"data.test_fraction={d.test_fraction}: must be in (0, 1)")
    for key in ("max_train_samples", "max_eval_samples"):
        value = getattr(d, key)
        need(value is None or value >= 1, f"data.{key}={value}: must be >= 1 or null")
    need(bool(d.splits) or d.test_fraction is not None, "data.splits is empty: name the splits, e.g. [train, test]")

    # quantization and adapters
    need(
        not (q.load_in_4bit and q.load_in_8bit),
        "quant: load_in_4bit and load_in_8bit are both set: choose one (quant=nf4 or quant=int8)",
    )
    need(
        lora.enabled or not (q.load_in_4bit or q.load_in_8bit),
        "lora=none (full fine-tuning) with a quantized base: quantized weights cannot be trained. "
        "Use quant=none for full fine-tuning, or keep LoRA (lora=default) for QLoRA",
    )

    need(
        lora.enabled or not (r.trainer.precision is Precision.fp16 and r.model.dtype is DType.float16),
        "lora=none with model.dtype=float16 and trainer.precision=fp16: fp16 mixed precision cannot unscale the "
        "gradients of fp16 weights, so the first step fails. Use model.dtype=float32 (or auto) for full "
        "fine-tuning in fp16, or keep LoRA (its adapters train in float32)",
    )

    # precision and device
    if device.kind == "cpu":
        need(
            r.trainer.precision is not Precision.fp16,
            "trainer.precision=fp16 needs a CUDA GPU (mixed-precision fp16 training is not supported on CPU): "
            "use trainer.precision=fp32 or auto",
        )
        need(r.backend is not Backend.unsloth, "backend=unsloth needs a CUDA GPU; none is visible: use backend=hf")
        if r.model.dtype is DType.bfloat16 or r.quant.compute_dtype is DType.bfloat16:
            resolved.notes.append("bfloat16 on CPU: correct but several times slower than float32 here")
    else:
        need(
            r.trainer.precision is not Precision.bf16 or device.bf16,
            "trainer.precision=bf16 but this GPU has no bf16: use trainer.precision=fp16 (or auto)",
        )
    need(
        r.backend is not Backend.unsloth or r.dist.num_processes == 1,
        "backend=unsloth supports a single process only: set dist=single or backend=hf",
    )
    if r.backend is Backend.unsloth:
        need(
            importlib.util.find_spec("unsloth") is not None,
            "backend=unsloth but the unsloth package is not installed: pip install unsloth, or use backend=hf",
        )
        problems += unsloth_problems(r)
    need(
        not r.sweep_gpus or (r.dist.num_processes == 1 and r.dist.num_machines == 1),
        f"sweep_gpus={list(r.sweep_gpus)} with dist.num_processes={r.dist.num_processes}: a pinned sweep job sees "
        "one GPU, so it trains in one process. Drop sweep_gpus, or use dist=single",
    )
    for logger in ("wandb", "mlflow"):
        need(
            r.logger.value != logger or importlib.util.find_spec(logger) is not None,
            f"logger={logger} but the {logger} package is not installed: pip install {logger}, or use "
            "logger=tensorboard (the default, offline) or logger=none",
        )
    if t.liger:
        need(
            device.kind == "cuda" and not t.kind.on_pairs,
            "trainer.liger=true: Liger's kernels are Triton GPU kernels, used here for SFT on CUDA only. "
            "Set trainer.liger=false",
        )
        need(
            importlib.util.find_spec("liger_kernel") is not None,
            "trainer.liger=true but the liger-kernel package is not installed: pip install liger-kernel, or set "
            "trainer.liger=false",
        )
        need(
            not t.torch_compile,
            "trainer.liger=true with trainer.torch_compile=true: compiling the decoder blocks fails in Liger's RMSNorm "
            "autograd function (a dynamo AssertionError with torch 2.11 and liger-kernel 0.8.5 on an H200, docs/gpu.md "
            "twentieth session; Liger-Kernel#174). Use one of the two",
        )
    need(
        not (t.lazy_metrics and t.kind.on_pairs),
        f"trainer.lazy_metrics=true with trainer.kind={t.kind.value}: it changes how the SFT trainer reads its "
        "metrics; DPO and ORPO read theirs as TRL does. Set trainer.lazy_metrics=false",
    )
    need(
        r.model.attn_implementation is not Attention.flash_attention_2 or device.flash_attn,
        "model.attn_implementation=flash_attention_2 but flash-attn is not installed (or no GPU): "
        "pip install flash-attn on a CUDA machine, or use model.attn_implementation=sdpa",
    )
    if r.model.attn_implementation is Attention.varlen:
        for reason in varlen_unmet(device, t, t.precision):
            need(False, f"model.attn_implementation=varlen {reason}. Use model.attn_implementation=sdpa (or fastest)")

    # distributed backends
    backend = r.dist.backend
    if backend not in (DistBackend.single, DistBackend.ddp):
        need(device.kind == "cuda", f"dist={backend.value} needs CUDA GPUs (NCCL); on CPU use dist=single or dist=ddp")
        need(
            not q.load_in_8bit,
            f"dist={backend.value} with 8-bit weights: bitsandbytes int8 weights cannot be sharded or driven by "
            "DeepSpeed. Use quant=nf4 (with quant.storage_dtype equal to the compute dtype) or dist=ddp",
        )
    if plan.shards_parameters(r) and q.load_in_4bit:
        need(
            q.storage_dtype.value == q.compute_dtype.value == r.model.dtype.value,
            f"dist={backend.value} with 4-bit weights: FSDP/ZeRO-3 flatten and shard the packed 4-bit tensors "
            f"with the other parameters, which needs one dtype: quant.storage_dtype ({q.storage_dtype.value}), "
            f"quant.compute_dtype ({q.compute_dtype.value}) and model.dtype ({r.model.dtype.value}) must be equal "
            "(e.g. all bfloat16)",
        )

    need(
        r.dist.fsdp_version in (1, 2),
        f"dist.fsdp_version={r.dist.fsdp_version}: choose 1 (FSDP v1, flat parameters) or 2 (FSDP2, per-parameter)",
    )
    fsdp1 = backend is DistBackend.fsdp and r.dist.fsdp_version == 1
    need(
        not (fsdp1 and plan.trains_new_token_rows(r)),
        "dist=fsdp with dist.fsdp_version=1 and trainable new-token rows: FSDP v1 (use_orig_params=false) cannot "
        "flatten the trainable rows with the frozen embedding they live in (measured on 2 GPUs, docs/gpu.md). "
        "Use dist.fsdp_version=2 (models with untied embeddings), set lora.train_new_tokens=false (the rows keep their initial values, as in the "
        "original), use a template without new tokens (template=tokenizer), or dist=zero3",
    )
    need(
        not t.torch_compile or device.compiler,
        "trainer.torch_compile=true needs a C/C++ compiler on PATH (g++, clang++, c++ or $CXX): torch.compile builds "
        "its kernels with it. Install one (e.g. apt install g++) or set trainer.torch_compile=false",
    )
    need(
        0 < t.activation_memory_budget <= 1 and (t.torch_compile or t.activation_memory_budget == 1),
        f"trainer.activation_memory_budget={t.activation_memory_budget}: the share (0 to 1] of a compiled block's "
        "activations its backward may keep, used with trainer.torch_compile=true (1.0, torch's default, keeps what "
        "the compiler chooses). Set a value in (0, 1] with trainer.torch_compile=true, or 1.0",
    )
    need(
        not lora.lean_dropout
        or (
            lora.enabled
            and lora.dropout > 0
            and not lora.use_dora
            and r.backend is Backend.hf
            and not plan.shards_parameters(r)
        ),
        f"lora.lean_dropout=true folds each LoRA layer's dropout into its A projection; this run has lora.enabled="
        f"{str(lora.enabled).lower()}, lora.dropout={lora.dropout}, lora.use_dora={str(lora.use_dora).lower()}, "
        f"backend={r.backend.value}, dist={backend.value}. It needs LoRA with dropout > 0, no DoRA (DoRA reads the "
        "dropped-out input itself), backend=hf and one whole model per GPU (dist=single or ddp). Set it false or "
        "change those",
    )
    need(
        not lora.fused_add or (lora.enabled and r.backend is Backend.hf and not plan.shards_parameters(r)),
        f"lora.fused_add=true computes each LoRA layer's B product, scale and add as one matrix product; this run has "
        f"lora.enabled={str(lora.enabled).lower()}, backend={r.backend.value}, dist={backend.value}. It needs LoRA, "
        "backend=hf and one whole model per GPU (dist=single or ddp: it reads lora_B's weight directly, not through "
        "ZeRO-3's or FSDP's hooks). Set it false or change those",
    )
    need(
        not lora.add_in_base or (lora.enabled and q.compiled_dequant and not lora.fused_add and not lora.lean_dropout),
        f"lora.add_in_base=true has the routed nf4 base products add the LoRA output; this run has lora.enabled="
        f"{str(lora.enabled).lower()}, quant.compiled_dequant={str(q.compiled_dequant).lower()}, lora.fused_add="
        f"{str(lora.fused_add).lower()}, lora.lean_dropout={str(lora.lean_dropout).lower()}. It needs LoRA and "
        "quant.compiled_dequant=true (whose layers it adds in), and neither lora.fused_add (the add in lora_B's "
        "product instead) nor lora.lean_dropout. Set it false or change those",
    )
    need(
        not lora.hash_dropout
        or (lora.enabled and lora.dropout > 0 and r.backend is Backend.hf and not lora.lean_dropout),
        f"lora.hash_dropout=true draws each LoRA layer's dropout masks from a hash; this run has lora.enabled="
        f"{str(lora.enabled).lower()}, lora.dropout={lora.dropout}, backend={r.backend.value}, lora.lean_dropout="
        f"{str(lora.lean_dropout).lower()}. It needs LoRA with dropout > 0 and backend=hf (PEFT's dropout modules), "
        "and not lora.lean_dropout (which folds the dropout into lora_A with its own masks). Set it false or change "
        "those",
    )
    need(
        t.activation_memory_budget == 1 or not lora.enabled or lora.dropout == 0,
        f"trainer.activation_memory_budget={t.activation_memory_budget} with lora.dropout={lora.dropout}: below 1, "
        "torch's partitioner may recompute the dropout in the backward with fresh random numbers, and the gradients "
        "are then silently wrong (pytorch#190758, open; tests/test_tune_blocks.py). Set lora.dropout=0 or "
        "trainer.activation_memory_budget=1.0",
    )
    need(
        not (t.torch_compile and fsdp1),
        "trainer.torch_compile=true with dist=fsdp (v1): compiling a block means tracing into FSDP v1's separate "
        "units for every LoRA matrix inside it. Use dist.fsdp_version=2, dist=ddp or dist=zero3, or set "
        "trainer.torch_compile=false",
    )
    need(
        not (t.torch_compile and r.backend is Backend.unsloth),
        "trainer.torch_compile=true with backend=unsloth: Unsloth patches the model with its own kernels. "
        "Set trainer.torch_compile=false",
    )
    need(
        not q.compiled_dequant or (q.load_in_4bit and q.quant_type is QuantType.nf4),
        "quant.compiled_dequant=true computes nf4 weights (quant=nf4); this run has no 4-bit nf4 weights. Set it false",
    )
    need(
        not q.compiled_dequant or (t.torch_compile and not plan.shards_parameters(r)),
        "quant.compiled_dequant=true dequantizes inside the compiled decoder blocks: it needs trainer.torch_compile=true "
        "(eager, its torch ops would be slower than bitsandbytes' kernels; not with backend=unsloth, which the rule on "
        "trainer.torch_compile rejects) and one whole model per GPU (dist=single or ddp, not sharded). Set it false or "
        "change those",
    )
    need(
        not t.checkpoint_sublayers
        or (t.gradient_checkpointing and r.backend is Backend.hf and not plan.shards_parameters(r)),
        "trainer.checkpoint_sublayers=true checkpoints each decoder block as attention, then MLP; this run has "
        f"trainer.gradient_checkpointing={str(t.gradient_checkpointing).lower()}, backend={r.backend.value}, "
        f"dist={backend.value}. It needs gradient checkpointing, backend=hf (Unsloth checkpoints its own way) and one "
        "whole model per GPU (dist=single or ddp: not yet run with sharded blocks). Set it false or change those",
    )
    need(
        not t.lean_recompute or (t.checkpoint_sublayers and t.use_reentrant and r.lora.enabled),
        "trainer.lean_recompute=true skips, in each sublayer's recompute, work whose result is discarded: it needs "
        "trainer.checkpoint_sublayers=true and trainer.use_reentrant=true (the non-reentrant checkpoint's first "
        "forward is the one with grad, whose output is used) and LoRA (lora.enabled=true: a trainable base weight "
        f"needs its own gradient); this run has trainer.checkpoint_sublayers={str(t.checkpoint_sublayers).lower()}, "
        f"trainer.use_reentrant={str(t.use_reentrant).lower()}, lora.enabled={str(r.lora.enabled).lower()}. Set it "
        "false or change those",
    )
    if t.keep_projections:
        keepable = [name for names in FIRST_PROJECTIONS.values() for name in names]
        unknown = [name for name in t.keep_projections if name not in keepable]
        need(
            not unknown and len(set(t.keep_projections)) == len(t.keep_projections),
            f"trainer.keep_projections={list(t.keep_projections)}: it takes each of {', '.join(keepable)} at most "
            "once (the projections that read a sublayer's normalized input, whose frozen output the recompute can "
            f"reuse){'; not ' + ', '.join(unknown) if unknown else ''}. Fix the list",
        )
        need(
            t.checkpoint_sublayers and t.use_reentrant and r.lora.enabled,
            "trainer.keep_projections keeps projections' frozen outputs from a sublayer's first forward for its "
            "recompute: it needs trainer.checkpoint_sublayers=true and trainer.use_reentrant=true (the reentrant "
            "checkpoint's first forward, without grad) and LoRA (lora.enabled=true: frozen base layers); this run has "
            f"trainer.checkpoint_sublayers={str(t.checkpoint_sublayers).lower()}, "
            f"trainer.use_reentrant={str(t.use_reentrant).lower()}, lora.enabled={str(r.lora.enabled).lower()}. Set it "
            "to [] or change those",
        )
    if t.offload_checkpoints:
        need(
            t.gradient_checkpointing and t.use_reentrant,
            "trainer.offload_checkpoints=true moves what reentrant gradient checkpointing saves for the backward to "
            "host memory; this run has trainer.gradient_checkpointing="
            f"{str(t.gradient_checkpointing).lower()}, trainer.use_reentrant={str(t.use_reentrant).lower()} "
            "(the non-reentrant checkpoint keeps its inputs where they are). Set both true, or set it false",
        )
        need(
            device.kind == "cuda" and r.backend is not Backend.unsloth,
            "trainer.offload_checkpoints=true frees GPU memory: it needs a CUDA GPU (on CPU the checkpoints are in "
            "host memory already) and backend=hf (Unsloth offloads its checkpoints itself). Set it false",
        )
    need(
        not r.dist.zero3_leaf_blocks or plan.is_zero3(r),
        f"dist.zero3_leaf_blocks=true with dist={backend.value}: it is a ZeRO-3 setting (how parameters are "
        "fetched). Use dist=zero3 or set it false",
    )
    backend_knobs = {  # set, each would be dropped by the other backends' launch configs (plan.accelerate_config)
        "dist.fsdp_offload_params=true": (r.dist.fsdp_offload_params, backend is DistBackend.fsdp, "dist=fsdp"),
        "dist.fsdp_reshard_after_forward=false": (
            not r.dist.fsdp_reshard_after_forward,
            plan.is_fsdp2(r),
            "dist=fsdp with dist.fsdp_version=2 (FSDP v1 always reshards: FULL_SHARD)",
        ),
        **{
            f"dist.{key}": (getattr(r.dist, key) is not None, plan.is_zero3(r), "dist=zero3 or zero3_offload")
            for key in ("zero3_persistence_threshold", "zero3_prefetch_bucket_size", "zero3_reduce_bucket_size")
        },
    }
    for knob, (set_, read, where) in backend_knobs.items():
        need(not set_ or read, f"{knob} with dist={backend.value}: only {where} reads it. Use that, or leave it unset")
    need(
        not t.profile_python or bool(t.profile_steps),
        "trainer.profile_python=true records Python calls in the traced steps, and trainer.profile_steps names none. "
        "Name the steps to trace (e.g. trainer.profile_steps=[6]; bench: bench.profile=true) or set it false",
    )
    need(
        not r.dist.zero3_leaf_fast_sharding or (r.dist.zero3_leaf_blocks and plan.is_zero3(r)),
        f"dist.zero3_leaf_fast_sharding=true with dist={backend.value} and "
        f"dist.zero3_leaf_blocks={str(r.dist.zero3_leaf_blocks).lower()}: it changes how ZeRO-3 fetches and releases "
        "leaf blocks. Use dist=zero3 with dist.zero3_leaf_blocks=true, or set it false",
    )
    need(
        r.dist.zero3_memory_efficient_linear is None or plan.is_zero3(r),
        f"dist.zero3_memory_efficient_linear={str(r.dist.zero3_memory_efficient_linear).lower()} with "
        f"dist={backend.value}: it is a ZeRO-3 setting (which linear function DeepSpeed runs). Use dist=zero3 or "
        "leave it unset (null)",
    )
    need(
        r.dist.sync_each_micro_batch is None or r.dist.backend not in plan.DEEPSPEED_STAGE,
        f"dist.sync_each_micro_batch={str(r.dist.sync_each_micro_batch).lower()} with dist={backend.value}: DeepSpeed "
        "decides itself when gradients are reduced during accumulation (ZeRO-2 and ZeRO-3 partition them after every "
        "micro-batch), so the setting would do nothing. Leave it unset (null)",
    )

    # trainer kind and data shape
    dpo, pairs, kind = t.kind is TrainerKind.dpo, t.kind.on_pairs, t.kind.value
    need(
        not pairs or d.format in (DataFormat.auto, DataFormat.preference),
        f"trainer={kind} with data.format={d.format.value}: {kind.upper()} trains on preference pairs "
        "(prompt/chosen/rejected). Use data.format=preference (or auto), or trainer=sft for this data",
    )
    need(
        pairs or d.format is not DataFormat.preference,
        "data.format=preference with trainer=sft: preference pairs train with trainer=dpo or orpo; SFT needs "
        "messages, text, alpaca or prompt/completion rows",
    )
    if dpo:
        need(
            lora.enabled,
            "trainer=dpo with lora=none: the reference model would be a second full copy of the weights. "
            "Use LoRA (lora=default): the reference is then the base with the adapter switched off",
        )
        need(
            not plan.trains_new_token_rows(r),
            "trainer=dpo with trainable new-token rows: TRL's DPO computes log-probabilities from lm_head.weight "
            "directly, so trained rows on the head would be ignored. Set lora.train_new_tokens=false or use a "
            "template without new tokens (template.add_tokens=false)",
        )
    if pairs:
        need(
            not t.packing,
            f"trainer={kind} with trainer.packing=true: preference pairs are not packed; set trainer.packing=false",
        )
        need(t.beta > 0, f"trainer.beta={t.beta}: must be > 0")
        for key in ("max_prompt_len", "max_completion_len"):
            value = getattr(t, key)
            need(value is None or value >= 1, f"trainer.{key}={value}: must be >= 1 or null")

    # model
    if r.model.source is not ModelSource.hub_or_path:
        need(
            not r.model.name_or_path.startswith(("/", ".", "~")),
            f"model.name_or_path={r.model.name_or_path!r} looks like a path, but model.source="
            f"{r.model.source.value} builds its own checkpoint and ignores it: add model.source=hub_or_path",
        )

    # template and data
    if tpl.format is TemplateFormat.tokenizer:
        need(not tpl.add_tokens, "template=tokenizer keeps the model's tokens: set template.add_tokens=false")
    elif tpl.add_tokens:
        need(
            bool(tpl.pad_token and tpl.eos_token),
            f"template.add_tokens=true needs template.pad_token and template.eos_token ({tpl.format.value})",
        )
    need(
        not (t.loss_on is LossOn.assistant and d.format is DataFormat.text),
        "trainer.loss_on=assistant with data.format=text: plain text has no assistant turns. "
        "Use loss_on=all, or a messages/prompt_completion/alpaca data set",
    )
    need(
        t.task_eval_samples == 0 or d.metric is not TaskMetric.none,
        "trainer.task_eval_samples > 0 but data.metric=none: set data.metric=exact_match or task_eval_samples=0",
    )
    need(
        r.resume_from_checkpoint != "auto" or r.output_dir is not None,
        "resume_from_checkpoint=auto looks in output_dir, which is unset: add output_dir=<the run dir to resume>",
    )

    if problems:
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        raise RecipeError(f"recipe '{r.name}' has {count}:\n" + "\n".join(f"  - {p}" for p in problems))
