#!/usr/bin/env bash
# 2-GPU smoke run of each multi-process backend on the tiny Llama through `run` (device tool, carry .whl).
# Prints one line per backend: exit code, first/last logged loss, and whether the adapter reloads on one GPU.
# DISTS="ddp fsdp zero3" picks backends (fsdp2 = FSDP2, fsdp2+untied = FSDP2 on a tiny model with untied embeddings;
# NAME,key=value,... adds overrides to one); EXTRA="key=value ..." adds overrides; RESUME=1 also resumes each
# run from its step-10 checkpoint under the same backend; POST=1 then runs `eval`, `merge` (float32) and a one-shot
# `chat` on GPU 0 alone and compares the merged model's logits with the adapter's over the same base.
set -u
source scripts/gpu_env.sh || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/cards.txt"
python3 -c "from qlora_recipes.bench import versions; print(versions())" | tee "$OUT/versions.txt"
if [[ " ${DISTS:-} " == *untied* ]]; then  # the tiny Llama with separate input and output embeddings
  python3 - <<'PY' || exit 1
from transformers import AutoModelForCausalLM, AutoTokenizer
from qlora_recipes.models import tiny_checkpoint
path = tiny_checkpoint()
model = AutoModelForCausalLM.from_pretrained(path)
model.config.tie_word_embeddings = False
model.lm_head.weight = type(model.lm_head.weight)(model.lm_head.weight.detach().clone())
model.save_pretrained("/tmp/tiny-untied")
AutoTokenizer.from_pretrained(path).save_pretrained("/tmp/tiny-untied")
PY
fi
for variant in ${DISTS:-ddp fsdp zero3}; do  # NAME[,override...]: ddp, fsdp, fsdp2, zero3; +untied: the untied tiny model
  IFS=, read -r dist overrides <<< "$variant"
  name=${variant//[,=+]/_}
  run=/tmp/runs/$name
  rm -rf "$run"  # scratch dir of this smoke run (a warm machine keeps the last one)
  case $dist in
    fsdp2) args=(dist=fsdp dist.fsdp_version=2) ;;
    fsdp2+untied) args=(dist=fsdp dist.fsdp_version=2 model.name_or_path=/tmp/tiny-untied model.source=hub_or_path) ;;
    *) args=("dist=$dist") ;;
  esac
  dist=$name
  timeout 300 python3 -m qlora_recipes run +recipe=llama2_chatml model=tiny_llama data=demo_dates "${args[@]}" ${overrides//,/ } ${EXTRA:-} \
    trainer.batch_size=8 trainer.micro_batch_size=2 trainer.max_steps=20 trainer.save_steps=10 \
    trainer.eval_strategy=no trainer.learning_rate=1e-3 data.max_eval_samples=16 logger=none \
    "output_dir=$run" > "$OUT/$dist.log" 2>&1
  code=$?
  python3 - "$run" "$dist" "$code" <<'PY' 2>>"$OUT/$dist.log" | tee -a "$OUT/summary.txt"
import json, sys, torch
run, dist, code = sys.argv[1:]
try:
    m = json.load(open(f"{run}/metrics.json"))
    t = m["train"]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(f"{run}/adapter")
    base_path = json.load(open(f"{run}/adapter/adapter_config.json"))["base_model_name_or_path"]
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.bfloat16).cuda()
    base.resize_token_embeddings(len(tok), pad_to_multiple_of=8)
    model = PeftModel.from_pretrained(base, f"{run}/adapter").cuda()
    logits = model(**tok(["<|im_start|>user\nhi<|im_end|>\n"], return_tensors="pt").to("cuda")).logits
    print(f"{dist}: exit {code}, loss {t['first_logged_loss']:.4f} -> {t['last_logged_loss']:.4f} over {t['steps']} steps, "
          f"{t['tokens_per_s']:.0f} tok/s, adapter reloads on 1 GPU: finite logits {bool(torch.isfinite(logits).all())}")
except Exception as exc:
    print(f"{dist}: exit {code}, FAILED: {type(exc).__name__}: {exc}")
PY
  tail -5 "$OUT/$dist.log" | cut -c1-300
  if [ "$code" = 0 ] && [ -n "${POST:-}" ]; then  # the post-training commands on one GPU
    export CUDA_VISIBLE_DEVICES=0
    python3 -m qlora_recipes eval "$run" samples=4 >> "$OUT/$dist.log" 2>&1; e=$?
    python3 -m qlora_recipes merge "$run" dtype=float32 >> "$OUT/$dist.log" 2>&1; g=$?
    answer=$(python3 -m qlora_recipes chat "$run/merged" "prompt=Give May 5 2020 in ISO format." 2>>"$OUT/$dist.log" | tail -1)
    python3 - "$run" "$dist" "$e" "$g" "$answer" <<'PY' 2>>"$OUT/$dist.log" | tee -a "$OUT/summary.txt"
import json, sys, torch
run, dist, e, g, answer = sys.argv[1:]
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
try:
    ev = json.load(open(f"{run}/eval.json"))
    tok = AutoTokenizer.from_pretrained(f"{run}/adapter")
    base_path = json.load(open(f"{run}/adapter/adapter_config.json"))["base_model_name_or_path"]
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).cuda()
    base.resize_token_embeddings(len(tok), pad_to_multiple_of=8, mean_resizing=False)
    adapter = PeftModel.from_pretrained(base, f"{run}/adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(f"{run}/merged").cuda().eval()
    batch = tok(["<|im_start|>user\nhi<|im_end|>\n"], return_tensors="pt").to("cuda")
    with torch.no_grad():
        diff = (adapter(**batch).logits - merged(**batch).logits).abs().max().item()
    print(f"{dist}: eval exit {e}: loss {ev['before']['loss']:.4f} -> {ev['after']['loss']:.4f}, saved vs trained "
          f"max |logit diff| {ev.get('reload_max_abs_logit_diff')}; merge exit {g}: "
          f"max |logit diff| merged vs adapter {diff:.2e}; chat answered {answer!r}")
except Exception as exc:
    print(f"{dist}: post-training FAILED (eval exit {e}, merge exit {g}): {type(exc).__name__}: {exc}")
PY
    unset CUDA_VISIBLE_DEVICES
  fi
  if [ "$code" = 0 ] && [ -n "${RESUME:-}" ]; then  # resume under the same backend from checkpoint-10
    rm "$run/checkpoint-20/trainer_state.json"
    python3 -m qlora_recipes train "$run" --resume >> "$OUT/$dist.log" 2>&1
    echo "$dist: resume from checkpoint-10 exit $? ($(python3 -c "import json;print(json.load(open('$run/checkpoint-20/trainer_state.json'))['global_step'])" 2>&1) steps)" | tee -a "$OUT/summary.txt"
  fi
done
