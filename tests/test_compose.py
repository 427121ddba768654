import subprocess
import sys

import pytest

from qlora_recipes.compose import compose, recipe_files, with_default_recipe
from qlora_recipes.errors import RecipeError
from qlora_recipes.resolve import Device, resolve

GPU = Device(kind="cuda", count=1, bf16=True)


@pytest.mark.parametrize("name", sorted(recipe_files()))
@pytest.mark.parametrize("device", [Device(), GPU], ids=["cpu", "gpu"])
def test_every_recipe_composes_resolves_and_materializes(name, device, tmp_path):
    from qlora_recipes import plan
    from qlora_recipes.materialize import bnb_config, lora_config, materialize

    cfg, choices = compose([f"+recipe={name}"])
    assert choices["recipe"] == name
    resolved = resolve(cfg, device)
    recipe = resolved.recipe
    assert recipe.name == name and recipe.description
    if device.kind == "cpu":  # SFTConfig refuses bf16 without a GPU, so the full build runs for CPU only
        built = materialize(resolved, tmp_path)
        assert built.trainer.output_dir == str(tmp_path)
    quant = bnb_config(plan.bnb_kwargs(recipe))
    assert (quant is None) == (not (recipe.quant.load_in_4bit or recipe.quant.load_in_8bit))
    assert (lora_config(plan.lora_kwargs(recipe)) is None) == (not recipe.lora.enabled)


def test_default_recipe_is_used_without_one():
    assert with_default_recipe(["lora.r=4"]) == ["+recipe=smollm2_chatml", "lora.r=4"]
    assert with_default_recipe(["+recipe=x"]) == ["+recipe=x"]


@pytest.mark.parametrize(
    "override, expected",
    [
        ("lora.rr=3", ["lora.rr", "Did you mean lora.r?", "Valid keys of lora"]),
        ("+lora.rr=3", ["lora.rr", "Did you mean lora.r?"]),
        ("+trainer.learnig_rate=1", ["trainer.learnig_rate", "learning_rate"]),
        ("+bench.stepz=3", ["bench.stepz", "Did you mean bench.steps?"]),
        ("bench.stepz=3", ["bench.stepz", "Did you mean bench.steps?"]),
        ("sed=3", ["'sed'", "seed"]),
        ("quant=bogus", ["quant/bogus", "nf4", "fp4", "int8", "none"]),
        ("lora.r=abc", ["lora.r", "abc", "Integer"]),
        ("trainer.lr_scheduler=cosin", ["trainer.lr_scheduler", "cosine", "linear"]),
        ("model.dtype=bf16", ["model.dtype", "bfloat16"]),
        ("+recipe=nope", ["recipe/nope", "smollm2_chatml"]),
    ],
)
def test_compose_errors_name_the_key_and_the_choices(override, expected):
    overrides = [override] if override.startswith("+recipe") else with_default_recipe([override])
    with pytest.raises(RecipeError) as info:
        compose(overrides)
    for text in expected:
        assert text in str(info.value)


def test_user_recipe_directory(tmp_path, monkeypatch):
    (tmp_path / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /quant: none\nname: mine\ndescription: my recipe\nlora:\n  r: 4\n"
    )
    monkeypatch.setenv("QLORA_RECIPES_PATH", str(tmp_path))
    cfg, choices = compose(["+recipe=mine"])
    recipe = resolve(cfg, Device()).recipe
    assert (choices["quant"], recipe.lora.r, recipe.quant.load_in_4bit) == ("none", 4, False)


def test_missing_user_recipe_directory_is_an_error(monkeypatch):
    monkeypatch.setenv("QLORA_RECIPES_PATH", "/nonexistent/recipes")
    with pytest.raises(RecipeError, match="QLORA_RECIPES_PATH"):
        compose(["+recipe=smollm2_chatml"])


def test_compose_imports_no_training_library():
    code = (
        "import sys; from qlora_recipes.compose import compose; from qlora_recipes.resolve import resolve, Device;"
        "from qlora_recipes import plan;"
        "cfg, _ = compose(['+recipe=smollm2_chatml']); r = resolve(cfg, Device()).recipe;"
        "plan.sft_kwargs(r, 'x'); plan.lora_kwargs(r); plan.bnb_kwargs(r);"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'trl') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(
    "text, message", [("lora:\n  r: [4\n", "cannot be read"), ("- just\n- a list\n", "holds a ListConfig")]
)
def test_a_broken_user_recipe_is_named_not_a_traceback(tmp_path, monkeypatch, capsys, text, message):
    from qlora_recipes import cli

    (tmp_path / "broken.yaml").write_text(text)
    monkeypatch.setenv("QLORA_RECIPES_PATH", str(tmp_path))
    with pytest.raises(RecipeError, match=f"{tmp_path / 'broken.yaml'} {message}"):
        compose(["+recipe=smollm2_chatml"])
    assert cli.main(["ls"]) != 0
    err = capsys.readouterr().err
    assert "broken.yaml" in err and "Traceback" not in err
