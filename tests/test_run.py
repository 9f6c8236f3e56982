"""The run driver (selm/run.py): the plan, the commands it prints, and a run whose training launcher is a stand-in
(so no model loads): the order, the lock, resume, logs and the launched stage's error line last."""

import os
import subprocess
import sys
import textwrap

import pytest

from selm.recipe.parse import parse_recipe
from selm.errors import SELMError
from selm.run import plan_run

from conftest import REPO

PY = sys.executable


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


def driver(*args, **kwargs):
    return subprocess.run([PY, str(REPO / "scripts/run.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=300, **kwargs)


def printed(*args) -> list[list[str]]:
    """The commands `--print` prints, as word lists."""
    proc = driver(*args, "--print")
    assert proc.returncode == 0, proc.stderr
    return [line.split() for line in proc.stdout.splitlines()]


def stage_of(words) -> tuple[str, str]:
    """(script name, --iteration value) of a printed stage command."""
    script = next(w for w in words if w.startswith("scripts/"))
    return script.removeprefix("scripts/").removesuffix(".py"), words[words.index("--iteration") + 1]


def test_plan_is_what_the_stages_resolve_whatever_overlays_comments_and_args_say(tmp_path):
    recipe = write(tmp_path / "r.yaml", "model_name_or_path: m\noutput_dir: o\nnum_iterations: 2  # not 3\n"
                                        "# num_iterations: 9\nevaluate: [false, true]\ntensor_parallel_size: 2\n")
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("num_iterations: 3\ndpo_iteration_zero: true\nevaluate: true\n")
    argv = [str(recipe), "--overlay", str(overlay), "--output_dir", str(tmp_path / "run"),
            "--tensor_parallel_size", "4"]
    plan = plan_run(argv, "2")
    assert plan["iterations"] == [0, 1, 2] and plan["layout"].iter_dir(0) == tmp_path / "run" / "iter-0"
    assert plan["evaluate"] == {0: True, 1: True, 2: True, 3: True} and plan["tensor_parallel_size"][3] == 4
    # what the driver launches: iterations 0-2, the base model evaluated, 8 GPUs / tensor_parallel_size 4 replicas
    commands = printed(recipe, "--overlay", overlay, "--run_dir", tmp_path / "run", "--tensor_parallel_size", "4",
                       "--last_iteration", "2", "--gpus", "8")
    stages = [stage_of(c) for c in commands if "--iteration" in c]
    assert stages == [("train", "0"), ("evaluate", "base"), ("evaluate", "0")] + [
        (s, str(k)) for k in (1, 2) for s in ("generate", "rank", "train", "evaluate")]
    assert all(c[c.index("--data_parallel_size") + 1] == "2" for c in commands if "scripts/generate.py" in c)
    # the stages read the same values from the frozen merge
    from selm.recipe.freeze import freeze_recipe

    frozen, _ = freeze_recipe(argv)
    for k in (0, 1, 2, 3):
        r, _ = parse_recipe([str(frozen), "--iteration", str(k)])
        assert r.pipeline.iterations == [0, 1, 2, 3] and r.evaluation.evaluate
        assert r.generation.tensor_parallel_size == 4
    assert plan_run([str(recipe), "--output_dir", str(tmp_path / "run")])["iterations"] == [0, 1, 2, 3]  # frozen wins
    with pytest.raises(SELMError, match=r"ITER=4: .* has iterations \[0, 1, 2, 3\]"):
        plan_run(argv, "4")
    with pytest.raises(SELMError, match="'num_iterations' is 0; it must be at least 1"):
        plan_run([str(recipe), "--output_dir", str(tmp_path / "other"), "--num_iterations", "0"])
    with pytest.raises(SELMError, match="'evaluate' has 2 per-iteration values but the recipe has 3 iterations"):
        plan_run([str(recipe), "--output_dir", str(tmp_path / "other"), "--num_iterations", "3"])


def test_print_plans_any_number_of_iterations_in_order_and_writes_nothing(tmp_path):
    recipe = write(tmp_path / "r.yaml", "model_name_or_path: m\noutput_dir: o\nnum_iterations: 33\n")
    commands = printed(recipe, "--run_dir", tmp_path / "run", "--launch", "accelerate launch --num_processes 8")
    assert commands[0][1:] == ["scripts/freeze_recipe.py", str(recipe), "--output_dir", str(tmp_path / "run")]
    assert commands[-1][1:] == ["scripts/summarize.py", str(tmp_path / "run")]
    stages = [stage_of(c) for c in commands[1:-1]]
    assert stages == [(s, str(k)) for k in range(1, 34) for s in ("generate", "rank", "train")]
    trains = [c for c in commands if "scripts/train.py" in c]
    assert all(c[:4] == ["accelerate", "launch", "--num_processes", "8"] for c in trains)
    assert not list(tmp_path.glob("run*"))


def test_print_skips_what_exists_and_names_the_run_under_run_root(tmp_path):
    from selm.layout import RunLayout

    folder = tmp_path / "family"
    folder.mkdir()
    recipe = write(folder / "selm.yaml", "model_name_or_path: m\noutput_dir: o\nnum_iterations: 2\nevaluate: true\n")
    layout = RunLayout(tmp_path / "runs" / "family-selm")  # RUN_ROOT/<recipe folder>-<recipe name>
    for path in (layout.eval_metrics("base"), layout.generated(1), layout.ranked(1), layout.model(1) / "config.json"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    stages = [stage_of(c) for c in printed(recipe, "--run_root", tmp_path / "runs") if "--iteration" in c]
    assert stages == [("evaluate", "1"), ("generate", "2"), ("rank", "2"), ("train", "2"), ("evaluate", "2")]
    assert sorted(p.name for p in layout.run_dir.iterdir()) == ["base", "iter-1"]  # nothing new: no lock, no freeze


# A training launcher that trains nothing: it checks that the run's lock is held for it, writes the model directory
# the driver waits for, or fails like a launched stage (its error line, then the launcher's own report).
STUB = """\
import os, sys
from pathlib import Path
from selm.errors import SELMError
from selm.lock import lock_path, read_holder, run_lock

run = Path(sys.argv[2]).parent
holder = read_holder(lock_path(run))
assert holder["pid"] == os.getppid() and "scripts/run.py" in holder["command"], holder
with run_lock(run):  # the driver's lock passes on to its stages...
    pass
os.environ.pop("SELM_HELD_LOCKS")
try:  # ...and to nothing else
    with run_lock(run):
        sys.exit("the run directory was not locked")
except SELMError:
    pass
print("stage output", flush=True)
if os.environ.get("STUB_FAIL"):
    Path(os.environ["SELM_ERROR_FILE"]).write_text("error: the cause\\n")
    print("error: the cause", file=sys.stderr)
    print("launcher: process 1 failed (ChildFailedError)", file=sys.stderr)
    sys.exit(1)
model = Path(sys.argv[2]).parent / f"iter-{sys.argv[4]}" / "model"
model.mkdir(parents=True)
print(f"[stub] train iteration {sys.argv[4]}: done in 0.1 s")
"""


@pytest.fixture
def stub_run(tmp_path):
    """(driver arguments of a run whose only stage is iteration 0's training, by the stub; the run directory)."""
    stub = tmp_path / "stub.py"
    stub.write_text(STUB)
    recipe = write(tmp_path / "r.yaml", "model_name_or_path: m\noutput_dir: o\nnum_iterations: 1\n"
                                        "dpo_iteration_zero: true\n")
    run = tmp_path / "run"
    return [recipe, "--run_dir", run, "--last_iteration", "0", "--launch", f"{PY} {stub}"], run


def test_a_run_launches_its_stages_under_its_lock_and_a_rerun_resumes(stub_run):
    args, run = stub_run
    first = driver(*args)
    assert first.returncode == 0, first.stdout + first.stderr
    lines = first.stdout.splitlines()
    assert lines[0] == f"frozen: {run / 'recipe.yaml'}"
    assert lines[1].endswith(f"scripts/train.py {run / 'recipe.yaml'} --iteration 0") and "stage output" in lines
    assert f"run finished: {run} (iterations 0)" in lines and (run / "iter-0" / "model").is_dir()
    assert (run / "summary.json").is_file()
    again = driver(*args)
    assert again.returncode == 0 and "scripts/train.py" not in again.stdout
    assert again.stdout.startswith(f"using the frozen recipe: {run / 'recipe.yaml'}")
    changed = driver(*args, "--beta", "0.5")  # the frozen recipe refuses other settings
    assert changed.returncode == 2 and "this run was started with other settings" in changed.stderr


def test_a_failed_launched_stage_ends_the_output_with_its_error_line(stub_run):
    args, run = stub_run
    failed = driver(*args, env={**os.environ, "STUB_FAIL": "1"})
    assert failed.returncode == 1 and not (run / "iter-0" / "model").exists()
    errors = failed.stderr.strip().splitlines()
    assert errors[-3:] == ["launcher: process 1 failed (ChildFailedError)",
                           "run stopped: train-0 failed (exit status 1); rerun the same command to resume",
                           "error: the cause"]
    assert "run finished" not in failed.stdout
    # with stage logs: the terminal gets the one-line result of a stage, or its log's tail
    logged = driver(*args, "--stage_logs", env={**os.environ, "STUB_FAIL": "1"})
    assert logged.returncode == 1 and logged.stderr.strip().splitlines()[-1] == "error: the cause"
    log = (run / "logs" / "train-0.log").read_text()
    assert "stage output" in log and "launcher: process 1 failed" in log
    assert logged.stdout.splitlines()[-1] == f"(whole log: {run / 'logs' / 'train-0.log'})"
    assert "launcher: process 1 failed (ChildFailedError)" in logged.stdout
    done = driver(*args, "--stage_logs")
    assert done.returncode == 0 and "[stub] train iteration 0: done in 0.1 s" in done.stdout.splitlines()
    assert "stage output" not in done.stdout and "scripts/train.py" not in done.stdout
