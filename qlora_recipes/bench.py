"""`bench`: throughput and memory of a recipe on a real architecture shape, with no hub and no data set.

It writes a random-weight checkpoint of `bench.shape` (speed and memory do not depend on the weight
values) with a word-level tokenizer of the shape's vocabulary, and synthetic chat rows long enough to fill
packed sequences. Each of `bench.variants`, then of `bench.extra_variants` (name -> Hydra overrides), trains in
its own process, as `run` would (one process, or the recipe's accelerate launch), for warm-up + measured optimizer
steps; the runner's step clock gives every step's wall time and real (non-padding) tokens. Results: bench.json and
bench.md in the bench dir.

Figures: tokens/s per GPU = median over the measured steps of (real tokens in the step / step seconds)
/ processes. The fastest and slowest measured step are reported beside the median: the QLoRA step is
partly host-bound (Python launching ~40k kernels a step), so the host's speed shows in it and varies
from run to run and machine to machine; the table flags variants measured on too few or too uneven
steps, and only ratios between variants of one bench run mean anything.
MFU = 4 * N * (tokens/s per GPU) / the card's dense bf16 peak, with N the base model's parameters except
the input embedding (a lookup): LoRA's forward is 2N FLOPs a token and the backward computes input
gradients only (another 2N), since the base weights are frozen. The recompute of gradient checkpointing
and attention's own FLOPs are not counted, as is usual for this rule.
Loss gap vs first = the largest relative difference between a variant's logged loss and the first
variant's at the same step: variants see the same data in the same order with the same seed, so a speed
setting that changes the arithmetic shows here (issue 6 holds the optimized path within 1% over 50 steps).
The default variants are `plain` (the original flow: no compile, no Liger) and `optimized` (this
project's speed settings; docs/performance.md says which pay). A variant's `cuda:KEY=VALUE` overrides apply only where
it trains on a CUDA GPU, in order, as many as the recipe admits together (optimized's checkpoint offload, sublayer
checkpoints, lean recompute, kept q/k/v outputs, micro-batch of 4, hashed LoRA dropout masks and compiled nf4
dequantization); bench runs it without the rest and says why.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_recipes import models, plan
from qlora_recipes.errors import LaunchFailed, RecipeError
from qlora_recipes.report import fmt
from qlora_recipes.schema import BenchShape, TrainerKind
from qlora_recipes.templates import CHATML

log = logging.getLogger(__name__)

# LlamaConfig fields of each shape (the published configs' sizes; weights random)
SHAPES: dict[BenchShape, dict[str, Any]] = {
    BenchShape.llama2_7b: dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
    BenchShape.llama3_8b: dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
    BenchShape.smollm2_135m: dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
    BenchShape.tiny: dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
}

# Dense bf16 tensor-core peak, FLOP/s (vendor datasheets, without sparsity); matched in this order.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 125e12),
)

FIRST_WORD = 3  # ids 0-2 are <unk>, <s>, </s>


def matmul_params(shape: dict[str, Any]) -> int:
    """N of the 4*N rule: every weight a token's forward multiplies by (all but the input embedding)."""
    h, i, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h  # q, o; k, v; gate, up, down; two norms
    return layers * per_layer + h + shape["vocab_size"] * h  # final norm, LM head (tied or not)


def peak_flops(device_name: str | None) -> float | None:
    for marker, flops in PEAK_BF16_FLOPS:
        if device_name and marker in device_name:
            return flops
    return None


def checkpoint(shape_name: BenchShape) -> Path:
    """The cached random-weight checkpoint of a shape: built on the GPU in bf16 when there is one (a 7B
    shape in ~20 s), else on CPU."""
    shape = SHAPES[shape_name]

    def build(tmp: Path) -> None:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        started = time.time()
        tokenizer = word_tokenizer(shape["vocab_size"])
        config = LlamaConfig(
            **shape,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=None,
        )
        device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
        log.info("built the %s checkpoint on %s in %.0f s", shape_name.value, device, time.time() - started)

    return models._atomic_build(models.cache_root() / "models" / f"bench-{shape_name.value}", build)


def word_tokenizer(vocab_size: int) -> Any:
    """One token per word `w<id>`: synthetic text of exactly known length in any vocabulary size."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(FIRST_WORD, vocab_size)}
    words = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = CHATML  # recipes with template=tokenizer need one
    return tokenizer


def synthetic_rows(count: int, vocab_size: int, mean_words: int, seed: int = 0) -> list[dict[str, Any]]:
    """Two-turn chats of random words, lengths uniform in [mean/2, 3*mean/2] (a quarter user, the rest
    assistant), so packing fills whole blocks and unpacked batches carry some padding."""
    rng = random.Random(seed)

    def words(n: int) -> str:
        return " ".join(f"w{rng.randrange(FIRST_WORD, vocab_size)}" for _ in range(max(n, 1)))

    rows = []
    for _ in range(count):
        total = rng.randint(mean_words // 2, 3 * mean_words // 2)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": words(total // 4)},
                    {"role": "assistant", "content": words(total - total // 4)},
                ]
            }
        )
    return rows


def write_data(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


@dataclass
class Measured:
    name: str
    overrides: list[str]
    processes: int
    tokens_per_s_per_gpu: float
    median_step_s: float
    min_step_s: float
    max_step_s: float
    measured_steps: int
    peak_allocated_gib: float | None
    peak_reserved_gib: float | None
    mfu: float | None
    first_loss: float | None
    last_loss: float | None
    loss_curve: list[dict[str, float]]
    run_dir: str


def measure(
    name: str,
    overrides: list[str],
    metrics: dict[str, Any],
    processes: int,
    n_params: int,
    peak: float | None,
    warmup: int,
    profiled: int | None = None,
) -> Measured:
    """The figures of one variant from its metrics.json (warm-up and profiled steps left out)."""
    train = metrics["train"]
    steps = [s for s in train["step_times"] if s["step"] > warmup and s["step"] != profiled]
    if not steps:
        raise RecipeError(f"bench variant {name!r} logged no measured step (steps after warm-up {warmup})")
    rate = statistics.median(s["tokens"] / s["seconds"] for s in steps) / processes
    memory = metrics["memory"]
    return Measured(
        name=name,
        overrides=overrides,
        processes=processes,
        tokens_per_s_per_gpu=rate,
        median_step_s=statistics.median(s["seconds"] for s in steps),
        min_step_s=min(s["seconds"] for s in steps),
        max_step_s=max(s["seconds"] for s in steps),
        measured_steps=len(steps),
        peak_allocated_gib=memory.get("peak_allocated_gib"),
        peak_reserved_gib=memory.get("peak_reserved_gib"),
        mfu=4 * n_params * rate / peak if peak else None,
        first_loss=train["first_logged_loss"],
        last_loss=train["last_logged_loss"],
        loss_curve=train["loss_curve"],
        run_dir=metrics["run_dir"],
    )


def loss_gap(curve: list[dict[str, float]], base: list[dict[str, float]]) -> float | None:
    """The largest relative gap between two loss curves over the steps both logged (None when they share none):
    how far a variant's training strays from the baseline's on the same data and seed."""
    base_loss = {point["step"]: point["loss"] for point in base}
    gaps = [abs(p["loss"] - base_loss[p["step"]]) / abs(base_loss[p["step"]]) for p in curve if p["step"] in base_loss]
    return max(gaps) if gaps else None


def markdown(results: list[Measured], header: dict[str, Any]) -> str:
    base = results[0]

    lines = [f"# bench: {header['recipe']} on {header['shape']} ({header['device']})", ""]
    lines += [f"- {key}: {value}" for key, value in header.items() if key not in ("recipe", "shape")]
    lines += [
        "",
        "| variant | processes | tokens/s per GPU | vs first | median step s | steps (min-max s) | MFU (4N) | peak alloc GiB "
        "| peak reserved GiB | loss first -> last | loss gap vs first (max) | overrides |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.processes} | {r.tokens_per_s_per_gpu:,.0f} | "
            f"{r.tokens_per_s_per_gpu / base.tokens_per_s_per_gpu:.2f}x | {r.median_step_s:.3f} | "
            f"{r.measured_steps} ({r.min_step_s:.2f}-{r.max_step_s:.2f}) | {fmt(r.mfu, '.1%')} | "
            f"{fmt(r.peak_allocated_gib, '.2f')} | {fmt(r.peak_reserved_gib, '.2f')} | "
            f"{fmt(r.first_loss, '.4f')} -> {fmt(r.last_loss, '.4f')} | {fmt(loss_gap(r.loss_curve, base.loss_curve), '.2%')} | "
            f"`{' '.join(r.overrides) or '(recipe)'}` |"
        )
    warnings = [w for r in results if (w := uneven(r))]
    if warnings:
        lines += ["", *warnings]
    return "\n".join(lines) + "\n"


MIN_STEPS = 10  # fewer measured steps cannot tell a variant from the host's noise (docs/gpu.md)
MAX_SPREAD = 1.5  # slowest / fastest measured step above this: the host stalled during the run


def uneven(r: Measured) -> str | None:
    """A warning line for a variant whose figure rests on too few or too uneven steps, else None."""
    problems = []
    if r.measured_steps < MIN_STEPS:
        problems.append(f"only {r.measured_steps} measured steps (use bench.steps >= {MIN_STEPS})")
    if r.max_step_s > MAX_SPREAD * r.min_step_s:
        spread = r.max_step_s / r.min_step_s
        problems.append(f"its steps took {r.min_step_s:.2f} to {r.max_step_s:.2f} s ({spread:.1f}x)")
    if not problems:
        return None
    return (
        f"- warning: {r.name}: {'; '.join(problems)}. The step is partly host-bound: rerun it beside its baseline "
        "in one bench run before reading the figure as a speed-up or slow-down."
    )


def flush_to_disk() -> None:
    """Write back dirty pages (a just-built 7B checkpoint leaves ~13 GB of them) before the first variant
    trains, so the kernel's write-back does not run during its first steps. No-op where os.sync is missing."""
    if hasattr(os, "sync"):
        os.sync()


def device_name() -> str:
    """The first GPU's name (matched against PEAK_BF16_FLOPS), or CPU."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"


def run_variant(command: list[str], log_path: Path) -> None:
    with log_path.open("w") as out:
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-15:])
        raise LaunchFailed(result.returncode, f"bench variant failed (exit {result.returncode}), {log_path}:\n{tail}")


def bench_overrides(
    bench_dir: Path, name: str, ckpt: Path, data: Path, steps: int, profile_step: int | None
) -> list[str]:
    """What every variant gets on top of the recipe and its own overrides: the synthetic model and data, a
    fixed number of steps, and nothing that is not training (no eval, checkpoints or final save)."""
    return [
        "model.source=hub_or_path",
        f"model.name_or_path={ckpt}",
        f"data.name={data}",
        "data.format=messages",
        "data.metric=none",
        "trainer.epochs=100",
        f"trainer.max_steps={steps}",
        "trainer.eval_strategy=no",
        "trainer.save_strategy=no",
        "trainer.save_final=false",
        "trainer.eval_before_train=false",
        "trainer.task_eval_samples=0",
        "trainer.logging_steps=1",
        traced_steps(profile_step),
        "logger=none",
        f"output_dir={bench_dir / name}",
    ]


def traced_steps(profile_step: int | None) -> str:
    """The override naming the step bench traces (bench.profile), or none."""
    return f"trainer.profile_steps=[{profile_step}]" if profile_step else "trainer.profile_steps=[]"


def parse_variants(entries: list[str]) -> dict[str, list[str]]:
    """bench.variants (then bench.extra_variants) entries, "NAME" or "NAME: override override ...", as name ->
    overrides; an override `@NAME` stands for an earlier entry's overrides, in its place."""
    parsed: dict[str, list[str]] = {}
    for entry in entries:
        name, _, rest = entry.partition(":")
        name = name.strip()
        if not name or not name.replace("_", "").replace("-", "").isalnum() or name in parsed:
            raise RecipeError(
                f"bench.variants/extra_variants entry {entry!r}: each is 'NAME' or 'NAME: overrides' with a unique name of letters, "
                "digits, - or _"
            )
        overrides = []
        for override in rest.split():
            if not override.startswith("@"):
                overrides.append(override)
            elif override[1:] in parsed:
                overrides += parsed[override[1:]]
            else:
                raise RecipeError(
                    f"bench.variants/extra_variants entry {entry!r}: {override} names no earlier entry (earlier: "
                    f"{', '.join(parsed) or 'none'}); '@NAME' stands for an earlier entry's overrides"
                )
        parsed[name] = overrides
    return parsed


def at_least(overrides: list[str], recipe: Any) -> list[str]:
    """A variant's overrides with each `KEY>=N` made `KEY=max(recipe's value, N)`: a floor on the recipe's own setting
    (the optimized micro-batch is at least 2 sequences, not fewer than a recipe that already runs more). A micro-batch
    floor stops at the largest micro-batch the recipe's batch splits into evenly (batch = micro-batch x processes x
    accumulation), so `trainer.micro_batch_size>=4` runs a batch of 2 sequences on one process as 2 x 1."""
    concrete = []
    for override in overrides:
        key, sep, floor = override.partition(">=")
        if not sep:
            concrete.append(override)
            continue
        try:
            current = functools.reduce(getattr, key.split("."), recipe)
            value = max(current, int(floor))
        except (AttributeError, TypeError, ValueError):
            raise RecipeError(
                f"bench.variants override {override!r}: KEY>=N needs a numeric recipe setting KEY and an integer N"
            ) from None
        if key == "trainer.micro_batch_size":
            per_process = recipe.trainer.batch_size // plan.world_size(recipe)
            value = max((m for m in range(current, value + 1) if per_process % m == 0), default=value)
        concrete.append(f"{key}={value}")
    return concrete


CUDA_ONLY = "cuda:"


def variant_overrides(
    name: str, extra: list[str], overrides: list[str], resolved: Any, traced: str
) -> tuple[list[str], Any, str | None]:
    """A variant's concrete overrides, its resolved recipe, and which of its `cuda:KEY=VALUE` overrides were left out
    and why (None when it has none or all apply). They apply where the variant trains on a CUDA GPU, in their order,
    as many as the recipe admits together: the first one it refuses is left out with every one after it (the
    checkpoint offload needs a GPU; sublayer checkpoints need reentrant checkpointing, one whole model per GPU and
    backend=hf; optimized's micro-batch of 4 comes after them, as it fits plain's memory only with the offload). A
    bench of any recipe runs its fastest valid settings, and says which it could not. An override that does not
    compose (an unknown key, a bad value) fails on every device, cuda: or not."""
    from qlora_recipes.compose import compose, with_default_recipe
    from qlora_recipes.resolve import resolve

    common = at_least([o for o in extra if not o.startswith(CUDA_ONLY)], resolved.recipe)
    cuda_only = at_least([o.removeprefix(CUDA_ONLY) for o in extra if o.startswith(CUDA_ONLY)], resolved.recipe)

    def concrete(cuda: list[str]) -> list[str]:
        keys = {o.partition("=")[0] for o in cuda}
        return [*(o for o in common if o.partition("=")[0] not in keys), *cuda]

    def composed(cuda: list[str]) -> Any:
        return compose(with_default_recipe([*overrides, *concrete(cuda), traced]))[0]

    config = composed(cuda_only)  # all of them compose, on any device
    why, applied = (None, len(cuda_only)) if resolved.device.kind == "cuda" else ("no CUDA GPU", 0)
    if applied < len(cuda_only):
        config = composed([])
    while True:
        try:
            variant = resolve(config, resolved.device)
            break
        except RecipeError as exc:  # the recipe's checks refuse them together: one fewer, from the end
            if not applied:
                raise RecipeError(
                    f"bench variant {name!r} ({' '.join(extra) or 'the recipe as it is'}): {exc}"
                ) from None
            why, applied = str(exc), applied - 1
            config = composed(cuda_only[:applied])
    left_out = cuda_only[applied:]
    return (
        concrete(cuda_only[:applied]),
        variant,
        f"{name}: left out `{' '.join(left_out)}` ({why})" if left_out else None,
    )


def rows_needed(recipe: Any, steps: int) -> int:
    """Enough synthetic rows for `steps` optimizer steps of full sequences, with a margin."""
    t = recipe.trainer
    return max(64, int(1.3 * steps * t.batch_size * 2)) if t.packing else max(64, int(1.3 * steps * t.batch_size))


def run_bench(overrides: list[str]) -> list[Measured]:
    """Build the shape's checkpoint and the data once, run every variant in its own process, write bench.json/md."""
    from qlora_recipes.cli import prepare_run_dir, resolve_overrides

    resolved, _ = resolve_overrides(overrides)
    if resolved.recipe.trainer.kind is not TrainerKind.sft:
        raise RecipeError(
            f"bench measures SFT: its synthetic data are chat rows, and trainer.kind={resolved.recipe.trainer.kind.value} "
            "trains on preference pairs. Bench an SFT recipe of the same model (e.g. +recipe=smollm2_chatml)"
        )
    cfg = resolved.recipe.bench
    entries = list(cfg.variants) + list(cfg.extra_variants)
    if cfg.steps < 1 or cfg.warmup < 0 or not entries:
        raise RecipeError(
            "bench needs bench.steps >= 1, bench.warmup >= 0 and at least one bench.variants or bench.extra_variants entry"
        )
    shape = SHAPES[cfg.shape]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    bench_dir = Path(
        resolved.recipe.output_dir or Path("runs") / "bench" / f"{resolved.recipe.name}-{cfg.shape.value}-{stamp}"
    )
    if bench_dir.exists():
        raise RecipeError(f"output_dir={bench_dir} exists; bench never overwrites: choose another output_dir")
    total = cfg.warmup + cfg.steps + (1 if cfg.profile else 0)
    profile_step = total if cfg.profile else None

    name_, gpu = resolved.recipe.name, device_name()
    plans = []
    left_out = []
    for name, extra in parse_variants(entries).items():
        extra, variant, why = variant_overrides(name, extra, overrides, resolved, traced_steps(profile_step))
        plans.append((name, extra, variant))
        left_out += [why] if why else []
    ckpt = checkpoint(cfg.shape)
    rows = max(rows_needed(v.recipe, total) for _, _, v in plans)
    mean_words = max(8, resolved.recipe.trainer.max_seq_len // 2)
    data = write_data(bench_dir / "data" / "train.jsonl", synthetic_rows(rows, shape["vocab_size"], mean_words))
    flush_to_disk()
    print(
        f"# bench {name_} on {cfg.shape.value} ({gpu}): {ckpt}, {rows} synthetic rows, "
        f"{cfg.warmup} warm-up + {cfg.steps} measured steps",
        flush=True,
    )
    for why in left_out:
        print(f"# {why}", flush=True)

    results = []
    for name, extra, _ in plans:
        fixed = bench_overrides(bench_dir, name, ckpt, data, total, profile_step)
        variant, _ = resolve_overrides([*overrides, *extra, *fixed])
        run_dir, command = prepare_run_dir(variant, None)
        print(f"# {name}: {' '.join(extra) or '(recipe as is)'} -> {run_dir}", flush=True)
        started = time.time()
        run_variant([sys.executable, "-m", "qlora_recipes", "train", str(run_dir)], run_dir / "bench.log")
        metrics = json.loads((run_dir / "metrics.json").read_text())
        result = measure(
            name,
            extra,
            metrics,
            plan.world_size(variant.recipe),
            matmul_params(shape),
            peak_flops(gpu),
            cfg.warmup,
            profile_step,
        )
        results.append(result)
        print(
            f"#   {result.tokens_per_s_per_gpu:,.0f} tokens/s per GPU, median step {result.median_step_s:.3f} s "
            f"({result.measured_steps} steps, {result.min_step_s:.2f}-{result.max_step_s:.2f} s), "
            f"peak reserved {result.peak_reserved_gib if result.peak_reserved_gib is not None else 'n/a'} GiB "
            f"({time.time() - started:.0f} s)",
            flush=True,
        )
    header = {
        "recipe": name_,
        "shape": cfg.shape.value,
        "device": gpu,
        "matmul_params_N": matmul_params(shape),
        "peak_bf16_flops": peak_flops(gpu),
        "warmup_steps": cfg.warmup,
        "measured_steps": cfg.steps,
        "overrides": " ".join(overrides),
        "versions": versions(),
        **({"left out": "; ".join(left_out)} if left_out else {}),
    }
    (bench_dir / "bench.json").write_text(json.dumps({**header, "results": [r.__dict__ for r in results]}, indent=2))
    table = markdown(results, header)
    (bench_dir / "bench.md").write_text(table)
    print(table, flush=True)
    return results


def versions() -> str:
    import importlib.metadata as md

    names = ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "deepspeed", "liger-kernel")
    found = []
    for name in names:
        try:
            found.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            continue
    return ", ".join(found)
