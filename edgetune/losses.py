"""Training losses as pure functions over MLX arrays.

Every loss returns a *sum* and a token count rather than a mean, so that
gradient accumulation can normalise by the total number of supervised tokens
across micro-batches (averaging per-micro-batch means over-weights short rows).
"""

from __future__ import annotations

from edgetune.runtime import mlx_core

mx = mlx_core()


def token_logprobs(logits, targets):
    """log p(target) per position, computed in float32.

    logits [N, V], targets [N] -> [N]. Uses logsumexp so no [N, V]
    log-softmax array is kept beyond what autodiff needs.
    """
    logits = logits.astype(mx.float32)
    picked = mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return picked - mx.logsumexp(logits, axis=-1)


def sft_loss(logits, targets, weights):
    """Summed cross-entropy over supervised positions.

    logits [N, V]; targets [N] int; weights [N] float (1 = supervised, 0 = not).
    Returns (loss_sum, n_tokens). Example: logits [[0, ln 3]] (p = 1/4, 3/4),
    target 1, weight 1 -> loss_sum = -ln(3/4) = 0.2877, n_tokens = 1.
    """
    return sft_loss_from_logprobs(token_logprobs(logits, targets), weights)


def sft_loss_from_logprobs(logps, weights):
    """`sft_loss` from per-position log p(target) [N] (for heads that never form full logits)."""
    return -(logps * weights).sum(), weights.sum()


# --- preference losses over per-sequence completion log-probs -------------------------------------
#
# Each takes [N] arrays of summed completion log-probs (policy and the frozen reference) and returns
# (loss_sum, n, aux) where aux holds *summed* metrics, so the trainer can average them over an
# accumulated batch exactly as it averages the loss.

DPO_LOSSES = ("sigmoid", "ipo", "hinge")


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float,
             kind: str = "sigmoid", label_smoothing: float = 0.0):
    """Direct Preference Optimization over N pairs; returns (loss_sum, N, aux sums).

    h = (pc - pr) - (rc - rr), the policy's log-ratio margin over the reference's.
    sigmoid (Rafailov et al.): -(1-e) log s(beta h) - e log s(-beta h), e = label_smoothing
      (conservative DPO: the share of votes assumed flipped).
    ipo (Azar et al.): (h - 1/(2 beta))^2.   hinge (SLiC): max(0, 1 - beta h).
    Rewards are beta (policy - reference) per completion.

    Worked example, beta = 0.5, sigmoid, e = 0:
      policy chosen [-1, -2, -3], rejected [-2, -2, -1], ref chosen [-1, -2, -2], ref rejected [-1, -1, -2]
      h = [-1 - (-2) - 0, 0 - (-1), -2 - 0] = [1, 1, -2]; beta h = [0.5, 0.5, -1]
      -log s(0.5) = 0.474077, -log s(-1) = 1.313262 -> loss_sum = 2*0.474077 + 1.313262 = 2.261416
      rewards chosen 0.5*[0, 0, -1] = sum -0.5, rejected 0.5*[-1, -1, 1] = sum -0.5
      accuracy sum = 2 (pairs 1, 2), margin sum = 0.5 + 0.5 - 1 = 0.
    """
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if kind == "sigmoid":
        losses = (-(1.0 - label_smoothing) * _log_sigmoid(beta * h) - label_smoothing * _log_sigmoid(-beta * h))
    elif kind == "ipo":
        losses = mx.square(h - 1.0 / (2.0 * beta))
    elif kind == "hinge":
        losses = mx.maximum(1.0 - beta * h, 0.0)
    else:
        raise ValueError(f"dpo loss {kind!r} is not one of {DPO_LOSSES}")
    reward_c = mx.stop_gradient(beta * (policy_chosen - ref_chosen))
    reward_r = mx.stop_gradient(beta * (policy_rejected - ref_rejected))
    aux = {"reward_chosen": reward_c.sum(), "reward_rejected": reward_r.sum(),
           "accuracy": (reward_c > reward_r).astype(mx.float32).sum(), "margin": (reward_c - reward_r).sum()}
    return losses.sum(), mx.array(float(h.shape[0])), aux


def kto_loss(policy, ref, desirable, beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """Kahneman-Tversky Optimization over N unpaired completions; returns (loss_sum, N, aux sums).

    r = policy - ref per completion; z = max(0, mean(r)) is the batch KL estimate (no gradient
    flows through it, as in the paper). Desirable rows: w_d (1 - s(beta (r - z)));
    undesirable rows: w_u (1 - s(beta (z - r))). `desirable` is a {0, 1} float array.
    Assumption: z is estimated from the batch's own completions rather than mismatched
    (prompt, other completion) pairs, so it needs no extra forward or extra reference rows.

    Worked example, beta = 1, weights 1: policy [-1, -2, -3], ref [-2, -2, -2], desirable [1, 1, 0]
      r = [1, 0, -1]; mean 0 -> z = 0
      desirable: 1 - s(1) = 0.268941, 1 - s(0) = 0.5; undesirable: 1 - s(0 - (-1)) = 0.268941
      loss_sum = 1.037883; kl sum = 3 * z = 0
      class mean rewards: desirable (1 + 0) / 2 = 0.5, undesirable -1; returned times N = 3: 1.5, -3.
    """
    r = policy - ref
    z = mx.stop_gradient(mx.maximum(r.mean(), 0.0))
    undesirable = 1.0 - desirable
    losses = (desirable * desirable_weight * (1.0 - mx.sigmoid(beta * (r - z)))
              + undesirable * undesirable_weight * (1.0 - mx.sigmoid(beta * (z - r))))
    rewards = mx.stop_gradient(beta * r)
    n = float(r.shape[0])
    # Class rewards are this batch's class means times N, so that dividing by N (as the trainer
    # does for every aux sum) gives the mean reward of each class, not a share-weighted one.
    # One array for the desirable count: computing `desirable.sum()` twice made mx.compile
    # (0.32) fail with `IndexError: _Map_base::at` under value_and_grad.
    n_desirable = desirable.sum()
    n_d, n_u = mx.maximum(n_desirable, 1.0), mx.maximum(n - n_desirable, 1.0)
    aux = {"reward_desirable": (rewards * desirable).sum() / n_d * n,
           "reward_undesirable": (rewards * undesirable).sum() / n_u * n,
           "desirable_share": n_desirable, "kl": z * n}
    return losses.sum(), mx.array(n), aux


def orpo_loss(chosen_logps, rejected_logps, chosen_tokens, rejected_tokens, beta: float):
    """Odds Ratio Preference Optimization (Hong et al.), reference-free; returns (loss_sum, N, aux sums).

    With per-token mean log-probs m = logps / tokens and log odds(m) = m - log(1 - e^m):
    loss = -m_chosen (the SFT term) + beta * -log s(log odds(m_c) - log odds(m_r)).
    (`beta` is the paper's lambda, as in TRL.)

    Worked example, beta = 1, one token per completion:
      chosen [ln .5, ln .5, ln .25], rejected [ln .5, ln .25, ln .5]
      log odds: p=.5 -> 0, p=.25 -> ln(1/3) = -1.098612
      ratio = [0, 1.098612, -1.098612]; -log s: [0.693147, 0.287682, 1.386294]
      SFT term -m_c = [0.693147, 0.693147, 1.386294]
      loss_sum = 2.367123 + 2.772589 = 5.139712; accuracy sum 1, margin sum 0.
    """
    m_c, m_r = chosen_logps / chosen_tokens, rejected_logps / rejected_tokens
    ratio = _log_odds(m_c) - _log_odds(m_r)
    losses = -m_c - beta * _log_sigmoid(ratio)
    reward_c, reward_r = mx.stop_gradient(beta * m_c), mx.stop_gradient(beta * m_r)
    aux = {"reward_chosen": reward_c.sum(), "reward_rejected": reward_r.sum(),
           "accuracy": (reward_c > reward_r).astype(mx.float32).sum(), "margin": (reward_c - reward_r).sum(),
           "log_odds_ratio": mx.stop_gradient(ratio).sum()}
    return losses.sum(), mx.array(float(m_c.shape[0])), aux


def _log_sigmoid(x):
    return -mx.logaddexp(0.0, -x)


def _log_odds(mean_logp):
    # log(p / (1 - p)) from log p; log1p(-exp(m)) is exact for p near 0, clipped below 1 for p -> 1.
    return mean_logp - mx.log1p(-mx.minimum(mx.exp(mean_logp), 1.0 - 1e-6))
