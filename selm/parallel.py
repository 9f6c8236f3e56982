"""Run a worker over contiguous shards of a list, one subprocess per device group, and merge in order.

Used for data-parallel vLLM generation (one engine per GPU; `LLM` has no data_parallel_size) and reusable by any
stage that shards work over GPUs. The worker is an importable module-level function
`worker_fn(shard: list, **kwargs) -> list` returning one result per item of its shard.

Each subprocess is started with the `spawn` method and its own `CUDA_VISIBLE_DEVICES` already in its environment,
so CUDA (and vLLM, which reads the variable at import) only ever sees that process's GPUs. With no GPU (CPU runs,
tests) the variable is left alone. A worker that raises, dies or returns the wrong number of results fails the
whole call; the others are stopped.
"""

import multiprocessing as mp
import os
import pickle
import tempfile
import time
import traceback
from pathlib import Path

from selm.errors import SELMError


def shard_bounds(num_items: int, num_shards: int) -> list[tuple[int, int]]:
    """[start, end) of `num_shards` contiguous, near-equal slices; the first ones get the remainder."""
    base, extra = divmod(num_items, num_shards)
    bounds, start = [], 0
    for i in range(num_shards):
        end = start + base + (i < extra)
        bounds.append((start, end))
        start = end
    return bounds


def balanced_shard_count(num_items: int, max_shard_size: int, num_replicas: int) -> int:
    """How many shards `num_items` prompts make: the fewest of at most `max_shard_size` items (the resume
    granularity), rounded up to a multiple of `num_replicas` so that every replica gets as many near-equal shards
    (2,000 prompts over 8 replicas: 8 shards of 250, not one of 2,000), never more shards than items."""
    if num_items <= 0:
        return 0
    shards = -(-num_items // max_shard_size)
    shards = -(-shards // num_replicas) * num_replicas
    return min(shards, num_items)


def visible_devices() -> list[str] | None:
    """The GPUs this process may hand out (None when there is none: workers then run on CPU)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        devices = [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
        return devices or None
    import torch

    count = torch.cuda.device_count()
    return [str(i) for i in range(count)] if count else None


def _child(worker_fn, shard, kwargs, result_path):
    """Subprocess body: run the worker, pickle (ok, payload) to result_path."""
    try:
        payload = (True, worker_fn(shard, **kwargs))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises
        kind = "selm" if isinstance(e, SELMError) else "error"
        payload = (False, (kind, str(e), traceback.format_exc()))
    with open(result_path, "wb") as f:
        pickle.dump(payload, f)
    if not payload[0]:
        raise SystemExit(1)


def run_sharded(worker_fn, items: list, num_workers: int, devices_per_worker: int = 1, poll_s: float = 0.5,
                **kwargs) -> list:
    """`worker_fn` over `num_workers` contiguous shards of `items` in spawned subprocesses; results in item order.

    Worker k gets GPUs [k*devices_per_worker, (k+1)*devices_per_worker) of the visible ones. Raises SELMError when
    there are too few GPUs or a worker failed on bad input, RuntimeError when a worker crashed.
    """
    items = list(items)
    if num_workers < 1 or devices_per_worker < 1:
        raise SELMError(f"run_sharded: num_workers ({num_workers}) and devices_per_worker ({devices_per_worker}) "
                        "must be at least 1")
    devices = visible_devices()
    if devices is not None and len(devices) < num_workers * devices_per_worker:
        needed = num_workers * devices_per_worker
        raise SELMError(f"{num_workers} workers x {devices_per_worker} GPUs each need {needed} GPUs; "
                        f"{len(devices)} are visible ({','.join(devices)})")
    bounds = [b for b in shard_bounds(len(items), num_workers) if b[1] > b[0]]
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="selm-shards-") as tmp:
        procs = []
        saved = os.environ.get("CUDA_VISIBLE_DEVICES")
        try:
            for k, (start, end) in enumerate(bounds):
                if devices is not None:
                    # spawn copies os.environ at start: the child sees only its GPUs from its first line on
                    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(
                        devices[k * devices_per_worker:(k + 1) * devices_per_worker])
                result_path = Path(tmp) / f"result-{k}.pkl"
                proc = ctx.Process(target=_child, args=(worker_fn, items[start:end], kwargs, str(result_path)),
                                   name=f"selm-shard-{k}")
                proc.start()
                procs.append((proc, result_path, start, end))
        finally:
            if saved is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = saved
        try:
            _wait_all(procs, poll_s)
        finally:
            for proc, *_ in procs:  # after a failure: stop the others (no-op for finished ones)
                if proc.is_alive():
                    proc.terminate()
                proc.join()
        results = []
        for k, (proc, result_path, start, end) in enumerate(procs):
            with open(result_path, "rb") as f:
                _, shard_results = pickle.load(f)
            if len(shard_results) != end - start:
                raise RuntimeError(f"shard worker {k} returned {len(shard_results)} results for {end - start} items")
            results.extend(shard_results)
    return results


def _wait_all(procs, poll_s: float) -> None:
    """Wait until every worker has finished; raise at the first one that failed."""
    pending = list(enumerate(procs))
    while pending:
        still = []
        for k, (proc, result_path, start, end) in pending:
            if proc.is_alive():
                still.append((k, (proc, result_path, start, end)))
                continue
            proc.join()
            if proc.exitcode == 0 and result_path.exists():
                continue
            where = f"shard worker {k} (items {start}..{end - 1})"
            if result_path.exists():
                with open(result_path, "rb") as f:
                    _, (kind, message, tb) = pickle.load(f)
                if kind == "selm":
                    raise SELMError(message)
                raise RuntimeError(f"{where} failed: {message}\n{tb}")
            raise RuntimeError(f"{where} died with exit code {proc.exitcode} (killed, or out of memory?)")
        pending = still
        if pending:
            time.sleep(poll_s)
