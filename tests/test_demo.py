"""`make demo` end to end in a tiny configuration: one seed, one iteration, SELM and iterative DPO side by side from
the same SFT base on the sorting task, then the comparison table and the time per stage (CPU, no hub)."""

import json

import pytest
import yaml

from test_pipeline import make

TINY_TASK = ("--train_rows 48 --test_rows 24 --hidden_size 64 --num_heads 1 --num_layers 1 --intermediate_size 64 "
             "--sft_max_steps 6 --sft_batch_size 4 --sft_target_reward 0 --validation_prompts 8")


@pytest.mark.slow
def test_tiny_demo_compares_selm_with_dpo_and_says_where_the_time_went(tmp_path):
    root, build = tmp_path / "demo", tmp_path / "build"
    out = make("demo", f"DEMO_BUILD={build}", f"DEMO_ROOT={root}", "DEMO_SEED=3", "ITER=1",
               f"DEMO_TASK_ARGS={TINY_TASK}")
    selm, dpo = (yaml.safe_load((root / m / "recipe.yaml").read_text()) for m in ("selm", "dpo"))
    assert {k for k in selm.keys() | dpo.keys() if selm.get(k) != dpo.get(k)} == {"alpha", "output_dir"}
    assert selm["alpha"] > 0 == dpo["alpha"] and selm["model_name_or_path"] == str(build / "base-seed3")
    # one line per stage with its duration, from both runs
    for run in ("selm", "dpo"):
        for stage in ("evaluate iteration base", "generate iteration 1", "rank iteration 1", "train iteration 1",
                      "evaluate iteration 1"):
            assert f"[{run}] {stage}: done in" in out
    # the comparison: held-out mean true reward per iteration of both, base first, as md, json and figures
    result = json.loads((root / "comparison.json").read_text())
    assert result["metric"] == "mean true reward of the answer" and result["prompts"]["rows"] == 24
    for run in ("selm", "dpo"):
        for it in ("base", "1"):
            metrics = json.loads((root / run / ("base" if it == "base" else "iter-1") / "eval" / "metrics.json").read_text())
            assert result["runs"][run]["held_out"][it]["mean"] == metrics["mean"]
    assert result["runs"]["selm"]["held_out"]["base"] == result["runs"]["dpo"]["held_out"]["base"]  # same start
    table = (root / "comparison.md").read_text()
    assert table in out and "| base |" in table and "| 1 |" in table
    assert all((root / f).exists() for f in result["figures"])
    # where the time went: per run and stage (the table is read from each run's run_info.json), and the wall time
    for run in ("selm", "dpo"):
        launches = json.loads((root / run / "run_info.json").read_text())["launches"]
        timed = {(r["stage"], r["iteration"]) for r in launches if r["status"] == "finished" and r["seconds"] > 0}
        assert {("evaluate", "base"), ("generate", 1), ("rank", 1), ("train", 1), ("evaluate", 1)} <= timed
        assert f"| {run} | " in out
    assert "wall time:" in out
