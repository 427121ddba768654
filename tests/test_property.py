"""Random override sets give a valid recipe or a RecipeError message, never any other exception."""

from enum import Enum
from typing import get_type_hints

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qlora_recipes.compose import compose, with_default_recipe
from qlora_recipes.errors import RecipeError
from qlora_recipes.resolve import Device, resolve
from qlora_recipes.schema import GROUPS

OPTIONS = {
    "model": ["smollm2_135m", "tiny_llama", "llama2_7b_chat", "nope"],
    "quant": ["none", "nf4", "fp4", "int8", "bogus"],
    "lora": ["default", "none", "x"],
    "template": ["chatml", "zephyr", "tokenizer", "y"],
    "data": ["demo_dates", "ultrachat", "z"],
}
KEYS = [(group, name, kind) for group, cls in GROUPS.items() for name, kind in get_type_hints(cls).items()]
VALUES = st.one_of(
    st.integers(-5, 5000).map(str),
    st.floats(-2, 2, allow_nan=False).map(lambda v: f"{v:.3g}"),
    st.sampled_from(
        [
            "true",
            "false",
            "null",
            "abc",
            "''",
            "[]",
            "[q_proj,v_proj]",
            "auto",
            "bfloat16",
            "nf4",
            "cosine",
            "assistant",
            "steps",
            "fp16",
            "1e-4",
            "[all-linear]",
            "${model.dtype}",
            "${nope}",
        ]
    ),
)


def enum_values(kind):
    return [m.value for m in kind] if isinstance(kind, type) and issubclass(kind, Enum) else []


@st.composite
def override_sets(draw):
    overrides = []
    for group, options in OPTIONS.items():
        if draw(st.booleans()):
            overrides.append(f"{group}={draw(st.sampled_from(options))}")
    for group, name, kind in draw(st.lists(st.sampled_from(KEYS), max_size=6)):
        choices = enum_values(kind)
        value = draw(st.sampled_from(choices) if choices and draw(st.booleans()) else VALUES)
        overrides.append(f"{group}.{name}={value}")
    if draw(st.integers(0, 9)) == 0:
        overrides.append(draw(st.sampled_from(["+lora.rr=3", "+foo=1", "seeds=2", "+trainer.lr=1"])))
    return overrides


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(overrides=override_sets(), gpu=st.booleans())
def test_random_overrides_resolve_or_explain(overrides, gpu):
    device = Device("cuda", 1, True) if gpu else Device()
    try:
        cfg, _ = compose(with_default_recipe(overrides))
        resolved = resolve(cfg, device)
    except RecipeError as exc:
        assert str(exc).strip()
        return
    recipe = resolved.recipe
    assert recipe.lora.r > 0 and 0 <= recipe.lora.dropout < 1 and recipe.trainer.learning_rate > 0
