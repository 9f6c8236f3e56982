"""The figures of `make benchmark` (benchmarks/demo_benchmark.py), each its own PNG, written atomically."""

from selm.io import atomic_path

MARKERS = "osD^vP*X"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid_and_legend(ax) -> None:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _finish(plt, fig, path) -> None:
    fig.tight_layout()
    _save(plt, fig, path)


def _save(plt, fig, path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _labels(result) -> dict:
    return {m["name"]: m["label"] for m in result["methods"]}


def plot_curves(result: dict, path) -> None:
    """Left: held-out reward per iteration per method (mean ± std, thin: each seed); right: paired differences."""
    plt = _plt()
    its, label, names = result["iterations"], _labels(result), [m["name"] for m in result["methods"]]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5))
    width = 0.3 / max(1, len(names) - 1)
    for i, m in enumerate(names):
        x = [j + (i - (len(names) - 1) / 2) * width for j in range(len(its))]
        for s in result["seeds"]:
            ax.plot(x, [result["per_seed"][m][s][it] for it in its], color=f"C{i}", alpha=0.2, linewidth=1)
        stats = [result["per_iteration"][it][m] for it in its]
        ax.errorbar(x, [d["mean"] for d in stats], yerr=[d["std"] or 0.0 for d in stats], color=f"C{i}",
                    marker=MARKERS[i % len(MARKERS)], capsize=4, linewidth=2, label=label[m])
    ax.set_xticks(range(len(its)), its)
    ax.set(title="Held-out mean true reward (mean ± std over seeds; thin: each seed)",
           xlabel="iteration (base = the SFT model)", ylabel="held-out mean true reward")
    _grid_and_legend(ax)
    bx.axhline(0.0, color="grey", linewidth=1)
    others = names[1:]
    for i, m in enumerate(others, start=1):
        diffs = [result["paired_difference"][m][it] for it in its]
        x = [j + (i - 1 - (len(others) - 1) / 2) * width for j in range(len(its))]
        bx.errorbar(x, [d["mean"] for d in diffs],
                    yerr=[[d["mean"] - d["ci95"][0] if d["ci95"] else 0 for d in diffs],
                          [d["ci95"][1] - d["mean"] if d["ci95"] else 0 for d in diffs]],
                    marker=MARKERS[i % len(MARKERS)], capsize=4, color=f"C{i}", label=label[m])
    bx.set_xticks(range(len(its)), its)
    bx.set(title=f"Paired difference against {label[names[0]]}\n(mean and 95% t interval over seeds)",
           xlabel="iteration", ylabel=f"held-out mean, method − {label[names[0]]}")
    _grid_and_legend(bx)
    _finish(plt, fig, path)


def plot_reward_vs_calls(result: dict, path) -> None:
    """Held-out reward against cumulative ranker calls (one line per method, mean over seeds; base at 0)."""
    plt = _plt()
    label = _labels(result)
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, m in enumerate(label):
        calls = result["costs"][m]["cumulative_ranker_calls"]
        its = result["iterations"]
        ax.plot([calls[it] for it in its], [result["per_iteration"][it][m]["mean"] for it in its],
                marker=MARKERS[i % len(MARKERS)], color=f"C{i}", label=label[m])
    ax.set(title=f"Held-out reward against ranker calls (mean over {len(result['seeds'])} seeds; one point per "
                 "iteration)", xlabel="cumulative ranker calls (candidates scored in the rank stage)",
           ylabel="held-out mean true reward")
    _grid_and_legend(ax)
    _finish(plt, fig, path)


def plot_diagnostics(result: dict, path) -> None:
    """Generated-chosen share, KL between successive policies and held-out distinct answers, per iteration."""
    plt = _plt()
    label = _labels(result)
    panels = (("generated_chosen", "share of ranked rows", "Generated response chosen\n(1 where only generated ones are candidates)"),
              ("kl_previous", "nats", "KL(π_K ‖ π_K−1), held-out prompts"),
              ("held_out_distinct", "distinct answers per prompt", "Held-out distinct answers, base..K"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (key, ylabel, title) in zip(axes, panels):
        for i, (m, by_it) in enumerate(result["diagnostics"].items()):
            points = [(int(it), d[key]) for it, d in by_it.items() if d[key] is not None]
            if points:
                ax.errorbar([p[0] for p in points], [p[1]["mean"] for p in points],
                            yerr=[p[1]["std"] or 0.0 for p in points], marker=MARKERS[i % len(MARKERS)],
                            capsize=3, color=f"C{i}", label=label[m])
        ax.set(title=title, xlabel="iteration", ylabel=ylabel)
        ax.set_xticks(sorted({int(it) for by_it in result["diagnostics"].values() for it in by_it}))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Exploration diagnostics (mean ± std over {len(result['seeds'])} seeds)")
    _finish(plt, fig, path)


def plot_sweep(sweep: list[dict], seed: int, path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    xs = [max(r["alpha"], 1e-3) for r in sweep]  # α = 0 drawn at the left edge of the log axis
    ax.errorbar(xs, [r["mean"] for r in sweep], yerr=[r["sem"] for r in sweep], marker="o", capsize=3,
                label="held-out mean true reward (± s.e.)")
    ax.set_xscale("log")
    ax.set_xticks(xs, ["0 (DPO)" if r["alpha"] == 0 else f"{r['alpha']:g}" for r in sweep])
    ax.set(title=f"SELM's alpha on the sorting task (seed {seed}, iteration {sweep[0]['iteration']})",
           xlabel="alpha (log scale)", ylabel="held-out mean true reward")
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.plot(xs, [r["mean_answer_tokens"] for r in sweep], color="C1", linestyle="dashed", marker="s",
              label="mean answer tokens (right axis)")
    twin.set_ylabel("mean answer tokens")
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    fig.tight_layout(rect=(0, 0.08, 1, 1))  # the legend goes below the axes, clear of both curves
    fig.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="lower center", ncol=2)
    _save(plt, fig, path)
