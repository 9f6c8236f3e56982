"""The generate stage (iter-K/portion.parquet -> iter-K/generated.parquet) and the resumable, sharded generation
it shares with the evaluate stage; the backends themselves are selm/generation.py.

Shards of at most generation_shard_size prompts are written atomically to a shard directory as they finish, with
the settings that made them (settings.json); a rerun keeps the first run's shards and skips the finished ones. With
the vllm backend and data_parallel_size > 1 the pending shards are spread over one process per replica
(selm.parallel). A prompt too long for the context is dropped, named in the stage's report (selm/generation.py).
"""

import os
import time
from pathlib import Path

from selm.errors import SELMError
from selm.generation import Generator
from selm.layout import GENERATE_REPORT, GENERATED, GENERATED_SHARDS, SHARD_FILE, SHARD_SETTINGS

# Settings that change what a shard contains; a resumed run must use the same ones (batch size, parallelism may
# change, e.g. to recover from an out-of-memory error: the shards keep the first run's prompts, see parallel_layout).
SIGNATURE_KEYS = ("generation_backend", "temperature", "top_p", "num_responses", "max_new_tokens",
                  "generation_seed", "generation_shard_size")


def _shard_path(shard_dir: Path, k: int) -> Path:
    return shard_dir / SHARD_FILE.format(k)


def _write_shards(gen: Generator, shards, shard_dir: Path) -> list[str]:
    """Generate and atomically write each (k, start, prompt token ids, prompt_ids) shard."""
    import pyarrow as pa

    from selm.io import write_parquet

    paths = []
    for k, start, token_ids, prompt_ids in shards:
        responses = gen.generate_texts(token_ids, seed_offset=start)
        path = _shard_path(shard_dir, k)
        write_parquet(pa.table({"prompt_id": prompt_ids, "responses": responses}), path)
        print(f"generate: wrote {path} ({len(prompt_ids)} prompts)", flush=True)
        paths.append(str(path))
    return paths


def _shard_worker(shards, model_path, settings, shard_dir, **generator_kwargs):
    """selm.parallel worker: one vLLM replica over a contiguous group of shards; engine started once."""
    import dataclasses

    settings = dataclasses.replace(settings, data_parallel_size=1)
    with Generator(model_path, settings, **generator_kwargs) as gen:
        return _write_shards(gen, shards, Path(shard_dir))


def parallel_layout(settings) -> dict:
    """What besides a shard's prompts may change vLLM's arithmetic on GPUs: recorded by the run that starts a shard
    directory, not enforced on a resume (module docstring)."""
    vllm = settings.generation_backend == "vllm"
    return {"data_parallel_size": settings.data_parallel_size if vllm else 1,
            "tensor_parallel_size": settings.tensor_parallel_size if vllm else 1,
            "vllm_batch_invariant": os.environ.get("VLLM_BATCH_INVARIANT", "0") == "1"}


def _read_settings(shard_dir: Path) -> dict | None:
    import json

    path = shard_dir / SHARD_SETTINGS
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SELMError(f"{path}: not valid JSON ({e}); delete {shard_dir} and rerun the stage") from None


def _check_signature(shard_dir: Path, signature: dict, layout: dict, old: dict | None) -> None:
    """Shards on disk must come from the same model, prompts and sampling settings as this run (`old`: their
    settings.json, None for a new directory, which gets this run's)."""
    import json

    from selm.io import write_text

    if old is None:
        write_text(shard_dir / SHARD_SETTINGS, json.dumps({**signature, "layout": layout}, indent=1))
        return
    changed = [k for k in signature if old.get(k) != signature[k]]
    if changed:
        k = changed[0]
        raise SELMError(f"{shard_dir}: its shards were generated with {k}={old.get(k)!r}, this run has "
                        f"{k}={signature[k]!r}; restore the setting, or delete the directory to start over")
    if old.get("layout") != layout:
        print(f"generate: warning: the shards in {shard_dir} were started with {old.get('layout')}, this run uses "
              f"{layout}; on GPUs vLLM's answers may then differ slightly from an uninterrupted run "
              "(batch-invariant only with VLLM_BATCH_INVARIANT=1)", flush=True)


def generate_in_shards(model_path: str, settings, conversations: list[list[dict]], names: list[str], shard_dir: Path,
                       signature: dict, generator_kwargs: dict) -> tuple[list[list[str] | None], dict, int]:
    """(num_responses responses per conversation, None for a dropped prompt; {name: why} of the dropped prompts;
    the number of processes that generated the pending shards).

    A prompt whose tokens + max_new_tokens do not fit the context is dropped (module docstring); the others are
    generated. Resumable: the kept prompts are cut into `balanced_shard_count` near-equal shards (at most
    generation_shard_size prompts each, the same number per vLLM replica), written atomically to `shard_dir` as
    they finish; a rerun keeps the first run's shards and skips the finished ones (`signature` must then match).

    Every prompt is encoded and length-checked before anything is written. With the vllm backend and
    data_parallel_size > 1 the pending shards are spread over one process per replica. The caller removes
    `shard_dir` once it has written its own output.
    """
    from selm.io import read_parquet
    from selm.parallel import balanced_shard_count, shard_bounds

    layout = parallel_layout(settings)
    with Generator(model_path, settings, **generator_kwargs) as gen:
        encoded = gen.encode(conversations)  # once: the length check and every shard use these ids
        too_long = gen.too_long(encoded)  # every prompt, before anything is written
        kept = [i for i in range(len(names)) if i not in too_long]
        if not kept:
            first = next(iter(too_long))
            raise SELMError(f"all {len(names)} prompts are too long to generate from (e.g. prompt {names[first]}: "
                            f"{too_long[first]}); lower max_new_tokens or raise max_model_len")
        old = _read_settings(shard_dir)
        num_shards = (old or {}).get("num_shards") or balanced_shard_count(
            len(kept), settings.generation_shard_size, layout["data_parallel_size"])
        signature = {**signature, "prompts_kept": len(kept), "num_shards": num_shards}
        shards = [(k, start, [encoded[i] for i in kept[start:end]], [names[i] for i in kept[start:end]])
                  for k, (start, end) in enumerate(shard_bounds(len(kept), num_shards))]
        # Finished shards are read now: a damaged one is named before hours of generating the others.
        done = {k: read_parquet(_shard_path(shard_dir, k)) for k, *_ in shards if _shard_path(shard_dir, k).exists()}
        pending = [s for s in shards if s[0] not in done]
        shard_dir.mkdir(parents=True, exist_ok=True)
        _check_signature(shard_dir, signature, layout, old)
        if pending and len(pending) < len(shards):
            print(f"generate: resuming, {len(shards) - len(pending)} of {len(shards)} shards already in {shard_dir}")
        start, workers = time.perf_counter(), 1 if pending else 0
        if settings.generation_backend == "vllm" and settings.data_parallel_size > 1 and len(pending) > 1:
            from selm.parallel import run_sharded

            workers = min(settings.data_parallel_size, len(pending))
            print(f"generate: {len(pending)} shards over {workers} vLLM replicas (one process each)", flush=True)
            run_sharded(_shard_worker, pending, workers,
                        devices_per_worker=settings.tensor_parallel_size, model_path=model_path,
                        settings=settings, shard_dir=str(shard_dir), **generator_kwargs)
        else:
            _write_shards(gen, pending, shard_dir)
    if pending:
        print(f"generate: {sum(len(s[3]) for s in pending)} prompts in {time.perf_counter() - start:.1f} s")

    responses, positions = [None] * len(names), iter(kept)
    for k, _, _, shard_names in shards:
        shard = (done[k] if k in done else read_parquet(_shard_path(shard_dir, k))).to_pydict()
        if shard["prompt_id"] != shard_names:
            raise SELMError(f"{_shard_path(shard_dir, k)}: its prompt_ids do not match this run's prompts; delete "
                            f"{shard_dir} to start over")
        for response in shard["responses"]:
            responses[next(positions)] = response
    return responses, {names[i]: why for i, why in too_long.items()}, workers


def generator_kwargs(recipe, engine_kwargs: dict | None = None, progress: bool = True) -> dict:
    """`Generator` keyword arguments from a recipe's model settings."""
    return dict(dtype=recipe.model.dtype, attn_implementation=recipe.model.attn_implementation,
                trust_remote_code=bool(recipe.training.get("trust_remote_code", False)),
                engine_kwargs=engine_kwargs, progress=progress, model_args=recipe.model)


def generate_stage(recipe, launch=None, *, engine_kwargs: dict | None = None, progress: bool = True) -> Path:
    """Write iter-K/generated.parquet, unless it exists: the portion's columns + reference_response + responses.

    Shards of at most generation_shard_size prompts are written atomically to iter-K/generated.shards/ as they
    finish; a rerun skips the finished ones. The final file is written atomically, then the shard directory is
    removed. Prompts too long for the context are left out of it (and so out of ranking and training), counted and
    named in iter-K/generate_report.json. `launch` (the run_info record) has nothing to learn from generation.
    """
    import json
    import shutil

    import pyarrow as pa

    from selm.artifacts import REFERENCE, RESPONSES, read_portion, start_model
    from selm.data import ensure_portion, prompt_messages
    from selm.io import write_parquet, write_text

    if recipe.is_generation_free:
        raise SELMError(f"{recipe.path}: iteration 0 of a dpo_iteration_zero recipe trains on the original pairs; "
                        "it has no generation (run the train stage for iteration 0)")
    out = recipe.iter_dir() / GENERATED
    if out.exists():  # complete by construction (atomic write)
        print(f"generate: {out} exists; nothing to do (delete it to generate again)")
        return out
    settings, model_path = recipe.generation, start_model(recipe)  # before writing anything
    portion_path = ensure_portion(recipe)
    table = read_portion(portion_path).data.table
    rows = table.select(["prompt_id", "chosen"]).to_pylist()
    names = [r["prompt_id"] for r in rows]
    shard_dir = recipe.iter_dir() / GENERATED_SHARDS
    signature = {"model": model_path, "rows": len(rows), "first_prompt_id": names[0], "last_prompt_id": names[-1],
                 **{k: getattr(settings, k) for k in SIGNATURE_KEYS}}
    responses, dropped, workers = generate_in_shards(model_path, settings, [prompt_messages(r) for r in rows], names,
                                                     shard_dir, signature,
                                                     generator_kwargs(recipe, engine_kwargs, progress))
    kept = [i for i, r in enumerate(responses) if r is not None]  # dropped rows leave the iteration here
    report_path = recipe.iter_dir() / GENERATE_REPORT
    table, responses = table.take(kept), [responses[i] for i in kept]
    table = table.append_column(REFERENCE, pa.array([r[0] for r in responses], pa.string()))
    table = table.append_column(RESPONSES, pa.array(responses, pa.list_(pa.string())))
    report = {"iteration": recipe.iteration, "prompts": len(rows), "generated": len(kept),
              "dropped_by_reason": {"prompt_too_long": len(dropped)} if dropped else {},
              "dropped": [{"prompt_id": name, "reason": why} for name, why in dropped.items()]}
    if dropped:
        first = next(iter(dropped))
        print(f"generate: dropped {len(dropped)} of {len(rows)} prompts too long for the context (e.g. {first}: "
              f"{dropped[first]}); see {report_path}", flush=True)
    # generated.parquet last: it is the stage's make target, so once it exists the report is whole as well.
    write_text(report_path, json.dumps(report, indent=2) + "\n")
    write_parquet(table, out, metadata={
        "model": model_path, "iteration": recipe.iteration, "rows": len(kept), "workers": workers,
        "dropped_prompts": len(dropped),
        **{k: getattr(settings, k) for k in SIGNATURE_KEYS if k != "generation_shard_size"},
    })
    shutil.rmtree(shard_dir)
    print(f"generate: wrote {out}")
    return out
