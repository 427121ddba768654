"""Bad input stops early with one message and exit code 2; secrets stay out of the run dir."""

import json

import pytest

from qlora_recipes import cli

TINY = [
    "model=tiny_llama",
    "template.add_tokens=false",
    "lora.last_n_layers=null",
    "trainer.max_steps=2",
    "trainer.task_eval_samples=0",
    "trainer.eval_before_train=false",
    "logger=none",
]


def run_fails(capsys, *args):
    assert cli.main(["run", *args]) == 2
    err = capsys.readouterr().err
    assert "\nerror: " in "\n" + err and "Traceback" not in err
    return err


def test_missing_model_dir(capsys, tmp_path):
    err = run_fails(
        capsys, "model.source=hub_or_path", f"model.name_or_path={tmp_path}/nope", f"output_dir={tmp_path}/run"
    )
    assert "no such directory" in err and not (tmp_path / "run").exists()
    err = run_fails(capsys, f"model.name_or_path={tmp_path}/nope")
    assert "add model.source=hub_or_path" in err


def test_model_dir_that_is_not_a_causal_lm(capsys, tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"]}))
    err = run_fails(capsys, "model=llama2_7b_chat", f"model.name_or_path={tmp_path}/bert", f"output_dir={tmp_path}/r")
    assert "BertForMaskedLM, not a causal language model" in err


def test_data_errors_come_before_the_weights_load(capsys, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"messages": []}\n{"messages": [}\n')
    err = run_fails(capsys, *TINY, f"data.name={tmp_path}/data", "data.splits=[train]", f"output_dir={tmp_path}/r")
    assert "train.jsonl:2: not valid JSON" in err
    log = (tmp_path / "r" / "run.log").read_text()
    assert "qlora_recipes.data" in log or "qlora_recipes" not in log  # our loggers wrote here, if anything
    assert "qlora_recipes: loading" not in log


def test_wrong_columns(capsys, tmp_path):
    (tmp_path / "train.jsonl").write_text('{"question": "a", "answer": "b"}\n')
    err = run_fails(capsys, *TINY, "data.format=auto", f"data.name={tmp_path}/train.jsonl", f"output_dir={tmp_path}/r")
    assert "['answer', 'question']" in err and "Set data.format" in err


def test_hub_token_never_reaches_the_run_dir(tmp_path, monkeypatch):
    secret = "hf_SECRETtoken1234567890"
    monkeypatch.setenv("HF_TOKEN", secret)
    run_dir = tmp_path / "run"
    assert cli.main(["run", *TINY, "quant=none", "data.max_train_samples=16", f"output_dir={run_dir}"]) == 0
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


@pytest.mark.parametrize("value", ["lora.r=-1", "lora.dropout=1", "trainer.learning_rate=0"])
def test_out_of_range_values(capsys, value):
    assert value.split("=")[0] in run_fails(capsys, value)
