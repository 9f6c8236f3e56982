"""The train stage of one iteration: SELM (alpha > 0) or DPO (alpha = 0) from the iteration's start model.

Reads iter-K/ranked.parquet (or, for iteration 0 of a dpo_iteration_zero recipe, the original pairs of the first
portion). Policy and reference both start from the previous iteration's model (the base model for the first
iteration); with `reference_model: initial` the reference is the base model in every iteration. Writes iter-K/model/
(model + tokenizer, or with use_peft the LoRA adapter + tokenizer: selm/lora.py; renamed into place when complete),
iter-K/train_config.yaml and iter-K/train_log.json. Checkpoints go to iter-K/checkpoints/; a rerun resumes from the
last complete one, and an iteration whose model exists is not retrained.
"""

import json
import re
import shutil
from contextlib import nullcontext
from pathlib import Path

from selm import layout
from selm.errors import SELMError

# Settings that may differ between two runs sharing iteration 0 without changing what it trains.
SETTINGS_NOT_CHANGING_ITERATION_ZERO = {
    "output_dir", "report_to", "logging_steps", "run_name", "save_steps", "save_total_limit", "push_to_hub",
    "hub_model_id", "hub_private_repo",
    "prefix_sharing",  # packing changes speed, not the result
    "reference_model",  # iteration 0's reference is the base model either way
}


def last_complete_checkpoint(checkpoints_dir) -> str | None:
    """The newest checkpoint that was completely written, or None (also when the directory does not exist).

    A crash while a checkpoint is being saved leaves a `checkpoint-N` directory without its trainer_state.json,
    which transformers writes last; resuming from it would fail, so it is skipped (and said so). The one rule for
    "the last checkpoint": the resume and the trainer's stop message both use it.
    """
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


def training_data_path(recipe) -> Path:
    """The iteration's pairs: the ranked ones, or the first portion's original pairs (dpo_iteration_zero)."""
    from selm.data import ensure_portion

    return ensure_portion(recipe) if recipe.is_generation_free else recipe.iter_dir() / layout.RANKED


def load_training_data(recipe, alpha: float):
    """The iteration's pairs in trl's conversational format, validated, with y_ref when alpha > 0."""
    from selm.artifacts import read_ranked
    from selm.data import to_trainer_format

    dataset = read_ranked(training_data_path(recipe), alpha)
    return dataset.map(to_trainer_format, remove_columns=dataset.column_names, desc="Trainer format")


def load_training_data_once(recipe, args):
    """`load_training_data` in every process, the global main one first: it alone writes iteration 0's portion (a
    file every node shares); the others, on every node, wait for it and read it (with local=True each node's main
    process would write it at once)."""
    with args.main_process_first(local=False, desc="training data"):
        return load_training_data(recipe, args.alpha)


def check_shared_iteration_zero(recipe) -> None:
    """A shared iteration 0 (iteration_zero_dir) is reused only by runs that would train it the same way.

    The first run to train it leaves its resolved settings in train_config.yaml; a run whose model, data or training
    settings differ (say zephyr-dpo with another beta) is refused instead of silently building on it.
    """
    import yaml

    stored_path = recipe.iter_dir() / layout.TRAIN_CONFIG
    if recipe.iteration != 0 or not recipe.pipeline.iteration_zero_dir or not stored_path.exists():
        return
    stored, current = yaml.safe_load(stored_path.read_text(encoding="utf-8")), recipe.to_dict()
    differing = [f"{group}.{k}" for group in ("model", "pipeline", "training")
                 for k in sorted(set(stored.get(group, {})) | set(current[group]))
                 if k not in SETTINGS_NOT_CHANGING_ITERATION_ZERO
                 and stored.get(group, {}).get(k) != current[group].get(k)]
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


def train_stage(recipe, launch=None) -> None:
    """Train iteration K unless its model exists; `launch` (selm.run_info.Launch) gets the launcher facts."""
    check_shared_iteration_zero(recipe)
    out_dir = recipe.iter_dir() / layout.MODEL
    if out_dir.exists():
        print(f"{out_dir} exists: iteration {recipe.iteration} is already trained; not retraining")
        return
    from selm.artifacts import start_model

    from selm.rest_training import build_sft_trainer, is_rest, load_sft_data, sft_config

    rest = is_rest(recipe)  # ReST: the supervised loss on the kept responses (selm/rest_training.py)
    start = start_model(recipe)  # before the trainer's imports and any model load
    # before any model: under ZeRO-3 it must exist for from_pretrained to shard
    args = sft_config(recipe) if rest else recipe.training_config()
    if args.n_gpu > 1:  # trl refuses nn.DataParallel, deep inside; say what to do instead, before loading anything
        raise SELMError(f"{args.n_gpu} GPUs are visible to one process: launch training with accelerate, e.g. "
                        "make run ... LAUNCH=\"accelerate launch --config_file recipes/accelerate_configs/"
                        "deepspeed_zero3.yaml --num_processes N\" (the named targets do this), or set CUDA_VISIBLE_DEVICES")
    dataset = load_sft_data(recipe, args) if rest else load_training_data_once(recipe, args)
    trainer, tokenizer = (build_sft_trainer if rest else _build_trainer)(recipe, args, start, dataset)
    if launch is not None:
        from selm.run_info import launcher_info

        launch.update(launcher=launcher_info(trainer.accelerator))  # e.g. "2 processes, DEEPSPEED, ZeRO stage 3"
    _train(recipe, args, trainer)
    main = trainer.accelerator.is_main_process
    if main:  # before the model: iter-K/model is what marks the iteration done
        from selm.io import write_text

        write_text(recipe.iter_dir() / layout.TRAIN_LOG, json.dumps(trainer.state.log_history, indent=1))
    if recipe.model.use_peft:  # iter-K/model holds the trained adapter only, not trl's frozen reference copy
        from selm.lora import drop_reference_adapter

        drop_reference_adapter(trainer)
    save_final_model(trainer, tokenizer, out_dir)
    if main:
        print(f"iteration {recipe.iteration}: model saved to {out_dir}")
        if not recipe.pipeline.keep_checkpoints:  # ZeRO-3 optimizer states of a 7B model are ~100 GB
            shutil.rmtree(args.output_dir, ignore_errors=True)


def _build_trainer(recipe, args, start: str, dataset):
    """(SELMTrainer, tokenizer) on the iteration's start model; train_config.yaml written once the data is read."""
    from transformers import AutoTokenizer

    from selm.io import write_text
    from selm.lora import check_training
    from selm.models import load_model
    from selm.trainer import SELMTrainer

    check_training(recipe, args, start)
    if args.should_save:
        write_text(recipe.iter_dir() / layout.TRAIN_CONFIG, recipe.to_yaml())
    tokenizer = AutoTokenizer.from_pretrained(start, trust_remote_code=args.trust_remote_code)
    if recipe.model.use_peft:
        return _build_lora_trainer(recipe, args, start, dataset, tokenizer), tokenizer
    policy = load_model(start, recipe.model, args.trust_remote_code)
    # The reference (recipe key reference_model): the start model, or the fixed base model. trl would otherwise
    # reload the *base* path. With precomputed reference log-probs and the start model as the reference the policy
    # itself, before its first step, is that model: no second copy is loaded.
    reference = recipe.reference_model
    same = reference == start
    ref_model = None if args.precompute_ref_log_probs and same else load_model(reference, recipe.model,
                                                                                args.trust_remote_code)
    trainer = SELMTrainer(policy, ref_model=ref_model, args=args, train_dataset=dataset, processing_class=tokenizer)
    return trainer, tokenizer


def _build_lora_trainer(recipe, args, start: str, dataset, tokenizer):
    """SELMTrainer of a use_peft iteration; its reference is exactly the start model π_{t-1} (selm/lora.py)."""
    from selm.lora import match_reference_precision, policy_and_peft_config
    from selm.trainer import SELMTrainer

    policy, peft_config = policy_and_peft_config(recipe, start, args.trust_remote_code)
    trainer = SELMTrainer(policy, ref_model=None, args=args, train_dataset=dataset, processing_class=tokenizer,
                          peft_config=peft_config)
    match_reference_precision(trainer.accelerator.unwrap_model(trainer.model))  # for a reference pass per step
    return trainer


def _train(recipe, args, trainer) -> None:
    """trainer.train(), resumed from the last complete checkpoint; a stop names the iteration too."""
    checkpoint = args.resume_from_checkpoint or last_complete_checkpoint(args.output_dir)
    if checkpoint and trainer.accelerator.is_main_process:
        print(f"resuming iteration {recipe.iteration} from {checkpoint}")
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    except SELMError as e:  # a stop (non-finite loss or gradient) names its step; say which iteration too
        raise SELMError(f"iteration {recipe.iteration}: {e}") from e
