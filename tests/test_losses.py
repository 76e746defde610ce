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


# --- preference losses: the worked examples of each docstring -------------------------------------

from edgetune.losses import dpo_loss, kto_loss, orpo_loss  # noqa: E402


def _f(*xs):
    return [float(x) for x in xs]


def test_dpo_sigmoid_hand_worked():
    # h = [1, 1, -2], beta 0.5: 2 * -log s(0.5) + -log s(-1) = 2 * 0.474077 + 1.313262.
    loss, n, aux = dpo_loss(mx.array([-1.0, -2.0, -3.0]), mx.array([-2.0, -2.0, -1.0]),
                            mx.array([-1.0, -2.0, -2.0]), mx.array([-1.0, -1.0, -2.0]), beta=0.5)
    assert abs(float(loss) - 2.261416) < 1e-5 and float(n) == 3
    assert _f(aux["reward_chosen"], aux["reward_rejected"], aux["accuracy"], aux["margin"]) == [-0.5, -0.5, 2.0, 0.0]


def test_dpo_label_smoothing_ipo_and_hinge_hand_worked():
    args = (mx.array([-1.0, -2.0, -3.0]), mx.array([-2.0, -2.0, -1.0]),
            mx.array([-1.0, -2.0, -2.0]), mx.array([-1.0, -1.0, -2.0]))
    s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # e = 0.1: each pair 0.9 * -log s(bh) + 0.1 * -log s(-bh), bh = [0.5, 0.5, -1].
    want = sum(-0.9 * math.log(s(b)) - 0.1 * math.log(s(-b)) for b in (0.5, 0.5, -1.0))
    assert abs(float(dpo_loss(*args, beta=0.5, label_smoothing=0.1)[0]) - want) < 1e-5
    # ipo, beta 0.5: (h - 1)^2 = [0, 0, 9] -> 9.
    assert abs(float(dpo_loss(*args, beta=0.5, kind="ipo")[0]) - 9.0) < 1e-6
    # hinge, beta 0.5: max(0, 1 - bh) = [0.5, 0.5, 2] -> 3.
    assert abs(float(dpo_loss(*args, beta=0.5, kind="hinge")[0]) - 3.0) < 1e-6


def test_dpo_gradient_pushes_chosen_up_and_rejected_down():
    pc, pr = mx.array([-1.0, -2.0, -3.0]), mx.array([-2.0, -2.0, -1.0])
    ref = mx.array([-1.5, -1.5, -1.5])
    gc, gr = mx.grad(lambda a, b: dpo_loss(a, b, ref, ref, 0.5)[0], argnums=(0, 1))(pc, pr)
    assert np.all(np.array(gc) < 0) and np.all(np.array(gr) > 0)


def test_kto_hand_worked():
    # r = [1, 0, -1], z = max(0, 0) = 0: (1 - s(1)) + (1 - s(0)) + (1 - s(1)) = 1.037883.
    loss, n, aux = kto_loss(mx.array([-1.0, -2.0, -3.0]), mx.array([-2.0, -2.0, -2.0]),
                            mx.array([1.0, 1.0, 0.0]), beta=1.0)
    assert abs(float(loss) - 1.037883) < 1e-5 and float(n) == 3
    # Class means (0.5, -1) times N = 3; 2 desirable rows; z = 0.
    assert _f(aux["reward_desirable"], aux["reward_undesirable"], aux["desirable_share"], aux["kl"]) == [1.5, -3.0, 2.0, 0.0]
    # Weights scale each class: desirable x2, undesirable x0.5 -> 2 * 0.768941 + 0.5 * 0.268941.
    loss_w = kto_loss(mx.array([-1.0, -2.0, -3.0]), mx.array([-2.0, -2.0, -2.0]), mx.array([1.0, 1.0, 0.0]),
                      beta=1.0, desirable_weight=2.0, undesirable_weight=0.5)[0]
    assert abs(float(loss_w) - (2 * 0.768941 + 0.5 * 0.268941)) < 1e-5


def test_kto_kl_estimate_is_clamped_mean_and_carries_no_gradient():
    # r = [2, 1, 0] -> z = 1; desirable: 1 - s(1), 1 - s(0); undesirable: 1 - s(1 - 0).
    policy, ref, des = mx.array([0.0, -1.0, -2.0]), mx.array([-2.0, -2.0, -2.0]), mx.array([1.0, 1.0, 0.0])
    loss, _, aux = kto_loss(policy, ref, des, beta=1.0)
    s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert abs(float(loss) - ((1 - s(1)) + 0.5 + (1 - s(1)))) < 1e-5
    assert abs(float(aux["kl"]) - 3.0) < 1e-6  # summed: 3 rows x z = 1
    # The gradient of row 0 is that of its own term only (z is a constant).
    g = np.array(mx.grad(lambda p: kto_loss(p, ref, des, 1.0)[0])(policy))
    assert abs(g[0] - (-s(1) * (1 - s(1)))) < 1e-5


def test_orpo_hand_worked():
    ln = math.log
    loss, n, aux = orpo_loss(mx.array([ln(0.5), ln(0.5), ln(0.25)]), mx.array([ln(0.5), ln(0.25), ln(0.5)]),
                             mx.array([1.0, 1.0, 1.0]), mx.array([1.0, 1.0, 1.0]), beta=1.0)
    assert abs(float(loss) - 5.139712) < 1e-5 and float(n) == 3
    assert abs(float(aux["accuracy"]) - 1.0) < 1e-6 and abs(float(aux["margin"])) < 1e-6
    # Per-token means: the same sums over 2 tokens are half as negative.
    loss2 = orpo_loss(mx.array([ln(0.25)] * 3), mx.array([ln(0.25)] * 3), mx.array([2.0] * 3),
                      mx.array([2.0] * 3), beta=1.0)[0]
    # m = ln .5 for both: each row -ln .5 + -log s(0) = 2 ln 2.
    assert abs(float(loss2) - 3 * 2 * math.log(2)) < 1e-5


def test_kto_loss_compiles_under_value_and_grad_regression():
    # Regression: two separate `desirable.sum()` in kto_loss made mx.compile raise
    # `IndexError: _Map_base::at` in the training step.
    step = mx.compile(mx.value_and_grad(lambda p, r, d: kto_loss(p * 1.0, r, d, 0.5)))
    (loss, n, aux), grad = step(mx.array([-1.0, -2.0, -3.0]), mx.array([-2.0, -2.0, -2.0]), mx.array([1.0, 1.0, 0.0]))
    assert float(n) == 3 and np.array(grad).shape == (3,)
