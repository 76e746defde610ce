"""LoRA on mlx-lm models, saved in mlx-lm's own adapter format.

We reuse mlx-lm's `LoRALinear` so that `mlx_lm.generate --adapter-path` and
`mlx_lm.load(adapter_path=...)` read our adapters unchanged. Recipes speak in
`alpha` (as PEFT does); mlx-lm speaks in `scale`. The conversion
`scale = alpha / rank` happens here and nowhere else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgetune.errors import UserError
from edgetune.fileio import write_json
from edgetune.runtime import mlx_core

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSpec:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ALL_LINEAR
    layers: int | None = None  # last N transformer blocks; None = all

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _block_linear_paths(block) -> list[str]:
    """Paths of Linear-like modules inside one transformer block."""
    import mlx.nn as nn

    out = []
    for path, module in block.named_modules():
        if isinstance(module, (nn.Linear, nn.QuantizedLinear)):
            out.append(path)
    return out


def lora_keys(model, spec: LoraSpec) -> list[str]:
    """Map short target names (`q_proj`) to mlx-lm's in-block paths (`self_attn.q_proj`).

    Raises UserError naming targets that match nothing, with what exists.
    """
    return match_targets(_block_linear_paths(model.layers[0]), spec)


def match_targets(available: list[str], spec: LoraSpec) -> list[str]:
    """The in-block linear paths (`available`, of one block) that `spec.targets` name, sorted.

    Shared by both backends (their llama/qwen2 blocks use the same names). Raises UserError
    naming targets that match nothing, with what exists.
    """
    keys, missing = [], []
    for t in spec.targets:
        hits = [p for p in available if p == t or p.endswith("." + t)]
        if not hits:
            missing.append(t)
        keys.extend(hits)
    if missing:
        short = sorted({p.rsplit(".", 1)[-1] for p in available})
        raise UserError(
            f"sft.lora.targets: {', '.join(missing)} not found in this model; its linear layers are: {', '.join(short)}"
        )
    return sorted(set(keys))


def num_lora_layers(model, spec: LoraSpec) -> int:
    return lora_layer_count(len(model.layers), spec)


def lora_layer_count(n: int, spec: LoraSpec) -> int:
    """How many of the model's `n` blocks (the last ones) get LoRA; raises UserError when out of range."""
    if spec.layers is None:
        return n
    if not 1 <= spec.layers <= n:
        raise UserError(f"sft.lora.layers: {spec.layers} is out of range; this model has {n} layers")
    return spec.layers


def adapter_config(model, spec: LoraSpec) -> dict:
    """The adapter_config.json mlx-lm expects (plus PEFT-style names for humans)."""
    return {
        "fine_tune_type": "lora",
        "num_layers": num_lora_layers(model, spec),
        "lora_parameters": {
            "rank": spec.rank,
            "scale": spec.scale,
            "dropout": spec.dropout,
            "keys": lora_keys(model, spec),
        },
        "lora_alpha": spec.alpha,
    }


def lora_a_init(seed: int, layer: int, key: str, in_dims: int, rank: int):
    """The starting `lora_a` [in_dims, rank] of one LoRA layer: uniform in +-1/sqrt(in_dims), as
    mlx-lm draws it, but from numpy seeded by (seed, layer, key) — so the MLX and torch backends
    start from the same adapter for the same recipe (`lora_b` starts at zero on both)."""
    import zlib

    import numpy as np

    rng = np.random.default_rng([seed, layer, zlib.crc32(key.encode())])
    bound = 1.0 / np.sqrt(in_dims)
    return rng.uniform(-bound, bound, size=(in_dims, rank)).astype(np.float32)


def attach_lora(model, spec: LoraSpec, seed: int) -> dict:
    """Freeze the base, add LoRA layers (deterministic init from `seed`), return the adapter config."""
    mx = mlx_core()
    from mlx_lm.tuner.utils import linear_to_lora_layers

    cfg = adapter_config(model, spec)
    model.freeze()
    mx.random.seed(seed)
    linear_to_lora_layers(model, cfg["num_layers"], cfg["lora_parameters"])
    first = len(model.layers) - cfg["num_layers"]
    inits = []
    for i in range(first, len(model.layers)):
        for key in cfg["lora_parameters"]["keys"]:
            a = model.layers[i]
            for part in key.split("."):
                a = getattr(a, part)
            init = lora_a_init(seed, i, key, a.lora_a.shape[0], a.lora_a.shape[1])
            inits.append((f"model.layers.{i}.{key}.lora_a", mx.array(init).astype(a.lora_a.dtype)))
    model.load_weights(inits, strict=False)
    return cfg


def trainable_count(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


def adapter_weights(model) -> dict:
    from mlx.utils import tree_flatten

    return dict(tree_flatten(model.trainable_parameters()))


def save_adapter(model, cfg: dict, folder: str | Path, extra_config: dict | None = None) -> None:
    """Write `adapters.safetensors` + `adapter_config.json` (each atomically) into `folder`."""
    mx = mlx_core()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = adapter_weights(model)
    tmp = folder / ".adapters.tmp.safetensors"
    mx.save_safetensors(str(tmp), weights, metadata={"format": "mlx"})
    tmp.replace(folder / "adapters.safetensors")
    write_json(folder / "adapter_config.json", {**cfg, **(extra_config or {})})


def load_adapter_weights(model, folder: str | Path) -> None:
    """Load adapter weights into a model that already has matching LoRA layers.

    Raises UserError naming keys that do not match the model.
    """
    mx = mlx_core()
    folder = Path(folder)
    weights = mx.load(str(folder / "adapters.safetensors"))
    params = adapter_weights(model)
    bad = [k for k, v in weights.items() if k not in params or params[k].shape != v.shape]
    missing = [k for k in params if k not in weights]
    if bad or missing:
        raise UserError(
            f"{folder}: adapter does not match the model "
            f"(unexpected or mis-shaped: {', '.join(bad[:5]) or 'none'}; missing: {', '.join(missing[:5]) or 'none'})"
        )
    model.load_weights(list(weights.items()), strict=False)


def read_adapter_config(folder: str | Path) -> dict:
    path = Path(folder) / "adapter_config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{folder}: not an adapter folder (no adapter_config.json)") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg})") from None
