"""The run directory: the resolved recipe.yaml that training reads back, checkpoints, outputs.

Layout: recipe.yaml, accelerate_config.yaml, run.log, checkpoint-N/, adapter/ (or model/ for full
fine-tuning), metrics.json, samples.md, tensorboard/.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from qlora_recipes.errors import RecipeError
from qlora_recipes.resolve import Device, Resolved, resolve
from qlora_recipes.schema import RecipeConfig

RECIPE_FILE = "recipe.yaml"
DEVICE_FILE = "device.json"


def recipe_yaml(recipe: RecipeConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(recipe))


def choose_output_dir(recipe: RecipeConfig, explicit: str | None = None) -> Path:
    """An explicit dir is used as given (refused later if it holds a run and no resume is asked);
    the default runs/<name>/<timestamp> gets a suffix rather than ever reusing a dir."""
    chosen = explicit or recipe.output_dir
    if chosen:
        return Path(chosen).expanduser().resolve()
    base = Path("runs") / recipe.name / datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate, n = base, 1
    while candidate.exists():
        candidate = base.with_name(f"{base.name}-{n}")
        n += 1
    return candidate.resolve()


def holds_run(path: Path) -> bool:
    return (path / RECIPE_FILE).is_file() or any(path.glob("checkpoint-*"))


def write(run_dir: Path, resolved: Resolved, files: dict[str, Any]) -> None:
    """Create the run dir with the resolved recipe (and any extra files); never clobber another run."""
    recipe = resolved.recipe
    if holds_run(run_dir) and recipe.resume_from_checkpoint is None:
        raise RecipeError(
            f"{run_dir} already holds a run; it is never overwritten. Continue it with "
            f"resume_from_checkpoint=auto output_dir={run_dir}, or choose another output_dir"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RECIPE_FILE).write_text(recipe_yaml(recipe))
    (run_dir / DEVICE_FILE).write_text(json.dumps(resolved.device.__dict__))
    for name, content in files.items():
        text = content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False)
        (run_dir / name).write_text(text)


def read(run_dir: Path) -> Resolved:
    """The resolved recipe as `run` wrote it: workers never recompose."""
    path = run_dir / RECIPE_FILE
    if not path.is_file():
        raise RecipeError(f"{run_dir} has no {RECIPE_FILE}: not a qlora_recipes run dir")
    cfg = OmegaConf.merge(OmegaConf.structured(RecipeConfig), OmegaConf.load(path))
    device_file = run_dir / DEVICE_FILE
    device = Device(**json.loads(device_file.read_text())) if device_file.is_file() else Device()
    return resolve(cfg, device)  # all `auto`s are already concrete: this only re-validates


def is_complete_checkpoint(path: Path) -> bool:
    """The Trainer writes trainer_state.json after the weights and optimizer: its presence marks a whole one.
    The optimizer state is optimizer.pt (single/DDP), optimizer.bin or a sharded optimizer_0/ (FSDP), or
    DeepSpeed's global_stepN/ folder."""
    optimizer = (
        (path / "optimizer.pt").is_file()
        or (path / "optimizer.bin").is_file()
        or (path / "optimizer_0").is_dir()
        or any(p.is_dir() for p in path.glob("global_step*"))
    )
    return (path / "trainer_state.json").is_file() and optimizer


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = []
    for path in run_dir.glob("checkpoint-*"):
        step = path.name.split("-")[-1]
        if step.isdigit() and is_complete_checkpoint(path):
            found.append((int(step), path))
    return max(found)[1] if found else None


def resume_target(run_dir: Path, setting: str | None) -> str | None:
    if setting is None:
        return None
    if setting == "auto":
        latest = latest_checkpoint(run_dir)
        if latest is None:
            raise RecipeError(f"resume_from_checkpoint=auto: {run_dir} has no complete checkpoint-N to resume")
        return str(latest)
    path = Path(setting).expanduser()
    if not is_complete_checkpoint(path):
        raise RecipeError(
            f"resume_from_checkpoint={setting}: not a complete checkpoint dir (trainer_state.json, optimizer)"
        )
    return str(path)
