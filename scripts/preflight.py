"""Before a paper target does any work on GPUs: the recipe, the base model, CUDA and the GPU build of vLLM.

    python scripts/preflight.py RECIPE.yaml [--overlay PATH] --output_dir RUN_DIR --num_gpus N [--key value ...]

The named paper targets (make zephyr-selm, ...) run it first; REHEARSAL=1 (CPU) skips it. Writes nothing.
"""

import sys

from selm.cli import main_guard
from selm.preflight import preflight


@main_guard
def main(argv=None):
    print(preflight(list(sys.argv[1:] if argv is None else argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
