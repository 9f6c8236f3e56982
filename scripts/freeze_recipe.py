"""Freeze a recipe, its overlays and its overrides into the run directory: RUN_DIR/recipe.yaml, which every stage
then reads.

    python scripts/freeze_recipe.py RECIPE.yaml [--overlay PATH] --output_dir RUN_DIR [--key value ...]

Run once per `make run`: the first call writes the frozen copy (after checking every key and per-iteration list);
later calls check that the recipe and overrides still match it, so a rerun cannot silently mix two settings.
"""

import sys

from selm.configs import freeze_recipe, main_guard


@main_guard
def main(argv=None):
    path, message = freeze_recipe(sys.argv[1:] if argv is None else argv)
    print(f"{message}: {path}")


if __name__ == "__main__":
    main()
