"""What `make run` will do: the iterations, the shared iteration-0 directory, evaluation and vLLM parallelism.

    python scripts/plan.py RECIPE.yaml [--overlay PATH] --output_dir RUN_DIR [--last_iteration K] [--key value ...]

Prints `key=value` words that pipeline.mk reads. It merges the recipe, overlays and overrides exactly as the freeze
step does (the run's frozen recipe, once it exists), so what make plans is what the stages read. Writes nothing.
"""

import sys

from selm.configs import main_guard, plan_as_make_words, run_plan


@main_guard
def main(argv=None):
    print(plan_as_make_words(run_plan(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    main()
