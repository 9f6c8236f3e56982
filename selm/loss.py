"""The SELM loss as a pure function of log-probabilities (docs/DESIGN.md §1).

    loss = -log σ(β·[(log πθ(y_w) - log πref(y_w)) - (log πθ(y_l) - log πref(y_l))])
           + α·β·(log πθ(y_ref) - log πref(y_ref))

log π(y) is the token-summed log-probability of a completion; every reference log-probability is taken without
gradient; the batch loss is the mean over examples. Without a reference row (or α = 0) it is DPO's sigmoid loss,
exactly as trl's DPOTrainer computes it. `SELMTrainer._compute_loss` calls it; the tests check it against the
formula written out again.
"""

import torch
import torch.nn.functional as F


def selm_loss(policy_logps: torch.Tensor, reference_logps: torch.Tensor, beta: float,
              alpha: float) -> tuple[torch.Tensor, dict]:
    """(batch loss, terms) from (groups, batch) log-probs, groups = chosen, rejected[, reference].

    With two groups (DPO pairs) there is no optimism term. `terms` holds the per-example tensors the trainer logs:
    `logratios` (groups, batch), `dpo_losses` (batch) and `optimism` (batch, or None without a reference group).
    """
    logratios = policy_logps - reference_logps.detach()
    dpo_losses = -F.logsigmoid(beta * (logratios[0] - logratios[1]))
    optimism = alpha * beta * logratios[2] if len(logratios) > 2 else None
    loss = (dpo_losses if optimism is None else dpo_losses + optimism).mean()
    return loss, {"logratios": logratios, "dpo_losses": dpo_losses, "optimism": optimism}
