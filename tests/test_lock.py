"""Run-directory locks: a second run refuses at once naming the holder, a killed holder does not block, locks are
re-entrant through the environment, and `python -m selm.lock` runs a command under them with its exit status."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from selm.errors import SELMError
from selm.lock import HELD_ENV, LOCK_NAME, lock_path, read_holder, run_lock, stage_lock

PY = sys.executable
TIMEOUT = 60  # a lock that blocked instead of refusing would hang: fail then, not never


def cli(*args, **kwargs):
    return subprocess.run([PY, "-m", "selm.lock", *map(str, args)], capture_output=True, text=True, timeout=TIMEOUT,
                          env=kwargs.pop("env", _env()), **kwargs)


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != HELD_ENV}
    return {**env, **extra}


def start_holder(directory, setup=""):
    """`python -m selm.lock DIRECTORY -- python -c <setup; sleep>` in its own session; returns once the command has
    run `setup`. `proc.child_pid` is the command's pid (the CLI's child)."""
    code = f"import os, time\n{setup}\nprint('ready', os.getpid(), flush=True)\ntime.sleep(120)"
    proc = subprocess.Popen([PY, "-m", "selm.lock", str(directory), "--", PY, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(), start_new_session=True)
    ready, child_pid = proc.stdout.readline().split()
    assert ready == "ready", proc.stderr.read()
    proc.child_pid = int(child_pid)
    return proc


def gone(pid) -> bool:
    """Exited (a zombie has closed its files too: nothing in it holds a lock any more)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def stop(proc):
    """SIGKILL the holder's whole session (the CLI may be gone while its command still runs) and wait until the
    command has exited: the kernel releases the lock when the last process holding it is gone."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=TIMEOUT)
    deadline = time.time() + TIMEOUT
    while not gone(proc.child_pid):
        assert time.time() < deadline, f"process {proc.child_pid} survived SIGKILL"
        time.sleep(0.01)


def test_second_run_refuses_at_once_naming_the_lock_and_the_holder(tmp_path):
    run = tmp_path / "run"
    holder = start_holder(run)
    try:
        second = cli(run, "--", PY, "-c", "print('should not run')")
        assert second.returncode == 2 and "should not run" not in second.stdout
        errors = second.stderr.strip().splitlines()
        assert len(errors) == 1 and errors[0].startswith("error: ")
        assert str(run.resolve() / LOCK_NAME) in errors[0] and f"pid {holder.pid} " in errors[0]
        assert "selm.lock" in errors[0]  # the holder's command line
        with pytest.raises(SELMError, match=f"held by pid {holder.pid} "):  # the library call refuses the same way
            with run_lock(run):
                pass
    finally:
        stop(holder)


def test_sigkilled_holder_does_not_block_and_its_record_is_replaced(tmp_path):
    run = tmp_path / "run"
    holder = start_holder(run)
    assert read_holder(lock_path(run))["pid"] == holder.pid
    stop(holder)  # SIGKILL of the whole run: the CLI and its child
    assert read_holder(lock_path(run))["pid"] == holder.pid  # the stale record is still there...
    with run_lock(run) as held:  # ...and does not get in the way
        assert held.fd is not None and read_holder(held.path)["pid"] == os.getpid()
    assert read_holder(lock_path(run)) == {}  # released: the record goes with the lock


def test_lock_stays_held_while_a_child_of_a_killed_holder_runs(tmp_path):
    # Killing only the CLI leaves its command running: that command inherited the lock and still writes.
    run = tmp_path / "run"
    holder = start_holder(run)
    try:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=TIMEOUT)
        with pytest.raises(SELMError, match=f"started by pid {holder.pid} .* which has exited; a process it started "
                                            "still runs and holds the lock"):
            with run_lock(run):
                pass
    finally:
        stop(holder)  # the child is in the holder's session: its group goes now
    with run_lock(run):
        pass


def test_children_of_the_holder_pass_through_the_environment(tmp_path):
    run = tmp_path / "run"
    code = ("import sys; from selm.lock import run_lock\n"
            "with run_lock(sys.argv[1]) as held: print('inside', held.fd is None)")
    with run_lock(run):
        assert json.loads(os.environ[HELD_ENV]) == {str(lock_path(run)): read_holder(lock_path(run))["token"]}
        child = subprocess.run([PY, "-c", code, str(run)], capture_output=True, text=True, timeout=TIMEOUT)
        assert child.returncode == 0 and child.stdout.strip() == "inside True", child.stderr
        with run_lock(run) as again:  # the same process again: re-entrant too
            assert again.fd is None
        # a process outside the tree (no environment), or one naming another token, is refused
        for env in (_env(), _env(**{HELD_ENV: json.dumps({str(lock_path(run)): "not-the-token"})})):
            stranger = subprocess.run([PY, "-c", code, str(run)], capture_output=True, text=True, timeout=TIMEOUT,
                                      env=env)
            assert stranger.returncode != 0 and f"held by pid {os.getpid()} " in stranger.stderr
    assert HELD_ENV not in os.environ


def test_cli_runs_the_command_with_the_locks_and_returns_its_status(tmp_path):
    a, b = tmp_path / "run", tmp_path / "shared-iter0"
    code = f"import os, sys; print(os.environ[{HELD_ENV!r}]); sys.exit(3)"
    done = cli(a, b, "--", PY, "-c", code)
    assert done.returncode == 3
    assert set(json.loads(done.stdout)) == {str(lock_path(a)), str(lock_path(b))}
    killed = cli(a, "--", PY, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)")
    assert killed.returncode == 128 + signal.SIGTERM
    assert cli(a, "--", "true").returncode == 0
    usage = cli(a, "true")
    assert usage.returncode == 2 and "usage: python -m selm.lock DIR" in usage.stderr
    missing = cli(a, "--", str(tmp_path / "no-such-command"))
    assert missing.returncode == 2 and "cannot run" in missing.stderr
    with run_lock(a):  # every lock was released after each command
        pass


def test_cli_forwards_sigterm_to_the_command(tmp_path):
    holder = start_holder(tmp_path / "run", "import signal, sys; signal.signal(signal.SIGTERM, lambda *a: sys.exit(7))")
    try:
        os.kill(holder.pid, signal.SIGTERM)  # to the CLI only, as a scheduler or `kill PID` would
        assert holder.wait(timeout=TIMEOUT) == 7
    finally:
        stop(holder)


class _Recipe:
    def __init__(self, tmp_path, stage="train", iteration=0, zero_dir=None):
        from types import SimpleNamespace

        self.run_dir, self.stage, self.iteration, self.base = tmp_path / "run", stage, iteration, False
        self.pipeline = SimpleNamespace(iteration_zero_dir=zero_dir, dpo_iteration_zero=zero_dir is not None)

    def iter_dir(self, k):
        return self.pipeline.iteration_zero_dir or self.run_dir / f"iter-{k}"


def test_stage_lock_takes_the_shared_iteration_zero_and_only_on_rank_zero(tmp_path, monkeypatch):
    shared = tmp_path / "shared-iter0"
    holder = start_holder(shared)
    try:
        monkeypatch.delenv("RANK", raising=False)
        with pytest.raises(SELMError, match=f"{shared.resolve() / LOCK_NAME} is held by pid {holder.pid} "):
            with stage_lock(_Recipe(tmp_path, zero_dir=shared)):
                pass
        with stage_lock(_Recipe(tmp_path, stage="generate", iteration=1, zero_dir=shared)):
            pass  # generation never writes iteration 0
        # accelerate's other processes are siblings of rank 0, not its children: they do not lock at all
        monkeypatch.setenv("RANK", "1")
        with stage_lock(_Recipe(tmp_path, zero_dir=shared)):
            assert read_holder(lock_path(tmp_path / "run")) == {}
    finally:
        stop(holder)


def test_stage_script_refuses_a_locked_run_directory(smoke_recipe, capsys):
    from conftest import script_main

    recipe = smoke_recipe()
    holder = start_holder(recipe.parent / "run")
    try:
        with pytest.raises(SystemExit) as exit_:
            script_main("rank")([str(recipe), "--iteration", "1"])
        assert exit_.value.code == 2
        assert f"is held by pid {holder.pid} " in capsys.readouterr().err
        assert not (recipe.parent / "run" / "run_info.json").exists()  # refused before anything was recorded
    finally:
        stop(holder)
