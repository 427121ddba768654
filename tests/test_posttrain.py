"""eval, merge and chat on finished tiny-model runs (SFT with LoRA, DPO on a 4-bit base, full fine-tuning)."""

import json
import math

import pytest
import torch
from conftest import TINY_TRAIN

from qlora_recipes import cli

PROMPT = "Give May 5 2020 in ISO format."


def train(tmp_path_factory, name, *overrides):
    run_dir = tmp_path_factory.mktemp(name) / "run"
    assert cli.main(["run", *TINY_TRAIN, *overrides, f"output_dir={run_dir}"]) == 0
    return run_dir, json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    return train(tmp_path_factory, "sft", "quant=none", "lora.r=16", "trainer.max_steps=30", "trainer.save_steps=30")


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):  # 4-bit base, as the smollm2_dpo demo
    return train(
        tmp_path_factory,
        "dpo",
        "+recipe=smollm2_dpo",
        "trainer.max_steps=20",
        "trainer.learning_rate=5e-3",
        "trainer.logging_steps=2",
        "trainer.max_completion_len=null",
    )


@pytest.fixture(scope="module")
def orpo_run(tmp_path_factory):  # the DPO demo's data and 4-bit base, ORPO's loss
    return train(
        tmp_path_factory,
        "orpo",
        "+recipe=smollm2_dpo",
        "trainer=orpo",
        "trainer.max_steps=20",
        "trainer.learning_rate=5e-3",
        "trainer.logging_steps=2",
        "trainer.max_completion_len=null",
    )


def logits(model, tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False)
    batch = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        return model(**batch).logits.float()


def adapter_model(run_dir, dtype=torch.float32):
    """The run's adapter over its base loaded unquantized, with plain transformers + peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_recipes.models import tiny_checkpoint

    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoint(), dtype=dtype)
    return PeftModel.from_pretrained(base, run_dir / "adapter").eval(), AutoTokenizer.from_pretrained(
        run_dir / "adapter"
    )


def test_eval_reports_base_vs_trained_and_matches_training(sft_run, capsys):
    run_dir, metrics = sft_run
    assert cli.main(["eval", str(run_dir), "samples=3"]) == 0
    result = json.loads((run_dir / "eval.json").read_text())
    before, after = result["before"], result["after"]
    # the same evaluation as training's before/after, recomputed from the saved adapter
    assert before["loss"] == pytest.approx(metrics["eval"]["loss_before"], rel=1e-4)
    assert after["loss"] == pytest.approx(metrics["eval"]["loss_after"], rel=1e-4)
    assert after["loss"] < before["loss"] and after["perplexity"] == pytest.approx(math.exp(after["loss"]))
    assert before["task"] is not None and result["samples"] == 3
    report = (run_dir / "eval.md").read_text()
    assert "| perplexity |" in report and "| eval loss |" in report
    # the saved adapter gives the logits the trained model gave at the end of training (runner.save_probe)
    assert result["reload_max_abs_logit_diff"] < 1e-4 and "Saved weights vs the model at the end" in report
    assert report.split("| prompt | reference | before | after |")[1].count("\n|") == 1 + 3  # rule + 3 rows
    assert "eval.md" in capsys.readouterr().out


def test_merge_matches_the_adapter_model_and_loads_with_transformers(sft_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, _ = sft_run
    reference, tokenizer = adapter_model(run_dir)
    expected = logits(reference, tokenizer)

    exact = tmp_path / "fp32"
    assert cli.main(["merge", str(run_dir), f"out={exact}", "dtype=float32"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(exact)
    assert not hasattr(merged, "peft_config") and list(exact.glob("*.safetensors"))
    assert (logits(merged, AutoTokenizer.from_pretrained(exact)) - expected).abs().max() < 1e-4
    # the adapter changed the model, so equality above is not trivial
    with reference.disable_adapter():
        assert (logits(reference, tokenizer) - expected).abs().max() > 1e-2

    default = run_dir / "merged"  # bf16 by default, next to the run
    assert cli.main(["merge", str(run_dir)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(default)
    assert merged.dtype == torch.bfloat16
    assert (logits(merged, tokenizer) - expected).abs().max() < 0.05 * expected.abs().max()
    saved = AutoTokenizer.from_pretrained(default)
    assert saved.chat_template == tokenizer.chat_template and saved.eos_token == "<|im_end|>"
    assert merged.generation_config.max_new_tokens == 4 and merged.generation_config.do_sample is False
    assert json.loads((default / "merge_info.json").read_text())["base_reloaded_unquantized"] is False

    capsys.readouterr()
    assert cli.main(["merge", str(run_dir)]) == 2
    assert "never overwritten" in capsys.readouterr().err


def test_chat_one_shot_same_answer_from_run_dir_and_merged_model(sft_run, tmp_path, capsys):
    run_dir, _ = sft_run
    merged = tmp_path / "merged"
    assert cli.main(["merge", str(run_dir), f"out={merged}", "dtype=float32"]) == 0
    capsys.readouterr()
    assert cli.main(["chat", str(run_dir), f"prompt={PROMPT}", "max_new_tokens=8"]) == 0
    from_run = capsys.readouterr().out.strip().splitlines()[-1]
    assert cli.main(["chat", str(merged), f"prompt={PROMPT}", "max_new_tokens=8"]) == 0
    from_merged = capsys.readouterr().out.strip().splitlines()[-1]
    assert from_run and from_run == from_merged


def test_chat_interactive_keeps_history_until_exit(sft_run, monkeypatch, capsys):
    from qlora_recipes import posttrain

    run_dir, _ = sft_run
    turns = iter([PROMPT, "and May 6?", "/reset", "/exit"])
    monkeypatch.setattr("builtins.input", lambda _prompt="": next(turns))
    seen = []
    real_reply = posttrain.reply
    monkeypatch.setattr(
        posttrain, "reply", lambda chat, messages, *a: seen.append(list(messages)) or real_reply(chat, messages, *a)
    )
    assert cli.main(["chat", str(run_dir)]) == 0
    assert [len(m) for m in seen] == [1, 3]  # the second turn sees the first question and answer
    assert capsys.readouterr().out.count("assistant> ") == 2


def test_dpo_margins_rise_and_eval_uses_the_base_as_reference(dpo_run, capsys):
    run_dir, metrics = dpo_run
    pref = metrics["train"]["preference"]
    assert pref["rewards/margins"]["last"] > pref["rewards/margins"]["first"]
    assert pref["rewards/accuracies"]["last"] >= pref["rewards/accuracies"]["first"]
    after = metrics["eval"]["preference_after"]
    assert after["rewards/margins"] > 0 and metrics["eval"]["loss_after"] < math.log(2)

    assert cli.main(["eval", str(run_dir), "samples=2"]) == 0
    result = json.loads((run_dir / "eval.json").read_text())
    # a reference copied from the trained adapter would give margin 0 and loss ln 2
    assert result["after"]["reward_margin"] == pytest.approx(after["rewards/margins"], rel=0.05)
    assert result["before"]["loss"] is None and "reward margin" in (run_dir / "eval.md").read_text()
    assert result["reload_max_abs_logit_diff"] is None  # no probe for DPO runs


def test_merge_of_a_4bit_run_reloads_the_base_unquantized(dpo_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    run_dir, _ = dpo_run
    out = tmp_path / "m"
    assert cli.main(["merge", str(run_dir), f"out={out}", "dtype=float32"]) == 0
    assert "4-bit base; merging into the base reloaded unquantized" in capsys.readouterr().out
    assert json.loads((out / "merge_info.json").read_text())["base_reloaded_unquantized"] is True
    reference, tokenizer = adapter_model(run_dir)
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert (logits(merged, tokenizer) - logits(reference, tokenizer)).abs().max() < 1e-4


def test_full_fine_tuning_run_evaluates_against_its_base(tmp_path_factory):
    run_dir, metrics = train(tmp_path_factory, "full", "lora=none", "quant=none", "trainer.max_steps=10")
    assert cli.main(["eval", str(run_dir), "samples=0"]) == 0
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["before"]["loss"] == pytest.approx(metrics["eval"]["loss_before"], rel=1e-4)
    assert result["after"]["loss"] == pytest.approx(metrics["eval"]["loss_after"], rel=1e-4)
    assert result["reload_max_abs_logit_diff"] < 1e-4
    assert cli.main(["merge", str(run_dir)]) == 2  # nothing to merge: model/ is the trained model


@pytest.mark.parametrize(
    "args, message",
    [
        (["merge", "{run}", "output=x"], "allowed: out=..., dtype=..."),
        (["merge", "{run}", "dtype=int4"], "dtype='int4'"),
        (["eval", "{run}", "samples=few"], "samples='few' must be int"),
        (["eval", "{empty}"], "not a qlora_recipes run dir"),
        (["chat", "{missing}"], "no such run dir"),
        (["eval", "{unfinished}"], "no trained adapter/ or model/ yet"),
    ],
)
def test_post_training_errors_are_one_line(tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    unfinished = tmp_path / "unfinished"
    assert cli.main(["run", "dry_run=true", f"output_dir={unfinished}"]) == 0
    paths = {"run": unfinished, "empty": tmp_path / "empty", "missing": tmp_path / "nope", "unfinished": unfinished}
    capsys.readouterr()
    assert cli.main([a.format(**paths) for a in args]) == 2
    assert message in capsys.readouterr().err


def test_an_incompletely_saved_adapter_is_caught_at_save_and_at_load(sft_run, tmp_path, capsys):
    """What FSDP/ZeRO-3 gathers were seen to do on GPUs (docs/gpu.md): drop LoRA tensors or the embedding."""
    import shutil

    from safetensors.torch import load_file, save_file

    from qlora_recipes.runner import adapter_problems

    run_dir, _ = sft_run
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken, ignore=shutil.ignore_patterns("merged", "checkpoint-*"))
    model, _ = adapter_model(run_dir)
    assert adapter_problems(broken / "adapter", model, resized=False) == []
    weights = broken / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: v for k, v in tensors.items() if "layers.1." not in k}, weights)
    problems = adapter_problems(broken / "adapter", model, resized=True)
    assert problems[0].startswith("14 of 28 LoRA tensors are missing") and "holds no embedding" in problems[1]
    capsys.readouterr()
    assert cli.main(["eval", str(broken)]) == 2
    assert "lacks weights the adapter config names" in capsys.readouterr().err


def test_a_run_whose_adapter_saved_incompletely_fails_after_recording_it(tmp_path, monkeypatch, capsys):
    from qlora_recipes import runner

    monkeypatch.setattr(runner, "adapter_problems", lambda out, model, resized: ["2 of 28 LoRA tensors are missing"])
    run_dir = tmp_path / "run"
    assert cli.main(["run", *TINY_TRAIN, "trainer.max_steps=2", f"output_dir={run_dir}"]) == 2
    assert "the saved adapter is incomplete: 2 of 28 LoRA tensors are missing" in capsys.readouterr().err
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["saved_incomplete"] == ["2 of 28 LoRA tensors are missing"]
    assert (run_dir / "checkpoint-2").is_dir()  # the trained state is kept


def test_orpo_trains_on_pairs_without_a_reference_and_eval_measures_the_base_too(orpo_run, capsys):
    run_dir, metrics = orpo_run
    e = metrics["eval"]
    assert e["loss_after"] < e["loss_before"]  # the chosen answers' loss plus the odds-ratio term
    before, after = e["preference_before"], e["preference_after"]
    assert after["rewards/accuracies"] >= before["rewards/accuracies"]
    assert after["rewards/margins"] > before["rewards/margins"]
    assert cli.main(["eval", str(run_dir), "samples=2"]) == 0
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["trainer"] == "orpo" and result["before"]["loss"] == pytest.approx(e["loss_before"], rel=1e-4)
    assert result["after"]["reward_margin"] == pytest.approx(after["rewards/margins"], rel=1e-3)
    assert "ORPO: eval loss" in (run_dir / "eval.md").read_text()
