"""Held-out evaluation of one iteration's model (or the run's starting model) -> <iter-K or base>/eval/.

    python scripts/evaluate.py RECIPE.yaml --iteration K|base [--key value ...] [--dry_run]

Greedy answers to the held-out prompts (eval_split, eval_max_samples), scored against each row's chosen answer by
the recipe's ranker (see selm/evaluation.py for the exact formulas). Writes eval/answers.parquet and
eval/metrics.json; resumable, and a finished evaluation is not redone.
"""

import json
import sys

from selm.cli import main_guard
from selm.recipe.parse import parse_recipe


@main_guard
def main(argv=None):
    recipe, dry_run = parse_recipe(argv, stage="evaluate")
    if dry_run:
        print(recipe.to_yaml())
        return 0
    from selm.evaluation import eval_dir, evaluate_stage
    from selm.lock import stage_lock
    from selm.run_info import stage_record

    with stage_lock(recipe), stage_record(recipe):
        done = (eval_dir(recipe) / "metrics.json").exists()
        metrics = evaluate_stage(recipe)
    summary = {k: metrics[k] for k in ("iteration", "model", "metric", "mean", "sem", "win_rate", "num_prompts")}
    print(f"evaluate: {'already done' if done else 'wrote'} {eval_dir(recipe)}/metrics.json\n{json.dumps(summary)}")
    return 0


if __name__ == "__main__":  # vLLM and the data-parallel workers spawn processes that re-import this file
    sys.exit(main(sys.argv[1:]))
