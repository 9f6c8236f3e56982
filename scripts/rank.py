"""Ranking stage: python scripts/rank.py RECIPE.yaml --iteration K [--key value ...] [--dry_run]

Reads RUN_DIR/iter-K/generated.parquet and writes iter-K/ranked.parquet, iter-K/ranking_dropped.parquet and
iter-K/rank_report.json (see selm/ranking.py for the candidates, update rules and tie rule).
"""

import sys

from selm.cli import run_stage


def main(argv=None):
    from selm.ranking import run_ranking_stage

    return run_stage("rank", run_ranking_stage, argv)


if __name__ == "__main__":
    sys.exit(main())
