"""Several runs side by side: held-out metrics per iteration, reward distributions at one iteration (paper Fig. 3,
middle) and implicit-reward differences on held-out pairs (paper Fig. 4).

Writes into `output_dir`: comparison.md, comparison.json, metric_per_iteration.png, reward_distributions.png and,
when asked and possible, implicit_rewards.png (the first run against each other one).
"""

import json
import math
from pathlib import Path

from selm import layout
from selm.errors import SELMError
from selm.io import write_text


def run_names(run_dirs: list[Path]) -> list[str]:
    """Short names for the runs: their directory names, or their paths where two names coincide."""
    names = [d.name for d in run_dirs]
    return [str(d) if names.count(d.name) > 1 else d.name for d in run_dirs]


def _load_runs(run_dirs: list[Path]) -> dict:
    from selm.summary import held_out

    runs = {}
    for name, d in zip(run_names(run_dirs), run_dirs):
        if not d.is_dir():
            raise SELMError(f"run directory not found: {d}")
        evaluations = held_out(d)
        if not evaluations:
            raise SELMError(f"{d}: no held-out evaluation (set evaluate: true in its recipe, or run "
                            "scripts/evaluate.py RUN/recipe.yaml --iteration K)")
        runs[name] = {"dir": d, "evaluations": {str(e["iteration"]): e for e in evaluations}}
    # Comparable only when every run answered the same prompts and was scored the same way.
    reference = None
    for name, run in runs.items():
        for it, e in run["evaluations"].items():
            key = (e["metrics"]["prompts"]["prompt_ids_sha256"], e["metrics"]["metric"])
            if reference is None:
                reference = (name, it, key)
            elif key != reference[2]:
                raise SELMError(f"{run['dir']} iteration {it} was evaluated on other prompts or with another ranker "
                                f"than {runs[reference[0]]['dir']} iteration {reference[1]}: they cannot be compared")
    return runs


def _paired_difference(a_dir: str, b_dir: str) -> dict:
    """Mean per-row reward difference A − B, with its standard error. Rows pair by position in the held-out split
    (prompt_ids may repeat); _load_runs checked that both answered the same rows, and each pair is checked here."""
    from selm.artifacts import read_answers

    a, b = (read_answers(d, ["prompt_id", "reward"]) for d in (a_dir, b_dir))
    if a["prompt_id"] != b["prompt_id"]:
        raise SELMError(f"{a_dir} and {b_dir}: {layout.EVAL_ANSWERS} holds other held-out rows (or another order); "
                        "they cannot be paired")
    diffs = [x - y for x, y in zip(a["reward"], b["reward"])]
    mean = sum(diffs) / len(diffs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / (len(diffs) - 1)) if len(diffs) > 1 else 0.0
    return {"mean": mean, "sem": sd / math.sqrt(len(diffs)), "pairs": len(diffs)}


def implicit_reward_differences(run_a: Path, run_b: Path, iteration: str) -> dict:
    """{'chosen': [...], 'rejected': [...]}: r_A(x, y) − r_B(x, y) on the held-out pairs both runs scored."""
    from selm.recipe.parse import parse_recipe
    from selm.evaluation import implicit_rewards

    tables = []
    for run in (run_a, run_b):
        recipe, _ = parse_recipe([str(layout.RunLayout(run).frozen_recipe), "--iteration", iteration], stage="evaluate")
        tables.append(implicit_rewards(recipe).to_pydict())
    for run, table in zip((run_a, run_b), tables):
        if "row" not in table:  # written before rows were keyed by position; prompt_ids alone may repeat
            path = layout.RunLayout(run).implicit_rewards(int(iteration)).relative_to(run)
            raise SELMError(f"{run}: {path} has no 'row' column; delete it and compare again (it is recomputed)")
    # A row is its position in the held-out split (and its prompt_id, which must then agree): ids may repeat.
    b_index = {(row, pid): j for j, (row, pid) in enumerate(zip(tables[1]["row"], tables[1]["prompt_id"]))}
    pairs = [(i, b_index[key]) for i, key in enumerate(zip(tables[0]["row"], tables[0]["prompt_id"]))
             if key in b_index]
    return {group: [tables[0][f"{group}_reward"][i] - tables[1][f"{group}_reward"][j] for i, j in pairs]
            for group in ("chosen", "rejected")}


def compare_runs(run_dirs, output_dir, iteration: str | None = None, implicit: bool = True) -> dict:
    """Write the comparison of `run_dirs` into `output_dir`; return it (comparison.json's content)."""
    from selm.plots import plot_implicit_reward_differences, plot_metric_per_iteration, plot_reward_distributions

    run_dirs = [Path(d) for d in run_dirs]
    if len(run_dirs) < 2:
        raise SELMError("compare_runs needs at least two run directories")
    runs = _load_runs(run_dirs)
    names = list(runs)
    common = [it for it in runs[names[0]]["evaluations"] if all(it in r["evaluations"] for r in runs.values())]
    if iteration is None:
        if not common:
            raise SELMError(f"the runs {names} have no evaluated iteration in common")
        iteration = common[-1]
    elif iteration not in common:
        missing = [n for n in names if iteration not in runs[n]["evaluations"]]
        raise SELMError(f"iteration {iteration} was not evaluated in {', '.join(str(runs[n]['dir']) for n in missing)}")
    first = runs[names[0]]["evaluations"][iteration]["metrics"]
    output_dir = Path(output_dir)

    result = {
        "metric": first["metric"], "prompts": first["prompts"], "iteration": iteration,
        "runs": {n: {"run_dir": str(r["dir"]), "held_out": {it: {k: e["metrics"][k] for k in
                     ("mean", "sem", "win_rate", "num_prompts", "empty_answers", "mean_answer_tokens")}
                     for it, e in r["evaluations"].items()}} for n, r in runs.items()},
        "paired_difference": {f"{names[0]} − {n}": _paired_difference(runs[names[0]]["evaluations"][iteration]["dir"],
                                                                      runs[n]["evaluations"][iteration]["dir"])
                              for n in names[1:]},
    }

    plot_metric_per_iteration({n: list(r["evaluations"].values()) for n, r in runs.items()},
                              output_dir / layout.COMPARISON_METRIC_PNG, title="Held-out metric per iteration")
    plot_reward_distributions({n: r["evaluations"][iteration]["dir"] for n, r in runs.items()},
                              output_dir / layout.COMPARISON_REWARDS_PNG, xlabel=first["reward"],
                              title=f"Held-out reward distribution at iteration {iteration}")
    figures = [layout.COMPARISON_METRIC_PNG, layout.COMPARISON_REWARDS_PNG]
    if implicit and iteration != layout.BASE:
        differences = {f"{names[0]} − {n}": implicit_reward_differences(runs[names[0]]["dir"], runs[n]["dir"], iteration)
                       for n in names[1:]}
        plot_implicit_reward_differences(differences, output_dir / layout.COMPARISON_IMPLICIT_PNG,
                                         title=f"Implicit reward differences on held-out pairs, iteration {iteration}")
        result["implicit_reward_difference"] = {
            label: {g: {"mean": sum(v) / len(v), "share_above_zero": sum(x > 0 for x in v) / len(v), "pairs": len(v)}
                    for g, v in d.items()} for label, d in differences.items()}
        figures.append(layout.COMPARISON_IMPLICIT_PNG)
    result["figures"] = figures
    write_text(output_dir / layout.COMPARISON_JSON, json.dumps(result, indent=2) + "\n")
    write_text(output_dir / layout.COMPARISON_MD, to_markdown(result))
    return result


def _held_out_rows(prompts: dict) -> str:
    """'40 held-out prompts', or '40 held-out rows (25 distinct prompts)' when prompts repeat."""
    rows, distinct = prompts["rows"], prompts.get("distinct_prompts", prompts["rows"])
    return f"{rows} held-out prompts" if distinct == rows else f"{rows} held-out rows ({distinct} distinct prompts)"


def to_markdown(result: dict) -> str:
    names = list(result["runs"])
    iterations = sorted({it for r in result["runs"].values() for it in r["held_out"]},
                        key=lambda it: -1 if it == layout.BASE else int(it))
    lines = [f"# Held-out comparison: {result['metric']}", "",
             f"{_held_out_rows(result['prompts'])} ({result['prompts']['dataset']}:{result['prompts']['split']}); "
             "each cell: mean ± standard error (win rate against the reference answer).", "",
             "| iteration | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for it in iterations:
        cells = []
        for n in names:
            m = result["runs"][n]["held_out"].get(it)
            cells.append(f"{m['mean']:.4f} ± {m['sem']:.4f} ({m['win_rate']:.3f})" if m else "-")
        lines.append(f"| {it} | " + " | ".join(cells) + " |")
    lines += ["", f"Paired by held-out row at iteration {result['iteration']}:", ""]
    for label, d in result["paired_difference"].items():
        lines.append(f"- {label}: {d['mean']:+.4f} ± {d['sem']:.4f} (s.e., {d['pairs']} rows)")
    for label, d in result.get("implicit_reward_difference", {}).items():
        lines.append(f"- implicit reward {label}: chosen {d['chosen']['mean']:+.4f} (above 0 on "
                     f"{d['chosen']['share_above_zero']:.0%}), rejected {d['rejected']['mean']:+.4f} (above 0 on "
                     f"{d['rejected']['share_above_zero']:.0%}) of {d['chosen']['pairs']} pairs")
    lines += ["", "Figures: " + ", ".join(result["figures"])]
    return "\n".join(lines) + "\n"
