"""Exploration diagnostics and costs of a run, from its artifacts (docs/benchmark.md): `run_diagnostics(run_dir)`.

Per iteration K (iter-K/generated.parquet, ranked.parquet, ranking_dropped.parquet, train_log.json, eval/):
- generated_chosen: the share of the ranked rows whose chosen response is a generated one (candidate index < the
  row's generated count; the dataset's own pair, when it is among the candidates, comes after them); for ReST,
  kept: the share of generated responses its filter kept;
- true_reward: mean true reward of the generated responses (all of them), of the chosen and of the rejected
  responses of the ranked rows, recomputed with the true reward function (the recipe's `oracle_reward`, or the one
  given), not read from the ranker's scores;
- distinct_samples: mean number of distinct responses among a prompt's n samples (n > 1 only);
- held_out_distinct: mean over held-out prompts of the number of distinct greedy answers (whitespace-stripped) a
  prompt received from the base model and iterations 1..K's evaluations; held_out_new: the share of held-out
  prompts whose iteration-K answer none of the earlier evaluations gave;
- kl_previous: KL(π_K ‖ π_{K−1}) on the first held-out prompts (selm/policy_kl.py: estimator and sample count);
- costs: generated responses, ranker calls (candidates scored: generated rows × candidates per row), training
  tokens (the trainer's `num_tokens`), wall seconds per stage (run_info.json; generate, rank, train, evaluate).

Written to <run_dir>/exploration.{json,md}; the JSON is reused while the KL settings are the same.
"""

import json
from pathlib import Path

from selm import layout
from selm.errors import SELMError

KL_PROMPTS, KL_SAMPLES = 200, 4  # 800 samples per iteration: s.e. 0.003-0.09 nats on the demo (docs/benchmark.md)


def _mean(values):
    values = list(values)
    return sum(values) / len(values) if values else None


def _rows(path: Path, columns=None) -> list[dict]:
    from selm.io import read_parquet

    return read_parquet(path, columns=columns).to_pylist() if path.exists() else []


def generated_count(generated_rows: list[dict], path) -> int:
    """The number of generated responses per row (one value for the whole iteration)."""
    counts = {len(r["responses"]) if r.get("responses") is not None else 1 for r in generated_rows}
    if len(counts) != 1:
        raise SELMError(f"{path}: rows hold different numbers of generated responses {sorted(counts)}")
    return counts.pop()


def ranking_diagnostics(run: layout.RunLayout, k: int, reward, update_rule: str = "best_worst") -> dict:
    """The ranking-side diagnostics of iteration k (see the module docstring); reward None: no true reward.

    ReST (`update_rule: rest`) writes one ranked row per kept response (its chosen; its rejected trains nothing):
    there, generated_chosen is 1 by construction, `kept` is the share of generated responses kept, and the
    rejected responses' reward is not reported."""
    generated = _rows(run.generated(k))
    ranked = _rows(run.ranked(k))
    if not generated or not ranked:
        raise SELMError(f"{run.iter_dir(k)}: no {layout.GENERATED} or {layout.RANKED} (iteration {k} not ranked yet)")
    n = generated_count(generated, run.generated(k))
    rest = update_rule == "rest"
    responses = [(r["chosen"][:-1], r["responses"] if r.get("responses") is not None else [r["reference_response"]])
                 for r in generated]
    out = {"iteration": k, "rows_generated": len(generated), "rows_ranked": len(ranked), "num_responses": n,
           # num_generated: written by rankers that may leave the dataset's pair out (else it is n)
           "generated_chosen": _mean(r["chosen_index"] < r.get("num_generated", n) for r in ranked),
           "kept": len(ranked) / (len(generated) * n) if rest else None,
           "distinct_samples": _mean(len(set(rs)) for _, rs in responses) if n > 1 else None}
    if reward is not None:
        out["true_reward"] = {
            "generated": _mean(reward(p, y) for p, rs in responses for y in rs),
            "chosen": _mean(reward(r["chosen"][:-1], r["chosen"][-1]["content"]) for r in ranked),
            "rejected": None if rest else _mean(reward(r["rejected"][:-1], r["rejected"][-1]["content"])
                                                for r in ranked)}
    return out


def held_out_answers(run: layout.RunLayout, iterations: list[int]) -> dict:
    """{evaluation: [answer per held-out row]} for base and the evaluated iterations, rows checked to pair up."""
    from selm.artifacts import read_answers

    found, ids = {}, None
    for name in [layout.BASE] + iterations:
        directory = run.eval_dir(name)
        if not (directory / layout.EVAL_ANSWERS).exists():
            continue
        table = read_answers(directory, ["prompt_id", "answer"])
        if ids is not None and table["prompt_id"] != ids:
            raise SELMError(f"{directory / layout.EVAL_ANSWERS}: other held-out rows than the base evaluation's; "
                            "the evaluations cannot be paired")
        ids = table["prompt_id"]
        found[name] = [a.strip() for a in table["answer"]]
    return found


def answer_diversity(answers: dict, k: int) -> dict:
    """held_out_distinct and held_out_new of iteration k (None when k or the base was not evaluated)."""
    names = [n for n in answers if n == layout.BASE or n <= k]
    if k not in answers or layout.BASE not in answers:
        return {"held_out_distinct": None, "held_out_new": None}
    per_row = list(zip(*(answers[n] for n in names)))
    return {"held_out_distinct": _mean(len(set(row)) for row in per_row),
            "held_out_new": _mean(row[-1] not in row[:-1] for row in per_row)}


def iteration_costs(run: layout.RunLayout, k: int) -> dict:
    """Generated responses, ranker calls and training tokens of iteration k. Ranker calls: every generated row's
    candidates are scored once (ReST may write a row several times: the candidates per row come from the ranked
    rows, the row count from generated.parquet)."""
    generated = _rows(run.generated(k))
    per_row = {len(r["candidates"]) for r in _rows(run.ranked(k), ["candidates"])
               + _rows(run.ranking_dropped(k), ["candidates"])}
    if len(per_row) > 1:
        raise SELMError(f"{run.ranked(k)}: rows hold different numbers of candidates {sorted(per_row)}")
    tokens = None
    if run.train_log(k).exists():
        logged = [h["num_tokens"] for h in json.loads(run.train_log(k).read_text(encoding="utf-8"))
                  if "num_tokens" in h]
        tokens = int(max(logged)) if logged else None
    return {"generated_responses": len(generated) * generated_count(generated, run.generated(k)) if generated else 0,
            "ranker_calls": len(generated) * per_row.pop() if per_row else 0, "training_tokens": tokens}


def true_reward_function(recipe, spec: str | None):
    """The true reward: `spec` ('module:function'), else the recipe's oracle ranker's; None when neither exists."""
    from selm.scorers import load_function

    if spec:
        return load_function(spec, "true_reward")
    if recipe.ranking.ranker == "oracle":
        return load_function(recipe.ranking.oracle_reward)
    return None


def _recipe(run_dir: Path, k):
    from selm.recipe.parse import parse_recipe

    frozen = layout.RunLayout(run_dir).frozen_recipe
    if not frozen.exists():
        raise SELMError(f"{run_dir}: no {layout.FROZEN_RECIPE} (not a run directory, or no stage ever ran there)")
    argv = [str(frozen)] + (["--iteration", "base"] if k == layout.BASE else ["--iteration", str(k)])
    return parse_recipe(argv, stage="evaluate")[0]


def kl_settings(kl_prompts: int, kl_samples: int, seed: int) -> dict:
    from selm.policy_kl import ESTIMATOR

    return {"estimator": ESTIMATOR, "prompts": kl_prompts, "samples_per_prompt": kl_samples, "seed": seed}


def run_diagnostics(run_dir, kl_prompts: int = KL_PROMPTS, kl_samples: int = KL_SAMPLES, true_reward: str | None = None,
                    seed: int = 0) -> dict:
    """Every diagnostic of a run's finished iterations (module docstring); writes exploration.{json,md}."""
    from selm.io import write_text
    from selm.run_info import stage_seconds
    from selm.summary import run_layout

    run_dir = Path(run_dir)
    run = run_layout(run_dir)
    out_json = run_dir / layout.EXPLORATION_JSON
    settings = {**kl_settings(kl_prompts, kl_samples, seed), "true_reward": true_reward}
    iterations = [k for k, _ in run.iterations_present() if run.ranked(k).exists()]
    if out_json.exists():
        cached = json.loads(out_json.read_text(encoding="utf-8"))
        if cached.get("settings") == settings and [i["iteration"] for i in cached["iterations"]] == iterations:
            return cached
    base_recipe = _recipe(run_dir, layout.BASE)
    reward = true_reward_function(base_recipe, true_reward)
    answers = held_out_answers(run, iterations)
    base_rows = _rows(run.eval_answers(layout.BASE), ["prompt"])[:kl_prompts] if kl_prompts else []
    rows = []
    for k in iterations:
        recipe = _recipe(run_dir, k)
        row = {**ranking_diagnostics(run, k, reward, recipe.ranking.update_rule), **answer_diversity(answers, k),
               **iteration_costs(run, k)}
        if base_rows and Path(recipe.trained_model).is_dir():
            from selm.policy_kl import estimate_kl

            row["kl_previous"] = estimate_kl(recipe.trained_model, recipe.start_model, [r["prompt"] for r in base_rows],
                                             kl_samples, recipe.generation.max_new_tokens, seed)
        rows.append(row)
    result = {"run_dir": str(run_dir), "settings": settings,
              "true_reward": true_reward or (base_recipe.ranking.oracle_reward if reward else None),
              "held_out_prompts": len(answers.get(layout.BASE, [])), "iterations": rows,
              "seconds": stage_seconds(run_dir) if run.run_info.exists() else None}
    write_text(out_json, json.dumps(result, indent=2) + "\n")
    write_text(run_dir / layout.EXPLORATION_MD, to_markdown(result))
    return result


def _f(value, digits=3):
    return "–" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def to_markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"# Exploration diagnostics: {result['run_dir']}", "",
             f"True reward: {result['true_reward'] or 'none (not an oracle ranker; pass --true_reward)'}. "
             f"KL(π_K ‖ π_K−1): {s['estimator']}, {s['prompts']} prompts × {s['samples_per_prompt']} samples. "
             f"Distinct answers over {result['held_out_prompts']} held-out prompts.", "",
             "| iter | generated chosen | true reward gen / chosen / rejected | distinct of n | held-out distinct "
             "(base..K) | new held-out answers | KL(π_K ‖ π_K−1) ± s.e. | generated | ranker calls | training tokens |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["iterations"]:
        tr = r.get("true_reward") or {}
        kl = r.get("kl_previous")
        kept = f" (kept {r['kept']:.3f})" if r.get("kept") is not None else ""
        lines.append(f"| {r['iteration']} | {_f(r['generated_chosen'])}{kept} | "
                     + " / ".join(_f(tr.get(g)) for g in ("generated", "chosen", "rejected"))
                     + f" | {_f(r['distinct_samples'], 2)} of {r['num_responses']} | {_f(r['held_out_distinct'], 2)} "
                     f"| {_f(r['held_out_new'])} | {_f(kl['kl'], 4) + ' ± ' + _f(kl['sem'], 4) if kl else '–'} "
                     f"| {r['generated_responses']} | {r['ranker_calls']} | {_f(r['training_tokens'])} |")
    return "\n".join(lines) + "\n"
