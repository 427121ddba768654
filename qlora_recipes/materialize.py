"""Materialize: plan dicts -> library objects (BitsAndBytesConfig, peft.LoraConfig, trl.SFTConfig/DPOConfig/ORPOConfig).

The one thin step that imports torch/transformers/peft/trl; every decision was made in `plan.py`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_recipes import attention, plan
from qlora_recipes.errors import RecipeError
from qlora_recipes.resolve import Resolved
from qlora_recipes.schema import RecipeConfig, TrainerKind


def torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


def bnb_config(kwargs: dict[str, Any] | None) -> Any:
    if kwargs is None:
        return None
    from transformers import BitsAndBytesConfig

    converted = {
        key: torch_dtype(value) if key in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage") else value
        for key, value in kwargs.items()
    }
    return BitsAndBytesConfig(**converted)


def lora_config(kwargs: dict[str, Any] | None) -> Any:
    if kwargs is None:
        return None
    from peft import LoraConfig

    try:
        return LoraConfig(**kwargs)
    except ValueError as exc:
        raise RecipeError(f"lora settings rejected by peft: {exc}") from None


def trainer_config(recipe: RecipeConfig, kwargs: dict[str, Any]) -> Any:
    """SFTConfig, DPOConfig or ORPOConfig, as the recipe's trainer.kind says."""
    import trl

    if recipe.trainer.kind is TrainerKind.orpo:
        from trl.experimental.orpo import ORPOConfig as config_class
    else:
        config_class = trl.DPOConfig if recipe.trainer.kind is TrainerKind.dpo else trl.SFTConfig
    try:
        return config_class(**kwargs)
    except ValueError as exc:
        raise RecipeError(f"trainer settings rejected by TRL/transformers: {exc}") from None


def from_pretrained_kwargs(resolved: Resolved) -> dict[str, Any]:
    kwargs = plan.model_kwargs(resolved.recipe)
    kwargs["dtype"] = torch_dtype(kwargs["dtype"])
    if kwargs["attn_implementation"] == attention.NAME:
        attention.register()  # transformers accepts only registered names
    quant = bnb_config(plan.bnb_kwargs(resolved.recipe))
    if quant is not None:
        kwargs["quantization_config"] = quant
        if resolved.device.kind == "cuda" and plan.loads_on_own_gpu(resolved.recipe):
            # a whole copy per process, on its own GPU; FSDP v1/ZeRO-3 load on CPU/meta and shard themselves
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    return kwargs


@dataclass
class Materialized:
    model_kwargs: dict[str, Any]
    lora: Any
    trainer: Any  # SFTConfig, DPOConfig or ORPOConfig


def materialize(
    resolved: Resolved,
    output_dir: str | Path,
    facts: plan.ModelFacts | None = None,
    new_token_ids: list[int] | tuple[int, ...] = (),
) -> Materialized:
    recipe = resolved.recipe
    return Materialized(
        model_kwargs=from_pretrained_kwargs(resolved),
        lora=lora_config(plan.lora_kwargs(recipe, facts, new_token_ids)),
        trainer=trainer_config(recipe, plan.trainer_kwargs(recipe, output_dir, on_cpu=resolved.device.kind == "cpu")),
    )
