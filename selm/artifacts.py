"""The artifact boundary: one reader per artifact a stage reads, each checking it against its schema.

A stage reads its inputs through these and nothing else; past them, the library functions trust their rows. Each
bad value is one line naming the file, row and column (selm.errors.SELMError). Paths and names: selm/layout.py.

    read_portion(path)             the iteration's slice of the data: UltraFeedback rows (selm/data.py)
    read_generated(path)           + `reference_response` (a string) and `responses` (strings, the first y_ref)
    read_ranked(path, alpha)       the rewritten pairs; `reference_response` a string when alpha > 0 needs it
    start_model(recipe)            the model an iteration starts from (iter-(K-1)/model or the base model)
    trained_model(recipe)          the model an iteration produced (or the base model for --iteration base)
    read_metrics(eval_dir)         <iter or base>/eval/metrics.json, None before that evaluation ran
    read_answers(eval_dir, cols)   <iter or base>/eval/answers.parquet's columns; read_rewards its rewards

`SELMTrainer` keeps its own checks of `reference_response`: it is public API (trl-compatible) and is given users'
datasets that never pass through these readers.
"""

import json
from pathlib import Path

from selm import layout
from selm.errors import SELMError

REFERENCE = "reference_response"  # y_ref, the start model's answer (the first of `responses`)
RESPONSES = "responses"


def _read_preference_rows(path, empty_message: str | None = None):
    """A parquet artifact in the UltraFeedback schema, validated, as an in-memory datasets.Dataset."""
    from selm.data import read_parquet_dataset, validate_preference_data

    dataset = read_parquet_dataset(path)
    if empty_message and len(dataset) == 0:
        raise SELMError(f"{path}: {empty_message}")
    validate_preference_data(dataset, str(path))
    return dataset


def _check_reference_strings(dataset, path, hint: str) -> None:
    if REFERENCE not in dataset.column_names:
        raise SELMError(f"{path}: missing column '{REFERENCE}' ({hint})")
    for row, value in enumerate(dataset[REFERENCE]):
        if not isinstance(value, str):
            raise SELMError(f"{path}: row {row}, column '{REFERENCE}': expected a string, got {value!r}")


def read_portion(path):
    """iter-K/portion.parquet: UltraFeedback rows, at least one."""
    return _read_preference_rows(path, empty_message="zero rows, nothing to generate or train on")


def read_generated(path):
    """iter-K/generated.parquet: the portion's rows + `reference_response` + (optional) `responses`, y_ref first."""
    dataset = _read_preference_rows(path)
    _check_reference_strings(dataset, path, "written by the generation stage")
    if RESPONSES in dataset.column_names:
        for row, (reference, responses) in enumerate(zip(dataset[REFERENCE], dataset[RESPONSES])):
            if responses is None:
                continue
            if not isinstance(responses, list) or not responses or not all(isinstance(r, str) for r in responses):
                raise SELMError(f"{path}: row {row}, column '{RESPONSES}': expected a non-empty list of strings")
            if responses[0] != reference:
                raise SELMError(f"{path}: row {row}: '{REFERENCE}' is not the first of '{RESPONSES}'")
    return dataset


def read_ranked(path, alpha: float):
    """iter-K/ranked.parquet (or, for a generation-free iteration 0, its portion): the pairs to train on.

    With alpha > 0 every row needs its `reference_response`; with alpha = 0 the column is dropped (iterative DPO:
    y_ref plays no part in the loss, so it is neither tokenized nor scored, a 1.5x cheaper step)."""
    dataset = _read_preference_rows(path)
    if alpha > 0:
        _check_reference_strings(dataset, path, f"alpha={alpha} > 0 needs the generated response; run the generate "
                                                "and rank stages, or set alpha: 0 for DPO")
        return dataset
    return dataset.remove_columns([c for c in dataset.column_names if c == REFERENCE])


# ---- evaluations: <iter or base>/eval/ ----
def read_metrics(directory) -> dict | None:
    """metrics.json of an eval directory, or None when that evaluation has not run (written last: whole or absent)."""
    path = Path(directory) / layout.EVAL_METRICS
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def read_answers(directory, columns: list[str]) -> dict:
    """{column: values} of an eval directory's answers.parquet (a missing or damaged file: one line naming it)."""
    from selm.io import read_parquet

    return read_parquet(Path(directory) / layout.EVAL_ANSWERS, columns=columns).to_pydict()


def read_rewards(directory) -> list[float]:
    return read_answers(directory, ["reward"])["reward"]


# ---- models: iter-K/model directories and the base model ----
def check_model_path(model_path: str) -> None:
    """A local model directory must exist and hold a config (or be a LoRA adapter whose base model passes this check);
    anything else must be a hub id transformers can load."""
    path = Path(model_path).expanduser()
    if path.is_dir():
        from selm.models import adapter_base, check_adapter

        base = adapter_base(path)
        if base is not None:
            check_adapter(path)
            try:
                check_model_path(base)
            except SELMError as e:
                raise SELMError(f"{e} (the base model of the adapter in {path})") from None
            return
        if not (path / "config.json").is_file():
            raise SELMError(f"model directory {path} has no config.json (an unfinished or wrong directory?)")
        from selm.models import check_weights

        check_weights(path)  # a truncated or missing weight file: one line, before any stage loads it
        return
    if path.exists() or model_path.startswith((".", "/", "~")) or model_path.count("/") > 1:
        raise SELMError(f"model directory not found: {model_path}")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(model_path)
    except OSError as e:
        raise SELMError(f"model not found: {model_path} is neither a local directory nor a loadable hub id "
                        f"({str(e).splitlines()[0]})") from None


def start_model(recipe) -> str:
    """The model the iteration starts from, which must exist before a stage does any work with it; its path."""
    model_path = recipe.start_model
    if recipe.iteration > recipe.pipeline.first_iteration and not Path(model_path).is_dir():
        raise SELMError(f"model directory not found: {model_path} (iteration {recipe.iteration} starts from the "
                        f"model trained in iteration {recipe.iteration - 1}: run its train stage first)")
    try:
        check_model_path(model_path)
    except SELMError as e:
        raise SELMError(f"{e} (model_name_or_path in {recipe.path})" if model_path == recipe.model.model_name_or_path
                        else str(e)) from None
    return model_path


def trained_model(recipe) -> str:
    """The model an iteration produced (or the base model for `--iteration base`), which must exist; its path."""
    model_path = recipe.trained_model
    if not recipe.base and not Path(model_path).is_dir():
        raise SELMError(f"model directory not found: {model_path} (iteration {recipe.iteration} of {recipe.run_dir} "
                        "is not trained yet: run its train stage first)")
    check_model_path(model_path)
    return model_path
