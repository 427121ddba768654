import json

import pytest

from qlora_recipes import data as data_mod
from qlora_recipes.errors import DataError
from qlora_recipes.runner import setup_tokenizer
from qlora_recipes.schema import DataFormat, TrainerKind

TINY = ("model=tiny_llama", "template.add_tokens=false", "data.format=auto")
CHAT = [{"role": "user", "content": "Give 5 May 2020 in ISO format."}, {"role": "assistant", "content": "2020-05-05"}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def setup(recipe_of, tiny_checkpoint):
    def make(*overrides):
        recipe = recipe_of(*TINY, *overrides).recipe
        tokenizer, _ = setup_tokenizer(recipe, tiny_checkpoint)
        return recipe, tokenizer

    return make


@pytest.mark.parametrize(
    "columns, expected",
    [
        (["messages"], DataFormat.messages),
        (["prompt", "completion"], DataFormat.prompt_completion),
        (["instruction", "input", "output"], DataFormat.alpaca),
        (["content"], DataFormat.text),
    ],
)
def test_detect_format(recipe_of, columns, expected):
    assert data_mod.detect_format(columns, recipe_of("data.format=auto").recipe.data) is expected


def test_detect_format_errors(recipe_of):
    data = recipe_of("data.format=auto").recipe.data
    with pytest.raises(DataError, match="preference data .* Use trainer=dpo or trainer=orpo"):
        data_mod.detect_format(["prompt", "chosen", "rejected"], data)
    with pytest.raises(DataError, match=r"columns \['foo'\]"):
        data_mod.detect_format(["foo"], data)
    explicit = recipe_of("data.format=alpaca").recipe.data
    with pytest.raises(DataError, match="needs instruction and output"):
        data_mod.detect_format(["messages"], explicit)


def test_assistant_only_loss_masks_everything_but_the_answer(setup):
    recipe, tok = setup("trainer.loss_on=assistant")
    text, spans = data_mod.render({"messages": CHAT}, DataFormat.messages, recipe.data, tok)
    assert (
        text
        == "<|im_start|>user\nGive 5 May 2020 in ISO format.<|im_end|>\n<|im_start|>assistant\n2020-05-05<|im_end|>\n"
    )
    row = data_mod.tokenize_row(text, spans, tok, recipe)
    learned = tok.decode([t for t in row["labels"] if t != -100])
    assert learned == "2020-05-05<|im_end|>\n"
    assert len(row["labels"]) == len(row["input_ids"])


def test_loss_on_all_trains_every_token(setup):
    recipe, tok = setup("trainer.loss_on=all")
    text, spans = data_mod.render({"messages": CHAT}, DataFormat.messages, recipe.data, tok)
    row = data_mod.tokenize_row(text, spans, tok, recipe)
    assert row["labels"] == row["input_ids"]


def test_multi_turn_masks_each_assistant_turn(setup):
    recipe, tok = setup("trainer.loss_on=assistant")
    chat = CHAT + [{"role": "user", "content": "And 6 May?"}, {"role": "assistant", "content": "2020-05-06"}]
    text, spans = data_mod.render({"messages": chat}, DataFormat.messages, recipe.data, tok)
    row = data_mod.tokenize_row(text, spans, tok, recipe)
    assert tok.decode([t for t in row["labels"] if t != -100]) == "2020-05-05<|im_end|>\n2020-05-06<|im_end|>\n"


def test_prompt_completion_and_alpaca(setup):
    recipe, tok = setup("trainer.loss_on=assistant")
    text, spans = data_mod.render(
        {"prompt": "Q: 1+1=", "completion": " 2"}, DataFormat.prompt_completion, recipe.data, tok
    )
    assert text == "Q: 1+1= 2" and spans == [(7, 9)]
    text, _ = data_mod.render(
        {"instruction": "Add", "input": "1 and 1", "output": "2"}, DataFormat.alpaca, recipe.data, tok
    )
    assert text == "<|im_start|>user\nAdd\n\n1 and 1<|im_end|>\n<|im_start|>assistant\n2<|im_end|>\n"


def test_append_concat_token_and_add_special_tokens(setup):
    recipe, tok = setup("data.append_concat_token=true", "data.format=text", "trainer.loss_on=all")
    row = data_mod.tokenize_row("hello", [], tok, recipe)
    assert row["input_ids"][-1] == tok.eos_token_id and row["labels"][-1] == tok.eos_token_id
    recipe_off, _ = setup("data.format=text", "trainer.loss_on=all")
    assert data_mod.tokenize_row("hello", [], tok, recipe_off)["input_ids"][-1] != tok.eos_token_id
    # add_special_tokens is handed to the tokenizer (the tiny one has no BOS post-processor: same ids)
    recipe_sp, _ = setup("data.add_special_tokens=true", "data.format=text", "trainer.loss_on=all")
    assert (
        data_mod.tokenize_row("hello", [], tok, recipe_sp)["input_ids"]
        == tok("hello", add_special_tokens=True)["input_ids"]
    )


def test_long_samples_are_counted_and_truncated(setup, tmp_path, caplog):
    long_chat = [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "ok"}]
    write_jsonl(tmp_path / "train.jsonl", [{"messages": CHAT}, {"messages": long_chat}])
    _, tok = setup()
    limit = len(tok.apply_chat_template(CHAT, tokenize=True)["input_ids"]) + 2
    recipe, tok = setup(
        f"data.name={tmp_path}", f"trainer.max_seq_len={limit}", "data.splits=[train]", "trainer.loss_on=all"
    )
    prepared = data_mod.prepare(recipe, tok)
    assert prepared.stats["train"]["truncated"] == 1
    assert sorted(len(r) for r in prepared.train["input_ids"])[-1] == limit
    assert f"1 of 2 train samples are longer than max_seq_len={limit}" in caplog.text


def test_malformed_jsonl_names_file_and_line(setup, tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"messages": CHAT}) + "\n{not json\n")
    recipe, tok = setup(f"data.name={tmp_path}", "data.splits=[train]")
    with pytest.raises(DataError, match=r"train.jsonl:2: not valid JSON"):
        data_mod.prepare(recipe, tok)


@pytest.mark.parametrize(
    "layout, message",
    [("empty_file", "is empty"), ("missing_split", "split 'test' not found"), ("no_dir", "no such file")],
)
def test_missing_or_empty_data(setup, tmp_path, layout, message):
    name = tmp_path
    if layout == "empty_file":
        (tmp_path / "train.jsonl").write_text("")
    elif layout == "missing_split":
        write_jsonl(tmp_path / "train.jsonl", [{"messages": CHAT}])
    else:
        name = tmp_path / "nope"
    recipe, tok = setup(f"data.name={name}")
    with pytest.raises(DataError, match=message):
        data_mod.prepare(recipe, tok)


def test_save_to_disk_splits_and_held_out_fraction(setup, tmp_path):
    import datasets

    for split, count in (("train", 10), ("test", 3)):
        datasets.Dataset.from_list([{"messages": CHAT}] * count).save_to_disk(str(tmp_path / split))
    recipe, tok = setup(f"data.name={tmp_path}")
    prepared = data_mod.prepare(recipe, tok)
    assert (len(prepared.train), len(prepared.eval)) == (10, 3)

    recipe, tok = setup(f"data.name={tmp_path}", "data.splits=[train]", "data.test_fraction=0.2")
    prepared = data_mod.prepare(recipe, tok)
    assert (len(prepared.train), len(prepared.eval)) == (8, 2)


@pytest.mark.parametrize("suffix", ["json", "parquet", "csv"])
def test_file_formats(setup, tmp_path, suffix):
    import datasets

    rows = [{"prompt": f"Q{i}:", "completion": " A"} for i in range(4)]
    path = tmp_path / f"data.{suffix}"
    getattr(datasets.Dataset.from_list(rows), f"to_{suffix}")(str(path))
    recipe, tok = setup(f"data.name={path}", "data.test_fraction=0.5", "trainer.loss_on=assistant")
    prepared = data_mod.prepare(recipe, tok)
    assert prepared.format is DataFormat.prompt_completion
    assert len(prepared.train) == 2 and len(prepared.eval) == 2


def test_demo_data_task_examples(setup):
    recipe, tok = setup()
    prepared = data_mod.prepare(recipe, tok)
    examples = data_mod.task_examples(prepared, recipe.data, 5)
    assert len(examples) == 5
    prompt, reference = examples[0]
    assert prompt[-1]["role"] == "user" and len(reference) == 10 and reference[4] == "-"


def test_dpo_takes_preference_rows_only(recipe_of):
    data = recipe_of("data.format=auto").recipe.data
    assert data_mod.detect_format(["prompt", "chosen", "rejected"], data, TrainerKind.dpo) is DataFormat.preference
    with pytest.raises(DataError, match="trainer=dpo needs preference rows.*SFT-shaped rows"):
        data_mod.detect_format(["messages"], data, TrainerKind.dpo)
    with pytest.raises(DataError, match="without a prompt column"):
        data_mod.detect_format(["chosen", "rejected"], data, TrainerKind.dpo)
    with pytest.raises(DataError, match="trainer=orpo needs preference rows.*SFT-shaped rows"):
        data_mod.detect_format(["messages"], data, TrainerKind.orpo)


def test_sft_data_set_with_dpo_fails_before_weights_load(setup):
    recipe, tok = setup("trainer=dpo", "trainer.packing=false")  # demo_dates: messages rows
    with pytest.raises(DataError, match="trainer=dpo needs preference rows"):
        data_mod.prepare(recipe, tok)


def test_preference_pairs_plain_and_conversational(setup, tmp_path):
    plain = [{"prompt": "Give 5 May 2020 in ISO.", "chosen": "2020-05-05", "rejected": "2020-5-5"}] * 3
    write_jsonl(tmp_path / "train.jsonl", plain)
    recipe, tok = setup("data=demo_dates_pref", "trainer=dpo", f"data.name={tmp_path}", "data.splits=[train]")
    prepared = data_mod.prepare(recipe, tok)
    assert prepared.format is DataFormat.preference and len(prepared.train) == 3
    assert prepared.stats["train"] == {"pairs": 3, "dropped_too_long": 0, "conversational": False}

    recipe, tok = setup("+recipe=smollm2_dpo", "model=tiny_llama", "trainer.max_completion_len=10")
    prepared = data_mod.prepare(recipe, tok)  # the bundled set: conversational, dates kept as strings
    stats = prepared.stats["train"]
    assert stats["conversational"] and stats["dropped_too_long"] > 0 and stats["pairs"] > 0
    assert all(isinstance(row["chosen"][0]["content"], str) for row in prepared.train)
    examples = data_mod.task_examples(prepared, recipe.data, 2)
    assert examples[0][0][-1]["role"] == "user" and examples[0][1] == prepared.raw_eval[0]["chosen"][0]["content"]


def test_mixed_preference_row_shapes_are_rejected(setup, tmp_path):
    rows = [
        {"prompt": "a", "chosen": "b", "rejected": "c"},
        {"prompt": [{"role": "user", "content": "a"}], "chosen": "b", "rejected": "c"},
    ]
    write_jsonl(tmp_path / "train.jsonl", rows)
    recipe, tok = setup("trainer=dpo", "data.format=preference", f"data.name={tmp_path}", "data.splits=[train]")
    with pytest.raises(DataError, match="row 1"):
        data_mod.prepare(recipe, tok)


def test_json_strings_that_look_like_dates_stay_strings(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "assistant", "content": "2049-08-04"}]}] * 2)
    loaded = data_mod._load_file(path, disable_cache=True)
    assert loaded[0]["messages"][0]["content"] == "2049-08-04"
