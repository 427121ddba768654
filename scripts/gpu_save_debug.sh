#!/usr/bin/env bash
# Device tool, carry .whl: VARIANTS='variant NAME override...; variant ...' bash scripts/gpu_save_debug.sh
# Each variant writes its run dir (dry run), launches scripts/gpu_save_debug.py under its accelerate config,
# then runs `eval` on one GPU; prints the DBG lines (gathers, saves, eval loss in training vs reloaded).
set -u
source scripts/gpu_env.sh || exit 1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "from qlora_recipes.bench import versions; print(versions())"
variant() {  # name overrides...
  name=$1; shift; run=/tmp/runs/$name; rm -rf $run
  python3 -m qlora_recipes run +recipe=llama2_chatml model=tiny_llama data=demo_dates "$@" \
    trainer.batch_size=8 trainer.micro_batch_size=2 trainer.max_steps=20 trainer.save_steps=10 \
    trainer.eval_strategy=no trainer.learning_rate=1e-3 data.max_eval_samples=16 logger=none dry_run=true "output_dir=$run" > $OUT/$name.log 2>&1 || { echo "$name dry run failed"; tail -5 $OUT/$name.log; return; }
  timeout 240 python3 -m accelerate.commands.launch --config_file $run/accelerate_config.yaml scripts/gpu_save_debug.py $run >> $OUT/$name.log 2>&1
  echo "$name exit $?"; python3 -m qlora_recipes eval $run samples=2 >> $OUT/$name.log 2>&1; echo "eval exit $?"; python3 -c "import json;e=json.load(open('$run/eval.json'));print('DBG $name RESULT reloaded eval loss', e['after']['loss'], 'base', e['before']['loss'])"; grep "DBG" $OUT/$name.log | cut -c1-900; grep -B2 -A8 "Traceback" $OUT/$name.log | tail -25
}
eval "${VARIANTS:-true}"
