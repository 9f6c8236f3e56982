"""SELM: Self-Exploring Language Models, as recipes on trl."""

import logging

__version__ = "0.1.0"

# transformers imports peft, which imports bitsandbytes; on CPUs with AVX512-BF16 bitsandbytes then logs that an
# optional kernel package (`kernels`) is absent, a harmless line on every script's stderr (its 4-bit kernels work
# without it, docs/one-gpu.md): kept out, so a refused command's error stays the one line it prints.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

_LAZY = {
    "SELMConfig": "selm.trainer_config",
    "SELMTrainer": "selm.trainer",
    "parse_recipe": "selm.recipe.parse",
    "SELMError": "selm.errors",
}


def __getattr__(name):
    # trl and torch load in seconds; importing `selm` for a path or an error type should not.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'selm' has no attribute {name!r}")
