"""Packed rows (block-diagonal attention) must equal each example run alone."""

import numpy as np
import pytest

from edgetune.runtime import mlx_core
from edgetune.sft import hidden_states, output_logits
from tests.mlx_models import make_model

mx = mlx_core()
import mlx.nn as nn  # noqa: E402


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_packed_logits_equal_unpacked(model_type):
    model = make_model(model_type)
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 97, 7), rng.integers(0, 97, 5)
    packed = mx.array(np.concatenate([a, b, [0, 0]])[None].astype(np.int32))
    segs = mx.array(np.array([[1] * 7 + [2] * 5 + [0, 0]], np.int32))
    out = output_logits(model, hidden_states(model, packed, segs))[0]
    alone_a = model(mx.array(a[None].astype(np.int32)))[0]
    alone_b = model(mx.array(b[None].astype(np.int32)))[0]
    np.testing.assert_allclose(np.array(out[:7]), np.array(alone_a), atol=1e-5)
    np.testing.assert_allclose(np.array(out[7:12]), np.array(alone_b), atol=1e-5)


def test_packed_gradients_equal_unpacked():
    model = make_model("llama")
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 97, 6).astype(np.int32), rng.integers(0, 97, 4).astype(np.int32)

    def loss_packed(m):
        toks = mx.array(np.concatenate([a, b])[None])
        segs = mx.array(np.array([[1] * 6 + [2] * 4], np.int32))
        return output_logits(m, hidden_states(m, toks, segs)).sum()

    def loss_alone(m):
        return m(mx.array(a[None])).sum() + m(mx.array(b[None])).sum()

    g1 = nn.value_and_grad(model, loss_packed)(model)[1]
    g2 = nn.value_and_grad(model, loss_alone)(model)[1]
    from mlx.utils import tree_flatten

    for (k, x), (_, y) in zip(tree_flatten(g1), tree_flatten(g2)):
        np.testing.assert_allclose(np.array(x), np.array(y), atol=1e-4, err_msg=k)
