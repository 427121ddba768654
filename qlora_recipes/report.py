"""How figures read in the Markdown tables and printed summaries (runs, eval, sweeps, bench)."""

from __future__ import annotations

from typing import Any


def fmt(value: Any, spec: str = ".4f") -> str:
    """`value` formatted with `spec`, or "n/a" where there is no figure."""
    return "n/a" if value is None else format(value, spec)
