"""Preference data: loading (hub or local file), UltraFeedback-schema validation, portions, trainer format.

A row has `prompt` (str), `prompt_id` (str), `chosen` and `rejected` (lists of {role, content} messages ending in
the assistant's answer); score columns are optional. Conversations may be multi-turn and start with a system
message: the prompt of a row is every message before its final assistant turn, shared by chosen and rejected.
`prompt` is the text of the last user message (the turn being answered); a set without `prompt_id` gets
sha256(prompt) as UltraFeedback's ids are. trl's conversational preference formats (chosen/rejected holding the whole
conversation, or an explicit `prompt` message list) are converted to this schema on load (docs/data.md).

Prompts and prompt_ids may repeat (several pairs per prompt): every row is its own example in every stage, and the
stages that pair rows (generation shards, evaluations of two runs) pair them by position, not by id.
"""

import hashlib
from pathlib import Path

import numpy as np

from selm.errors import SELMError

REQUIRED_COLUMNS = ("prompt", "prompt_id", "chosen", "rejected")
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
ROLES = ("system", "user", "assistant")


def load_preference_data(name: str, split: str = "train", config: str | None = None, max_samples: int | None = None,
                         validate: bool = True):
    """Load a split of preference data: a hub dataset, a local directory of split files, or one local file.

    - hub id: `datasets.load_dataset(name, config, split=split)`; slices work ('train_prefs[:1000]');
    - local directory: the split is the file `<dir>/<split>.jsonl` (or .json, .parquet), e.g. train_prefs.jsonl and
      test_prefs.jsonl beside each other, like the hub's splits; slices work too;
    - local .json/.jsonl/.parquet file: the file is the data, whatever the split.

    Whatever the source, the split is brought to the UltraFeedback schema (`to_ultrafeedback_schema`).
    """
    import datasets

    path = Path(name)
    if path.is_dir():
        data_file, base = local_split_file(path, split)
        dataset = _load(lambda: datasets.load_dataset(LOCAL_FORMATS[data_file.suffix], data_files={base: str(data_file)},
                                                      split=split), f"{data_file} (split {split!r})")
        source = str(data_file)
    elif path.suffix in LOCAL_FORMATS or path.exists():
        if not path.is_file():
            raise SELMError(f"dataset file not found: {path}")
        if path.suffix not in LOCAL_FORMATS:
            raise SELMError(f"{path}: unsupported dataset format; use one of {sorted(LOCAL_FORMATS)}")
        dataset = _load(lambda: datasets.load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split="train"),
                        str(path))
        source = str(path)
    else:
        try:
            dataset = datasets.load_dataset(name, config, split=split)
        except (OSError, ValueError) as e:  # not found, no network, no such split: one line, not a traceback wall
            raise SELMError(f"dataset {name!r} (split {split!r}) is not a local file and could not be loaded from "
                            f"the hub: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        source = f"{name}:{split}"
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    dataset = to_ultrafeedback_schema(dataset, source)
    if validate:  # every row's schema (a Python pass over the rows: skipped by callers that read one column)
        validate_preference_data(dataset, source)
    return dataset


def local_split_file(directory: Path, split: str) -> tuple[Path, str]:
    """(file, split name) of `split` (slice allowed) in a directory of split files; a missing split names the others."""
    base = split.split("[", 1)[0].strip()
    for suffix in LOCAL_FORMATS:
        if (directory / f"{base}{suffix}").is_file():
            return directory / f"{base}{suffix}", base
    available = sorted({p.stem for p in directory.iterdir() if p.suffix in LOCAL_FORMATS and p.is_file()})
    raise SELMError(f"{directory}: no split {base!r} (looked for {base}.jsonl, {base}.json, {base}.parquet; "
                    f"splits here: {available or 'none'})")


def _load(load, source: str):
    """A local load whose parse error (bad JSON, bad slice, unreadable parquet) becomes one line naming the file."""
    from datasets.exceptions import DatasetsError

    try:
        return load()
    except (ValueError, OSError, DatasetsError) as e:
        cause = e.__cause__ or e  # datasets wraps the parser's error in a generic "error while generating"
        detail = str(cause).splitlines()[0] if str(cause) else "no detail"
        raise SELMError(f"{source}: could not be read ({type(cause).__name__}: {detail})") from None


def _check_messages(messages, source: str, row: int, column: str, kind: str = "conversation") -> None:
    """A non-empty list of {role, content} messages with string content, ending as its `kind` must: a 'conversation'
    with the assistant's answer to a user message, an 'answer' with the assistant's turn, a 'prompt' with anything."""
    def bad(why):
        return SELMError(f"{source}: row {row}, column '{column}': {why}")

    if not isinstance(messages, list) or not messages:
        raise bad("expected a non-empty list of {role, content} messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not {"role", "content"} <= set(message):
            raise bad(f"message {i} is not a {{role, content}} mapping")
        if message["role"] not in ROLES:
            raise bad(f"message {i} has role {message['role']!r}; expected one of {list(ROLES)}")
        if not isinstance(message["content"], str):
            raise bad(f"message {i} content is not a string")
    if kind != "prompt" and messages[-1]["role"] != "assistant":
        raise bad("the last message must be the assistant's answer")
    if kind == "conversation" and (len(messages) < 2 or messages[-2]["role"] != "user"):
        raise bad("the assistant's answer must follow a user message")


def prompt_id_of(prompt: str) -> str:
    """UltraFeedback's id of a prompt: the SHA-256 hex digest of its UTF-8 text."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def prompt_text(conversation) -> str | None:
    """The `prompt` of a conversation ending in the answer: the last user message's text (None if it has none)."""
    if not isinstance(conversation, list):
        return None
    users = [m for m in conversation[:-1] if isinstance(m, dict) and m.get("role") == "user"]
    text = users[-1].get("content") if users else None
    return text if isinstance(text, str) else None


def data_format(dataset, source: str) -> str:
    """'ultrafeedback' (prompt text + whole conversations), 'implicit_prompt' (trl: no prompt column, chosen/rejected
    hold the prompt turns) or 'explicit_prompt' (trl: prompt is a message list, chosen/rejected the answer turns)."""
    import datasets

    columns = dataset.column_names
    for column in ("chosen", "rejected"):
        if column not in columns:
            raise SELMError(f"{source}: missing column '{column}' (expected the UltraFeedback schema "
                            f"{list(REQUIRED_COLUMNS)} or trl's conversational preference format: chosen, rejected "
                            "and optionally prompt)")
    if isinstance(dataset.features["chosen"], datasets.Value) and dataset.features["chosen"].dtype in ("string",
                                                                                                       "large_string"):
        raise SELMError(f"{source}: column 'chosen' holds plain text (trl's standard preference format); the pipeline "
                        "applies the model's chat template, so it needs conversations: lists of {role, content} "
                        "messages (trl's conversational format or the UltraFeedback schema)")
    if "prompt" not in columns:
        return "implicit_prompt"
    return "ultrafeedback" if isinstance(dataset.features["prompt"], datasets.Value) else "explicit_prompt"


def _join_explicit_prompt(example, row, source):
    """trl's explicit-prompt row -> whole conversations; each column checked as the user wrote it."""
    _check_messages(example["prompt"], source, row, "prompt", kind="prompt")
    for column in ("chosen", "rejected"):
        _check_messages(example[column], source, row, column, kind="answer")
    chosen, rejected = example["prompt"] + example["chosen"], example["prompt"] + example["rejected"]
    return {"prompt": prompt_text(chosen), "chosen": chosen, "rejected": rejected}


def to_ultrafeedback_schema(dataset, source: str):
    """A loaded split in the UltraFeedback schema: trl's conversational formats converted, missing prompt_ids derived
    from the prompt. Rows keep their order and their other columns."""
    form = data_format(dataset, source)
    if form == "explicit_prompt":
        dataset = dataset.map(_join_explicit_prompt, with_indices=True, fn_kwargs={"source": source},
                              remove_columns=["prompt"], desc="trl's explicit-prompt format")
    elif form == "implicit_prompt":
        dataset = dataset.add_column("prompt", [prompt_text(c) for c in dataset["chosen"]])
    if "prompt_id" not in dataset.column_names:
        ids = [prompt_id_of(p) if isinstance(p, str) else None for p in dataset["prompt"]]
        dataset = dataset.add_column("prompt_id", ids)
    return dataset


def validate_preference_data(dataset, source: str) -> None:
    """Raise SELMError naming the source, row and column of the first malformed row. Repeated prompts and
    prompt_ids are accepted: each row is its own example."""
    missing = [c for c in REQUIRED_COLUMNS if c not in dataset.column_names]
    if missing:
        raise SELMError(f"{source}: missing column '{missing[0]}' (the UltraFeedback schema needs {list(REQUIRED_COLUMNS)})")
    if len(dataset) == 0:
        raise SELMError(f"{source}: no rows")
    for row, example in enumerate(dataset.select_columns(list(REQUIRED_COLUMNS))):
        for column in ("chosen", "rejected"):
            _check_messages(example[column], source, row, column)
        if example["chosen"][:-1] != example["rejected"][:-1]:
            raise SELMError(f"{source}: row {row}, column 'rejected': its prompt messages differ from 'chosen'")
        for column in ("prompt", "prompt_id"):
            if not isinstance(example[column], str):
                raise SELMError(f"{source}: row {row}, column '{column}': expected a string")
        if not example["prompt_id"].strip():
            raise SELMError(f"{source}: row {row}, column 'prompt_id': empty; every row needs an id (or drop the "
                            "column: ids are then derived from the prompt)")


def repeat_counts(prompt_ids, conversations) -> dict:
    """Rows, and how many distinct prompts (the messages answered) and prompt_ids they hold, for the reports."""
    import json

    return {"rows": len(prompt_ids), "distinct_prompts": len({json.dumps(c, sort_keys=True) for c in conversations}),
            "distinct_prompt_ids": len(set(prompt_ids))}


def prompt_messages(example) -> list[dict]:
    """Every message before the final assistant turn (system message and earlier turns included)."""
    return list(example["chosen"][:-1])


def portion_bounds(num_rows: int, num_portions: int, index: int) -> tuple[int, int]:
    """[start, end) of portion `index` when `num_rows` are cut into `num_portions` contiguous, near-equal slices."""
    if not 0 <= index < num_portions:
        raise SELMError(f"portion {index} does not exist: the data is split into {num_portions} portions")
    edges = np.linspace(0, num_rows, num_portions + 1).round().astype(int)
    return int(edges[index]), int(edges[index + 1])


def select_portion(dataset, num_portions: int, index: int, mode: str = "contiguous", seed: int = 42):
    """The `index`-th of `num_portions` portions: contiguous slices (the paper), or slices of a seeded shuffle.

    `mode` is a recipe's portion_split, one of its schema's choices (checked when the recipe is parsed)."""
    order = np.arange(len(dataset))
    if mode == "shuffled":
        order = np.random.default_rng(seed).permutation(len(dataset))
    start, end = portion_bounds(len(dataset), num_portions, index)
    if start == end:
        raise SELMError(f"portion {index + 1} of {num_portions} has zero rows ({len(dataset)} rows in all)")
    return dataset.select(order[start:end])


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def to_trainer_format(example) -> dict:
    """UltraFeedback row -> trl's conversational preference format (+ reference_response when present)."""
    out = {
        "prompt": prompt_messages(example),
        "chosen": [example["chosen"][-1]],
        "rejected": [example["rejected"][-1]],
    }
    if "reference_response" in example and example["reference_response"] is not None:
        out["reference_response"] = assistant(example["reference_response"])
    return out


def ensure_portion(recipe):
    """Write `iter-K/portion.parquet` (this iteration's slice of the data) unless it exists; return its path.

    The source data is validated on the way, so a malformed row fails here with its file, row and column.
    """
    from selm.io import write_parquet

    from selm.layout import PORTION

    path = recipe.iter_dir() / PORTION
    if path.exists():
        return path
    p = recipe.pipeline
    dataset = load_preference_data(p.dataset_name, p.dataset_split, p.dataset_config, p.max_samples)
    portion = select_portion(dataset, recipe.num_portions, recipe.portion_index, p.portion_split, p.split_seed)
    write_parquet(portion.flatten_indices(), path, metadata={
        "dataset": p.dataset_name, "split": p.dataset_split, "portion": recipe.portion_index,
        "num_portions": recipe.num_portions, "portion_split": p.portion_split, "rows": len(portion),
    })
    return path


def read_parquet_dataset(path):
    """A parquet artifact of a run as an in-memory `datasets.Dataset`.

    A missing, truncated or damaged file is a one-line error naming it (selm.io.read_parquet checks the page
    checksums). In memory: no copy is written to the datasets cache, and a 0-row file is read like any other.
    """
    import datasets

    from selm.io import read_parquet

    return datasets.Dataset(read_parquet(path))
