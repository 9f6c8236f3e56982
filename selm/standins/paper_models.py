"""Stand-ins of the tokenizer files of the paper's two models, with tiny random models behind them (docs/tokenizers.md).

- `zephyr`: HuggingFaceH4/mistral-7b-sft-beta. Mistral-7B-v0.1's sentencepiece model (mistral-common's
  `tokenizer.model.v1`, 32,000 pieces) as the hub ships it: `tokenizer.model`, a `tokenizer.json` with the legacy
  normalizer (prepend "▁", spaces to "▁"), byte fallback, the `<s> $A` post-processor; `LlamaTokenizer`, legacy,
  add_bos_token true, bos `<s>`, eos and pad `</s>`; the alignment-handbook's default chat template, which writes no
  bos_token and ends every turn with eos_token + "\n". The model: a Mistral (sliding window) at the real vocabulary.
- `llama3` / `llama3-first-release`: meta-llama/Meta-Llama-3-8B-Instruct. The 128,000 tiktoken ranks of llama-models
  (`llama3/tokenizer.model`) converted by transformers' `TikTokenConverter`, the 256 special tokens 128000-128255 with
  their names, the `<|begin_of_text|> $A` post-processor, and the Instruct chat template (bos_token first, `| trim`,
  `<|eot_id|>` after each turn). Today's hub files name eos `<|eot_id|>` (generation_config eos [128001, 128009]); the
  first release named `<|end_of_text|>` only, in every file. The model: a Llama at the real vocabulary.

The models are tiny (2 layers, width 128, head_dim 64 for vLLM's CPU attention, tied embeddings to keep the files
small): they exercise the real token paths, not the real weights.
"""

import json
import shutil
from pathlib import Path

from selm.errors import SELMError

STANDINS = ("zephyr", "llama3", "llama3-first-release")

# The alignment-handbook's DEFAULT_CHAT_TEMPLATE, which HuggingFaceH4/mistral-7b-sft-beta ships.
ZEPHYR_CHAT_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)
# Meta-Llama-3-8B-Instruct's chat template (the same in the first release and today).
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_NUM_RANKS = 128000
BEGIN_OF_TEXT, END_OF_TEXT, EOT = 128000, 128001, 128009


def llama3_special_tokens() -> list[str]:
    """The names of Llama 3's 256 special tokens, ids 128000-128255 in order (Meta-Llama-3's tokenizer.json)."""
    named = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 6: "<|start_header_id|>", 7: "<|end_header_id|>",
             9: "<|eot_id|>"}
    names, reserved = [], 0
    for i in range(256):
        if i in named:
            names.append(named[i])
        else:
            names.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return names


def _package_file(package: str, relative: str, pip_name: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SELMError(f"the paper tokenizer stand-ins need {pip_name}: `pip install -e .[test]`")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise SELMError(f"{path} not found (is {pip_name} the pinned version? `pip install -e .[test]`)")
    return path


def mistral_v1_model() -> Path:
    """Mistral's v1 sentencepiece model, as shipped in mistral-common."""
    return _package_file("mistral_common", "data/tokenizer.model.v1", "mistral-common")


def llama3_ranks() -> Path:
    """Llama 3's tiktoken BPE ranks, as shipped in llama-models 0.3.0."""
    return _package_file("llama_models", "llama3/tokenizer.model", "llama-models==0.3.0")


def _added_token(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---- Zephyr (Mistral v1 sentencepiece) ----
def _mistral_tokenizer_json(sp_model: Path, tmp: Path):
    """The hub's fast tokenizer: transformers' own conversion of the sentencepiece model supplies vocabulary and
    merges; normalizer, pre-tokenizer, post-processor and decoder are those of Mistral-7B-v0.1's tokenizer.json."""
    from tokenizers import decoders, normalizers, processors
    from transformers import AutoTokenizer

    work = tmp / "convert"
    work.mkdir()
    shutil.copy(sp_model, work / "tokenizer.model")
    _write_json(work / "tokenizer_config.json", {"tokenizer_class": "LlamaTokenizer", "legacy": True})
    backend = AutoTokenizer.from_pretrained(str(work)).backend_tokenizer
    shutil.rmtree(work)
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B:1",
                                                           special_tokens=[("<s>", 1)])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    return backend


def write_zephyr_tokenizer(out: Path) -> None:
    sp_model = mistral_v1_model()
    shutil.copy(sp_model, out / "tokenizer.model")
    _mistral_tokenizer_json(sp_model, out).save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(i): _added_token(t) for i, t in enumerate(["<unk>", "<s>", "</s>"])},
        "additional_special_tokens": [],
        "bos_token": "<s>",
        "chat_template": ZEPHYR_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": True,
        "model_max_length": 2048,
        "pad_token": "</s>",
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": True,
    })
    _write_json(out / "special_tokens_map.json", {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>",
                                                  "unk_token": "<unk>"})


# ---- Llama 3 (tiktoken ranks) ----
def _llama3_tokenizer_json():
    """TikTokenConverter's tokenizer with the pre-tokenizer and post-processor of Meta-Llama-3's tokenizer.json."""
    from tokenizers import Regex, pre_tokenizers, processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    specials = llama3_special_tokens()
    tokenizer = TikTokenConverter(vocab_file=str(llama3_ranks()), pattern=LLAMA3_PATTERN,
                                  extra_special_tokens=specials).converted()
    if tokenizer.get_vocab_size() != LLAMA3_NUM_RANKS + len(specials):
        raise SELMError(f"{llama3_ranks()}: {tokenizer.get_vocab_size()} tokens after conversion, expected "
                        f"{LLAMA3_NUM_RANKS + len(specials)}")
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                                      special_tokens=[("<|begin_of_text|>", BEGIN_OF_TEXT)]),
    ])
    return tokenizer


def write_llama3_tokenizer(out: Path, first_release: bool) -> None:
    specials = llama3_special_tokens()
    _llama3_tokenizer_json().save(str(out / "tokenizer.json"))
    eos = "<|end_of_text|>" if first_release else "<|eot_id|>"
    _write_json(out / "tokenizer_config.json", {
        "added_tokens_decoder": {str(BEGIN_OF_TEXT + i): _added_token(t) for i, t in enumerate(specials)},
        "bos_token": "<|begin_of_text|>",
        "chat_template": LLAMA3_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": True,
        "eos_token": eos,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 1000000000000000019884624838656,
        "tokenizer_class": "PreTrainedTokenizerFast",
    })
    _write_json(out / "special_tokens_map.json", {"bos_token": "<|begin_of_text|>", "eos_token": eos})


# ---- the tiny models ----
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            head_dim=64, tie_word_embeddings=True)


def _model_and_generation_config(name: str):
    from transformers import GenerationConfig, LlamaConfig, MistralConfig

    if name == "zephyr":
        # Mistral-7B-v0.1's settings; a sliding window short enough for the rehearsal's rows to cross it
        config = MistralConfig(vocab_size=32000, max_position_embeddings=32768, rope_theta=10000.0, sliding_window=64,
                               rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, **TINY)
        return config, GenerationConfig(bos_token_id=1, eos_token_id=2)
    first_release = name == "llama3-first-release"
    eos = END_OF_TEXT if first_release else EOT
    config = LlamaConfig(vocab_size=LLAMA3_NUM_RANKS + 256, max_position_embeddings=8192, rope_theta=500000.0,
                         rms_norm_eps=1e-5, bos_token_id=BEGIN_OF_TEXT, eos_token_id=eos, **TINY)
    generation = GenerationConfig(bos_token_id=BEGIN_OF_TEXT,
                                  eos_token_id=END_OF_TEXT if first_release else [END_OF_TEXT, EOT],
                                  do_sample=True, temperature=0.6, top_p=0.9, max_length=4096)
    return config, generation


def save_standin(name: str, out_dir, seed: int = 0) -> Path:
    """Build stand-in `name` (one of STANDINS) into `out_dir`, atomically; return the directory."""
    import torch
    from transformers import AutoModelForCausalLM

    from selm.io import atomic_path

    if name not in STANDINS:
        raise SELMError(f"unknown stand-in {name!r}; expected one of {', '.join(STANDINS)}")
    config, generation = _model_and_generation_config(name)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = generation
    with atomic_path(out_dir) as tmp:
        tmp = Path(tmp)
        model.save_pretrained(tmp)
        if name == "zephyr":
            write_zephyr_tokenizer(tmp)
        else:
            write_llama3_tokenizer(tmp, first_release=name == "llama3-first-release")
    return Path(out_dir)
