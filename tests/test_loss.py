"""selm.loss.selm_loss against the formula of docs/DESIGN.md §1 written out again, and against trl's sigmoid loss."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl import DPOTrainer

from selm.loss import selm_loss

# (groups = chosen, rejected, reference; batch = 3) token-summed log-probs
POLICY = [[-3.0, -7.5, -1.2], [-4.0, -2.5, -9.0], [-5.0, -6.0, -0.5]]
REFERENCE = [[-3.5, -7.0, -2.0], [-3.0, -3.0, -8.0], [-4.0, -6.5, -1.5]]


def formula(policy, reference, beta, alpha):
    """Per example: -log σ(β·[(πw - rw) - (πl - rl)]) + α·β·(πref_y - rref_y), then the mean; in plain math."""
    losses = []
    for (pw, pl, py), (rw, rl, ry) in zip(zip(*policy), zip(*reference)):
        margin = beta * ((pw - rw) - (pl - rl))
        losses.append(math.log1p(math.exp(-margin)) + alpha * beta * (py - ry))
    return sum(losses) / len(losses)


def formula_gradient(policy, reference, beta, alpha):
    """d loss / d policy log-probs, by hand: σ(-m)·β on y_l, -σ(-m)·β on y_w, α·β on y_ref, each over the batch."""
    n = len(policy[0])
    grads = [[0.0] * n for _ in range(3)]
    for i in range(n):
        margin = beta * ((policy[0][i] - reference[0][i]) - (policy[1][i] - reference[1][i]))
        s = 1 / (1 + math.exp(margin))  # σ(-m)
        grads[0][i], grads[1][i], grads[2][i] = -s * beta / n, s * beta / n, alpha * beta / n
    return grads


@pytest.mark.parametrize("beta,alpha", [(0.1, 0.001), (0.3, 0.7), (1.0, 0.0)])
def test_value_and_gradients_match_the_formula(beta, alpha):
    policy = torch.tensor(POLICY, dtype=torch.float64, requires_grad=True)
    reference = torch.tensor(REFERENCE, dtype=torch.float64, requires_grad=True)
    loss, terms = selm_loss(policy, reference, beta, alpha)
    loss.backward()
    assert loss.item() == pytest.approx(formula(POLICY, REFERENCE, beta, alpha), rel=1e-12)
    assert policy.grad.tolist() == [pytest.approx(g, rel=1e-9, abs=1e-15)
                                    for g in formula_gradient(POLICY, REFERENCE, beta, alpha)]
    assert reference.grad is None  # no gradient through any log πref, log πref(y_ref) included
    expected_optimism = [alpha * beta * (p - r) for p, r in zip(POLICY[2], REFERENCE[2])]
    assert terms["optimism"].tolist() == pytest.approx(expected_optimism, rel=1e-12)


def test_alpha_multiplies_beta_not_alone():
    policy, reference = torch.tensor(POLICY), torch.tensor(REFERENCE)
    dpo, _ = selm_loss(policy, reference, 0.5, 0.0)
    selm, _ = selm_loss(policy, reference, 0.5, 0.2)
    mean_logratio = sum(p - r for p, r in zip(POLICY[2], REFERENCE[2])) / 3
    assert (selm - dpo).item() == pytest.approx(0.2 * 0.5 * mean_logratio, rel=1e-5)


def trl_sigmoid_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """trl's own DPOTrainer._compute_loss (sigmoid, summed log-probs, precomputed reference), on a stand-in model
    whose per-token log-probs are the given sums (one completion token per row)."""
    rows = policy_logps.reshape(-1, 1)  # [chosen..., rejected...], one completion token each
    n = rows.size(0)

    def model(**_):
        return SimpleNamespace(log_probs=rows, entropy=torch.zeros(n, 1), mean_logits=torch.zeros(n, 1),
                               is_top1=torch.zeros(n, 1, dtype=torch.bool))

    identity = SimpleNamespace(gather_for_metrics=lambda x: x, gather=lambda x: x, device="cpu")
    trainer = SimpleNamespace(model=SimpleNamespace(training=False), accelerator=identity, ld_alpha=None,
                              precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=["sigmoid"],
                              loss_weights=[1.0], beta=beta, use_weighting=False, aux_loss_enabled=False,
                              _metrics=defaultdict(lambda: defaultdict(list)), _tp_size=1, _total_train_tokens=0)
    chosen, rejected = ref_logps
    inputs = {"input_ids": torch.ones(n, 2, dtype=torch.long), "attention_mask": torch.ones(n, 2, dtype=torch.long),
              "completion_mask": torch.tensor([[0, 1]] * n), "ref_chosen_logps": chosen, "ref_rejected_logps": rejected}
    return DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)


@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_alpha_zero_is_trls_sigmoid_loss(beta):
    pairs = torch.tensor(POLICY[:2], dtype=torch.float64)
    ref = torch.tensor(REFERENCE[:2], dtype=torch.float64)
    ours_in, trl_in = pairs.clone().requires_grad_(), pairs.clone().requires_grad_()
    ours, terms = selm_loss(ours_in, ref, beta, alpha=0.0)
    theirs = trl_sigmoid_loss(trl_in, ref, beta)
    ours.backward(), theirs.backward()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-12)
    assert torch.allclose(ours_in.grad, trl_in.grad, rtol=1e-12)
    assert terms["optimism"] is None  # pairs without a reference: no optimism term at all
    # and a reference row with alpha 0 changes nothing
    with_reference, _ = selm_loss(torch.tensor(POLICY, dtype=torch.float64),
                                  torch.tensor(REFERENCE, dtype=torch.float64), beta, alpha=0.0)
    assert with_reference.item() == pytest.approx(theirs.item(), rel=1e-12)
