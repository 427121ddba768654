"""How much GPU memory a recipe's training step needs, estimated from the model's config. Pure, no torch.

`dist=auto` uses it to choose DDP (a whole model per GPU: fastest when it fits) or FSDP (sharded). The
terms, per GPU, in bytes:
- frozen weights: 4-bit = 0.5 byte per linear weight plus its block constants (fp32 absmax per 64 weights,
  or 8-bit absmax plus fp32 constants per 256 blocks with double quantization); 8-bit = 1 byte (+ fp32
  row scale); unquantized = the dtype's bytes. Embedding and head in the model dtype, or fp32 where k-bit
  preparation upcasts them (a quantized model that is not sharded).
- LoRA: r x (in + out) per adapted linear layer, 16 bytes each (fp32 weight, gradient, two Adam moments).
- activations per sequence token: with gradient checkpointing, each block's input (hidden x 2 bytes per
  layer), one block recomputed during its backward ((14 x hidden + 6 x intermediate) x 2 bytes), and the
  fp32 logits with their gradient and softmax (12 bytes per vocabulary entry); without checkpointing,
  every block's saved tensors (18 x hidden + 8 x intermediate bytes per layer).
Checked against the measured peak allocated memory of the 7B shape (tests/test_memory.py, docs/gpu.md):
within 3% at micro-batch 1, 2 and 4. The figure without gradient checkpointing is not measured yet.
Sharding (FSDP/ZeRO-3) divides the weights and LoRA states by the number of GPUs, not the activations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qlora_recipes.schema import DType, RecipeConfig

GIB = 2**30
DTYPE_BYTES = {DType.float32: 4, DType.bfloat16: 2, DType.float16: 2}


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int
    tied: bool

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        heads = config["num_attention_heads"]
        return cls(
            hidden=config["hidden_size"],
            intermediate=config["intermediate_size"],
            layers=config["num_hidden_layers"],
            vocab=config["vocab_size"],
            heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            tied=bool(config.get("tie_word_embeddings", False)),
        )

    def linear_layers(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of a block, by module name."""
        h, i = self.hidden, self.intermediate
        kv = self.kv_heads * (h // self.heads)
        return {
            "q_proj": (h, h),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (h, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }


@dataclass(frozen=True)
class Estimate:
    weights_gib: float
    adapter_gib: float
    activations_gib: float

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.adapter_gib + self.activations_gib

    def describe(self) -> str:
        return (
            f"~{self.total_gib:.1f} GiB per GPU: weights {self.weights_gib:.1f}, LoRA and optimizer "
            f"{self.adapter_gib:.1f}, activations {self.activations_gib:.1f}"
        )


def weight_bytes(recipe: RecipeConfig) -> float:
    """Bytes per frozen linear weight."""
    q = recipe.quant
    if q.load_in_4bit:
        constants = 1 / 64 + 4 / (64 * 256) if q.double_quant else 4 / 64
        return 0.5 + constants
    if q.load_in_8bit:
        return 1.0
    return DTYPE_BYTES.get(recipe.model.dtype, 2)


def estimate(recipe: RecipeConfig, shape: ModelShape, shards: int = 1) -> Estimate:
    """Peak training memory per GPU (allocated by PyTorch; the CUDA context and the allocator's slack come
    on top), with the weights and LoRA states split over `shards` GPUs."""
    linear = shape.linear_layers()
    linear_params = shape.layers * sum(i * o for i, o in linear.values())
    quantized = recipe.quant.load_in_4bit or recipe.quant.load_in_8bit
    upcast = quantized and shards == 1  # k-bit preparation runs only when weights are not sharded
    embed_bytes = 4 if upcast else DTYPE_BYTES.get(recipe.model.dtype, 2)
    embeddings = shape.vocab * shape.hidden * (1 if shape.tied else 2)
    weights = linear_params * weight_bytes(recipe) + embeddings * embed_bytes

    lora = recipe.lora
    adapter = 0.0
    if lora.enabled:
        targets = set(linear) if list(lora.target_modules) == ["all-linear"] else set(lora.target_modules)
        layers = min(shape.layers, lora.last_n_layers or shape.layers)
        adapter = layers * sum(lora.r * (i + o) for name, (i, o) in linear.items() if name in targets) * 16
    else:  # full fine-tuning: the weights above, plus fp32 gradient and Adam moments for every one
        adapter = (linear_params + embeddings) * 12

    t = recipe.trainer
    h, i = shape.hidden, shape.intermediate
    if t.gradient_checkpointing:
        per_token = shape.layers * h * 2 + (14 * h + 6 * i) * 2
    else:
        per_token = shape.layers * (18 * h + 8 * i)
    per_token += shape.vocab * 12
    activations = t.micro_batch_size * t.max_seq_len * per_token
    return Estimate(weights / shards / GIB, adapter / shards / GIB, activations / GIB)
