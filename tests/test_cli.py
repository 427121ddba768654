"""The CLI as a user meets it: subprocesses, exit codes, no tracebacks."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_recipes.compose import recipe_files

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, cwd=None, env=None):
    return subprocess.run(
        [sys.executable, "-m", "qlora_recipes", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


def test_no_verb_lists_the_verbs():
    result = cli()
    for verb in ("run", "show", "validate", "ls", "train"):
        assert f"    {verb} " in result.stdout
    assert cli("--help").returncode == 0


def test_ls_lists_every_recipe_with_a_description():
    out = cli("ls").stdout
    for name in recipe_files():
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert "(no description)" not in line


@pytest.mark.parametrize(
    "args, expected",
    [
        (["validate", "+recipe=smollm2_chatml", "lora.rr=3"], "lora.rr"),
        (["validate", "quant=bogus"], "Available options in 'quant'"),
        (["show", "lora.r=-2"], "lora.r=-2"),
        (["run", "+recipe=nope"], "smollm2_chatml"),
    ],
)
def test_user_errors_exit_2_without_traceback(args, expected):
    result = cli(*args)
    assert result.returncode == 2
    assert expected in result.stderr and "Traceback" not in result.stderr


def test_show_prints_resolved_recipe_choices_and_plan():
    result = cli("show", "lora.r=16")
    assert result.returncode == 0
    out = result.stdout
    assert "# groups: recipe=smollm2_chatml" in out and "quant=nf4" in out
    assert "model.dtype auto -> float32" in out and "gradient_accumulation_steps" in out
    assert "  r: 16" in out and '"SFTConfig"' in out
    # the default recipe's adapters sit on the top 6 of SmolLM2's 30 layers: no indices before the model loads
    assert '"layers_to_transform": "the last 6 decoder layers (set once loaded)"' in out
    full = cli("show", "lora=none", "quant=none").stdout
    assert "LoRA on the last" not in full and '"LoraConfig": null' in full


def test_validate_builds_objects():
    result = cli("validate")
    assert result.returncode == 0, result.stderr
    assert "BitsAndBytesConfig, LoraConfig, SFTConfig" in result.stdout


def test_installed_package_ships_conf_and_recipes(tmp_path):
    """`pip install .` puts conf/ and recipes/ inside the package; it then works from any directory."""
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    assert (target / "qlora_recipes" / "conf" / "quant" / "nf4.yaml").is_file()
    assert (target / "qlora_recipes" / "recipes" / "smollm2_chatml.yaml").is_file()
    assert (target / "qlora_recipes" / "demo_data" / "dates" / "train.jsonl").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = cli("show", cwd=elsewhere, env={"PYTHONPATH": str(target)})
    assert result.returncode == 0, result.stderr
    assert str(target / "qlora_recipes" / "demo_data" / "dates") in result.stdout


def test_multirun_sweeps_each_job_into_its_own_run_dir(tmp_path):
    from conftest import TINY_TRAIN

    sweep = tmp_path / "sweep"
    result = cli(
        "run",
        "--multirun",
        *TINY_TRAIN,
        "lora.r=4,8",
        "trainer.max_steps=2",
        "trainer.task_eval_samples=0",
        "data.max_train_samples=16",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    ranks = sorted(
        int(line.split()[-1])
        for job in ("0", "1")
        for line in (sweep / job / "recipe.yaml").read_text().splitlines()
        if line.startswith("  r: ")
    )
    assert ranks == [4, 8]
    assert (sweep / "0" / "metrics.json").is_file() and (sweep / "1" / "adapter").is_dir()
