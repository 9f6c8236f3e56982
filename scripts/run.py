"""One run of the pipeline (what `make run` and every named target start): see selm/run.py.

    python scripts/run.py RECIPE.yaml [--overlay PATH] [--run_dir DIR | --run_root DIR] [--last_iteration K]
        [--launch "accelerate launch ..."] [--gpus N] [--stage_logs] [--print] [--key value ...]
"""

import sys

from selm.run import main

if __name__ == "__main__":
    sys.exit(main())
