"""Held-out evaluation of one iteration's model (or the run's starting model) -> <iter-K or base>/eval/.

    python scripts/evaluate.py RECIPE.yaml --iteration K|base [--key value ...] [--dry_run]

Greedy answers to the held-out prompts (eval_split, eval_max_samples), scored against each row's chosen answer by
the recipe's ranker (see selm/evaluation.py for the exact formulas). Writes eval/answers.parquet and
eval/metrics.json; resumable, and a finished evaluation is not redone.
"""

import sys

from selm.cli import run_stage


def main(argv=None):
    from selm.evaluation import evaluate_stage

    return run_stage("evaluate", evaluate_stage, argv)


if __name__ == "__main__":  # vLLM and the data-parallel workers spawn processes that re-import this file
    sys.exit(main(sys.argv[1:]))
