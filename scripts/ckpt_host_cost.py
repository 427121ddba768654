"""Host cost of where gradient checkpointing sits relative to a compiled decoder block, on CPU (issue 6).

transformers 5.23 (our pin) checkpoints inside each block's `forward`, so `runner.compile_block` compiles the
checkpoint with the block: one compiled call a block and micro-batch, the recompute inside the compiled backward.
transformers 5.17 (the GPU image's, which every GPU call through the thirteenth session ran) checkpointed around
the block's call: eager `CheckpointFunction`, the compiled forward under no_grad, then again with grad in the
backward. This trains the tiny random Llama (LoRA on every linear, dropout 0.05, reentrant checkpointing, compiled
blocks, one thread) both ways and prints the median step time after warm-up: with the tiny model's negligible
arithmetic, the difference is host time, the part that leaves a GPU idle in the launch-bound checkpointed backward.

    HF_HUB_OFFLINE=1 python scripts/ckpt_host_cost.py [STEPS]
"""

import functools
import statistics
import sys
import time
import types

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from qlora_recipes.models import tiny_checkpoint
from qlora_recipes.runner import COMPILE_VARIANTS, compile_block, decoder_blocks


def model_with_lora() -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint(), dtype=torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", lora_dropout=0.05))
    model.train()
    return model


def checkpoint_around_call(block: torch.nn.Module) -> None:
    """transformers 5.17's arrangement: the block's own forward compiled, the checkpoint outside it."""
    own_forward = type(block).forward.__wrapped__  # under 5.23's forward_with_checkpointing
    compiled = torch.compile(types.MethodType(own_forward, block), dynamic=True)

    def forward(*args, **kwargs):
        return block._gradient_checkpointing_func(functools.partial(compiled, **kwargs), *args)

    block.forward = forward


def median_step_s(model: torch.nn.Module, steps: int) -> float:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for step in range(steps):
        ids = torch.randint(3, 300, (2, 96 + 8 * (step % 4)))  # packed lengths vary
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return statistics.median(times[8:])


def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    torch.set_num_threads(1)
    torch._dynamo.config.recompile_limit = COMPILE_VARIANTS
    for arrangement in ("inside forward (5.23)", "around the call (5.17)"):
        torch._dynamo.reset()
        model = model_with_lora()
        for block in decoder_blocks(model):
            if arrangement.startswith("inside"):
                compile_block(block, hooks_outside=False)
            else:
                checkpoint_around_call(block)
        print(f"checkpoint {arrangement}: median step {1000 * median_step_s(model, steps):.1f} ms", flush=True)


if __name__ == "__main__":
    main()
