"""What a sharded adapter save sees (GPU, launched worker; driven by scripts/gpu_save_debug.sh).

Trains the run dir's recipe through the runner, then prints: the keys of accelerate's gathered state dict
(FSDP) or of ZeRO-3's consolidated trainable state, what PEFT's save_pretrained alone writes from the
gathered state (the FSDP v1 failure: docs/gpu.md), what runner.save writes with adapter_problems, and the
eval loss at the end of training (the .sh compares it with `eval` of the saved adapter)."""

import sys
import traceback
from pathlib import Path

from safetensors import safe_open
from transformers import set_seed

from qlora_recipes import data as data_mod
from qlora_recipes import models, rundir, runner

run_dir = Path(sys.argv[1]).resolve()
tag = run_dir.name
resolved = rundir.read(run_dir)
recipe = resolved.recipe
checkpoint = models.checkpoint_dir(recipe.model)
set_seed(recipe.seed)
tokenizer, new_ids = runner.setup_tokenizer(recipe, checkpoint)
prepared = data_mod.prepare(recipe, tokenizer)
args = runner.setup_args(resolved, run_dir)
model = runner.setup_model(resolved, checkpoint, tokenizer, new_ids)
trainer = runner.setup_trainer(args, model, tokenizer, prepared, recipe.trainer.kind)
trainer.train()
main = runner.process_rank() == 0
accelerator = trainer.accelerator


def summary(name: str, state: dict) -> None:
    if main:
        lora = [key for key in state if "lora_" in key]
        embed = [(key, tuple(state[key].shape)) for key in state if "embed" in key or "lm_head" in key]
        print(f"DBG {tag} [{name}] {len(state)} keys, {len(lora)} lora e.g. {lora[:2]}; embed/head {embed}", flush=True)


def saved_keys(path: Path) -> list[str]:
    return list(safe_open(str(path / "adapter_model.safetensors"), "pt").keys())


try:
    if trainer.is_fsdp_enabled:
        summary("accelerator.get_state_dict", accelerator.get_state_dict(trainer.model))
    if trainer.is_deepspeed_enabled:
        consolidated = trainer.model_wrapped._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True)
        summary("zero3 exclude_frozen", consolidated or {})
    gathered = runner.gathered_adapter_state(trainer, bool(new_ids))
    summary("gathered_adapter_state", gathered)
    if main:  # PEFT by itself, given the gathered state (what Trainer.save_model amounts to under FSDP)
        alone = run_dir / "adapter_peft_alone"
        accelerator.unwrap_model(trainer.model).save_pretrained(str(alone), state_dict=gathered)
        keys = saved_keys(alone)
        lora = sum("lora_" in key for key in keys)
        print(f"DBG {tag} [PEFT save_pretrained alone] wrote {len(keys)} keys, {lora} lora", flush=True)
except Exception:
    traceback.print_exc()
after = runner.evaluate(trainer)
if main:
    print(f"DBG {tag} RESULT eval loss in training {after.get('loss')}", flush=True)
saved = runner.save(trainer, tokenizer, recipe, run_dir, bool(new_ids))
if main:
    print(f"DBG {tag} adapter_problems: {runner.adapter_problems(saved, trainer.model, bool(new_ids))}", flush=True)
    keys = saved_keys(saved)
    print(
        f"DBG {tag} runner.save wrote {len(keys)} keys; not LoRA: {[k for k in keys if 'lora_' not in k]}", flush=True
    )
