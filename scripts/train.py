"""Training stage of one iteration: SELM (alpha > 0) or DPO (alpha = 0) from the iteration's start model.

    python scripts/train.py RECIPE.yaml --iteration K [--key value ...] [--dry_run]
    accelerate launch --config_file recipes/accelerate_configs/deepspeed_zero3.yaml --num_processes 8 \
        scripts/train.py RECIPE.yaml --iteration K

Reads iter-K/ranked.parquet (or, for iteration 0 of a dpo_iteration_zero recipe, the original pairs of the
first portion). Policy and reference both start from the previous iteration's model (the base model for the
first iteration). Writes iter-K/model/ (model + tokenizer, renamed into place when complete) and
iter-K/train_config.yaml. Checkpoints go to iter-K/checkpoints/; a rerun resumes from the last complete one, and
an iteration whose model exists is not retrained (selm/training.py).
"""

import sys

from selm.cli import run_stage


def main(argv=None):
    from selm.training import train_stage

    return run_stage("train", train_stage, argv)


if __name__ == "__main__":
    sys.exit(main())
