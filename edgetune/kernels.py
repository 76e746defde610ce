"""Fast exp-based kernels for training on MLX's Linux CPU backend.

Why this exists: on the `mlx[cpu]` wheel, `mx.exp` (and everything built on
it: sigmoid, SiLU, softmax, logsumexp) runs at ~17-25 ns per element, while a
fused multiply-add pass costs ~0.6 ns. In a LoRA step on a qwen2.5-0.5b shape
the exps in SwiGLU and the attention softmax take about a third of the step.
This module computes exp with the Cephes single-precision scheme (x = n*ln2 + r, a degree-5 polynomial for e^r,
2^n written into the exponent bits) out of plain arithmetic that `mx.compile`
fuses: ~3 ns per element, max relative error 1.2e-7 against float64 (mx.exp's
own is ~1e-6 on the same grid; tests/test_kernels.py).

The vocabulary logsumexp of the loss head stays on mx.logsumexp: a custom
version had to keep the [S, V] logits for its backward pass and raised peak
memory by ~2 GB at the 0.5B shape, and a vocabulary-chunked one could not be
made to run chunk by chunk inside a compiled step (MLX scheduled all chunks at
once, so the memory came back).

`exp_approx` itself is not differentiable (its bit views have no VJP); the
ops built on it (`swiglu`, `attention`) have explicit VJPs, so
the backward pass never differentiates the polynomial and never calls mx.exp.

Scope: only on Linux with the CPU as default device (never on macOS/Metal or
CUDA, where exp is fast), only while `training_kernels(model)` is active, and
off with EDGETUNE_FAST_KERNELS=0. Outside that, the model runs mlx-lm's own code.
"""

from __future__ import annotations

import contextlib
import os
import sys

from edgetune.runtime import mlx_core

mx = mlx_core()

_LOG2E = 1.4426950408889634
_LN2_HI = 0.693359375  # ln 2 split in two (Cody-Waite) so n*ln2 is exact for |n| < 2^9
_LN2_LO = -2.12194440e-4
# exp(x) saturates outside this range instead of producing inf/denormals:
# exp(-87) = 1.6e-38 acts as zero in every sum it enters.
_LO, _HI = -87.0, 88.0


def _barrier(a):
    # A no-op bit view that mx.compile cannot fuse across. Without it, an outer
    # compiled step fuses the whole exp into one kernel that runs ~3x slower
    # than these three (measured: 9 vs 3 ns/element).
    return a.view(mx.int32).view(mx.float32)


def _poly(r):
    # e^r for |r| <= ln2/2, Cephes expf coefficients, Estrin-style (shallow graph).
    r2 = r * r
    a = r + 1.0
    b = r * 1.6666665459e-1 + 5.0000001201e-1
    c = r * 8.3334519073e-3 + 4.1665795894e-2
    d = r * 1.9875691500e-4 + 1.3981999507e-3
    return a + r2 * (b + r2 * (c + r2 * d))


def _exp_impl(x):
    x = mx.minimum(mx.maximum(x, _LO), _HI)
    # floor(x*log2e + 0.5) via truncation of a positive number (floor itself is slow here).
    n = (x * _LOG2E + 200.5).astype(mx.int32).astype(mx.float32) - 200.0
    x, n = _barrier(x), _barrier(n)
    r = (x - n * _LN2_HI) - n * _LN2_LO
    p = _barrier(_poly(r))
    two_n = ((n + 127.0) * 8388608.0).astype(mx.int32).view(mx.float32)  # 2^n from exponent bits
    return p * two_n


exp_approx = mx.compile(_exp_impl)


def _sigmoid(x):
    return 1.0 / (1.0 + exp_approx(-x))


@mx.custom_function
def swiglu(gate, x):
    """silu(gate) * x, the SwiGLU of llama/qwen2 MLPs."""
    return gate * _sigmoid(gate) * x


@swiglu.vjp
def _swiglu_vjp(primals, cotangent, output):
    gate, x = primals
    s = _sigmoid(gate)
    gs = gate * s
    # d silu(g)/dg = s + g*s*(1-s)
    return cotangent * x * (s + gs * (1.0 - s)), cotangent * gs


def _additive_mask(mask, T: int, S: int, dtype):
    """mlx-lm's mask forms -> an additive float mask broadcastable to [B, H, T, S] (or None)."""
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unsupported attention mask {mask!r}")
        mask = mx.arange(S - T, S)[:, None] >= mx.arange(S)[None]
    if mask is not None and mask.dtype == mx.bool_:
        mask = mx.where(mask, mx.array(0.0, dtype), mx.array(-mx.inf, dtype))
    return mask


def attention(queries, keys, values, scale: float, mask=None):
    """softmax(q k^T * scale + mask) v for [B, H, T, D] queries and [B, KVH, S, D] keys/values.

    `mask` is what mlx-lm passes: None, "causal", a boolean array (True = attend)
    or an additive float array. Grouped-query heads share their key/value head
    (queries are grouped per key/value head, no copy of keys/values).

    Like flash attention, the backward pass recomputes the [T, S] probabilities
    from q and k instead of keeping them: per layer only q, k, v and the output
    stay alive for the backward pass, which keeps peak memory below MLX's own
    attention at the cost of one extra q k^T product.
    """
    B, H, T, D = queries.shape
    kv_heads, S = keys.shape[1], keys.shape[2]
    rep = H // kv_heads
    mask = _additive_mask(mask, T, S, queries.dtype)
    if mask is not None and mask.ndim == 4:  # [B|1, H|1, T, S] -> [B|1, KVH|1, rep|1, T, S]
        mask = mask[:, :, None] if mask.shape[1] == 1 else mask.reshape(mask.shape[0], kv_heads, rep, T, S)

    def probabilities(q, k):  # q [B, KVH, rep*T, D] (already scaled), k [B, KVH, S, D]
        scores = q @ k.swapaxes(-1, -2)
        if mask is not None:
            scores = (scores.reshape(B, kv_heads, rep, T, S) + mask).reshape(B, kv_heads, rep * T, S)
        e = exp_approx(scores - mx.max(scores, axis=-1, keepdims=True))
        return e / mx.sum(e, axis=-1, keepdims=True)

    @mx.custom_function
    def core(q, k, v):
        return probabilities(q, k) @ v

    @core.vjp
    def core_vjp(primals, d_out, out):
        q, k, v = primals
        # Tie the recomputation to the backward pass: without this, mx.compile merges it with the
        # forward's identical q k^T (common subexpressions) and keeps the [T, S] block alive after all.
        q, k = mx.depends([q, k], [d_out])
        p = probabilities(q, k)
        d_p = d_out @ v.swapaxes(-1, -2)
        d_scores = p * (d_p - mx.sum(d_out * out, axis=-1, keepdims=True))  # sum(d_p*p) = sum(d_out*out)
        return d_scores @ k, d_scores.swapaxes(-1, -2) @ q, p.swapaxes(-1, -2) @ d_out

    q = (queries * scale).reshape(B, kv_heads, rep * T, D)
    return core(q, keys, values).reshape(B, H, T, D)


def enabled() -> bool:
    """True where the fast kernels are used: Linux, CPU default device, not switched off."""
    if os.environ.get("EDGETUNE_FAST_KERNELS", "1") == "0":
        return False
    return sys.platform.startswith("linux") and mx.default_device() == mx.cpu


def _sdpa(queries, keys, values, cache, scale, mask, sinks=None):
    """Drop-in for mlx_lm.models.base.scaled_dot_product_attention."""
    if sinks is not None or hasattr(cache, "bits"):  # attention sinks / quantized KV cache: mlx-lm's own
        from mlx_lm.models.base import scaled_dot_product_attention

        return scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks)
    return attention(queries, keys, values, scale, mask)


# Model families whose modules call `swiglu(...)` and
# `scaled_dot_product_attention(...)` by module-level name with plain caches
# (checked against mlx-lm's own output by tests/test_kernels.py).
PATCHABLE_MODEL_TYPES = {"llama", "qwen2"}
_active = False
KERNELS_NOTE = ("kernels: SwiGLU and attention use a fused polynomial exp (MLX's CPU exp is slow); "
                "EDGETUNE_FAST_KERNELS=0 turns this off")


@contextlib.contextmanager
def training_kernels(model, model_type: str | None = None):
    """Within this block, `model`'s family uses the fast kernels (when `enabled()`).

    The model's module-level names are swapped and restored on exit, so
    generation and evaluation outside the block run mlx-lm's code unchanged.
    """
    global _active
    module = sys.modules.get(type(model).__module__)
    model_type = model_type or getattr(getattr(model, "args", None), "model_type", None)
    if _active or not enabled():
        yield _active  # already on (nested use) or off here
        return
    saved = {}
    if module is not None and model_type in PATCHABLE_MODEL_TYPES:
        saved = {name: getattr(module, name) for name in ("swiglu", "scaled_dot_product_attention")
                 if hasattr(module, name)}
    replacements = {"swiglu": swiglu, "scaled_dot_product_attention": _sdpa}
    try:
        for name in saved:
            setattr(module, name, replacements[name])
        _active = True
        yield True
    finally:
        _active = False
        for name, value in saved.items():
            setattr(module, name, value)


def active() -> bool:
    """True inside `training_kernels` (where enabled)."""
    return _active
