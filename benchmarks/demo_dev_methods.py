"""The development-seed search of the other methods' settings (`demo_dev_sweep.py --method NAME`), through the run
driver: each configuration is the method's demo recipe (benchmarks/demo_methods.txt) with an overlay of the keys
tried, run by scripts/run.py from the development seed's own SFT base and data, two runs at a time, exactly as
`make benchmark` runs the reported seeds. The held-out mean per iteration and the exploration diagnostics
(selm/exploration.py, without the KL estimate) go to benchmarks/results/demo_dev_sweep.jsonl (kind "method"); a
finished configuration is not redone.
"""

import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ITERATIONS = 3

# Per method: the configurations tried, (name, recipe keys). "dpo" is the reference the others are compared with
# on the same development seeds (the demo's iterative-DPO settings, run the same way). Small grids: on 2 shared
# cores a run takes 2-5 minutes, and the reported benchmark must follow within the same afternoon.
METHOD_GRIDS = {
    "dpo": [("demo", {})],
    # n4-t0.7 ran first (seed 0): samples at 0.7 are far worse than the greedy answer, so the grid moved to low
    # temperatures (the probe in demo_dev_sweep.md: best of 4 beats greedy at 0.1, matches it at 0.3)
    "best_of_n": [(f"n{n}-t{t:g}", {"num_responses": n, "temperature": t})
                  for n, t in ((4, 0.7), (4, 0.1), (8, 0.1), (4, 0.3))],
    # beta_r from near best-of-n (0.05) to flatter (0.2), on best-of-n's candidates (n 4, temperature 0.1)
    "rso": [(f"rb{b:g}", {"num_responses": 4, "temperature": 0.1, "rso_beta": b}) for b in (0.05, 0.2)],
    # ReST: the supervised step's learning rate, thresholds rising per iteration, on the same candidates
    "rest": [(f"thr{t[0]:g}-lr{lr:g}", {"num_responses": 4, "temperature": 0.1, "rest_threshold": list(t),
                                       "learning_rate": lr})
             for t, lr in (((0.5, 0.6, 0.7), 1e-4), ((0.5, 0.6, 0.7), 3e-4), ((0.5, 0.6, 0.7), 3e-5),
                           ((1.0, 1.0, 1.0), 1e-4))],  # the last: perfect answers only (every other one hurt)
}

def run_dir(workdir: Path, method: str, config: str, seed: int, overrides: dict) -> Path:
    digest = hashlib.sha1(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:8]
    return workdir / "method-runs" / f"{method}-{config}-{digest}-seed{seed}"


def command(recipe: str, run: Path, overlay: Path, seed: int, workdir: Path) -> list[str]:
    return [sys.executable, str(REPO / "scripts/run.py"), recipe, "--run_dir", str(run), "--overlay", str(overlay),
            "--launch", sys.executable, "--stage_logs", "--seed", str(seed),
            "--model_name_or_path", str(workdir / f"base-seed{seed}"), "--dataset_name", str(workdir / f"data-seed{seed}")]


def record(method: str, config: str, seed: int, overrides: dict, run: Path, seconds: float) -> dict:
    from selm.exploration import run_diagnostics
    from selm.summary import held_out

    evaluations = {str(e["iteration"]): e["metrics"] for e in held_out(run)}
    diagnostics = run_diagnostics(run, kl_prompts=0)
    return {"kind": "method", "grid": method, "method": method, "config": config, "seed": seed, "settings": overrides,
            "base": {"mean": evaluations["base"]["mean"]},
            "iterations": [{"iteration": k, "mean": evaluations[str(k)]["mean"],
                            "empty": evaluations[str(k)]["empty_answers"] / evaluations[str(k)]["num_prompts"],
                            "mean_answer_tokens": evaluations[str(k)]["mean_answer_tokens"]}
                           for k in range(1, ITERATIONS + 1)],
            "diagnostics": diagnostics["iterations"], "seconds": round(seconds, 1),
            "date": time.strftime("%Y-%m-%d %H:%M")}


def run_method_grid(methods: dict, seeds, configs, workdir: Path, results: Path, done: set, jobs: int = 2):
    """Run every (method, configuration, seed) not in `done`, seed by seed (a sweep cut short still has whole
    seeds), `jobs` at a time; append each finished one to `results`. `methods`: {name: recipe path}."""
    import yaml

    from selm.standins.demo_task import DemoTaskSettings, build_demo_task

    for seed in seeds:
        build_demo_task(DemoTaskSettings(seed=seed), workdir / f"data-seed{seed}", workdir / f"base-seed{seed}",
                        log=print)
    todo = []
    for seed in seeds:
        for method, recipe in methods.items():
            for name, overrides in METHOD_GRIDS[method]:
                if configs and name not in configs:
                    continue
                key = json.dumps({"method": method, "config": overrides, "seed": seed}, sort_keys=True)
                if key in done:
                    print(f"{method} {name} seed {seed}: done before")
                    continue
                run = run_dir(workdir, method, name, seed, overrides)
                shutil.rmtree(run, ignore_errors=True)
                overlay = run.with_name(run.name + ".overlay.yaml")
                overlay.parent.mkdir(parents=True, exist_ok=True)
                overlay.write_text(yaml.safe_dump(overrides or {"num_iterations": ITERATIONS}), encoding="utf-8")
                todo.append((key, method, name, seed, overrides, run, command(recipe, run, overlay, seed, workdir)))
    running = []
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    while todo or running:
        while todo and len(running) < jobs:
            key, method, name, seed, overrides, run, cmd = todo.pop(0)
            log = open(run.with_name(run.name + ".log"), "w", encoding="utf-8")
            print(f"{method} {name} seed {seed}: {' '.join(cmd[1:])}", flush=True)
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO),
                            log, time.time(), key, method, name, seed, overrides, run))
        time.sleep(2)
        for item in [r for r in running if r[0].poll() is not None]:
            running.remove(item)
            process, log, started, key, method, name, seed, overrides, run = item
            log.close()
            if process.returncode != 0:
                sys.exit(f"{method} {name} seed {seed} failed (exit {process.returncode}): see {log.name}")
            entry = {"key": key, **record(method, name, seed, overrides, run, time.time() - started)}
            with results.open("a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
            done.add(key)
            its = " / ".join(f"{i['mean']:.4f}" for i in entry["iterations"])
            print(f"{method} {name} seed {seed}: held-out {entry['base']['mean']:.4f} → {its} "
                  f"({entry['seconds']:.0f} s)", flush=True)


def _mean(values):
    return f"{statistics.mean(values):.4f}" if values else "–"


def method_report(results: list[dict]) -> list[str]:
    """The markdown section of the method grids: mean over the dev seeds run, and Δ against DPO on those seeds."""
    runs = [r for r in results if r.get("kind") == "method"]
    if not runs:
        return []
    dpo = {r["seed"]: r for r in runs if r["method"] == "dpo"}
    lines = ["## The other methods (run driver, recipes of benchmarks/demo_methods.txt + the keys shown)", "",
             "Held-out mean true reward, mean over the development seeds run (n); Δ it3 = the method − iterative "
             "DPO (the demo's settings, same seeds, run the same way) at iteration 3, mean of the per-seed "
             "differences; gen. chosen = share of ranked rows whose chosen response was generated, iteration 3.", "",
             "| method | config | keys | n | base | it1 | it2 | it3 | Δ it3 | gen. chosen it3 | s per run |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    groups = {}
    for r in runs:
        groups.setdefault((r["method"], r["config"], json.dumps(r["settings"], sort_keys=True)), []).append(r)
    for (method, config, keys), rs in groups.items():
        deltas = [r["iterations"][-1]["mean"] - dpo[r["seed"]]["iterations"][-1]["mean"] for r in rs if r["seed"] in dpo]
        chosen = [r["diagnostics"][-1]["generated_chosen"] for r in rs]
        delta = f"{statistics.mean(deltas):+.4f}" if deltas and method != "dpo" else "–"
        lines.append(f"| {method} | {config} | `{keys}` | {len(rs)} | {_mean([r['base']['mean'] for r in rs])} | "
                     + " | ".join(_mean([r["iterations"][k]["mean"] for r in rs]) for k in range(ITERATIONS))
                     + f" | {delta} | {_mean(chosen)} | {statistics.mean(r['seconds'] for r in rs):.0f} |")
    lines += ["", "Per seed (held-out mean at iterations 1 / 2 / 3; empty answers at iteration 3):", "",
              "| method | config | seed | base | it1 / it2 / it3 | empty it3 |", "|---|---|---|---|---|---|"]
    for (method, config, _), rs in groups.items():
        for r in sorted(rs, key=lambda r: r["seed"]):
            lines.append(f"| {method} | {config} | {r['seed']} | {r['base']['mean']:.4f} | "
                         + " / ".join(f"{i['mean']:.4f}" for i in r["iterations"])
                         + f" | {r['iterations'][-1]['empty']:.3f} |")
    return lines + [""]
