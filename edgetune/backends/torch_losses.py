"""The training losses as pure functions over torch tensors — the torch twins of `edgetune.losses`.

Same contracts, same hand-worked examples (see the docstrings there; tests/test_backends.py
checks both modules against those numbers): every loss returns a *sum*, a count and summed aux
metrics, so gradient accumulation normalises by the whole accumulated batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DPO_LOSSES = ("sigmoid", "ipo", "hinge")


def token_logprobs(logits, targets):
    """log p(target) per position in float32: logits [N, V], targets [N] -> [N]."""
    logits = logits.float()
    return logits.gather(-1, targets[:, None].long())[:, 0] - torch.logsumexp(logits, dim=-1)


def sft_loss(logits, targets, weights):
    """Summed cross-entropy over supervised positions; (loss_sum, n_tokens). See `losses.sft_loss`."""
    return sft_loss_from_logprobs(token_logprobs(logits, targets), weights)


def sft_loss_from_logprobs(logps, weights):
    return -(logps * weights).sum(), weights.sum()


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float,
             kind: str = "sigmoid", label_smoothing: float = 0.0):
    """DPO over N pairs; (loss_sum, N, aux sums). See `losses.dpo_loss` for the worked example."""
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if kind == "sigmoid":
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif kind == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    elif kind == "hinge":
        losses = torch.clamp(1.0 - beta * h, min=0.0)
    else:
        raise ValueError(f"dpo loss {kind!r} is not one of {DPO_LOSSES}")
    reward_c = (beta * (policy_chosen - ref_chosen)).detach()
    reward_r = (beta * (policy_rejected - ref_rejected)).detach()
    aux = {"reward_chosen": reward_c.sum(), "reward_rejected": reward_r.sum(),
           "accuracy": (reward_c > reward_r).float().sum(), "margin": (reward_c - reward_r).sum()}
    return losses.sum(), torch.tensor(float(h.shape[0]), device=h.device), aux


def kto_loss(policy, ref, desirable, beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """KTO over N unpaired completions; (loss_sum, N, aux sums). See `losses.kto_loss`."""
    r = policy - ref
    z = torch.clamp(r.mean(), min=0.0).detach()
    undesirable = 1.0 - desirable
    losses = (desirable * desirable_weight * (1.0 - torch.sigmoid(beta * (r - z)))
              + undesirable * undesirable_weight * (1.0 - torch.sigmoid(beta * (z - r))))
    rewards = (beta * r).detach()
    n = float(r.shape[0])
    n_desirable = desirable.sum()
    n_d, n_u = torch.clamp(n_desirable, min=1.0), torch.clamp(n - n_desirable, min=1.0)
    aux = {"reward_desirable": (rewards * desirable).sum() / n_d * n,
           "reward_undesirable": (rewards * undesirable).sum() / n_u * n,
           "desirable_share": n_desirable, "kl": z * n}
    return losses.sum(), torch.tensor(n, device=r.device), aux


def orpo_loss(chosen_logps, rejected_logps, chosen_tokens, rejected_tokens, beta: float):
    """ORPO (reference-free); (loss_sum, N, aux sums). See `losses.orpo_loss`."""
    m_c, m_r = chosen_logps / chosen_tokens, rejected_logps / rejected_tokens
    ratio = _log_odds(m_c) - _log_odds(m_r)
    losses = -m_c - beta * F.logsigmoid(ratio)
    reward_c, reward_r = (beta * m_c).detach(), (beta * m_r).detach()
    aux = {"reward_chosen": reward_c.sum(), "reward_rejected": reward_r.sum(),
           "accuracy": (reward_c > reward_r).float().sum(), "margin": (reward_c - reward_r).sum(),
           "log_odds_ratio": ratio.detach().sum()}
    return losses.sum(), torch.tensor(float(m_c.shape[0]), device=m_c.device), aux


def _log_odds(mean_logp):
    # log(p / (1 - p)) from log p, as in `losses._log_odds`.
    return mean_logp - torch.log1p(-torch.clamp(torch.exp(mean_logp), max=1.0 - 1e-6))
