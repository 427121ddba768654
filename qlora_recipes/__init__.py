"""qlora_recipes: fine-tune LLMs from typed, composable Hydra recipes (QLoRA, LoRA, full; SFT)."""

__version__ = "0.1.0"
