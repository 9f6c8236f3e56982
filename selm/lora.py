"""LoRA and QLoRA iterations (recipe keys of trl's `ModelConfig`: use_peft, lora_*, load_in_4bit, bnb_4bit_*).

Iteration t trains π_t from π_{t-1} with reference exactly π_{t-1} (docs/one-gpu.md):
- the first iteration (from the base model) creates the adapter from the recipe's LoRA keys; trl's reference is the
  model with the adapter disabled, which is the base model (4-bit when load_in_4bit);
- every later iteration continues iteration t-1's adapter as a trainable `PeftModel`; trl gives it a frozen copy of
  that adapter (named "ref") as reference, which is π_{t-1} on the same (quantized) base. Adapters are never merged
  between iterations: merging a 4-bit adapter needs dequantizing, and the next reference would then differ from the
  model that was trained.
iter-K/model/ holds the adapter (peft's adapter_config.json, which records the base model, and its weights) and the
tokenizer; selm/models.py loads it for every stage.
"""

from selm.errors import SELMError

# ModelConfig keys that only mean something with use_peft: true (and the bnb_4bit_* ones with load_in_4bit: true).
LORA_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_parameters",
             "lora_modules_to_save", "lora_task_type", "use_rslora", "use_dora", "load_in_4bit", "load_in_8bit")
BNB_4BIT_KEYS = ("bnb_4bit_quant_type", "use_bnb_nested_quant", "bnb_4bit_quant_storage")
# Saved adapter settings (peft's adapter_config.json) that a continued iteration keeps whatever the recipe says.
CONTINUED = {"lora_r": "r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout", "use_rslora": "use_rslora",
             "use_dora": "use_dora"}


def check_model_keys(model_args, explicit_keys, source) -> None:
    """Every ModelConfig key a recipe sets is honoured, or refused here in one line (nothing accepted and ignored)."""
    def set_(key):
        return key in explicit_keys and getattr(model_args, key) not in (None, False)

    if not model_args.use_peft:
        for key in LORA_KEYS + BNB_4BIT_KEYS:
            if set_(key):
                raise SELMError(f"{source}: '{key}' needs use_peft: true (a full model would be trained and the key "
                                "ignored); the one-GPU recipes are recipes/*/{selm,dpo}_qlora.yaml (docs/one-gpu.md)")
        return
    if model_args.load_in_8bit:
        raise SELMError(f"{source}: 'load_in_8bit' is not supported (8-bit training was never run here); use "
                        "load_in_4bit: true (QLoRA, docs/one-gpu.md)")
    if not model_args.load_in_4bit:
        for key in BNB_4BIT_KEYS:
            if set_(key):
                raise SELMError(f"{source}: '{key}' needs load_in_4bit: true")
    if str(model_args.lora_task_type) != "CAUSAL_LM":
        raise SELMError(f"{source}: 'lora_task_type' is {model_args.lora_task_type!r}; the policy is a causal LM "
                        "(CAUSAL_LM)")
    if model_args.load_in_4bit and model_args.dtype in (None, "auto"):
        raise SELMError(f"{source}: load_in_4bit needs an explicit dtype (the 4-bit layers compute in it), e.g. "
                        "dtype: bfloat16")


def check_bitsandbytes(model_args) -> None:
    """load_in_4bit needs bitsandbytes; say so in one line before anything loads."""
    if model_args.load_in_4bit:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise SELMError(f"load_in_4bit needs bitsandbytes: `pip install -e .[qlora]` (import failed: {e})") from None


def check_training(recipe, args, start: str) -> None:
    """What the train stage cannot do with a recipe's model keys, in one line, before any model is loaded."""
    from selm.models import adapter_base

    if adapter_base(start) is not None and not recipe.model.use_peft:
        raise SELMError(f"{recipe.path}: iteration {recipe.iteration} starts from the LoRA adapter in {start}, so it "
                        "needs use_peft: true (the adapter is continued; it is never merged into a full model)")
    if recipe.model.load_in_4bit and args.deepspeed_plugin is not None:
        raise SELMError(f"{recipe.path}: load_in_4bit under DeepSpeed was never run here; launch with plain data "
                        "parallel (recipes/accelerate_configs/ddp.yaml, as the *-qlora make targets do)")


def policy_and_peft_config(recipe, start: str, trust_remote_code: bool):
    """(policy, peft_config) of a use_peft iteration: base model + a new adapter from the recipe's keys (trl wraps
    it), or iteration t-1's adapter continued (trainable; trl adds its frozen copy as the reference)."""
    from trl import get_peft_config

    from selm.models import adapter_base, adapter_settings, load_model

    check_bitsandbytes(recipe.model)
    if adapter_base(start) is None:
        return load_model(start, recipe.model, trust_remote_code), get_peft_config(recipe.model)
    saved = adapter_settings(start)
    for key, name in CONTINUED.items():
        if saved.get(name) != getattr(recipe.model, key):
            raise SELMError(f"{recipe.path}: '{key}' is {getattr(recipe.model, key)!r} for iteration "
                            f"{recipe.iteration}, but it continues the adapter in {start}, which has {saved.get(name)!r}"
                            " (an adapter keeps its settings over the iterations)")
    return load_model(start, recipe.model, trust_remote_code, trainable=True), None


def match_reference_precision(model) -> None:
    """On a 4-bit base, trl trains the adapter in bf16 but leaves its "ref" copy in the adapter's load precision
    (fp32): cast the copy too, so the reference computes exactly as iteration t-1's model did when it was trained
    (1.3e-3 nats apart on the tiny model otherwise). Called by SELMTrainer before its reference pass and by the train
    stage once the trainer is built; lossless (the saved adapter is bf16)."""
    import torch

    if not getattr(model, "is_loaded_in_4bit", False) or "ref" not in getattr(model, "peft_config", {}):
        return
    for name, param in model.named_parameters():
        if ".ref." in name and "lora_magnitude_vector" not in name:
            param.data = param.data.to(torch.bfloat16)


def drop_reference_adapter(trainer) -> None:
    """Remove trl's frozen "ref" adapter before the model is saved: iter-K/model holds the trained adapter only."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")


def scoreable(model):
    """`model`, or for a bare 4-bit model (a QLoRA run's base, the first iteration's reference) the same model with
    an adapter that adds exactly zero (LoRA B = 0): transformers' Trainer refuses a 4-bit model without an adapter,
    and Fig. 4's log-probs come from the trainer's own reference pass (selm.evaluation.completion_logps)."""
    from accelerate.utils import is_peft_model

    if not getattr(model, "is_loaded_in_4bit", False) or is_peft_model(model):
        return model
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=1, lora_alpha=1, target_modules="all-linear", init_lora_weights=True))
