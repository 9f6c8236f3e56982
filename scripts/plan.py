"""What `make run` will do: the iterations, the shared iteration-0 directory, evaluation and vLLM parallelism.

    python scripts/plan.py RECIPE.yaml [--overlay PATH] --output_dir RUN_DIR [--last_iteration K] [--key value ...]

Prints `key=value` words that pipeline.mk reads. It merges the recipe, overlays and overrides exactly as the freeze
step does (the run's frozen recipe, once it exists), so what make plans is what the stages read. Writes nothing.
"""

import sys

from selm.cli import RECIPE_OVERRIDES, main_guard, script_parser
from selm.configs import plan_as_make_words, run_plan


def _parser():
    parser = script_parser(__doc__, epilog=RECIPE_OVERRIDES)
    parser.add_argument("recipe", help="the recipe file")
    parser.add_argument("--overlay", action="append", help="a recipe file merged over it (repeatable)")
    parser.add_argument("--output_dir", help="the run directory (default: the recipe's output_dir)")
    parser.add_argument("--last_iteration", help="the last iteration to plan (make's ITER)")
    return parser


@main_guard
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    _parser().parse_known_args(argv)  # --help, and a missing RECIPE; run_plan reads the words themselves
    print(plan_as_make_words(run_plan(argv)))


if __name__ == "__main__":
    main()
