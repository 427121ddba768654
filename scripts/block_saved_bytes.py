"""What one compiled Llama-2-7B-shaped decoder block keeps for its backward, by trainer.activation_memory_budget (CPU).

Under gradient checkpointing the step's peak is one block's recompute: the block's compiled forward, with grad, keeps
these bytes until its backward has run. One block of the 7B shape (hidden 4096, intermediate 11008, 32 heads; random
weights, bf16, unquantized: the 4-bit base weights are parameters either way), LoRA r8 on every linear layer with
dropout 0.1 as llama2_chatml, its weights in bf16 as TRL casts them on a GPU, compiled as runner.compile_block
compiles it. Prints, per budget, the bytes the forward saves (parameters left out), the matrix products its
backward runs, and how far its LoRA gradients (same seed, so the same dropout masks if the backward uses the
forward's) are from the first budget's: a lower budget must not change them (pytorch#190758: the partitioner can
redraw dropout masks in the backward). Attention here is CPU sdpa, not the GPU's varlen flash kernel.

  HF_HUB_OFFLINE=1 .venv/bin/python scripts/block_saved_bytes.py [TOKENS] [BUDGET ...]   (default 2048 1.0 0.5)

LEAN=1 folds each LoRA layer's dropout into its A projection first (lora.lean_dropout, lean_dropout.py).
HASH=1 instead draws each LoRA layer's dropout masks from a hash, compiled with aten's random ops as the runner does
(lora.hash_dropout, hash_dropout.py).
SUBLAYERS=1 instead runs the block under reentrant gradient checkpointing, once checkpointed whole and once as
attention, then MLP (trainer.checkpoint_sublayers), and prints what each checkpointed region's recompute keeps for
its backward (profiling.recompute_bytes): the backward holds one region's at a time.
DTYPE=float32 runs the block in float32 instead: bf16 rounding then no longer hides whether a budget's gradients
differ by rounding (~1e-6 in float32) or by other dropout masks (~0.1 and more).
"""

import os
import sys

import torch
import torch._dynamo
import torch._functorch.config
import torch._inductor.config
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from qlora_recipes import hash_dropout, lean_dropout
from qlora_recipes.profiling import SavedBytes, recompute_bytes
from qlora_recipes.runner import checkpoint_sublayers, compile_block, decoder_blocks


def step(model, ids, params) -> tuple[int, int, dict[str, torch.Tensor]]:
    """One forward and backward from seed 1: the bytes the forward saved for the backward, the backward's matrix
    products, and the trainable weights' gradients."""
    saved = SavedBytes(params)
    torch.manual_seed(1)
    with saved.hooks():
        loss = model(input_ids=ids, labels=ids).loss
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        loss.backward()
    grads = {name: p.grad.float().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    matmuls = sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm"))
    return saved.total, matmuls, grads


def main(tokens: int, budgets: list[float]) -> None:
    torch.manual_seed(0)
    dtype = getattr(torch, os.environ.get("DTYPE", "bfloat16"))
    config = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
        num_hidden_layers=1, vocab_size=512, max_position_embeddings=4096,
    )  # fmt: skip
    model = LlamaForCausalLM(config).to(dtype)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    # TRL 1.16 casts a quantized model's trainable weights to bf16 on a GPU
    for name, param in model.named_parameters():
        param.data = param.data.to(dtype)
        if "lora_B" in name:  # as after some training: with B = 0, A's gradients would be 0 whatever the masks
            param.data.normal_(0, 0.02)
    if os.environ.get("LEAN"):
        print(f"lora.lean_dropout: {lean_dropout.install(model)} layers fold their dropout")
    if os.environ.get("HASH"):
        print(f"lora.hash_dropout: {hash_dropout.install(model)} layers hash their masks")
        torch._inductor.config.fallback_random = True
    model.enable_input_require_grads()
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    ids = torch.randint(0, 512, (1, tokens))
    (block,) = decoder_blocks(model)
    print(f"one 7B-shaped block, {tokens} tokens, {dtype}, LoRA r8 dropout 0.1, torch {torch.__version__}")
    if os.environ.get("SUBLAYERS"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        for split in (False, True):
            torch._dynamo.reset()
            if split:
                checkpoint_sublayers(block, compile=True)
            else:
                compile_block(block)
            regions = recompute_bytes([block], params)
            step(model, ids, params)  # compiles
            regions.clear()
            step(model, ids, params)
            kept = ", ".join(f"{n / 2**20:,.0f}" for n in regions)
            print(f"{'attention, MLP' if split else 'whole block'}: each recompute keeps {kept} MiB")
            del block.forward, block._gradient_checkpointing_func
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        return
    compile_block(block)
    first = None
    for budget in budgets:
        torch._functorch.config.activation_memory_budget = budget
        torch._dynamo.reset()
        step(model, ids, params)  # compiles
        saved, matmuls, grads = step(model, ids, params)
        first = first or grads
        gap = (
            sum((grads[k] - g).square().sum() for k, g in first.items()) / sum(g.square().sum() for g in first.values())
        ).sqrt()
        print(
            f"budget {budget}: forward keeps {saved / 2**20:,.0f} MiB; backward runs {matmuls} matmuls; "
            f"LoRA gradients {gap:.1e} from budget {budgets[0]}'s (relative norm of the difference)"
        )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2048, [float(b) for b in sys.argv[2:]] or [1.0, 0.5])
