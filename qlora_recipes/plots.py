"""Loss plots: RUN_DIR/loss.png for every run, and one figure comparing the jobs of a sweep.

matplotlib draws off-screen (Agg); where it is missing (a slim GPU image) the plot is skipped with a
warning and training is unaffected.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("qlora_recipes")


def pyplot() -> Any | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no loss plot (pip install matplotlib)")
        return None
    return plt


def plot_losses(lines: dict[str, list[dict[str, float]]], title: str, path: Path, ylabel: str = "loss") -> Path | None:
    """One line per label ({step, loss} points); nothing is written when there is nothing to draw."""
    lines = {label: curve for label, curve in lines.items() if curve}
    plt = pyplot() if lines else None
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, curve in lines.items():
        ax.plot([p["step"] for p in curve], [p["loss"] for p in curve], marker=".", label=label)
    ax.set(xlabel="optimizer step", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_run(train_metrics: dict[str, Any], title: str, path: Path) -> Path | None:
    """RUN_DIR/loss.png: train loss per logged step, and eval loss where the run evaluated during training."""
    lines = {"train": train_metrics.get("loss_curve") or [], "eval": train_metrics.get("eval_curve") or []}
    return plot_losses(lines, title, path)
