"""SELM against iterative DPO over seeds on the demo's sorting task: the report behind `make benchmark`.

    python benchmarks/demo_benchmark.py BENCH_ROOT --seeds 10 11 12 13 14 [--sweep BENCH_ROOT/alpha-seed10]

Reads the runs `make benchmark` made (BENCH_ROOT/{selm,dpo}-seed<S>/, each evaluated on the held-out prompts after
every iteration) and writes BENCH_ROOT/benchmark.{md,json,png}: the held-out mean true reward per iteration, mean ±
standard deviation over seeds for both methods, and the paired difference SELM − DPO at the last iteration with a
95% t interval over seeds. With --sweep, also the alpha sweep (held-out metric, answer length and empty answers per
alpha at the last iteration) and BENCH_ROOT/alpha_sweep.png. It measures and prints; it asserts nothing.
"""

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from selm.errors import SELMError
from selm.io import atomic_path, write_text
from selm.summary import held_out

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (standard table values).
T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]
METHODS = ("selm", "dpo")


def t_quantile(df: int) -> float:
    return T_975[df - 1] if df <= len(T_975) else 1.96


def interval(values: list[float]) -> dict:
    """Mean, sample standard deviation and the 95% t interval of the mean."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "std": None, "ci95": None, "n": len(values)}
    std = statistics.stdev(values)
    half = t_quantile(len(values) - 1) * std / math.sqrt(len(values))
    return {"mean": mean, "std": std, "ci95": [mean - half, mean + half], "n": len(values)}


def curves(root: Path, seeds: list[int]) -> dict:
    """{method: {seed: {iteration: held-out mean}}}; a run that is missing or unfinished is an error naming it."""
    out = {}
    for method in METHODS:
        out[method] = {}
        for seed in seeds:
            run = root / f"{method}-seed{seed}"
            evaluations = held_out(run) if run.is_dir() else []
            if not evaluations:
                raise SELMError(f"{run}: no held-out evaluation (run `make benchmark` first)")
            out[method][seed] = {str(e["iteration"]): e["metrics"]["mean"] for e in evaluations}
    everywhere = set.intersection(*(set(c) for m in out.values() for c in m.values()))
    for method, by_seed in out.items():
        for seed, curve in by_seed.items():
            if set(curve) - everywhere or len(curve) < max(len(c) for m in out.values() for c in m.values()):
                raise SELMError(f"{root / f'{method}-seed{seed}'}: unfinished (evaluated iterations {sorted(curve)}); "
                                "rerun `make benchmark` to complete it")
    return out


def report(root: Path, seeds: list[int]) -> dict:
    data = curves(root, seeds)
    iterations = sorted({it for m in data.values() for c in m.values() for it in c},
                        key=lambda it: -1 if it == "base" else int(it))
    per_iteration = {it: {m: interval([data[m][s][it] for s in seeds]) for m in METHODS} for it in iterations}
    last = iterations[-1]
    paired = {it: interval([data["selm"][s][it] - data["dpo"][s][it] for s in seeds]) for it in iterations}
    return {"seeds": seeds, "iterations": iterations, "per_seed": data, "per_iteration": per_iteration,
            "paired_difference": paired, "last_iteration": last}


def alpha_sweep(runs: list[Path]) -> list[dict]:
    """Per run (the sweep's, and the seed's SELM and DPO runs, which are its α = 0.01 and α = 0 points): α from its
    frozen recipe and the last evaluated iteration's held-out metrics."""
    import yaml

    rows = []
    for run in runs:
        evaluations = held_out(run) if (run / "recipe.yaml").is_file() else []
        if evaluations:
            last = evaluations[-1]
            alpha = float(yaml.safe_load((run / "recipe.yaml").read_text(encoding="utf-8")).get("alpha", 0.0))
            rows.append({"alpha": alpha, "iteration": last["iteration"], **{k: last["metrics"][k] for k in (
                "mean", "sem", "win_rate", "empty_answers", "mean_answer_tokens", "num_prompts")}})
    if not rows:
        raise SELMError(f"no evaluated run among {[str(r) for r in runs]}")
    rows = list({r["alpha"]: r for r in reversed(rows)}.values())  # one per α: the first run given wins
    return sorted(rows, key=lambda r: r["alpha"])


def fmt(d: dict) -> str:
    if d["std"] is None:
        return f"{d['mean']:.4f}"
    return f"{d['mean']:.4f} ± {d['std']:.4f}"


def to_markdown(result: dict, sweep: list[dict] | None) -> str:
    seeds, last = result["seeds"], result["last_iteration"]
    lines = [f"# SELM against iterative DPO on the sorting task ({len(seeds)} seeds: {', '.join(map(str, seeds))})", "",
             "Held-out mean true reward of greedy answers, mean ± standard deviation over seeds "
             "(base = the SFT model both start from):", "",
             "| iteration | SELM | iterative DPO | SELM − DPO (paired) |", "|---|---|---|---|"]
    for it in result["iterations"]:
        row, d = result["per_iteration"][it], result["paired_difference"][it]
        lines.append(f"| {it} | {fmt(row['selm'])} | {fmt(row['dpo'])} | {d['mean']:+.4f} |")
    d = result["paired_difference"][last]
    ci = f"[{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]" if d["ci95"] else "(one seed: no interval)"
    verdict = ("the interval excludes 0" if d["ci95"] and (d["ci95"][0] > 0 or d["ci95"][1] < 0)
               else "the interval includes 0: no difference shown")
    lines += ["", f"Paired difference SELM − DPO at iteration {last}: {d['mean']:+.4f}, 95% t interval over seeds "
              f"{ci}; {verdict}.", "", "Per seed:", "",
              "| seed | " + " | ".join(f"SELM {it}" for it in result["iterations"]) + " | "
              + " | ".join(f"DPO {it}" for it in result["iterations"]) + " |",
              "|---|" + "---|" * (2 * len(result["iterations"]))]
    for s in seeds:
        cells = [f"{result['per_seed'][m][s][it]:.4f}" for m in METHODS for it in result["iterations"]]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    if sweep:
        lines += ["", f"Alpha sweep (seed {seeds[0]}, held-out metric at the last iteration; α = 0 is iterative DPO):",
                  "", "| α | mean ± s.e. | win rate | empty answers | mean answer tokens |", "|---|---|---|---|---|"]
        for r in sweep:
            lines.append(f"| {r['alpha']:g} | {r['mean']:.4f} ± {r['sem']:.4f} | {r['win_rate']:.3f} | "
                         f"{r['empty_answers']} / {r['num_prompts']} | {r['mean_answer_tokens']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = result["iterations"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (method, label) in enumerate((("selm", "SELM"), ("dpo", "iterative DPO"))):
        x = [j + (i - 0.5) * 0.08 for j in range(len(its))]
        for s in result["seeds"]:
            ax.plot(x, [result["per_seed"][method][s][it] for it in its], color=f"C{i}", alpha=0.25, linewidth=1)
        stats = [result["per_iteration"][it][method] for it in its]
        ax.errorbar(x, [d["mean"] for d in stats], yerr=[d["std"] or 0.0 for d in stats], color=f"C{i}", marker="o",
                    capsize=4, linewidth=2, label=f"{label}: mean ± std over seeds (thin: each seed)")
    ax.set_xticks(range(len(its)), its)
    ax.set(title="Held-out mean true reward per iteration", xlabel="iteration (base = the SFT model)",
           ylabel="held-out mean true reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    diffs = [result["paired_difference"][it] for it in its]
    bx.axhline(0.0, color="grey", linewidth=1)
    bx.errorbar(range(len(its)), [d["mean"] for d in diffs],
                yerr=[[d["mean"] - d["ci95"][0] if d["ci95"] else 0 for d in diffs],
                      [d["ci95"][1] - d["mean"] if d["ci95"] else 0 for d in diffs]],
                marker="o", capsize=4, color="C2", label="mean over seeds, 95% t interval")
    for s in result["seeds"]:
        bx.scatter(range(len(its)), [result["per_seed"]["selm"][s][it] - result["per_seed"]["dpo"][s][it] for it in its],
                   color="C2", alpha=0.35, s=12)
    bx.scatter([], [], color="C2", alpha=0.35, s=12, label="each seed")
    bx.set_xticks(range(len(its)), its)
    bx.set(title="Paired difference SELM − iterative DPO", xlabel="iteration", ylabel="held-out mean, SELM − DPO")
    bx.grid(alpha=0.3)
    bx.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def plot_sweep(sweep: list[dict], seed: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", required=True)
    parser.add_argument("--sweep", type=Path, default=None, help="the alpha sweep's output root")
    args = parser.parse_args(argv)
    try:
        result = report(args.root, args.seeds)
        seed_runs = [args.root / f"{m}-seed{args.seeds[0]}" for m in METHODS]
        sweep = alpha_sweep(seed_runs + sorted(args.sweep.iterdir())) if args.sweep else None
    except SELMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result["alpha_sweep"] = sweep
    write_text(args.root / "benchmark.json", json.dumps(result, indent=2) + "\n")
    text = to_markdown(result, sweep)
    write_text(args.root / "benchmark.md", text)
    plot(result, args.root / "benchmark.png")
    if sweep:
        plot_sweep(sweep, args.seeds[0], args.root / "alpha_sweep.png")
    print(text, end="")
    print(f"\nwritten: {args.root}/benchmark.{{md,json,png}}" + (f", {args.root}/alpha_sweep.png" if sweep else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
