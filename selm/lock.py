"""One run at a time per directory: an exclusive `flock` on `<directory>/.selm.lock`.

- The kernel releases a flock when the last process holding it exits, however it exits (SIGKILL included), so a
  killed run never leaves a lock behind. The file itself stays (deleting a lock file races with a process that
  is about to lock it); its content, the holder's pid, host, command and start time as JSON, is only read to
  name the holder when the lock is busy, and rewritten by each new holder.
- Re-entrant across a process tree: the holder lists the locks it holds in the environment variable
  SELM_HELD_LOCKS ({lock file: token}); a descendant whose `run_lock` finds the lock busy *and* held under the
  token its environment names passes without locking again. The run driver (selm/run.py) holds the run
  directory's lock from the freeze to the summary, and the stages it launches lock that directory themselves (so a
  stage run alone is locked too): the environment is the only thing that reaches them through every launcher
  (accelerate, srun), which close inherited files.
- accelerate launches its processes as siblings, not as parent and child: only the launch's main process (global
  RANK 0, or no RANK at all) takes a stage's locks, see `stage_lock`.

`run_holding` runs a child that inherits the held lock files, so the locks stay held while it runs even if this
process is killed alone. CLI: `python -m selm.lock DIR [DIR ...] -- COMMAND ...` takes every lock and runs COMMAND
that way, forwarding SIGTERM to it, and exits with its status (128 + N when a signal N ended it). A busy lock: one
line, exit 2.
"""

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from selm.errors import SELMError

LOCK_NAME = ".selm.lock"
HELD_ENV = "SELM_HELD_LOCKS"
NO_LOCK_ENV = "SELM_NO_LOCK"  # "1": run without locks, for filesystems without flock (then never run two at once)


@dataclass
class HeldLock:
    path: Path
    fd: int | None  # None when an ancestor process holds the lock (or locking is switched off)


def lock_path(directory) -> Path:
    """`<directory>/.selm.lock`, the directory created if needed and resolved (symlinks too), so every way of
    naming one directory gives one lock file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return Path(os.path.realpath(directory)) / LOCK_NAME


def _held_by_ancestors() -> dict:
    try:
        held = json.loads(os.environ.get(HELD_ENV) or "{}")
    except json.JSONDecodeError:
        return {}
    return held if isinstance(held, dict) else {}


def read_holder(path) -> dict:
    """What the lock file says about its holder ({} when empty or unreadable)."""
    try:
        holder = json.loads(Path(path).read_text(encoding="utf-8") or "{}")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True  # exists but belongs to someone else (or unknown): do not claim it is gone
    return True


def busy_message(path: Path, holder: dict) -> str:
    directory = path.parent
    find = f"find it with `fuser -v {path}`"
    if not holder.get("pid"):
        return (f"{path}: another process holds the lock on {directory} and has not said which ({find}); "
                "wait for it to finish or stop it")
    pid, host = holder["pid"], holder.get("host", "?")
    command = str(holder.get("command", "?")).replace("\n", "\\n")  # the message stays one line
    who = f"pid {pid} on {host} ({command}, since {holder.get('started', '?')})"
    if host == socket.gethostname() and not _pid_alive(pid):
        return (f"{path} is held for {directory} by a process started by {who}, which has exited; a process it "
                f"started still runs and holds the lock ({find}): wait for it or stop it")
    return (f"{path} is held by {who}: another run is using {directory}; wait for it to finish or stop it "
            f"(kill {pid}), then rerun - a lock is released as soon as its holder exits, even when killed")


@contextlib.contextmanager
def run_lock(directory):
    """Hold the exclusive lock of `directory` for the block; raise SELMError at once, naming the holder, if
    another run holds it. Passes without locking when an ancestor process holds it (see the module docstring)."""
    if os.environ.get(NO_LOCK_ENV) == "1":
        print(f"warning: {NO_LOCK_ENV}=1: {directory} is not locked", file=sys.stderr)
        yield HeldLock(Path(directory) / LOCK_NAME, None)
        return
    import fcntl

    path = lock_path(directory)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        busy = False
    except BlockingIOError:
        busy = True
    except OSError as e:
        os.close(fd)
        raise SELMError(f"{path}: cannot lock ({os.strerror(e.errno)}): this filesystem does not support flock; "
                        f"use a run directory on one that does, or set {NO_LOCK_ENV}=1 to run without locks (and "
                        "never start two runs on one directory)") from None
    if busy:
        os.close(fd)
        holder = read_holder(path)
        if not (holder.get("token") and _held_by_ancestors().get(str(path)) == holder["token"]):
            raise SELMError(busy_message(path, holder))
        yield HeldLock(path, None)  # an ancestor holds it for this whole process tree
        return

    token = uuid.uuid4().hex
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": shlex.join(sys.orig_argv),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "token": token}
    os.ftruncate(fd, 0)  # a killed holder's record goes now; the lock itself was released by the kernel
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    previous = os.environ.get(HELD_ENV)
    os.environ[HELD_ENV] = json.dumps({**_held_by_ancestors(), str(path): token})
    try:
        yield HeldLock(path, fd)
    finally:
        if previous is None:
            os.environ.pop(HELD_ENV, None)
        else:
            os.environ[HELD_ENV] = previous
        os.ftruncate(fd, 0)  # while still held, so no later holder's record is erased
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def is_launch_main() -> bool:
    """Whether this process is the one that locks and records for its launch: the only process, or global rank 0
    of a distributed launch (accelerate, torchrun and deepspeed set RANK in every process they start)."""
    return os.environ.get("RANK", "0") == "0"


def stage_lock_dirs(recipe) -> list[Path]:
    """The run directory, plus the shared iteration-0 directory when this stage trains or evaluates iteration 0 (or
    evaluates the base model) there."""
    dirs = [recipe.run_dir]
    shared = recipe.pipeline.iteration_zero_dir if recipe.pipeline.dpo_iteration_zero else None
    if shared and recipe.stage in ("train", "evaluate") and recipe.iteration == 0:
        dirs.append(Path(shared))
    return dirs


@contextlib.contextmanager
def stage_lock(recipe):
    """A stage's locks (`stage_lock_dirs`), taken by the launch's main process only; the other processes of an
    accelerate launch are its siblings and would otherwise find the lock busy."""
    with contextlib.ExitStack() as stack:
        if is_launch_main():
            for directory in stage_lock_dirs(recipe):
                stack.enter_context(run_lock(directory))
        yield


USAGE = "usage: python -m selm.lock DIR [DIR ...] -- COMMAND [ARG ...]"


def run_holding(command: list[str], held: list[HeldLock], **popen) -> int:
    """Run `command` as a child that inherits the files of the `held` locks; its exit status (128 + N when signal N
    ended it). SIGTERM is forwarded to it. A SIGINT is not: Ctrl-C reaches the child itself (the same process
    group), once. A SIGINT or SIGTERM received while it ran makes a zero status 128 + N, so a caller stops."""
    try:
        child = subprocess.Popen(command, pass_fds=[h.fd for h in held if h.fd is not None], **popen)
    except OSError as e:
        raise SELMError(f"cannot run {command[0]!r}: {e.strerror}") from None
    received = []

    def note(signum, frame):
        received.append(signum)
        if signum == signal.SIGTERM:
            child.send_signal(signum)

    previous = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        status = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    status = 128 - status if status < 0 else status
    return 128 + received[0] if received and status == 0 else status


def run_locked(directories: list[str], command: list[str]) -> int:
    """Run `command` holding the locks of `directories`; its exit status (128 + N when signal N ended it)."""
    with contextlib.ExitStack() as stack:
        return run_holding(command, [stack.enter_context(run_lock(d)) for d in directories])


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv or argv.index("--") == 0 or argv[-1] == "--":
        print(USAGE, file=sys.stderr)
        return 2
    split = argv.index("--")
    try:
        return run_locked(argv[:split], argv[split + 1:])
    except SELMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
