"""ZeRO-3 on CPU (DeepSpeed, gloo, one process): do compiled decoder blocks stay whole under DeepSpeed's hooks?

The tiny random Llama with LoRA on every linear, reentrant gradient checkpointing and leaf blocks, as the runner
sets them up, trained 3 steps; prints each step's loss and dynamo's graph-break count, once with the block's whole
call compiled (`Module.compile`, hooks inside) and once with only its `forward` (runner.compile_block, hooks
outside). DeepSpeed is a GPU-machine dependency; here it comes from its wheel (GPU.md lists the carried ones):

    pip install --target /tmp/dsenv --no-deps .whl/deepspeed-*.whl .whl/hjson-*.whl .whl/py_cpuinfo-*.whl
    pip install --target /tmp/dsenv msgpack ninja einops
    for o in 0 1; do HOOKS_OUTSIDE=$o PYTHONPATH=/tmp/dsenv DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 \
        python -m torch.distributed.run --nproc_per_node 1 scripts/zero3_compile_check.py; done

STAGE=0 runs the same engine without partitioning and STEPS=N trains N steps, printing the median step time of
those after the fifth: the host cost of ZeRO-3's per-module gather/release bookkeeping, which on a GPU leaves it idle
(docs/distributed.md):

    for s in 0 3; do STAGE=$s STEPS=25 HOOKS_OUTSIDE=1 PYTHONPATH=/tmp/dsenv DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 \
        python -m torch.distributed.run --nproc_per_node 1 scripts/zero3_compile_check.py | tail -2; done

FAST=1 turns on DeepSpeed's fast sharding of the leaf blocks (dist.zero3_leaf_fast_sharding, as the runner does) and
LAYERS=N builds the model with N blocks (the ones past the checkpoint's 2 randomly initialised, seeded); with two
processes the losses show whether it changes training:

    for f in 0 1; do FAST=$f LAYERS=4 STEPS=12 HOOKS_OUTSIDE=1 PYTHONPATH=/tmp/dsenv DS_ACCELERATOR=cpu \
        HF_HUB_OFFLINE=1 python -m torch.distributed.run --nproc_per_node 2 scripts/zero3_compile_check.py; done

PROFILE=FILE writes a cProfile of the steps after the fifth (compiling left out) to FILE. PERSIST=N sets
stage3_param_persistence_threshold (default 0; 640 is accelerate's 10 x hidden on this model, under which the LoRA
matrices and norms stay whole, as on the 7B shape). Where DeepSpeed's optimizer step spends its host time:

    PERSIST=640 FAST=1 LAYERS=32 STEPS=15 PROFILE=/tmp/z3p.prof HOOKS_OUTSIDE=1 PYTHONPATH=/tmp/dsenv \
        DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 python -m torch.distributed.run --nproc_per_node 1 scripts/zero3_compile_check.py
    python -c "import pstats; pstats.Stats('/tmp/z3p.prof').sort_stats('cumulative').print_stats('stage3.py', 12)"

DEEPSPEED_LINEAR=1 also installs DeepSpeed's replacement F.linear (what zero.Init leaves on GPU machines) and the
printed graph count says whether blocks recompiled (on CPU with torch 2.13 they do not; on an H200 with torch 2.11
they did, docs/gpu.md eleventh session).
"""

import cProfile
import os
import statistics
import time

import deepspeed
import torch
from deepspeed.utils import set_z3_leaf_modules
from peft import LoraConfig, get_peft_model
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM

from qlora_recipes.models import tiny_checkpoint
from qlora_recipes.runner import COMPILE_VARIANTS, compile_block, decoder_blocks, zero3_fast_leaf_sharding


def main() -> None:
    hooks_outside = os.environ.get("HOOKS_OUTSIDE") == "1"
    deepspeed.init_distributed(dist_backend="gloo")
    # DEEPSPEED_LINEAR=1: what zero.Init leaves behind on GPU machines (runner.restore_torch_linear)
    if os.environ.get("DEEPSPEED_LINEAR") == "1":
        from deepspeed.runtime.zero.linear import zero3_linear_wrap

        torch.nn.functional.linear = zero3_linear_wrap
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {
            "stage": int(os.environ.get("STAGE", "3")),
            "stage3_param_persistence_threshold": int(os.environ.get("PERSIST", "0")),
        },
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
    }
    torch.manual_seed(0)  # the blocks past the checkpoint's (LAYERS) and the LoRA matrices
    layers = int(os.environ.get("LAYERS", "2"))
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint(), dtype=torch.float32, num_hidden_layers=layers)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", lora_dropout=0.0))
    blocks = decoder_blocks(model)
    torch._dynamo.config.recompile_limit = COMPILE_VARIANTS
    for block in blocks:
        if hooks_outside:
            compile_block(block)
        else:
            block.compile(dynamic=True)
    set_z3_leaf_modules(model, [type(blocks[0])])
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=config)
    if os.environ.get("FAST") == "1":
        zero3_fast_leaf_sharding(engine)
    torch.manual_seed(0)
    seconds = []
    profiler = cProfile.Profile() if os.environ.get("PROFILE") else None
    for step in range(int(os.environ.get("STEPS", "3"))):
        if profiler is not None and step == 5:
            profiler.enable()
        started = time.perf_counter()
        ids = torch.randint(0, 100, (2, 32))
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        seconds.append(time.perf_counter() - started)
        breaks = sum(counters["graph_break"].values())
        graphs = counters["stats"]["unique_graphs"]
        print(
            f"hooks_outside={hooks_outside} step {step}: loss {loss.item():.4f}, graph breaks {breaks}, graphs {graphs}"
        )
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(os.environ["PROFILE"])
    for reason, count in counters["graph_break"].items():
        print(f"  {count} x {reason.splitlines()[0][:120]}")
    if len(seconds) > 5:
        stage = config["zero_optimization"]["stage"]
        print(
            f"ZeRO stage {stage}: median step {statistics.median(seconds[5:]) * 1e3:.1f} ms over {len(seconds) - 5} steps"
        )


if __name__ == "__main__":
    main()
