"""Ranking stage: python scripts/rank.py RECIPE.yaml --iteration K [--key value ...] [--dry_run]

Reads RUN_DIR/iter-K/generated.parquet and writes iter-K/ranked.parquet, iter-K/ranking_dropped.parquet and
iter-K/rank_report.json (see selm/ranking.py for the candidates, update rules and tie rule).
"""

import sys

from selm.cli import main_guard
from selm.recipe.parse import parse_recipe


@main_guard
def main(argv=None):
    recipe, dry_run = parse_recipe(argv, stage="rank")
    if dry_run:
        print(recipe.to_yaml())
        return 0
    from selm.lock import stage_lock
    from selm.ranking import run_ranking_stage
    from selm.run_info import stage_record

    with stage_lock(recipe), stage_record(recipe):
        run_ranking_stage(recipe)
    return 0


if __name__ == "__main__":
    sys.exit(main())
