"""What each iteration of a run produced, from the artifacts themselves: summary.json, summary.md and summary.png."""

import json
from pathlib import Path

from selm.errors import SELMError
from selm.io import atomic_path, parquet_num_rows, read_parquet, write_text
from selm.layout import BASE, RunLayout


def run_layout(run_dir) -> RunLayout:
    """The layout of a run directory, with the frozen recipe's shared iteration-0 directory when it has one."""
    from selm.recipe.parse import iterations_of, load_recipe_yaml

    frozen = RunLayout(run_dir).frozen_recipe
    if not frozen.exists():
        return RunLayout(run_dir)
    recipe = load_recipe_yaml(frozen)
    # read as the run driver's plan reads it ('false' in quotes is false)
    shared = recipe.get("iteration_zero_dir") if iterations_of(recipe, str(frozen))[0] == 0 else None
    return RunLayout(run_dir, iteration_zero_dir=shared or None)


def _rows(path: Path) -> int | None:
    return parquet_num_rows(path) if path.exists() else None


def iteration_summary(layout: RunLayout, k: int) -> dict:
    model = layout.model(k).resolve()
    out = {"iteration": k, "dir": str(layout.iter_dir(k).resolve()), "portion_rows": _rows(layout.portion(k)),
           "generated_rows": _rows(layout.generated(k)), "ranked_rows": _rows(layout.ranked(k)),
           "model": str(model) if model.is_dir() else None}
    report = layout.rank_report(k)
    if report.exists():
        out["rank_report"] = json.loads(report.read_text(encoding="utf-8"))
        out["mean_score"] = out["rank_report"].get("mean_score")
    log = layout.train_log(k)
    if log.exists():
        history = json.loads(log.read_text(encoding="utf-8"))
        steps = [h for h in history if "loss" in h]
        out["train"] = {"steps": len(steps), "first_loss": steps[0]["loss"] if steps else None,
                        "last": steps[-1] if steps else None}
    return out


def held_out(run_dir: Path) -> list[dict]:
    """The held-out evaluations of a run, base first, then by iteration: [{iteration, dir, metrics}, ...]."""
    from selm.artifacts import read_metrics
    from selm.layout import RunLayout

    layout = run_layout(run_dir)
    found = [(BASE, layout.eval_dir(BASE))]
    found += [(k, layout.eval_dir(k).resolve()) for k, _ in layout.iterations_present()]
    return [{"iteration": k, "dir": str(d), "metrics": m} for k, d in found if (m := read_metrics(d)) is not None]


def summarize_run(run_dir) -> dict:
    """Write summary.json, summary.md and the PNGs (summary.png; eval_metric.png and eval_rewards.png when the run
    was evaluated) into the run directory; return the summary."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SELMError(f"run directory not found: {run_dir}")
    layout = run_layout(run_dir)
    iterations = [iteration_summary(layout, k) for k, _ in layout.iterations_present()]
    evaluations = held_out(run_dir)
    summary = {"run_dir": str(run_dir), "held_out": [{"iteration": e["iteration"], **_metric_row(e["metrics"])}
                                                     for e in evaluations], "iterations": iterations}
    write_text(layout.summary("json"), json.dumps(summary, indent=2))
    write_text(layout.summary("md"), to_markdown(summary))
    _plot(layout, iterations)
    if evaluations:
        from selm.plots import plot_metric_per_iteration, plot_reward_distributions

        name = run_dir.name
        plot_metric_per_iteration({name: evaluations}, layout.eval_metric_figure,
                                  title=f"Held-out metric per iteration: {name}")
        plot_reward_distributions({"base model" if e["iteration"] == "base" else f"iteration {e['iteration']}": e["dir"]
                                   for e in evaluations},
                                  layout.eval_rewards_figure, xlabel=evaluations[0]["metrics"]["reward"],
                                  title=f"Held-out reward distribution per iteration: {name}")
    return summary


def _metric_row(metrics: dict) -> dict:
    """The few numbers of an evaluation that tables show."""
    return {k: metrics.get(k) for k in ("metric", "mean", "sem", "win_rate", "num_prompts", "empty_answers",
                                        "mean_answer_tokens", "model")}


def _fmt(value, digits=3):
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def held_out_markdown(rows: list[dict]) -> list[str]:
    """The held-out table: one line per evaluated iteration, base first."""
    if not rows:
        return []
    lines = [f"Held-out evaluation ({rows[0]['metric']}; win rate against the reference answer, ties half):", "",
             "| iter | mean ± s.e. | win rate | prompts | empty answers | mean answer tokens |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['iteration']} | {r['mean']:.4f} ± {r['sem']:.4f} | {r['win_rate']:.3f} | {r['num_prompts']} "
                     f"| {r['empty_answers']} | {r['mean_answer_tokens']:.1f} |")
    return lines + [""]


def to_markdown(summary: dict) -> str:
    lines = [f"# {summary['run_dir']}", ""] + held_out_markdown(summary.get("held_out", [])) + [
             "| iter | portion | generated | ranked | generated chosen | generated rejected | mean score gen / chosen / rejected | train steps | last loss | model |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for it in summary["iterations"]:
        report = it.get("rank_report", {})
        scores = it.get("mean_score", {})
        train = it.get("train") or {}
        last = train.get("last") or {}
        lines.append(
            f"| {it['iteration']} | {_fmt(it['portion_rows'])} | {_fmt(it['generated_rows'])} | {_fmt(it['ranked_rows'])} "
            f"| {_fmt(report.get('generated_chosen'))} | {_fmt(report.get('generated_rejected'))} "
            f"| {' / '.join(_fmt(scores.get(k)) for k in ('generated', 'new_chosen', 'new_rejected'))} "
            f"| {_fmt(train.get('steps'))} | {_fmt(last.get('loss'), 4)} | {'yes' if it['model'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def _plot(layout: RunLayout, iterations: list[dict]) -> None:
    """Score distributions of the ranked candidates per iteration (the paper's reward figures) and loss curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranked = [(it["iteration"], layout.ranked(it["iteration"])) for it in iterations]
    ranked = [(k, p) for k, p in ranked if p.exists()]
    logs = [(it["iteration"], layout.train_log(it["iteration"])) for it in iterations]
    logs = [(k, p) for k, p in logs if p.exists()]
    if not ranked and not logs:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for k, path in ranked:
        rows = read_parquet(path, columns=["scores", "chosen_index", "rejected_index"]).to_pylist()
        axes[0].hist([r["scores"][0] for r in rows], bins=20, alpha=0.5, label=f"iter {k}: generated")
    axes[0].set(title="Ranker score of the generated response", xlabel="score", ylabel="rows")
    for k, path in logs:
        history = [h for h in json.loads(path.read_text(encoding="utf-8")) if "loss" in h]
        axes[1].plot([h.get("step", i) for i, h in enumerate(history)], [h["loss"] for h in history], label=f"iter {k}")
    axes[1].set(title="Training loss", xlabel="step", ylabel="loss")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    with atomic_path(layout.summary("png")) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
