"""Host cost of where gradient checkpointing sits relative to a compiled decoder block, on CPU (issue 6).

transformers 5.23 (our pin) checkpoints inside each block's `forward`; compiling the block's whole call traces
that checkpoint into the compiled graph: one compiled call a block and micro-batch, the recompute inside the
compiled backward. `runner.compile_block` instead compiles the block's own forward and keeps the checkpoint eager
around it (as transformers 5.17 arranged it): the compiled forward under no_grad, then again with grad in the
backward. On CUDA (torch 2.11) the traced checkpoint failed to compile with LoRA dropout and, without dropout, kept
16.8 GiB reserved on the Llama-2-7B shape against 6.1-6.3 (docs/gpu.md calls AH, AI), hence compile_block's choice.
This trains the tiny random Llama (LoRA on every linear, dropout 0.05, reentrant checkpointing, compiled blocks,
one thread) both ways and prints the median step time after warm-up: with the tiny model's negligible arithmetic,
the difference is host time, the part that leaves a GPU idle in the launch-bound checkpointed backward.

    HF_HUB_OFFLINE=1 python scripts/ckpt_host_cost.py [STEPS]
"""

import statistics
import sys
import time

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
    for arrangement in ("inside forward (5.23, whole call compiled)", "around the compiled forward (compile_block)"):
        torch._dynamo.reset()
        model = model_with_lora()
        for block in decoder_blocks(model):
            if arrangement.startswith("inside"):
                block.compile(dynamic=True)  # the whole call: 5.23's checkpoint traced into the compiled graph
            else:
                compile_block(block)
        print(f"checkpoint {arrangement}: median step {1000 * median_step_s(model, steps):.1f} ms", flush=True)


if __name__ == "__main__":
    main()
