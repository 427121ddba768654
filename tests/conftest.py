"""Offline, CPU-only test setup; tiny models are built in code into a per-session cache."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory):
    """Tiny checkpoints go to a fresh cache per session; slow tests may reuse a warm one via the env var."""
    if "QLORA_RECIPES_CACHE" not in os.environ:
        os.environ["QLORA_RECIPES_CACHE"] = str(tmp_path_factory.mktemp("qlora_cache"))
    yield


@pytest.fixture
def recipe_of():
    """compose + resolve on a chosen device: recipe_of('lora.r=4', device=Device('cuda', 1, True))."""
    from qlora_recipes.compose import compose, with_default_recipe
    from qlora_recipes.resolve import Device, resolve

    def make(*overrides, device=None):
        cfg, _ = compose(with_default_recipe(list(overrides)))
        return resolve(cfg, device or Device())

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint():
    from qlora_recipes.models import tiny_checkpoint as build

    return str(build())
