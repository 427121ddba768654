"""End-to-end SFT on the tiny random Llama through the real CLI path: numbers, not just no exception."""

import pytest
import torch

from qlora_recipes import cli, rundir

TINY_RUN = ["lora.r=16", "trainer.max_steps=60", "trainer.save_steps=30", "logger=tensorboard"]


def logits(model, tokenizer):
    batch = tokenizer(["<|im_start|>user\nGive May 5 2020 in ISO format.<|im_end|>\n"], return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_sft_run_learns_saves_and_reloads(train_run, tiny_checkpoint, quant):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, metrics = train_run(*TINY_RUN, f"quant={quant}")
    assert metrics["eval"]["loss_after"] < 0.8 * metrics["eval"]["loss_before"]
    assert metrics["train"]["last_logged_loss"] < metrics["train"]["first_logged_loss"]
    assert metrics["train"]["steps"] == 60 and metrics["train"]["tokens_per_s"] > 0
    assert metrics["train"]["train_tokens"] >= 60 * 8 * 10  # real (unpadded) tokens were counted
    assert metrics["eval"]["task_before"] is not None and metrics["memory"]["peak_rss_gib"] > 0
    assert rundir.read(run_dir).recipe.quant.load_in_4bit == (quant == "nf4")
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert (run_dir / "samples.md").read_text().count("\n") == 2 + 4
    assert (run_dir / "loss.png").read_bytes().startswith(b"\x89PNG")  # the train loss curve
    assert rundir.latest_checkpoint(run_dir).name == "checkpoint-60"

    adapter = run_dir / "adapter"
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    assert "<|im_start|>" in tokenizer.chat_template
    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    before = logits(base, tokenizer)
    tuned = PeftModel.from_pretrained(base, adapter)
    assert (logits(tuned, tokenizer) - before).abs().max() > 1e-2


def test_dry_run_writes_run_dir_and_trains_nothing(tmp_path, capsys):
    run_dir = tmp_path / "dry"
    assert cli.main(["run", "dry_run=true", f"output_dir={run_dir}"]) == 0
    out = capsys.readouterr().out
    assert "python -m qlora_recipes train" in out and '"BitsAndBytesConfig"' in out
    assert (run_dir / "recipe.yaml").is_file() and (run_dir / "accelerate_config.yaml").is_file()
    assert not (run_dir / "metrics.json").exists()
    # a dir holding a run is never reused without an explicit resume
    assert cli.main(["run", "dry_run=true", f"output_dir={run_dir}"]) == 2
    assert "never overwritten" in capsys.readouterr().err


@pytest.mark.slow
def test_torch_compile_trains_4bit_lora_like_eager(tmp_path):
    """trainer.torch_compile=true on the 4-bit tiny model (CPU: ~2 min of compiling): the same run as eager
    to within 1% of the losses (issue 6's faithfulness rule; its GPU speed is measured in docs/performance.md)."""
    import json

    from conftest import TINY_TRAIN

    common = (*TINY_TRAIN, "trainer.max_steps=10", "trainer.eval_before_train=false", "trainer.task_eval_samples=0")
    metrics = {}
    for name, extra in (("eager", []), ("compiled", ["trainer.torch_compile=true"])):
        assert cli.main(["run", *common, *extra, f"output_dir={tmp_path / name}"]) == 0
        metrics[name] = json.loads((tmp_path / name / "metrics.json").read_text())
        assert metrics[name]["train"]["steps"] == 10
    eager, compiled = metrics["eager"], metrics["compiled"]
    for key in ("first_logged_loss", "last_logged_loss"):
        assert compiled["train"][key] == pytest.approx(eager["train"][key], rel=0.01)
    assert compiled["eval"]["loss_after"] == pytest.approx(eager["eval"]["loss_after"], rel=0.01)
    assert cli.main(["eval", str(tmp_path / "compiled"), "samples=0"]) == 0  # the saved adapter, loaded eagerly
    assert json.loads((tmp_path / "compiled" / "eval.json").read_text())["reload_max_abs_logit_diff"] < 1e-4
