"""The same runner on CUDA: QLoRA in bf16 with bitsandbytes' GPU kernels. Skipped without a GPU."""

import itertools

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("quant", ["nf4", "int8", "none"])
def test_qlora_trains_on_gpu(train_run, quant):
    run_dir, metrics = train_run(f"quant={quant}", "trainer.max_steps=40")
    recipe = (run_dir / "recipe.yaml").read_text()
    assert "dtype: bfloat16" in recipe and "precision: bf16" in recipe
    assert metrics["eval"]["loss_after"] < 0.8 * metrics["eval"]["loss_before"]
    assert metrics["memory"]["peak_allocated_gib"] > 0


def test_added_chatml_tokens_train_on_gpu(train_run):
    base = ["+recipe=llama2_chatml", "model=tiny_llama", "data=demo_dates", "data.max_eval_samples=8", "logger=none"]
    _, metrics = train_run("trainer.max_steps=6", base=base)
    assert metrics["train"]["steps"] == 6


def test_varlen_attention_matches_each_sequence_run_alone(tiny_checkpoint, packed_bounds):
    """The real varlen kernel on a packed row against sdpa on each of its sequences alone: same logits and input
    gradients (bf16). The reference does not rely on transformers' detection of packing, which a key/value cache
    turns off (a first version of this test compared with sdpa on the packed row with the cache on, which lets
    sequences see each other: docs/gpu.md, eighth session)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from qlora_recipes import attention

    attention.register()
    lengths = (300, 17, 600, 107)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None].cuda()
    vocab = AutoConfig.from_pretrained(tiny_checkpoint).vocab_size
    input_ids = torch.randint(3, vocab, position_ids.shape, device="cuda")
    starts = [0, *torch.tensor(lengths).cumsum(0).tolist()]

    def forward(name, row_inputs):
        model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, attn_implementation=name, dtype=torch.bfloat16)
        model = model.cuda()
        embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):  # as in training (float32 queries: tests/test_attention.py)
            logits = row_inputs(model, embeds.float()).float()
        logits.logsumexp(-1).sum().backward()
        return logits.detach(), embeds.grad.float()

    def packed(model, embeds):
        bounds = packed_bounds(lengths, device="cuda")
        return model(inputs_embeds=embeds, position_ids=position_ids, use_cache=False, **bounds).logits

    def alone(model, embeds):
        return torch.cat(
            [model(inputs_embeds=embeds[:, a:b], use_cache=False).logits for a, b in itertools.pairwise(starts)], dim=1
        )

    logits_alone, grad_alone = forward("sdpa", alone)
    logits_varlen, grad_varlen = forward(attention.NAME, packed)
    assert (logits_varlen - logits_alone).abs().max() < 0.05 * logits_alone.abs().max()
    assert (grad_varlen - grad_alone).abs().max() < 0.05 * grad_alone.abs().max()
    # a kernel that let sequences see each other would differ by far more: check the test can tell
    one_row, _ = forward("sdpa", lambda model, embeds: model(inputs_embeds=embeds, use_cache=False).logits)
    assert (one_row - logits_alone).abs().max() > 0.05 * logits_alone.abs().max()


@pytest.mark.parametrize("cuda_only", [True, False], ids=["optimized", "optimized-off-gpu-settings"])
def test_optimized_variant_follows_the_plain_loss_curve(tmp_path, cuda_only):
    """Issue 6's faithfulness rule on a model that learns: bench's default `plain` and `optimized` variants train the
    same packed data with the same seed for 50 steps; every logged loss of optimized stays within 1% of plain's. On a
    GPU optimized includes its cuda: settings (checkpoint offload, sublayer checkpoints, lean recompute, kept q/k/v,
    micro-batch 4, hashed dropout masks, nf4 weights dequantized in the compiled blocks); the second case runs it
    without them, as it runs off a GPU."""
    import json

    from qlora_recipes import bench, cli
    from qlora_recipes.schema import BenchConfig

    base = [
        "+recipe=llama2_chatml",
        "model=tiny_llama",
        "data=demo_dates",
        "lora.train_new_tokens=false",
        "trainer.learning_rate=1e-3",
        "trainer.max_steps=50",
        "trainer.logging_steps=1",
        "trainer.eval_strategy=no",
        "trainer.task_eval_samples=0",
        "data.metric=none",
        "logger=none",
    ]
    curves = {}
    resolved = cli.resolve_overrides(base)[0]
    for name, overrides in bench.parse_variants(BenchConfig().variants).items():
        overrides = [o for o in overrides if cuda_only or not o.startswith(bench.CUDA_ONLY)]
        overrides, _, left_out = bench.variant_overrides(name, overrides, base, resolved, bench.traced_steps(None))
        assert left_out is None, left_out
        assert ("trainer.lean_recompute=true" in overrides) == (cuda_only and name == "optimized")
        assert ("lora.hash_dropout=true" in overrides) == (cuda_only and name == "optimized")
        assert ("quant.compiled_dequant=true" in overrides) == (cuda_only and name == "optimized")
        assert cli.main(["run", *base, *overrides, f"output_dir={tmp_path / name}"]) == 0
        curves[name] = json.loads((tmp_path / name / "metrics.json").read_text())["train"]["loss_curve"]
    plain, optimized = curves["plain"], curves["optimized"]
    assert len(plain) == len(optimized) == 50
    assert plain[-1]["loss"] < 0.8 * plain[0]["loss"]  # it learns, so a drift would show
    assert bench.loss_gap(optimized, plain) < 0.01


def test_compiled_dequant_matches_bitsandbytes_on_cuda():
    """quant.compiled_dequant on the GPU: eager torch ops give bitsandbytes' CUDA dequantization bit for bit; compiled
    (inductor fuses it into one kernel) the layer's output and input gradient stay within bf16 rounding of bnb's."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    from qlora_recipes import dequant

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(
        512, 384, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4", quant_storage=torch.bfloat16
    )
    layer.weight = bnb.nn.Params4bit(
        torch.randn(384, 512),
        requires_grad=False,
        compress_statistics=True,
        quant_type="nf4",
        quant_storage=torch.bfloat16,
    )
    layer = layer.cuda()  # bitsandbytes quantizes on the move to the GPU
    state = layer.weight.quant_state
    ours = dequant.dequantize(
        layer.weight, dequant.block_absmax(state), state.code, state.blocksize, state.shape, torch.bfloat16
    )
    assert torch.equal(ours, F.dequantize_4bit(layer.weight, state).to(torch.bfloat16))

    x = torch.randn(1, 300, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    expected = layer(x)
    expected.float().square().sum().backward()
    expected_grad, x.grad = x.grad.clone(), None
    dequant.install(layer)
    out = torch.compile(layer, fullgraph=True, dynamic=True)(x)
    out.float().square().sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(x.grad, expected_grad)


def test_offloaded_checkpoints_train_like_kept_ones(tmp_path, monkeypatch):
    """trainer.offload_checkpoints through the runner (tiny 4-bit Llama, reentrant checkpointing, bf16, packed), with
    one checkpoint a block and with trainer.checkpoint_sublayers (two; also with trainer.lean_recompute, whose
    recompute computes the last layers' gradients itself, under autocast, and with trainer.keep_projections, whose
    q/k/v outputs go to host memory beside the checkpoints): the checkpointed inputs do go to host memory (all but
    each forward's last, which the backward uses in place, come back), and every step's loss equals the one with the
    checkpoints kept on the GPU."""
    import json

    from conftest import TINY_TRAIN

    from qlora_recipes import cli, offload

    monkeypatch.setattr(offload, "MIN_BYTES", 1024)  # the tiny model's hidden states are far under 1 MiB
    made = []
    init = offload.CheckpointOffload.__init__
    monkeypatch.setattr(offload.CheckpointOffload, "__init__", lambda self, d: (init(self, d), made.append(self))[0])
    base = [
        *TINY_TRAIN,
        "trainer.gradient_checkpointing=true",
        "trainer.use_reentrant=true",
        "trainer.packing=true",
        "trainer.max_steps=8",
        "trainer.logging_steps=1",
        "trainer.task_eval_samples=0",
    ]
    curves = {}
    sublayers = ["trainer.offload_checkpoints=true", "trainer.checkpoint_sublayers=true"]
    lean = [*sublayers, "trainer.lean_recompute=true"]
    for name, extra in {
        "kept": ["trainer.offload_checkpoints=false"],
        "offloaded": ["trainer.offload_checkpoints=true"],
        "sublayers": sublayers,
        "lean": lean,
        "projections": [*lean, "trainer.keep_projections=[q_proj,k_proj,v_proj]"],
    }.items():
        out = tmp_path / name
        assert cli.main(["run", *base, *extra, f"output_dir={out}"]) == 0
        curves[name] = [row["loss"] for row in json.loads((out / "metrics.json").read_text())["train"]["loss_curve"]]
    assert len(made) == 4
    # 2 blocks: 2 checkpoints a micro-batch, or 4, or 4 and q/k/v's 3 outputs a block, of which the last checkpoint and
    # the 3 outputs stored just before it are used in place
    for off, stored, fetched in zip(made, (2, 4, 4, 10), (1, 3, 3, 6), strict=True):
        micro_batches = off.stored // stored
        assert micro_batches >= 8 and off.stored == stored * micro_batches
        assert off.fetched == fetched * micro_batches
    assert len(curves["offloaded"]) == 8
    assert curves["offloaded"] == pytest.approx(curves["kept"], rel=1e-4)
    assert curves["sublayers"] == pytest.approx(curves["kept"], rel=1e-4)
    assert curves["lean"] == pytest.approx(curves["kept"], rel=1e-4)
    assert curves["projections"] == pytest.approx(curves["kept"], rel=1e-4)


def test_traced_step_names_what_is_live_at_its_memory_peak(train_run):
    """trainer.profile_steps on CUDA: memory_peak.json replays the allocator's record of the traced step, and the
    replay agrees with torch's own counts (its end with memory_allocated, its peak within the run's peak)."""
    import json

    from qlora_recipes import profiling

    run_dir, metrics = train_run("trainer.max_steps=3", "trainer.profile_steps=[2]")
    report = json.loads((run_dir / "profile" / "memory_peak.json").read_text())
    assert (run_dir / "profile" / "memory_snapshot.pickle").stat().st_size > 0
    assert report["trace_entries"] > 0 and report["live_at_peak"]
    assert abs(report["replayed_end_gib"] - report["allocated_end_gib"]) <= 0.002
    assert report["before_gib"] <= report["peak_gib"] <= metrics["memory"]["peak_allocated_gib"] + 0.002
    assert report["untraced_live_at_peak_gib"] <= report["before_gib"]
    assert any(row["where"] != profiling.NO_FRAME for row in report["live_at_peak"])
