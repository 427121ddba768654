"""Compose: argv overrides -> one DictConfig, through Hydra, with the schema and the recipes registered.

Recipes are YAML deltas in the top-level `recipes/` folder (shipped inside the package when installed)
and in any folder named by the QLORA_RECIPES_PATH environment variable (os.pathsep-separated). Each
is stored in a `recipe` group of Hydra's ConfigStore with package `_global_`, so `+recipe=NAME` selects
one and `defaults: [override /quant: nf4]` inside it works. No torch import here.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import fields, is_dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from qlora_recipes.errors import RecipeError
from qlora_recipes.schema import GROUPS, RecipeConfig, register_schema

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_RECIPE = "smollm2_chatml"
RECIPES_PATH_ENV = "QLORA_RECIPES_PATH"


def _shipped(folder: str) -> Path:
    """A folder that lives at the repo's top level and inside the package once installed."""
    for candidate in (PACKAGE_DIR / folder, PACKAGE_DIR.parent / folder):
        if candidate.is_dir():
            return candidate
    raise RecipeError(f"the {folder}/ folder of qlora_recipes is missing (looked in {PACKAGE_DIR} and its parent)")


def conf_dir() -> Path:
    return _shipped("conf")


def recipe_dirs() -> list[Path]:
    """Shipped recipes first, then the user's folders from QLORA_RECIPES_PATH (later ones win on a name clash)."""
    dirs = [_shipped("recipes")]
    for entry in os.environ.get(RECIPES_PATH_ENV, "").split(os.pathsep):
        if entry:
            path = Path(entry).expanduser().resolve()
            if not path.is_dir():
                raise RecipeError(f"{RECIPES_PATH_ENV} names {entry!r}, which is not a directory")
            dirs.append(path)
    return dirs


def recipe_files() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder in recipe_dirs():
        for path in sorted(folder.glob("*.yaml")):
            found[path.stem] = path
    return found


def load_recipe(path: Path) -> DictConfig:
    """One recipe file, or a RecipeError naming it (a broken file in a QLORA_RECIPES_PATH folder would otherwise stop
    every command with a parser traceback)."""
    try:
        node = OmegaConf.load(path)
    except Exception as exc:  # yaml's scanner/parser errors, and OmegaConf's for unsupported values
        raise RecipeError(f"recipe file {path} cannot be read: {' '.join(str(exc).split())}") from None
    if not isinstance(node, DictConfig):
        raise RecipeError(f"recipe file {path} holds a {type(node).__name__}, not a mapping of groups and keys")
    return node


def recipe_description(path: Path) -> str:
    cfg = load_recipe(path)
    return str(cfg.get("description", "")).strip() or "(no description)"


def _pkg_path(relative: str) -> str:
    return str(PACKAGE_DIR / relative)


def register() -> None:
    """Idempotent start-up: resolvers, the schema and every recipe into Hydra's ConfigStore."""
    from hydra.core.config_store import ConfigStore

    if not OmegaConf.has_resolver("pkg"):
        OmegaConf.register_new_resolver("pkg", _pkg_path)
    if not OmegaConf.has_resolver("now"):
        import hydra.core.utils  # noqa: F401  (registers ${now:...})
    cs = ConfigStore.instance()
    register_schema(cs)
    for name, path in recipe_files().items():
        node = load_recipe(path)
        cs.store(group="recipe", name=name, node=node, package="_global_")


def with_default_recipe(overrides: list[str]) -> list[str]:
    """`run`/`show`/`validate` without +recipe=... mean the default recipe."""
    if any(re.match(r"^\+?recipe=", o) for o in overrides):
        return list(overrides)
    return [f"+recipe={DEFAULT_RECIPE}", *overrides]


def compose(overrides: list[str]) -> tuple[DictConfig, dict[str, str]]:
    """Hydra compose with readable errors: the key, the bad value and what is allowed.
    Returns the config and which option each group (and `recipe`) took."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    except RecipeError:
        raise
    except Exception as exc:  # Hydra/OmegaConf raise many types; all are user input errors here
        raise RecipeError(explain_compose_error(exc)) from None
    choices = {k: str(v) for k, v in cfg.hydra.runtime.choices.items() if not k.startswith("hydra/")}
    with open_dict(cfg):
        del cfg["hydra"]
    reject_unknown_keys(cfg)
    return cfg, choices


def reject_unknown_keys(cfg: DictConfig) -> None:
    """`+group.key=...` appends even to typed nodes; a key the schema lacks would be silently dropped."""
    problems = []
    top = {f.name for f in fields(RecipeConfig)}
    for key in cfg:
        if key not in top:
            problems.append(explain_unknown(str(key)))
        elif key in GROUPS:
            valid = {f.name for f in fields(GROUPS[key])}
            problems += [explain_unknown(f"{key}.{sub}") for sub in cfg[key] if sub not in valid]
    if problems:
        raise RecipeError("\n".join(problems))


def explain_unknown(key: str) -> str:
    known = _schema_keys(key)
    if known is None:
        return f"Unknown key '{key}'."
    parent, keys = known
    close = difflib.get_close_matches(key.split(".")[-1], keys, n=1)
    prefix = "" if parent == "<top level>" else f"{parent}."
    hint = f" Did you mean {prefix}{close[0]}?" if close else ""
    return f"Unknown key '{key}'.{hint} Valid keys of {parent}: {', '.join(keys)}."


def _schema_keys(dotted: str) -> tuple[str, list[str]] | None:
    """The config node that should hold `dotted` and its valid keys, from the schema."""
    parts = dotted.lstrip("+~").split("=", 1)[0].split(".")
    node: type = RecipeConfig
    for depth, part in enumerate(parts[:-1]):
        typed = {f.name: f.type for f in fields(node)}
        target = GROUPS.get(part) if depth == 0 else None
        if target is None or part not in typed:
            return None
        node = target
    if not is_dataclass(node):
        return None
    parent = ".".join(parts[:-1]) or "<top level>"
    return parent, [f.name for f in fields(node)]


def explain_compose_error(exc: Exception) -> str:
    message = "\n".join(
        line for line in str(exc).strip().splitlines() if not line.startswith("To append to your config")
    )
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause).strip() and str(cause).strip() not in message:
        message = f"{message}\n{str(cause).strip()}"
    key_match = re.search(r"full_key: ([\w.\[\]]+)", message) or re.search(r"override '([\w.]+)'", message)
    lines = [message]
    if key_match and ("not in" in message or "Could not override" in message):
        lines.append(explain_unknown(key_match.group(1)))
    return "\n".join(lines)
