"""Data: load splits (hub, save_to_disk dirs, jsonl/json/parquet/csv), detect the format, render with the
chat template and tokenize into `input_ids` + `labels` (-100 where no loss).

Tokenizing here rather than inside TRL makes `add_special_tokens`, `append_concat_token` and
assistant-only loss do what they say (current TRL ignores the first two), and lets us count and report
samples longer than max_seq_len. TRL then only packs (if asked) and collates.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlora_recipes.errors import DataError
from qlora_recipes.schema import DataConfig, DataFormat, LossOn, RecipeConfig, TrainerKind

log = logging.getLogger(__name__)

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
REQUIRED = {
    DataFormat.messages: "a messages column (data.messages_field) of [{role, content}, ...]",
    DataFormat.text: "a text column (data.text_field)",
    DataFormat.alpaca: "instruction and output columns (input optional)",
    DataFormat.prompt_completion: "prompt and completion columns",
    DataFormat.preference: "prompt, chosen and rejected columns",
}
PREFERENCE_COLUMNS = {"prompt", "chosen", "rejected"}


@dataclass
class Prepared:
    """Tokenized splits plus what the runner reports and evaluates."""

    train: Any
    eval: Any | None
    raw_eval: Any | None
    format: DataFormat
    stats: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- loading


def check_jsonl(path: Path) -> None:
    """Malformed JSONL is reported with file and line, before datasets' generic parser error."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: each line must be a JSON object, got {type(row).__name__}")


def _load_file(path: Path, disable_cache: bool) -> Any:
    import datasets

    builder = FILE_BUILDERS.get(path.suffix)
    if builder is None:
        raise DataError(f"data file {path} has an unsupported extension; use one of {', '.join(FILE_BUILDERS)}")
    if path.stat().st_size == 0:
        raise DataError(f"data file {path} is empty")
    if path.suffix == ".jsonl":
        check_jsonl(path)
    try:
        loaded = datasets.load_dataset(
            builder,
            data_files=str(path),
            split="train",
            download_mode="force_redownload" if disable_cache else None,
        )
    except Exception as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if builder == "json" and has_dates(loaded.features):
        # pyarrow's JSON reader turns strings that look like dates ("2049-08-04") into timestamps, which
        # would change the text the model sees: rebuild the table from the JSON as written
        text = path.read_text(encoding="utf-8")
        rows = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" else None
        rows = rows if rows is not None else json.loads(text)
        if isinstance(rows, list):  # a .json object of columns keeps datasets' reading
            log.info("%s: strings that look like dates are kept as written (pyarrow read them as timestamps)", path)
            loaded = datasets.Dataset.from_list(rows)
    return loaded


def has_dates(feature: Any) -> bool:
    """True if a datasets feature (nested dicts and lists included) holds a timestamp or date type."""
    if isinstance(feature, dict):
        return any(has_dates(f) for f in feature.values())
    if isinstance(feature, (list, tuple)):
        return any(has_dates(f) for f in feature)
    inner = getattr(feature, "feature", None)  # List / Sequence
    if inner is not None:
        return has_dates(inner)
    return str(getattr(feature, "dtype", "")).startswith(("timestamp", "date"))


def _split_source(root: Path, split: str) -> Path | None:
    if (root / split).is_dir():
        return root / split
    for suffix in FILE_BUILDERS:
        if (root / f"{split}{suffix}").is_file():
            return root / f"{split}{suffix}"
    return None


def _load_split(data: DataConfig, split: str) -> Any:
    import datasets

    root = Path(data.name).expanduser()
    if root.is_file():
        return _load_file(root, data.disable_cache)
    if root.is_dir():
        source = _split_source(root, split)
        if source is None and (root / "dataset_dict.json").is_file():
            loaded = datasets.load_from_disk(str(root))
            if split not in loaded:
                raise DataError(f"{root} has splits {list(loaded)}, not {split!r}: fix data.splits")
            return loaded[split]
        if source is None:
            present = sorted(p.name for p in root.iterdir())[:20]
            raise DataError(
                f"split {split!r} not found in {root}: expected a save_to_disk folder {split}/ or a file "
                f"{split}.jsonl/.json/.parquet/.csv; found {present}"
            )
        if source.is_dir():
            try:
                return datasets.load_from_disk(str(source))
            except Exception as exc:
                raise DataError(f"cannot load {source} with datasets.load_from_disk: {exc}") from None
        return _load_file(source, data.disable_cache)
    if data.name.startswith((".", "/", "~")) or data.name.endswith(tuple(FILE_BUILDERS)):
        raise DataError(f"data.name={data.name!r}: no such file or directory")
    try:
        return datasets.load_dataset(data.name, split=split)
    except Exception as exc:
        raise DataError(
            f"data.name={data.name!r} is not a local path and loading it from the hub failed: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}\n"
            f"  Offline? Point data.name at a local copy (save_to_disk folder per split, or {split}.jsonl)."
        ) from None


def load_splits(data: DataConfig, seed: int) -> tuple[Any, Any | None]:
    """(train, test) as the original: a split whose name contains 'train' trains, the others evaluate."""
    import datasets

    if data.disable_cache:
        datasets.disable_caching()
    root = Path(data.name).expanduser()
    train, tests = None, []
    splits = ["train"] if root.is_file() else list(data.splits)
    for split in splits:
        loaded = _load_split(data, split)
        if "train" in split:
            train = loaded if train is None else datasets.concatenate_datasets([train, loaded])
        else:
            tests.append(loaded)
    if train is None:
        raise DataError(f"data.splits={list(data.splits)} names no training split (a name containing 'train')")
    test = datasets.concatenate_datasets(tests) if tests else None
    if data.test_fraction is not None:
        if len(train) < 2:
            raise DataError("data.test_fraction needs at least 2 training rows")
        parts = train.train_test_split(test_size=data.test_fraction, seed=seed)
        train, test = parts["train"], parts["test"]
    if len(train) == 0:
        raise DataError(f"the training split of {data.name} is empty")
    if test is not None and len(test) == 0:
        test = None
    return train, test


# ---------------------------------------------------------------- formats


def detect_format(columns: list[str], data: DataConfig, trainer: TrainerKind = TrainerKind.sft) -> DataFormat:
    """The data set's format from data.format or its columns; preference data goes with trainer=dpo|orpo only."""
    cols = set(columns)
    preference = {"chosen", "rejected"} <= cols
    if trainer.on_pairs:
        if not PREFERENCE_COLUMNS <= cols:
            shape = "SFT-shaped rows" if not preference else "chosen/rejected without a prompt column"
            raise DataError(
                f"trainer={trainer.value} needs preference rows ({REQUIRED[DataFormat.preference]}); {data.name} has {shape} "
                f"(columns {sorted(cols)}). Use trainer=sft for this data set, or a preference data set"
            )
        return DataFormat.preference
    if preference:
        raise DataError(
            f"{data.name} is preference data (chosen/rejected columns): trainer=sft needs messages, text, alpaca "
            "or prompt/completion rows. Use trainer=dpo or trainer=orpo for preference pairs"
        )
    if data.format is not DataFormat.auto:
        needed = {
            DataFormat.messages: {data.messages_field},
            DataFormat.text: {data.text_field},
            DataFormat.alpaca: {"instruction", "output"},
            DataFormat.prompt_completion: {"prompt", "completion"},
        }[data.format]
        if not needed <= cols:
            raise DataError(
                f"data.format={data.format.value} needs {REQUIRED[data.format]}; the data set has columns "
                f"{sorted(cols)}. Fix data.format (or auto) or the column names"
            )
        return data.format
    if data.messages_field in cols:
        return DataFormat.messages
    if {"prompt", "completion"} <= cols:
        return DataFormat.prompt_completion
    if {"instruction", "output"} <= cols:
        return DataFormat.alpaca
    if data.text_field in cols:
        return DataFormat.text
    raise DataError(
        f"cannot tell the format of {data.name}: columns {sorted(cols)}. Expected one of: "
        + "; ".join(REQUIRED.values())
        + ". Set data.format and data.text_field / data.messages_field to match"
    )


def to_messages(row: dict[str, Any], fmt: DataFormat, data: DataConfig) -> list[dict[str, str]] | None:
    """A row as a conversation, or None for plain text rows."""
    if fmt is DataFormat.messages:
        messages = row[data.messages_field]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise DataError(f"{data.name}: {data.messages_field!r} must be a list of {{role, content}} dicts")
        return [{"role": m["role"], "content": m.get("content") or ""} for m in messages]
    if fmt is DataFormat.alpaca:
        prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
    if fmt is DataFormat.prompt_completion:
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, list):  # conversational prompt/completion
            return list(prompt) + list(completion)
        return None
    if fmt is DataFormat.preference:  # the prompt and the chosen answer
        prompt, chosen = row["prompt"], row["chosen"]
        if isinstance(prompt, list):
            return list(prompt) + list(chosen)
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": chosen}]
    return None


def render(row: dict[str, Any], fmt: DataFormat, data: DataConfig, tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    """The training text and the character spans that belong to the answer (assistant turns/completion)."""
    messages = to_messages(row, fmt, data)
    if messages is None:
        if fmt is DataFormat.text:
            return str(row[data.text_field]), []
        prompt, completion = str(row["prompt"]), str(row["completion"])
        return prompt + completion, [(len(prompt), len(prompt) + len(completion))]

    def apply(msgs: list[dict[str, str]], gen: bool = False) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    text = apply(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(apply(messages[:i], gen=True)) if i else 0
        upto = apply(messages[: i + 1])
        if not text.startswith(upto):
            raise DataError(
                "the chat template does not render conversations prefix-stably (an earlier turn renders "
                "differently once later turns exist), so assistant tokens cannot be located: use "
                "trainer.loss_on=all or another template"
            )
        spans.append((start, len(upto)))
    return text, spans


# ---------------------------------------------------------------- tokenize


def tokenize_row(text: str, spans: list[tuple[int, int]], tokenizer: Any, recipe: RecipeConfig) -> dict[str, list[int]]:
    """input_ids and labels; labels are -100 outside the answer spans when loss_on=assistant."""
    data, trainer = recipe.data, recipe.trainer
    encoded = tokenizer(text, add_special_tokens=data.add_special_tokens, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    if trainer.loss_on is LossOn.all:
        labels = list(ids)
    else:
        labels = [
            token if any(lo <= start < hi for lo, hi in spans) else -100
            for token, (start, _end) in zip(ids, encoded["offset_mapping"], strict=True)
        ]
    if (
        data.append_concat_token
        and tokenizer.eos_token_id is not None
        and (not ids or ids[-1] != tokenizer.eos_token_id)
    ):
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return {"input_ids": ids, "labels": labels}


def tokenize_split(raw: Any, fmt: DataFormat, tokenizer: Any, recipe: RecipeConfig, name: str) -> tuple[Any, dict]:
    import datasets

    limit = recipe.trainer.max_seq_len
    rows, too_long, no_loss = [], 0, 0
    for row in raw:
        text, spans = render(row, fmt, recipe.data, tokenizer)
        example = tokenize_row(text, spans, tokenizer, recipe)
        if len(example["input_ids"]) > limit:
            too_long += 1
            example = {key: value[:limit] for key, value in example.items()}
        if all(label == -100 for label in example["labels"]):
            no_loss += 1
            continue
        rows.append(example)
    if not rows:
        raise DataError(
            f"no {name} sample has a token to learn from (all answers were cut by max_seq_len="
            f"{limit} or are empty): raise trainer.max_seq_len or check the data"
        )
    lengths = [len(r["input_ids"]) for r in rows]
    stats = {
        "rows": len(rows),
        "tokens": sum(lengths),
        "max_len": max(lengths),
        "truncated": too_long,
        "dropped_without_loss": no_loss,
    }
    if too_long:
        log.warning(
            "%d of %d %s samples are longer than max_seq_len=%d tokens; their ends are cut off "
            "(raise trainer.max_seq_len to keep them whole)",
            too_long,
            len(raw),
            name,
            limit,
        )
    if no_loss:
        log.warning("%d %s samples had no answer tokens left after truncation and were dropped", no_loss, name)
    return datasets.Dataset.from_list(rows), stats


def preference_split(raw: Any, tokenizer: Any, recipe: RecipeConfig, name: str) -> tuple[Any, dict[str, Any]]:
    """Preference rows checked for shape and filtered by trainer.max_prompt_len / max_completion_len (in
    tokens, after the chat template); the DPO/ORPO trainer tokenizes them itself."""
    t = recipe.trainer
    conversational = isinstance(raw[0]["prompt"], list)

    def tokens(messages_or_text: Any, generation_prompt: bool = False) -> int:
        if conversational:
            text = tokenizer.apply_chat_template(
                messages_or_text, tokenize=False, add_generation_prompt=generation_prompt
            )
        else:
            text = messages_or_text
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def lengths(row: dict[str, Any]) -> tuple[int, int]:
        """Prompt tokens (with the generation prompt) and the longer answer's tokens after it."""
        prompt = tokens(row["prompt"], generation_prompt=True)
        if conversational:
            answer = max(tokens(row["prompt"] + row[c]) for c in ("chosen", "rejected")) - prompt
        else:
            answer = max(tokens(row[c]) for c in ("chosen", "rejected"))
        return prompt, answer

    keep, dropped = [], 0
    for i, row in enumerate(raw):
        kinds = {isinstance(row[c], list) for c in ("prompt", "chosen", "rejected")}
        if kinds != {conversational}:
            raise DataError(
                f"{recipe.data.name} ({name} row {i}): prompt, chosen and rejected must all be strings or all be "
                "lists of {role, content} messages, like the first row"
            )
        prompt, answer = lengths(row) if t.max_prompt_len or t.max_completion_len else (0, 0)
        if (t.max_prompt_len and prompt > t.max_prompt_len) or (t.max_completion_len and answer > t.max_completion_len):
            dropped += 1
        else:
            keep.append(i)
    if dropped:
        log.warning("%d %s pairs exceed trainer.max_prompt_len/max_completion_len and were dropped", dropped, name)
    if not keep:
        raise DataError(f"no {name} pair fits trainer.max_prompt_len/max_completion_len: raise them")
    stats = {"pairs": len(keep), "dropped_too_long": dropped, "conversational": conversational}
    return raw.select(keep), stats


def prepare(recipe: RecipeConfig, tokenizer: Any) -> Prepared:
    data = recipe.data
    train_raw, eval_raw = load_splits(data, recipe.seed)
    fmt = detect_format(list(train_raw.column_names), data, recipe.trainer.kind)
    if eval_raw is not None:
        detect_format(list(eval_raw.column_names), data, recipe.trainer.kind)  # same shape, or a clear error
    if data.max_train_samples:
        train_raw = train_raw.select(range(min(data.max_train_samples, len(train_raw))))
    if eval_raw is not None and data.max_eval_samples:
        eval_raw = eval_raw.select(range(min(data.max_eval_samples, len(eval_raw))))
    if fmt is DataFormat.preference:
        train, train_stats = preference_split(train_raw, tokenizer, recipe, "train")
        eval_pairs = preference_split(eval_raw, tokenizer, recipe, "eval") if eval_raw is not None else None
        stats = {"format": fmt.value, "train": train_stats}
        if eval_pairs:
            stats["eval"] = eval_pairs[1]
        return Prepared(train, eval_pairs[0] if eval_pairs else None, eval_raw, fmt, stats)
    train, train_stats = tokenize_split(train_raw, fmt, tokenizer, recipe, "train")
    stats: dict[str, Any] = {"format": fmt.value, "train": train_stats}
    eval_set = None
    if eval_raw is not None:
        eval_set, stats["eval"] = tokenize_split(eval_raw, fmt, tokenizer, recipe, "eval")
    return Prepared(train=train, eval=eval_set, raw_eval=eval_raw, format=fmt, stats=stats)


def task_examples(prepared: Prepared, data: DataConfig, count: int) -> list[tuple[list[dict[str, str]], str]]:
    """(prompt conversation, reference answer) pairs from the eval split for the task metric."""
    if prepared.raw_eval is None or count == 0:
        return []
    out = []
    for row in prepared.raw_eval.select(range(min(count, len(prepared.raw_eval)))):
        messages = to_messages(row, prepared.format, data)
        if messages is None or messages[-1]["role"] != "assistant":
            raise DataError(f"data.metric needs conversations ending in an assistant answer ({data.name})")
        out.append((messages[:-1], messages[-1]["content"]))
    return out
