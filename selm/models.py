"""Loading a causal LM the way a recipe says (dtype, attention implementation, revision of the base model, 4-bit
quantization), and the check that a local model directory's weight files are whole before anything loads them.

The one place that decides what a model path holds and how to load it (docs/one-gpu.md):
- a full model (config.json + weights, or a hub id): `AutoModelForCausalLM`;
- a LoRA adapter (peft's adapter_config.json + adapter weights; what a `use_peft` iteration saves): its base model,
  recorded by peft in adapter_config.json, loaded the same way (4-bit when the recipe says so), with the adapter on
  top (`peft.PeftModel`). Configs and generation configs are the base's (`config_path`); the tokenizer is saved
  beside the adapter.
"""

import json
import os
import struct
from pathlib import Path

from selm.errors import SELMError

SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # peft's file names


def _recover(directory: Path) -> str:
    return (f"an interrupted download or copy? re-download or re-copy {directory} "
            "(e.g. `hf download REPO --local-dir DIR`)")


def check_safetensors(path: Path) -> None:
    """A .safetensors file is whole: an 8-byte little-endian header length, a JSON header, and a size equal to the
    header's end plus the largest end offset of its tensors (reads the header only, not the weights)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        header_length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        header = f.read(header_length) if header_length is not None and 8 + header_length <= size else None
    try:
        tensors = json.loads(header.decode("utf-8")) if header is not None else None
        ends = [entry["data_offsets"][1] for key, entry in tensors.items() if key != "__metadata__"]
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, IndexError, TypeError):
        tensors = None
    if tensors is None:
        raise SELMError(f"{path}: not a readable safetensors file ({size:,} bytes, no valid header); "
                        f"{_recover(path.parent)}")
    expected = 8 + header_length + max(ends, default=0)
    if size != expected:
        raise SELMError(f"{path}: truncated or damaged ({size:,} bytes, its header says {expected:,}); "
                        f"{_recover(path.parent)}")


def check_weights(directory) -> None:
    """The weight files of a local model directory are there and whole: every shard its index names exists, and
    every safetensors file passes `check_safetensors`. One line naming the file and how to recover if not."""
    directory = Path(directory)
    for index_name in (SAFETENSORS_INDEX, TORCH_INDEX):
        index = directory / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
                raise SELMError(f"{index}: not a readable weight index (no 'weight_map'); {_recover(directory)}") from None
            for shard in shards:
                if not (directory / shard).is_file():
                    raise SELMError(f"{directory / shard}: missing (named in {index_name}); {_recover(directory)}")
            break
    else:
        shards = [name for name in SINGLE_FILES if (directory / name).is_file()]
        if not shards:
            raise SELMError(f"model directory {directory} has no weights (none of {', '.join(SINGLE_FILES)}, "
                            f"{SAFETENSORS_INDEX}); {_recover(directory)}")
    for shard in shards:
        if shard.endswith(".safetensors"):
            check_safetensors(directory / shard)


FLASH_ATTENTION = "flash_attention_2"
FLASH_ATTENTION_INSTALL = "pip install flash-attn --no-build-isolation, after torch (docs/gpu.md)"


def attention_implementation(requested: str | None) -> str | None:
    """The attention kernel a model is loaded with: the recipe's, except that flash_attention_2 (the paper recipes',
    on unpacked rows, as the paper's code ran) becomes sdpa where flash-attn cannot run here (not installed, or no
    CUDA). sdpa computes the same attention, with more memory and time on long rows. Said in one line at load."""
    if requested != FLASH_ATTENTION:
        return requested
    from transformers.utils import is_flash_attn_2_available

    if is_flash_attn_2_available():
        _say_once(f"attention: {FLASH_ATTENTION} (flash-attn), one row per completion")
        return FLASH_ATTENTION
    _say_once(f"attention: sdpa instead of the recipe's {FLASH_ATTENTION}: flash-attn is not installed or has no CUDA "
              f"device here (same attention, more memory and time on GPUs; {FLASH_ATTENTION_INSTALL})")
    return "sdpa"


_said = set()


def _say_once(line: str) -> None:
    """Print `line` once per process, on the first process of a launch only (8 ranks would print it 8 times)."""
    import os

    if line not in _said and os.environ.get("RANK", "0") == "0":
        _said.add(line)
        print(line, flush=True)


def adapter_base(path) -> str | None:
    """The base model of a LoRA adapter directory (peft records it in adapter_config.json); None for a full model."""
    config = Path(path) / ADAPTER_CONFIG
    if not config.is_file():
        return None
    try:
        base = json.loads(config.read_text(encoding="utf-8"))["base_model_name_or_path"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        base = None
    if not isinstance(base, str) or not base:
        raise SELMError(f"{config}: not a readable adapter config (no 'base_model_name_or_path')")
    return base


def check_adapter(directory) -> None:
    """An adapter directory's weights are there and whole (its base model is checked by the caller)."""
    weights = Path(directory) / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise SELMError(f"adapter directory {directory} has no {ADAPTER_WEIGHTS}; {_recover(Path(directory))}")
    check_safetensors(weights)


def config_path(path) -> str:
    """Where a model's config.json and generation_config.json are: the base model's, for an adapter."""
    return adapter_base(path) or str(path)


def adapter_settings(path) -> dict:
    """peft's LoraConfig of an adapter directory, as saved."""
    return json.loads((Path(path) / ADAPTER_CONFIG).read_text(encoding="utf-8"))


def quantization_kwargs(model_args) -> dict:
    """`from_pretrained` keywords for the recipe's load_in_4bit / bnb_4bit_* keys (trl's own mapping), or none."""
    import torch
    from trl import get_quantization_config

    config = get_quantization_config(model_args) if getattr(model_args, "load_in_4bit", False) else None
    if config is None:
        return {}
    # a quantized model is placed when it loads: on this process's own GPU (one per process under a launcher)
    device_map = {"": int(os.environ.get("LOCAL_RANK", "0"))} if torch.cuda.is_available() else None
    return {"quantization_config": config, "device_map": device_map}


def keep_4bit_layers_trainable(model) -> int:
    """Turn off bitsandbytes' CPU repacking of 4-bit weights; returns how many layers it was turned off on.

    On CPUs with AVX512-BF16, the first eval-mode forward without gradients (the reference log-prob pass) repacks
    each 4-bit weight for a kernel that has no backward, and the training steps after it get wrong gradients. It
    also makes that pass compute with another kernel than training does. GPUs are not affected (docs/one-gpu.md).
    """
    from bitsandbytes.nn import Linear4bit

    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def load_model(path, model_args, trust_remote_code: bool, trainable: bool = False):
    """The model at `path` with the recipe's `ModelConfig` settings (the revision applies to the base model only: an
    iteration's saved model has none): `AutoModelForCausalLM`, or for an adapter directory its base model with the
    adapter on top (`PeftModel`; `trainable`: its weights train, as when an iteration continues the previous one's)."""
    import torch
    from transformers import AutoModelForCausalLM

    base = adapter_base(path)
    if base is not None:
        check_adapter(path)
    weights = base or str(path)
    if Path(weights).is_dir():
        check_weights(weights)

    dtype = model_args.dtype
    if dtype not in (None, "auto"):
        dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(
        weights, dtype=dtype, attn_implementation=attention_implementation(model_args.attn_implementation),
        trust_remote_code=trust_remote_code,
        revision=model_args.model_revision if weights == model_args.model_name_or_path else None,
        **quantization_kwargs(model_args),
    )
    quantized = getattr(model, "is_loaded_in_4bit", False)
    if quantized:
        keep_4bit_layers_trainable(model)
    if base is None:
        return model
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, str(path), is_trainable=trainable)
    if quantized:  # trl trains a QLoRA adapter in bf16 (dpo_trainer.py): score it as it was trained
        for name, param in model.named_parameters():
            if "lora_" in name and "lora_magnitude_vector" not in name:
                param.data = param.data.to(torch.bfloat16)
    return model
