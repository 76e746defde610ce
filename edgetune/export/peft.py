"""LoRA adapters between mlx-lm's format and Hugging Face PEFT's, both ways, losslessly.

mlx-lm (`adapters.safetensors`)                  PEFT (`adapter_model.safetensors`)
  model.layers.N.self_attn.q_proj.lora_a [in, r]   base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight [r, in]
  model.layers.N.self_attn.q_proj.lora_b [r, out]  base_model.model.model.layers.N.self_attn.q_proj.lora_B.weight [out, r]
  lora_parameters.scale                            lora_alpha / r   (lora_alpha / sqrt(r) with use_rslora)
  num_layers (the last N blocks)                   layers_to_transform (any set; left out when all)
  lora_parameters.keys (self_attn.q_proj ...)      target_modules (q_proj ...)

Only transposes and renames happen: tensors keep their dtype and bits, so
PEFT -> MLX -> PEFT gives bitwise-equal tensors. PEFT features mlx-lm's LoRA
cannot express (DoRA, per-module ranks, trained biases, extra saved modules)
are refused with the config key named, never silently dropped.

mlx-lm adapts the last `num_layers` blocks; a PEFT adapter on other blocks (say
0 and 2 of 4) is written with `num_layers` reaching back to the first adapted
block and tensors only for the adapted ones: mlx-lm loads adapters with
`strict=False`, and a LoRA layer without tensors keeps `lora_b = 0`, which
adds nothing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from edgetune.errors import UserError
from edgetune.export.fuse import LoraAdapter, in_block_path, layer_index
from edgetune.fileio import write_json
from edgetune.lora import read_adapter_config
from edgetune.runtime import mlx_core

PEFT_PREFIX = "base_model.model."
PEFT_WEIGHTS = "adapter_model.safetensors"
MLX_WEIGHTS = "adapters.safetensors"

# adapter_config.json keys whose non-default values mean "not plain LoRA": key -> (default test, why)
_UNSUPPORTED = {
    "use_dora": (lambda v: not v, "DoRA adapters have a magnitude vector mlx-lm's LoRA layers lack"),
    "rank_pattern": (lambda v: not v, "per-module ranks; mlx-lm uses one rank for all modules"),
    "alpha_pattern": (lambda v: not v, "per-module alphas; mlx-lm uses one scale for all modules"),
    "bias": (lambda v: v in (None, "none"), "trained base biases are not part of an mlx-lm adapter"),
    "lora_bias": (lambda v: not v, "LoRA biases are not part of an mlx-lm adapter"),
    "modules_to_save": (lambda v: not v, "fully trained extra modules are not part of an mlx-lm adapter"),
    "fan_in_fan_out": (lambda v: not v, "Conv1D (GPT-2 style) layers; mlx-lm models use Linear"),
    "layer_replication": (lambda v: not v, "layer replication changes the model's depth"),
    "trainable_token_indices": (lambda v: not v, "trained token embeddings are not part of an mlx-lm adapter"),
    "target_parameters": (lambda v: not v, "LoRA on raw parameters (MoE experts) is not supported"),
    "use_qalora": (lambda v: not v, "QA-LoRA pools its input; mlx-lm's LoRA does not"),
    "use_bdlora": (lambda v: not v, "block-diagonal LoRA is not mlx-lm's LoRA"),
    "alora_invocation_tokens": (lambda v: not v, "activated LoRA applies only after invocation tokens"),
}


def is_peft_adapter(folder: Path) -> bool:
    cfg_path = folder / "adapter_config.json"
    if (folder / PEFT_WEIGHTS).is_file():
        return True
    try:
        return "peft_type" in json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False


def read_peft_adapter(folder: str | Path) -> LoraAdapter:
    """Read a PEFT LoRA adapter into mlx-lm orientation (lora_a = A^T, lora_b = B^T).

    Raises UserError naming the adapter_config.json key of an unsupported
    feature, a missing weights file, or tensors that are not LoRA A/B pairs.
    """
    mx = mlx_core()
    folder = Path(folder)
    cfg = read_adapter_config(folder)
    where = folder / "adapter_config.json"
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{where}: peft_type {cfg.get('peft_type')!r}; only LORA adapters convert to mlx-lm")
    bad = [f"{k} = {json.dumps(cfg[k])} ({why})" for k, (ok, why) in _UNSUPPORTED.items()
           if k in cfg and not ok(cfg[k])]
    if bad:
        raise UserError(f"{where}: cannot convert to an mlx-lm LoRA adapter:\n  " + "\n  ".join(bad))
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or isinstance(cfg.get(key), bool):
            raise UserError(f"{where}: {key} must be a number, got {cfg.get(key)!r}")
    weights_file = folder / PEFT_WEIGHTS
    if not weights_file.is_file():
        pickle = (folder / "adapter_model.bin").exists()
        hint = " (adapter_model.bin is a pickle; re-save it with safetensors)" if pickle else ""
        raise UserError(f"{folder}: no {PEFT_WEIGHTS}{hint}")
    weights = mx.load(str(weights_file))
    pairs: dict[str, dict[str, object]] = {}
    stray = []
    for name, value in weights.items():
        key = name.removeprefix(PEFT_PREFIX).replace(".default.", ".")  # older saves keep the adapter name
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if key.endswith(suffix) and name.startswith(PEFT_PREFIX):
                pairs.setdefault(key[: -len(suffix)], {})[part] = value
                break
        else:
            stray.append(name)
    incomplete = [p for p, d in pairs.items() if len(d) != 2]
    if stray or incomplete:
        raise UserError(f"{weights_file}: not LoRA A/B pairs under {PEFT_PREFIX}: "
                        + ", ".join((stray + [p + ".lora_A/B" for p in incomplete])[:5]))
    if not pairs:
        raise UserError(f"{weights_file}: holds no LoRA tensors")
    rank = int(cfg["r"])
    ranks = {p: (d["lora_A"].shape[0], d["lora_B"].shape[1]) for p, d in pairs.items()}
    off = [p for p, rs in ranks.items() if rs != (rank, rank)]
    if off:
        raise UserError(f"{weights_file}: {off[0]} has rank {ranks[off[0]]}, adapter_config.json says r = {rank}")
    alpha = cfg["lora_alpha"]
    scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    modules = {p: (d["lora_A"].T, d["lora_B"].T) for p, d in sorted(pairs.items())}
    return LoraAdapter(modules, rank, float(scale), alpha, float(cfg.get("lora_dropout") or 0.0), cfg, folder)


def _check_regular(adapter: LoraAdapter, where: str) -> tuple[list[int], list[str]]:
    """Both formats describe an adapter as (blocks) x (modules per block); anything else is refused."""
    outside = [p for p in adapter.modules if layer_index(p) is None]
    if outside:
        raise UserError(f"{where}: LoRA outside the transformer blocks ({', '.join(outside[:3])}) is not supported")
    layers, keys = adapter.layers(), adapter.in_block_keys()
    have = {(layer_index(p), in_block_path(p)) for p in adapter.modules}
    missing = [f"layer {layer} {key}" for layer in layers for key in keys if (layer, key) not in have]
    if missing:
        raise UserError(f"{where}: adapts different modules in different layers (missing: {', '.join(missing[:4])}); "
                        "neither format can express that")
    return layers, keys


def _mlx_alpha(adapter: LoraAdapter) -> float:
    """alpha with scale = alpha / r (or / sqrt(r) for rsLoRA), exactly as recorded when it agrees."""
    rslora = bool(adapter.config.get("use_rslora"))
    denom = math.sqrt(adapter.rank) if rslora else adapter.rank
    recorded = adapter.config.get("lora_alpha")
    if isinstance(recorded, (int, float)) and math.isclose(recorded / denom, adapter.scale, rel_tol=1e-6):
        return recorded
    return adapter.scale * denom


def target_module_names(keys: list[str]) -> list[str]:
    """PEFT target_modules: the short names (`q_proj`) unless two modules share one, then the paths."""
    short = [k.rsplit(".", 1)[-1] for k in keys]
    return sorted(short) if len(set(short)) == len(short) else sorted(keys)


def write_peft_adapter(adapter: LoraAdapter, out: Path, num_hidden_layers: int, base_model: str) -> dict:
    """Write `adapter_config.json` + `adapter_model.safetensors` (PEFT's layout) into `out`."""
    mx = mlx_core()
    layers, keys = _check_regular(adapter, str(adapter.path or "adapter"))
    tensors = {}
    for path, (a, b) in adapter.modules.items():
        tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = a.T
        tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = b.T
    mx.save_safetensors(str(out / PEFT_WEIGHTS), tensors, metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": adapter.rank,
        "lora_alpha": _mlx_alpha(adapter),
        "lora_dropout": adapter.dropout,
        "target_modules": target_module_names(keys),
        "layers_to_transform": None if layers == list(range(num_hidden_layers)) else layers,
        "layers_pattern": None,
        "bias": "none",
        "use_rslora": bool(adapter.config.get("use_rslora")),
        "use_dora": False,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    write_json(out / "adapter_config.json", config)
    return config


def write_mlx_adapter(adapter: LoraAdapter, out: Path, num_hidden_layers: int, base_model: str,
                      source: dict | None = None) -> dict:
    """Write mlx-lm's `adapters.safetensors` + `adapter_config.json` into `out`.

    `num_layers` reaches back to the first adapted block (see the module docstring).
    """
    mx = mlx_core()
    layers, keys = _check_regular(adapter, str(adapter.path or "adapter"))
    if layers[-1] >= num_hidden_layers:
        raise UserError(f"{adapter.path}: adapts layer {layers[-1]}, but base {base_model} has "
                        f"{num_hidden_layers} layers")
    tensors = {}
    for path, (a, b) in adapter.modules.items():
        tensors[f"{path}.lora_a"] = a
        tensors[f"{path}.lora_b"] = b
    mx.save_safetensors(str(out / MLX_WEIGHTS), tensors, metadata={"format": "mlx"})
    config = {
        "fine_tune_type": "lora",
        "num_layers": num_hidden_layers - layers[0],
        "lora_parameters": {"rank": adapter.rank, "scale": adapter.scale, "dropout": adapter.dropout, "keys": keys},
        "lora_alpha": _mlx_alpha(adapter),
        "base_model": base_model,
    }
    if adapter.config.get("use_rslora"):
        config["use_rslora"] = True  # keeps alpha exact on the way back to PEFT
    if source:
        config["source"] = source
    write_json(out / "adapter_config.json", config)
    return config
