"""Freeze a recipe, its overlays and its overrides into the run directory: RUN_DIR/recipe.yaml, which every stage
then reads.

    python scripts/freeze_recipe.py RECIPE.yaml [--overlay PATH] --output_dir RUN_DIR [--key value ...]

Run once per `make run`: the first call writes the frozen copy (after checking every key and per-iteration list);
later calls check that the recipe and overrides still match it, so a rerun cannot silently mix two settings.
"""

import sys

from selm.cli import RECIPE_OVERRIDES, main_guard, script_parser
from selm.recipe.freeze import freeze_recipe


def _parser():
    parser = script_parser(__doc__, epilog=RECIPE_OVERRIDES)
    parser.add_argument("recipe", help="the recipe file")
    parser.add_argument("--overlay", action="append", help="a recipe file merged over it (repeatable)")
    parser.add_argument("--output_dir", help="the run directory (default: the recipe's output_dir)")
    return parser


@main_guard
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    _parser().parse_known_args(argv)  # --help, and a missing RECIPE; freeze_recipe reads the words themselves
    path, message = freeze_recipe(argv)
    print(f"{message}: {path}")


if __name__ == "__main__":
    main()
