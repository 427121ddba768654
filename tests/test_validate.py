import pytest

from qlora_recipes.errors import RecipeError
from qlora_recipes.resolve import Device

GPU = Device(kind="cuda", count=1, bf16=True)


@pytest.mark.parametrize(
    "overrides, device, message",
    [
        (("lora.r=-1",), None, "lora.r=-1"),
        (("trainer.profile_python=true",), None, "trainer.profile_steps names none"),
        (("lora.dropout=1.0",), None, "lora.dropout=1.0"),
        (("trainer.learning_rate=0",), None, "trainer.learning_rate=0"),
        (("trainer.batch_size=6", "trainer.micro_batch_size=4"), None, "not a multiple"),
        (("quant.load_in_8bit=true",), None, "both set"),
        (("lora=none",), None, "full fine-tuning"),
        (("trainer.precision=fp16",), None, "needs a CUDA GPU"),
        (("trainer.precision=bf16",), Device("cuda", 1, False), "has no bf16"),
        (("backend=unsloth",), None, "unsloth needs a CUDA GPU"),
        (("backend=unsloth",), GPU, "unsloth package is not installed"),
        (("backend=unsloth", "dist.num_processes=2", "trainer.batch_size=16"), GPU, "single process"),
        (("model.attn_implementation=flash_attention_2",), GPU, "flash-attn is not installed"),
        (("trainer.torch_compile=true",), Device(compiler=False), "needs a C/C++ compiler on PATH"),
        (("model.attn_implementation=varlen",), None, "needs a CUDA GPU and torch >= 2.10"),
        (("model.attn_implementation=varlen", "trainer.packing=false"), GPU, "needs trainer.packing=true"),
        (("model.attn_implementation=varlen", "trainer.packing=true", "trainer.precision=fp32"), GPU, "bf16 or fp16"),
        (("quant.compiled_dequant=true",), None, "it needs trainer.torch_compile=true"),
        (("quant=none", "quant.compiled_dequant=true", "trainer.torch_compile=true"), None, "no 4-bit nf4 weights"),
        (("quant=fp4", "quant.compiled_dequant=true", "trainer.torch_compile=true"), None, "no 4-bit nf4 weights"),
        (
            ("quant.compiled_dequant=true", "trainer.torch_compile=true", "dist=zero3", "dist.num_processes=2"),
            GPU,
            "one whole model per GPU",
        ),
        (("trainer.liger=true",), None, "Triton GPU kernels, used here for SFT on CUDA only"),
        (("trainer.liger=true",), GPU, "liger-kernel package is not installed"),
        (("+recipe=smollm2_dpo", "trainer.liger=true"), GPU, "SFT on CUDA only"),
        (("trainer.liger=true", "trainer.torch_compile=true"), GPU, "fails in Liger's RMSNorm autograd function"),
        (("+recipe=smollm2_dpo", "trainer.lazy_metrics=true"), None, "DPO and ORPO read theirs as TRL does"),
        (("trainer.activation_memory_budget=0.5",), None, "used with trainer.torch_compile=true"),
        (("trainer.activation_memory_budget=0", "trainer.torch_compile=true"), None, "Set a value in (0, 1]"),
        (
            ("lora.dropout=0.1", "trainer.activation_memory_budget=0.5", "trainer.torch_compile=true"),
            None,
            "pytorch#190758",
        ),
        (("lora.lean_dropout=true", "lora.dropout=0"), None, "lora.lean_dropout=true folds"),
        (("lora.lean_dropout=true", "lora.dropout=0.1", "lora.use_dora=true"), None, "lora.use_dora=true, backend"),
        (("lora.lean_dropout=true", "lora=none"), None, "lora.enabled=false"),
        (
            ("lora.lean_dropout=true", "lora.dropout=0.1", "dist=zero3", "dist.num_processes=2"),
            GPU,
            "backend=hf, dist=zero3. It needs",
        ),
        (("lora.fused_add=true", "lora=none"), None, "lora.enabled=false, backend=hf"),
        (("lora.fused_add=true", "dist=zero3", "dist.num_processes=2"), GPU, "dist=zero3. It needs LoRA, backend=hf"),
        (("lora.add_in_base=true",), None, "quant.compiled_dequant=false, lora.fused_add=false"),
        (
            (
                "lora.add_in_base=true",
                "lora.fused_add=true",
                "quant.compiled_dequant=true",
                "trainer.torch_compile=true",
            ),
            None,
            "lora.fused_add=true, lora.lean_dropout=false. It needs",
        ),
        (("lora.add_in_base=true", "lora=none"), None, "lora.enabled=false, quant.compiled_dequant"),
        (("lora.hash_dropout=true", "lora.dropout=0"), None, "lora.hash_dropout=true draws"),
        (("lora.hash_dropout=true", "lora=none"), None, "lora.enabled=false, lora.dropout"),
        (("lora.hash_dropout=true", "lora.dropout=0.1", "lora.lean_dropout=true"), None, "lora.lean_dropout=true. It"),
        (("lora.hash_dropout=true", "lora.dropout=0.1", "backend=unsloth"), GPU, "backend=unsloth"),
        (("trainer.checkpoint_sublayers=true",), None, "trainer.gradient_checkpointing=false, backend=hf"),
        (
            ("+recipe=llama2_chatml", "trainer.checkpoint_sublayers=true", "dist=zero3", "dist.num_processes=2"),
            GPU,
            "dist=zero3. It needs gradient checkpointing",
        ),
        (("+recipe=llama2_chatml", "trainer.checkpoint_sublayers=true", "backend=unsloth"), GPU, "backend=unsloth"),
        (("trainer.lean_recompute=true",), None, "trainer.checkpoint_sublayers=false"),
        (
            ("+recipe=llama2_chatml", "trainer.checkpoint_sublayers=true", "trainer.lean_recompute=true")
            + ("trainer.use_reentrant=false",),
            None,
            "trainer.use_reentrant=false, lora.enabled=true",
        ),
        (
            ("+recipe=llama2_chatml", "trainer.checkpoint_sublayers=true", "trainer.lean_recompute=true", "lora=none"),
            None,
            "lora.enabled=false",
        ),
        (("trainer.offload_checkpoints=true",), GPU, "trainer.gradient_checkpointing=false, trainer.use_reentrant"),
        (
            ("+recipe=llama2_chatml", "trainer.offload_checkpoints=true", "trainer.use_reentrant=false"),
            GPU,
            "non-reentrant",
        ),
        (("+recipe=llama2_chatml", "trainer.offload_checkpoints=true"), None, "host memory already"),
        (("+recipe=llama2_chatml", "trainer.offload_checkpoints=true", "backend=unsloth"), GPU, "Unsloth offloads"),
        (("template=tokenizer", "template.add_tokens=true"), None, "add_tokens=false"),
        (("trainer.loss_on=assistant", "data.format=text"), None, "no assistant turns"),
        (("trainer.eval_strategy=steps",), None, "eval_steps"),
        (("data.metric=none",), None, "task_eval_samples"),
        (("resume_from_checkpoint=auto",), None, "output_dir"),
        (("data.test_fraction=1.5",), None, "test_fraction"),
        (("trainer.max_steps=0",), None, "max_steps=0"),
        (("dist.fsdp_offload_params=true",), None, "dist.fsdp_offload_params=true with dist=single: only dist=fsdp"),
        (
            ("dist=fsdp", "dist.fsdp_reshard_after_forward=false", "dist.num_processes=2", "trainer.batch_size=16"),
            Device("cuda", 2, True),
            "FSDP v1 always reshards",
        ),
        (("dist.zero3_prefetch_bucket_size=1000",), None, "dist.zero3_prefetch_bucket_size with dist=single"),
        (("dist=single", "dist.num_machines=2", "dist.main_process_ip=10.0.0.1"), GPU, "runs on one machine"),
        (("dist=ddp", "dist.num_machines=2", "dist.main_process_ip=10.0.0.1", "dist.num_processes=1"), None, "on CPU"),
        (("trainer=dpo",), None, "data.format=messages"),  # the SFT demo data set with DPO
        (("data=demo_dates_pref",), None, "preference pairs train with trainer=dpo or orpo"),
        (("trainer=orpo",), None, "trainer=orpo with data.format=messages"),
        (("+recipe=smollm2_dpo", "trainer=orpo", "trainer.packing=true"), None, "trainer=orpo with trainer.packing"),
        (("+recipe=smollm2_dpo", "trainer=orpo", "trainer.liger=true"), GPU, "SFT on CUDA only"),
        (("+recipe=smollm2_dpo", "lora=none", "quant=none"), None, "second full copy"),
        (("+recipe=smollm2_dpo", "trainer.packing=true"), None, "not packed"),
        (("+recipe=smollm2_dpo", "template.add_tokens=true"), None, "lm_head.weight"),
        (("+recipe=smollm2_dpo", "trainer.beta=0"), None, "trainer.beta=0"),
        (("+recipe=smollm2_dpo", "trainer.max_prompt_len=0"), None, "trainer.max_prompt_len=0"),
    ],
)
def test_rule_violations_explain_the_fix(recipe_of, overrides, device, message):
    with pytest.raises(RecipeError) as info:
        recipe_of(*overrides, device=device)
    assert message in str(info.value)


def test_every_problem_is_reported_at_once(recipe_of):
    with pytest.raises(RecipeError) as info:
        recipe_of("lora.r=0", "lora.dropout=2", "trainer.learning_rate=-1", "quant.load_in_8bit=true")
    text = str(info.value)
    assert "4 problems" in text
    for key in ("lora.r=0", "lora.dropout=2", "trainer.learning_rate=-1.0", "load_in_8bit"):
        assert key in text


def test_valid_recipe_passes(recipe_of):
    assert recipe_of("lora.r=16", "trainer.batch_size=16", "trainer.micro_batch_size=4").recipe.lora.r == 16


def test_liger_reaches_the_trainer_config_when_installed(recipe_of, monkeypatch):
    import importlib.util

    from qlora_recipes import plan

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "liger_kernel" else real(name, *a)
    )
    recipe = recipe_of("trainer.liger=true", device=GPU).recipe
    assert plan.training_kwargs(recipe, "out")["use_liger_kernel"] is True
    assert "use_liger_kernel" not in plan.training_kwargs(recipe_of(device=GPU).recipe, "out")


def test_compiler_probe_reads_path_and_cxx(tmp_path, monkeypatch):
    from qlora_recipes.resolve import has_compiler

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    assert not has_compiler()
    tool = tmp_path / "my-cxx"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    monkeypatch.setenv("CXX", "my-cxx")
    assert has_compiler()


def test_checkpoint_offload_resolves_with_reentrant_checkpointing_on_a_gpu(recipe_of):
    recipe = recipe_of("+recipe=llama2_chatml", "trainer.offload_checkpoints=true", device=GPU).recipe
    assert recipe.trainer.offload_checkpoints and recipe.trainer.use_reentrant


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("trainer.lr_scheduler=cosine_with_min_lr",), "needs one of min_lr"),
        (
            (
                "trainer.lr_scheduler=cosine_with_min_lr",
                "+trainer.lr_scheduler_kwargs.min_lr=1e-5",
                "+trainer.lr_scheduler_kwargs.min_lr_rate=0.1",
            ),
            "needs one of min_lr",
        ),
        (("trainer.lr_scheduler=warmup_stable_decay",), "needs num_decay_steps"),
        (
            ("trainer.lr_scheduler=warmup_stable_decay", "+trainer.lr_scheduler_kwargs.num_decay_steps=0.5"),
            "needs num_decay_steps",
        ),
        (("+trainer.lr_scheduler_kwargs.power=2",), "power, which lr_scheduler=cosine does not use"),
        (("trainer.lr_scheduler=constant", "+trainer.lr_scheduler_kwargs.num_cycles=2"), "it takes none"),
    ],
)
def test_scheduler_arguments_are_checked_before_training(recipe_of, overrides, message):
    with pytest.raises(RecipeError) as info:
        recipe_of(*overrides)
    assert message in str(info.value)


def test_scheduler_argument_table_matches_transformers():
    import inspect

    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION
    from transformers.trainer_utils import SchedulerType

    from qlora_recipes.schema import SCHEDULER_ARGS, Scheduler

    assert set(SCHEDULER_ARGS) == {s.value for s in Scheduler}
    own = {"optimizer", "num_warmup_steps", "num_training_steps", "last_epoch"}
    for name, args in SCHEDULER_ARGS.items():
        params = inspect.signature(TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]).parameters
        assert set(args) == set(params) - own, name


@pytest.mark.parametrize(
    "overrides",
    [
        ("trainer.lr_scheduler=cosine_with_min_lr", "+trainer.lr_scheduler_kwargs.min_lr_rate=0.1"),
        ("trainer.lr_scheduler=warmup_stable_decay", "+trainer.lr_scheduler_kwargs.num_decay_steps=3"),
        ("trainer.lr_scheduler=polynomial", "+trainer.lr_scheduler_kwargs.power=2.0"),
    ],
)
def test_scheduler_arguments_reach_the_trainers_scheduler(recipe_of, overrides):
    import torch
    from transformers import get_scheduler
    from trl import SFTConfig

    from qlora_recipes import plan

    recipe = recipe_of(*overrides).recipe
    args = SFTConfig(**plan.training_kwargs(recipe, "/tmp/unused", on_cpu=True))
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
    # as Trainer.create_scheduler builds it; it raised for these schedulers before their arguments could be set
    scheduler = get_scheduler(
        args.lr_scheduler_type, optimizer, 1, 10, scheduler_specific_kwargs=args.lr_scheduler_kwargs
    )
    rates = []
    for _ in range(10):
        optimizer.step()
        scheduler.step()
        rates.append(scheduler.get_last_lr()[0])
    assert rates[-1] < rates[0]
    if "cosine_with_min_lr" in overrides[0]:
        assert rates[-1] == pytest.approx(0.1 * args.learning_rate)


def test_full_fine_tuning_without_bf16_keeps_float32_weights_under_fp16(recipe_of):
    old_gpu = Device(kind="cuda", count=1, bf16=False)
    full = recipe_of("lora=none", "quant=none", device=old_gpu).recipe
    assert (full.model.dtype.value, full.trainer.precision.value) == ("float32", "fp16")
    qlora = recipe_of(device=old_gpu).recipe  # LoRA's adapters train in float32 over fp16 weights
    assert (qlora.model.dtype.value, qlora.trainer.precision.value) == ("float16", "fp16")
    with pytest.raises(RecipeError, match="cannot unscale"):
        recipe_of("lora=none", "quant=none", "model.dtype=float16", "trainer.precision=fp16", device=old_gpu)


def test_unsloth_refuses_what_its_path_would_drop(recipe_of):
    with pytest.raises(RecipeError) as info:
        recipe_of(
            "+recipe=llama2_chatml",
            "backend=unsloth",
            "quant=int8",
            "lora.use_dora=true",
            "lora.last_n_layers=2",
            device=GPU,
        )
    text = str(info.value)
    for what in ("quant=int8", "lora.use_dora=true", "lora.last_n_layers", "trainable new-token rows"):
        assert f"backend=unsloth does not support {what}" in text
    with pytest.raises(RecipeError, match="backend=unsloth with lora=none"):
        recipe_of("backend=unsloth", "lora=none", "quant=none", device=GPU)


def test_unsloth_path_resizes_for_the_templates_tokens_and_passes_bias_and_rslora(
    recipe_of, tiny_checkpoint, monkeypatch
):
    import sys
    import types
    from dataclasses import replace

    from transformers import AutoModelForCausalLM

    from qlora_recipes import runner
    from qlora_recipes.resolve import Resolved
    from qlora_recipes.schema import Backend

    calls = {}

    class FastLanguageModel:  # unsloth's two entry points, as setup_unsloth_model calls them
        @staticmethod
        def from_pretrained(model_name, max_seq_length, dtype, load_in_4bit):
            calls["load_in_4bit"] = load_in_4bit
            return AutoModelForCausalLM.from_pretrained(model_name), None

        @staticmethod
        def get_peft_model(model, **kwargs):
            calls.update(kwargs)
            return model

    monkeypatch.setitem(sys.modules, "unsloth", types.SimpleNamespace(FastLanguageModel=FastLanguageModel))
    recipe = recipe_of(
        "model=tiny_llama",
        "template.add_tokens=true",
        "lora.train_new_tokens=false",
        "lora.use_rslora=true",
        "lora.bias=lora_only",
    ).recipe
    recipe = replace(recipe, backend=Backend.unsloth)  # resolve would refuse it here: unsloth needs CUDA
    tokenizer, new_ids = runner.setup_tokenizer(recipe, tiny_checkpoint)
    assert new_ids  # chatml's tokens are new to the tiny Llama's tokenizer
    model = runner.setup_model(Resolved(recipe=recipe, device=GPU), tiny_checkpoint, tokenizer, new_ids)
    assert model.get_input_embeddings().weight.shape[0] >= len(tokenizer)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert (calls["bias"], calls["use_rslora"], calls["load_in_4bit"]) == ("lora_only", True, True)
