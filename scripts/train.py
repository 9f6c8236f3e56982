"""Training stage of one iteration: SELM (alpha > 0) or DPO (alpha = 0) from the iteration's start model.

    python scripts/train.py RECIPE.yaml --iteration K [--key value ...] [--dry_run]
    accelerate launch --config_file recipes/accelerate_configs/deepspeed_zero3.yaml --num_processes 8 \
        scripts/train.py RECIPE.yaml --iteration K

Reads iter-K/ranked.parquet (or, for iteration 0 of a dpo_iteration_zero recipe, the original pairs of the
first portion). Policy and reference both start from the previous iteration's model (the base model for the
first iteration). Writes iter-K/model/ (model + tokenizer, renamed into place when complete) and
iter-K/train_config.yaml. Checkpoints go to iter-K/checkpoints/; a rerun resumes from the last one, and an
iteration whose model exists is not retrained.
"""

import json
import shutil
import sys
from contextlib import nullcontext

from selm.cli import main_guard
from selm.recipe.parse import parse_recipe
from selm.models import load_model
from selm.errors import SELMError

REFERENCE = "reference_response"


def load_training_data_once(recipe, args):
    """`load_training_data` in every process, the global main one first: it alone writes iteration 0's portion (a
    file every node shares); the others, on every node, wait for it and read it (with local=True each node's main
    process would write it at once)."""
    with args.main_process_first(local=False, desc="training data"):
        return load_training_data(recipe, args.alpha)


def load_training_data(recipe, alpha: float):
    """The iteration's pairs in trl's conversational format, validated, with y_ref when alpha > 0."""
    from selm.data import ensure_portion, read_parquet_dataset, to_trainer_format, validate_preference_data

    path = ensure_portion(recipe) if recipe.is_generation_free else recipe.iter_dir() / "ranked.parquet"
    dataset = read_parquet_dataset(path)
    validate_preference_data(dataset, str(path))
    if alpha > 0:
        if REFERENCE not in dataset.column_names:
            raise SELMError(f"{path}: missing column '{REFERENCE}' (alpha={alpha} > 0 needs the generated response; "
                            "run the generate and rank stages, or set alpha: 0 for DPO)")
        for row, value in enumerate(dataset[REFERENCE]):
            if not isinstance(value, str):
                raise SELMError(f"{path}: row {row}, column '{REFERENCE}': expected a string, got {value!r}")
    else:
        # Iterative DPO: y_ref plays no part in the loss, so it is not tokenized or scored (a 1.5x cheaper step).
        dataset = dataset.remove_columns([c for c in dataset.column_names if c == REFERENCE])
    return dataset.map(to_trainer_format, remove_columns=dataset.column_names, desc="Trainer format")


def last_complete_checkpoint(checkpoints_dir) -> str | None:
    """The newest checkpoint that was completely written, or None.

    A crash while a checkpoint is being saved leaves a `checkpoint-N` directory without its trainer_state.json,
    which transformers writes last; resuming from it would fail, so it is skipped (and said so).
    """
    import re
    from pathlib import Path

    found = [(int(m[1]), p) for p in Path(checkpoints_dir).glob("checkpoint-*")
             if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and p.is_dir()]
    for _, path in sorted(found, reverse=True):
        try:
            json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            print(f"skipping {path}: incompletely written (no readable trainer_state.json)")
            continue
        return str(path)
    return None


# Settings that may differ between two runs sharing iteration 0 without changing what it trains.
HARMLESS = {"output_dir", "report_to", "logging_steps", "run_name", "save_steps", "save_total_limit", "push_to_hub",
            "hub_model_id", "hub_private_repo", "prefix_sharing"}  # packing changes speed, not the result


def check_shared_iteration_zero(recipe) -> None:
    """A shared iteration 0 (iteration_zero_dir) is reused only by runs that would train it the same way.

    The first run to train it leaves its resolved settings in train_config.yaml; a run whose model, data or training
    settings differ (say zephyr-dpo with another beta) is refused instead of silently building on it.
    """
    import yaml

    stored_path = recipe.iter_dir() / "train_config.yaml"
    if recipe.iteration != 0 or not recipe.pipeline.iteration_zero_dir or not stored_path.exists():
        return
    stored, current = yaml.safe_load(stored_path.read_text(encoding="utf-8")), recipe.to_dict()
    differing = [f"{group}.{k}" for group in ("model", "pipeline", "training")
                 for k in sorted(set(stored.get(group, {})) | set(current[group]))
                 if k not in HARMLESS and stored.get(group, {}).get(k) != current[group].get(k)]
    if differing:
        raise SELMError(f"{stored_path}: the shared iteration 0 was trained with other settings ({', '.join(differing[:6])}); "
                        "point iteration_zero_dir elsewhere for this run")


def save_final_model(trainer, tokenizer, out_dir) -> None:
    """Write model + tokenizer to a temporary directory, then rename it onto `out_dir` (main process only).

    Every process takes part in `save_model`: under ZeRO-3 it gathers the sharded weights, a collective.
    """
    from accelerate.utils import broadcast_object_list

    from selm.io import atomic_path

    accelerator = trainer.accelerator
    main = accelerator.is_main_process
    with atomic_path(out_dir) if main else nullcontext() as tmp:
        shared = [str(tmp) if main else None]
        broadcast_object_list(shared, from_process=0)
        trainer.save_model(shared[0])
        if main:
            tokenizer.save_pretrained(shared[0])
        accelerator.wait_for_everyone()  # all writes are done before the main process renames


@main_guard
def main(argv=None):
    from selm.lock import stage_lock
    from selm.run_info import stage_record

    recipe, dry_run = parse_recipe(argv, stage="train")
    if dry_run:
        from selm.chat import dry_run_preview

        print(recipe.to_yaml())
        print(dry_run_preview(recipe, "train"))  # check BOS and end of turn
        return 0
    with stage_lock(recipe), stage_record(recipe) as launch:
        return train_iteration(recipe, launch)


def train_iteration(recipe, launch) -> int:
    """Train iteration K unless its model exists; `launch` (selm.run_info.Launch) gets the launcher facts."""
    check_shared_iteration_zero(recipe)
    out_dir = recipe.iter_dir() / "model"
    if out_dir.exists():
        print(f"{out_dir} exists: iteration {recipe.iteration} is already trained; not retraining")
        return 0
    if recipe.model.use_peft:
        raise SELMError(f"{recipe.path}: 'use_peft' is not supported by the train stage: every iteration's model "
                        "must be a full model, since the next iteration starts from it")

    from selm.generation import check_start_model

    check_start_model(recipe)  # before the trainer's imports and any model load

    from transformers import AutoTokenizer
    from selm.io import write_text
    from selm.run_info import launcher_info
    from selm.trainer import SELMTrainer

    # Built before any model: under ZeRO-3 the config must exist for from_pretrained to shard at load time.
    args = recipe.training_config()
    if args.n_gpu > 1:  # trl refuses nn.DataParallel, deep inside; say what to do instead, before loading anything
        raise SELMError(f"{args.n_gpu} GPUs are visible to one process: launch training with accelerate, e.g. "
                        "make run ... LAUNCH=\"accelerate launch --config_file recipes/accelerate_configs/"
                        "deepspeed_zero3.yaml --num_processes N\" (the named targets do this), or set CUDA_VISIBLE_DEVICES")
    dataset = load_training_data_once(recipe, args)
    if args.should_save:
        write_text(recipe.iter_dir() / "train_config.yaml", recipe.to_yaml())

    start = recipe.start_model
    tokenizer = AutoTokenizer.from_pretrained(start, trust_remote_code=args.trust_remote_code)
    policy = load_model(start, recipe.model, args.trust_remote_code)
    # The reference is the iteration's start model. trl would otherwise reload the *base* path. With precomputed
    # reference log-probs the policy itself, before its first step, is that model: no second copy is loaded.
    ref_model = None if args.precompute_ref_log_probs else load_model(start, recipe.model, args.trust_remote_code)
    trainer = SELMTrainer(policy, ref_model=ref_model, args=args, train_dataset=dataset, processing_class=tokenizer)
    launch.update(launcher=launcher_info(trainer.accelerator))  # e.g. "2 processes, DEEPSPEED, ZeRO stage 3"

    checkpoint = args.resume_from_checkpoint or last_complete_checkpoint(args.output_dir)
    if checkpoint and trainer.accelerator.is_main_process:
        print(f"resuming iteration {recipe.iteration} from {checkpoint}")
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    except SELMError as e:  # a stop (non-finite loss or gradient) names its step; say which iteration too
        raise SELMError(f"iteration {recipe.iteration}: {e}") from e
    if trainer.accelerator.is_main_process:  # before the model: iter-K/model is what marks the iteration done
        write_text(recipe.iter_dir() / "train_log.json", json.dumps(trainer.state.log_history, indent=1))
    save_final_model(trainer, tokenizer, out_dir)
    if trainer.accelerator.is_main_process:
        print(f"iteration {recipe.iteration}: model saved to {out_dir}")
        if not recipe.pipeline.keep_checkpoints:  # ZeRO-3 optimizer states of a 7B model are ~100 GB
            shutil.rmtree(args.output_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
