"""Writes the bundled demo data set: rewrite a written-out date as ISO 8601 (YYYY-MM-DD).

SmolLM2-135M-Instruct answers these with prose or wrong digits; a short LoRA fine-tune teaches the
format and the month table. Deterministic: `python -m qlora_recipes.demo_data.make_dates` rewrites
dates_train.jsonl and dates_test.jsonl identically.
"""

from __future__ import annotations

import calendar
import json
import random
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
ASKS = (
    "Convert to ISO 8601: {d}",
    "Write this date as YYYY-MM-DD: {d}",
    "ISO date for {d}?",
    "Give {d} in ISO format.",
)
ORDINAL = {1: "st", 2: "nd", 3: "rd", 21: "st", 22: "nd", 23: "rd", 31: "st"}


def spell(day: date, style: int) -> str:
    month, short = calendar.month_name[day.month], calendar.month_abbr[day.month]
    if style == 0:
        return f"{month} {day.day}, {day.year}"
    if style == 1:
        return f"{day.day} {month} {day.year}"
    if style == 2:
        return f"{short} {day.day} {day.year}"
    return f"the {day.day}{ORDINAL.get(day.day, 'th')} of {month}, {day.year}"


def rows(rng: random.Random, count: int, seen: set[date]) -> list[dict]:
    out = []
    while len(out) < count:
        day = date(rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28))
        if day in seen:
            continue
        seen.add(day)
        ask = rng.choice(ASKS).format(d=spell(day, rng.randrange(4)))
        out.append({"messages": [{"role": "user", "content": ask}, {"role": "assistant", "content": day.isoformat()}]})
    return out


def main() -> None:
    rng, seen = random.Random(1234), set()
    for split, count in (("train", 800), ("test", 64)):
        path = HERE / "dates" / f"{split}.jsonl"
        path.parent.mkdir(exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows(rng, count, seen)))
        print(f"wrote {count} rows to {path}")


if __name__ == "__main__":
    main()
