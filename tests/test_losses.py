import math

import numpy as np

from edgetune.losses import sft_loss, token_logprobs
from edgetune.runtime import mlx_core

mx = mlx_core()


def test_token_logprobs_hand_worked():
    # Row 0: logits [0, ln 3] -> softmax [1/4, 3/4]; target 1 -> ln(3/4).
    # Row 1: logits [0, 0, 0] padded with -inf-like? keep 2 classes: [ln 2, ln 2] -> 1/2 each; target 0 -> ln(1/2).
    logits = mx.array([[0.0, math.log(3.0)], [math.log(2.0), math.log(2.0)]])
    lp = token_logprobs(logits, mx.array([1, 0]))
    np.testing.assert_allclose(np.array(lp), [math.log(0.75), math.log(0.5)], rtol=1e-6)


def test_sft_loss_sums_only_weighted_positions():
    # Three positions: nll = -ln(3/4) = 0.28768, -ln(1/4) = 1.38629, -ln(1/2) = 0.69315.
    # Weights [1, 0, 1] -> loss_sum = 0.28768 + 0.69315 = 0.98083, n = 2.
    logits = mx.array([[0.0, math.log(3.0)], [0.0, math.log(3.0)], [0.0, 0.0]])
    targets = mx.array([1, 0, 1])
    loss, n = sft_loss(logits, targets, mx.array([1.0, 0.0, 1.0]))
    assert float(n) == 2.0
    assert abs(float(loss) - (-math.log(0.75) - math.log(0.5))) < 1e-6


def test_masked_positions_get_zero_gradient():
    logits = mx.array([[0.3, -0.2, 1.0], [2.0, 0.1, -1.0], [0.0, 0.5, 0.2]])
    targets = mx.array([2, 0, 1])
    weights = mx.array([1.0, 0.0, 1.0])
    grad = mx.grad(lambda lg: sft_loss(lg, targets, weights)[0])(logits)
    g = np.array(grad)
    assert np.all(g[1] == 0.0)
    assert np.abs(g[0]).sum() > 0 and np.abs(g[2]).sum() > 0
