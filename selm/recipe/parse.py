"""YAML recipe + command line -> `Recipe`: the one parser every stage script uses.

A recipe is a flat YAML file (alignment-handbook style). Its keys are the fields of `selm.recipe.schema`'s
dataclasses plus trl's `ModelConfig` and `SELMConfig` (a `trl.DPOConfig` with `alpha`). A scalar field may be given
a list in the recipe: one value per iteration, in iteration order. Stage scripts are called as

    python scripts/<stage>.py RECIPE.yaml --iteration K [--key value | --key=value ...]

and command-line values override the recipe (a command-line value applies to the one iteration being run). Every
value is converted by `typed` and checked by the schema's one check pass; a bad one is reported as
"<recipe file or 'command line'>: '<key>' is <value>[ for iteration K]; <why>".
"""

import argparse
import dataclasses
import difflib
import os
import sys
import types
import typing
from pathlib import Path

import yaml
from selm.cli import split_cli
from selm.errors import SELMError
from selm.recipe.recipe import Recipe
from selm.recipe.schema import (BadValue, PipelineConfig, check_prompt_room, check_value, iteration_list,
                                recipe_classes, rules_of)

# Stages that accept `--iteration base` (the run's starting model).
BASE_STAGES = ("evaluate", "export")
STAGE_KEYS = ("iteration", "dry_run", "num_processes")

# ---- the one value converter ----
EXPECTED = {int: "expected a whole number", float: "expected a number", bool: "expected true or false",
            str: "expected a string"}


def scalar_type(tp):
    """int, float, bool or str when a field holds one of them (or None); None for anything richer."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else None
    return tp if tp in EXPECTED else None


def typed(key: str, value, tp, where: str = ""):
    """`value` as the parser turns it into `tp`: strings are converted, anything else must already be one.

    argparse converts only string defaults, so without this a YAML `num_responses: 1.5` would pass as a float.
    """
    from transformers.hf_argparser import string_to_bool

    if tp is None or value is None:
        return value
    if tp is str and isinstance(value, bool):  # YAML reads an unquoted true/false as a boolean
        return str(value).lower()
    if isinstance(value, str) and tp is not str:
        try:
            return string_to_bool(value) if tp is bool else tp(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            raise BadValue(key, value, EXPECTED[tp], where) from None
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    fits = numeric if tp is float else isinstance(value, tp) and not (tp is int and isinstance(value, bool))
    if not fits:
        raise BadValue(key, value, EXPECTED[tp], where)
    return value


# ---- reading ----
def load_recipe_yaml(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SELMError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise SELMError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise SELMError(f"{path}: a recipe must be a YAML mapping of key: value")
    return data


def unknown_key_error(source, key, known) -> SELMError:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return SELMError(f"{source}: unknown key '{key}'{hint}")


def print_help(stage: str) -> None:
    from selm.recipe.trl_parser import RecipeParser

    prog = f"python scripts/{stage}.py RECIPE.yaml --iteration K"
    RecipeParser(list(recipe_classes().values()), prog=prog).print_help()


# ---- the iteration structure ----
def iterations_of(recipe: dict, source) -> list[int]:
    """The iterations of a merged recipe mapping (num_iterations and dpo_iteration_zero, converted and checked)."""
    rules = rules_of(PipelineConfig)
    try:
        n = typed("num_iterations", recipe.get("num_iterations", PipelineConfig.num_iterations), int)
        check_value("num_iterations", n, rules["num_iterations"])
        zero = typed("dpo_iteration_zero", recipe.get("dpo_iteration_zero", False), bool)
    except BadValue as e:
        raise SELMError(f"{source}: {e}") from None
    return iteration_list(n, zero)


def per_iteration_values(recipe: dict, key: str, default, iterations: list[int], source) -> list:
    """A key's value for each iteration: its per-iteration list (whose length must match), or its one value."""
    value = recipe.get(key, default)
    if not isinstance(value, list):
        return [value] * len(iterations)
    if len(value) != len(iterations):
        raise SELMError(f"{source}: '{key}' has {len(value)} per-iteration values but the recipe has "
                        f"{len(iterations)} iterations {iterations}")
    return value


# ---- parse_recipe ----
def parse_recipe(argv: list[str] | None = None, stage: str = "train", raw: dict | None = None) -> tuple[Recipe, bool]:
    """Parse `RECIPE.yaml --iteration K [--dry_run] [--num_processes N] [--key value ...]`.

    Returns the resolved recipe and whether `--dry_run` was given. Raises SELMError on bad input. `raw`: an already
    merged recipe mapping to parse instead of reading the file (argv[0] then only names it in messages).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print_help(stage)
        sys.exit(0)
    if not argv or argv[0].startswith("--"):
        raise SELMError(f"usage: python scripts/{stage}.py RECIPE.yaml --iteration K [--key value ...]")
    path = Path(argv[0])
    raw = load_recipe_yaml(path) if raw is None else dict(raw)
    classes = recipe_classes()
    fields = {f.name: f for cls in classes.values() for f in dataclasses.fields(cls) if f.init}
    known = sorted(set(fields) | set(STAGE_KEYS))
    for key in raw:
        if key not in fields:
            raise unknown_key_error(path, key, known)
    cli = _read_command_line(argv[1:], stage, path, fields, known)
    overrides = cli["overrides"]

    # The iteration count decides how long per-iteration lists must be (a command-line count counts).
    iterations = iterations_of({**raw, **{k: (True if v is None else v) for k, v in overrides.items()}}, path)
    iteration = iterations[0] if cli["base"] else cli["iteration"]  # base: evaluated with the first one's settings
    if iteration not in iterations:
        raise SELMError(f"{path}: --iteration {iteration} is not one of this recipe's iterations {iterations}")

    types_ = {name: scalar_type(hint) for cls in classes.values()
              for name, hint in typing.get_type_hints(cls).items() if name in fields}
    rules = {name: rule for cls in classes.values() for name, rule in rules_of(cls).items()}
    resolved = _this_iterations_values(raw, iterations, iteration, fields, types_, rules, path)

    from selm.recipe.trl_parser import RecipeParser

    parser = RecipeParser(list(classes.values()), path=path)
    parser.set_defaults_with_config(**resolved)
    values = vars(parser.parse_args([w for k, v in overrides.items() for w in [f"--{k}"] + ([] if v is None else [v])]))
    groups = {name: {f.name: values[f.name] for f in dataclasses.fields(cls) if f.init}
              for name, cls in classes.items()}
    if iteration == 0:
        groups["training"]["alpha"] = 0.0  # iteration 0 trains on the original pairs: no generated response exists
    try:
        for key in resolved:  # command-line values went through argparse's converters; recipe values may not have
            if key not in overrides:
                typed(key, values[key], types_[key])
        for key, value in groups["training"].items():  # a dict until SELMConfig is built (never in a dry run)
            check_value(key, value, rules.get(key, {}))
        check_prompt_room(groups["training"])
        built = {name: classes[name](**groups[name])
                 for name in ("model", "pipeline", "generation", "ranking", "evaluation")}
    except BadValue as e:
        raise SELMError(f"{'command line' if e.key in overrides else path}: {e}") from None
    recipe = Recipe(path=path, stage=stage, iteration=iteration, num_processes=cli["num_processes"],
                    training=groups["training"], explicit_keys=set(raw) | set(overrides), base=cli["base"], **built)
    _check_required_and_consistent(recipe)
    return recipe, cli["dry_run"]


def _read_command_line(rest: list[str], stage: str, path: Path, fields: dict, known: list[str]) -> dict:
    """The stage keys (--iteration, --dry_run, --num_processes) and the recipe overrides {key: string or None}."""
    out = {"iteration": None, "base": False, "dry_run": False, "num_processes": None, "overrides": {}}
    for key, value in split_cli(rest):
        if key == "dry_run":
            out["dry_run"] = value is None or value.lower() in ("1", "true", "yes")
        elif key == "iteration" and value == "base":
            if stage not in BASE_STAGES:
                raise SELMError(f"command line: --iteration base is for {' and '.join(BASE_STAGES)} only")
            out["base"] = True
        elif key in ("iteration", "num_processes"):
            if value is None or not value.lstrip("-").isdigit():
                raise SELMError(f"command line: --{key} needs a whole number, got {value!r}")
            out[key] = int(value)
        elif key not in fields:
            raise unknown_key_error("command line", key, known)
        else:
            out["overrides"][key] = value
    if out["iteration"] is None and not out["base"]:
        raise SELMError(f"command line: --iteration K is required (python scripts/{stage}.py {path} --iteration K)")
    if out["num_processes"] is None:
        out["num_processes"] = int(os.environ.get("WORLD_SIZE", "1"))
    if out["num_processes"] < 1:
        raise SELMError(f"command line: --num_processes must be at least 1, got {out['num_processes']}")
    return out


def _this_iterations_values(raw, iterations, iteration, fields, types_, rules, path) -> dict:
    """The recipe's values for `iteration`. Every iteration's element of a per-iteration list is converted and
    checked, not only this one's (a dry run of iteration 1 refuses a bad iteration 3), and so is the prompt room."""
    resolved = {}
    for key, value in raw.items():
        if isinstance(value, list) and not _is_list_type(fields[key].type):
            value = per_iteration_values(raw, key, None, iterations, path)
            try:
                for k, element in zip(iterations, value):
                    check_value(key, typed(key, element, types_[key], f" for iteration {k}"), rules.get(key, {}),
                                f" for iteration {k}")
            except BadValue as e:
                raise SELMError(f"{path}: {e}") from None
            value = value[iterations.index(iteration)]
        resolved[key] = value
    if any(isinstance(raw.get(key), list) for key in ("max_length", "max_prompt_length")):
        lengths = {key: per_iteration_values(raw, key, fields[key].default, iterations, path)
                   for key in ("max_length", "max_prompt_length")}
        for position, k in enumerate(iterations):
            try:
                check_prompt_room({key: typed(key, v[position], int) for key, v in lengths.items()},
                                  f" for iteration {k}")
            except BadValue as e:
                raise SELMError(f"{path}: {e}") from None
    return resolved


def _is_list_type(tp) -> bool:
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_is_list_type(a) for a in typing.get_args(tp))
    return False


def _check_required_and_consistent(recipe: Recipe) -> None:
    """Keys without which no stage can run, and the cross-group rules (batch split, attention kernel)."""
    if recipe.training.get("output_dir") in (None, ""):
        raise SELMError(f"{recipe.path}: 'output_dir' (the run directory) is required")
    if recipe.model.model_name_or_path in (None, ""):
        raise SELMError(f"{recipe.path}: 'model_name_or_path' (the base model) is required")
    recipe.gradient_accumulation_steps()  # fail early on an impossible batch split
    from selm.methods import check_method_settings  # which keys each update rule takes

    check_method_settings(recipe)
    from selm.lora import check_model_keys  # use_peft, lora_*, load_in_4bit: honoured or refused, never ignored

    check_model_keys(recipe.model, recipe.explicit_keys, recipe.path)
    from selm.prefix_sharing import check_attention  # prefix sharing needs a kernel that takes a 4-D mask

    check_attention(recipe.model.attn_implementation, recipe.training.get("prefix_sharing", "false"),
                    source=str(recipe.path))
