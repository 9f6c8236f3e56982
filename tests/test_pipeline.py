"""The pipeline through make and the run driver: the smoke run, interruption and resume, and a sweep (CPU, tiny model, no hub)."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import REPO

VENV = Path(sys.executable).parent.parent


def make_command(*args, plain_launch=True):
    # -o: the environment running the tests is the one to use; make must not try to (re)install it.
    # plain_launch: train with this interpreter, whatever launcher the target would use (accelerate, srun, ...).
    return ["make", "--no-print-directory", "-C", str(REPO), f"VENV={VENV}", "-o", f"{VENV}/.installed",
            *([f"LAUNCH={sys.executable}"] if plain_launch else []), *args]


def make(*args, plain_launch=True):
    proc = subprocess.run(make_command(*args, plain_launch=plain_launch), capture_output=True, text=True)
    if proc.returncode:
        raise AssertionError(f"make {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


# Run-level reports, rewritten at the end of every `make run` from the stage artifacts, and the run's bookkeeping
# (launch records, lock files), which every launch updates.
REPORTS = {"summary.json", "summary.md", "summary.png", "eval_metric.png", "eval_rewards.png", "run_info.json",
           ".run_info.lock", ".selm.lock"}


def artifacts(run: Path, prefix: str = "") -> dict:
    """Stage artifacts of a run (under `prefix`) with their mtimes."""
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in sorted(run.rglob("*"))
            if p.is_file() and str(p.relative_to(run)).startswith(prefix) and str(p.relative_to(run)) not in REPORTS}


def rows(path: Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows


def drawn(png: Path) -> bool:
    """The file is a PNG image with something drawn on it (more than one colour)."""
    import matplotlib.image

    pixels = matplotlib.image.imread(png)
    return pixels.ndim == 3 and bool((pixels.reshape(-1, pixels.shape[-1]) != pixels[0, 0]).any())


def check_finished_run(run: Path) -> dict:
    """Every stage's artifacts of both smoke iterations; returns the row counts."""
    from selm.io import read_parquet_metadata

    counts = {}
    for k in (1, 2):
        d = run / f"iter-{k}"
        report = json.loads((d / "rank_report.json").read_text())
        dropped = rows(d / "ranking_dropped.parquet") if (d / "ranking_dropped.parquet").exists() else 0
        counts[k] = (rows(d / "portion.parquet"), rows(d / "generated.parquet"), rows(d / "ranked.parquet"), dropped)
        assert counts[k][:2] == (50, 50) and counts[k][2] + dropped == 50
        assert report["rows_in"] == 50 and report["rows_out"] == counts[k][2]
        ranked = pq.read_table(d / "ranked.parquet").to_pylist()
        assert all(len(r["scores"]) == len(r["candidates"]) == 3 for r in ranked)
        assert (d / "model" / "config.json").exists() and (d / "model" / "tokenizer.json").exists()
        config = yaml.safe_load((d / "train_config.yaml").read_text())
        assert config["iteration"] == k and config["training"]["learning_rate"] == pytest.approx([5e-4, 2e-4][k - 1])
        assert not [p for p in d.rglob("*") if ".tmp-" in p.name], "a temporary artifact was left behind"
        assert not (d / "checkpoints").exists()  # removed once the model is saved (keep_checkpoints: false)
    for d in [run / "base"] + [run / f"iter-{k}" for k in (1, 2)]:  # evaluate: true -> base, then every iteration
        metrics = json.loads((d / "eval" / "metrics.json").read_text())
        answers = pq.read_table(d / "eval" / "answers.parquet").to_pylist()
        assert metrics["num_prompts"] == len(answers) == 40 and math.isfinite(metrics["mean"])
        assert metrics["mean"] == pytest.approx(sum(a["reward"] for a in answers) / 40)
        assert metrics["model"].endswith(f"{d.name}/model" if d.name != "base" else "tiny-llama")
    # iteration 2 generated with, and trained from, iteration 1's model
    assert read_parquet_metadata(run / "iter-2" / "generated.parquet")["model"] == str(run / "iter-1" / "model")
    assert yaml.safe_load((run / "iter-2" / "train_config.yaml").read_text())["start_model"] == str(run / "iter-1" / "model")
    return counts


@pytest.fixture(scope="module")
def finished_smoke(tmp_path_factory):
    """`make smoke` (100 samples, 2 iterations, CPU) into a temporary RUN_ROOT, shared by the tests below."""
    d = tmp_path_factory.mktemp("smoke")
    # checkpoints every step, shards of 8 prompts: an interrupted stage has something to resume from
    args = "--save_strategy steps --save_steps 1 --generation_shard_size 8"
    out = make("smoke", f"RUN_ROOT={d}", f"ARGS={args}")
    run = d / "smoke-selm"
    assert sorted(p.name for p in d.iterdir()) == ["smoke-selm"]  # RUN_ROOT honoured
    recipe = d / "smoke.yaml"  # the same settings as a recipe file, for the tests that rerun it
    recipe.write_text(yaml.safe_dump(yaml.safe_load((run / "recipe.yaml").read_text())))
    return recipe, run, out


@pytest.mark.slow
def test_smoke_pipeline_runs_every_stage_and_a_rerun_does_nothing(finished_smoke):
    recipe, run, out = finished_smoke
    summary = json.loads((run / "summary.json").read_text())
    assert "run finished" in out and (run / "summary.md").read_text() in out  # make smoke ends with the summary table
    assert [(it["iteration"], it["portion_rows"], it["generated_rows"]) for it in summary["iterations"]] == \
        [(1, 50, 50), (2, 50, 50)]
    assert summary["held_out"][0]["iteration"] == "base"
    assert summary["held_out"][0]["metric"].startswith("mean true reward of the answer")
    check_finished_run(run)
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(run / "iter-2" / "model")
    before = artifacts(run)
    again = make("run", f"RECIPE={recipe}", f"RUN_DIR={run}")
    assert "scripts/generate.py" not in again and "scripts/train.py" not in again
    assert artifacts(run) == before
    (run / "summary.json").unlink()
    subprocess.run([sys.executable, str(REPO / "scripts/summarize.py"), str(run)], capture_output=True, text=True,
                   check=True)
    summary = json.loads((run / "summary.json").read_text())
    assert [(it["iteration"], it["portion_rows"], it["generated_rows"]) for it in summary["iterations"]] == \
        [(1, 50, 50), (2, 50, 50)] and (run / "summary.png").exists()
    held = summary["held_out"]
    assert [h["iteration"] for h in held] == ["base", 1, 2]
    assert (run / "eval_metric.png").exists() and (run / "eval_rewards.png").exists()


@pytest.mark.slow
def test_make_compare_on_a_selm_and_a_dpo_smoke_run(finished_smoke, tmp_path):
    _, selm, _ = finished_smoke
    dpo = tmp_path / "smoke-dpo"
    make("smoke-dpo", f"RUN_DIR={dpo}", "ITER=1")  # RUN_DIR honoured by the named target; ITER: last iteration
    assert (dpo / "iter-1" / "eval" / "metrics.json").exists() and not (tmp_path / "runs").exists()
    out_dir = tmp_path / "cmp"
    out = make("compare", f"RUNS={selm} {dpo}", f"OUT={out_dir}")
    result = json.loads((out_dir / "comparison.json").read_text())
    assert result["iteration"] == "1" and set(result["runs"]) == {"smoke-selm", "smoke-dpo"}
    for name, run in (("smoke-selm", selm), ("smoke-dpo", dpo)):
        metrics = json.loads((run / "iter-1" / "eval" / "metrics.json").read_text())
        assert result["runs"][name]["held_out"]["1"]["mean"] == metrics["mean"]
    assert (out_dir / "comparison.md").read_text() in out
    assert all("base" in result["runs"][name]["held_out"] for name in ("smoke-selm", "smoke-dpo"))
    assert result["figures"] == ["metric_per_iteration.png", "reward_distributions.png", "implicit_rewards.png"]
    assert all(drawn(out_dir / f) for f in result["figures"])
    d = result["implicit_reward_difference"]["smoke-selm − smoke-dpo"]
    assert d["chosen"]["pairs"] == d["rejected"]["pairs"] == 40


def wait_until_exited(group: int, timeout=120) -> None:
    """Until every process of a process group has exited (a zombie holds no files): SIGKILL is only delivered at
    once; a large process still releases its memory before its files, so its lock, for a while."""
    deadline = time.time() + timeout
    while True:
        alive = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                state, _, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            if int(pgrp) == group and state != "Z":
                alive.append(stat.parent.name)
        if not alive:
            return
        assert time.time() < deadline, f"processes {alive} survived SIGKILL"
        time.sleep(0.05)


def temporaries(run: Path) -> list[Path]:
    """Temporaries of stage artifacts (a killed bookkeeping write, e.g. of run_info.json, is the next writer's)."""
    return [p for p in run.rglob("*") if ".tmp-" in p.name and p.name.lstrip(".").split(".tmp-")[0] not in REPORTS]


def run_until(args, marker, log: Path, timeout=600, before_kill=None) -> bool:
    """Start `make ...` (its output to `log`), kill its whole process group once `marker()` holds (after
    `before_kill()`, while it still runs) and wait until all of it has exited; return whether it was killed."""
    with open(log, "w") as out:
        proc = subprocess.Popen(make_command(*args), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None:
            if marker():
                if before_kill is not None:
                    before_kill()
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                wait_until_exited(proc.pid)
                return True
            time.sleep(0.02)
        proc.wait()
    return False


@pytest.mark.slow
def test_a_run_killed_in_every_stage_resumes_without_redoing_finished_stages(finished_smoke, tmp_path, monkeypatch):
    """SIGKILL of the whole process group during iteration 2's generation, then (rerun) its ranking, then its
    training, then its evaluation; each rerun resumes where the last one stopped, and the last one completes.

    Each stage is stopped at a fixed point before the kill (tests/stage_pause): after some of its shards or
    checkpoints and before its output, so a busy machine cannot let it run past the point the kill is meant for."""
    recipe, done, _ = finished_smoke
    # Base and iteration 1 as the uninterrupted run left them (mtimes kept), run dir paths rewritten to this copy.
    run = tmp_path / "run"
    shutil.copytree(done / "iter-1", run / "iter-1", copy_function=shutil.copy2)
    shutil.copytree(done / "base", run / "base", copy_function=shutil.copy2)
    frozen = yaml.safe_load((done / "recipe.yaml").read_text()) | {"output_dir": str(run)}
    (run / "recipe.yaml").write_text(yaml.safe_dump(frozen))
    new_recipe = tmp_path / "recipe.yaml"
    new_recipe.write_text(yaml.safe_dump(yaml.safe_load(recipe.read_text()) | {"output_dir": str(run)}))
    finished = artifacts(run, "iter-1/") | artifacts(run, "base/")

    args = ["run", f"RECIPE={new_recipe}", f"RUN_DIR={run}"]
    it2 = run / "iter-2"
    kills = [  # (stage, where it stops: the directory it is about to create, its output, what the next run says)
        # the temporary of its second shard (of 7: 50 prompts in shards of 8), the first one written
        ("generation", it2 / "generated.shards" / ".shard-00001.parquet.tmp-*", it2 / "generated.parquet",
         "generate: resuming, "),
        # the temporary of its first output (ranking_dropped, ranked or rank_report)
        ("ranking", it2 / ".rank*.tmp-*", it2 / "ranked.parquet", None),
        # its second checkpoint, after step 1's checkpoint is complete
        ("training", it2 / "checkpoints" / "checkpoint-2", it2 / "model", "resuming iteration 2 from"),
        # the temporary of its second shard of answers (of 5: 40 prompts)
        ("evaluation", it2 / "eval" / "answers.shards" / ".shard-00001.parquet.tmp-*", it2 / "eval" / "metrics.json",
         "generate: resuming, "),
    ]
    refusal = []

    def second_run():  # the same command while the first still runs: refused at once, naming the holder
        second = subprocess.run(make_command(*args), capture_output=True, text=True)
        refusal.append((second.returncode, second.stderr))

    hook = str(REPO / "tests" / "stage_pause")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([hook, *filter(None, [os.environ.get("PYTHONPATH")])]))
    previous_note = None
    for i, (stage, pause_at, output, note) in enumerate(kills):
        log, paused = tmp_path / f"{stage}.log", tmp_path / f"{stage}.paused"
        monkeypatch.setenv("SELM_TEST_PAUSE_AT", str(pause_at))
        monkeypatch.setenv("SELM_TEST_PAUSED", str(paused))
        assert run_until(args, paused.exists, log, before_kill=second_run if i == 0 else None), \
            f"the run finished before its {stage} in iteration 2 could be interrupted:\n{log.read_text()[-2000:]}"
        assert not output.exists() and not temporaries(run)
        if previous_note:
            assert previous_note in log.read_text(), f"{stage} run did not resume the last stage"
        assert artifacts(run, "iter-1/") | artifacts(run, "base/") == finished
        previous_note = note
    monkeypatch.delenv("SELM_TEST_PAUSE_AT")
    code, err = refusal[0]
    assert code != 0 and f"{run.resolve() / '.selm.lock'} is held by pid" in err and "make" in err, err
    assert "scripts/run.py" in err  # the holder's command: the run driver
    assert (run / ".selm.lock").exists()  # left behind by the killed runs: it did not block their reruns

    out = make(*args)
    assert previous_note in out and "scripts/train.py" not in out and "--iteration 1" not in out
    assert check_finished_run(run) == check_finished_run(done)
    assert artifacts(run, "iter-1/") | artifacts(run, "base/") == finished


@pytest.mark.slow
def test_sweep_makes_one_run_per_combination_and_a_table(smoke_recipe, tmp_path):
    recipe = smoke_recipe(num_iterations=1, learning_rate=5e-4, max_samples=24, generation_shard_size=24)
    sweep = tmp_path / "sweep.yaml"
    root = tmp_path / "sweep"
    sweep.write_text(yaml.safe_dump({"recipe": str(recipe), "output_root": str(root), "grid": {"alpha": [0.0, 0.05]}}))
    dry = make("-n", "sweep", f"SWEEP={sweep}")
    assert "scripts/train.py" in dry and not root.exists()  # make -n writes nothing
    out = make("sweep", f"SWEEP={sweep}")
    for name, alpha in (("alpha-0.0", 0.0), ("alpha-0.05", 0.05)):
        assert (root / name / "iter-1" / "model" / "config.json").exists()
        assert yaml.safe_load((root / name / "recipe.yaml").read_text())["alpha"] == alpha
        assert yaml.safe_load((root / name / "iter-1" / "train_config.yaml").read_text())["training"]["alpha"] == alpha
    table = (root / "sweep_table.md").read_text()
    assert table in out and table.count(str(root)) == 2 and "| 0.05 |" in table
    # ranked by the held-out metric at iteration 1, the best marked (the paper's selection rule)
    import csv

    rows = list(csv.DictReader((root / "sweep_table.csv").read_text().splitlines()))
    means = [float(r["held_out_mean"]) for r in rows]
    assert means == sorted(means, reverse=True) and [r["best"] for r in rows] == ["best", ""]
    for r in rows:
        metrics = json.loads((Path(r["run_dir"]) / "iter-1" / "eval" / "metrics.json").read_text())
        assert float(r["held_out_mean"]) == pytest.approx(metrics["mean"]) and r["held_out_iteration"] == "1"
    assert (root / "sweep_rewards.png").exists()


def test_resume_skips_a_checkpoint_whose_writing_was_interrupted(tmp_path):
    from selm.training import last_complete_checkpoint

    assert last_complete_checkpoint(tmp_path) is None
    for step, state in ((2, "{}"), (3, None), (10, '{"half')):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "model.safetensors").write_text("x")
        if state is not None:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")


def test_make_n_shows_the_papers_zephyr_plan(tmp_path):
    out = make("-n", "zephyr-selm", "ITER=3", "NUM_GPUS=8", f"RUN_ROOT={tmp_path}", plain_launch=False)
    stages = [line for line in out.splitlines() if "--iteration " in line]
    plan = [(line.split("scripts/")[1].split(".py")[0], line.split("--iteration ")[1].split()[0]) for line in stages]
    assert plan == [("train", "0"), ("evaluate", "base"), ("evaluate", "0")] + [
        (s, str(k)) for k in (1, 2, 3) for s in ("generate", "rank", "train", "evaluate")]
    launch = "accelerate launch --config_file recipes/accelerate_configs/deepspeed_zero3.yaml --num_processes 8"
    assert all(launch in line for line in stages if "scripts/train.py" in line)
    assert all("--data_parallel_size 8" in line for line in stages if "generate.py" in line or "evaluate.py" in line)
    assert f"{tmp_path}/zephyr-iter0" in out and not list(tmp_path.iterdir())  # -n writes nothing
    with pytest.raises(AssertionError, match="ITER=4: .* has iterations \\[0, 1, 2, 3\\]"):
        make("-n", "zephyr-selm", "ITER=4", f"RUN_ROOT={tmp_path}")


@pytest.mark.parametrize("target", ["demo", "benchmark", "smoke", "smoke-dpo", "zephyr-selm", "zephyr-dpo",
                                    "llama3-selm", "llama3-dpo", "zephyr-best-of-n", "llama3-best-of-n-rm", "sweep",
                                    "compare"])
def test_make_n_of_every_named_target_writes_nothing_and_honours_run_root(target, tmp_path):
    extra = {"sweep": ["SWEEP=recipes/sweeps/smoke-alpha.yaml", "SWEEP_ROOT=" + str(tmp_path / "sweep")],
             "compare": [f"RUNS={tmp_path}/a {tmp_path}/b"]}.get(target, [])
    root = tmp_path / "root"

    def snapshot():
        return {p: p.stat().st_mtime_ns for d in ("build", "runs") for p in (REPO / d).rglob("*")}

    before = snapshot()
    out = make("-n", target, f"RUN_ROOT={root}", *extra)
    assert str(tmp_path) in out  # every run directory under RUN_ROOT (or the given SWEEP_ROOT / RUNS)
    assert not list(tmp_path.iterdir()) and snapshot() == before
