"""Loading a causal LM the way a recipe says (dtype, attention implementation, revision of the base model), and the
check that a local model directory's weight files are whole before anything loads them."""

import json
import struct
from pathlib import Path

from selm.errors import SELMError

SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


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


def load_model(path, model_args, trust_remote_code: bool):
    """`AutoModelForCausalLM` at `path` with the recipe's `ModelConfig` settings (the revision applies to the base
    model only: an iteration's saved model has none)."""
    import torch
    from transformers import AutoModelForCausalLM

    if Path(path).is_dir():
        check_weights(path)

    dtype = model_args.dtype
    if dtype not in (None, "auto"):
        dtype = getattr(torch, dtype)
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=attention_implementation(model_args.attn_implementation),
        trust_remote_code=trust_remote_code,
        revision=model_args.model_revision if path == model_args.model_name_or_path else None,
    )
