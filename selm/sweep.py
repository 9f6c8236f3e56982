"""Grid searches: a sweep file names a recipe and lists values for any recipe keys; each combination is a run.

    recipe: recipes/zephyr-7b-sft/selm.yaml
    output_root: runs/sweeps/zephyr-alpha
    overrides: {iteration_zero_dir: runs/sweeps/zephyr-alpha/iter-0}   # optional, the same for every run
    grid:
      alpha: [0.005, 0.001, 0.0005, 0.0001]

`expand` freezes one run directory per combination (a rerun reuses them: a sweep resumes like a run);
`table` collects each run's summary into output_root/sweep_table.{md,csv}.
"""

import csv
import io
import itertools
from pathlib import Path

import yaml

from selm.configs import freeze_recipe, load_recipe_yaml
from selm.errors import SELMError
from selm.io import write_text
from selm.summary import summarize_run


def load_sweep(path) -> dict:
    sweep = load_recipe_yaml(path)
    unknown = set(sweep) - {"recipe", "output_root", "overrides", "grid"}
    if unknown:
        raise SELMError(f"{path}: unknown key '{sorted(unknown)[0]}' (a sweep has recipe, output_root, overrides, grid)")
    for key in ("recipe", "output_root", "grid"):
        if not sweep.get(key):
            raise SELMError(f"{path}: '{key}' is required")
    if not isinstance(sweep["grid"], dict) or not all(isinstance(v, list) and v for v in sweep["grid"].values()):
        raise SELMError(f"{path}: 'grid' must map recipe keys to non-empty lists of values")
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
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def expand(path) -> list[tuple[Path, Path]]:
    """Freeze every combination's recipe; return (frozen recipe, run dir) pairs in grid order."""
    sweep = load_sweep(path)
    out = []
    for combo, run_dir in combinations(sweep):
        args = [sweep["recipe"], "--output_dir", str(run_dir)]
        for key, value in {**(sweep.get("overrides") or {}), **combo}.items():
            args += [f"--{key}", _as_arg(value)]
        frozen, _ = freeze_recipe(args, allow_plan_keys=True)  # e.g. the paper's search over iteration counts
        out.append((frozen, run_dir))
    return out


def table(path) -> str:
    """One row per run: the swept values and the last iteration's results. Writes sweep_table.md and .csv."""
    sweep = load_sweep(path)
    header = list(sweep["grid"]) + ["run_dir", "iterations_done", "mean_score_generated", "generated_chosen",
                                    "last_train_loss", "rewards/accuracies"]
    rows = []
    for combo, run_dir in combinations(sweep):
        summary = summarize_run(run_dir) if run_dir.is_dir() else {"iterations": []}
        done = [it for it in summary["iterations"] if it.get("model")]
        last = done[-1] if done else {}
        train_last = (last.get("train") or {}).get("last") or {}
        rows.append([*(_as_arg(v) for v in combo.values()), str(run_dir), len(done),
                     (last.get("mean_score") or {}).get("generated"),
                     (last.get("rank_report") or {}).get("generated_chosen"),
                     train_last.get("loss"), train_last.get("rewards/accuracies")])
    buf = io.StringIO()
    csv.writer(buf).writerows([header] + rows)
    root = Path(sweep["output_root"])
    write_text(root / "sweep_table.csv", buf.getvalue())
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join("-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v)) for v in r) + " |"
           for r in rows]
    text = "\n".join(md) + "\n"
    write_text(root / "sweep_table.md", text)
    return text
