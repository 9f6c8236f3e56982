"""Step 2: iteration K's starting model answers the prompts of its portion -> iter-K/generated.parquet.

    python scripts/generate.py RECIPE.yaml --iteration K [--key value ...] [--dry_run]

Resumable: finished shards in iter-K/generated.shards/ are kept; an existing generated.parquet is left alone
(selm/generation_stage.py).
"""

import sys

from selm.cli import run_stage


def main(argv=None):
    from selm.generation_stage import generate_stage

    return run_stage("generate", generate_stage, argv)


if __name__ == "__main__":  # vLLM and the data-parallel workers spawn processes that re-import this file
    sys.exit(main(sys.argv[1:]))
