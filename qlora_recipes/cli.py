"""Command line: `python -m qlora_recipes VERB [hydra overrides]`.

run       compose -> resolve -> write the run dir -> train (or stop there with dry_run=true)
show      the resolved recipe, which option each group took, what `auto` became, the derived values
validate  compose, resolve and build the library objects; loads no weights
ls        the recipes with one line each
train     train the recipe in an existing run dir (what `run` and launched workers call)
bench     tokens/s, MFU and memory per variant on a random-weight model shape (bench.json, bench.md)
eval      a finished run: eval loss/perplexity and base vs trained answers on the test split (eval.md)
merge     a finished run's adapter merged into its base: bf16 safetensors + tokenizer (RUN_DIR/merged)
chat      talk to a run dir or merged model with its chat template (prompt="..." answers once)

Errors a user can cause print as one message and exit with code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from qlora_recipes import plan, rundir
from qlora_recipes.compose import compose, recipe_description, recipe_files, with_default_recipe
from qlora_recipes.errors import Interrupted, LaunchFailed, RecipeError
from qlora_recipes.resolve import Resolved, probe_device, resolve
from qlora_recipes.schema import RecipeConfig

EXIT_USER_ERROR = 2


def resolve_overrides(overrides: list[str]) -> tuple[Resolved, dict[str, str]]:
    cfg, choices = compose(with_default_recipe(overrides))
    return resolve(cfg, probe_device()), choices


def plan_summary(resolved: Resolved, output_dir: str | Path) -> dict[str, Any]:
    recipe = resolved.recipe
    return {
        "from_pretrained": plan.model_kwargs(recipe),
        "BitsAndBytesConfig": plan.bnb_kwargs(recipe),
        "LoraConfig": lora_summary(recipe),
        f"{recipe.trainer.kind.value.upper()}Config": plan.trainer_kwargs(
            recipe, output_dir, on_cpu=resolved.device.kind == "cpu"
        ),
        "accelerate": plan.accelerate_config(recipe, on_cpu=resolved.device.kind == "cpu"),
    }


def lora_summary(recipe: RecipeConfig) -> dict[str, Any] | None:
    """plan.lora_kwargs before the model loads: with lora.last_n_layers, the layer indices and the linear layers'
    names come from the loaded model (runner.adapter_config), so they are said, not guessed."""
    kwargs = plan.lora_kwargs(recipe)
    if kwargs and recipe.lora.last_n_layers is not None:
        kwargs["layers_to_transform"] = f"the last {recipe.lora.last_n_layers} decoder layers (set once loaded)"
        if list(recipe.lora.target_modules) == ["all-linear"]:
            kwargs["target_modules"] = "all-linear (the linear layers' names, read once loaded)"
    return kwargs


def print_notes(resolved: Resolved) -> None:
    recipe = resolved.recipe
    t = recipe.trainer
    print(f"# device: {resolved.device.describe()}")
    for note in resolved.notes:
        print(f"# {note}")
    accumulation = plan.gradient_accumulation_steps(recipe)
    print(
        f"# derived: gradient_accumulation_steps = batch_size {t.batch_size} / "
        f"(micro_batch_size {t.micro_batch_size} x processes {plan.world_size(recipe)}) = {accumulation}"
    )
    if recipe.lora.enabled and recipe.lora.last_n_layers:
        print(f"# derived: LoRA on the last {recipe.lora.last_n_layers} decoder layers (indices set once loaded)")


def cmd_show(overrides: list[str], params: bool) -> None:
    resolved, choices = resolve_overrides(overrides)
    print("# groups: " + ", ".join(f"{group}={option}" for group, option in choices.items()))
    print_notes(resolved)
    print(rundir.recipe_yaml(resolved.recipe), end="")
    print("# plan (library keyword arguments):")
    print(json.dumps(plan_summary(resolved, "<run dir>"), indent=2, default=str))
    if params:
        show_params(resolved)


def show_params(resolved: Resolved) -> None:
    """Loads the model (weights!) to list the trainable parameters exactly as training would."""
    from qlora_recipes import models, runner

    checkpoint = models.checkpoint_dir(resolved.recipe.model)
    tokenizer, new_ids = runner.setup_tokenizer(resolved.recipe, checkpoint)
    model = runner.setup_model(resolved, checkpoint, tokenizer, new_ids)
    report = runner.trainable_report(model)
    print(f"# trainable params: {report['trainable']:,} of {report['total']:,} ({report['percent']:.3f}%)")
    for name, shape, dtype in report["params"]:
        print(f"{name}\t{list(shape)}\t{dtype}")


def cmd_validate(overrides: list[str]) -> None:
    from qlora_recipes.materialize import materialize

    resolved, choices = resolve_overrides(overrides)
    with tempfile.TemporaryDirectory() as tmp:
        built = materialize(resolved, tmp)
    names = [
        type(built.model_kwargs.get("quantization_config")).__name__,
        type(built.lora).__name__,
        type(built.trainer).__name__,
    ]
    print(f"OK: recipe '{resolved.recipe.name}' ({', '.join(f'{g}={o}' for g, o in choices.items())})")
    print(f"    builds {', '.join(n for n in names if n != 'NoneType')} on {resolved.device.describe()}")
    for note in resolved.notes:
        print(f"    {note}")


def cmd_train(run_dir: Path, resume: str | None) -> None:
    """In a worker (launched with RANK set), train; from a shell, start the recipe's workers first, as `run` does."""
    resolved = rundir.read(run_dir.resolve())
    command = plan.launch_command(
        resolved.recipe, run_dir.resolve(), on_cpu=resolved.device.kind == "cpu", python=sys.executable
    )
    if command is not None and "RANK" not in os.environ:
        launch(command + (["--resume", resume] if resume else []), run_dir.resolve())
        return
    from qlora_recipes.runner import train

    train(run_dir, resume=resume)


def cmd_ls() -> None:
    files = recipe_files()
    width = max(len(name) for name in files)
    for name, path in files.items():
        print(f"{name:<{width}}  {recipe_description(path)}")


def prepare_run_dir(resolved: Resolved, output_dir: str | None) -> tuple[Path, list[str] | None]:
    """Write the run dir (recipe.yaml, accelerate_config.yaml); returns it and the worker launch command."""
    from qlora_recipes.models import check_local_model

    recipe = resolved.recipe
    check_local_model(recipe.model)
    run_dir = rundir.choose_output_dir(recipe, output_dir)
    rundir.resume_target(run_dir, recipe.resume_from_checkpoint)  # fail before touching the run dir
    accelerate = plan.accelerate_config(recipe, on_cpu=resolved.device.kind == "cpu")
    rundir.write(run_dir, resolved, {"accelerate_config.yaml": accelerate})
    command = plan.launch_command(recipe, run_dir, on_cpu=resolved.device.kind == "cpu", python=sys.executable)
    return run_dir, command


def start_run(resolved: Resolved, output_dir: str | None = None) -> Path:
    """Write the run dir, print what will run, and train unless dry_run."""
    recipe = resolved.recipe
    run_dir, command = prepare_run_dir(resolved, output_dir)
    print_notes(resolved)
    print(f"# run dir: {run_dir}")
    if command is None:
        print(f"# launch: in-process (dist={recipe.dist.backend.value}): python -m qlora_recipes train {run_dir}")
    else:
        print(
            f"# launch: {recipe.dist.num_processes} processes (dist={recipe.dist.backend.value}): {shlex.join(command)}"
        )
    if recipe.dry_run:
        print("# dry_run=true: wrote recipe.yaml and accelerate_config.yaml; nothing trained")
        print(json.dumps(plan_summary(resolved, run_dir), indent=2, default=str))
        return run_dir
    if command is None:
        from qlora_recipes.runner import train

        train(run_dir)
    else:
        launch(command, run_dir)
    return run_dir


def launch(command: list[str], run_dir: Path) -> None:
    """Start the worker processes; the launcher (torchrun) ends them all as soon as one fails."""
    result = subprocess.run(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if result.returncode != 0:
        raise LaunchFailed(
            result.returncode,
            f"training processes failed (exit {result.returncode}); the failing rank's error is above, "
            f"its log in {run_dir}/run.log or run.rankN.log. Resume: python -m qlora_recipes train {run_dir} --resume",
        )


def cmd_run(overrides: list[str], multirun: bool) -> None:
    if multirun:
        from qlora_recipes.sweep import SUMMARY, run_sweep

        sweep_dir, rows = run_sweep(overrides)
        failed = sum(r["status"] != "ok" for r in rows)
        if failed:
            raise LaunchFailed(1, f"{failed} of {len(rows)} sweep jobs failed: see {sweep_dir / SUMMARY}.md")
        return
    resolved, _ = resolve_overrides(overrides)
    start_run(resolved)


# key=value options of the post-training verbs: name -> (type, help)
POST_OPTIONS: dict[str, dict[str, tuple[type, str]]] = {
    "eval": {"samples": (int, "held-out prompts to generate for (default: trainer.task_eval_samples, or 8)")},
    "merge": {
        "out": (Path, "output dir (default RUN_DIR/merged; never overwritten)"),
        "dtype": (str, "bfloat16 (default), float16 or float32"),
    },
    "chat": {
        "prompt": (str, "answer this one message and exit (else interactive)"),
        "system": (str, "a system message"),
        "max_new_tokens": (int, "default: the run's trainer.max_new_tokens"),
    },
}
MERGE_DTYPES = ("bfloat16", "float16", "float32")


def post_options(verb: str, pairs: list[str]) -> dict[str, Any]:
    """key=value arguments of eval/merge/chat, typed, with the allowed keys named on a mistake."""
    allowed = POST_OPTIONS[verb]
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in allowed:
            raise RecipeError(f"{verb}: unknown option {pair!r}; allowed: " + ", ".join(f"{k}=..." for k in allowed))
        kind = allowed[key][0]
        try:
            options[key] = kind(value)
        except ValueError:
            raise RecipeError(f"{verb}: {key}={value!r} must be {kind.__name__}") from None
    if options.get("dtype", "bfloat16") not in MERGE_DTYPES:
        raise RecipeError(f"merge: dtype={options['dtype']!r}; allowed: {', '.join(MERGE_DTYPES)}")
    return options


def cmd_post(verb: str, path: Path, pairs: list[str]) -> None:
    from qlora_recipes import posttrain

    options = post_options(verb, pairs)
    if not path.is_dir():
        raise RecipeError(f"{path}: no such run dir")
    if verb == "eval":
        result = posttrain.evaluate_run(path, options.get("samples"))
        print((path / "eval.md").read_text())
        print(f"# written: {path / 'eval.md'}, {path / 'eval.json'} ({result['samples']} samples)")
    elif verb == "merge":
        out = posttrain.merge(path, options.get("out"), options.get("dtype", "bfloat16"))
        print(f"merged model: {out}  (AutoModelForCausalLM.from_pretrained('{out}'); chat {out} prompt=...)")
    else:
        posttrain.chat(path, options.get("prompt"), options.get("system"), options.get("max_new_tokens"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m qlora_recipes",
        description="Fine-tune LLMs from typed Hydra recipes. Overrides are Hydra syntax: lora.r=16 quant=none.",
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    run = verbs.add_parser("run", help="train a recipe (default +recipe=smollm2_chatml); dry_run=true only plans")
    run.add_argument("--multirun", "-m", action="store_true", help="Hydra sweep: lora.r=8,16 runs two jobs")
    show = verbs.add_parser("show", help="print the resolved recipe, group choices and the derived plan")
    show.add_argument("--params", action="store_true", help="also load the model and list trainable parameters")
    verbs.add_parser("validate", help="compose, resolve and build the library objects; no weights load")
    verbs.add_parser("ls", help="list the recipes with a one-line description")
    bench = verbs.add_parser(
        "bench",
        help="tokens/s, MFU and memory of a recipe on a random-weight model shape (bench.shape=llama2_7b), "
        "one run per bench.variants entry",
    )
    train = verbs.add_parser("train", help="train the recipe stored in an existing run dir")
    train.add_argument("run_dir", type=Path)
    train.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        metavar="CHECKPOINT",
        help="continue from the latest complete checkpoint (or the one given)",
    )
    post_help = {
        "eval": "evaluate a finished run: eval loss/perplexity, base vs trained answers (RUN_DIR/eval.md)",
        "merge": "merge a run's adapter into its base: bf16 safetensors with tokenizer (RUN_DIR/merged)",
        "chat": "chat with a run dir or a merged model dir (interactive; prompt=... answers once)",
    }
    for verb, text in post_help.items():
        sub = verbs.add_parser(verb, help=text)
        sub.add_argument("run_dir", type=Path, metavar="RUN_DIR" if verb != "chat" else "RUN_OR_MODEL_DIR")
        sub.add_argument(
            "options",
            nargs="*",
            help="; ".join(f"{k}=: {h}" for k, (_, h) in POST_OPTIONS[verb].items()),
        )
    for sub in (run, show, verbs.choices["validate"], bench):
        sub.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. +recipe=llama2_chatml lora.r=16")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.verb == "run":
            cmd_run(args.overrides, args.multirun)
        elif args.verb == "show":
            cmd_show(args.overrides, args.params)
        elif args.verb == "validate":
            cmd_validate(args.overrides)
        elif args.verb == "ls":
            cmd_ls()
        elif args.verb == "bench":
            from qlora_recipes.bench import run_bench

            run_bench(args.overrides)
        elif args.verb in POST_OPTIONS:
            from qlora_recipes.runner import console_handler, handlers_attached, log

            with handlers_attached([(log, console_handler())]):  # our progress lines on stdout
                cmd_post(args.verb, args.run_dir, args.options)
        elif args.verb == "train":
            cmd_train(args.run_dir, args.resume)
        else:
            parser.print_help()
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Interrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except LaunchFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.returncode
    except KeyboardInterrupt:
        print("interrupted before a checkpoint could be saved; the last complete one resumes", file=sys.stderr)
        return 130
    return 0
