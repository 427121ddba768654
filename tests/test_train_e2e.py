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
    """trainer.torch_compile=true on the 4-bit tiny model (CPU: ~2 min of compiling each), with bitsandbytes' matmul
    and with quant.compiled_dequant: the same run as eager to within 1% of the losses (issue 6's faithfulness rule;
    its GPU speed is measured in docs/performance.md)."""
    import json

    from conftest import TINY_TRAIN

    common = (*TINY_TRAIN, "trainer.max_steps=10", "trainer.eval_before_train=false", "trainer.task_eval_samples=0")
    metrics = {}
    runs = (
        ("eager", []),
        ("compiled", ["trainer.torch_compile=true"]),
        ("compiled_dequant", ["trainer.torch_compile=true", "quant.compiled_dequant=true"]),
    )
    for name, extra in runs:
        assert cli.main(["run", *common, *extra, f"output_dir={tmp_path / name}"]) == 0
        metrics[name] = json.loads((tmp_path / name / "metrics.json").read_text())
        assert metrics[name]["train"]["steps"] == 10
    eager = metrics["eager"]
    for compiled in (metrics["compiled"], metrics["compiled_dequant"]):
        for key in ("first_logged_loss", "last_logged_loss"):
            assert compiled["train"][key] == pytest.approx(eager["train"][key], rel=0.01)
        assert compiled["eval"]["loss_after"] == pytest.approx(eager["eval"]["loss_after"], rel=0.01)
    assert "nf4 layers dequantized inside" in (tmp_path / "compiled_dequant" / "run.log").read_text()
    assert cli.main(["eval", str(tmp_path / "compiled"), "samples=0"]) == 0  # the saved adapter, loaded eagerly
    assert json.loads((tmp_path / "compiled" / "eval.json").read_text())["reload_max_abs_logit_diff"] < 1e-4


def test_skipping_the_float32_upcast_still_trains_every_layers_adapter(train_run):
    """quant.upcast_unquantized=false skips PEFT's k-bit preparation, which is also what made the inputs of the
    reentrant-checkpointed blocks require grad; the trainer's gradient checkpointing must do that instead, or every
    adapter inside a block would get no gradient and keep its zero-initialised B."""
    from safetensors.torch import load_file

    run_dir, _ = train_run(
        "quant=nf4",
        "quant.upcast_unquantized=false",
        "trainer.gradient_checkpointing=true",
        "trainer.use_reentrant=true",
        "trainer.max_steps=3",
        "trainer.task_eval_samples=0",
        "trainer.eval_strategy=no",
    )
    weights = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    b_matrices = {key: value for key, value in weights.items() if "lora_B" in key}
    assert {key.split(".layers.")[1].split(".")[0] for key in b_matrices} == {"0", "1"}  # both blocks adapted
    assert all(value.abs().sum() > 0 for value in b_matrices.values()), "an adapter got no gradient"


@pytest.mark.parametrize("packing", [True, False])
def test_lazy_metrics_log_what_trl_logs_with_fewer_gpu_reads(tmp_path, monkeypatch, packing):
    """trainer.lazy_metrics: the same loss, token count, entropy and token accuracy at every logged step as TRL's
    own compute_loss, with the micro-batches' metrics read once a step instead of three reads a micro-batch."""
    from conftest import TINY_TRAIN
    from transformers import Trainer

    logged, reads = [], {"item": 0}
    log, item = Trainer.log, torch.Tensor.item

    def capture(self, logs, *args, **kwargs):
        logged.append(dict(logs))
        return log(self, logs, *args, **kwargs)

    def counted(self):
        reads["item"] += 1
        return item(self)

    monkeypatch.setattr(Trainer, "log", capture)
    monkeypatch.setattr(torch.Tensor, "item", counted)
    quiet = ["trainer.eval_strategy=no", "trainer.eval_before_train=false", "trainer.task_eval_samples=0"]
    steps = ["trainer.max_steps=4", "trainer.logging_steps=1", "trainer.batch_size=4", "trainer.micro_batch_size=2"]
    runs = {}
    for lazy in (False, True):
        logged.clear()
        reads["item"] = 0
        args = [*TINY_TRAIN, *quiet, *steps, f"trainer.packing={packing}", f"trainer.lazy_metrics={lazy}"]
        assert cli.main(["run", *args, f"output_dir={tmp_path / str(lazy)}"]) == 0
        runs[lazy] = ([h for h in logged if "loss" in h], reads["item"])
    (eager, eager_reads), (lazy, lazy_reads) = runs[False], runs[True]
    assert len(eager) == len(lazy) == 4
    for a, b in zip(eager, lazy, strict=True):
        assert a["num_tokens"] == b["num_tokens"] > 0
        for key in ("loss", "entropy", "mean_token_accuracy", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    assert lazy_reads + 3 * 8 - 4 <= eager_reads  # 8 micro-batches: 3 reads each, against one a step
