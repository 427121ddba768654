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


@pytest.fixture
def packed_bounds():
    """The boundaries TRL's padding-free collator sends with a packed row of sequences of these lengths."""
    import torch

    def make(lengths, device="cpu"):
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
        return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max(lengths), "max_length_k": max(lengths)}

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint():
    from qlora_recipes.models import tiny_checkpoint as build

    return str(build())


# A short tiny-model training run: overrides every train-through-the-CLI test starts from.
TINY_TRAIN = [
    "model=tiny_llama",
    "template.add_tokens=false",
    "lora.last_n_layers=null",
    "trainer.learning_rate=1e-2",
    "trainer.loss_on=all",  # the template tokens are learnable even for a random 2-layer model
    "trainer.task_eval_samples=4",
    "trainer.max_new_tokens=4",
    "data.max_train_samples=160",
    "data.max_eval_samples=16",
    "logger=none",
]


@pytest.fixture
def train_run(tmp_path):
    """train_run(*overrides, base=TINY_TRAIN) -> (run_dir, metrics): `run` through the CLI, in-process."""
    import json

    from qlora_recipes import cli

    def run(*overrides, base=TINY_TRAIN):
        run_dir = tmp_path / "run"
        assert cli.main(["run", *base, *overrides, f"output_dir={run_dir}"]) == 0
        return run_dir, json.loads((run_dir / "metrics.json").read_text())

    return run


@pytest.fixture
def spawn():
    """spawn(args, stderr_path) -> Popen of `python -m qlora_recipes ARGS`; output goes to a file (an unread
    pipe would fill and block the child). Whatever is still running at teardown is killed, children too."""
    import subprocess
    import sys

    import psutil

    started = []

    def start(args, stderr_path):
        with open(stderr_path, "w") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "qlora_recipes", *args], stdout=subprocess.DEVNULL, stderr=err
            )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
            proc.wait()


def tiny_model(recipe_of, checkpoint, *overrides):
    """(recipe, model): the tiny Llama with its LoRA adapter as the runner builds it (no dropout unless overridden)."""
    import torch

    from qlora_recipes.runner import setup_model, setup_tokenizer

    resolved = recipe_of("model=tiny_llama", "template.add_tokens=false", "lora.dropout=0", *overrides)
    tokenizer, new_ids = setup_tokenizer(resolved.recipe, checkpoint)
    torch.manual_seed(0)
    return resolved.recipe, setup_model(resolved, checkpoint, tokenizer, new_ids)


def as_trained(model):
    """Input gradients and train mode, as the Trainer sets them; lora_B made non-zero, so that lora_A's gradients are
    not zero."""
    import torch

    model.enable_input_require_grads()
    model.train()
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)


def trains_and_reloads(train_run, *overrides, logged):
    """A 6-step CLI run of the 4-bit tiny model with `overrides`: its run.log says `logged`, the loss falls, and the
    saved adapter (PEFT's own format) reloads to the same logits."""
    import json

    from qlora_recipes import cli

    run_dir, metrics = train_run(
        "quant=nf4", *overrides, "trainer.max_steps=6", "trainer.logging_steps=1", "trainer.task_eval_samples=0"
    )
    assert logged in (run_dir / "run.log").read_text()
    assert metrics["train"]["steps"] == 6
    assert metrics["train"]["last_logged_loss"] < metrics["train"]["first_logged_loss"]
    assert cli.main(["eval", str(run_dir), "samples=0"]) == 0
    assert json.loads((run_dir / "eval.json").read_text())["reload_max_abs_logit_diff"] < 1e-4


def installs_without_changing_names_or_outputs(model, install, layers):
    """`install(model)` on the model as trained reports `layers` layers, and again on the installed model (nothing
    changes the second time); the state dict's names and the eval logits stay as they were."""
    import torch

    as_trained(model)
    names = list(model.state_dict())
    model.eval()
    ids = torch.arange(3, 40).unsqueeze(0)
    before = model(input_ids=ids).logits
    assert install(model) == layers
    assert install(model) == layers
    assert list(model.state_dict()) == names
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)  # eval: no dropout either way


def train_checkpointed(model, reentrant=True):
    """as_trained, with gradient checkpointing (reentrant by default, as llama2_chatml)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    as_trained(model)


def loss_and_grads(model, length=50):  # not 64, the hidden size: dynamo would equate the two
    """One forward and backward on the token ids 3..: the loss and every trainable parameter's gradient."""
    import torch

    ids = torch.arange(3, 3 + length, device=model.device).unsqueeze(0)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return loss.detach(), grads


def checkpointed_grads_match(model):
    """With reentrant checkpointing turned on, a seeded step's gradients equal those of the same step without it
    (the recompute draws the forward's dropout masks again); returns the gradients without checkpointing."""
    import torch

    torch.manual_seed(1)
    _, whole = loss_and_grads(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    torch.manual_seed(1)
    _, checkpointed = loss_and_grads(model)
    assert checkpointed.keys() == whole.keys() and len(whole) == 28
    for name, grad in checkpointed.items():
        torch.testing.assert_close(grad, whole[name], rtol=1e-5, atol=1e-7)
    return whole


def saved_bytes(model, length=50):
    """Bytes of the tensors one training forward keeps for its backward, the parameters' own storage left out."""
    import torch

    from qlora_recipes.profiling import SavedBytes

    saved = SavedBytes({p.untyped_storage().data_ptr() for p in model.parameters()})
    ids = torch.arange(3, 3 + length).unsqueeze(0)
    with saved.hooks():  # the forward only: what it keeps
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad()
    return saved.total
