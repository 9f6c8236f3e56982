"""Atomic file writes (an artifact under its final name is always whole) and checked parquet reads."""

import errno
import json
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path

from selm.errors import SELMError

NO_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# Libraries that write through their own I/O layer (safetensors, torch) do not raise OSError; they keep the text.
NO_SPACE_TEXTS = ("No space left on device", "Disk quota exceeded", "StorageFull")


def is_no_space_error(error: BaseException) -> bool:
    """Whether `error`, or an error it was raised from, says the disk (or the user's quota) is full."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in NO_SPACE_ERRNOS:
            return True
        if any(text in str(error) for text in NO_SPACE_TEXTS):
            return True
        error = error.__cause__ or error.__context__
    return False


def _no_space(final: Path) -> SELMError:
    return SELMError(f"no space left on the device (or quota exceeded) while writing {final}; nothing was written "
                     "under that name: free space and rerun the stage")


@contextmanager
def atomic_path(final: str | os.PathLike):
    """Yield a temporary path beside `final`; rename it onto `final` only if the block succeeds.

    Works for files and directories. On error the temporary is removed and `final` is untouched. The temporary's
    name holds the writer's host and pid, so writers of the same artifact at once (say, one per node) never touch
    each other's: each renames a whole file and the last rename wins. Temporaries that a killed writer on this host
    left behind are removed first. A full disk becomes a SELMError naming the artifact.
    """
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        for stale in final.parent.glob(f".{final.name}.tmp-*"):
            if _left_by_dead_writer(stale, final.name):
                shutil.rmtree(stale, ignore_errors=True)
        writer = f"{socket.gethostname()}-{os.getpid()}"
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{writer}-", dir=final.parent))
    except OSError as e:
        if is_no_space_error(e):
            raise _no_space(final) from None
        raise
    target = tmp / final.name
    try:
        yield target
        if final.is_dir() and target.is_dir():
            shutil.rmtree(final)
        os.replace(target, final)
    except Exception as e:
        if is_no_space_error(e):
            raise _no_space(final) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _left_by_dead_writer(temporary: Path, final_name: str) -> bool:
    """Whether `temporary` (`.<name>.tmp-<host>-<pid>-<random>`) belongs to a writer on this host that is gone.

    A writer on another host cannot be checked from here: its temporary stays until a writer there removes it.
    A temporary without host and pid (written before they were in the name) counts as left behind.
    """
    from selm.lock import _pid_alive

    parts = temporary.name[len(f".{final_name}.tmp-"):].rsplit("-", 2)  # mkdtemp's random part has no '-'
    if len(parts) < 3 or not parts[1].isdigit():
        return True
    host, pid, _ = parts
    return host == socket.gethostname() and not _pid_alive(pid)


def write_parquet(table, path, metadata: dict | None = None) -> None:
    """Write a pyarrow Table (or datasets.Dataset) to `path` atomically; `metadata` is stored as JSON strings.

    Pages carry checksums, so `read_parquet` notices a file damaged after it was written.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not isinstance(table, pa.Table):
        table = table.data.table if hasattr(table, "data") else pa.Table.from_pylist(table)
    if metadata:
        existing = dict(table.schema.metadata or {})
        existing.update({f"selm.{k}".encode(): json.dumps(v).encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(existing)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, write_page_checksum=True)


def _unreadable(path, error) -> SELMError:
    reason = (str(error).splitlines() or [type(error).__name__])[0]
    return SELMError(f"{path}: not a readable parquet file ({reason}); it was not written whole by this pipeline: "
                     "delete it and rerun the stage (`make run` redoes the stage that writes it)")


def _is_corruption(error: BaseException) -> bool:
    """pyarrow reports damaged data as ArrowException or as an OSError without an errno (a real I/O error has one)."""
    import pyarrow as pa

    return isinstance(error, pa.ArrowException) or (isinstance(error, OSError) and error.errno is None)


def _checked(path, read):
    """`read()` of a parquet file, with a damaged file turned into one line naming it and how to recover."""
    try:
        return read()
    except (OSError, ValueError) as e:
        if _is_corruption(e):
            raise _unreadable(path, e) from None
        raise


def read_parquet(path, columns: list[str] | None = None):
    """A parquet artifact of a run as a pyarrow Table; a missing, truncated or damaged file is one line naming it."""
    import pyarrow.parquet as pq

    if not Path(path).is_file():
        raise SELMError(f"missing input: {path} (run the previous stage first)")
    return _checked(path, lambda: pq.read_table(path, columns=columns, page_checksum_verification=True))


def parquet_num_rows(path) -> int:
    import pyarrow.parquet as pq

    return _checked(path, lambda: pq.ParquetFile(path).metadata.num_rows)


def read_parquet_metadata(path) -> dict:
    """The `selm.*` metadata written by `write_parquet`, decoded."""
    import pyarrow.parquet as pq

    raw = _checked(path, lambda: pq.read_schema(path).metadata) or {}
    return {k.decode()[5:]: json.loads(v) for k, v in raw.items() if k.startswith(b"selm.")}


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
