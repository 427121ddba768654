"""Writes the bundled demo data sets: rewrite a written-out date as ISO 8601 (YYYY-MM-DD).

SmolLM2-135M-Instruct answers these with prose or wrong digits; a short LoRA fine-tune teaches the
format and the month table. dates/ holds chat rows for SFT; dates_pref/ the same prompts as preference
pairs for DPO (chosen: the ISO date; rejected: a near miss - day and month swapped, another date format,
or the year off by one). Deterministic: `python -m qlora_recipes.demo_data.make_dates` rewrites all four
files identically.
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


def near_miss(iso: str, rng: random.Random) -> str:
    """A wrong answer that looks right: what a model that has not learned the format tends to write."""
    year, month, day = (int(part) for part in iso.split("-"))
    choices = [
        f"{month:02d}/{day:02d}/{year}",
        f"{day:02d}.{month:02d}.{year}",
        f"{year + rng.choice((-1, 1))}-{month:02d}-{day:02d}",
    ]
    if day <= 12 and day != month:
        choices.append(f"{year}-{day:02d}-{month:02d}")
    return rng.choice(choices)


def preference(row: dict, rng: random.Random) -> dict:
    (user, answer) = row["messages"]
    return {
        "prompt": [user],
        "chosen": [answer],
        "rejected": [{"role": "assistant", "content": near_miss(answer["content"], rng)}],
    }


def write(path: Path, data: list[dict]) -> None:
    path.parent.mkdir(exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    print(f"wrote {len(data)} rows to {path}")


def main() -> None:
    rng, seen, pref_rng = random.Random(1234), set(), random.Random(99)
    for split, count in (("train", 800), ("test", 64)):
        chats = rows(rng, count, seen)
        write(HERE / "dates" / f"{split}.jsonl", chats)
        write(HERE / "dates_pref" / f"{split}.jsonl", [preference(r, pref_rng) for r in chats])


if __name__ == "__main__":
    main()
