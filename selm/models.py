"""Loading a causal LM the way a recipe says (dtype, attention implementation, revision of the base model)."""


def load_model(path, model_args, trust_remote_code: bool):
    """`AutoModelForCausalLM` at `path` with the recipe's `ModelConfig` settings (the revision applies to the base
    model only: an iteration's saved model has none)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = model_args.dtype
    if dtype not in (None, "auto"):
        dtype = getattr(torch, dtype)
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=model_args.attn_implementation,
        trust_remote_code=trust_remote_code,
        revision=model_args.model_revision if path == model_args.model_name_or_path else None,
    )
