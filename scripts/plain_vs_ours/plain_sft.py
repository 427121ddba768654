"""Plain PEFT/TRL QLoRA flow (no qlora_recipes code in the training path), timed per optimizer step.

Usage: python plain_sft.py --ckpt DIR --data train.jsonl --steps 12 --warmup 2 --out result.json [options]
Step time = on_step_begin -> on_step_end (cuda.synchronize at both ends, as qlora_recipes' StepClock);
tokens = TRL's _total_train_tokens difference (as StepClock). Also wall throughput from the end of the last
warm-up step to the end of the last step (includes data loading, logging, callbacks).
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

p = argparse.ArgumentParser()
p.add_argument("--ckpt", required=True)
p.add_argument("--data", required=True)
p.add_argument("--steps", type=int, default=12)
p.add_argument("--warmup", type=int, default=2)
p.add_argument("--out", required=True)
p.add_argument("--logging-steps", type=int, default=5)
p.add_argument("--no-sync", action="store_true", help="time steps without cuda.synchronize")
p.add_argument("--profile-step", type=int, default=0, help="trace this optimizer step (0 = none)")
p.add_argument("--liger", action="store_true")
p.add_argument("--dropout", type=float, default=0.1)
p.add_argument("--pretok", action="store_true", help="feed input_ids+labels pre-tokenized as qlora_recipes does")
p.add_argument("--no-kbit-prep", action="store_true")
p.add_argument("--reentrant", type=int, default=1)
p.add_argument("--log-level", default="passive")
p.add_argument("--optim", default=None)
a = p.parse_args()

from datasets import load_dataset  # noqa: E402 - after argparse: --help answers without the heavy imports
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

cuda = torch.cuda.is_available()
t0 = time.time()
tok = AutoTokenizer.from_pretrained(a.ckpt)
if tok.pad_token is None:
    tok.pad_token = tok.eos_token
bnb = BitsAndBytesConfig(
    load_in_4bit=True,
    bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True,
    bnb_4bit_compute_dtype=torch.bfloat16,
    bnb_4bit_quant_storage=torch.bfloat16,
)
model = AutoModelForCausalLM.from_pretrained(
    a.ckpt,
    quantization_config=bnb,
    dtype=torch.bfloat16,
    attn_implementation="sdpa" if cuda else "eager",
    device_map={"": 0} if cuda else None,
)
model.config.use_cache = False
gc_kwargs = {"use_reentrant": bool(a.reentrant)}
if not a.no_kbit_prep:
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs=gc_kwargs
    )
model = get_peft_model(
    model, LoraConfig(r=8, lora_alpha=16, lora_dropout=a.dropout, target_modules="all-linear", task_type="CAUSAL_LM")
)
print(f"loaded in {time.time() - t0:.0f} s", flush=True)

ds = load_dataset("json", data_files=a.data, split="train")
if a.pretok:

    def enc(row):
        text = tok.apply_chat_template(row["messages"], tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"][:2048]
        return {"input_ids": ids, "labels": list(ids)}

    ds = ds.map(enc, remove_columns=ds.column_names)

kw = {}
if a.optim:
    kw["optim"] = a.optim
cfg = SFTConfig(
    output_dir="/tmp/plain_out",
    max_steps=a.steps + (1 if a.profile_step else 0),
    per_device_train_batch_size=1,
    gradient_accumulation_steps=4,
    gradient_checkpointing=True,
    gradient_checkpointing_kwargs=gc_kwargs,
    bf16=cuda,
    use_cpu=not cuda,
    packing=True,
    max_length=2048,
    logging_steps=a.logging_steps,
    log_level=a.log_level,
    learning_rate=1e-4,
    lr_scheduler_type="cosine",
    weight_decay=1e-4,
    report_to="none",
    save_strategy="no",
    use_liger_kernel=a.liger,
    **kw,
)
trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)

steps = []


def now():
    if cuda and not a.no_sync:
        torch.cuda.synchronize()
    return time.perf_counter()


class Clock(TrainerCallback):
    prof = None

    def on_step_begin(self, args, state, control, **kw):
        if a.profile_step and state.global_step + 1 == a.profile_step:
            acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
            self.prof = torch.profiler.profile(activities=acts)
            self.prof.__enter__()
        self.t = now()
        self.tok = trainer._total_train_tokens

    def on_step_end(self, args, state, control, **kw):
        end = now()
        steps.append(
            {
                "step": state.global_step,
                "seconds": end - self.t,
                "tokens": trainer._total_train_tokens - self.tok,
                "end": end,
            }
        )
        if self.prof is not None:
            self.prof.__exit__(None, None, None)
            av = self.prof.key_averages()
            kinds = ("cuda", "cpu") if cuda else ("cpu",)
            tables = [av.table(sort_by=f"self_{k}_time_total", row_limit=30) for k in kinds]
            with open(a.out.replace(".json", ".profile.txt"), "w") as f:
                f.write("\n\n".join(tables))
            self.prof = None


trainer.add_callback(Clock())
trainer.train()
meas = [s for s in steps if s["step"] > a.warmup and s["step"] != a.profile_step]
last_warm = [s for s in steps if s["step"] == a.warmup][0]
wall = meas[-1]["end"] - last_warm["end"]
res = {
    "name": os.path.basename(a.out).replace(".json", ""),
    "tokens_per_s": statistics.median(s["tokens"] / s["seconds"] for s in meas),
    "median_step_s": statistics.median(s["seconds"] for s in meas),
    "wall_tokens_per_s": sum(s["tokens"] for s in meas) / wall,
    "measured_steps": len(meas),
    "peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
    "steps": steps,
    "argv": sys.argv[1:],
}
json.dump(res, open(a.out, "w"), indent=1)
print(json.dumps({k: v for k, v in res.items() if k != "steps"}), flush=True)
