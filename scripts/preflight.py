"""Before a paper target does any work on GPUs: the recipe, the base model, CUDA and the GPU build of vLLM.

    python scripts/preflight.py RECIPE.yaml [--overlay PATH] --output_dir RUN_DIR --num_gpus N [--key value ...]

The named paper targets (make zephyr-selm, ...) run it first; REHEARSAL=1 (CPU) skips it. Writes nothing.
"""

import sys

from selm.cli import RECIPE_OVERRIDES, main_guard, script_parser
from selm.preflight import preflight


def _parser():
    parser = script_parser(__doc__, epilog=RECIPE_OVERRIDES)
    parser.add_argument("recipe", help="the recipe file")
    parser.add_argument("--overlay", action="append", help="a recipe file merged over it (repeatable)")
    parser.add_argument("--output_dir", help="the run directory")
    parser.add_argument("--num_gpus", help="GPUs the run will use (make's NUM_GPUS)")
    return parser


@main_guard
def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    _parser().parse_known_args(argv)  # --help, and a missing RECIPE; preflight reads the words themselves
    print(preflight(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
