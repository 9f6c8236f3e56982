"""Step 2: iteration K's starting model answers the prompts of its portion -> iter-K/generated.parquet.

    python scripts/generate.py RECIPE.yaml --iteration K [--key value ...] [--dry_run]

Resumable: finished shards in iter-K/generated.shards/ are kept; an existing generated.parquet is left alone.
"""

import sys

from selm.cli import main_guard
from selm.recipe.parse import parse_recipe


@main_guard
def main(argv=None):
    from selm.generation import generate_stage
    from selm.lock import stage_lock
    from selm.run_info import stage_record

    recipe, dry_run = parse_recipe(argv, stage="generate")
    if dry_run:
        from selm.chat import dry_run_preview

        print(recipe.to_yaml())
        print(dry_run_preview(recipe, "generate"))  # check BOS and end of turn
        return
    with stage_lock(recipe), stage_record(recipe):
        out = recipe.iter_dir() / "generated.parquet"
        if out.exists():
            print(f"generate: {out} exists; nothing to do (delete it to generate again)")
            return
        generate_stage(recipe)
    print(f"generate: wrote {out}")


if __name__ == "__main__":  # vLLM and the data-parallel workers spawn processes that re-import this file
    main(sys.argv[1:])
