"""The other online methods' rules (docs/methods.md): RSO's rejection sampler, ReST's filter, and the cross-key
checks that say which settings each method accepts (the reference choice is `Recipe.reference_model`).

- RSO (Liu et al., "Statistical Rejection Sampling Improves Preference Optimization", Algorithm 1): over the
  candidates not accepted yet, r_max is their highest score; each one in candidate order is accepted with
  probability exp((r − r_max)/β_r) (a uniform draw u < that), and removed once accepted; passes repeat until
  `num_samples` are accepted. The candidate holding r_max is accepted with probability 1 in every pass, so with at
  least `num_samples` candidates the loop always ends: no "too few accepted" case. The pair is the first two
  accepted; chosen is the higher score (a tie: the lower index, the ranking's tie rule).
- ReST (Gulcehre et al., Improve step): the generated responses whose score is >= the iteration's threshold.
"""

import math

from selm.errors import SELMError

RSO_PAIR = 2


def rso_rng(seed: int, iteration: int, row: int):
    """The generator of one row's draw: the same recipe seed, iteration and row draw the same on a rerun."""
    import numpy as np

    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(iteration), int(row)])


def rso_sample(scores, beta: float, rng, num_samples: int = RSO_PAIR) -> list[list[int]]:
    """Candidate indices accepted by statistical rejection sampling, per pass (see the module docstring)."""
    if len(scores) < num_samples:
        raise SELMError(f"rejection sampling needs at least {num_samples} candidates, got {len(scores)}")
    remaining, passes, accepted = list(range(len(scores))), [], 0
    while accepted < num_samples:
        r_max = max(scores[i] for i in remaining)
        this_pass = []
        for i in remaining:
            if rng.uniform() < math.exp((scores[i] - r_max) / beta):
                this_pass.append(i)
                accepted += 1
                if accepted == num_samples:
                    break
        remaining = [i for i in remaining if i not in this_pass]
        passes.append(this_pass)
    return passes


def rso_pair(scores, beta: float, rng) -> tuple[int, int]:
    """(chosen_index, rejected_index): the two accepted samples, labelled by their scores."""
    first, second = [i for p in rso_sample(scores, beta, rng) for i in p][:RSO_PAIR]
    chosen, rejected = sorted((first, second), key=lambda i: (-scores[i], i))
    return chosen, rejected


def rest_keep(generated_scores, threshold: float) -> list[int]:
    """Indices of the generated responses ReST's Improve step keeps: score >= threshold."""
    return [i for i, s in enumerate(generated_scores) if s >= threshold]


# ---------------------------------------------------------------------------------------------------------------
# Which settings each method takes (one pass, at parse time, naming the recipe)
# ---------------------------------------------------------------------------------------------------------------
def check_method_settings(recipe) -> None:
    r, source = recipe.ranking, recipe.path
    rule, alpha = r.update_rule, float(recipe.training.get("alpha", 0.0))
    if recipe.model.use_peft and rule == "rest":  # SFTTrainer on a continued adapter was never built or tested
        raise SELMError(f"{source}: 'use_peft' with 'update_rule' rest is not supported: ReST trains full models here")
    if recipe.model.use_peft and recipe.pipeline.reference_model == "initial":
        # a continued adapter's reference is trl's frozen copy of it (pi_{t-1}); pi_0 would need the adapter disabled
        raise SELMError(f"{source}: 'reference_model' initial with 'use_peft' is not supported: an adapter iteration's "
                        "reference is the previous adapter (reference_model: previous_iteration)")
    if r.candidates == "generated" and rule in ("replace", "original"):
        raise SELMError(f"{source}: 'update_rule' {rule} needs the dataset's pair among the candidates; set "
                        "candidates: generated_and_pair")
    if rule == "rso" and r.candidates == "generated" and recipe.generation.num_responses < RSO_PAIR:
        raise SELMError(f"{source}: 'update_rule' rso draws {RSO_PAIR} of the candidates, but candidates: generated "
                        f"with num_responses {recipe.generation.num_responses} gives fewer; set num_responses >= 2")
    for key, owner in (("rso_beta", "rso"), ("rest_threshold", "rest")):
        if getattr(r, key) is None and rule == owner:
            raise SELMError(f"{source}: 'update_rule' {owner} needs '{key}'")
        if getattr(r, key) is not None and rule != owner:
            raise SELMError(f"{source}: '{key}' is set but 'update_rule' is {rule}, which does not use it; "
                            f"remove it or set update_rule: {owner}")
    if rule == "rest":
        if not math.isfinite(r.rest_threshold):
            raise SELMError(f"{source}: 'rest_threshold' is {r.rest_threshold}; it must be a finite number")
        if r.candidates != "generated":
            raise SELMError(f"{source}: 'update_rule' rest keeps generated responses only; set candidates: generated")
        if alpha > 0 and not recipe.is_generation_free:
            raise SELMError(f"{source}: 'update_rule' rest trains with the supervised loss, which has no optimism "
                            f"term: 'alpha' is {alpha}; set alpha: 0")
        from selm.rest_training import check_rest_keys

        check_rest_keys(recipe)
    loss_types = recipe.training.get("loss_type") or ["sigmoid"]
    loss_types = [loss_types] if isinstance(loss_types, str) else list(loss_types)
    if loss_types != ["sigmoid"] and alpha > 0:
        raise SELMError(f"{source}: 'loss_type' is {loss_types}; the SELM loss (alpha {alpha} > 0) supports only "
                        "DPO's sigmoid loss (hinge etc. run with alpha: 0, through trl's DPOTrainer)")

