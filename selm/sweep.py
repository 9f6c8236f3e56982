"""Grid searches: a sweep file names a recipe and lists values for any recipe keys; each combination is a run.

    recipe: recipes/zephyr-7b-sft/selm.yaml
    output_root: runs/sweeps/zephyr-alpha
    overrides: {iteration_zero_dir: "{output_root}/iter-0"}   # optional, the same for every run
    grid:
      alpha: [0.005, 0.001, 0.0005, 0.0001]

`{output_root}` in a string value stands for the output root, which `--output_root` (make's SWEEP_ROOT; the CPU
rehearsal) may move.

`expand` lists one run per combination (run directory and overrides); `run_sweep` (make sweep) runs each with the run
driver, which freezes it (a rerun reuses them: a sweep resumes like a run). `table` collects each run's summary into
output_root/sweep_table.{md,csv}, ranked by the held-out metric (the paper's selection rule).
"""

import csv
import io
import itertools
from pathlib import Path

import yaml

from selm.recipe.parse import load_recipe_yaml
from selm.errors import SELMError
from selm.io import write_text
from selm.layout import SWEEP_REWARDS_PNG, SWEEP_TABLE_CSV, SWEEP_TABLE_MD
from selm.summary import held_out, summarize_run


def load_sweep(path, output_root: str | None = None) -> dict:
    sweep = load_recipe_yaml(path)
    unknown = set(sweep) - {"recipe", "output_root", "overrides", "grid"}
    if unknown:
        raise SELMError(f"{path}: unknown key '{sorted(unknown)[0]}' (a sweep has recipe, output_root, overrides, grid)")
    for key in ("recipe", "output_root", "grid"):
        if not sweep.get(key):
            raise SELMError(f"{path}: '{key}' is required")
    if not isinstance(sweep["grid"], dict) or not all(isinstance(v, list) and v for v in sweep["grid"].values()):
        raise SELMError(f"{path}: 'grid' must map recipe keys to non-empty lists of values")
    if output_root:
        sweep["output_root"] = output_root
    root = str(sweep["output_root"])

    def place(value):
        return value.replace("{output_root}", root) if isinstance(value, str) else value

    sweep["overrides"] = {k: place(v) for k, v in (sweep.get("overrides") or {}).items()}
    sweep["grid"] = {k: [place(v) for v in values] for k, values in sweep["grid"].items()}
    return sweep


def _name(combo: dict) -> str:
    def fmt(v):
        return "-".join(map(str, v)) if isinstance(v, list) else str(v)

    return "_".join(f"{k}-{fmt(v)}" for k, v in combo.items())


def combinations(sweep: dict) -> list[tuple[dict, Path]]:
    keys = list(sweep["grid"])
    combos = [dict(zip(keys, values)) for values in itertools.product(*(sweep["grid"][k] for k in keys))]
    return [(c, Path(sweep["output_root"]) / _name(c)) for c in combos]


def _as_arg(value) -> str:
    """A recipe value as one command-line word: a YAML scalar or flow list (make splits ARGS at white space)."""
    if isinstance(value, list):  # built element by element: "[a,b]" without the space YAML puts after commas
        return "[" + ",".join(_as_arg(v) for v in value) + "]"
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
    if any(c.isspace() for c in text):
        raise SELMError(f"sweep value {value!r} contains white space, which cannot pass through make's ARGS")
    return text


def expand(path, output_root: str | None = None, overlay: str | None = None) -> list[tuple[str, Path, list[str]]]:
    """(recipe, run dir, overrides) per combination, in grid order, each checked for every iteration (with the overlay
    make will freeze it with). Writes nothing: every run freezes its own recipe when the run driver starts it (so
    `make -n sweep` has no side effects)."""
    from selm.recipe.freeze import check_every_iteration, merge_recipe_sources

    sweep = load_sweep(path, output_root)
    out = []
    for combo, run_dir in combinations(sweep):
        args = []
        for key, value in {**(sweep.get("overrides") or {}), **combo}.items():
            if key == "output_dir":
                raise SELMError(f"{path}: 'output_dir' is set per combination from output_root; remove it")
            args += [f"--{key}", _as_arg(value)]
        sources = [sweep["recipe"], *(["--overlay", overlay] if overlay else []), "--output_dir", str(run_dir), *args]
        _, merged, _ = merge_recipe_sources(sources, "make sweep SWEEP=path/to/sweep.yaml")
        check_every_iteration(merged, f"{path} ({run_dir.name})")  # fail before the first run starts
        out.append((sweep["recipe"], run_dir, args))
    return out


def run_sweep(path, output_root: str | None, overlay: str | None, run_options: list[str]) -> int:
    """Every combination through the run driver (selm/run.py), in grid order, after checking them all; `run_options`
    (the driver's options and recipe overrides) go to each run after its combination's overrides. Stops at the first
    run that fails; its exit status."""
    from selm.run import run

    for recipe, run_dir, overrides in expand(path, output_root, overlay):
        status = run([recipe, "--run_dir", str(run_dir), *(["--overlay", overlay] if overlay else []), *overrides,
                      *run_options])
        if status:
            return status
    return 0


def table(path, output_root: str | None = None) -> str:
    """One row per run, ranked by the held-out metric at the last iteration every evaluated run reached (the paper
    selects alpha by it; the best is marked), with the last iteration's training-side results beside it.
    Writes sweep_table.md and .csv, and sweep_rewards.png (the runs' held-out reward distributions, paper Fig. 3 middle).
    """
    from selm.plots import plot_reward_distributions

    sweep = load_sweep(path, output_root)
    root = Path(sweep["output_root"])
    runs = []
    for combo, run_dir in combinations(sweep):
        summary = summarize_run(run_dir) if run_dir.is_dir() else {"iterations": [], "held_out": []}
        runs.append((combo, run_dir, summary))
    evaluated = [{str(e["iteration"]): e for e in held_out(run_dir)} if run_dir.is_dir() else {}
                 for _, run_dir, _ in runs]
    some = [e for e in evaluated if e]
    in_all = [it for it in (some[0] if some else {}) if all(it in e for e in some)]
    selected = in_all[-1] if in_all else None

    header = list(sweep["grid"]) + ["held_out_iteration", "held_out_mean", "held_out_sem", "held_out_win_rate", "best",
                                    "run_dir", "iterations_done", "mean_score_generated", "generated_chosen",
                                    "last_train_loss", "rewards/accuracies"]
    rows = []
    for (combo, run_dir, summary), held in zip(runs, evaluated):
        done = [it for it in summary["iterations"] if it.get("model")]
        last = done[-1] if done else {}
        train_last = (last.get("train") or {}).get("last") or {}
        metric = held[selected]["metrics"] if selected in held else None
        rows.append([*(_as_arg(v) for v in combo.values()), selected if metric else None,
                     metric["mean"] if metric else None, metric["sem"] if metric else None,
                     metric["win_rate"] if metric else None, "", str(run_dir), len(done),
                     (last.get("mean_score") or {}).get("generated"),
                     (last.get("rank_report") or {}).get("generated_chosen"),
                     train_last.get("loss"), train_last.get("rewards/accuracies")])
    mean_at = header.index("held_out_mean")
    rows.sort(key=lambda r: (r[mean_at] is None, -(r[mean_at] or 0.0)))
    if rows and rows[0][mean_at] is not None:
        rows[0][header.index("best")] = "best"
    buf = io.StringIO()
    csv.writer(buf).writerows([header] + rows)
    write_text(root / SWEEP_TABLE_CSV, buf.getvalue())
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join("-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v)) for v in r) + " |"
           for r in rows]
    if selected:
        first = next(e for e in evaluated if e)[selected]["metrics"]
        md = [f"Ranked by the held-out metric at iteration {selected} ({first['metric']}); the best is marked.", ""] + md
        plot_reward_distributions({run_dir.name: evaluated[i][selected]["dir"]
                                   for i, (_, run_dir, _) in enumerate(runs) if selected in evaluated[i]},
                                  root / SWEEP_REWARDS_PNG, xlabel=first["reward"],
                                  title=f"Held-out reward distribution per run, iteration {selected}")
    text = "\n".join(md) + "\n"
    write_text(root / SWEEP_TABLE_MD, text)
    return text
