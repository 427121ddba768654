#!/usr/bin/env bash
# usage: VARIANTS="one variant per line: NAME|plain|plain_sft.py args, or NAME|ours|bench overrides|the variant's own overrides" DEADLINE_S=540 bash scripts/plain_vs_ours/gpu.sh
# Plain PEFT/TRL flow (plain_sft.py) and our `bench` on the same random-weight checkpoint and synthetic data, one
# process per variant, in one device call; table.py prints the table. Results: docs/gpu.md.
set -u
START=$SECONDS; REPO=$PWD; OUT=${OUT:-/tmp/out}; mkdir -p $OUT
source scripts/gpu_env.sh || exit 1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/cards.txt
lscpu | grep -E "Model name|^CPU\(s\)" | tee -a $OUT/cards.txt
cd /tmp
python3 -c "
import importlib.metadata as md, qlora_recipes
print('pkg', qlora_recipes.__file__)
v = []
for n in ('torch','transformers','peft','trl','accelerate','bitsandbytes','datasets','liger-kernel'):
    try: v.append(n + ' ' + md.version(n))
    except Exception: pass
print(', '.join(v))" 2>&1 | tee -a $OUT/cards.txt
COMMON="+recipe=llama2_chatml bench.shape=${SHAPE:-llama2_7b} bench.steps=${STEPS:-10} bench.warmup=${WARM:-2} lora.train_new_tokens=false"
CKPT=/tmp/qrc/models/bench-${SHAPE:-llama2_7b}; DATA=/tmp/bench_data/train.jsonl
if [ ! -f $DATA ]; then  # checkpoint + the bench's synthetic data, as bench builds them
  python3 - <<PY 2>&1 | tail -3
import time; t=time.time()
from qlora_recipes import bench
from qlora_recipes.schema import BenchShape
from pathlib import Path
s = BenchShape("${SHAPE:-llama2_7b}"); ck = bench.checkpoint(s)
total = ${WARM:-2} + ${STEPS:-10} + 1
rows = max(64, int(1.3 * total * 4 * 2))
bench.write_data(Path("$DATA"), bench.synthetic_rows(rows, bench.SHAPES[s]["vocab_size"], 1024))
print("checkpoint + data", ck, rows, "rows", round(time.time()-t), "s")
PY
fi
echo "setup done at $((SECONDS-START)) s"
( while true; do echo "$(date +%s) $(grep -E '^(Dirty|Writeback):' /proc/meminfo | awk '{printf "%s%s ",$1,$2}') $(nvidia-smi --query-gpu=clocks.sm,power.draw,temperature.gpu,utilization.gpu --format=csv,noheader) load $(cut -d' ' -f1 /proc/loadavg)"; sleep 3; done ) > $OUT/monitor.txt 2>&1 &
MON=$!
vmstat -t 3 > $OUT/vmstat.txt 2>&1 &
VM=$!
while IFS='|' read -r name kind a1 a2; do
  [ -z "$name" ] && continue
  left=$(( ${DEADLINE_S:-540} - (SECONDS-START) ))
  [ $left -lt 40 ] && { echo "skip $name (no time)"; continue; }
  t=$SECONDS; echo "$(date +%s) start $name" >> $OUT/events.txt
  if [ "$kind" = plain ]; then
    timeout $left python3 $REPO/scripts/plain_vs_ours/plain_sft.py --ckpt $CKPT --data $DATA --steps $(( ${WARM:-2} + ${STEPS:-10} )) --warmup ${WARM:-2} --out $OUT/$name.json $a1 > $OUT/$name.log 2>&1; rc=$?
  else
    timeout $left python3 -m qlora_recipes bench $COMMON $a1 "bench.variants=[\"$name: $a2\"]" output_dir=/tmp/b_$name > $OUT/$name.log 2>&1; rc=$?
    mkdir -p $OUT/$name; cp /tmp/b_$name/$name/metrics.json $OUT/$name/ 2>/dev/null; cp /tmp/b_$name/$name/bench.log $OUT/$name/ 2>/dev/null
    [ -d /tmp/b_$name/$name/profile ] && cp -r /tmp/b_$name/$name/profile $OUT/$name/
  fi
  echo "== $name ($kind $a1 | $a2): exit $rc in $((SECONDS-t)) s"; grep -v "it/s\]\|s/it\]" $OUT/$name.log | tail -2 | cut -c1-250
done <<< "$VARIANTS"
kill $MON $VM 2>/dev/null
python3 $REPO/scripts/plain_vs_ours/table.py $OUT ${WARM:-2} | tee $OUT/table.md
cd $OUT && tar czf /tmp/all.tgz --exclude='*.tgz' . && mv /tmp/all.tgz $OUT/all.tgz
