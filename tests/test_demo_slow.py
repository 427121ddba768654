"""The README's default recipe end to end on the real SmolLM2 model (minutes on CPU): make test-slow."""

import json
import time

import pytest

from qlora_recipes import cli


@pytest.mark.slow
def test_default_recipe_teaches_the_task_within_ten_minutes(tmp_path):
    run_dir = tmp_path / "demo"
    started = time.time()
    assert cli.main(["run", f"output_dir={run_dir}"]) == 0
    wall = time.time() - started
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert wall < 600
    assert metrics["eval"]["loss_after"] < 0.5 * metrics["eval"]["loss_before"]
    assert metrics["eval"]["task_before"] <= 0.1 and metrics["eval"]["task_after"] >= 0.4
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_demo_then_eval_merge_chat(tmp_path, capsys):
    """The README's post-training flow on the real model: eval shows the gain, the merged model answers."""
    run_dir = tmp_path / "demo"
    assert cli.main(["run", f"output_dir={run_dir}"]) == 0
    assert cli.main(["eval", str(run_dir)]) == 0
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["after"]["perplexity"] < 0.5 * result["before"]["perplexity"]
    assert result["after"]["task"] >= result["before"]["task"] + 0.4
    assert cli.main(["merge", str(run_dir)]) == 0
    capsys.readouterr()
    assert cli.main(["chat", str(run_dir / "merged"), "prompt=Convert to ISO 8601: March 3, 1999"]) == 0
    assert capsys.readouterr().out.strip().endswith("1999-03-03")


@pytest.mark.slow
def test_dpo_demo_prefers_the_iso_answers(tmp_path):
    run_dir = tmp_path / "dpo"
    started = time.time()
    assert cli.main(["run", "+recipe=smollm2_dpo", f"output_dir={run_dir}"]) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert time.time() - started < 600
    pref = metrics["train"]["preference"]
    assert pref["rewards/margins"]["last"] > pref["rewards/margins"]["first"] + 1.0
    assert metrics["eval"]["preference_after"]["rewards/accuracies"] >= 0.8
