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
