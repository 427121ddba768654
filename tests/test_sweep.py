"""Sweeps: one run dir per job, failures recorded while the rest go on, a summary checked against each run's
metrics, GPU claims for parallel jobs, and the tracking options."""

import csv
import json
import multiprocessing
import time

import pytest
from conftest import TINY_TRAIN
from test_cli import cli

from qlora_recipes import plan, sweep
from qlora_recipes.errors import RecipeError

SHORT = [*TINY_TRAIN, "trainer.max_steps=4", "trainer.logging_steps=1", "trainer.task_eval_samples=0"]
SHORT += ["data.max_train_samples=32", "data.max_eval_samples=8"]
PNG = b"\x89PNG"


def test_two_by_two_sweep_summary_matches_each_run(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = cli(
        "run", "--multirun", *SHORT, "lora.r=4,8", "trainer.learning_rate=1e-3,2e-2", f"hydra.sweep.dir={sweep_dir}"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "4 jobs, 0 failed" in result.stdout

    with (sweep_dir / "sweep_summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4
    seen = set()
    for row in rows:
        run_dir = sweep_dir / row["job"]
        assert row["run_dir"] == str(run_dir) and row["status"] == "ok"
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert float(row["eval_loss"]) == pytest.approx(metrics["eval"]["loss_after"])
        assert float(row["train_loss"]) == pytest.approx(metrics["train"]["last_logged_loss"])
        assert float(row["tokens_per_s"]) == pytest.approx(metrics["train"]["tokens_per_s"])
        assert float(row["peak_memory_gib"]) == pytest.approx(metrics["memory"]["peak_rss_gib"])
        assert float(row["wall_time_s"]) == pytest.approx(metrics["wall_time_s"])
        recipe = (run_dir / "recipe.yaml").read_text()
        r = row["overrides"].split("lora.r=")[1].split()[0]
        assert f"  r: {r}\n" in recipe  # the job's overrides are the ones it trained with
        assert (run_dir / "loss.png").read_bytes().startswith(PNG)
        seen.add(row["overrides"])
    assert seen == {f"lora.r={r} trainer.learning_rate={lr}" for r in (4, 8) for lr in ("0.001", "0.02")}
    losses = [float(row["eval_loss"]) for row in rows]
    assert losses == sorted(losses) and [row["rank"] for row in rows] == ["1", "2", "3", "4"]
    summary = (sweep_dir / "sweep_summary.md").read_text()
    best = rows[0]
    assert f"| 1 | {best['job']} | `{best['overrides']}` | ok | {float(best['eval_loss']):.4f} |" in summary
    assert "![train loss per job](sweep_loss.png)" in summary
    assert (sweep_dir / "sweep_loss.png").read_bytes().startswith(PNG)


def test_a_failing_job_is_reported_and_the_others_finish(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = cli("run", "--multirun", *SHORT, "lora.r=0,4", f"hydra.sweep.dir={sweep_dir}")
    assert result.returncode == 1
    assert "sweep job 0 failed: RecipeError:" in result.stderr and "Traceback" not in result.stderr
    assert "lora.r=0: the rank must be a positive integer" in result.stderr
    assert f"1 of 2 sweep jobs failed: see {sweep_dir / 'sweep_summary.md'}" in result.stderr
    assert (sweep_dir / "1" / "adapter").is_dir()  # the job after the failure trained
    rows = list(csv.DictReader((sweep_dir / "sweep_summary.csv").open()))
    assert [(r["job"], r["status"]) for r in rows] == [("1", "ok"), ("0", "failed")]
    assert "lora.r=0" in rows[1]["error"] and rows[1]["overrides"] == "lora.r=0"
    summary = (sweep_dir / "sweep_summary.md").read_text()
    assert "| 2 | 0 | `lora.r=0` | failed: RecipeError: recipe 'smollm2_chatml' has 1 problem: - lora.r=0" in summary


def test_objective_is_eval_loss_else_train_loss_else_inf(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    metrics = {"eval": {"loss_after": 0.5}, "train": {"last_logged_loss": 0.7}, "memory": {}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    record = {"job": 0, "status": "ok", "run_dir": str(run), "overrides": []}
    assert sweep.objective(record) == 0.5
    metrics["eval"]["loss_after"] = None
    (run / "metrics.json").write_text(json.dumps(metrics))
    assert sweep.objective(record) == 0.7
    assert sweep.objective({**record, "status": "failed"}) == float("inf")


def hold_gpu(gpus, lock_dir, hold_s, queue):
    with sweep.claim_gpu(gpus, lock_dir, poll_s=0.05) as gpu:
        import os

        queue.put((gpu, os.environ["CUDA_VISIBLE_DEVICES"], time.monotonic()))
        time.sleep(hold_s)
    queue.put(("released", gpu, time.monotonic()))


def test_parallel_jobs_claim_distinct_gpus_and_wait_for_a_free_one(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    first = [ctx.Process(target=hold_gpu, args=([0, 1], tmp_path, 2.0, queue)) for _ in range(2)]
    for p in first:
        p.start()
    claims = [queue.get(timeout=60) for _ in range(2)]
    assert sorted(c[0] for c in claims) == [0, 1] and all(str(c[0]) == c[1] for c in claims)
    late = ctx.Process(target=hold_gpu, args=([0, 1], tmp_path, 0.0, queue))
    late.start()
    events = [queue.get(timeout=60) for _ in range(4)]
    for p in [*first, late]:
        p.join(timeout=60)
    late_claim = next(e for e in events if e[0] in (0, 1))
    releases = sorted(e[2] for e in events if e[0] == "released")
    assert releases[0] <= late_claim[2]  # the third job started only once one of the first two let go


def test_a_worker_process_keeps_the_gpu_it_claimed_first(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "_process_gpu", None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with sweep.claim_gpu([3, 5], tmp_path) as gpu:
        assert gpu == 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "x")
    with sweep.claim_gpu([5, 3], tmp_path) as gpu:  # 5 is free, but CUDA in this process is bound to 3
        assert gpu == 3 and sweep._process_gpu == 3
    with sweep.claim_gpu([], tmp_path) as gpu:
        assert gpu is None


@pytest.mark.parametrize(
    "logger, report_to, per_run_keys, default_keys",
    [
        ("tensorboard", ["tensorboard"], {"TENSORBOARD_LOGGING_DIR"}, set()),
        ("none", "none", {"TENSORBOARD_LOGGING_DIR"}, set()),
        ("wandb", ["wandb"], {"TENSORBOARD_LOGGING_DIR", "WANDB_DIR"}, {"WANDB_PROJECT"}),
        ("mlflow", ["mlflow"], {"TENSORBOARD_LOGGING_DIR"}, {"MLFLOW_EXPERIMENT_NAME", "MLFLOW_TRACKING_URI"}),
    ],
)
def test_logger_choice(recipe_of, monkeypatch, logger, report_to, per_run_keys, default_keys):
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object())  # as if wandb/mlflow were installed
    recipe = recipe_of(f"logger={logger}", "logger_project=dates").recipe
    assert plan.training_kwargs(recipe, "/tmp/run")["report_to"] == report_to
    per_run, defaults = plan.logger_env(recipe, "/tmp/run")
    assert set(per_run) == per_run_keys and set(defaults) == default_keys
    assert defaults.get("WANDB_PROJECT", "dates") == defaults.get("MLFLOW_EXPERIMENT_NAME", "dates") == "dates"
    assert defaults.get("MLFLOW_TRACKING_URI", "sqlite:///").startswith("sqlite:///")  # a local store: no server


@pytest.mark.parametrize("logger", ["wandb", "mlflow"])
def test_logger_package_missing_is_a_clear_error(recipe_of, monkeypatch, logger):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == logger else real(name, *a))
    with pytest.raises(RecipeError, match=f"logger={logger} but the {logger} package is not installed"):
        recipe_of(f"logger={logger}")


def test_optuna_sweep_minimizes_eval_loss_and_writes_the_summary(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")  # the [sweep] extra; dev installs it
    sweep_dir = tmp_path / "optuna"
    fixed = [o for o in SHORT if not o.startswith("trainer.learning_rate=")]  # a fixed value would not be searched
    result = cli(
        "run", "--multirun", "+sweep=optuna_lr_r", *fixed, "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={sweep_dir}"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    best = (sweep_dir / "optimization_results.yaml").read_text()
    rows = list(csv.DictReader((sweep_dir / "sweep_summary.csv").open()))
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows)
    assert f"best_value: {float(rows[0]['eval_loss'])}" in best  # Optuna's best is the summary's rank 1
    assert all("trainer.learning_rate=" in r["overrides"] for r in rows)  # sampled on a continuous range


def test_parallel_joblib_jobs_each_hold_their_own_gpu(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep_dir = tmp_path / "parallel"
    result = cli(
        "run", "--multirun", *SHORT, "lora.r=4,8", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
        "sweep_gpus=[0,1]", f"hydra.sweep.dir={sweep_dir}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    jobs = [json.loads((sweep_dir / str(n) / "job.json").read_text()) for n in (0, 1)]
    assert sorted(job["gpu"] for job in jobs) == [0, 1] and all(job["status"] == "ok" for job in jobs)


def test_sweep_gpus_needs_one_process_per_job(recipe_of):
    with pytest.raises(RecipeError, match="a pinned sweep job sees one GPU"):
        recipe_of("sweep_gpus=[0,1]", "dist=ddp", "dist.num_processes=2", "trainer.batch_size=8")


def test_submitit_local_executor_runs_each_job_in_its_own_process(tmp_path):
    """The SLURM path's launcher (hydra-submitit-launcher), run through submitit's local executor."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep_dir = tmp_path / "submitit"
    result = cli(
        "run", "--multirun", *SHORT, "lora.r=4,8", "hydra/launcher=submitit_local", f"hydra.sweep.dir={sweep_dir}"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Submitit 'local' sweep output dir" in result.stdout + result.stderr
    rows = list(csv.DictReader((sweep_dir / "sweep_summary.csv").open()))
    assert sorted(r["overrides"] for r in rows) == ["lora.r=4", "lora.r=8"] and all(r["status"] == "ok" for r in rows)
    job_logs = list((sweep_dir / ".submitit").glob("*/*_log.out"))
    assert len(job_logs) == 2  # submitit started one process per job and kept its log


def test_the_shipped_slurm_config_targets_submitit_slurm():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from qlora_recipes.compose import conf_dir, register

    register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("config", overrides=["+cluster=slurm", "hydra.launcher.partition=gpu"], return_hydra_config=True)
    GlobalHydra.instance().clear()
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.nodes, launcher.tasks_per_node, launcher.partition) == (1, 1, "gpu")
    assert launcher.gpus_per_node == 8 and launcher.timeout_min == 1440
