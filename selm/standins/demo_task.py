"""The demo's preference data and base model for one seed, built once and cached (scripts/build_demo_task.py).

The base model is a small Llama trained with trl's `SFTTrainer` on right answers to fresh sorting prompts
(`selm.standins.sorting_task`), stopped early on purpose: its greedy answers are partly right, which leaves room to
improve and gives the ranker rewards that differ. Both output directories hold a settings.json; a build whose settings
match it is skipped before torch or trl is imported, and any change of setting rebuilds.
"""

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from selm.standins import sorting_task


@dataclass
class DemoTaskSettings:
    """Sizes of the demo task and its base model (the defaults are the demo's, chosen on development seeds)."""

    seed: int = field(default=0, metadata={"help": "Seed of the prompts, the pairs, the model's init and SFT."})
    train_rows: int = field(default=1500, metadata={"help": "Rows of train_prefs (iterations x portion rows)."})
    test_rows: int = field(default=1000, metadata={"help": "Held-out prompts (test_prefs)."})
    vocab_size: int = field(default=600, metadata={"help": "BPE vocabulary cap (the task needs ~470 tokens)."})
    hidden_size: int = field(default=128, metadata={"help": "Model width; head_dim = hidden_size / num_heads."})
    num_layers: int = field(default=2, metadata={"help": "Transformer layers."})
    num_heads: int = field(default=2, metadata={"help": "Attention heads (vLLM's CPU attention wants head_dim 64)."})
    intermediate_size: int = field(default=256, metadata={"help": "MLP width."})
    sft_max_steps: int = field(default=300, metadata={"help": "SFT optimizer steps at most, each on fresh examples."})
    sft_batch_size: int = field(default=32, metadata={"help": "SFT examples per step."})
    sft_learning_rate: float = field(
        default=1e-3, metadata={"help": "SFT learning rate (constant after 10 warmup steps)."}
    )
    sft_target_reward: float = field(
        default=0.45,
        metadata={"help": "Stop SFT at the first check where the greedy mean reward on the validation prompts reaches "
                  "this (0: run all sft_max_steps). The learning curve is steep, so a fixed step count would leave "
                  "bases of different seeds far apart."},
    )
    sft_check_every: int = field(default=5, metadata={"help": "SFT steps between validation checks."})
    validation_prompts: int = field(
        default=200, metadata={"help": "Prompts of the SFT stop check (disjoint from the data and SFT prompts)."}
    )

    def data_settings(self) -> dict:
        """What the preference data depends on (its prompts avoid the base model's SFT and validation prompts)."""
        return {"task_version": sorting_task.TASK_VERSION, "seed": self.seed, "train_rows": self.train_rows,
                "test_rows": self.test_rows, "sft_examples": self.sft_max_steps * self.sft_batch_size,
                "validation_prompts": self.validation_prompts}

    def model_settings(self) -> dict:
        """What the base model depends on: everything but the size of train_prefs (drawn after its prompts)."""
        settings = dataclasses.asdict(self)
        del settings["train_rows"]
        return {"task_version": sorting_task.TASK_VERSION, **settings}


def _stored_settings(directory) -> dict | None:
    path = Path(directory) / "settings.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def is_built(directory, settings: dict) -> bool:
    return _stored_settings(directory) == settings


def build_demo_task(settings: DemoTaskSettings, data_dir, model_dir, log=print) -> dict:
    """Write `data_dir` ({train,test}_prefs.jsonl) and `model_dir` (the SFT base) unless their settings.json match.

    Returns {"data": built?, "model": built?, "seconds": ...}.
    """
    start = time.perf_counter()
    data_wanted, model_wanted = settings.data_settings(), settings.model_settings()
    need_data, need_model = not is_built(data_dir, data_wanted), not is_built(model_dir, model_wanted)
    if need_data or need_model:
        splits = sorting_task.task_splits(settings.seed, settings.train_rows, settings.test_rows,
                                          settings.sft_max_steps * settings.sft_batch_size,
                                          settings.validation_prompts)
        if need_data:
            sorting_task.write_preference_data(data_dir, splits, data_wanted)
            log(f"demo task: wrote {data_dir} ({settings.train_rows} train_prefs, "
                f"{settings.test_rows} test_prefs rows)")
        if need_model:
            report = train_base_model(settings, splits["sft"], splits["validation"], model_dir)
            reached = report["validation_reward"]
            log(f"demo task: trained {model_dir} ({report['steps']} SFT steps"
                + (f", validation reward {reached:.3f})" if reached is not None else ")"))
    else:
        log(f"demo task: {data_dir} and {model_dir} are up to date (seed {settings.seed})")
    return {"data": need_data, "model": need_model, "seconds": time.perf_counter() - start}


def greedy_rewards(model_path, conversations: list[list[dict]], batch_size: int = 64,
                   max_new_tokens: int = 16) -> list[float]:
    """True reward of the model's greedy answer to each conversation (hf backend, as the pipeline's stages)."""
    from selm.recipe.schema import GenerationArguments
    from selm.generation import generate_responses

    settings = GenerationArguments(generation_backend="hf", temperature=0.0, max_new_tokens=max_new_tokens,
                                   generation_batch_size=batch_size)
    answers = generate_responses(str(model_path), conversations, settings, progress=False)
    return [sorting_task.reward(c, a[0]) for c, a in zip(conversations, answers)]


def _stop_at_target(settings: DemoTaskSettings, tokenizer, validation: list[list[dict]], scratch: Path, checks: list):
    """A trainer callback: every sft_check_every steps, save the model, score its greedy answers to `validation`,
    and stop training once the mean reaches sft_target_reward. Appends (step, mean) to `checks`."""
    import torch
    from transformers import TrainerCallback

    class StopAtTarget(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if settings.sft_target_reward <= 0 or state.global_step % settings.sft_check_every:
                return
            path = scratch / "check"
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            with torch.random.fork_rng():  # generation seeds torch; training's random state stays untouched
                rewards = greedy_rewards(path, validation)
            checks.append((state.global_step, sum(rewards) / len(rewards)))
            if checks[-1][1] >= settings.sft_target_reward:
                control.should_training_stop = True

    return StopAtTarget()


def train_base_model(settings: DemoTaskSettings, sft_rows: list[dict], validation: list[list[dict]],
                     model_dir) -> dict:
    """SFT a freshly initialised Llama on `sft_rows` (one optimizer step per `sft_batch_size` rows, stopped early at
    sft_target_reward) and save model + tokenizer + settings.json + sft_log.json atomically. Returns the report.

    The rows are in trl's conversational prompt-completion format, so trl renders them with the chat template just
    as DPO will: the completion is `answer</s>\n`, the newline after the end-of-turn token included.
    """
    import tempfile

    import datasets
    from trl import SFTConfig, SFTTrainer

    from selm.io import atomic_path
    from selm.standins.tiny import build_model, train_tokenizer

    datasets.disable_progress_bars()
    tokenizer = train_tokenizer(sorting_task.tokenizer_corpus(), settings.vocab_size)
    model = build_model(tokenizer, hidden_size=settings.hidden_size, num_layers=settings.num_layers,
                        num_heads=settings.num_heads, intermediate_size=settings.intermediate_size,
                        max_position_embeddings=128, seed=settings.seed)
    checks = []
    with tempfile.TemporaryDirectory() as scratch:
        args = SFTConfig(
            output_dir=scratch, max_steps=settings.sft_max_steps, per_device_train_batch_size=settings.sft_batch_size,
            learning_rate=settings.sft_learning_rate, lr_scheduler_type="constant_with_warmup", warmup_steps=10,
            weight_decay=0.0, seed=settings.seed, completion_only_loss=True, max_length=64,
            bf16=False, use_cpu=True, gradient_checkpointing=False, save_strategy="no", report_to="none",
            logging_steps=settings.sft_check_every, disable_tqdm=True, dataloader_num_workers=0,
        )
        trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(sft_rows),
                             processing_class=tokenizer,
                             callbacks=[_stop_at_target(settings, tokenizer, validation, Path(scratch), checks)])
        trainer.train()
    report = {"steps": trainer.state.global_step, "validation_reward": checks[-1][1] if checks else None,
              "checks": checks, "log_history": trainer.state.log_history}
    with atomic_path(model_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "sft_log.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        (tmp / "settings.json").write_text(json.dumps(settings.model_settings(), indent=1) + "\n", encoding="utf-8")
    return report
