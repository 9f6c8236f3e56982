"""KL(π_t ‖ π_{t−1}) between two successive policies, estimated on prompts by sampling (docs/benchmark.md).

The estimator: draw m responses y ~ π_t(·|x) per prompt x (temperature 1, no top-p / top-k cut: the policy itself,
through the generation stage's own hf `Generator` and chat template), then

    KL ≈ mean over the samples of  log π_t(y|x) − log π_{t−1}(y|x)

which is unbiased for KL(π_t ‖ π_{t−1}) over whole responses; its standard error is the samples' standard
deviation / √(samples) (samples of one prompt are not independent of the prompt: the s.e. is a guide, not a
guarantee). log π(y|x) sums the response tokens' log-probabilities plus, when the response stopped before
max_new_tokens, the probability of stopping there (any of the generator's stop ids). A response cut at
max_new_tokens has no stop term: the estimate is then the KL of the two policies' responses truncated at
max_new_tokens, which is what the pipeline generates.
"""

import math

from selm.errors import SELMError

ESTIMATOR = ("Monte Carlo: mean of log π_t(y|x) − log π_{t−1}(y|x) over responses y sampled from π_t "
             "(temperature 1) on held-out prompts")


def sample_responses(model_path: str, conversations, samples: int, max_new_tokens: int, seed: int = 0,
                     batch_size: int = 64, dtype: str = "float32"):
    """(prompt token ids, [[completion ids] * samples] per prompt, the stop ids) of samples from the model."""
    from selm.generation import Generator
    from selm.recipe.schema import GenerationArguments

    settings = GenerationArguments(generation_backend="hf", temperature=1.0, top_p=1.0, num_responses=samples,
                                   max_new_tokens=max_new_tokens, generation_seed=seed,
                                   generation_batch_size=max(1, batch_size // samples))
    with Generator(model_path, settings, dtype=dtype, progress=False) as generator:
        prompt_ids = generator.encode(conversations)
        generator.check_lengths(prompt_ids)
        return prompt_ids, generator.generate_ids(prompt_ids), list(generator.eos_ids)


def sequence_logps(model, prompt_ids, completions, stop_ids, max_new_tokens: int, batch_size: int = 64):
    """log π(y|x) per (prompt, completion) pair (see the module docstring), batched with right padding."""
    import torch

    pairs = list(zip(prompt_ids, completions))
    out = []
    for first in range(0, len(pairs), batch_size):
        batch = pairs[first:first + batch_size]
        width = max(len(p) + len(c) for p, c in batch)
        input_ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (p, c) in enumerate(batch):
            input_ids[row, :len(p) + len(c)] = torch.tensor(list(p) + list(c))
            mask[row, :len(p) + len(c)] = 1
        with torch.inference_mode():
            logps = torch.log_softmax(model(input_ids=input_ids, attention_mask=mask).logits.float(), dim=-1)
        for row, (p, c) in enumerate(batch):
            # the token at position i is predicted from position i - 1
            positions = torch.arange(len(p) - 1, len(p) + len(c) - 1)
            total = logps[row, positions, torch.tensor(list(c), dtype=torch.long)].sum() if c else logps.new_zeros(())
            if len(c) < max_new_tokens:  # it stopped: the probability of stopping right there
                total = total + torch.logsumexp(logps[row, len(p) + len(c) - 1, list(stop_ids)], dim=0)
            out.append(float(total))
    return out


def _load(path: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()


def estimate_kl(policy_path: str, previous_path: str, conversations, samples: int, max_new_tokens: int,
                seed: int = 0, batch_size: int = 64, dtype: str = "float32") -> dict:
    """{"kl", "sem", "samples", "prompts", ...}: the estimate of KL(policy ‖ previous) on `conversations`."""
    if samples < 1 or not conversations:
        raise SELMError(f"KL estimate: need at least one prompt and one sample per prompt (got {len(conversations)} "
                        f"prompts, {samples} samples)")
    prompt_ids, completions, stop_ids = sample_responses(policy_path, conversations, samples, max_new_tokens, seed,
                                                         batch_size, dtype)
    flat_prompts = [p for p, per_prompt in zip(prompt_ids, completions) for _ in per_prompt]
    flat = [c for per_prompt in completions for c in per_prompt]
    policy, previous = _load(policy_path, dtype), _load(previous_path, dtype)
    if policy.config.vocab_size != previous.config.vocab_size:
        raise SELMError(f"KL estimate: {policy_path} and {previous_path} have different vocabularies "
                        f"({policy.config.vocab_size} and {previous.config.vocab_size} tokens)")
    ratios = [a - b for a, b in zip(sequence_logps(policy, flat_prompts, flat, stop_ids, max_new_tokens, batch_size),
                                    sequence_logps(previous, flat_prompts, flat, stop_ids, max_new_tokens, batch_size))]
    mean = sum(ratios) / len(ratios)
    sd = math.sqrt(sum((r - mean) ** 2 for r in ratios) / (len(ratios) - 1)) if len(ratios) > 1 else 0.0
    return {"kl": mean, "sem": sd / math.sqrt(len(ratios)), "samples": len(ratios), "prompts": len(conversations),
            "samples_per_prompt": samples, "truncated": sum(len(c) >= max_new_tokens for c in flat),
            "mean_response_tokens": sum(map(len, flat)) / len(flat)}
