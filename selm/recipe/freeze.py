"""Merge a recipe with its overlays and overrides, and freeze it as RUN_DIR/recipe.yaml (refusing a changed rerun).

Every stage of a run reads the frozen file, so the run keeps the settings it was started with.
"""

from pathlib import Path

import yaml

from selm.cli import split_cli
from selm.errors import SELMError
from selm.layout import RunLayout
from selm.recipe.parse import iterations_of, load_recipe_yaml, parse_recipe

FREEZE_USAGE = "python scripts/freeze_recipe.py RECIPE.yaml [--overlay PATH] --output_dir RUN_DIR [--key value ...]"


def merge_recipe_sources(argv: list[str], usage: str) -> tuple[Path, dict, str]:
    """`RECIPE.yaml [--overlay PATH ...] [--key value ...]` -> (recipe path, merged mapping, where it came from).

    Later sources win: the recipe, then each overlay file (e.g. recipes/rehearsal.yaml), then the command line.
    Command-line values are YAML scalars or flow lists (`--learning_rate [5e-7,3e-7]`), never evaluated.
    """
    if not argv or argv[0].startswith("--"):
        raise SELMError(f"usage: {usage}")
    source = Path(argv[0])
    recipe = load_recipe_yaml(source)
    described = str(source)
    overrides = split_cli(argv[1:])
    for key, value in overrides:
        if key == "overlay":
            if value is None:
                raise SELMError("command line: --overlay needs a recipe file")
            recipe.update(load_recipe_yaml(value))
            described += f" + {value}"
    if [k for k, _ in overrides].count("output_dir") > 1:
        raise SELMError("command line: 'output_dir' is the run directory; set it with RUN_DIR (or RUN_ROOT), not in ARGS")
    for key, value in overrides:
        if key != "overlay":
            recipe[key] = True if value is None else yaml.safe_load(value)
    if any(k not in ("overlay", "output_dir") for k, _ in overrides):
        described += " (with overrides)"
    if not recipe.get("output_dir"):
        raise SELMError(f"{source}: 'output_dir' (the run directory) is required")
    return source, recipe, described


def freeze_recipe(argv: list[str]) -> tuple[Path, str]:
    """Merge RECIPE, overlays and `--key value` overrides into `<output_dir>/recipe.yaml` (scripts/freeze_recipe.py).

    Returns (frozen path, what happened). Raises SELMError for unknown keys, bad values or per-iteration lists (every
    iteration is parsed before the file gets its final name), or a frozen recipe that differs from this one.
    """
    from selm.io import atomic_path

    source, recipe, described = merge_recipe_sources(argv, FREEZE_USAGE)
    frozen = RunLayout(recipe["output_dir"]).frozen_recipe
    if frozen.exists():
        previous = load_recipe_yaml(frozen)
        changed = sorted(k for k in set(previous) | set(recipe) if previous.get(k) != recipe.get(k))
        if changed:
            detail = ", ".join(f"{k}: {previous.get(k)!r} -> {recipe.get(k)!r}" for k in changed[:5])
            raise SELMError(
                f"{frozen}: this run was started with other settings ({detail}); "
                "use another RUN_DIR, or delete the run directory to start over"
            )
        return frozen, "using the frozen recipe"

    check_every_iteration(recipe, described)  # before anything is written
    with atomic_path(frozen) as tmp:
        tmp.write_text(f"# Frozen from {described}; every stage of this run reads this file.\n"
                       + yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return frozen, "frozen"


def check_every_iteration(recipe: dict, described: str) -> None:
    """Parse a merged recipe mapping for each of its iterations (every key, type and per-iteration list), as the
    stages will parse it (the train stage's parse; the other stages read the same keys)."""
    for k in iterations_of(recipe, described):
        parse_recipe([described, "--iteration", str(k)], stage="train", raw=recipe)
