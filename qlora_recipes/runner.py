"""The runner: read the run dir's resolved recipe, then setup_tokenizer -> data.prepare (errors before any
weights load) -> setup_args -> setup_model -> setup_trainer -> train -> save, in that order. Every process
of a multi-process job runs it; rank 0 alone generates, writes metrics and prints the summary.
Heavy imports happen here and nowhere above.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import resource
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_recipes import data as data_mod
from qlora_recipes import models, plan, plots, rundir
from qlora_recipes.errors import Interrupted, RecipeError
from qlora_recipes.materialize import from_pretrained_kwargs, lora_config, trainer_config
from qlora_recipes.profiling import StepProfiler
from qlora_recipes.report import fmt
from qlora_recipes.resolve import Resolved
from qlora_recipes.schema import Backend, DistBackend, RecipeConfig, TaskMetric, TrainerKind
from qlora_recipes.templates import tokenizer_changes

log = logging.getLogger("qlora_recipes")


# ---------------------------------------------------------------- setup


def process_rank() -> int:
    """This process's rank under torchrun/accelerate launch (0 when training in one process)."""
    return int(os.environ.get("RANK", "0"))


def console_handler() -> logging.Handler:
    """Our progress lines on stdout, prefixed so they stand out from the libraries' output."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[qlora_recipes] %(message)s"))
    return handler


@contextmanager
def handlers_attached(attached: list[tuple[logging.Logger, logging.Handler]]):
    """Attach (logger, handler) pairs, with our logger at INFO and kept out of the root logger, and
    detach them afterwards, so runs in one process (sweeps, tests, eval after train) never share output."""
    for logger, handler in attached:
        logger.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        yield
    finally:
        for logger, handler in attached:
            logger.removeHandler(handler)


@contextmanager
def run_logging(run_dir: Path):
    """Everything at the recipe's log level into run.log; the console gets our lines and library warnings."""
    import transformers

    rank = process_rank()
    file_handler = logging.FileHandler(run_dir / ("run.log" if rank == 0 else f"run.rank{rank}.log"))
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    ours = console_handler()
    libraries = logging.StreamHandler(sys.stderr)
    libraries.setLevel(logging.WARNING)
    libraries.setFormatter(logging.Formatter("[%(name)s] %(levelname)s: %(message)s"))
    transformers.utils.logging.disable_default_handler()
    console = (libraries,) if rank == 0 else ()  # other ranks write only their own file
    attached = [
        (logging.getLogger(name), handler)
        for name in ("transformers", "trl", "peft")
        for handler in (file_handler, *console)
    ]
    attached += [(log, file_handler)] + ([(log, ours)] if rank == 0 else [])
    try:
        with handlers_attached(attached):
            yield
    finally:
        file_handler.close()


def setup_tokenizer(recipe: RecipeConfig, checkpoint: str) -> tuple[Any, list[int]]:
    """The tokenizer with the template's chat template and special tokens; returns the added token ids."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        checkpoint, trust_remote_code=recipe.model.trust_remote_code, revision=recipe.model.revision
    )
    changes = tokenizer_changes(recipe.template)
    before = len(tokenizer)
    if changes.special_tokens or changes.additional_special_tokens:
        tokenizer.add_special_tokens(
            {**changes.special_tokens, "additional_special_tokens": changes.additional_special_tokens},
            replace_extra_special_tokens=False,
        )
    if changes.chat_template is not None:
        tokenizer.chat_template = changes.chat_template
    if tokenizer.chat_template is None:
        raise RecipeError(f"{checkpoint} has no chat template of its own: use template=chatml or template=zephyr")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    added = list(range(before, len(tokenizer)))
    if added:
        log.info(
            "template %s added %d special tokens: %s",
            recipe.template.format.value,
            len(added),
            tokenizer.convert_ids_to_tokens(added),
        )
    return tokenizer, added


def linear_module_names(model: Any) -> tuple[str, ...]:
    """Short names of the linear layers inside decoder block 0 (Linear, Linear4bit, Linear8bitLt)."""
    names = []
    for name, module in model.named_modules():
        if ".layers.0." in f"{name}." and "Linear" in type(module).__name__:
            short = name.split(".")[-1]
            if short not in names:
                names.append(short)
    return tuple(names)


def setup_model(
    resolved: Resolved, checkpoint: str, tokenizer: Any, new_token_ids: list[int], wrap_adapter: bool = True
) -> Any:
    """The base model, loaded and prepared as the recipe says, with its LoRA adapter unless wrap_adapter is
    false (DPO: TRL wraps it, so that the reference is the base with the adapter disabled)."""
    recipe = resolved.recipe
    if recipe.backend is Backend.unsloth:
        return setup_unsloth_model(resolved, checkpoint, tokenizer, new_token_ids)
    from transformers import AutoModelForCausalLM

    refuse_fsdp2_tied_new_rows(recipe, checkpoint, new_token_ids)
    kwargs = from_pretrained_kwargs(resolved)
    log.info("loading %s (%s)", checkpoint, ", ".join(f"{k}={v}" for k, v in plan.model_kwargs(recipe).items()))
    try:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, **kwargs)
    except (OSError, ValueError) as exc:
        raise RecipeError(f"cannot load model {checkpoint!r} as a causal LM: {str(exc).splitlines()[0]}") from None
    quantized = recipe.quant.load_in_4bit or recipe.quant.load_in_8bit
    sharded = plan.shards_parameters(recipe)
    if new_token_ids:  # mean-resizing reads the whole embedding: not with sharded or quantized weights
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=8, mean_resizing=not (sharded or quantized))
    model.config.pad_token_id = tokenizer.pad_token_id
    t = recipe.trainer
    model.config.use_cache = not t.gradient_checkpointing
    if quantized and not sharded and recipe.quant.upcast_unquantized:
        # Skipped under FSDP/ZeRO-3: its fp32 upcast would mix dtypes in the flattened shards (docs/seed_parity.md),
        # and with quant.upcast_unquantized=false. Casts the unquantized params (norms, embeddings) to fp32 for
        # stable training and makes inputs require grads so checkpointed blocks backpropagate into the adapters
        # (when skipped, the trainer's gradient checkpointing does that).
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=t.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": t.use_reentrant},
        )
    keep_cpu_4bit_differentiable(model)
    if not recipe.lora.enabled or not wrap_adapter:
        return model
    from peft import get_peft_model

    return get_peft_model(model, adapter_config(recipe, model, new_token_ids))


def refuse_fsdp2_tied_new_rows(recipe: RecipeConfig, checkpoint: str, new_token_ids: list[int]) -> None:
    """FSDP2 with trainable new-token rows on a model whose input and output embeddings are one tensor fails
    inside accelerate's sharding of the embedding (`fully_shard`: "Invariant encountered"; seen on an H200 with
    accelerate 1.15 and torch 2.11, docs/distributed.md): said before the weights load, with the ways out."""
    if not (plan.is_fsdp2(recipe) and new_token_ids and plan.trains_new_token_rows(recipe)):
        return
    if models.config_dict(recipe.model).get("tie_word_embeddings", False):
        raise RecipeError(
            "dist=fsdp with dist.fsdp_version=2 cannot train the template's new-token rows of a model with tied "
            f"input/output embeddings ({checkpoint}): accelerate's FSDP2 sharding of the embedding fails once PEFT "
            "wraps both ends. Set lora.train_new_tokens=false (the rows keep their initial values, as in the "
            "original), use a template without new tokens (template=tokenizer), or dist=zero3"
        )


def adapter_config(recipe: RecipeConfig, model: Any, new_token_ids: list[int]) -> Any:
    """The peft LoraConfig for this loaded model (None for full fine-tuning)."""
    facts = plan.ModelFacts(model.config.num_hidden_layers, linear_module_names(model))
    return lora_config(plan.lora_kwargs(recipe, facts, new_token_ids))


def keep_cpu_4bit_differentiable(model: Any) -> None:
    """bitsandbytes 0.50 repacks 4-bit weights for a faster CPU kernel on the first eval-mode forward
    (AVX512-BF16 CPUs) and never unpacks them; that kernel has no autograd, so later training steps would
    silently drop the gradient through every frozen 4-bit layer. Turn the repacking off."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def setup_unsloth_model(resolved: Resolved, checkpoint: str, tokenizer: Any, new_token_ids: list[int]) -> Any:
    """The original's Unsloth path: FastLanguageModel loads (4-bit) and wraps LoRA itself."""
    from unsloth import FastLanguageModel  # validated as installed, CUDA and single-process

    recipe = resolved.recipe
    model, _ = FastLanguageModel.from_pretrained(
        model_name=checkpoint,
        max_seq_length=recipe.trainer.max_seq_len,
        dtype=None,
        load_in_4bit=recipe.quant.load_in_4bit,
    )
    if new_token_ids:  # the template's tokens, as the hf path adds them (validate refuses training their rows)
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=8, mean_resizing=not recipe.quant.load_in_4bit)
    model.config.pad_token_id = tokenizer.pad_token_id
    kwargs = plan.lora_kwargs(recipe, None, new_token_ids)  # validate refused what these keywords cannot carry
    return FastLanguageModel.get_peft_model(
        model,
        r=kwargs["r"],
        lora_alpha=kwargs["lora_alpha"],
        lora_dropout=kwargs["lora_dropout"],
        target_modules=kwargs["target_modules"],
        bias=kwargs["bias"],
        use_rslora=kwargs["use_rslora"],
        use_gradient_checkpointing=recipe.trainer.gradient_checkpointing,
        random_state=recipe.seed,
        max_seq_length=recipe.trainer.max_seq_len,
    )


def trainable_report(model: Any) -> dict[str, Any]:
    """Names, shapes and dtypes of the trainable parameters, and the counts (the original's print helper)."""
    rows, trainable, total = [], 0, 0
    for name, param in model.named_parameters():
        count = getattr(param, "ds_numel", param.numel())  # ZeRO-3 partitions leave numel() == 0
        if hasattr(param, "quant_state"):  # 4-bit params store two values per byte
            count *= 2
        total += count
        if param.requires_grad:
            trainable += count
            rows.append((name, tuple(param.shape), str(param.dtype).replace("torch.", "")))
    return {"trainable": trainable, "total": total, "percent": 100 * trainable / max(total, 1), "params": rows}


def log_trainable(report: dict[str, Any], limit: int = 12) -> None:
    log.info(
        "trainable params: %s of %s (%.3f%%)", f"{report['trainable']:,}", f"{report['total']:,}", report["percent"]
    )
    for name, shape, dtype in report["params"][:limit]:
        log.info("  %-70s %-16s %s", name, str(shape), dtype)
    if len(report["params"]) > limit:
        log.info("  ... and %d more trainable tensors (all in run.log)", len(report["params"]) - limit)
        for name, shape, dtype in report["params"][limit:]:
            log.debug("  %s %s %s", name, shape, dtype)


def head_is_wrapped(model: Any) -> bool:
    """True when peft wrapped the LM head (trainable new-token rows on tied embeddings, modules_to_save)."""
    import torch

    head = model.get_output_embeddings()
    return head is not None and type(head) is not torch.nn.Linear


def keep_float32_adapters(model: Any) -> None:
    """TRL 1.16 casts the trainable weights of a quantized model to bf16 (the QLoRA paper's GPU setting)
    whatever the precision. In a float32 run (CPU) that makes every LoRA matmul an emulated-bf16 one and
    leaves AdamW updating bf16 weights with no float32 copy: cast them back (before the optimizer exists)."""
    import torch

    for param in model.parameters():
        if param.requires_grad and param.dtype == torch.bfloat16:
            param.data = param.data.float()


def sft_trainer_class(model_loss: bool, lazy_metrics: bool) -> type:
    """TRL's SFTTrainer, or a subclass of it when the run needs one:

    - `model_loss` (the LM head is peft-wrapped): take the loss from the model's own forward. TRL 1.16 computes
      the SFT loss with a fused LM head that reads `lm_head.weight` directly, bypassing any peft wrapper on the
      head: with trainable token rows on a tied head it fails ('no attribute bias'), and a wrapped head's trained
      rows would not reach the loss. TRL's count of real training tokens is kept.
    - `lazy_metrics` (`trainer.lazy_metrics`): TRL reads the micro-batch's token count, entropy and token
      accuracy from the GPU as soon as each is computed, four host-GPU syncs a micro-batch, after each of which
      the GPU idles until the host has queued new work. Here they stay on the GPU until the optimizer step ends,
      then are read in one transfer; the loss is TRL's (same fused head, same normalisation) and so are the
      logged values. TRL's other loss paths (label smoothing, DFT, MoE auxiliary loss, sequence parallelism)
      keep TRL's own code."""
    import torch
    from transformers import Trainer, TrainerCallback
    from trl import SFTTrainer

    if not (model_loss or lazy_metrics):
        return SFTTrainer

    class RecipeSFTTrainer(SFTTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.pending_tokens: list[Any] = []  # per micro-batch: real tokens of every rank (GPU scalars)
            self.pending_metrics: list[Any] = []  # per micro-batch: [label tokens, entropy sum, top-1 hits]
            trainer = self

            class Settle(TrainerCallback):  # before the step clock's callback, which reads the token count
                def on_step_end(self, args, state, control, **kwargs):
                    trainer.settle_metrics()

            self.add_callback(Settle())

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model_loss:
                if model.training:
                    self.count_tokens(inputs)
                return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
            if not (model.training and not return_outputs and self.plain_fused_loss()):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self.count_tokens(inputs)
            inputs["use_cache"] = False
            outputs = model(**inputs, fused_lm_head=True)
            num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = -outputs.log_probs.sum() / torch.as_tensor(num_tokens).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())  # DDP averages gradients
            sums = (outputs.label_mask.sum(), outputs.entropy.detach().sum(), outputs.is_top1.sum())
            gather = self.accelerator.gather_for_metrics
            self.pending_metrics.append(torch.stack([gather(x).sum().double() for x in sums]))
            return loss

        def plain_fused_loss(self) -> bool:
            """Whether TRL would take the loss straight from its fused LM head (the path reimplemented above)."""
            parallel = getattr(self.accelerator, "parallelism_config", None)
            return (
                self.compute_loss_func is None
                and self.label_smoother is None
                and self.args.loss_type == "nll"
                and not self.aux_loss_enabled
                and not getattr(parallel, "sp_enabled", False)
            )

        def count_tokens(self, inputs):
            # padding-free batches (packing) carry position_ids instead of a mask; their count is made on the GPU by
            # a fill kernel, not copied there from host memory (a host-to-GPU copy of pageable memory waits)
            mask = inputs.get("attention_mask")
            device = self.accelerator.device
            local = mask.sum() if mask is not None else torch.full((), inputs["position_ids"].size(1), device=device)
            every_rank = self.accelerator.gather_for_metrics(local).sum()
            if lazy_metrics:
                self.pending_tokens.append(every_rank)
            else:
                self._total_train_tokens += every_rank.item()
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]

        def settle_metrics(self):
            """Read the micro-batches' pending counts and sums from the GPU (one sync) into TRL's metrics."""
            if self.pending_tokens:
                self._total_train_tokens += int(torch.stack(self.pending_tokens).sum().item())
                self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            for valid, entropy, correct in torch.stack(self.pending_metrics).tolist() if self.pending_metrics else []:
                self._metrics["train"]["entropy"].append(entropy / valid if valid > 0 else 0.0)
                self._metrics["train"]["mean_token_accuracy"].append(correct / valid if valid > 0 else 0.0)
            self.pending_tokens.clear()
            self.pending_metrics.clear()

        def log(self, logs, start_time=None):
            self.settle_metrics()
            super().log(logs, start_time)

    return RecipeSFTTrainer


def set_cuda_runtime(resolved: Resolved) -> None:
    """The recipe's process-wide CUDA settings, before the model's memory is allocated and its blocks compiled:
    the caching allocator's (the device probe has already started CUDA in this process, so the environment
    variable would come too late: torch's runtime setter applies them to every segment allocated from here on)
    and whether sdpa may pick its cuDNN kernel. The allocator setting, once on, stays on for later runs in the
    same process."""
    import torch

    cudnn = resolved.recipe.trainer.cudnn_attention
    torch.backends.cuda.enable_cudnn_sdp(cudnn)  # both ways: an earlier run in this process (a sweep) may have set it
    if not cudnn:
        log.info("sdpa: cuDNN attention off (flash / memory-efficient kernels)")
    settings = plan.allocator_settings(resolved.recipe, on_cuda=resolved.device.kind == "cuda")
    if settings is not None:
        setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
        (setter or torch.cuda.memory._set_allocator_settings)(settings)
        log.info("CUDA allocator: %s", settings)


def setup_args(resolved: Resolved, run_dir: Path) -> Any:
    """SFTConfig or DPOConfig, built before the model loads: creating it sets each process's GPU and, under ZeRO-3,
    registers the DeepSpeed config that makes from_pretrained partition the weights as they load."""
    recipe = resolved.recipe
    per_run, defaults = plan.logger_env(recipe, run_dir)
    os.environ.update(per_run)
    for key, value in defaults.items():
        os.environ.setdefault(key, value)  # the user's own settings win
    store = defaults.get("MLFLOW_TRACKING_URI")
    if store and os.environ["MLFLOW_TRACKING_URI"] == store:  # our local SQLite store: its folder must exist
        Path(store.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    args = trainer_config(recipe, plan.trainer_kwargs(recipe, run_dir, on_cpu=resolved.device.kind == "cpu"))
    if resolved.recipe.dist.backend is DistBackend.single and args.n_gpu > 1:
        # transformers would wrap the model in nn.DataParallel over every visible GPU, which TRL refuses:
        # dist=single trains on the first visible GPU (dist=ddp uses them all)
        log.info("dist=single: training on the first of the %d visible GPUs (dist=ddp uses all)", args.n_gpu)
        args._n_gpu = 1
    zero3 = plan.zero3_overrides(resolved.recipe)
    if zero3 and getattr(args, "deepspeed_plugin", None) is not None:
        # accelerate's generated DeepSpeed config leaves these "auto"; explicit values are kept when the engine starts
        args.deepspeed_plugin.deepspeed_config.setdefault("zero_optimization", {}).update(zero3)
        log.info("ZeRO-3 settings: %s", zero3)
    return args


def setup_trainer(
    args: Any,
    model: Any,
    tokenizer: Any,
    prepared: data_mod.Prepared,
    kind: TrainerKind,
    peft_config: Any = None,
    lazy_metrics: bool = False,
) -> Any:
    """TRL's SFTTrainer (or a subclass: sft_trainer_class); for preference pairs DPOTrainer or ORPOTrainer, given the
    adapter's peft_config: with no ref_model and a peft model, DPO's reference log-probabilities come from
    the adapter disabled (ORPO has no reference)."""
    from trl import DPOTrainer

    if prepared.eval is None and args.eval_strategy != "no":
        log.info("no eval split: evaluation during training is off")
        args.eval_strategy = "no"
    common = {
        "model": model,
        "args": args,
        "train_dataset": prepared.train,
        "eval_dataset": prepared.eval,
        "processing_class": tokenizer,
    }
    if kind is TrainerKind.orpo:
        from trl.experimental.orpo import ORPOTrainer

        trainer = ORPOTrainer(peft_config=peft_config, **common)
    elif kind is TrainerKind.dpo:
        trainer = DPOTrainer(ref_model=None, peft_config=peft_config, **common)
    else:
        trainer_class = sft_trainer_class(head_is_wrapped(model), lazy_metrics)
        trainer = trainer_class(**common)
    model = trainer.model
    if not (args.bf16 or args.fp16):
        keep_float32_adapters(model)
    fsdp_plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if fsdp_plugin is not None and fsdp_plugin.fsdp_version == 2:
        # one FSDP2 unit per decoder block, its LoRA weights inside: one all-gather per block
        fsdp_plugin.transformer_cls_names_to_wrap = list(getattr(model, "_no_split_modules", None) or [])
        fsdp2_keep_output_dtypes(fsdp_plugin)
        fsdp2_clip_local_shards(trainer.accelerator)
    elif fsdp_plugin is not None and hasattr(model, "peft_config"):
        # As the original: wrap the LoRA layers in their own FSDP units, since FSDP v1 (use_orig_params=False)
        # cannot flatten frozen base weights and trainable adapters into one parameter.
        from peft.utils.other import fsdp_auto_wrap_policy

        fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(trainer.model)
    return trainer


def fsdp2_keep_output_dtypes(fsdp_plugin: Any) -> None:
    """FSDP2's mixed-precision policy as accelerate builds it, and as transformers builds it again for QLoRA when
    training starts (`update_fsdp_plugin_peft`, override=True), casts every floating-point output of every FSDP2
    unit to the compute dtype (`output_dtype`=bf16). TRL computes the SFT loss from per-token log-probabilities
    that the model's forward returns in float32, so under FSDP2 they, the loss and the logged metrics came out
    bf16 (2x H200: the loss logged in steps of 1/16 near 11, docs/distributed.md). FSDP v1, ZeRO-3 and one GPU do
    not cast outputs. This keeps each output's own dtype (output_dtype None) whenever the policy is set, now or
    later; parameters, gradient reduction and the cast of the inputs stay as accelerate sets them."""
    import dataclasses

    set_policy = fsdp_plugin.set_mixed_precision

    def without_output_cast() -> None:
        policy = fsdp_plugin.mixed_precision_policy
        if dataclasses.is_dataclass(policy) and getattr(policy, "output_dtype", None) is not None:
            fsdp_plugin.mixed_precision_policy = dataclasses.replace(policy, output_dtype=None)

    def set_mixed_precision(*args: Any, **kwargs: Any) -> None:
        set_policy(*args, **kwargs)
        without_output_cast()

    fsdp_plugin.set_mixed_precision = set_mixed_precision
    without_output_cast()


def fsdp2_clip_local_shards(accelerator: Any) -> None:
    """Gradient clipping under FSDP2 from each process's own shards (sharded_clip_grad_norm_) instead of
    accelerate's DTensor path, which dispatches torch's foreach norm, stack and scaling through DTensor for every
    LoRA gradient (448 on a 7B model): a 30 ms gap of a 686 ms traced step in which the GPU had nothing to do (2x
    H200, docs/distributed.md). Anything but FSDP2 shards and the 2-norm goes to accelerate's own."""
    clip = accelerator.clip_grad_norm_

    def clip_grad_norm_(parameters: Any, max_norm: float, norm_type: float = 2) -> Any:
        parameters = list(parameters)
        sharded = fsdp2_grad_shards(parameters) if norm_type == 2 else None
        if sharded is None:
            return clip(parameters, max_norm, norm_type)
        accelerator.unscale_gradients()  # as accelerate's own does first (nothing to do without an fp16 scaler)
        return sharded_clip_grad_norm_(*sharded, max_norm)

    accelerator.clip_grad_norm_ = clip_grad_norm_


def fsdp2_grad_shards(parameters: list[Any]) -> Any:
    """The parameters' gradients as FSDP2 leaves them, DTensors sharded on dim 0 over one 1-D mesh, with that mesh;
    None when they are anything else (plain tensors, other placements or meshes, on another device than the
    mesh's, e.g. offloaded to CPU beside an NCCL group) or there are none."""
    from torch.distributed.tensor import DTensor, Shard

    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads or not isinstance(grads[0], DTensor):
        return None
    mesh = grads[0].device_mesh
    if mesh.ndim != 1 or any(
        not isinstance(g, DTensor)
        or g.device_mesh != mesh
        or tuple(g.placements) != (Shard(0),)
        or g.device.type != mesh.device_type
        for g in grads
    ):
        return None
    return grads, mesh


def sharded_clip_grad_norm_(grads: list[Any], mesh: Any, max_norm: float) -> Any:
    """torch.nn.utils.clip_grad_norm_ (2-norm) for FSDP2's sharded gradients and their mesh (fsdp2_grad_shards),
    computed on the local shards: each process's sum of squares, one all-reduce, then the same clamped scale
    applied to the shards in place. Shards are disjoint, so the sum over processes is the whole norm. Returns the
    total norm, a plain tensor, the same on every process."""
    import torch
    import torch.distributed as dist

    with torch.no_grad():
        shards = [g.to_local() for g in grads]  # views of the gradients' local storage
        squares = torch.stack(torch._foreach_norm(shards)).float().square().sum()
        dist.all_reduce(squares, group=mesh.get_group())
        total = squares.sqrt()
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for dtype in {shard.dtype for shard in shards}:
            torch._foreach_mul_([shard for shard in shards if shard.dtype == dtype], scale.to(dtype))
    return total


def decoder_blocks(model: Any) -> list[Any]:
    """The model's repeated decoder blocks: modules of the classes transformers never splits across devices."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return [module for module in model.modules() if type(module).__name__ in names]


COMPILE_VARIANTS = 16  # recompile room per compiled block (see tune_blocks)


def tune_blocks(model: Any, recipe: RecipeConfig) -> None:
    """Per-block speed settings, before accelerate wraps the model: `lora.lean_dropout` folds each LoRA layer's
    dropout into its A projection (lean_dropout.py), `lora.fused_add` makes its B product, scale and add one
    addmm (fused_add.py), `lora.hash_dropout` draws its dropout masks from a hash (hash_dropout.py),
    `quant.compiled_dequant` routes the nf4 layers through torch-op dequantization (dequant.py), `lora.add_in_base`
    has their base product add the LoRA output (add_in_base.py), `trainer.torch_compile` compiles each decoder
    block in place (the blocks share one compiled graph; parameter names stay as they are),
    `trainer.checkpoint_sublayers` checkpoints (and compiles) each block as attention, then MLP, and
    `dist.zero3_leaf_blocks` has ZeRO-3 fetch each block's parameters as one unit instead of hooking its submodules."""
    if recipe.lora.lean_dropout:  # before compiling: the blocks trace the routed layers
        from qlora_recipes import lean_dropout

        log.info(
            "lora.lean_dropout: %d LoRA layers keep their input, not a dropped-out copy", lean_dropout.install(model)
        )
    if recipe.lora.hash_dropout:  # before compiling, as above
        from qlora_recipes import hash_dropout

        log.info("lora.hash_dropout: %d LoRA layers draw their dropout masks from a hash", hash_dropout.install(model))
    if recipe.lora.fused_add:  # before compiling, as above; lean_recompute's routing subclasses this one
        from qlora_recipes import fused_add

        installed(
            fused_add.install(model),
            "lora.fused_add=true, but no LoRA layer is one it computes (a single plain adapter on a linear or "
            "bitsandbytes layer with a bias-free lora_B: not DoRA or LoRA bias). Set it false",
            "lora.fused_add: %d LoRA layers add their B product to the base output in one addmm",
        )
    sublayers = recipe.trainer.checkpoint_sublayers
    if not (recipe.trainer.torch_compile or plan.zero3_leaf_blocks(recipe) or sublayers):
        return
    blocks = decoder_blocks(model)
    if not blocks:
        raise RecipeError(
            f"{type(model).__name__} names no decoder block class (_no_split_modules): trainer.torch_compile, "
            "trainer.checkpoint_sublayers and dist.zero3_leaf_blocks need one. Set them false"
        )
    if recipe.quant.compiled_dequant:  # before compiling: the blocks trace the routed layers
        from qlora_recipes import dequant

        log.info("quant.compiled_dequant: %d nf4 layers dequantized inside the compiled blocks", dequant.install(model))
    if recipe.trainer.torch_compile:
        import torch._dynamo
        import torch._functorch.config
        import torch._inductor.config
        import torch._logging

        # process-wide, and part of the compile cache's key; set both ways, since an earlier run in this process
        # (a sweep) may have set it
        torch._functorch.config.activation_memory_budget = recipe.trainer.activation_memory_budget
        # lora.hash_dropout's keys as aten's draws, one small tensor each: inductor's own random ops would be
        # inlined into the kernel that hashes, each element drawing its keys again (Philox per element)
        torch._inductor.config.fallback_random = recipe.lora.hash_dropout

        # Packed batches change length every step, and a block is entered with and without an attention mask and,
        # as the checkpoint runs outside the compiled forward (see compile_block), with and without grad: compile
        # for any length at once and leave room for those few variants, which past dynamo's default of 8 would
        # fall back to eager for the rest of the run.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILE_VARIANTS)
        torch._logging.set_logs(recompiles=True)  # each recompile (a step that stalls for seconds) says why, on stderr
    for block in blocks:
        if sublayers:
            checkpoint_sublayers(
                block,
                compile=recipe.trainer.torch_compile,
                lean=recipe.trainer.lean_recompute,
                keep=tuple(recipe.trainer.keep_projections),
            )
        elif recipe.trainer.torch_compile:
            compile_block(block)
    if recipe.trainer.torch_compile:
        log.info(
            "torch.compile: %d %s blocks; the first steps compile them (about 2 min on a 7B shape on one H200)",
            len(blocks),
            type(blocks[0]).__name__,
        )
    if sublayers:
        log.info("trainer.checkpoint_sublayers: %d blocks checkpointed as attention, then MLP", len(blocks))
    if recipe.trainer.keep_projections:
        log.info(
            "trainer.keep_projections: the recomputes reuse the frozen outputs of %s from the first forward",
            ", ".join(recipe.trainer.keep_projections),
        )
    if recipe.lora.add_in_base:  # after keep_projections routes its bases, before lean_recompute subclasses these
        from qlora_recipes import add_in_base

        installed(
            add_in_base.install(model),
            "lora.add_in_base=true, but no LoRA layer sits on a base it can add to (a routed nf4 layer without bias "
            "whose output trainer.keep_projections does not keep, with a single plain adapter). Set it false",
            "lora.add_in_base: %d LoRA layers have their B output added by the base product",
        )
    if recipe.trainer.lean_recompute:
        from qlora_recipes import lean_recompute

        installed(
            lean_recompute.install(blocks),
            "trainer.lean_recompute=true, but no sublayer ends in a LoRA layer it can stand in for (a single plain "
            "LoRA adapter on a frozen nn.Linear or 4-bit layer: not DoRA, LoRA bias or 8-bit). Set it false",
            "trainer.lean_recompute: %d LoRA layers skip their discarded output in the recompute",
        )
    if plan.zero3_leaf_blocks(recipe):
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, sorted({type(block) for block in blocks}, key=lambda cls: cls.__name__))
        log.info("ZeRO-3: each %s fetched as one unit", type(blocks[0]).__name__)


def installed(layers: int, refusal: str, done: str) -> None:
    """After a tuning routed `layers` layers: refuse the run with `refusal` if none, else log `done` (with %d)."""
    if not layers:
        raise RecipeError(refusal)
    log.info(done, layers)


def compile_block(block: Any) -> None:
    """Compile a decoder block's own forward in place, for any sequence length; its hooks and transformers'
    gradient checkpoint run eagerly around the compiled code.

    - Hooks: FSDP2 and ZeRO-3 drive their all-gathers and releases from hooks on each block, which the compiler
      cannot trace (FSDP2's are marked to be skipped, DeepSpeed's are wrapped in skipped nvtx functions and recompile
      on its per-module backward objects: seen on an H200, docs/distributed.md); inside the compiled code each would
      break the block's graph.
    - The checkpoint: transformers 5.23 checkpoints inside each block's `forward` (5.17 around its call). Traced
      into the compiled graph on CUDA (torch 2.11), it fails to partition when the block holds a dropout ("Node ...
      was invalid, but is output"; peft#3020) and, without one, the partitioner keeps 16.8 GiB reserved on the
      Llama-2-7B shape where the eager checkpoint around the compiled forward keeps 6.1-6.3 (docs/gpu.md calls AH,
      AI). So the checkpoint stays eager: the compiled forward runs without grad, then again in the backward."""
    import torch

    forward = type(block).forward
    # transformers 5.23's checkpointing wrapper, one level only: the layer's own decorators stay on its forward
    wrapped = forward.__code__.co_name == "forward_with_checkpointing" and hasattr(forward, "__wrapped__")
    # the block passed as an argument, not bound: every block then runs one graph (bound, each compiled its own)
    compiled = functools.partial(torch.compile(forward.__wrapped__ if wrapped else forward, dynamic=True), block)
    if not wrapped:  # the checkpoint, if any, is around the block's call (5.17)
        block.forward = compiled
        return

    def checkpointed(*args: Any, **kwargs: Any) -> Any:
        if block.gradient_checkpointing and block.training:
            return block._gradient_checkpointing_func(functools.partial(compiled, **kwargs), *args)
        return compiled(*args, **kwargs)

    block.forward = checkpointed


# Decoder layers whose forward is Llama's two pre-norm residual sublayers, attention then MLP (transformers 5.23;
# tests/test_tune_blocks.py checks each split against the class's own forward)
SUBLAYER_BLOCKS = frozenset(
    {
        "LlamaDecoderLayer",
        "MistralDecoderLayer",
        "Qwen2DecoderLayer",
        "Qwen3DecoderLayer",
        "GemmaDecoderLayer",
        "SmolLM3DecoderLayer",
    }
)


def attention_sublayer(block: Any, hidden_states: Any, **kwargs: Any) -> Any:
    attended, _ = block.self_attn(hidden_states=block.input_layernorm(hidden_states), **kwargs)
    return hidden_states + attended


def mlp_sublayer(block: Any, hidden_states: Any) -> Any:
    return hidden_states + block.mlp(block.post_attention_layernorm(hidden_states))


def checkpoint_sublayers(block: Any, compile: bool, lean: bool = False, keep: tuple[str, ...] = ()) -> None:
    """`trainer.checkpoint_sublayers`: a decoder block's forward run as its two residual sublayers, each checkpointed
    on its own (and with `compile`, compiled: two graphs that every block shares), in place of transformers' one
    checkpoint around the block. The work is the same (each sublayer is recomputed once); the backward holds one
    sublayer's recompute at a time instead of the whole block's, for one more checkpointed input a block (the hidden
    state between the two). The same arithmetic in the same order: the same loss, gradients and dropout masks.
    `lean` skips each recompute's discarded products (lean_recompute.py); `keep` names the projections whose frozen
    outputs the recomputes reuse from the first forward (keep_projections.py)."""
    import torch

    from qlora_recipes import keep_projections

    if type(block).__name__ not in SUBLAYER_BLOCKS:
        raise RecipeError(
            f"trainer.checkpoint_sublayers=true splits a decoder block into attention and MLP; {type(block).__name__} "
            f"is not one it knows to be that pair (it knows {', '.join(sorted(SUBLAYER_BLOCKS))}). Set it false"
        )
    attention, mlp = attention_sublayer, mlp_sublayer
    if compile:  # the block passed as an argument, not bound: every block then runs one graph (as compile_block)
        attention, mlp = torch.compile(attention, dynamic=True), torch.compile(mlp, dynamic=True)

    first, second = attention, mlp  # as the checkpoints call them
    if lean:
        from qlora_recipes.lean_recompute import run_region

        first, second = functools.partial(run_region, attention), functools.partial(run_region, mlp)
    try:
        kept = keep_projections.install(block, list(keep)) if keep else {"self_attn": 0, "mlp": 0}
    except ValueError as error:
        raise RecipeError(f"trainer.keep_projections={list(keep)}: {error}. Leave it out of the list") from None

    def forward(hidden_states: Any, **kwargs: Any) -> Any:
        if not (block.gradient_checkpointing and block.training):
            return mlp(block, attention(block, hidden_states, **kwargs))
        # no cache to keep out of the recompute: setup_model turns use_cache off under gradient checkpointing
        hidden_states = keep_projections.checkpoint(
            block, functools.partial(first, block, **kwargs), hidden_states, kept["self_attn"]
        )
        return keep_projections.checkpoint(block, functools.partial(second, block), hidden_states, kept["mlp"])

    block.forward = forward


def after_wrapping(trainer: Any, recipe: RecipeConfig) -> None:
    """What is done to the model once accelerate has wrapped it, when training starts (a callback):

    - FSDP2 with compiled blocks: every unshard puts FSDP's plain unsharded parameter back on each Linear4bit; it
      lacks the 4-bit quantization state, so bitsandbytes 0.50 wraps it into a new Params4bit in every forward, a
      module mutation the compiler cannot trace: each compiled block falls apart into many small graphs with
      eager code between them (2x H200 trace, docs/distributed.md). FSDP2 keeps one unsharded parameter object
      per weight for the whole run, so giving each the state once ends it (fsdp2_keep_quant_states).
    - ZeRO-3 keeping torch's linear (plan.zero3_torch_linear): zero.Init replaced torch.nn.functional.linear while
      the weights loaded, from the config as it was before the recipe's overrides; put torch's back.
    - ZeRO-3 leaf blocks with `dist.zero3_leaf_fast_sharding`: DeepSpeed's fast sharding of leaf modules. DeepSpeed
      0.19.8 reads it from its parameter coordinator and sets it only when it picks the leaves itself
      (`stage3_module_granularity_threshold`); the runner picks them by class (tune_blocks), so it sets it.
    - `trainer.offload_checkpoints`: each checkpointed block's checkpoint function saves its inputs to host memory
      (offload.py). The Trainer sets those functions when it enables gradient checkpointing, as training starts."""
    keep_quant_states = plan.is_fsdp2(recipe) and recipe.trainer.torch_compile and recipe.quant.load_in_4bit
    torch_linear = plan.zero3_torch_linear(recipe)
    fast_sharding = plan.zero3_leaf_fast_sharding(recipe)
    offload = recipe.trainer.offload_checkpoints
    if not (keep_quant_states or torch_linear or fast_sharding or offload):
        return
    from transformers import TrainerCallback

    class AfterWrapping(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if keep_quant_states:
                log.info("FSDP2: 4-bit quantization state kept on %d unsharded weights", fsdp2_keep_quant_states(model))
            if torch_linear and restore_torch_linear():
                log.info("ZeRO-3: torch.nn.functional.linear restored (dist.zero3_memory_efficient_linear)")
            if fast_sharding:
                zero3_fast_leaf_sharding(trainer.deepspeed)
                log.info("ZeRO-3: fast sharding of the leaf blocks (dist.zero3_leaf_fast_sharding)")
            if offload:
                from qlora_recipes.offload import CheckpointOffload

                blocks = CheckpointOffload(trainer.accelerator.device).install(decoder_blocks(trainer.model))
                if not blocks:
                    raise RecipeError(
                        "trainer.offload_checkpoints=true, but no decoder block of the model is gradient-checkpointed. "
                        "Set it false"
                    )
                log.info("trainer.offload_checkpoints: %d checkpointed blocks keep their inputs in host memory", blocks)

    trainer.add_callback(AfterWrapping())


def zero3_fast_leaf_sharding(engine: Any) -> None:
    """Turn on DeepSpeed 0.19.8's fast sharding of leaf modules on a ZeRO-3 engine: its parameter coordinator reads
    the flag at every fetch and release of a leaf module."""
    engine.optimizer.parameter_offload.get_param_coordinator().fast_sharding_for_leaf_module = True


def fsdp2_keep_quant_states(model: Any) -> int:
    """Unshard each FSDP2 unit once and attach its Linear4bit layers' quantization state to the unsharded weights
    (the objects FSDP2 reuses at every unshard), so bitsandbytes never has to rebuild them. Returns how many."""
    import bitsandbytes as bnb
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    kept = 0
    for unit in model.modules():
        if not isinstance(unit, FSDPModule):
            continue
        unit.unshard()  # this unit's own parameters only; nested units stay sharded (DTensors) and come in turn
        for layer in unit.modules():
            weight = getattr(layer, "weight", None)
            if (
                isinstance(layer, bnb.nn.Linear4bit)
                and not isinstance(weight, DTensor)
                and getattr(weight, "quant_state", None) is None
                and getattr(layer, "quant_state", None) is not None
            ):
                weight.quant_state = layer.quant_state
                kept += 1
        unit.reshard()
    return kept


def restore_torch_linear() -> bool:
    """Put back torch.nn.functional.linear if DeepSpeed's zero.Init replaced it (it keeps the original as
    `linear_bk` and says the replacement persists "unless manually reset"). Returns whether it did."""
    import torch
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as patched

    original = getattr(patched, "linear_bk", None)
    if original is None or torch.nn.functional.linear is original:
        return False
    torch.nn.functional.linear = original
    return True


class StepClock:
    """Wall time and real (non-padding) tokens of every optimizer step, the GPU synchronised at both ends,
    so metrics.json can report a median step after warm-up (what `bench` reads). On CUDA each step also records the
    run's peak reserved and allocated memory so far: the first step that reaches the run's peak is where it was set."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.steps: list[dict[str, float]] = []

    def callback(self) -> Any:
        import torch
        from transformers import TrainerCallback

        clock = self

        def now() -> float:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return time.perf_counter()

        class Clock(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                clock.started = now()
                clock.tokens_before = getattr(clock.trainer, "_total_train_tokens", 0)

            def on_step_end(self, args, state, control, **kwargs):
                tokens = getattr(clock.trainer, "_total_train_tokens", 0) - clock.tokens_before
                end = now()  # perf_counter seconds: consecutive steps' ends give the wall time between them
                step = {"step": state.global_step, "seconds": end - clock.started, "tokens": tokens, "end": end}
                if torch.cuda.is_available():
                    step["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
                    step["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
                clock.steps.append(step)

        return Clock()


class GracefulStop:
    """SIGINT/SIGTERM during training: finish the optimizer step, save a checkpoint, stop.
    A second signal stops at once (the last complete checkpoint still resumes)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning(
            "%s received: saving a checkpoint after this step, then stopping (send it again to stop at once)",
            signal.Signals(signum).name,
        )

    @contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def callback(self) -> Any:
        from transformers import TrainerCallback

        stop = self

        class SaveAndStop(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                if stop.signum is not None:  # arrived while loading: nothing trained, nothing to save
                    control.should_training_stop = True
                return control

            def on_step_end(self, args, state, control, **kwargs):
                if stop.signum is not None:
                    control.should_save = True
                    control.should_training_stop = True
                return control

        return SaveAndStop()


# ---------------------------------------------------------------- evaluate


@dataclass
class TaskScore:
    score: float | None
    samples: list[dict[str, str]]


def task_score(model: Any, tokenizer: Any, examples: list, recipe: RecipeConfig, batch: int = 16) -> TaskScore:
    """Greedy answers to held-out prompts, scored by data.metric (exact match after stripping)."""
    import torch

    samples = []
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    for start in range(0, len(examples), batch):
        chunk = examples[start : start + batch]
        prompts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m, _ in chunk]
        enc = tokenizer(
            prompts,
            return_tensors="pt",
            padding=True,
            padding_side="left",
            add_special_tokens=recipe.data.add_special_tokens,
        ).to(device)
        with torch.no_grad():
            out = model.generate(
                **enc,
                max_new_tokens=recipe.trainer.max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,
            )
        answers = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        for (messages, reference), answer in zip(chunk, answers, strict=True):
            samples.append({"prompt": messages[-1]["content"], "reference": reference, "answer": answer.strip()})
    model.train(was_training)
    if recipe.data.metric is TaskMetric.exact_match:
        hits = sum(s["answer"] == s["reference"].strip() for s in samples)
        return TaskScore(hits / max(len(samples), 1), samples)
    return TaskScore(None, samples)  # data.metric=none: the generations alone


def evaluate(trainer: Any) -> dict[str, float]:
    """The trainer's eval metrics without the "eval_" prefix ({} without an eval split): loss, and for DPO/ORPO
    rewards/margins and rewards/accuracies of the eval pairs."""
    if trainer.eval_dataset is None:
        return {}
    return {key.removeprefix("eval_"): value for key, value in trainer.evaluate().items()}


PREFERENCE_KEYS = ("rewards/margins", "rewards/accuracies")


# ---------------------------------------------------------------- save and report


def peak_memory_gib() -> dict[str, float]:
    import torch

    if torch.cuda.is_available():
        return {
            "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        }
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


PROBE = "probe.pt"  # the trained model's logits on a held-out sequence; `eval` compares the saved weights'
PROBE_TOKENS = 64


def save_probe(trainer: Any, run_dir: Path) -> None:
    """The trained model's logits on the first PROBE_TOKENS tokens of the first eval (else train) sequence,
    written to RUN_DIR/probe.pt, so that `eval` can show the saved weights reproduce them on one device.
    Every rank runs the forward (a sharded model needs them all); the main process writes. Runs after the
    save and leaves the model in eval mode: training is over."""
    import torch

    rows = trainer.eval_dataset if trainer.eval_dataset is not None else trainer.train_dataset
    ids = torch.tensor([list(rows[0]["input_ids"])[:PROBE_TOKENS]], device=trainer.accelerator.device)
    model = trainer.model_wrapped
    model = getattr(model, "_orig_mod", model)  # under torch.compile: no recompiling for one forward
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float().cpu()
    except (RuntimeError, ValueError) as exc:  # a check, after the weights are saved: never fails the run
        log.warning("no %s recorded (eval will not compare logits): %s", PROBE, str(exc).splitlines()[0])
        return
    if trainer.args.should_save:
        torch.save({"input_ids": ids.cpu(), "logits": logits}, run_dir / PROBE)


def save(trainer: Any, tokenizer: Any, recipe: RecipeConfig, run_dir: Path, resized: bool) -> Path:
    """The adapter (PeftModel.from_pretrained loads it on one device) or full model, with the tokenizer and chat
    template. `resized`: the template added tokens, so the adapter must carry the grown embedding."""
    out = run_dir / ("adapter" if recipe.lora.enabled else "model")
    if recipe.lora.enabled and plan.shards_parameters(recipe):
        state = gathered_adapter_state(trainer, resized)  # every rank takes part; rank 0 holds the result
        if trainer.args.should_save:
            save_adapter(trainer.accelerator.unwrap_model(trainer.model), state, out, resized)
    else:
        if trainer.is_fsdp_enabled:  # full fine-tuning: gather the shards into one ordinary state dict
            trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        trainer.save_model(str(out))  # the main process writes; the others wait
    if trainer.args.should_save:
        tokenizer.save_pretrained(str(out))
    return out


WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    """A parameter's name without the FSDP/checkpointing/compile wrappers' prefixes (as PEFT names it)."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def gathered_adapter_state(trainer: Any, resized: bool) -> dict[str, Any]:
    """The whole tensors an adapter of a sharded model needs, on rank 0 (empty elsewhere): the trainable
    parameters and, when the template added tokens, the grown input/output embeddings (frozen, but a reload
    must get the same new rows). Every rank must call this: the gathers are collective.

    Trainer.save_model lost them (docs/distributed.md): under ZeRO-3 it gathers the trainable parameters only,
    so the resized embedding was never written; under FSDP v1 PEFT dropped every LoRA tensor (save_adapter)."""
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    if trainer.is_deepspeed_enabled:
        import deepspeed

        state = trainer.model_wrapped._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True) or {}
        if resized:
            wanted = {id(p) for layer in embedding_layers(peft_model) for p in layer.parameters()}
            frozen = [(n, p) for n, p in peft_model.named_parameters() if id(p) in wanted and not p.requires_grad]
            with deepspeed.zero.GatheredParameters([p for _, p in frozen], modifier_rank=None):
                if trainer.args.should_save:
                    state.update({n: p.detach().to("cpu", copy=True) for n, p in frozen})
        return state
    state = trainer.accelerator.get_state_dict(trainer.model)  # FSDP v1 or FSDP2: full tensors on rank 0
    return {clean_name(name): tensor for name, tensor in state.items()}


def save_adapter(peft_model: Any, state: dict[str, Any], out: Path, resized: bool) -> None:
    """PEFT's save_pretrained given a gathered state dict, whatever wrappers sit in the module tree.

    PEFT (0.21) picks an adapter's tensors by walking the module tree, whose names under FSDP v1 contain
    `_fsdp_wrapped_module.`, while a gathered state dict's keys do not: it then keeps no LoRA tensor at all.
    So the keys are spelt as the tree spells them for PEFT, and the written file plainly again."""
    from safetensors.torch import load_file, save_file

    tree = {clean_name(name): name for name, _ in peft_model.named_modules()}

    def as_tree(key: str) -> str:
        path, _, leaf = key.rpartition(".")
        return f"{tree.get(path, path)}.{leaf}"

    peft_model.save_pretrained(
        str(out), state_dict={as_tree(key): value for key, value in state.items()}, save_embedding_layers=resized
    )
    weights = out / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    if any(clean_name(key) != key for key in tensors):
        save_file({clean_name(key): value for key, value in tensors.items()}, str(weights), metadata={"format": "pt"})


def embedding_layers(model: Any) -> list[Any]:
    layers = [model.get_input_embeddings(), model.get_output_embeddings()]
    return [layer for layer in layers if layer is not None]


def adapter_problems(out: Path, model: Any, resized: bool) -> list[str]:
    """What a saved adapter lacks for a faithful reload: a LoRA tensor of any adapted layer, whole tensors
    (an ungathered ZeRO-3 partition is empty) or (when the template added tokens) the resized embedding.
    Gathers under FSDP/ZeRO-3 were seen to drop each without an error (docs/distributed.md), and a reload
    would then silently use the base or new random rows."""
    from peft.tuners.lora import LoraLayer
    from safetensors import safe_open

    path = out / "adapter_model.safetensors"
    if not path.is_file():
        return [f"{path} was not written"]
    with safe_open(str(path), "pt") as handle:
        shapes = {key: handle.get_slice(key).get_shape() for key in handle.keys()}
    expected = set()
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            name = clean_name(name).removeprefix("module.")  # DDP's wrapper
            expected |= {f"{name}.lora_A.weight", f"{name}.lora_B.weight"}
    problems = []
    if missing := sorted(expected - set(shapes)):
        problems.append(f"{len(missing)} of {len(expected)} LoRA tensors are missing from {path} (e.g. {missing[0]})")
    if empty := sorted(key for key, shape in shapes.items() if 0 in shape):
        problems.append(f"{len(empty)} tensors in {path} are empty (e.g. {empty[0]}): shards that were not gathered")
    # the whole embedding, not only the trained rows of the new tokens (`trainable_tokens_delta`)
    if resized and not any("embed_tokens" in key and key.endswith(".weight") for key in shapes):
        problems.append(
            f"the template added tokens but {path} holds no embedding: a reload would give the added tokens new "
            "random rows"
        )
    return problems


def train_metrics(trainer: Any, result: Any) -> dict[str, Any]:
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    # TRL's running count of real (unpadded) tokens, all ranks; the logged copies stop at the last log step
    tokens = getattr(trainer, "_total_train_tokens", max((h.get("num_tokens", 0) for h in history), default=0))
    runtime = result.metrics.get("train_runtime", 0.0)
    preference = {  # DPO/ORPO: the reward of chosen minus rejected, and how often chosen wins
        key: {"first": values[0], "last": values[-1]}
        for key in PREFERENCE_KEYS
        if (values := [h[key] for h in history if key in h and "loss" in h])
    }
    return {
        **({"preference": preference} if preference else {}),
        "train_loss": result.metrics.get("train_loss"),
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        "steps": trainer.state.global_step,
        "train_tokens": tokens,
        "tokens_per_s": tokens / runtime if runtime else None,
        "train_runtime_s": runtime,
        "loss_curve": [{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h],
        "eval_curve": [{"step": h["step"], "loss": h["eval_loss"]} for h in history if "eval_loss" in h],
    }


def samples_table(before: TaskScore | None, after: TaskScore) -> str:
    """Markdown: held-out prompt, reference answer, the base model's answer and the trained model's."""
    lines = ["| prompt | reference | before | after |", "|---|---|---|---|"]
    previous = before.samples if before else [{"answer": ""}] * len(after.samples)
    for b, a in zip(previous, after.samples, strict=True):
        cells = [a["prompt"], a["reference"], b["answer"], a["answer"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def print_summary(metrics: dict[str, Any], run_dir: Path, saved: Path | None) -> None:
    e, t = metrics["eval"], metrics["train"]
    lines = [
        "",
        f"== {metrics['recipe']} finished in {metrics['wall_time_s']:.0f} s ==",
        f"  eval loss      before {fmt(e.get('loss_before'))}  ->  after {fmt(e.get('loss_after'))}",
    ]
    if e.get("preference_after"):
        p, b = e["preference_after"], e.get("preference_before")
        before = (
            f"before training {fmt(b.get('rewards/margins'))} and {fmt(b.get('rewards/accuracies'), '.1%')}"
            if b
            else "before training: 0 and 0% by construction"
        )
        lines.append(
            f"  eval pairs     reward margin {fmt(p.get('rewards/margins'))}, chosen preferred "
            f"{fmt(p.get('rewards/accuracies'), '.1%')} ({before})"
        )
    if e.get("task_before") is not None or e.get("task_after") is not None:
        lines.append(
            f"  {metrics['task_metric']:<14} before {fmt(e.get('task_before'), '.1%')}  ->  after {fmt(e.get('task_after'), '.1%')}"
        )
    lines += [
        f"  train loss     {fmt(t['first_logged_loss'])} (first log) -> {fmt(t['last_logged_loss'])} (last log), {t['steps']} steps",
        *(
            f"  {key:<14} {fmt(v['first'])} (first log) -> {fmt(v['last'])} (last log)"
            for key, v in t.get("preference", {}).items()
        ),
        f"  throughput     {fmt(t['tokens_per_s'] or None, '.0f')} real tokens/s",
        f"  {'saved':<14} {saved or 'nothing (trainer.save_final=false)'}",
        f"  run dir        {run_dir}  (recipe.yaml, metrics.json, loss.png, samples.md, tensorboard/, run.log)",
    ]
    print("\n".join(lines), flush=True)


# ---------------------------------------------------------------- main


def train(run_dir: Path, resume: str | None = None) -> dict[str, Any]:
    """Train the recipe stored in run_dir; returns (and writes) metrics.json.
    `resume` ("auto" or a checkpoint path) overrides the recipe's resume_from_checkpoint.
    SIGINT/SIGTERM at any point end the run cleanly (after a checkpoint once training has begun)."""
    run_dir = run_dir.resolve()
    resolved = rundir.read(run_dir)
    stop = GracefulStop()
    with stop.installed(), run_logging(run_dir):
        return _train(run_dir, resolved, resume, stop)


def _train(run_dir: Path, resolved: Resolved, resume: str | None, stop: GracefulStop) -> dict[str, Any]:
    started = time.time()
    recipe = resolved.recipe
    resume = rundir.resume_target(run_dir, resume or recipe.resume_from_checkpoint)

    from transformers import set_seed

    checkpoint = models.checkpoint_dir(recipe.model)  # may build a cached checkpoint, drawing random numbers
    set_seed(recipe.seed)
    tokenizer, new_ids = setup_tokenizer(recipe, checkpoint)
    prepared = data_mod.prepare(recipe, tokenizer)  # data errors surface before the weights load
    log.info("data: %s", json.dumps(prepared.stats))
    set_cuda_runtime(resolved)
    args = setup_args(resolved, run_dir)
    kind = recipe.trainer.kind
    dpo, pairs = kind is TrainerKind.dpo, kind.on_pairs
    model = setup_model(resolved, checkpoint, tokenizer, new_ids, wrap_adapter=not pairs)  # TRL wraps it
    peft_config = adapter_config(recipe, model, new_ids) if pairs else None
    trainer = setup_trainer(args, model, tokenizer, prepared, kind, peft_config, recipe.trainer.lazy_metrics)
    tune_blocks(trainer.model, recipe)
    after_wrapping(trainer, recipe)
    report = trainable_report(trainer.model)
    log_trainable(report)

    main = process_rank() == 0  # evaluation runs on every rank; generation, files and summary on rank 0
    examples = data_mod.task_examples(prepared, recipe.data, recipe.trainer.task_eval_samples) if main else []
    if examples and plan.shards_parameters(recipe):
        log.info("task metric skipped: generating on one rank needs every shard (FSDP/ZeRO-3)")
        examples = []
    before: dict[str, float] = {}
    task_before = None
    if recipe.trainer.eval_before_train and resume is None:
        log.info("evaluating the base model before training")
        # DPO's eval loss before training is ln 2 by construction (policy == reference): not computed
        before = {} if dpo else evaluate(trainer)
        task_before = task_score(trainer.model, tokenizer, examples, recipe) if examples else None

    trainer.add_callback(stop.callback())
    clock = StepClock(trainer)
    trainer.add_callback(clock.callback())
    if recipe.trainer.profile_steps and main:
        profiler = StepProfiler(list(recipe.trainer.profile_steps), run_dir / "profile", recipe.trainer.profile_python)
        trainer.add_callback(profiler.callback())
    result = trainer.train(resume_from_checkpoint=resume)
    if stop.signum is not None:
        latest = rundir.latest_checkpoint(run_dir)
        raise Interrupted(
            stop.signum,
            f"stopped by {signal.Signals(stop.signum).name} at step {trainer.state.global_step}; checkpoint: "
            f"{latest}. Continue with: python -m qlora_recipes train {run_dir} --resume",
        )

    after = evaluate(trainer)
    task_after = task_score(trainer.model, tokenizer, examples, recipe) if examples else None
    saved = save(trainer, tokenizer, recipe, run_dir, bool(new_ids)) if recipe.trainer.save_final else None
    if saved and not pairs:  # preference rows hold text, not token ids
        save_probe(trainer, run_dir)
    if not main:
        return {"rank": process_rank(), "steps": trainer.state.global_step}
    problems = adapter_problems(saved, trainer.model, bool(new_ids)) if saved and recipe.lora.enabled else []
    if task_after is not None:
        (run_dir / "samples.md").write_text(samples_table(task_before, task_after))
    metrics = {
        "recipe": recipe.name,
        "run_dir": str(run_dir),
        "saved": str(saved) if saved else None,
        "device": resolved.device.describe(),
        "wall_time_s": time.time() - started,
        "task_metric": recipe.data.metric.value,
        "trainable_params": report["trainable"],
        "total_params": report["total"],
        "data": prepared.stats,
        "eval": {
            "loss_before": before.get("loss"),
            "loss_after": after.get("loss"),
            **({"preference_after": {k: after[k] for k in PREFERENCE_KEYS if k in after}} if pairs else {}),
            # ORPO's base has meaningful pair figures; DPO's are 0 by construction and not computed
            **(
                {"preference_before": {k: before[k] for k in PREFERENCE_KEYS if k in before}}
                if pairs and before
                else {}
            ),
            "task_before": task_before.score if task_before else None,
            "task_after": task_after.score if task_after else None,
        },
        "train": {**train_metrics(trainer, result), "step_times": clock.steps},
        "memory": peak_memory_gib(),
        **({"saved_incomplete": problems} if problems else {}),
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plots.plot_run(metrics["train"], f"{recipe.name}: {run_dir.name}", run_dir / "loss.png")
    print_summary(metrics, run_dir, saved)
    if problems:  # after metrics.json and the summary: the checkpoints and the run's record stay
        raise RecipeError(
            "the saved adapter is incomplete: " + "; ".join(problems) + ". The checkpoints in the run dir hold "
            "the trained state; docs/distributed.md lists what is known about saving under FSDP/ZeRO-3"
        )
    return metrics
