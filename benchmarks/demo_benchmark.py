"""The methods of benchmarks/demo_methods.txt over seeds on the demo's sorting task: the report behind `make benchmark`.

    python benchmarks/demo_benchmark.py BENCH_ROOT --seeds 10 11 12 13 14 [--methods benchmarks/demo_methods.txt]
        [--sweep BENCH_ROOT/alpha-seed10]

Reads the runs `make benchmark` made (BENCH_ROOT/<method>-seed<S>/, each evaluated on the held-out prompts after
every iteration, with its exploration.json from scripts/exploration.py) and writes into BENCH_ROOT:
- benchmark.{md,json}: the held-out mean true reward per iteration, mean ± standard deviation over seeds per
  method; the paired difference of each method against the first one (iterative DPO) per iteration, with a 95% t
  interval over seeds; the cost of each method (generated responses, ranker calls = candidates scored, training
  tokens, wall seconds per stage and in all; means over seeds, summed over iterations);
- benchmark.png (reward per iteration, paired differences) and reward_vs_ranker_calls.png;
- diagnostics.{md,json} and diagnostics.png: the exploration diagnostics per iteration and method, means over seeds;
- with --sweep, the alpha sweep (held-out metric, answer length and empty answers per alpha at the last iteration)
  and alpha_sweep.png.
It measures and prints; it asserts nothing.
"""

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path

from selm import layout
from selm.errors import SELMError
from selm.io import write_text
from selm.summary import held_out

REPO = Path(__file__).resolve().parent.parent
METHODS_FILE = REPO / "benchmarks/demo_methods.txt"
# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (standard table values).
T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]
ALPHA_POINTS = ("dpo", "selm")  # the methods whose seed runs are the α = 0 and α = 0.01 points of the sweep
STAGES = ("generate", "rank", "train", "evaluate")
COSTS = ("generated_responses", "ranker_calls", "training_tokens")
DIAGNOSTICS = ("generated_chosen", "kept", "true_generated", "true_chosen", "true_rejected", "distinct_samples",
               "held_out_distinct", "held_out_new", "kl_previous")


def read_methods(path: Path) -> list[dict]:
    """[{name, recipe, label}] from a methods file (benchmarks/demo_methods.txt); a bad line is named."""
    if not path.is_file():
        raise SELMError(f"methods file not found: {path}")
    methods = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split(None, 2)
        if len(parts) < 3 or not re.fullmatch(r"[a-z0-9_]+", parts[0]):
            raise SELMError(f"{path}:{number}: expected 'name recipe label' with a name of a-z, 0-9 and _; got {line!r}")
        if parts[0] in {m["name"] for m in methods}:
            raise SELMError(f"{path}:{number}: method {parts[0]!r} is listed twice")
        if not (REPO / parts[1]).is_file() and not Path(parts[1]).is_file():
            raise SELMError(f"{path}:{number}: recipe {parts[1]} not found")
        methods.append({"name": parts[0], "recipe": parts[1], "label": parts[2]})
    if len(methods) < 2:
        raise SELMError(f"{path}: needs at least two methods (the first is the baseline of the paired differences)")
    return methods


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


def run_dir(root: Path, method: str, seed: int) -> Path:
    return root / f"{method}-seed{seed}"


def curves(root: Path, names: list[str], seeds: list[int]) -> dict:
    """{method: {seed: {iteration: held-out mean}}}; a run that is missing or unfinished is an error naming it."""
    out = {}
    for method in names:
        out[method] = {}
        for seed in seeds:
            run = run_dir(root, method, seed)
            evaluations = held_out(run) if run.is_dir() else []
            if not evaluations:
                raise SELMError(f"{run}: no held-out evaluation (run `make benchmark` first)")
            out[method][seed] = {str(e["iteration"]): e["metrics"]["mean"] for e in evaluations}
    longest = max(len(c) for m in out.values() for c in m.values())
    for method, by_seed in out.items():
        for seed, curve in by_seed.items():
            if len(curve) < longest:
                raise SELMError(f"{run_dir(root, method, seed)}: unfinished (evaluated iterations {sorted(curve)}); "
                                "rerun `make benchmark` to complete it")
    return out


def exploration(root: Path, names: list[str], seeds: list[int]) -> dict:
    """{method: {seed: exploration.json}}, each written by scripts/exploration.py after its run."""
    out = {}
    for method in names:
        out[method] = {}
        for seed in seeds:
            path = run_dir(root, method, seed) / layout.EXPLORATION_JSON
            if not path.is_file():
                raise SELMError(f"{path}: missing (python scripts/exploration.py {path.parent} writes it)")
            out[method][seed] = json.loads(path.read_text(encoding="utf-8"))
    return out


def _flat(row: dict) -> dict:
    """One iteration's diagnostics as plain numbers (None where a diagnostic does not apply)."""
    true = row.get("true_reward") or {}
    kl = row.get("kl_previous")
    return {"generated_chosen": row["generated_chosen"], "kept": row.get("kept"),
            "true_generated": true.get("generated"),
            "true_chosen": true.get("chosen"), "true_rejected": true.get("rejected"),
            "distinct_samples": row["distinct_samples"], "held_out_distinct": row["held_out_distinct"],
            "held_out_new": row["held_out_new"], "kl_previous": kl["kl"] if kl else None,
            **{c: row[c] for c in COSTS}}


def _over_seeds(values: list) -> dict | None:
    values = [v for v in values if v is not None]
    return interval(values) if values else None


def report(root: Path, methods: list[dict], seeds: list[int]) -> dict:
    names = [m["name"] for m in methods]
    baseline = names[0]
    data = curves(root, names, seeds)
    explored = exploration(root, names, seeds)
    iterations = sorted({it for m in data.values() for c in m.values() for it in c},
                        key=lambda it: -1 if it == "base" else int(it))
    per_iteration = {it: {m: interval([data[m][s][it] for s in seeds]) for m in names} for it in iterations}
    paired = {m: {it: interval([data[m][s][it] - data[baseline][s][it] for s in seeds]) for it in iterations}
              for m in names[1:]}
    diagnostics, costs = {}, {}
    for m in names:
        rows = {s: {str(r["iteration"]): _flat(r) for r in explored[m][s]["iterations"]} for s in seeds}
        diagnostics[m] = {it: {d: _over_seeds([rows[s].get(it, {}).get(d) for s in seeds]) for d in DIAGNOSTICS}
                          for it in iterations if it != "base"}
        cumulative = {s: _cumulative_calls(rows[s], iterations) for s in seeds}
        costs[m] = {**{c: _over_seeds([sum(r[c] or 0 for r in rows[s].values()) for s in seeds]) for c in COSTS},
                    **{f"{st}_seconds": _over_seeds([explored[m][s]["seconds"][st] for s in seeds]) for st in STAGES},
                    "total_seconds": _over_seeds([sum(explored[m][s]["seconds"][st] for st in STAGES) for s in seeds]),
                    "cumulative_ranker_calls": {it: statistics.fmean(cumulative[s][it] for s in seeds)
                                                for it in iterations}}
    kl = next(iter(explored[baseline].values()))["settings"]
    return {"seeds": seeds, "methods": methods, "baseline": baseline, "iterations": iterations,
            "last_iteration": iterations[-1], "per_seed": data, "per_iteration": per_iteration,
            "paired_difference": paired, "costs": costs, "diagnostics": diagnostics, "kl_settings": kl}


def _cumulative_calls(rows: dict, iterations: list[str]) -> dict:
    total, out = 0, {}
    for it in iterations:
        total += rows[it]["ranker_calls"] if it in rows else 0
        out[it] = total
    return out


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


def main(argv=None) -> int:
    from demo_benchmark_report import diagnostics_markdown, to_markdown
    from demo_benchmark_plots import plot_curves, plot_diagnostics, plot_reward_vs_calls, plot_sweep

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", required=True)
    parser.add_argument("--methods", type=Path, default=METHODS_FILE, help="the methods file (name recipe label)")
    parser.add_argument("--sweep", type=Path, default=None, help="the alpha sweep's output root")
    args = parser.parse_args(argv)
    try:
        methods = read_methods(args.methods)
        result = report(args.root, methods, args.seeds)
        names = [m["name"] for m in methods]
        seed_runs = [run_dir(args.root, m, args.seeds[0]) for m in ALPHA_POINTS if m in names]
        sweep = alpha_sweep(seed_runs + sorted(args.sweep.iterdir())) if args.sweep else None
    except SELMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result["alpha_sweep"] = sweep
    root = args.root
    diagnostics = {k: result[k] for k in ("seeds", "methods", "iterations", "diagnostics", "kl_settings")}
    write_text(root / "benchmark.json", json.dumps({k: v for k, v in result.items() if k != "diagnostics"},
                                                   indent=2) + "\n")
    write_text(root / "diagnostics.json", json.dumps(diagnostics, indent=2) + "\n")
    text = to_markdown(result, sweep)
    write_text(root / "benchmark.md", text)
    write_text(root / "diagnostics.md", diagnostics_markdown(result))
    plot_curves(result, root / "benchmark.png")
    plot_reward_vs_calls(result, root / "reward_vs_ranker_calls.png")
    plot_diagnostics(result, root / "diagnostics.png")
    if sweep:
        plot_sweep(sweep, args.seeds[0], root / "alpha_sweep.png")
    print(text, end="")
    print(f"\nwritten: {root}/benchmark.{{md,json,png}}, reward_vs_ranker_calls.png, diagnostics.{{md,json,png}}"
          + (", alpha_sweep.png" if sweep else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
