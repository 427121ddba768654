"""Saving an adapter from a sharded model: what runner.save_adapter and adapter_problems guard against.

The gathers themselves need GPUs (scripts/gpu_dist_smoke.sh, docs/gpu.md); the module-tree spelling that made
FSDP v1 adapters empty, and the checks of a written adapter, are tested here on the tiny model."""

import torch
from safetensors.torch import load_file, save_file

from qlora_recipes import models, runner


class FsdpLikeWrapper(torch.nn.Module):
    """What FSDP v1 puts around a wrapped unit: its module names gain `_fsdp_wrapped_module.`."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self._fsdp_wrapped_module = inner


def tiny_peft_model():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(models.tiny_checkpoint())
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    return model


def lora_keys(path):
    return {key for key in load_file(str(path / "adapter_model.safetensors")) if "lora_" in key}


def test_an_adapter_saves_whole_from_a_module_tree_with_wrapper_names(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = tiny_peft_model()
    gathered = {key: value.clone() for key, value in model.state_dict().items()}  # plain keys, as FSDP gathers
    layers = model.base_model.model.model.layers
    layers[0] = FsdpLikeWrapper(layers[0])
    assert any("_fsdp_wrapped_module." in name for name, _ in model.named_modules())

    model.save_pretrained(str(tmp_path / "peft_alone"), state_dict=gathered)  # PEFT by itself: layer 0 is lost
    assert len(lora_keys(tmp_path / "peft_alone")) == 14

    runner.save_adapter(model, gathered, tmp_path / "adapter", resized=False)
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert len(lora_keys(tmp_path / "adapter")) == 28 and not any("_fsdp" in key for key in saved)
    assert runner.adapter_problems(tmp_path / "adapter", model, resized=False) == []

    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(models.tiny_checkpoint()), tmp_path / "adapter"
    )
    expected = {k: v for k, v in gathered.items() if "lora_" in k}
    for key, value in expected.items():
        assert torch.equal(reloaded.state_dict()[key], value), key


def test_adapter_problems_names_empty_shards_and_an_embedding_saved_only_as_new_rows(tmp_path):
    model = tiny_peft_model()
    out = tmp_path / "adapter"
    model.save_pretrained(str(out))
    weights = out / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    delta = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
    save_file({**tensors, delta: torch.zeros(2, 64)}, str(weights))
    # the trained rows alone: a reload would give the rest of the grown embedding new random rows
    assert runner.adapter_problems(out, model, resized=True) == [
        f"the template added tokens but {weights} holds no embedding: a reload would give the added tokens new "
        "random rows"
    ]
    first = sorted(tensors)[0]
    save_file(
        {**tensors, first: torch.zeros(0), "base_model.model.model.embed_tokens.weight": torch.ones(3, 64)},
        str(weights),
    )
    assert runner.adapter_problems(out, model, resized=True) == [
        f"1 tensors in {weights} are empty (e.g. {first}): shards that were not gathered"
    ]
