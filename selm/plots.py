"""The held-out figures: the metric per iteration, reward distributions (paper Fig. 3) and implicit-reward
differences on held-out pairs (paper Fig. 4). Each is its own PNG, written atomically."""

from selm.io import atomic_path


def _figure(width=7.5, height=4.5, ncols=1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width, height), squeeze=False)
    return plt, fig, axes[0]


def _save(plt, fig, path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _order(iteration) -> float:
    return -1.0 if iteration == "base" else float(iteration)


def plot_metric_per_iteration(runs: dict, path, title: str, ylabel: str | None = None) -> None:
    """One line per run: the held-out mean (± one standard error) at base and after each iteration.

    `runs` maps a run's name to its evaluations [{iteration, metrics}, ...] (selm.summary.held_out)."""
    plt, fig, (ax,) = _figure()
    labels = sorted({e["iteration"] for evals in runs.values() for e in evals}, key=_order)
    x = {label: i for i, label in enumerate(labels)}
    for r, (name, evals) in enumerate(runs.items()):
        evals = sorted(evals, key=lambda e: _order(e["iteration"]))
        dodge = 0.06 * (r - (len(runs) - 1) / 2)  # side by side, so equal values and error bars stay visible
        ax.errorbar([x[e["iteration"]] + dodge for e in evals], [e["metrics"]["mean"] for e in evals],
                    yerr=[e["metrics"]["sem"] for e in evals], marker="o", capsize=3, label=name)
    ax.set_xticks(range(len(labels)), [str(label) for label in labels])
    first = next(e for evals in runs.values() for e in evals)["metrics"]
    ax.set(title=title, xlabel="iteration (base = the starting model)",
           ylabel=ylabel or f"{first['metric']}\n(mean ± s.e. over {first['num_prompts']} held-out prompts)")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(plt, fig, path)


def plot_reward_distributions(groups: dict, path, title: str, xlabel: str) -> None:
    """Histograms (shared bins, outlines) of the per-prompt held-out rewards; `groups` maps a label to an eval dir."""
    import numpy as np

    from selm.artifacts import read_rewards

    values = {label: np.asarray(read_rewards(d), dtype=float) for label, d in groups.items()}
    everything = np.concatenate(list(values.values()))
    low, high = float(everything.min()), float(everything.max())
    bins = np.linspace(low, high if high > low else low + 1.0, 31)
    plt, fig, (ax,) = _figure()
    styles = ["solid", "dashed", "dotted", "dashdot"]
    for i, (label, v) in enumerate(values.items()):  # line styles tell apart histograms that coincide
        ax.hist(v, bins=bins, histtype="step", linewidth=1.8, linestyle=styles[i % len(styles)],
                label=f"{label} (mean {v.mean():.3f})")
    ax.set(title=title, xlabel=xlabel, ylabel="held-out prompts")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(plt, fig, path)


def plot_implicit_reward_differences(differences: dict, path, title: str) -> None:
    """Paper Fig. 4: for each held-out pair, r_A(x, y) − r_B(x, y), sorted, for y = chosen and y = rejected.

    `differences` maps a label ("A − B") to {"chosen": [...], "rejected": [...]}."""
    import numpy as np

    plt, fig, axes = _figure(width=11, height=4.2, ncols=2)
    for ax, group in zip(axes, ("chosen", "rejected")):
        for label, d in differences.items():
            v = np.sort(np.asarray(d[group], dtype=float))
            ax.plot(np.arange(len(v)), v, label=f"{label} (above 0: {np.mean(v > 0):.0%})")
        ax.axhline(0.0, color="grey", linewidth=1)
        ax.set(title=f"y = {group} response", xlabel="held-out pairs, sorted by the difference",
               ylabel="implicit reward difference\nβ·log(πθ/πref), run A − run B")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    _save(plt, fig, path)
