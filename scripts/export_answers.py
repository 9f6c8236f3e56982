r"""Answers of one iteration's model for AlpacaEval 2 or FastChat's MT-Bench judge (see selm/export.py).

    python scripts/export_answers.py RECIPE.yaml --iteration K|base --format alpaca_eval|mt_bench \
        [--questions PATH] --output PATH [--model_id NAME] [--temperature T] [--key value ...]

RECIPE is usually a run's frozen recipe (runs/NAME/recipe.yaml); --key value are recipe overrides, e.g.
--max_new_tokens 2048 or --generation_backend hf. The answer file is written atomically.
"""

import sys

from selm.cli import RECIPE_OVERRIDES, main_guard, script_parser
from selm.recipe.parse import parse_recipe
from selm.export import FORMATS, export_answers


def _parser():
    parser = script_parser(__doc__, epilog=RECIPE_OVERRIDES)
    parser.add_argument("recipe", help="the recipe, usually the run's frozen runs/NAME/recipe.yaml")
    parser.add_argument("--format", required=True, choices=FORMATS, help="the judge's format")
    parser.add_argument("--output", required=True, help="the answer file to write")
    parser.add_argument("--questions", default=None,
                        help="a local question file (required for mt_bench; alpaca_eval defaults to the hub's)")
    parser.add_argument("--model_id", default=None, help="generator / model_id in the file (default: RUN-iterK)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    return parser


@main_guard
def main(argv=None):
    own, rest = _parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    recipe, dry_run = parse_recipe([own.recipe, *rest], stage="export")
    if dry_run:
        print(recipe.to_yaml())
        return 0
    count = export_answers(recipe, own.format, own.output, own.questions, own.model_id, own.temperature)
    print(f"export: {count} {own.format} answers of {recipe.trained_model} written to {own.output}")
    return 0


if __name__ == "__main__":  # vLLM spawns processes that re-import this file
    sys.exit(main())
