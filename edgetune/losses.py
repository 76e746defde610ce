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
    nll = -token_logprobs(logits, targets)
    return (nll * weights).sum(), weights.sum()
