"""The fast CPU kernels equal MLX's own ops (values and gradients) and stay inside their block."""

import sys

import numpy as np
import pytest

from edgetune import kernels
from edgetune.runtime import mlx_core
from edgetune.sft import hidden_states, output_logits, target_logprobs
from tests.mlx_models import make_model

mx = mlx_core()
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402


def test_exp_matches_float64_over_the_float32_range():
    x = np.linspace(-87.0, 88.0, 400_001, dtype=np.float32)
    got = np.array(kernels.exp_approx(mx.array(x)))
    want = np.exp(x.astype(np.float64))
    rel = np.abs(got - want) / want
    assert rel.max() < 3e-7  # a few float32 ulps; mx.exp's own error on this grid is ~1e-6


def test_exp_saturates_instead_of_overflowing():
    got = np.array(kernels.exp_approx(mx.array([-1e4, -mx.inf, 0.0, 1e4, mx.inf], mx.float32)))
    assert np.all(np.isfinite(got))
    assert got[0] < 1e-37 and got[1] < 1e-37 and got[2] == 1.0 and got[3] > 1e38


def _grads(f, *args):
    """Gradients of a randomly weighted sum of f's output, as a tuple (one per argument)."""
    def weighted(*a):
        out = f(*a)
        w = np.random.default_rng(9).normal(0, 1, out.shape).astype(np.float32)
        return (out * mx.array(w)).sum()

    g = mx.grad(weighted, argnums=tuple(range(len(args))))(*args)
    return g if isinstance(g, tuple) else (g,)


def test_swiglu_value_and_gradients_match_mlx():
    rng = np.random.default_rng(0)
    g = mx.array(rng.normal(0, 4, (8, 33)).astype(np.float32))
    x = mx.array(rng.normal(0, 1, (8, 33)).astype(np.float32))
    np.testing.assert_allclose(np.array(kernels.swiglu(g, x)), np.array(nn.silu(g) * x), rtol=1e-6, atol=1e-6)
    for a, b in zip(_grads(kernels.swiglu, g, x), _grads(lambda g, x: nn.silu(g) * x, g, x)):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask_kind", ["causal", "bool", "additive", None])
def test_attention_matches_mlx_sdpa(mask_kind):
    rng = np.random.default_rng(2)
    B, H, KV, T, D = 2, 6, 2, 9, 8
    q, k, v = (mx.array(rng.normal(0, 1, s).astype(np.float32)) for s in [(B, H, T, D), (B, KV, T, D), (B, KV, T, D)])
    mask = {"causal": "causal", None: None,
            "bool": mx.array(rng.random((B, 1, T, T)) > 0.3) | mx.eye(T, dtype=mx.bool_),
            "additive": mx.array(rng.normal(0, 1, (1, 1, T, T)).astype(np.float32))}[mask_kind]

    def mine(q, k, v):
        return kernels.attention(q, k, v, 0.35, mask)

    def ref(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=0.35, mask=mask)

    np.testing.assert_allclose(np.array(mine(q, k, v)), np.array(ref(q, k, v)), atol=2e-6)
    for a, b in zip(_grads(mine, q, k, v), _grads(ref, q, k, v)):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not kernels.enabled(), reason="fast kernels are used only on a Linux CPU")
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_model_in_training_kernels_matches_mlx_lm(model_type):
    model = make_model(model_type, hidden=64, vocab=211)
    module = sys.modules[type(model).__module__]
    original = (module.swiglu, module.scaled_dot_product_attention)
    toks = mx.array(np.random.default_rng(3).integers(0, 211, (2, 13)).astype(np.int32))
    segs = mx.array(np.array([[1] * 6 + [2] * 7, [1] * 10 + [0] * 3], np.int32))

    select = mx.array([0, 3, 5, 6, 12, 13, 20, 22])
    targets = mx.array([5, 7, 9, 11, 13, 17, 19, 23])

    def loss(m):  # packed rows, the loss head and plain logits all take part
        logps = target_logprobs(m, toks, select, targets, segs)
        return -logps.sum() + output_logits(m, hidden_states(m, toks, segs)).square().mean()

    ref_logits = model(toks)
    ref_loss, ref_grads = nn.value_and_grad(model, loss)(model)
    with kernels.training_kernels(model) as fast:
        assert fast and kernels.active()
        assert module.swiglu is kernels.swiglu
        logits = model(toks)
        fast_loss, fast_grads = nn.value_and_grad(model, loss)(model)
    assert (module.swiglu, module.scaled_dot_product_attention) == original and not kernels.active()
    np.testing.assert_allclose(np.array(logits), np.array(ref_logits), atol=2e-5)
    np.testing.assert_allclose(fast_loss.item(), ref_loss.item(), rtol=1e-5)
    for (k, a), (_, b) in zip(tree_flatten(fast_grads), tree_flatten(ref_grads)):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-3, atol=1e-5, err_msg=k)


def test_switched_off_by_env_and_off_the_linux_cpu(monkeypatch):
    model = make_model("llama")
    monkeypatch.setenv("EDGETUNE_FAST_KERNELS", "0")
    with kernels.training_kernels(model) as fast:
        assert not fast and not kernels.active()
        assert sys.modules[type(model).__module__].swiglu is not kernels.swiglu
    monkeypatch.delenv("EDGETUNE_FAST_KERNELS")
    monkeypatch.setattr(sys, "platform", "darwin")
    assert not kernels.enabled()
    with kernels.training_kernels(model) as fast:
        assert not fast
