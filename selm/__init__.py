"""SELM: Self-Exploring Language Models, as recipes on trl."""

__version__ = "0.1.0"

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
