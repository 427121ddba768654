"""After training: `eval`, `merge` and `chat` on a finished run dir (recipe.yaml + adapter/ or model/).

The trained weights are loaded on one device whatever backend trained them, from the ordinary PEFT adapter
runner.save writes (gathered to one file under FSDP/ZeRO-3). An adapter that lacks tensors is refused (as
FSDP v1 and ZeRO-3 adapters saved before 2026-11-28 were: docs/distributed.md).
- eval   eval loss and perplexity (SFT) or the preference metrics (DPO) on the test split, and base vs
         trained answers to held-out prompts with the data set's task metric: eval.md and eval.json.
- merge  base + adapter -> one bf16 safetensors model with the tokenizer, chat template and the run's
         generation settings; a 4-bit or 8-bit base is reloaded unquantized for this (merging into
         quantized weights would round the update away).
- chat   the run's chat template and generation settings, on a run dir or a merged model dir.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_recipes import data as data_mod
from qlora_recipes import models, plan, rundir
from qlora_recipes.errors import RecipeError
from qlora_recipes.materialize import from_pretrained_kwargs, torch_dtype, trainer_config
from qlora_recipes.report import fmt
from qlora_recipes.resolve import Resolved
from qlora_recipes.schema import RecipeConfig, TrainerKind

log = logging.getLogger("qlora_recipes")

MERGE_INFO = "merge_info.json"


@dataclass
class Trained:
    resolved: Resolved  # the run's recipe.yaml, read once
    model: Any  # a PeftModel over the base, or the fully fine-tuned model
    tokenizer: Any
    source: Path  # the run's adapter/ or model/ dir

    @property
    def recipe(self) -> RecipeConfig:
        return self.resolved.recipe

    @property
    def is_adapter(self) -> bool:
        return self.source.name == "adapter"


def trained_dir(run_dir: Path) -> Path:
    """The run's final adapter/ (LoRA) or model/ (full fine-tuning); a clear error while none exists."""
    for name in ("adapter", "model"):
        if (run_dir / name / "config.json").is_file() or (run_dir / name / "adapter_config.json").is_file():
            return run_dir / name
    latest = rundir.latest_checkpoint(run_dir)
    hint = f"; finish it with: python -m qlora_recipes train {run_dir} --resume" if latest else ""
    raise RecipeError(f"{run_dir} has no trained adapter/ or model/ yet (training not finished?){hint}")


def device_map() -> dict[str, int] | None:
    import torch

    return {"": 0} if torch.cuda.is_available() else None


def load_kwargs(resolved: Resolved, quantized: bool, dtype: str | None = None) -> dict[str, Any]:
    """from_pretrained keywords for one device: the recipe's dtype, attention and (if asked) quantization."""
    kwargs = from_pretrained_kwargs(resolved)
    kwargs.pop("device_map", None)
    if not quantized:
        kwargs.pop("quantization_config", None)
    if dtype is not None:
        kwargs["dtype"] = torch_dtype(dtype)
    placement = device_map()
    if placement is not None:
        kwargs["device_map"] = placement
    return kwargs


def load_trained(run_dir: Path, quantized: bool = True, dtype: str | None = None) -> Trained:
    """The run's tokenizer (its chat template and added tokens) and trained model, in eval mode.
    quantized=False loads the base unquantized even if the recipe trained it in 4/8-bit (merge)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_recipes import runner

    run_dir = run_dir.resolve()
    resolved = rundir.read(run_dir)
    recipe = resolved.recipe
    source = trained_dir(run_dir)
    tokenizer = AutoTokenizer.from_pretrained(source)
    kwargs = load_kwargs(resolved, quantized, dtype)
    if source.name == "model":
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    else:
        from peft import PeftModel

        base = fit_embeddings(
            AutoModelForCausalLM.from_pretrained(models.checkpoint_dir(recipe.model), **kwargs), tokenizer
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = PeftModel.from_pretrained(base, source)
        missing = [w for w in caught if "missing adapter keys" in str(w.message)]
        if missing:  # peft only warns, and the "trained" model would be the base
            raise RecipeError(
                f"{source} lacks weights the adapter config names ({str(missing[0].message)[:300]}...): it was not "
                "saved completely, so it cannot reproduce the trained model (docs/distributed.md)"
            )
    runner.keep_cpu_4bit_differentiable(model)  # the 4-bit CPU kernel training used: the same numbers
    model.eval()
    return Trained(resolved, model, tokenizer, source)


@contextmanager
def base_of(trained: Trained) -> Iterator[Any]:
    """The untrained model: the adapter switched off, or (full fine-tuning) the base loaded beside it."""
    if trained.is_adapter:
        with trained.model.disable_adapter():
            yield trained.model
        return
    from transformers import AutoModelForCausalLM

    checkpoint = models.checkpoint_dir(trained.recipe.model)
    base = AutoModelForCausalLM.from_pretrained(checkpoint, **load_kwargs(trained.resolved, quantized=True))
    yield fit_embeddings(base, trained.tokenizer).eval()


def fit_embeddings(base: Any, tokenizer: Any) -> Any:
    """Grow the base's embeddings to the run's tokenizer as training did (the template's added tokens)."""
    if len(tokenizer) > base.get_input_embeddings().num_embeddings:
        base.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=8, mean_resizing=False)
    return base


# ---------------------------------------------------------------- eval


def evaluate_run(run_dir: Path, samples: int | None = None) -> dict[str, Any]:
    """Base vs trained on the run's test split; writes RUN_DIR/eval.md and eval.json, returns the figures."""
    from qlora_recipes import runner

    run_dir = run_dir.resolve()
    trained = load_trained(run_dir)
    recipe = trained.recipe
    prepared = data_mod.prepare(recipe, trained.tokenizer)
    if prepared.eval is None:
        raise RecipeError(
            f"{run_dir}: the recipe's data has no test split to evaluate on (data.splits={list(recipe.data.splits)})"
        )
    kind = recipe.trainer.kind
    after = eval_metrics(trained.model, trained.tokenizer, prepared, recipe)
    before = {}
    if kind is not TrainerKind.dpo:  # DPO's loss of the base is ln 2 by construction: the policy is the reference
        with base_of(trained) as base:
            before = eval_metrics(base, trained.tokenizer, prepared, recipe)
    count = samples if samples is not None else (recipe.trainer.task_eval_samples or 8)
    examples = data_mod.task_examples(prepared, recipe.data, count)
    task_before = task_after = None
    if examples:
        with base_of(trained) as base:
            task_before = runner.task_score(base, trained.tokenizer, examples, recipe)
        task_after = runner.task_score(trained.model, trained.tokenizer, examples, recipe)
    result = {
        "run_dir": str(run_dir),
        "trained": str(trained.source),
        "trainer": recipe.trainer.kind.value,
        "eval_rows": len(prepared.eval),
        "before": {**figures(before, kind.on_pairs), "task": task_before.score if task_before else None},
        "after": {**figures(after, kind.on_pairs), "task": task_after.score if task_after else None},
        "task_metric": recipe.data.metric.value,
        "samples": len(examples),
        "reload_max_abs_logit_diff": reload_difference(trained, run_dir),
    }
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2))
    table = runner.samples_table(task_before, task_after) if task_after else ""
    (run_dir / "eval.md").write_text(eval_markdown(result, table))
    return result


def reload_difference(trained: Trained, run_dir: Path) -> float | None:
    """Largest |logit difference| between the weights loaded here and the model at the end of training, on
    the sequence training recorded (runner.save_probe); None for runs without a record (DPO/ORPO, older runs)."""
    import torch

    from qlora_recipes import runner

    path = run_dir / runner.PROBE
    if not path.is_file():
        return None
    probe = torch.load(path, weights_only=True)
    with torch.no_grad():
        logits = trained.model(input_ids=probe["input_ids"].to(trained.model.device)).logits.float().cpu()
    return (logits - probe["logits"]).abs().max().item()


def eval_metrics(model: Any, tokenizer: Any, prepared: data_mod.Prepared, recipe: RecipeConfig) -> dict[str, float]:
    """The recipe's trainer (SFT or DPO) evaluating `model` on the test split; nothing written."""
    from qlora_recipes import runner

    with tempfile.TemporaryDirectory() as scratch:
        kwargs = {**plan.trainer_kwargs(recipe, scratch, on_cpu=on_cpu()), "report_to": "none"}
        trainer = runner.setup_trainer(trainer_config(recipe, kwargs), model, tokenizer, prepared, recipe.trainer.kind)
        if "ref" in getattr(model, "peft_config", {}):
            # DPOTrainer copies a loaded adapter as its reference ("ref"); training's reference was the base
            # (adapter off), and without the copy TRL falls back to exactly that
            model.delete_adapter("ref")
        return runner.evaluate(trainer)


def figures(metrics: dict[str, float], pairs: bool) -> dict[str, float | None]:
    loss = metrics.get("loss")
    if pairs:
        return {
            "loss": loss,
            "reward_margin": metrics.get("rewards/margins"),
            "chosen_preferred": metrics.get("rewards/accuracies"),
        }
    return {"loss": loss, "perplexity": math.exp(loss) if loss is not None and loss < 50 else None}


def on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def eval_markdown(result: dict[str, Any], table: str) -> str:
    b, a = result["before"], result["after"]
    dpo = result["trainer"] == "dpo"
    rows = [("eval loss", "loss", ".4f")]
    if TrainerKind(result["trainer"]).on_pairs:
        rows += [("reward margin", "reward_margin", ".4f"), ("chosen preferred", "chosen_preferred", ".1%")]
    else:
        rows += [("perplexity", "perplexity", ".3f")]
    rows += [(result["task_metric"], "task", ".1%")]
    lines = [
        f"# eval of {result['run_dir']}",
        "",
        f"Trained weights: `{result['trained']}`; {result['eval_rows']} test rows; before = the base model "
        + ("(the adapter switched off)." if Path(result["trained"]).name == "adapter" else "(loaded beside it)."),
        *(
            ["DPO: before training the policy equals the reference (loss ln 2, margin 0), so only after is measured."]
            if dpo
            else ["ORPO: eval loss = the chosen answers' language-model loss plus beta x the odds-ratio term."]
            if result["trainer"] == "orpo"
            else ["Perplexity = exp(eval loss) over the tokens the recipe trains on (trainer.loss_on)."]
        ),
        "",
        "| | before | after |",
        "|---|---|---|",
        *(f"| {label} | {fmt(b.get(key), spec)} | {fmt(a.get(key), spec)} |" for label, key, spec in rows),
        "",
    ]
    if result.get("reload_max_abs_logit_diff") is not None:
        lines += [
            "Saved weights vs the model at the end of training (the run's probe.pt, a held-out sequence): max "
            f"|logit difference| {result['reload_max_abs_logit_diff']:.2e}.",
            "",
        ]
    if table:
        lines += [f"## {result['samples']} held-out prompts, greedy answers", "", table]
    return "\n".join(lines)


# ---------------------------------------------------------------- merge


def merge(run_dir: Path, out: Path | None = None, dtype: str = "bfloat16") -> Path:
    """Merge the run's adapter into an unquantized copy of its base and save it as safetensors, ready for
    AutoModelForCausalLM.from_pretrained, with the tokenizer, chat template and generation settings."""
    run_dir = run_dir.resolve()
    out = (out or run_dir / "merged").resolve()
    if out.exists() and any(out.iterdir()):
        raise RecipeError(f"{out} exists and is not empty; merged models are never overwritten: pass out=NEW_DIR")
    if trained_dir(run_dir).name != "adapter":
        raise RecipeError(f"{run_dir} trained the full model (lora=none): {run_dir / 'model'} is already merged")
    trained = load_trained(run_dir, quantized=False, dtype=dtype)
    recipe = trained.recipe
    quantized = recipe.quant.load_in_4bit or recipe.quant.load_in_8bit
    if quantized:
        bits = 4 if recipe.quant.load_in_4bit else 8
        log.info("the run trained on a %d-bit base; merging into the base reloaded unquantized in %s", bits, dtype)
    merged = trained.model.merge_and_unload()
    merged.generation_config = generation_config(recipe, trained.tokenizer, merged.generation_config)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out, safe_serialization=True)
    trained.tokenizer.save_pretrained(out)
    info = {
        "run_dir": str(run_dir),
        "adapter": str(trained.source),
        "base": models.checkpoint_dir(recipe.model),
        "dtype": dtype,
        "base_reloaded_unquantized": bool(quantized),
    }
    (out / MERGE_INFO).write_text(json.dumps(info, indent=2))
    log.info("merged model written to %s", out)
    return out


def generation_config(recipe: RecipeConfig, tokenizer: Any, config: Any = None) -> Any:
    """The run's generation settings (greedy, trainer.max_new_tokens, the template's end of turn)."""
    from transformers import GenerationConfig

    config = config or GenerationConfig()
    config.max_new_tokens = recipe.trainer.max_new_tokens
    config.do_sample = False
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    for unused in ("temperature", "top_p", "top_k"):  # sampling settings of the base would warn under greedy
        setattr(config, unused, None)
    return config


# ---------------------------------------------------------------- chat


@dataclass
class ChatModel:
    model: Any
    tokenizer: Any
    generation: Any
    add_special_tokens: bool


def load_chat_model(path: Path) -> ChatModel:
    """A run dir (its adapter over the base, as trained) or a merged model dir from `merge`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = path.resolve()
    if (path / rundir.RECIPE_FILE).is_file():
        trained = load_trained(path)
        generation = generation_config(trained.recipe, trained.tokenizer)
        return ChatModel(trained.model, trained.tokenizer, generation, trained.recipe.data.add_special_tokens)
    if (path / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, device_map=device_map()).eval()
        return ChatModel(model, tokenizer, model.generation_config, add_special_tokens=False)
    raise RecipeError(f"{path} is neither a run dir (recipe.yaml) nor a model dir (config.json)")


def reply(chat: ChatModel, messages: list[dict[str, str]], max_new_tokens: int | None = None) -> str:
    """Generate the assistant's next turn, printed to stdout as it is produced."""
    import torch
    from transformers import TextStreamer

    if chat.tokenizer.chat_template is None:
        raise RecipeError("this tokenizer has no chat template: merge or train with template=chatml or zephyr")
    text = chat.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = chat.tokenizer(text, return_tensors="pt", add_special_tokens=chat.add_special_tokens)
    enc = enc.to(next(chat.model.parameters()).device)
    streamer = TextStreamer(chat.tokenizer, skip_prompt=True, skip_special_tokens=True)
    extra = {"max_new_tokens": max_new_tokens} if max_new_tokens else {}
    with torch.no_grad():
        out = chat.model.generate(**enc, generation_config=chat.generation, streamer=streamer, **extra)
    return chat.tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def chat_loop(chat: ChatModel, system: str | None, max_new_tokens: int | None) -> None:
    """Interactive: each turn streams; /reset starts over, /exit or Ctrl-D ends."""
    history = [{"role": "system", "content": system}] if system else []
    print("chat: /reset starts a new conversation, /exit (or Ctrl-D) ends", flush=True)
    while True:
        try:
            line = input("user> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history = history[:1] if system else []
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        print("assistant> ", end="", flush=True)
        answer = reply(chat, history, max_new_tokens)
        history.append({"role": "assistant", "content": answer})


def chat(
    path: Path, prompt: str | None = None, system: str | None = None, max_new_tokens: int | None = None
) -> str | None:
    """One-shot (prompt given: the answer streams to stdout and is returned) or interactive."""
    model = load_chat_model(path)
    if prompt is None:
        chat_loop(model, system, max_new_tokens)
        return None
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return reply(model, messages, max_new_tokens)
