"""The training-memory estimate behind dist=auto, and the choice it makes."""

import pytest

from qlora_recipes import memory
from qlora_recipes.bench import SHAPES
from qlora_recipes.errors import RecipeError
from qlora_recipes.resolve import Device
from qlora_recipes.schema import BenchShape, DistBackend

# Peak allocated GiB measured by `bench` on the Llama-2-7B shape with the llama2_chatml settings, one H200
# (docs/gpu.md, "fourth session": the plain, liger_mb2 and liger_mb4 rows; Liger changed it by < 2%)
MEASURED_7B = {1: 6.14, 2: 7.81, 4: 11.36}


@pytest.mark.parametrize("micro_batch", sorted(MEASURED_7B))
def test_the_estimate_matches_the_measured_7b_peaks(recipe_of, micro_batch):
    recipe = recipe_of(
        "+recipe=llama2_chatml", f"trainer.micro_batch_size={micro_batch}", device=Device("cuda", 1, True)
    ).recipe
    estimate = memory.estimate(recipe, memory.ModelShape.from_config(SHAPES[BenchShape.llama2_7b]))
    assert estimate.total_gib == pytest.approx(MEASURED_7B[micro_batch], rel=0.03)


def test_sharding_divides_the_weights_not_the_activations(recipe_of):
    recipe = recipe_of("+recipe=llama2_chatml", device=Device("cuda", 2, True)).recipe
    shape = memory.ModelShape.from_config(SHAPES[BenchShape.llama2_7b])
    whole, halves = memory.estimate(recipe, shape), memory.estimate(recipe, shape, shards=2)
    assert halves.activations_gib == whole.activations_gib
    assert halves.weights_gib < whole.weights_gib / 2  # and no fp32 upcast of the embeddings when sharded


def test_auto_is_single_for_one_process_and_ddp_on_cpu(recipe_of):
    single = recipe_of("model=tiny_llama", "dist=auto")
    assert single.recipe.dist.backend is DistBackend.single and "dist auto -> single" in " ".join(single.notes)
    cpu_two = recipe_of("model=tiny_llama", "dist=auto", "dist.num_processes=2", "trainer.batch_size=16")
    assert cpu_two.recipe.dist.backend is DistBackend.ddp


def test_auto_picks_ddp_when_a_whole_model_fits_and_fsdp_when_not(recipe_of):
    args = ("+recipe=smollm2_chatml", "model=tiny_llama", "dist=auto", "trainer.batch_size=16")
    roomy = recipe_of(*args, device=Device("cuda", 2, True, memory_gib=80.0))
    assert roomy.recipe.dist.backend is DistBackend.ddp
    assert any(note.startswith("dist auto -> ddp: a whole model per GPU needs ~") for note in roomy.notes)
    tight = recipe_of(*args, device=Device("cuda", 2, True, memory_gib=0.01))
    assert tight.recipe.dist.backend is DistBackend.fsdp
    assert tight.recipe.quant.storage_dtype.value == tight.recipe.quant.compute_dtype.value == "bfloat16"
    assert any("sharded over 2 GPUs" in note for note in tight.notes)


def test_auto_shards_trainable_new_token_rows_with_zero3(recipe_of):
    tight = recipe_of(
        "model=tiny_llama",
        "dist=auto",
        "template.add_tokens=true",
        "trainer.batch_size=16",
        device=Device("cuda", 2, True, memory_gib=0.01),
    )
    assert tight.recipe.dist.backend is DistBackend.zero3
    assert any("new-token rows train, which FSDP v1 cannot shard" in note for note in tight.notes)


def test_auto_refuses_an_8bit_model_that_does_not_fit(recipe_of):
    with pytest.raises(RecipeError, match="8-bit weights cannot be sharded. Use quant=nf4"):
        recipe_of(
            "model=tiny_llama",
            "quant=int8",
            "dist=auto",
            "trainer.batch_size=16",
            device=Device("cuda", 2, True, memory_gib=0.01),
        )
