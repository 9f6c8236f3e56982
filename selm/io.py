"""Atomic file writes: an artifact under its final name is always whole."""

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(final: str | os.PathLike):
    """Yield a temporary path beside `final`; rename it onto `final` only if the block succeeds.

    Works for files and directories. On error the temporary is removed and `final` is untouched; temporaries
    that a killed writer of the same artifact left behind are removed first (one writer per artifact).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):  # left by a writer that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    target = tmp / final.name
    try:
        yield target
        if final.is_dir() and target.is_dir():
            shutil.rmtree(final)
        os.replace(target, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_parquet(table, path, metadata: dict | None = None) -> None:
    """Write a pyarrow Table (or datasets.Dataset) to `path` atomically; `metadata` is stored as JSON strings."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not isinstance(table, pa.Table):
        table = table.data.table if hasattr(table, "data") else pa.Table.from_pylist(table)
    if metadata:
        existing = dict(table.schema.metadata or {})
        existing.update({f"selm.{k}".encode(): json.dumps(v).encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(existing)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_parquet_metadata(path) -> dict:
    """The `selm.*` metadata written by `write_parquet`, decoded."""
    import pyarrow.parquet as pq

    raw = pq.read_schema(path).metadata or {}
    return {k.decode()[5:]: json.loads(v) for k, v in raw.items() if k.startswith(b"selm.")}


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)
