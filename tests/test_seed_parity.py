"""llama2_chatml reproduces PEFT examples/sft's command flag for flag; its capabilities train on CPU."""

import pytest
import torch

from qlora_recipes import cli
from qlora_recipes.materialize import materialize
from qlora_recipes.templates import CHATML

# (original flag, object, field, expected value)
GOLDEN = [
    ("--seed 100", "sft", "seed", 100),
    ("--max_seq_len 2048", "sft", "max_length", 2048),
    ("--num_train_epochs 2", "sft", "num_train_epochs", 2),
    ("--logging_steps 5", "sft", "logging_steps", 5),
    ("--log_level info", "sft", "log_level", "info"),
    ("--logging_strategy steps", "sft", "logging_strategy", "steps"),
    ("--evaluation_strategy epoch", "sft", "eval_strategy", "epoch"),
    ("--save_strategy steps", "sft", "save_strategy", "steps"),
    ("--save_steps 100", "sft", "save_steps", 100),
    ("--save_total_limit 10", "sft", "save_total_limit", 10),
    ("--bf16 True", "sft", "bf16", True),
    ("--packing True", "sft", "packing", True),
    ("--learning_rate 1e-4", "sft", "learning_rate", 1e-4),
    ("--lr_scheduler_type cosine", "sft", "lr_scheduler_type", "cosine"),
    ("--weight_decay 1e-4", "sft", "weight_decay", 1e-4),
    ("--warmup_ratio 0.0", "sft", "warmup_steps", 0.0),
    ("--max_grad_norm 1.0", "sft", "max_grad_norm", 1.0),
    ("--per_device_train_batch_size 1", "sft", "per_device_train_batch_size", 1),
    ("--per_device_eval_batch_size 2", "sft", "per_device_eval_batch_size", 2),
    ("--gradient_accumulation_steps 4", "sft", "gradient_accumulation_steps", 4),
    ("--gradient_checkpointing True", "sft", "gradient_checkpointing", True),
    ("--use_reentrant True", "sft", "gradient_checkpointing_kwargs", {"use_reentrant": True}),
    ("--dataset_text_field content", "sft", "dataset_text_field", "content"),
    ("--use_peft_lora True", "lora", "peft_type", "LORA"),
    ("--lora_r 8", "lora", "r", 8),
    ("--lora_alpha 16", "lora", "lora_alpha", 16),
    ("--lora_dropout 0.1", "lora", "lora_dropout", 0.1),
    ("--lora_target_modules all-linear", "lora", "target_modules", "all-linear"),
    ("(original) bias none", "lora", "bias", "none"),
    ("--use_4bit_quantization True", "bnb", "load_in_4bit", True),
    ("(original default) nf4", "bnb", "bnb_4bit_quant_type", "nf4"),
    ("--use_nested_quant True", "bnb", "bnb_4bit_use_double_quant", True),
    ("--bnb_4bit_compute_dtype bfloat16", "bnb", "bnb_4bit_compute_dtype", torch.bfloat16),
    ("--bnb_4bit_quant_storage_dtype bfloat16", "bnb", "bnb_4bit_quant_storage", torch.bfloat16),
    ("(original) torch_dtype = quant storage dtype", "model", "dtype", torch.bfloat16),
    ("--use_flash_attn True (flash-attn not installed here)", "model", "attn_implementation", "sdpa"),
    ("(original forces it on; we do not)", "model", "trust_remote_code", False),
]
RECIPE_LEVEL = [
    ("--chat_template_format chatml", lambda r: (r.template.format.value, r.template.add_tokens), ("chatml", True)),
    ("--add_special_tokens False", lambda r: r.data.add_special_tokens, False),
    ("--append_concat_token False", lambda r: r.data.append_concat_token, False),
    ("--splits train,test", lambda r: list(r.data.splits), ["train", "test"]),
    ("--dataset_name smangrul/ultrachat-10k-chatml", lambda r: r.data.name, "smangrul/ultrachat-10k-chatml"),
    (
        "--model_name_or_path meta-llama/Llama-2-7b-chat-hf",
        lambda r: r.model.name_or_path,
        "meta-llama/Llama-2-7b-chat-hf",
    ),
    ("(original) loss on every token", lambda r: r.trainer.loss_on.value, "all"),
]


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    from qlora_recipes.compose import compose
    from qlora_recipes.resolve import Device, resolve

    cfg, _ = compose(["+recipe=llama2_chatml"])
    resolved = resolve(cfg, Device())
    built = materialize(resolved, tmp_path_factory.mktemp("golden"))
    objects = {
        "sft": built.trainer,
        "lora": built.lora,
        "bnb": built.model_kwargs["quantization_config"],
        "model": built.model_kwargs,
    }
    return resolved.recipe, objects


@pytest.mark.parametrize("flag, obj, field, expected", GOLDEN, ids=[g[0] for g in GOLDEN])
def test_golden_library_fields(golden, flag, obj, field, expected):
    _, objects = golden
    target = objects[obj]
    value = target[field] if isinstance(target, dict) else getattr(target, field)
    if hasattr(value, "value"):  # enums such as PeftType / IntervalStrategy
        value = value.value
    assert value == expected, flag


@pytest.mark.parametrize("flag, get, expected", RECIPE_LEVEL, ids=[r[0] for r in RECIPE_LEVEL])
def test_golden_recipe_fields(golden, flag, get, expected):
    recipe, _ = golden
    assert get(recipe) == expected, flag


def test_show_prints_every_value(capsys):
    assert cli.main(["show", "+recipe=llama2_chatml"]) == 0
    out = capsys.readouterr().out
    for text in (
        "seed: 100",
        "max_seq_len: 2048",
        "packing: true",
        "use_reentrant: true",
        "dropout: 0.1",
        "storage_dtype: bfloat16",
        "weight_decay: 0.0001",
        "smangrul/ultrachat-10k-chatml",
        '"bnb_4bit_use_double_quant": true',
        '"gradient_accumulation_steps": 4',
    ):
        assert text in out, text


def test_llama2_chatml_trains_tiny_model_on_cpu_and_learns_new_token_rows(train_run, tiny_checkpoint):
    """The same code path as on a GPU (4-bit, packing, reentrant checkpointing, added ChatML tokens)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = ["+recipe=llama2_chatml", "model=tiny_llama", "data=demo_dates", "data.max_eval_samples=8"]
    run_dir, metrics = train_run("trainer.max_steps=6", "trainer.learning_rate=1e-2", base=base)
    assert metrics["train"]["steps"] == 6 and metrics["train"]["train_tokens"] > 0

    tokenizer = AutoTokenizer.from_pretrained(run_dir / "adapter")
    assert tokenizer.chat_template == CHATML
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == ("<pad>", "<s>", "<|im_end|>")
    role = tokenizer.convert_tokens_to_ids("<|im_start|>assistant")
    assert tokenizer("<|im_start|>assistant\nhi")["input_ids"][0] == role  # one special token

    weights = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    base_rows = weights["base_model.model.model.embed_tokens.token_adapter.base_layer.weight"]
    assert base_rows.shape[0] % 8 == 0 and base_rows.shape[0] >= len(tokenizer)  # resized, padded to 8
    new_ids = tokenizer.convert_tokens_to_ids(
        ["<pad>", "<s>", "<|im_start|>user", "<|im_start|>assistant", "<|im_start|>system"]
    )
    trained = weights["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    assert not torch.allclose(trained.float(), base_rows[sorted(new_ids)].float())  # the new rows learned

    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    base.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=8)
    model = PeftModel.from_pretrained(base, run_dir / "adapter")
    assert torch.isfinite(model(**tokenizer(["<|im_start|>user\nhi<|im_end|>\n"], return_tensors="pt")).logits).all()


def test_new_token_rows_start_from_the_resized_embedding(recipe_of, tiny_checkpoint):
    """Sanity for the test above: before training, the trainable rows equal the base rows."""
    from qlora_recipes.runner import setup_model, setup_tokenizer

    resolved = recipe_of("+recipe=llama2_chatml", "model=tiny_llama")
    tokenizer, new_ids = setup_tokenizer(resolved.recipe, tiny_checkpoint)
    model = setup_model(resolved, tiny_checkpoint, tokenizer, new_ids)
    state = model.state_dict()
    delta = next(v for k, v in state.items() if "embed_tokens" in k and "trainable_tokens_delta" in k)
    base = next(v for k, v in state.items() if "embed_tokens" in k and k.endswith("base_layer.weight"))
    assert len(new_ids) == 5
    torch.testing.assert_close(delta.float(), base[new_ids].float())


def test_added_tokens_without_packing_train(train_run):
    """The model-loss trainer (wrapped LM head) on padded batches, which carry a mask and no position ids."""
    base = ["+recipe=llama2_chatml", "model=tiny_llama", "data=demo_dates", "data.max_eval_samples=8"]
    _, metrics = train_run("trainer.max_steps=3", "trainer.packing=false", base=base)
    assert metrics["train"]["steps"] == 3 and metrics["train"]["train_tokens"] > 0
