"""Allowed values and types of recipe keys, checked when a recipe is parsed (trl style, in `__post_init__`).

Every check raises `BadValue`, a SELMError naming the key and the value; `selm.configs.parse_recipe` prefixes the
recipe file or "command line", whichever the value came from, so the error is one line naming all three.
"""

import argparse
import dataclasses
import math
import types
import typing

from selm.errors import SELMError


def _positive(v):
    return v > 0


def _at_least_one(v):
    return v >= 1


def _non_negative(v):
    return v >= 0


def _fraction(v):
    return 0 < v <= 1


# Allowed values of numeric keys, checked when a recipe is parsed (every iteration's value of a per-iteration list
# too), so a dry run and the freeze step refuse them before any model loads. None means "unset" and is not checked.
LIMITS = {
    # pipeline
    "num_iterations": (_at_least_one, "it must be at least 1"),
    "max_samples": (_at_least_one, "it must be at least 1 (or null for all rows)"),
    "global_batch_size": (_at_least_one, "it must be at least 1"),
    # generation
    "temperature": (_non_negative, "it must be >= 0 (0 is greedy decoding)"),
    "top_p": (_fraction, "it must be in (0, 1]"),
    "num_responses": (_at_least_one, "it must be at least 1"),
    "max_new_tokens": (_at_least_one, "it must be at least 1"),
    "generation_batch_size": (_at_least_one, "it must be at least 1"),
    "generation_shard_size": (_at_least_one, "it must be at least 1"),
    "tensor_parallel_size": (_at_least_one, "it must be at least 1"),
    "data_parallel_size": (_at_least_one, "it must be at least 1"),
    "gpu_memory_utilization": (_fraction, "it must be in (0, 1]"),
    "max_model_len": (_at_least_one, "it must be at least 1 (or null for the model's own context length)"),
    # ranking and evaluation
    "ranker_batch_size": (_at_least_one, "it must be at least 1"),
    "ranker_max_length": (_at_least_one, "it must be at least 1"),
    "eval_max_samples": (_at_least_one, "it must be at least 1 (or null for all rows)"),
    # training (a dict until SELMConfig is built, which dry runs never do: checked by parse_recipe)
    "beta": (_positive, "it must be > 0 (beta <= 0 flips or removes the preference objective)"),
    "alpha": (_non_negative, "it must be >= 0 (0 is plain DPO)"),
    "learning_rate": (_positive, "it must be > 0"),
    "num_train_epochs": (_positive, "it must be > 0"),
    "per_device_train_batch_size": (_at_least_one, "it must be at least 1"),
    "gradient_accumulation_steps": (_at_least_one, "it must be at least 1"),
    "max_length": (_at_least_one, "it must be at least 1 (or null for no limit)"),
    "max_prompt_length": (_at_least_one, "it must be at least 1 (or null for no prompt cut)"),
    "warmup_steps": (_non_negative, "it must be >= 0 (a value below 1 is a fraction of the steps)"),
}


class BadValue(SELMError):
    """A value outside its key's limits or of the wrong type; parse_recipe prefixes where it came from."""

    def __init__(self, key: str, value, why: str, where: str = ""):
        self.key = key
        super().__init__(f"'{key}' is {value!r}{where}; {why}")


def check_limits(values: dict, where: str = "") -> None:
    """Raise BadValue for the first value of `values` ({key: value}) outside its LIMITS (NaN and inf included)."""
    for key, value in values.items():
        if key in LIMITS and isinstance(value, (int, float)) and not isinstance(value, bool):
            test, why = LIMITS[key]
            if not math.isfinite(value) or not test(value):
                raise BadValue(key, value, why, where)


def check_prompt_room(values: dict, where: str = "") -> None:
    """Cross-key limits: `max_prompt_length` must leave room for the answer within `max_length` (trl keeps the
    prompt's last max_prompt_length tokens, then cuts prompt + answer to max_length: no answer token would remain)."""
    prompt, total = values.get("max_prompt_length"), values.get("max_length")
    if prompt is not None and total is not None and prompt >= total:
        raise BadValue("max_prompt_length", prompt, f"it must be below max_length ({total}), which holds prompt and "
                       "answer together: nothing of the answer would be trained on", where)


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


class CheckedArguments:
    """Mixin: a dataclass whose numeric fields are checked against LIMITS when it is built (trl style)."""

    def __post_init__(self):
        check_limits({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
