"""The report behind `make benchmark` (benchmarks/demo_benchmark.py): methods file, t interval, pairing by seed."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from selm.errors import SELMError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(REPO / "benchmarks"))  # its report and plot modules sit beside it
    spec = importlib.util.spec_from_file_location("demo_benchmark", REPO / "benchmarks/demo_benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.path.remove(str(REPO / "benchmarks"))


def test_the_repository_methods_file_parses(bench):
    methods = bench.read_methods(bench.METHODS_FILE)
    assert methods[0]["name"] == "dpo" and methods[0]["recipe"] == "recipes/demo/dpo.yaml"
    assert {"dpo", "selm"} <= {m["name"] for m in methods}


@pytest.mark.parametrize("line, fault", [("dpo recipes/demo/dpo.yaml", "expected 'name recipe label'"),
                                         ("Bad-name recipes/demo/dpo.yaml x", "expected 'name recipe label'"),
                                         ("dpo recipes/demo/nowhere.yaml x", "recipe recipes/demo/nowhere.yaml not found")])
def test_a_bad_methods_line_is_named(bench, tmp_path, line, fault):
    path = tmp_path / "methods.txt"
    path.write_text("# comment\nselm recipes/demo/selm.yaml SELM\n" + line + "\n", encoding="utf-8")
    with pytest.raises(SELMError, match=f"methods.txt:3: {fault}"):
        bench.read_methods(path)


def _t_cdf(x: float, df: int, steps: int = 20000) -> float:
    """Student's t CDF by Simpson's rule over its density (independent of the table under test)."""
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    h = x / steps
    f = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(steps + 1)]
    return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))


@pytest.mark.parametrize("df", [1, 2, 4, 9, 30])
def test_t_table_is_the_975_quantile(bench, df):
    assert _t_cdf(bench.t_quantile(df), df) == pytest.approx(0.975, abs=2e-4)


def _fake_run(root: Path, name: str, means: list[float]) -> None:
    """A run directory with held-out metrics for base and iterations 1.., and an exploration.json."""
    run = root / name
    for it, mean in zip(["base"] + list(range(1, len(means))), means):
        directory = run / ("base" if it == "base" else f"iter-{it}") / "eval"
        directory.mkdir(parents=True)
        (directory / "metrics.json").write_text(json.dumps({"mean": mean}), encoding="utf-8")
    rows = [{"iteration": k, "generated_chosen": 0.5, "true_reward": None, "distinct_samples": None,
             "held_out_distinct": 1.0 + k, "held_out_new": 0.5, "kl_previous": {"kl": 0.1 * k},
             "generated_responses": 10, "ranker_calls": 30, "training_tokens": 100} for k in range(1, len(means))]
    (run / "exploration.json").write_text(json.dumps({
        "iterations": rows, "settings": {"estimator": "e", "prompts": 1, "samples_per_prompt": 1},
        "seconds": {"generate": 1.0, "rank": 2.0, "train": 3.0, "evaluate": 4.0}}), encoding="utf-8")


def test_paired_differences_pair_by_seed(bench, tmp_path):
    seeds = [10, 11, 12]
    dpo = {10: [0.5, 0.6], 11: [0.4, 0.45], 12: [0.3, 0.42]}
    other = {10: [0.5, 0.62], 11: [0.4, 0.46], 12: [0.3, 0.45]}
    for s in seeds:
        _fake_run(tmp_path, f"dpo-seed{s}", dpo[s])
        _fake_run(tmp_path, f"x-seed{s}", other[s])
    methods = [{"name": "dpo", "recipe": "r", "label": "DPO"}, {"name": "x", "recipe": "r", "label": "X"}]
    result = bench.report(tmp_path, methods, seeds)
    d = result["paired_difference"]["x"]["1"]
    diffs = [0.02, 0.01, 0.03]  # per seed; the seeds' spread (0.3-0.6) would swamp an unpaired interval
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 2)
    assert d["mean"] == pytest.approx(mean) and d["std"] == pytest.approx(sd)
    assert d["ci95"] == pytest.approx([mean - 4.303 * sd / math.sqrt(3), mean + 4.303 * sd / math.sqrt(3)])
    assert result["costs"]["x"]["ranker_calls"]["mean"] == 30
    assert result["costs"]["x"]["cumulative_ranker_calls"] == {"base": 0, "1": 30}
    assert result["costs"]["x"]["total_seconds"]["mean"] == 10.0
    assert result["diagnostics"]["x"]["1"]["kl_previous"]["mean"] == pytest.approx(0.1)


def test_an_unfinished_run_is_named(bench, tmp_path):
    for s in (10, 11):
        _fake_run(tmp_path, f"dpo-seed{s}", [0.5, 0.6])
    _fake_run(tmp_path, "x-seed10", [0.5, 0.6])
    _fake_run(tmp_path, "x-seed11", [0.5])
    methods = [{"name": "dpo", "recipe": "r", "label": "DPO"}, {"name": "x", "recipe": "r", "label": "X"}]
    with pytest.raises(SELMError, match="x-seed11: unfinished"):
        bench.report(tmp_path, methods, [10, 11])
