"""Answers of one iteration's model for AlpacaEval 2 or FastChat's MT-Bench judge (see selm/export.py).

    python scripts/export_answers.py RECIPE.yaml --iteration K|base --format alpaca_eval|mt_bench \
        [--questions PATH] --output PATH [--model_id NAME] [--temperature T] [--key value ...]

RECIPE is usually a run's frozen recipe (runs/NAME/recipe.yaml); --key value are recipe overrides, e.g.
--max_new_tokens 2048 or --generation_backend hf. The answer file is written atomically.
"""

import sys

from selm.configs import _split_cli, main_guard, parse_recipe
from selm.errors import SELMError

OWN_KEYS = {"format": None, "questions": None, "output": None, "model_id": None, "temperature": "0"}


@main_guard
def main(argv=None):
    from selm.export import export_answers

    argv = list(sys.argv[1:] if argv is None else argv)
    own, rest = dict(OWN_KEYS), argv[:1]
    for key, value in _split_cli(argv[1:]):  # this script's keys; the rest are the recipe's
        if key in own:
            if value is None:
                raise SELMError(f"command line: --{key} needs a value")
            own[key] = value
        else:
            rest += [f"--{key}"] + ([] if value is None else [value])
    for key in ("format", "output"):
        if own[key] is None:
            raise SELMError(f"command line: --{key} is required ({__doc__.split(chr(10))[2].strip()})")
    try:
        temperature = float(own["temperature"])
    except ValueError:
        raise SELMError(f"command line: --temperature needs a number, got {own['temperature']!r}") from None
    recipe, dry_run = parse_recipe(rest, stage="export")
    if dry_run:
        print(recipe.to_yaml())
        return 0
    count = export_answers(recipe, own["format"], own["output"], own["questions"], own["model_id"], temperature)
    print(f"export: {count} {own['format']} answers of {recipe.trained_model} written to {own['output']}")
    return 0


if __name__ == "__main__":  # vLLM spawns processes that re-import this file
    sys.exit(main())
