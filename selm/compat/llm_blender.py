"""llm-blender 0.0.2 (PairRM) under transformers 5, and the one loader every PairRM user goes through.

llm-blender was written for transformers 4. Two names it uses are gone in 5:
- `transformers.utils.hub.TRANSFORMERS_CACHE` (imported at module level; used as the download/cache dir);
- `PreTrainedTokenizerBase.batch_encode_plus` (its collators encode through it; `__call__` does the same job).
`apply_shims()` restores both, only where missing, so it is idempotent and a no-op on a transformers that has them.
"""

import importlib
import json
import logging
import sys
from pathlib import Path

from selm.errors import SELMError

logger = logging.getLogger(__name__)


def _batch_encode_plus(self, batch_text_or_text_pairs, **kwargs):
    return self(batch_text_or_text_pairs, **kwargs)


def apply_shims() -> None:
    """Give transformers 5 the two attributes llm-blender imports/calls. Safe to call any number of times."""
    import huggingface_hub.constants
    import transformers.utils.hub
    from transformers import PreTrainedTokenizerBase

    if not hasattr(transformers.utils.hub, "TRANSFORMERS_CACHE"):
        # The hub cache itself: a hub PairRM and its DeBERTa backbone then share the cache every other model uses.
        transformers.utils.hub.TRANSFORMERS_CACHE = huggingface_hub.constants.HF_HUB_CACHE
    if not hasattr(PreTrainedTokenizerBase, "batch_encode_plus"):
        PreTrainedTokenizerBase.batch_encode_plus = _batch_encode_plus


def import_llm_blender():
    """`import llm_blender` with the shims applied first."""
    if "llm_blender" in sys.modules:
        return sys.modules["llm_blender"]
    apply_shims()
    # llm-blender imports vLLM at import time only to detect it for `n_generate`, which we never call; when vLLM is
    # not loaded yet, hide it so ranking does not pay for (and initialise) a whole inference engine.
    hide_vllm = "vllm" not in sys.modules
    if hide_vllm:
        sys.modules["vllm"] = None
    try:
        return importlib.import_module("llm_blender")
    finally:
        if hide_vllm:
            del sys.modules["vllm"]


def check_hub_id(name_or_path: str) -> None:
    """A name that is not an existing directory must look like a hub id ('owner/name'); else it is a missing dir."""
    if name_or_path.count("/") != 1 or name_or_path.startswith((".", "/", "~")):
        raise SELMError(f"ranker model directory not found: {name_or_path}")


def resolve_ranker_dir(name_or_path: str) -> Path:
    """A local ranker directory as is; a hub id downloaded (or found in the hub cache) with huggingface_hub.

    llm-blender's own hub fallback logs a failed download as a warning and goes on to a confusing error; resolving
    the id here first turns that into one line naming the model.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    check_hub_id(name_or_path)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name_or_path))
    except Exception as e:  # noqa: BLE001 - any hub failure (offline, 404, auth) is the same user error
        raise SELMError(
            f"ranker model '{name_or_path}' is not a local directory and could not be fetched from the hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e


def auto_device(device: str | None = None) -> str:
    if device not in (None, "auto"):
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_pairrm(name_or_path: str, device: str | None = None, dtype: str = "float32"):
    """An `llm_blender.Blender` with the PairRM-style ranker at `name_or_path` (hub id or local directory) loaded.

    `dtype` is explicit: llm-blender casts the ranker to float16 on CUDA unless told `fp16=False` (its RankerConfig
    default is True), and to float32 elsewhere whatever it is told.

    The ranker directory holds llm-blender's `config.json` (a RankerConfig: ranker_type 'pairranker', model_type,
    model_name = the backbone, max lengths) and the ranker weights (`model.safetensors` or `pytorch_model.bin`).
    The backbone (architecture and tokenizer) is loaded from `model_name`: a hub id (PairRM: microsoft/deberta-v3-large)
    or a directory; a relative directory is taken relative to the ranker directory, so a checkpoint can be moved.
    """
    path = resolve_ranker_dir(name_or_path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise SELMError(f"{path}: no config.json (not an llm-blender ranker directory)")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.get("ranker_type") != "pairranker":
        raise SELMError(f"{config_file}: ranker_type is {config.get('ranker_type')!r}; PairRM needs 'pairranker'")
    if not any((path / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")):
        raise SELMError(f"{path}: no ranker weights (model.safetensors or pytorch_model.bin)")
    if dtype not in ("float32", "float16"):
        raise SELMError(f"pairrm_dtype is {dtype!r}; expected 'float32' or 'float16'")
    overrides = {"fp16": dtype == "float16"}
    backbone = config.get("model_name")
    if backbone and not Path(backbone).is_absolute() and (path / backbone).is_dir():
        overrides["model_name"] = str(path / backbone)

    llm_blender = import_llm_blender()
    blender = llm_blender.Blender(blender_config=llm_blender.BlenderConfig(use_tqdm=True))  # a progress bar on stderr
    blender.loadranker(str(path), device=auto_device(device), **overrides)
    _check_all_weights_loaded(blender.ranker, path)
    return blender


def _check_all_weights_loaded(ranker, path: Path) -> None:
    """llm-blender loads `pytorch_model.bin` with strict=False and only logs missing keys: a checkpoint that does
    not fit the architecture would rank with random weights. Make that an error. (It loads `model.safetensors`,
    used only when there is no .bin, strictly itself.) Reading the keys through mmap costs next to nothing.
    """
    weights = path / "pytorch_model.bin"
    if not weights.is_file():
        return
    import torch

    keys = set(torch.load(weights, map_location="cpu", mmap=True, weights_only=True))
    missing = sorted({name for name, _ in ranker.named_parameters()} - keys)
    if missing:
        raise SELMError(f"{weights}: {len(missing)} ranker weights missing from the checkpoint, e.g. {missing[0]}")
