#!/usr/bin/env bash
# GPU bench driver (device tool, carry .whl): installs the carried wheels, records cards and versions, then
# runs `bench` once per VARIANTS entry ("NAME: overrides", one per line) so that a hang or crash costs one
# variant only (TIMEOUT seconds each). COMMON holds overrides shared by all. Results (bench.md,
# bench.json, profile tables, logs) in $OUT/<name>.txt, and $OUT/cards.txt with the cards and a table
# combining them, the first variant as the baseline. APPEND=1 keeps the results of an earlier run of this script on
# the same (still warm) machine in that table, e.g. a second run with other COMMON overrides.
set -u
source scripts/gpu_env.sh || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
[ -n "${APPEND:-}" ] || rm -rf /tmp/benchjson
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/cards.txt"
while IFS= read -r line; do
  [ -z "$line" ] && continue
  name=${line%%:*}; rm -f "/tmp/benchjson/$name.json"
  dir=/tmp/bench/$name; rm -rf "$dir"
  echo "== $line"
  timeout "${TIMEOUT:-200}" python3 -m qlora_recipes bench ${COMMON:-} "bench.variants=[\"$line\"]" "output_dir=$dir" \
    > "/tmp/$name.log" 2>&1
  echo "exit $?"; tail -3 "/tmp/$name.log" | cut -c1-300
  # one file per variant (the device tool returns at most 8): results, step times, profile, log tails
  mkdir -p /tmp/benchjson; cp "$dir/bench.json" "/tmp/benchjson/$name.json" 2>/dev/null
  run=$dir/$name
  { echo "### $line"; cat "$dir/bench.md" 2>/dev/null
    python3 -c "import json,sys;[print(s) for s in json.load(open(sys.argv[1]))['train']['step_times']]" "$run/metrics.json" 2>/dev/null
    for f in "$run"/profile/gpu_busy.json "$run"/profile/idle.json "$run"/profile/memory_peak.json "$run"/profile/ops_by_cuda.txt "$run"/profile/ops_by_cpu.txt; do [ -f "$f" ] && { echo "#### $f"; cut -c1-220 "$f"; }; done
    for f in "/tmp/$name.log" "$run"/run*.log "$run/bench.log"; do [ -f "$f" ] && { echo "#### $f"; grep -v "it/s\]" "$f" | tail -25 | cut -c1-400; }; done
  } > "$OUT/$name.txt"
done <<< "${VARIANTS:-plain}"
python3 - /tmp/benchjson <<'PY' | tee -a "$OUT/cards.txt"
# one table over the variants' separate bench runs, written by bench's own markdown(), the first as baseline
import glob, json, os, sys
from qlora_recipes.bench import Measured, markdown
header, rows, stacks = None, [], {}
for path in sorted(glob.glob(f"{sys.argv[1]}/*.json"), key=os.path.getmtime):
    b = json.load(open(path))
    header = header or {key: value for key, value in b.items() if key != "results"}
    rows += [Measured(**r) for r in b["results"]]
    stacks.update({r["name"]: b["versions"] for r in b["results"]})
if rows:
    if len(set(stacks.values())) > 1:  # e.g. an APPEND=1 run with HF_STACK=image: say which ran on which
        header["versions"] = "; ".join(f"{name}: {v}" for name, v in stacks.items())
    print(markdown(rows, {**header, "overrides": "COMMON, then each variant's own (one bench run per variant)"}))
PY
