"""`run --multirun`: Hydra sweeps whose result is a comparison, not a pile of folders.

Every job composes its own overrides and trains in its own run dir under one sweep dir (Hydra's sweeper
and launcher: the basic grid, Optuna, joblib for parallel jobs). A job that fails is recorded in its
job.json and reported; the others go on. At the end sweep_summary.md / .csv list each job's overrides and
figures sorted by eval loss, and sweep_loss.png compares the loss curves. Each job returns its eval loss
(else its last train loss), which is what the Optuna sweeper minimizes.

Parallel jobs on a multi-GPU machine (`hydra/launcher=joblib`, one process per job) set `sweep_gpus=[0,1]`:
each job claims a free GPU from the list with a lock file in the sweep dir and sees only that GPU.
"""

from __future__ import annotations

import csv
import fcntl
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from qlora_recipes import plots
from qlora_recipes.errors import Interrupted
from qlora_recipes.report import fmt

log = logging.getLogger("qlora_recipes")

JOB_FILE = "job.json"
SUMMARY = "sweep_summary"
COLUMNS = (
    "rank", "job", "status", "overrides", "eval_loss", "train_loss", "tokens_per_s", "peak_memory_gib",
    "wall_time_s", "run_dir", "error",
)  # fmt: skip


# ---------------------------------------------------------------- GPU per job

_process_gpu: int | None = None  # the GPU this process claimed first: CUDA binds a process to it for good


@contextmanager
def claim_gpu(gpus: list[int], lock_dir: Path, poll_s: float = 1.0) -> Iterator[int | None]:
    """Hold one GPU of `gpus` for this job (an exclusive lock file per GPU in lock_dir) and make it the only
    one this process sees. A worker process that ran a job before takes the same GPU again, since CUDA,
    once initialized, ignores a changed CUDA_VISIBLE_DEVICES. No GPUs listed: nothing is pinned."""
    global _process_gpu
    if not gpus:
        yield None
        return
    lock_dir.mkdir(parents=True, exist_ok=True)
    candidates = [_process_gpu] if _process_gpu is not None else list(gpus)
    waited = False
    while True:
        for gpu in candidates:
            handle = (lock_dir / f".gpu{gpu}.lock").open("w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            _process_gpu = gpu
            os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
            log.info("sweep job pinned to GPU %d", gpu)
            try:
                yield gpu
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()
            return
        if not waited:
            log.info("sweep job waiting for a free GPU among %s", candidates)
            waited = True
        time.sleep(poll_s)


# ---------------------------------------------------------------- jobs


def objective(record: dict[str, Any]) -> float:
    """What a sweeper minimizes: eval loss, else the last train loss; +inf for a failed job."""
    row = job_row(record)
    value = row["eval_loss"] if row["eval_loss"] is not None else row["train_loss"]
    # NaN (a diverged run) would stop Optuna's sweeper altogether: report it as the worst value instead
    return float(value) if value is not None and math.isfinite(value) else math.inf


def run_job(cfg: Any, job_dir: Path, sweep_dir: Path, job_num: int, overrides: list[str]) -> float:
    """One sweep job: train, and record the outcome in job_dir/job.json whatever happens."""
    from qlora_recipes.cli import start_run
    from qlora_recipes.compose import reject_unknown_keys
    from qlora_recipes.resolve import probe_device, resolve

    record: dict[str, Any] = {"job": job_num, "overrides": overrides, "status": "failed", "run_dir": None}
    job_dir.mkdir(parents=True, exist_ok=True)
    try:
        reject_unknown_keys(cfg)  # as compose() does for single runs
        with claim_gpu(list(cfg.get("sweep_gpus") or []), sweep_dir) as gpu:  # before anything asks CUDA
            record["gpu"] = gpu
            resolved = resolve(cfg, probe_device())
            record["run_dir"] = str(resolved.recipe.output_dir or job_dir)
            start_run(resolved, record["run_dir"])
        record["status"] = "ok"
    except (Interrupted, KeyboardInterrupt):
        record["status"] = "interrupted"
        raise
    except Exception as exc:  # noqa: BLE001 - one job's failure, whatever it is, must not end the sweep
        record["error"] = f"{type(exc).__name__}: {exc}"
        print(f"sweep job {job_num} failed: {record['error']}", file=sys.stderr, flush=True)
    finally:
        (job_dir / JOB_FILE).write_text(json.dumps(record, indent=2))
    return objective(record)


def sweep_dir_of(overrides: list[str]) -> tuple[Path, list[str]]:
    """The sweep dir (hydra.sweep.dir if given, else runs/sweeps/<time>) and the overrides that fix it."""
    for item in overrides:
        if item.startswith("hydra.sweep.dir="):
            return Path(item.split("=", 1)[1]).expanduser().resolve(), overrides
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = (Path("runs") / "sweeps" / stamp).resolve()
    return path, [*overrides, f"hydra.sweep.dir={path}"]


def run_sweep(overrides: list[str]) -> tuple[Path, list[dict[str, Any]]]:
    """Run every job through Hydra's sweeper and launcher, then write the summary; returns the sweep dir
    and the summary's rows."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from qlora_recipes.compose import conf_dir, register, with_default_recipe

    register()
    sweep_dir, overrides = sweep_dir_of(overrides)

    @hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
    def job(cfg: Any) -> float:
        hc = HydraConfig.get()
        return run_job(cfg, Path(hc.runtime.output_dir), sweep_dir, hc.job.num, list(hc.overrides.task))

    argv = sys.argv
    sys.argv = [argv[0], "--multirun", *with_default_recipe(overrides)]
    try:
        job()
    finally:
        sys.argv = argv
    rows = write_summary(sweep_dir)
    print(
        f"# sweep: {len(rows)} jobs, {sum(r['status'] != 'ok' for r in rows)} failed; summary in {sweep_dir}/{SUMMARY}.md"
    )
    return sweep_dir, rows


# ---------------------------------------------------------------- summary


def job_row(record: dict[str, Any]) -> dict[str, Any]:
    """A job's figures from its run dir's metrics.json (None where it has none)."""
    metrics: dict[str, Any] = {}
    run_dir = Path(record["run_dir"]) if record.get("run_dir") else None
    if record.get("status") == "ok" and run_dir and (run_dir / "metrics.json").is_file():
        metrics = json.loads((run_dir / "metrics.json").read_text())
    train, memory = metrics.get("train", {}), metrics.get("memory", {})
    return {
        "job": record["job"],
        "status": record.get("status", "failed"),
        "overrides": " ".join(record.get("overrides", [])),
        "eval_loss": metrics.get("eval", {}).get("loss_after"),
        "train_loss": train.get("last_logged_loss"),
        "tokens_per_s": train.get("tokens_per_s"),
        "peak_memory_gib": memory.get("peak_allocated_gib", memory.get("peak_rss_gib")),
        "wall_time_s": metrics.get("wall_time_s"),
        "run_dir": str(run_dir) if run_dir else None,
        "error": record.get("error"),
        "loss_curve": train.get("loss_curve", []),
    }


def ranked(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Finished jobs by eval loss (then train loss), then those without figures, then failures."""

    def key(row: dict[str, Any]) -> tuple:
        failed = row["status"] != "ok"
        loss = row["eval_loss"] if row["eval_loss"] is not None else row["train_loss"]
        return (failed, loss is None, row["eval_loss"] is None, loss if loss is not None else 0.0, row["job"])

    return [{**row, "rank": i} for i, row in enumerate(sorted(rows, key=key), 1)]


def write_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    """sweep_summary.md/.csv and sweep_loss.png from the sweep dir's job.json files."""
    records = [json.loads(p.read_text()) for p in sweep_dir.glob(f"*/{JOB_FILE}")]
    common = set.intersection(*(set(r["overrides"]) for r in records)) if len(records) > 1 else set()
    for record in records:  # the row shows what differs between jobs; the shared part goes in the header
        record["overrides"] = sorted(set(record["overrides"]) - common)
    rows = ranked([job_row(r) for r in records])
    with (sweep_dir / f"{SUMMARY}.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    plot = plots.plot_losses(
        {f"{r['job']}: {r['overrides'] or '(no overrides)'}": r["loss_curve"] for r in rows},
        f"sweep {sweep_dir.name}",
        sweep_dir / "sweep_loss.png",
        ylabel="train loss",
    )
    (sweep_dir / f"{SUMMARY}.md").write_text(markdown(rows, sweep_dir, plot, sorted(common)))
    return rows


def markdown(rows: list[dict[str, Any]], sweep_dir: Path, plot: Path | None, common: list[str]) -> str:
    lines = [
        f"# sweep {sweep_dir}",
        "",
        f"{len(rows)} jobs, {sum(r['status'] != 'ok' for r in rows)} failed; sorted by eval loss (final, after "
        "training), then train loss (last logged). Peak memory: GPU allocated, or process RSS on CPU.",
        "",
        f"Every job: `{' '.join(common) or '(no shared overrides)'}`",
        "",
        "| rank | job | overrides | status | eval loss | train loss | tokens/s | peak memory GiB | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {' '.join((r['error'] or '').split())[:160]}"
        lines.append(
            f"| {r['rank']} | {r['job']} | `{r['overrides']}` | {status.replace('|', '/')} | {fmt(r['eval_loss'], '.4f')} | "
            f"{fmt(r['train_loss'], '.4f')} | {fmt(r['tokens_per_s'], '.0f')} | {fmt(r['peak_memory_gib'], '.2f')} | "
            f"{fmt(r['wall_time_s'], '.0f')} |"
        )
    if plot is not None:
        lines += ["", f"![train loss per job]({plot.name})"]
    return "\n".join(lines) + "\n"
