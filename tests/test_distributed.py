"""dist=ddp: several processes through torchrun (gloo on CPU here); a failing rank ends the job promptly."""

import json
import signal
import time

import psutil
import pytest
from conftest import TINY_TRAIN

from qlora_recipes import cli, plan
from qlora_recipes.resolve import Device

DDP = ["dist=ddp", "dist.num_processes=2", "trainer.micro_batch_size=4"]


# trainer.checkpoint_sublayers under DDP: both sublayers of a block recompute inside DDP's one backward
SUBLAYERS = ("trainer.gradient_checkpointing=true", "trainer.use_reentrant=true", "trainer.checkpoint_sublayers=true")


@pytest.mark.parametrize(
    "extra",
    [(), SUBLAYERS, (*SUBLAYERS, "trainer.lean_recompute=true")],
    ids=["blocks", "sublayer_checkpoints", "lean_recompute"],
)
def test_ddp_on_two_cpu_processes(train_run, extra):
    run_dir, metrics = train_run(*DDP, *extra, "trainer.max_steps=20")
    assert metrics["train"]["steps"] == 20
    assert metrics["eval"]["loss_after"] < 0.8 * metrics["eval"]["loss_before"]
    state = json.loads((run_dir / "checkpoint-20" / "trainer_state.json").read_text())
    assert state["epoch"] == 1.0  # 160 samples / (4 per process x 2 processes) = 20 steps: the data was sharded
    assert (run_dir / "run.rank1.log").is_file() and (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    log = (run_dir / "run.log").read_text()
    assert ("blocks checkpointed as attention, then MLP" in log) == bool(extra)
    assert ("skip their discarded output in the recompute" in log) == ("trainer.lean_recompute=true" in extra)


def test_one_rank_dying_ends_the_job_promptly(tmp_path, spawn):
    run_dir = tmp_path / "run"
    err_file = tmp_path / "stderr.txt"
    args = ["run", *TINY_TRAIN, *DDP, "trainer.max_steps=100000", "data.max_train_samples=800", f"output_dir={run_dir}"]
    proc = spawn(args, err_file)
    deadline = time.time() + 180
    while not (run_dir / "run.log").is_file() or "Running training" not in (run_dir / "run.log").read_text():
        assert time.time() < deadline and proc.poll() is None, "training never started"
        time.sleep(0.2)
    time.sleep(2)
    rank1 = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.environ().get("RANK") == "1"]
    assert len(rank1) == 1
    rank1[0].send_signal(signal.SIGKILL)
    killed = time.time()
    proc.wait(timeout=120)
    err = err_file.read_text()
    assert time.time() - killed < 60  # no hang waiting on the dead rank's collectives
    assert proc.returncode not in (0, None)
    assert "training processes failed" in err and "rank" in err.lower() and "Traceback" not in err.split("error:")[-1]


def test_launch_plan():
    from qlora_recipes.compose import compose

    cfg, _ = compose(["+recipe=llama2_chatml", "dist=ddp", "trainer.batch_size=8"])
    from qlora_recipes.resolve import resolve

    gpu = resolve(cfg, Device("cuda", 2, True)).recipe
    assert gpu.dist.num_processes == 2  # 0 = every visible GPU
    assert plan.accelerate_config(gpu, on_cpu=False)["distributed_type"] == "MULTI_GPU"
    assert (
        plan.gradient_accumulation_steps(gpu) == 4 and plan.sft_kwargs(gpu, "r")["ddp_find_unused_parameters"] is False
    )
    assert plan.launch_command(gpu, "/r", on_cpu=False)[1:] == [
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        "/r/accelerate_config.yaml",
        "-m",
        "qlora_recipes",
        "train",
        "/r",
    ]
    single = resolve(compose(["+recipe=llama2_chatml"])[0], Device("cuda", 2, True)).recipe
    assert plan.launch_command(single, "/r", on_cpu=False) is None


@pytest.mark.parametrize(
    "overrides, device, message",
    [
        (["dist.num_processes=2"], Device(), "use dist=ddp"),
        (
            ["dist=ddp", "dist.num_processes=4", "trainer.batch_size=32"],
            Device("cuda", 2, True),
            r"2 GPU\(s\) are visible",
        ),
    ],
)
def test_process_count_rules(recipe_of, overrides, device, message):
    from qlora_recipes.errors import RecipeError

    with pytest.raises(RecipeError, match=message):
        recipe_of(*overrides, device=device)


def test_ddp_checkpoint_resumes_under_ddp(train_run):
    from qlora_recipes import cli, rundir

    run_dir, _ = train_run(*DDP, "trainer.max_steps=10", "trainer.save_steps=5", "trainer.task_eval_samples=0")
    (run_dir / "checkpoint-10" / "trainer_state.json").unlink()  # as if the job died while saving step 10
    assert rundir.latest_checkpoint(run_dir).name == "checkpoint-5"
    assert cli.main(["train", str(run_dir), "--resume"]) == 0
    state = json.loads((run_dir / "checkpoint-10" / "trainer_state.json").read_text())
    assert state["global_step"] == 10 and [h["step"] for h in state["log_history"] if "loss" in h][-1] == 10


def test_lazy_metrics_under_ddp_log_what_trl_logs(tmp_path):
    """trainer.lazy_metrics with 2 processes: the micro-batches' counts and sums are gathered across ranks on the
    device and read at the step's end; the logged loss, tokens (of both ranks), entropy and accuracy match TRL's."""
    history = {}
    for lazy in (False, True):
        run_dir = tmp_path / f"lazy_{lazy}"
        steps = ["trainer.max_steps=3", "trainer.logging_steps=1", "trainer.save_steps=3", "trainer.eval_strategy=no"]
        args = [*TINY_TRAIN, *DDP, *steps, "trainer.task_eval_samples=0", f"trainer.lazy_metrics={lazy}"]
        assert cli.main(["run", *args, f"output_dir={run_dir}"]) == 0
        state = json.loads((run_dir / "checkpoint-3" / "trainer_state.json").read_text())
        history[lazy] = [h for h in state["log_history"] if "loss" in h]
    assert len(history[False]) == len(history[True]) == 3
    for eager, lazy in zip(history[False], history[True], strict=True):
        assert eager["num_tokens"] == lazy["num_tokens"] > 0
        for key in ("loss", "entropy", "mean_token_accuracy"):
            assert lazy[key] == pytest.approx(eager[key], rel=1e-5), key


def _leave_without_teardown() -> None:
    """The end of a gloo test process whose checks all passed: a barrier (neither rank leaves while the other is
    still in a collective), then an exit that skips gloo's teardown. Under load that teardown can abort a process
    after its work is done ("terminate called without an active exception", SIGABRT: a fresh-clone CI run of
    1157273 lost a passing test to it, with a barrier before destroy_process_group already in place)."""
    import os
    import sys

    import torch.distributed as dist

    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _clip_both_ways(rank: int, world: int, rendezvous: str) -> None:
    """One gloo process: FSDP2 over a toy model with uneven shards and per-process data; the local-shard clipping
    (through the wrapped Accelerator.clip_grad_norm_) and torch's own over the DTensors give the same norm and the
    same clipped gradients."""
    import types

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from qlora_recipes.runner import fsdp2_clip_local_shards, fsdp2_grad_shards

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    # 7 and 5 rows: shards of 4 and 3, 3 and 2 rows
    model = torch.nn.Sequential(torch.nn.Linear(16, 7), torch.nn.ReLU(), torch.nn.Linear(7, 5), torch.nn.Linear(5, 3))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    torch.manual_seed(1 + rank)  # each process its own data, as data parallelism has it
    model(torch.randn(4, 16)).square().sum().backward()
    params = list(model.parameters())
    unclipped = [p.grad.to_local().clone() for p in params]
    calls = []
    accelerator = types.SimpleNamespace(  # accelerate's clip is only for what the local path does not take
        clip_grad_norm_=lambda params, max_norm, norm_type=2: calls.append(norm_type) or "accelerate's",
        unscale_gradients=lambda: calls.append("unscale"),
    )
    fsdp2_clip_local_shards(accelerator)
    assert accelerator.clip_grad_norm_(params, 0.1, norm_type=1) == "accelerate's"  # not the 2-norm
    total = accelerator.clip_grad_norm_(iter(params), 0.1)
    assert calls == [1, "unscale"]
    ours = [p.grad.full_tensor() for p in params]
    for param, grad in zip(params, unclipped, strict=True):
        param.grad.to_local().copy_(grad)
    reference_total = torch.nn.utils.clip_grad_norm_(params, max_norm=0.1).full_tensor()
    assert total > 1.0  # the norm is well above max_norm: the gradients were scaled
    assert torch.allclose(total, reference_total, rtol=1e-6), (total, reference_total)
    for mine, theirs in zip(ours, [p.grad.full_tensor() for p in params], strict=True):
        assert torch.allclose(mine, theirs, rtol=1e-5, atol=1e-8)
    assert fsdp2_grad_shards(params) is not None
    assert fsdp2_grad_shards([torch.nn.Parameter(torch.ones(2))]) is None  # no grad: nothing to clip
    plain = torch.nn.Parameter(torch.ones(2))
    plain.grad = torch.ones(2)
    assert fsdp2_grad_shards([plain]) is None  # not FSDP2's: accelerate's clipping
    _leave_without_teardown()


def test_fsdp2_clipping_from_local_shards_matches_torchs(tmp_path):
    """runner.fsdp2_clip_local_shards (FSDP2's clipping without DTensor dispatch) against
    torch.nn.utils.clip_grad_norm_ on the same DTensor gradients, two gloo processes on CPU."""
    import torch.multiprocessing as mp

    mp.spawn(_clip_both_ways, args=(2, str(tmp_path / "rendezvous")), nprocs=2)


def _accumulate_both_ways(rank: int, world: int, rendezvous: str) -> None:
    """One gloo process: FSDP2 gradients of two micro-batches, reduced after each (dist.sync_each_micro_batch) and
    reduced once after both (accelerate's no_sync on the first), with bf16 parameters and a bf16 reduce (the policy
    the runner ends up with for QLoRA) or a float32 one."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(1 + rank)
    batches = [torch.randn(4, 16) for _ in range(2)]
    for reduce_dtype in (torch.bfloat16, torch.float32):
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=reduce_dtype)
        grads = {}
        for sync_each in (True, False):
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(16, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
            fully_shard(model[0], mesh=mesh, mp_policy=policy)
            fully_shard(model, mesh=mesh, mp_policy=policy)
            for i, batch in enumerate(batches):
                model.set_requires_gradient_sync(sync_each or i == len(batches) - 1)
                model(batch).float().square().sum().backward()
            grads[sync_each] = [p.grad.full_tensor().float() for p in model.parameters()]
        for each, once in zip(grads[True], grads[False], strict=True):
            assert each.abs().sum() > 0 and torch.allclose(each, once, rtol=1e-2, atol=1e-3), (reduce_dtype, each, once)
    _leave_without_teardown()


def test_fsdp2_gradients_reduced_each_micro_batch_equal_the_accumulated_ones(tmp_path):
    """What dist.sync_each_micro_batch changes under FSDP2 is when gradients are reduced, not what they are: two
    gloo processes on CPU."""
    import torch.multiprocessing as mp

    mp.spawn(_accumulate_both_ways, args=(2, str(tmp_path / "rendezvous")), nprocs=2)


def test_fsdp2_clipping_falls_back_to_accelerates_for_other_gradients():
    """The wrapped Accelerator.clip_grad_norm_ hands anything but FSDP2 shards and the 2-norm (here plain
    gradients) to accelerate's own, with its arguments, and leaves the gradients to it."""
    import types

    import torch

    from qlora_recipes.runner import fsdp2_clip_local_shards

    calls = []
    accelerator = types.SimpleNamespace(
        clip_grad_norm_=lambda params, max_norm, norm_type=2: (
            calls.append((len(params), max_norm, norm_type)) or "accelerate's"
        )
    )
    fsdp2_clip_local_shards(accelerator)
    param = torch.nn.Parameter(torch.ones(3))
    param.grad = torch.ones(3)
    assert accelerator.clip_grad_norm_(iter([param]), 1.0) == "accelerate's"
    assert accelerator.clip_grad_norm_([param], 1.0, norm_type=1) == "accelerate's"
    assert calls == [(1, 1.0, 2), (1, 1.0, 1)] and torch.equal(param.grad, torch.ones(3))
