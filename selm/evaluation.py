"""Held-out evaluation (docs/DESIGN.md §6): greedy answers of a model to held-out prompts, scored against a reference.

For every held-out row (prompt x, chosen answer y*), the model answers x greedily (y) through the generation stage's
own code and backends, and the recipe's ranker scores the two candidates [y, y*]:

- `pairrm`: the reward is d(x, y) = s(y) − s(y*), where s are llm-blender's PairRM scores of the two candidates.
  With two candidates PairRM compares both orders, and s(y) − s(y*) = ℓ(x; y ≻ y*) − ℓ(x; y* ≻ y), with ℓ(x; a ≻ b)
  the logit that a (placed first) beats b. The two orders cancel PairRM's position bias; d = 0 when y = y*, and
  swapping y and y* flips the sign. The metric is the mean of d (the paper's "mean PairRM reward", Appendix C).
- `reward_model`: the reward is r(x, y); the metric is its mean; r(x, y*) is kept as the reference score.
- `oracle`: the reward is the known reward f(x, y) (the offline benchmark's metric); f(x, y*) is kept too.

A prompt is won when y's reward beats y*'s (for PairRM: d > 0); ties count one half. The win rate is the mean.

Outputs of `evaluate_stage` (both written atomically, metrics.json last: it marks the evaluation done):
    <iter-K or base>/eval/answers.parquet   every prompt, answer, reference answer and score
    <iter-K or base>/eval/metrics.json      mean, spread, win rate, and what was evaluated how
"""

import dataclasses
import hashlib
import json
import math
import shutil
import time
from pathlib import Path

from selm import layout
from selm.errors import SELMError

METRIC_NAMES = {
    "pairrm": "mean PairRM reward against the reference answer, s(y) - s(y*)",
    "reward_model": "mean reward-model score of the answer",
    "oracle": "mean true reward of the answer",
}
# What one prompt's reward is, for axis labels.
REWARD_NAMES = {
    "pairrm": "PairRM reward of the answer, s(y) - s(y*)",
    "reward_model": "reward-model score of the answer",
    "oracle": "true reward of the answer",
}


def eval_dir(recipe) -> Path:
    return recipe.iter_dir() / layout.EVAL


def load_eval_rows(recipe):
    """The held-out rows (eval_split of eval_dataset_name or dataset_name, first eval_max_samples), validated."""
    from selm.data import LOCAL_FORMATS, load_preference_data

    e, p = recipe.evaluation, recipe.pipeline
    name = e.eval_dataset_name or p.dataset_name
    if e.eval_dataset_name is None and Path(name).suffix in LOCAL_FORMATS:
        raise SELMError(f"{recipe.path}: dataset_name {name} is a single file, which has no held-out split "
                        f"'{e.eval_split}'; set eval_dataset_name to a held-out file, or make dataset_name a directory "
                        "of split files (train_prefs.jsonl, test_prefs.jsonl)")
    rows = load_preference_data(name, e.eval_split, p.dataset_config if name == p.dataset_name else None)
    if e.eval_max_samples is not None:
        if e.eval_max_samples > len(rows):
            raise SELMError(f"{recipe.path}: 'eval_max_samples' is {e.eval_max_samples} but the held-out split "
                            f"{name}:{e.eval_split} has {len(rows)} rows")
        rows = rows.select(range(e.eval_max_samples))
    return rows


def training_overlap(recipe, eval_rows) -> int:
    """How many held-out prompts are also training prompts (by prompt text), over the rows the portions come from.

    Refuses an evaluation whose every prompt was trained on (an eval_split that names the training data)."""
    from selm.data import load_preference_data

    p = recipe.pipeline
    # Only the prompt texts: the portions validate their rows when they are cut.
    train = load_preference_data(p.dataset_name, p.dataset_split, p.dataset_config, p.max_samples, validate=False)
    seen = set(train["prompt"])
    overlap = sum(prompt in seen for prompt in eval_rows["prompt"])
    if overlap == len(eval_rows):
        raise SELMError(f"{recipe.path}: every held-out prompt of eval_split '{recipe.evaluation.eval_split}' is also "
                        f"in the training data ({p.dataset_name}:{p.dataset_split}); evaluate on a held-out split")
    return overlap


def score_against_reference(scorer, ranker: str, prompts, answers, references) -> tuple[list, list, list]:
    """(rewards, reference rewards, wins) of answers y against reference answers y* (see the module docstring)."""
    scores = scorer(prompts, [[y, y_star] for y, y_star in zip(answers, references)])
    rewards, reference_rewards, wins = [], [], []
    for i, row in enumerate(scores):
        s_answer, s_reference = (float(v) for v in row)
        if not (math.isfinite(s_answer) and math.isfinite(s_reference)):
            raise SELMError(f"ranker {ranker} gave a non-finite score for held-out row {i}")
        reward, reference_reward = (s_answer - s_reference, 0.0) if ranker == "pairrm" else (s_answer, s_reference)
        rewards.append(reward)
        reference_rewards.append(reference_reward)
        wins.append(1.0 if reward > reference_reward else 0.5 if reward == reference_reward else 0.0)
    return rewards, reference_rewards, wins


def summarize_scores(rewards, wins) -> dict:
    import numpy as np

    r = np.asarray(rewards, dtype=float)
    std = float(r.std(ddof=1)) if len(r) > 1 else 0.0
    return {"mean": float(r.mean()), "std": std, "sem": std / math.sqrt(len(r)), "median": float(np.median(r)),
            "win_rate": float(np.mean(wins)), "num_prompts": len(r)}


def _prompt_ids_digest(prompt_ids) -> str:
    return hashlib.sha256("\n".join(prompt_ids).encode()).hexdigest()[:16]


def _ranker_description(ranking) -> dict:
    return {"ranker": ranking.ranker,
            "model": ranking.ranker_model_name_or_path if ranking.ranker != "oracle" else None,
            "oracle_reward": ranking.oracle_reward if ranking.ranker == "oracle" else None}


def evaluate_stage(recipe, launch=None, *, engine_kwargs: dict | None = None, progress: bool = True) -> dict:
    """Evaluate the model of `recipe`'s iteration (or the base model); return the metrics (see the module docstring).

    Resumable: answers are generated in shards under eval/answers.shards/, and an existing metrics.json is final.
    `launch` (the run_info record) has nothing to learn from evaluation.
    """
    path = eval_dir(recipe) / layout.EVAL_METRICS
    from selm.artifacts import read_metrics

    metrics = read_metrics(path.parent)
    done = metrics is not None
    metrics = metrics if done else _evaluate(recipe, engine_kwargs, progress)
    summary = {k: metrics[k] for k in ("iteration", "model", "metric", "mean", "sem", "win_rate", "num_prompts")}
    print(f"evaluate: {'already done' if done else 'wrote'} {path}\n{json.dumps(summary)}")
    return metrics


def _evaluate(recipe, engine_kwargs, progress) -> dict:
    import pyarrow as pa
    from transformers import AutoTokenizer

    from selm.data import prompt_messages, repeat_counts
    from selm.artifacts import trained_model
    from selm.generation_stage import SIGNATURE_KEYS, generate_in_shards, generator_kwargs
    from selm.io import write_parquet, write_text
    from selm.scorers import build_scorer

    out = eval_dir(recipe)
    model_path = trained_model(recipe)
    started = time.perf_counter()
    rows = load_eval_rows(recipe)
    overlap = training_overlap(recipe, rows)
    if overlap:
        print(f"evaluate: warning: {overlap} of {len(rows)} held-out prompts also occur in the training data")
    records = rows.select_columns(["prompt_id", "chosen"]).to_list()
    names = [r["prompt_id"] for r in records]
    prompts = [prompt_messages(r) for r in records]
    references = [r["chosen"][-1]["content"] for r in records]

    # Greedy, one answer per prompt, through the generation stage's code (vLLM data parallel on GPUs).
    settings = dataclasses.replace(recipe.generation, temperature=0.0, top_p=1.0, num_responses=1)
    shard_dir = out / layout.EVAL_ANSWER_SHARDS
    signature = {"model": model_path, "rows": len(names), "prompt_ids": _prompt_ids_digest(names),
                 **{k: getattr(settings, k) for k in SIGNATURE_KEYS}}
    t0 = time.perf_counter()
    responses, dropped, workers = generate_in_shards(model_path, settings, prompts, names, shard_dir, signature,
                                                     generator_kwargs(recipe, engine_kwargs, progress))
    if dropped:  # too long for the context: not answered, so not scored (named in metrics.json)
        print(f"evaluate: warning: {len(dropped)} of {len(names)} held-out prompts are too long for the context and "
              "are not evaluated (see metrics.json)")
    held_out = repeat_counts(names, prompts)  # every held-out row, answered or dropped
    answered = [i for i, r in enumerate(responses) if r is not None]
    names, prompts, references = ([x[i] for i in answered] for x in (names, prompts, references))
    answers = [responses[i][0] for i in answered]
    generate_s = time.perf_counter() - t0

    r = recipe.ranking
    t0 = time.perf_counter()
    scorer = build_scorer(r)
    rewards, reference_rewards, wins = score_against_reference(scorer, r.ranker, prompts, answers, references)
    score_s = time.perf_counter() - t0

    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=bool(recipe.training.get("trust_remote_code")))
    answer_tokens = [len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers]
    table = pa.table({
        "prompt_id": names, "prompt": pa.array(prompts, rows.data.schema.field("chosen").type),
        "answer": answers, "reference_answer": references, "reward": rewards, "reference_reward": reference_rewards,
        "win": wins, "answer_tokens": answer_tokens,
    })
    metrics = {
        "run_dir": str(recipe.run_dir),
        "iteration": recipe.iteration_name,
        "model": model_path,
        "metric": METRIC_NAMES[r.ranker],
        "reward": REWARD_NAMES[r.ranker],
        **summarize_scores(rewards, wins),
        "mean_reference_reward": sum(reference_rewards) / len(reference_rewards),
        "empty_answers": sum(not a.strip() for a in answers),
        "mean_answer_tokens": sum(answer_tokens) / len(answer_tokens),
        "prompts": {"dataset": recipe.evaluation.eval_dataset_name or recipe.pipeline.dataset_name,
                    "split": recipe.evaluation.eval_split, "eval_max_samples": recipe.evaluation.eval_max_samples,
                    **held_out, "prompt_ids_sha256": _prompt_ids_digest(names),  # of those answered
                    "also_in_training_data": overlap, "dropped_too_long": dropped},
        "ranker": _ranker_description(r),
        "generation": {"backend": settings.generation_backend, "greedy": True,
                       "max_new_tokens": settings.max_new_tokens, "data_parallel_size": settings.data_parallel_size,
                       "workers": workers,
                       "tensor_parallel_size": settings.tensor_parallel_size},
        "seconds": {"generate": round(generate_s, 2), "score": round(score_s, 2),
                    "total": round(time.perf_counter() - started, 2)},
    }
    write_parquet(table, out / layout.EVAL_ANSWERS, metadata={"model": model_path, "iteration": recipe.iteration_name})
    write_text(out / layout.EVAL_METRICS, json.dumps(metrics, indent=2) + "\n")
    shutil.rmtree(shard_dir, ignore_errors=True)
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# Implicit rewards on held-out pairs (paper Fig. 4)
# ---------------------------------------------------------------------------------------------------------------
def implicit_rewards(recipe) -> "pyarrow.Table":  # noqa: F821
    """r(x, y) = β·(log πθ(y|x) − log πref(y|x)) for the chosen and rejected answer of every held-out pair, with πθ
    this iteration's model and πref the reference it trained against (reference_model: its starting model or the
    base model), token-summed log-probs computed by the trainer's own code.

    Cached in <iter-K>/eval/implicit_rewards.parquet (atomic); rows dropped by the trainer's length rules are absent,
    so each row keeps its position in the held-out split (`row`), which pairs it with another run's (ids may repeat).
    """
    import pyarrow as pa

    from selm.data import to_trainer_format
    from selm.io import read_parquet, write_parquet

    path = eval_dir(recipe) / layout.IMPLICIT_REWARDS
    if path.exists():
        return read_parquet(path)
    if recipe.base:
        raise SELMError("implicit rewards compare an iteration's model with its starting model; the base model has none")
    from selm.artifacts import trained_model

    policy_path, reference_path = trained_model(recipe), recipe.reference_model  # the π_ref it trained against
    rows = load_eval_rows(recipe)
    data = rows.map(lambda r, i: {**to_trainer_format(r), "prompt_id": r["prompt_id"], "row": i}, with_indices=True,
                    remove_columns=rows.column_names, desc="Trainer format")
    beta = float(recipe.training["beta"])
    logps = {name: completion_logps(recipe, model, data) for name, model in (("policy", policy_path),
                                                                             ("reference", reference_path))}
    ids, kept = logps["policy"]["prompt_id"], logps["policy"]["row"]
    if kept != logps["reference"]["row"]:
        raise SELMError(f"{policy_path} and {reference_path} kept different held-out rows; cannot pair them")
    columns = {"row": kept, "prompt_id": ids}
    for group in ("chosen", "rejected"):
        policy, reference = logps["policy"][group], logps["reference"][group]
        columns[f"{group}_logp_policy"], columns[f"{group}_logp_reference"] = policy, reference
        columns[f"{group}_reward"] = [beta * (a - b) for a, b in zip(policy, reference)]
    table = pa.table(columns)
    write_parquet(table, path, metadata={"policy": policy_path, "reference": reference_path, "beta": beta})
    return table


def completion_logps(recipe, model_path: str, data) -> dict:
    """{'row', 'prompt_id', 'chosen', 'rejected'}: token-summed completion log-probs under a model, per kept row."""
    import tempfile

    from transformers import AutoTokenizer

    from selm.lora import scoreable
    from selm.models import load_model
    from selm.trainer import completion_logps as trainer_logps

    trust = bool(recipe.training.get("trust_remote_code", False))
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust)
    model = scoreable(load_model(model_path, recipe.model, trust))
    with tempfile.TemporaryDirectory(prefix="selm-logps-") as tmp:
        args = recipe.training_config(output_dir=tmp, alpha=0.0, report_to="none", save_strategy="no",
                                      push_to_hub=False, disable_tqdm=True)
        scored = trainer_logps(model, tokenizer, data, args)
    return {"row": scored["row"], "prompt_id": scored["prompt_id"], "chosen": scored["ref_chosen_logps"],
            "rejected": scored["ref_rejected_logps"]}
