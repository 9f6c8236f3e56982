"""Faults while writing or reading artifacts: a full disk (injected, and a real small filesystem) is one line naming
the artifact with nothing half-written and a rerun completes; silently altered parquet pages are caught."""

import errno
import secrets
import shutil
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from selm.errors import SELMError
from selm.io import atomic_path, read_parquet, write_parquet, write_text

from selm.standins.tiny import fixture_rows

from conftest import script_main

NO_SPACE = r"no space left on the device \(or quota exceeded\) while writing {}; nothing was written under that name"


def table(rows=200, width=2000):
    return pa.table({"prompt_id": [f"p{i}" for i in range(rows)],
                     "response": [secrets.token_hex(width // 2) for _ in range(rows)]})  # incompressible


def temporaries(directory):
    return [p.name for p in directory.rglob("*") if ".tmp-" in p.name]


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   OSError(errno.EDQUOT, "Disk quota exceeded"),
                                   # safetensors and torch report it through their own error types
                                   RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                                "message: \"No space left on device\" })")])
def test_injected_full_disk_is_one_line_and_a_rerun_completes(tmp_path, monkeypatch, error):
    final = tmp_path / "iter-1" / "ranked.parquet"
    real_write = pq.write_table

    def write_half_then_fail(data, where, **kwargs):
        real_write(data.slice(0, data.num_rows // 2), where, **kwargs)  # something reached the disk
        raise error

    monkeypatch.setattr(pq, "write_table", write_half_then_fail)
    with pytest.raises(SELMError, match=NO_SPACE.format(final)) as info:
        write_parquet(table(), final)
    assert "\n" not in str(info.value) and "free space and rerun the stage" in str(info.value)
    assert not final.exists() and temporaries(tmp_path) == []
    monkeypatch.setattr(pq, "write_table", real_write)  # space freed
    write_parquet(table(10), final)
    assert pq.read_table(final).num_rows == 10


def test_other_write_errors_are_not_reported_as_a_full_disk(tmp_path):
    with pytest.raises(PermissionError):
        with atomic_path(tmp_path / "out.txt"):
            raise PermissionError(errno.EACCES, "Permission denied")
    assert temporaries(tmp_path) == []


@pytest.fixture
def small_filesystem(tmp_path):
    """A 4 MiB tmpfs mounted for the test (root only); skipped where mounting is not allowed."""
    mount = tmp_path / "small"
    mount.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True,
                              text=True, timeout=30)
    except FileNotFoundError:
        pytest.skip("no mount command")
    if done.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)


def fill(directory, leave: int):
    """A filler file that leaves `leave` bytes free; delete it to free the space."""
    filler = directory / "filler"
    filler.write_bytes(b"\0" * (shutil.disk_usage(directory).free - leave))
    return filler


def test_full_small_filesystem_then_freed(small_filesystem):
    final = small_filesystem / "iter-1" / "generated.parquet"
    big = table(rows=400)  # ~0.8 MB of incompressible text
    filler = fill(small_filesystem, leave=256 * 1024)
    with pytest.raises(SELMError, match=NO_SPACE.format(final)):
        write_parquet(big, final)
    assert not final.exists() and temporaries(small_filesystem) == []
    with pytest.raises(SELMError, match=NO_SPACE.format(small_filesystem / "report.json")):
        write_text(small_filesystem / "report.json", "x" * 600_000)
    filler.unlink()  # free space, rerun
    write_parquet(big, final)
    assert read_parquet(final).equals(big)


def test_rank_stage_on_a_full_disk_fails_in_one_line_and_completes_after(small_filesystem, smoke_recipe, capsys):
    recipe = smoke_recipe(output_dir=str(small_filesystem / "run"))
    rows = fixture_rows(50)
    for row in rows:  # long, incompressible answers: the ranked pairs need far more room than is left
        row["reference_response"] = secrets.token_hex(4000)
    iter_dir = small_filesystem / "run" / "iter-1"
    write_parquet(pa.Table.from_pylist(rows), iter_dir / "generated.parquet")
    filler = fill(small_filesystem, leave=128 * 1024)
    with pytest.raises(SystemExit) as exit_:
        script_main("rank")([str(recipe), "--iteration", "1"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exit_.value.code == 2 and len(errors) == 1
    assert errors[0].startswith("error: no space left on the device") and str(iter_dir) in errors[0]
    assert not (iter_dir / "ranked.parquet").exists() and temporaries(small_filesystem) == []
    filler.unlink()  # free space, rerun: the stage completes
    assert script_main("rank")([str(recipe), "--iteration", "1"]) == 0
    assert pq.read_table(iter_dir / "ranked.parquet").num_rows + pq.read_table(
        iter_dir / "ranking_dropped.parquet").num_rows == 50


def test_an_altered_page_is_caught_by_its_checksum(tmp_path):
    # Snappy stores incompressible text as it is: one changed character decompresses fine, into wrong data.
    path = tmp_path / "ranked.parquet"
    original = table(rows=20, width=64)
    write_parquet(original, path)
    data = bytearray(path.read_bytes())
    value = original.column("response")[7].as_py().encode()
    at = data.find(value)
    assert at > 0
    data[at] = ord("g")  # not a hex digit: a value no writer produced
    path.write_bytes(bytes(data))
    assert pq.read_table(path).column("response")[7].as_py().startswith("g")  # unchecked: silently wrong
    with pytest.raises(SELMError, match=f"{path}: not a readable parquet file .*CRC.*delete it and rerun the stage"):
        read_parquet(path)


def test_missing_artifact_is_named(tmp_path):
    with pytest.raises(SELMError, match=rf"missing input: {tmp_path / 'generated.parquet'} \(run the previous stage"):
        read_parquet(tmp_path / "generated.parquet")


def _write_while_the_other_starts(final, text, inside, other_inside):
    """Writer A holds its temporary until writer B has started on the same artifact (B's start removes left-behind
    temporaries: A's must not be one of them)."""
    with atomic_path(final) as tmp:
        tmp.write_text(text)
        inside.set()
        if not other_inside.wait(timeout=120):
            raise SystemExit(2)


def _write_after_the_other_started(final, text, inside, other_inside):
    if not other_inside.wait(timeout=120):
        raise SystemExit(2)
    with atomic_path(final) as tmp:
        inside.set()
        tmp.write_text(text)


def test_two_processes_writing_one_artifact_at_once_never_clobber(tmp_path):
    """One writer per node once wrote iteration 0's portion at the same time: the second deleted the first's
    temporary, whose rename then failed. Each writer's temporary is its own; the last rename wins, whole."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    final = tmp_path / "iter-0" / "portion.parquet"
    a_inside, b_inside = ctx.Event(), ctx.Event()
    texts = {"a": "A" * 100_000, "b": "B" * 100_000}
    writers = [ctx.Process(target=_write_while_the_other_starts, args=(final, texts["a"], a_inside, b_inside)),
               ctx.Process(target=_write_after_the_other_started, args=(final, texts["b"], b_inside, a_inside))]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=180)
    assert [w.exitcode for w in writers] == [0, 0]
    assert final.read_text() in texts.values() and temporaries(tmp_path) == []


def test_only_temporaries_of_dead_writers_on_this_host_are_removed(tmp_path):
    import os
    import socket

    final = tmp_path / "ranked.parquet"
    dead = _finished_pid()
    host = socket.gethostname()
    kept = [f".{final.name}.tmp-{host}-{os.getpid()}-abc", f".{final.name}.tmp-other-host-{dead}-abc"]
    removed = [f".{final.name}.tmp-{host}-{dead}-abc", f".{final.name}.tmp-xyz_123"]  # the last: the old naming
    for name in kept + removed:
        (tmp_path / name).mkdir()
    write_text(final, "whole")
    assert sorted(temporaries(tmp_path)) == sorted(kept) and final.read_text() == "whole"


def _finished_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid
