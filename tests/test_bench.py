"""`bench`: shapes, the FLOPs rule, synthetic data and tokenizer, and a two-variant run on the tiny shape."""

import dataclasses
import json

import pytest

from qlora_recipes import bench, cli, profiling
from qlora_recipes.errors import RecipeError
from qlora_recipes.resolve import Device
from qlora_recipes.schema import BenchConfig, BenchShape


def test_matmul_params_match_the_published_sizes():
    # Llama-2-7B has 6,738,415,616 parameters; N leaves out the 32000 x 4096 input embedding
    assert bench.matmul_params(bench.SHAPES[BenchShape.llama2_7b]) == 6_738_415_616 - 32000 * 4096
    # Llama-3-8B: 8,030,261,248 parameters, embedding 128256 x 4096
    assert bench.matmul_params(bench.SHAPES[BenchShape.llama3_8b]) == 8_030_261_248 - 128256 * 4096


@pytest.mark.parametrize(
    "name, flops", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12)]
)
def test_peak_flops_by_card_name(name, flops):
    assert bench.peak_flops(name) == flops
    assert bench.peak_flops("CPU") is None


def test_word_tokenizer_gives_one_token_per_word():
    tokenizer = bench.word_tokenizer(500)
    rows = bench.synthetic_rows(20, 500, mean_words=40, seed=1)
    for row in rows:
        text = " ".join(m["content"] for m in row["messages"])
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text.split()) and min(ids) >= bench.FIRST_WORD and max(ids) < 500
    lengths = [len(" ".join(m["content"] for m in r["messages"]).split()) for r in rows]
    assert 20 <= min(lengths) and max(lengths) <= 60
    assert bench.synthetic_rows(3, 500, 40, seed=1) == rows[:3]  # deterministic


@pytest.mark.parametrize(
    "entries, parsed",
    [
        (["plain"], {"plain": []}),
        (
            ["plain", "fsdp: dist=fsdp trainer.batch_size=8"],
            {"plain": [], "fsdp": ["dist=fsdp", "trainer.batch_size=8"]},
        ),
        (  # @NAME: an earlier entry's overrides in its place, before and after the entry's own
            ["a: x=1 y=2", "b: w=0 @a z=3", "c: @b"],
            {"a": ["x=1", "y=2"], "b": ["w=0", "x=1", "y=2", "z=3"], "c": ["w=0", "x=1", "y=2", "z=3"]},
        ),
    ],
)
def test_parse_variants(entries, parsed):
    assert bench.parse_variants(entries) == parsed


@pytest.mark.parametrize("entries", [["a", "a"], [": dist=fsdp"], ["bad name: x=1"], ["a: @b", "b: x=1"], ["a: @a"]])
def test_parse_variants_rejects_bad_entries(entries):
    with pytest.raises(RecipeError, match="bench.variants"):
        bench.parse_variants(entries)


def test_measure_leaves_out_warmup_and_profiled_steps():
    metrics = {
        "run_dir": "r",
        "memory": {"peak_allocated_gib": 1.0, "peak_reserved_gib": 2.0},
        "train": {
            "first_logged_loss": 2.0,
            "last_logged_loss": 1.0,
            "loss_curve": [],
            "step_times": [
                {"step": 1, "seconds": 10.0, "tokens": 100},  # warm-up
                {"step": 2, "seconds": 1.0, "tokens": 1000},
                {"step": 3, "seconds": 2.0, "tokens": 1000},
                {"step": 4, "seconds": 1.0, "tokens": 3000},
                {"step": 5, "seconds": 50.0, "tokens": 1000},  # profiled
            ],
        },
    }
    m = bench.measure("x", [], metrics, processes=2, n_params=10**9, peak=1e15, warmup=1, profiled=5)
    assert m.measured_steps == 3
    assert m.tokens_per_s_per_gpu == 500  # median of 1000, 500, 3000 tokens/s, over 2 processes
    assert m.median_step_s == 1.0
    assert m.mfu == pytest.approx(4 * 10**9 * 500 / 1e15)
    assert (m.min_step_s, m.max_step_s) == (1.0, 2.0)
    # 3 measured steps, slowest 2x the fastest: the table warns on both counts
    warning = bench.uneven(m)
    assert "only 3 measured steps" in warning and "1.00 to 2.00 s (2.0x)" in warning
    steady = dataclasses.replace(m, measured_steps=12, max_step_s=1.2)
    assert bench.uneven(steady) is None
    assert warning in bench.markdown([steady, m], {"recipe": "r", "shape": "tiny", "device": "cpu"})


def test_loss_gap_is_the_largest_relative_gap_over_shared_steps():
    base = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}, {"step": 3, "loss": 0.5}]
    curve = [{"step": 1, "loss": 2.01}, {"step": 2, "loss": 0.98}, {"step": 4, "loss": 9.0}]  # step 4: base has none
    assert bench.loss_gap(curve, base) == pytest.approx(0.02)
    assert bench.loss_gap(base, base) == 0.0
    assert bench.loss_gap([{"step": 9, "loss": 1.0}], base) is None


def test_default_variants_are_the_plain_flow_and_the_optimized_one():
    variants = bench.parse_variants(BenchConfig().variants)
    assert list(variants) == ["plain", "optimized"]
    assert "trainer.torch_compile=false" in variants["plain"] and "trainer.liger=false" in variants["plain"]
    # plain pins every speed setting optimized or a recipe could turn on, so none leaks into the baseline; attention
    # and micro-batch stay the recipe's own (the original flow's --use_flash_attn and batch)
    pinned = {o.split("=")[0] for o in variants["plain"]}
    assert {"quant.compiled_dequant", "trainer.cudnn_attention"} <= pinned
    assert {o.split("=")[0].split(">")[0] for o in variants["optimized"] if ":" not in o} - pinned == {
        "model.attn_implementation",
        "trainer.micro_batch_size",
    }
    # what docs/gpu.md measured as `optimized` (eighth session: 2.75x plain at 6.33 vs 6.62 GiB reserved), with lazy
    # metrics (tenth session: 1.09x over it in the same call) and async inputs (eleventh: 1.07x and 1.05x); on a GPU
    # off4sl (twenty-second and twenty-third sessions: 3.53x and 4.05x plain within its reserved memory) with q/k/v's
    # outputs kept for the recompute (off4slk, twenty-fifth and twenty-sixth sessions) and hashed LoRA dropout masks
    # (off4slkh, thirty-first session: 1.04x off4slk on an H100, 4.64x plain under its reserved memory), then nf4
    # weights dequantized inside the compiled blocks (thirty-second session: 1.02x and 1.01x off4slkh in calls CE and
    # CF, at equal memory)
    assert set(variants["optimized"]) == {
        "trainer.torch_compile=true",
        "model.attn_implementation=fastest",
        "trainer.expandable_segments=true",
        "quant.upcast_unquantized=false",
        "trainer.micro_batch_size>=2",
        "trainer.lazy_metrics=true",
        "trainer.async_inputs=true",
        "cuda:trainer.offload_checkpoints=true",
        "cuda:trainer.checkpoint_sublayers=true",
        "cuda:trainer.lean_recompute=true",
        "cuda:trainer.keep_projections=[q_proj,k_proj,v_proj]",
        "cuda:trainer.micro_batch_size>=4",
        "cuda:lora.hash_dropout=true",
        "cuda:quant.compiled_dequant=true",
    }


@pytest.mark.parametrize(
    "recipe, micro_batch",
    [("+recipe=llama2_chatml", 2), ("+recipe=smollm2_chatml", 8)],  # 1 x 4 becomes 2 x 2; 8 stays 8
)
def test_optimized_micro_batch_is_a_floor_on_the_recipes_own(recipe_of, recipe, micro_batch):
    optimized = [o for o in bench.parse_variants(BenchConfig().variants)["optimized"] if ":" not in o]  # off a GPU
    concrete = bench.at_least(optimized, recipe_of(recipe).recipe)
    assert f"trainer.micro_batch_size={micro_batch}" in concrete
    assert [o for o in concrete if "micro_batch" not in o] == [o for o in optimized if "micro_batch" not in o]
    recipe_of(recipe, *concrete)  # composes and validates


@pytest.mark.parametrize(
    "overrides, floor, micro_batch",
    [
        (["trainer.batch_size=2"], 4, 2),  # a batch of 2 on one process: 2 x 1, not a refused 4
        (["trainer.batch_size=6"], 4, 3),  # the largest micro-batch <= 4 that 6 splits into
        (["dist=ddp", "dist.num_processes=2"], 4, 2),  # 4 sequences over 2 processes: 2 each
        (["trainer.micro_batch_size=4", "trainer.batch_size=8"], 2, 4),  # the recipe's larger one stays
    ],
)
def test_micro_batch_floor_stops_where_the_batch_splits_evenly(recipe_of, overrides, floor, micro_batch):
    recipe = recipe_of("+recipe=llama2_chatml", *overrides).recipe
    assert bench.at_least([f"trainer.micro_batch_size>={floor}"], recipe) == [f"trainer.micro_batch_size={micro_batch}"]
    recipe_of("+recipe=llama2_chatml", *overrides, f"trainer.micro_batch_size={micro_batch}")  # validates


GPU = Device(kind="cuda", count=1, bf16=True, memory_gib=140.0)
TRACED = bench.traced_steps(None)


def optimized_on(recipe_of, device, *overrides, extra=None):
    """The default optimized variant's (or `extra`'s) concrete overrides, resolved recipe and left-out note on
    `device`."""
    overrides = ["+recipe=llama2_chatml", *overrides]
    extra = extra or bench.parse_variants(BenchConfig().variants)["optimized"]
    return bench.variant_overrides("optimized", extra, overrides, recipe_of(*overrides, device=device), TRACED)


def gpu_settings(variant):
    t, r = variant.recipe.trainer, variant.recipe
    return (
        t.offload_checkpoints,
        t.checkpoint_sublayers,
        t.lean_recompute,
        list(t.keep_projections),
        t.micro_batch_size,
        r.lora.hash_dropout,
        r.quant.compiled_dequant,
    )


def test_cuda_only_overrides_apply_on_a_gpu(recipe_of):
    concrete, variant, why = optimized_on(recipe_of, GPU)
    assert why is None
    assert concrete[-7:] == [
        "trainer.offload_checkpoints=true",
        "trainer.checkpoint_sublayers=true",
        "trainer.lean_recompute=true",
        "trainer.keep_projections=[q_proj,k_proj,v_proj]",
        "trainer.micro_batch_size=4",  # llama2_chatml's 1 x 4 becomes 4 x 1 (the common floor of 2 is dropped)
        "lora.hash_dropout=true",
        "quant.compiled_dequant=true",
    ]
    assert not any(o.startswith(bench.CUDA_ONLY) or o == "trainer.micro_batch_size=2" for o in concrete)
    assert gpu_settings(variant) == (True, True, True, ["q_proj", "k_proj", "v_proj"], 4, True, True)
    t = variant.recipe.trainer
    assert t.torch_compile and t.lazy_metrics and t.batch_size == 4


def test_cuda_only_overrides_are_left_out_on_cpu(recipe_of):
    concrete, variant, why = optimized_on(recipe_of, Device())
    assert why.startswith("optimized: left out `trainer.offload_checkpoints=true") and why.endswith("(no CUDA GPU)")
    assert "trainer.micro_batch_size=2" in concrete and not any("offload" in o or "sublayers" in o for o in concrete)
    assert gpu_settings(variant) == (False, False, False, [], 2, False, False)


def test_cuda_only_overrides_the_recipe_refuses_are_left_out_with_its_reason(recipe_of):
    # no gradient checkpointing: nothing to offload or split by sublayer; the rest of optimized still runs
    concrete, variant, why = optimized_on(recipe_of, GPU, "trainer.gradient_checkpointing=false")
    assert "trainer.offload_checkpoints=true moves what reentrant gradient checkpointing saves" in why
    assert concrete == optimized_on(recipe_of, Device(), "trainer.gradient_checkpointing=false")[0]
    assert not variant.recipe.trainer.offload_checkpoints and variant.recipe.trainer.torch_compile


def test_cuda_only_overrides_apply_up_to_the_first_the_recipe_refuses(recipe_of):
    # a full fine-tune: the offload and sublayer checkpoints apply; lean recompute needs LoRA, so it is left out with
    # everything after it (the micro-batch of 4 fits plain's memory only with all of them)
    concrete, variant, why = optimized_on(recipe_of, GPU, "quant=none", "lora.enabled=false")
    assert why.startswith(
        "optimized: left out `trainer.lean_recompute=true trainer.keep_projections=[q_proj,k_proj,v_proj] "
        "trainer.micro_batch_size=4 lora.hash_dropout=true quant.compiled_dequant=true` ("
    )
    assert "trainer.lean_recompute=true skips" in why and "lora.enabled=false" in why
    assert concrete[-2:] == ["trainer.offload_checkpoints=true", "trainer.checkpoint_sublayers=true"]
    assert gpu_settings(variant) == (True, True, False, [], 2, False, False)


def test_the_last_two_cuda_overrides_leave_the_offload_and_the_rest_in_place(recipe_of):
    # the hash and compiled dequantization come last, in that order: a recipe without LoRA dropout keeps the offload
    # and the rest of optimized's GPU settings (it loses the dequantization after the hash too); a recipe without 4-bit
    # weights keeps the hash as well
    concrete, variant, why = optimized_on(recipe_of, GPU, "lora.dropout=0")
    assert why.startswith("optimized: left out `lora.hash_dropout=true quant.compiled_dequant=true` (")
    assert "It needs LoRA with dropout > 0" in why
    assert gpu_settings(variant) == (True, True, True, ["q_proj", "k_proj", "v_proj"], 4, False, False)
    concrete, variant, why = optimized_on(recipe_of, GPU, "quant=none")
    assert why.startswith("optimized: left out `quant.compiled_dequant=true` (") and "no 4-bit nf4 weights" in why
    assert gpu_settings(variant) == (True, True, True, ["q_proj", "k_proj", "v_proj"], 4, True, False)


@pytest.mark.parametrize("device", [GPU, Device()])
def test_a_cuda_only_override_that_does_not_compose_fails_on_any_device(recipe_of, device):
    with pytest.raises(RecipeError, match="Unknown key 'trainer.offload_checkpoint'"):
        optimized_on(recipe_of, device, extra=["trainer.torch_compile=true", "cuda:trainer.offload_checkpoint=true"])


@pytest.mark.parametrize("override", ["trainer.nope>=2", "trainer.micro_batch_size>=two", "trainer>=2"])
def test_at_least_explains_what_it_needs(recipe_of, override):
    with pytest.raises(RecipeError, match="KEY>=N needs a numeric recipe setting"):
        bench.at_least([override], recipe_of().recipe)


def test_bench_needs_a_variant(tmp_path, capsys):
    args = ["bench", "+recipe=llama2_chatml", "bench.shape=tiny", "bench.variants=[]", f"output_dir={tmp_path / 'b'}"]
    assert cli.main(args) == 2
    assert "at least one bench.variants or bench.extra_variants entry" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_bench_runs_each_variant_and_writes_the_table(tmp_path, capsys):
    out = tmp_path / "bench"
    args = [
        "bench",
        "+recipe=llama2_chatml",
        "bench.shape=tiny",
        "bench.steps=2",
        "bench.warmup=1",
        "bench.profile=true",
        "trainer.max_seq_len=128",
        "bench.variants=[plain]",
        'bench.extra_variants=["r4: lora.r=4 trainer.profile_python=true"]',  # r4's trace records Python calls
        f"output_dir={out}",
    ]
    assert cli.main(args) == 0
    report = json.loads((out / "bench.json").read_text())
    assert [r["name"] for r in report["results"]] == ["plain", "r4"]
    assert report["matmul_params_N"] == bench.matmul_params(bench.SHAPES[BenchShape.tiny])
    for result in report["results"]:
        assert result["measured_steps"] == 2 and result["tokens_per_s_per_gpu"] > 0
        metrics = json.loads((out / result["name"] / "metrics.json").read_text())
        assert [s["step"] for s in metrics["train"]["step_times"]] == [1, 2, 3, 4]  # warm-up, 2 measured, profiled
        assert all(s["tokens"] > 0 for s in metrics["train"]["step_times"])
        assert (out / result["name"] / "profile" / "ops_by_cpu.txt").is_file()
        busy = json.loads((out / result["name"] / "profile" / "gpu_busy.json").read_text())
        assert busy["wall_ms"] > 0 and busy["kernels"] == 0 and busy["gpu_busy_fraction"] is None  # CPU: no kernels
        assert json.loads((out / result["name"] / "profile" / "idle.json").read_text()) == {"idle_ms": None, "gaps": 0}
        assert json.loads((out / result["name"] / "profile" / "kernels.json").read_text()) == []  # CPU: no kernels
        assert not (out / result["name"] / "profile" / "memory_peak.json").exists()  # CUDA's allocator only
        assert not (out / result["name"] / "adapter").exists()  # bench saves nothing
    recipe = (out / "r4" / "recipe.yaml").read_text()
    assert "r: 4" in recipe and "name_or_path: " + str(bench.checkpoint(BenchShape.tiny)) in recipe
    assert "profile_python: true" in recipe
    table = (out / "bench.md").read_text()
    assert "| plain | 1 |" in table and "| r4 | 1 |" in table and "`lora.r=4 trainer.profile_python=true`" in table
    assert "| 0.00% | `(recipe)` |" in table  # the baseline against itself
    assert "tokens/s per GPU" in capsys.readouterr().out
    assert cli.main(args) == 2  # an existing bench dir is never overwritten


def frame(path, line, name):
    return {"filename": path, "line": line, "name": name}


TORCH_FRAME = frame("/v/lib/python3.12/site-packages/torch/utils/checkpoint.py", 10, "recompute_fn")
OUR_FRAME = frame("/w/qlora_recipes/runner.py", 5, "forward")
GRAPH_FRAME = frame("/tmp/torchinductor_u/ab/cabc.py", 7, "call")
PEFT_FRAME = frame("/v/lib/python3.12/site-packages/peft/tuners/lora/layer.py", 3, "forward")


@pytest.mark.parametrize(
    ("frames", "site"),
    [
        ([TORCH_FRAME, OUR_FRAME, PEFT_FRAME], "qlora_recipes/runner.py:5 forward"),  # torch's own frames skipped
        ([GRAPH_FRAME, TORCH_FRAME, PEFT_FRAME, OUR_FRAME], "cabc.py:7 call <- peft/tuners/lora/layer.py:3 forward"),
        ([GRAPH_FRAME], "cabc.py:7 call"),
        ([TORCH_FRAME], "torch/utils/checkpoint.py:10 recompute_fn"),
        ([], profiling.NO_FRAME),
    ],
)
def test_allocation_site_names_the_innermost_frame_outside_torch(frames, site):
    assert profiling.allocation_site(frames) == site


def test_memory_at_peak_replays_the_allocator_trace():
    unit = 2**27  # 1/8 GiB

    def event(action, addr, units, *frames):
        return {"action": action, "addr": addr, "size": units * unit, "frames": list(frames)}

    trace = [
        event("alloc", 1, 4, TORCH_FRAME, OUR_FRAME),
        event("alloc", 2, 2, GRAPH_FRAME, PEFT_FRAME),
        event("free_requested", 1, 4),  # still in use on another stream: not freed yet
        event("free_completed", 9, 1),  # allocated before the trace began
        event("alloc", 3, 8),
        event("free_completed", 1, 4),
        event("alloc", 4, 1, OUR_FRAME),
    ]
    report = profiling.memory_at_peak(trace, before=8 * unit)
    assert report["peak_gib"] == (8 + 4 + 2 - 1 + 8) / 8
    assert report["peak_at"] == profiling.NO_FRAME and report["peak_stack"] == []
    assert report["untraced_live_at_peak_gib"] == 7 / 8
    assert report["live_at_peak"] == [
        {"where": profiling.NO_FRAME, "gib": 1.0, "allocations": 1},
        {"where": "qlora_recipes/runner.py:5 forward", "gib": 0.5, "allocations": 1},
        {"where": "cabc.py:7 call <- peft/tuners/lora/layer.py:3 forward", "gib": 0.25, "allocations": 1},
    ]
    assert report["replayed_end_gib"] == (8 + 4 + 2 - 1 + 8 - 4 + 1) / 8 and report["trace_entries"] == 7
    assert profiling.memory_at_peak([event("free_completed", 9, 1)], before=8 * unit)["peak_at"] == (
        "(before the traced steps)"
    )


def test_gpu_busy_is_the_union_of_kernel_spans_over_the_wall():
    spans = [(0.0, 10_000.0, "CPU"), (1_000.0, 3_000.0, "CUDA"), (2_000.0, 4_000.0, "CUDA"), (6_000.0, 7_000.0, "CUDA")]
    busy = profiling.gpu_busy(spans)  # kernels 1-3 ms and 2-4 ms overlap: 3 ms, then 1 ms, of a 10 ms wall
    assert busy == {"wall_ms": 10.0, "gpu_busy_ms": 4.0, "gpu_busy_fraction": 0.4, "kernels": 3}
    assert profiling.gpu_busy([(0.0, 5.0, "CPU")])["gpu_busy_fraction"] is None


def test_kernel_totals_add_up_each_kernel_name_largest_first():
    kernels = [
        profiling.Kernel(0.0, 500.0, "gemm"),
        profiling.Kernel(600.0, 700.0, "norm"),
        profiling.Kernel(800.0, 1_300.0, "gemm"),
        profiling.Kernel(1_400.0, 2_200.0, "copy"),
    ]
    assert profiling.kernel_totals(kernels) == [
        {"name": "gemm", "calls": 2, "total_ms": 1.0},
        {"name": "copy", "calls": 1, "total_ms": 0.8},
        {"name": "norm", "calls": 1, "total_ms": 0.1},
    ]
    assert profiling.kernel_totals([]) == []


def test_idle_gaps_name_the_python_functions_running_through_them():
    """trainer.profile_python: traced Python calls get their own table (each credited with the idle time it runs
    through, callers included) and name each large gap's innermost function; the op tables are as without them."""
    from qlora_recipes.profiling import HostOp, Kernel

    host = [
        HostOp(0, 10_000, "trainer.py(10): training_step", 0, python=True),
        HostOp(500, 4_500, "stage3.py(2873): step", 1, python=True),
        HostOp(1_000, 4_000, "stage3.py(3321): _partition_all_parameters", 2, python=True),
        HostOp(1_000, 3_900, "<built-in method item of Tensor object>", 3, python=True),
        HostOp(1_100, 3_800, "aten::item", 4),
        HostOp(6_000, 8_000, "optimizer.py(5): zero_grad", 1, python=True),
    ]
    kernels = [Kernel(0, 1_000, "gemm"), Kernel(5_000, 6_000, "gemm"), Kernel(9_000, 10_000, "gemm")]
    report = profiling.idle_report(kernels, host)
    assert report["idle_ms"] == 7.0 and report["gaps"] == 2  # 1-5 ms and 6-9 ms
    assert report["idle_by_innermost_host_op"] == [
        {"host_op": "aten::item", "idle_ms": 4.0, "gaps": 1},
        {"host_op": "(no host op traced)", "idle_ms": 3.0, "gaps": 1},  # Python only: no torch op runs through it
    ]
    assert report["idle_by_python_function"] == [
        {"function": "trainer.py(10): training_step", "idle_ms": 7.0, "gaps": 2},
        {"function": "stage3.py(2873): step", "idle_ms": 3.5, "gaps": 1},
        {"function": "stage3.py(3321): _partition_all_parameters", "idle_ms": 3.0, "gaps": 1},
        {"function": "<built-in method item of Tensor object>", "idle_ms": 2.9, "gaps": 1},
        {"function": "optimizer.py(5): zero_grad", "idle_ms": 2.0, "gaps": 1},
    ]
    first, second = report["largest_gaps"]
    assert first["idle_ms"] == 4.0 and first["host_op"] == "aten::item"
    assert first["python"] == "stage3.py(3321): _partition_all_parameters"  # the built-in inside it left out
    assert second["idle_ms"] == 3.0 and second["python"] == "optimizer.py(5): zero_grad"


def test_traced_python_calls_are_marked_as_such():
    import torch

    def python_loop():
        return sum(range(20_000))

    def step(x):
        python_loop()
        return (x @ x).sum()

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_stack=True) as traced:
        step(torch.ones(8, 8))
    _, host = profiling.traced_events(traced.events())
    calls = {op.name.rsplit(": ", 1)[-1] for op in host if op.python}
    assert {"step", "python_loop"} <= calls
    assert any(op.name == "aten::mm" and not op.python for op in host)


def test_idle_gaps_are_put_down_to_the_host_op_running_through_them():
    from qlora_recipes.profiling import NO_HOST_OP, HostOp, Kernel

    host = [
        HostOp(0, 10_000, "step", 0),
        HostOp(0, 5_000, "compute_loss", 1),
        HostOp(3_000, 4_500, "aten::item", 2),  # a sync: the GPU drains, then waits for the host
        HostOp(4_550, 4_600, "cudaLaunchKernel", 2),  # ends the gap, covers too little of it to take it
        HostOp(6_000, 10_000, "optimizer", 1),
    ]
    kernels = [
        Kernel(0, 3_000, "gemm"),
        Kernel(4_600, 6_000, "gemm"),
        Kernel(7_000, 9_000, "ncclDevKernel_AllGather"),
        Kernel(8_000, 8_500, "gemm"),
    ]
    report = profiling.idle_report(kernels, host)
    assert report["wall_ms"] == 10.0 and report["idle_ms"] == 3.6 and report["gaps"] == 3
    assert report["idle_by_innermost_host_op"] == [
        {"host_op": "optimizer", "idle_ms": 2.0, "gaps": 2},
        {"host_op": "aten::item", "idle_ms": 1.6, "gaps": 1},
    ]
    assert report["idle_by_outermost_host_op"] == [{"host_op": "step", "idle_ms": 3.6, "gaps": 3}]
    assert report["largest_gaps"][0] == {"idle_ms": 1.6, "at_ms": 3.0, "host_op": "aten::item", "outermost": "step"}
    # the all-gather runs 2 ms, 0.5 of it beside a compute kernel
    assert report["nccl_ms"] == 2.0 and report["exposed_nccl_ms"] == 1.5
    assert "idle_by_python_function" not in report and "python" not in report["largest_gaps"][0]
    untraced = profiling.idle_report([Kernel(0, 1_000, "a"), Kernel(2_000, 3_000, "b")], [HostOp(0, 500, "x")])
    assert untraced["idle_by_innermost_host_op"] == [{"host_op": NO_HOST_OP, "idle_ms": 1.0, "gaps": 1}]
    assert profiling.idle_report([], host) == {"idle_ms": None, "gaps": 0}


def test_traced_events_keep_the_nesting_of_host_ops():
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.profiler.record_function("outer"):
            torch.mm(torch.ones(4, 4), torch.ones(4, 4))
    kernels, host = profiling.traced_events(prof.events())
    depth = {op.name: op.depth for op in host}
    assert kernels == [] and depth["outer"] == 0 and depth["aten::mm"] >= 1


def test_memory_report_is_written_from_the_allocators_snapshot(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    prof = profiling.StepProfiler([2], tmp_path / "profile")
    prof.before = 2**30
    trace = [{"action": "alloc", "addr": 1, "size": 2**29, "frames": [OUR_FRAME]}]
    prof.write_memory({"device_traces": [trace], "segments": []}, allocated=2**30 + 2**29)
    report = json.loads((tmp_path / "profile" / "memory_peak.json").read_text())
    assert report["peak_gib"] == 1.5 == report["replayed_end_gib"] == report["allocated_end_gib"]
    assert report["live_at_peak"] == [{"where": "qlora_recipes/runner.py:5 forward", "gib": 0.5, "allocations": 1}]
    assert (tmp_path / "profile" / "memory_snapshot.pickle").stat().st_size > 0


def test_bench_of_a_preference_recipe_says_it_measures_sft(tmp_path, capsys):
    assert cli.main(["bench", "+recipe=smollm2_dpo", f"output_dir={tmp_path / 'b'}"]) != 0
    err = capsys.readouterr().err
    assert "bench measures SFT" in err and "trainer.kind=dpo" in err
    assert not (tmp_path / "b").exists()


def test_a_variant_the_recipe_refuses_is_named(recipe_of):
    with pytest.raises(RecipeError, match=r"(?s)bench variant 'optimized' \(lora.r=-1\): .*lora.r=-1: the rank"):
        optimized_on(recipe_of, Device(), extra=["lora.r=-1"])
