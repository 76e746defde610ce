"""Attention that stays inside each packed example, without patching model code.

mlx-lm models build each layer's attention mask with
`create_attention_mask(h, cache)`, which asks the cache for the mask when the
cache object has `make_mask`. A per-layer stand-in "cache" whose `make_mask`
returns a block-diagonal causal mask, whose `update_and_fetch` returns keys and
values unchanged, and whose `offset` is 0 makes any such model attend only
within each segment of a packed row (see shared/notes/mlx-packing.md).
Positions are not reset per segment; RoPE makes attention depend on relative
position only, so this is exact for RoPE models (tested against unpacked
logits and gradients in tests/test_packing.py).
"""

from __future__ import annotations

from edgetune.errors import UserError

# Families whose attention reads only `offset`, `make_mask` and `update_and_fetch`
# from the cache and use RoPE (checked by tests/test_packing.py for llama/qwen2).
PACKING_SAFE_MODEL_TYPES = {"llama", "qwen2", "qwen3", "mistral"}


class SegmentMaskCache:
    """Stand-in cache making attention block-diagonal by segment id."""

    offset = 0

    def __init__(self, segment_ids):
        self.segment_ids = segment_ids  # [B, T] int32; 0 marks padding

    def make_mask(self, N, return_array=False, window_size=None):
        if window_size is not None:
            raise UserError("packing: sliding-window attention is not supported; set packing: false in the "
                            "stage's section of the recipe")
        from edgetune.runtime import mlx_core

        mx = mlx_core()
        seg = self.segment_ids
        same = seg[:, :, None] == seg[:, None, :]
        causal = mx.tril(mx.ones((N, N), dtype=mx.bool_))
        return (same & causal)[:, None, :, :]

    def update_and_fetch(self, keys, values):
        return keys, values


def packing_caches(model, segment_ids):
    return [SegmentMaskCache(segment_ids) for _ in model.layers]


def check_packing_supported(model_type: str, section: str = "sft") -> None:
    if model_type not in PACKING_SAFE_MODEL_TYPES:
        raise UserError(
            f"packing is verified only for {', '.join(sorted(PACKING_SAFE_MODEL_TYPES))} models, "
            f"not {model_type!r}; set {section}.packing: false"
        )
