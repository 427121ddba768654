"""Table of all variants in $OUT: plain *.json (plain_sft.py) and bench run dirs' metrics.json."""

import glob
import json
import os
import statistics
import sys

out, warmup = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2
rows = []
for path in sorted(glob.glob(f"{out}/**/*.json", recursive=True), key=os.path.getmtime):
    d = json.load(open(path))
    if "steps" in d and "argv" in d:
        name, steps, mem, prof = d["name"], d["steps"], (d["peak_alloc_gib"], d["peak_reserved_gib"]), None
        prof = next((a for i, a in enumerate(d["argv"]) if d["argv"][i - 1] == "--profile-step"), None)
        prof = int(prof) if prof else None
    elif "train" in d and "step_times" in d.get("train", {}):
        name = os.path.basename(os.path.dirname(path))
        steps = d["train"]["step_times"]
        mem = (d["memory"].get("peak_allocated_gib"), d["memory"].get("peak_reserved_gib"))
        prof = max(s["step"] for s in steps) if os.path.isdir(os.path.join(os.path.dirname(path), "profile")) else None
    else:
        continue
    m = [s for s in steps if s["step"] > warmup and s["step"] != prof]
    if not m:
        continue
    rate = statistics.median(s["tokens"] / s["seconds"] for s in m)
    wall = None
    if "end" in m[-1]:
        prev = [s for s in steps if s["step"] == warmup][0]
        wall = (
            sum(s["tokens"] for s in m) / (m[-1]["end"] - prev["end"]) if prof is None or prof > m[-1]["step"] else None
        )
    rows.append(
        (
            name,
            rate,
            statistics.median(s["seconds"] for s in m),
            wall,
            len(m),
            statistics.mean(s["tokens"] for s in m),
            min(s["seconds"] for s in m),
            max(s["seconds"] for s in m),
            *mem,
        )
    )
print(
    "| variant | tokens/s (median of steps) | median step s | wall tokens/s | steps | tokens/step | min-max step s | peak alloc GiB | peak reserved GiB |"
)
print("|---|---|---|---|---|---|---|---|---|")
for r in rows:

    def f(v, s):
        return "n/a" if v is None else format(v, s)

    print(
        f"| {r[0]} | {r[1]:,.0f} | {r[2]:.3f} | {f(r[3], ',.0f')} | {r[4]} | {r[5]:,.0f} | {r[6]:.2f}-{r[7]:.2f} | {f(r[8], '.2f')} | {f(r[9], '.2f')} |"
    )
