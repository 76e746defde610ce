"""Merge a LoRA adapter into its base model one tensor at a time, and write the result.

mlx-lm's `LoRALinear` computes `y = x W^T + scale * (x @ lora_a) @ lora_b`
with `lora_a` [in, r] and `lora_b` [r, out], so the merged weight is

    W' = W + scale * (lora_b^T @ lora_a^T)            # [out, in], like W

(the same as `LoRALinear.fuse`). The sum is taken in float32 and cast back to
the base's dtype, so an unquantized export equals "base + adapter" up to that
one rounding. A quantized base is dequantized, merged and re-quantized, one
tensor at a time.

Memory: the base is opened lazily (`mx.load` reads a tensor from the file only
when it is evaluated) and the output is streamed into one safetensors file:
each output tensor is computed, written and dropped before the next is read.
Peak memory is therefore about one tensor's float32 copy plus the process,
never the model in float32 (measured on a qwen2.5-0.5b shape: see README).

Tensor names are mlx-lm's parameter names after `sanitize`, which are the
Hugging Face names for llama- and qwen2-family models, so an unquantized
output folder is also a Hugging Face checkpoint.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edgetune.errors import UserError
from edgetune.runtime import mlx_core

MLX_BITS = {"4bit": 4, "8bit": 8, "none": None}
GROUP_SIZES = (32, 64, 128)  # what mlx's affine quantization accepts

# safetensors dtype codes of the MLX dtypes a checkpoint can hold
_ST_DTYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "uint32": "U32", "int32": "I32",
             "uint8": "U8", "int8": "I8", "uint16": "U16", "int16": "I16", "int64": "I64",
             "uint64": "U64", "bool": "BOOL"}


@dataclass(frozen=True)
class Quantization:
    """MLX affine quantization of every linear and embedding weight whose width allows it."""

    bits: int
    group_size: int = 64

    def as_config(self) -> dict:
        return {"group_size": self.group_size, "bits": self.bits, "mode": "affine"}

    def describe(self) -> str:
        return f"{self.bits}-bit (group size {self.group_size}, affine)"


def parse_mlx_quantize(value: str, group_size: int) -> Quantization | None:
    """`4bit|8bit|none` -> Quantization or None; raises UserError naming the allowed values."""
    if value not in MLX_BITS:
        raise UserError(f"--quantize {value!r}: for --format mlx choose one of {', '.join(MLX_BITS)}")
    if group_size not in GROUP_SIZES:
        raise UserError(f"--group-size {group_size}: choose one of {', '.join(map(str, GROUP_SIZES))}")
    bits = MLX_BITS[value]
    return Quantization(bits, group_size) if bits else None


# --- the adapter ----------------------------------------------------------------------------------

@dataclass
class LoraAdapter:
    """An adapter in mlx-lm's layout: per adapted module path, `(lora_a [in, r], lora_b [r, out])`."""

    modules: dict[str, tuple]
    rank: int
    scale: float
    alpha: float
    dropout: float
    config: dict = field(default_factory=dict)  # adapter_config.json as read
    path: Path | None = None

    def layers(self) -> list[int]:
        return sorted({layer_index(p) for p in self.modules if layer_index(p) is not None})

    def in_block_keys(self) -> list[str]:
        """`self_attn.q_proj`-style paths inside a block (mlx-lm's `lora_parameters.keys`)."""
        return sorted({in_block_path(p) for p in self.modules})


def layer_index(module_path: str) -> int | None:
    parts = module_path.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def in_block_path(module_path: str) -> str:
    """`model.layers.3.self_attn.q_proj` -> `self_attn.q_proj`."""
    parts = module_path.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return ".".join(parts[i + 2:])
    return module_path


def read_mlx_adapter(folder: str | Path) -> LoraAdapter:
    """Read `adapters.safetensors` + `adapter_config.json` (mlx-lm's format).

    Raises UserError for missing files, DoRA/full fine-tunes (not LoRA) and
    tensors that are not `*.lora_a`/`*.lora_b` pairs.
    """
    from edgetune.lora import read_adapter_config

    mx = mlx_core()
    folder = Path(folder)
    cfg = read_adapter_config(folder)
    kind = cfg.get("fine_tune_type", "lora")
    if kind != "lora":
        raise UserError(f"{folder}/adapter_config.json: fine_tune_type {kind!r}; only LoRA adapters can be exported")
    params = cfg.get("lora_parameters") or {}
    missing = [k for k in ("rank", "scale") if k not in params]
    if missing:
        raise UserError(f"{folder}/adapter_config.json: lora_parameters lacks {', '.join(missing)}")
    weights_file = folder / "adapters.safetensors"
    if not weights_file.is_file():
        raise UserError(f"{folder}: adapter_config.json but no adapters.safetensors; is the run finished?")
    weights = mx.load(str(weights_file))
    modules, stray = {}, []
    for name in sorted(weights):
        path, _, leaf = name.rpartition(".")
        if leaf == "lora_a":
            if path + ".lora_b" not in weights:
                stray.append(name)
                continue
            modules[path] = (weights[name], weights[path + ".lora_b"])
        elif leaf != "lora_b" or path + ".lora_a" not in weights:
            stray.append(name)
    if stray:
        raise UserError(f"{weights_file}: not LoRA pairs (expected NAME.lora_a + NAME.lora_b): {', '.join(stray[:5])}")
    if not modules:
        raise UserError(f"{weights_file}: holds no LoRA tensors")
    rank, scale = int(params["rank"]), float(params["scale"])
    alpha = float(cfg.get("lora_alpha", scale * rank))
    return LoraAdapter(modules, rank, scale, alpha, float(params.get("dropout", 0.0)), cfg, folder)


# --- the base model ---------------------------------------------------------------------------------

@dataclass
class BaseModel:
    """A base checkpoint opened lazily: mlx-lm's module tree (for structure) and its tensors (unread)."""

    path: Path
    config: dict
    modules: dict  # module path -> mlx.nn.Module (the skeleton; its parameters are donated away)
    tensors: dict  # parameter name -> lazy mx.array (handed over to `plan_tensors`)
    num_layers: int

    def quantization(self) -> dict | None:
        return self.config.get("quantization")


def open_base(path: Path) -> BaseModel:
    """Open a model folder without reading its weights (mlx-lm's loader, `lazy=True`).

    Raises UserError when mlx-lm cannot build the architecture.
    """
    mlx_core()
    from mlx.utils import tree_flatten, tree_map
    from mlx_lm.utils import load_model

    import mlx.core as mx

    try:
        model, config = load_model(Path(path), lazy=True)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(f"base model {path}: mlx-lm cannot load it ({e})") from None
    tensors = dict(tree_flatten(model.parameters()))
    # The module tree keeps only structure from here on; the tensors live in `tensors`
    # alone, so each one is released as soon as it has been written.
    model.update(tree_map(lambda _: mx.array([]), model.parameters()))
    modules = dict(model.named_modules())
    n_layers = int(config.get("num_hidden_layers") or len({layer_index(n) for n in tensors} - {None}))
    return BaseModel(Path(path), config, modules, tensors, n_layers)


def linear_shape(module, weight) -> tuple[int, int]:
    """(out, in) of a Linear or QuantizedLinear weight."""
    out_dims, in_dims = weight.shape
    bits = getattr(module, "bits", None)
    if bits is not None and "scales" in module:
        in_dims = in_dims * 32 // bits
    return out_dims, in_dims


def check_adapter_fits(adapter: LoraAdapter, base: BaseModel, base_name: str) -> None:
    """Every adapted module must be a linear layer of the base with matching shapes.

    Raises one UserError naming each key that does not fit and why.
    """
    import mlx.nn as nn

    problems = []
    for path, (a, b) in adapter.modules.items():
        module = base.modules.get(path)
        weight = base.tensors.get(path + ".weight")
        if module is None or weight is None:
            layer = layer_index(path)
            why = (f"the base has {base.num_layers} layers" if layer is not None and layer >= base.num_layers
                   else "no such layer in the base")
            problems.append(f"{path}.lora_a: {why}")
            continue
        if not isinstance(module, (nn.Linear, nn.QuantizedLinear)):
            problems.append(f"{path}: a {type(module).__name__}, not a linear layer")
            continue
        out_dims, in_dims = linear_shape(module, weight)
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            problems.append(f"{path}: lora_a {tuple(a.shape)} and lora_b {tuple(b.shape)} do not chain")
        elif a.shape[0] != in_dims or b.shape[1] != out_dims:
            problems.append(f"{path}: adapter maps {a.shape[0]} -> {b.shape[1]} features, "
                            f"the base layer {in_dims} -> {out_dims}")
    if problems:
        shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
        raise UserError(f"the adapter does not fit base model {base_name} (was it trained on another model?):\n  "
                        + "\n  ".join(shown))


# --- planning the output tensors ---------------------------------------------------------------------

@dataclass
class TensorGroup:
    """The output tensors of one module (written together: a quantized weight's three parts
    come out of one `mx.quantize` call), still lazy until written."""

    module: str
    tensors: list  # [(name, lazy mx.array)]
    action: str  # "fused", "quantized", "fused+quantized", "dequantized", "copied"


def plan_tensors(base: BaseModel, adapter: LoraAdapter | None, quant: Quantization | None) -> list[TensorGroup]:
    """Lazy output tensors, grouped by module, in name order. Nothing is read or computed yet;
    `base.tensors` is handed over (emptied), so each base tensor is freed once its output is written.

    Per module: merge the LoRA update if the adapter has one for it
    (dequantizing a quantized base first); then quantize with `quant` where
    the module type allows it (linear and embedding weights whose width
    divides by the group size, as mlx-lm's `quantize_model` does). A module
    already quantized exactly as asked and not adapted is copied unchanged,
    so re-exporting a quantized model loses nothing.
    """
    import mlx.core as mx

    lora = adapter.modules if adapter else {}
    # Take the only references to the base's tensors: an array MLX has evaluated keeps its data while
    # anything refers to it, so leaving them in `base.tensors` would pile the whole base up in memory.
    tensors, base.tensors = base.tensors, {}
    by_module: dict[str, list[str]] = {}
    for name in tensors:
        by_module.setdefault(name.rpartition(".")[0], []).append(name)
    groups = []
    for path in sorted(by_module):
        names = sorted(by_module[path])
        module = base.modules.get(path)
        t = {n.rpartition(".")[2]: tensors[n] for n in names}
        is_quantized = "scales" in t and hasattr(module, "bits")
        quantizable = is_quantized or (module is not None and hasattr(module, "to_quantized"))
        if not quantizable or "weight" not in t:
            groups.append(TensorGroup(path, [(n, tensors[n]) for n in names], "copied"))
            continue
        same_quant = (is_quantized and quant is not None and module.bits == quant.bits
                      and module.group_size == quant.group_size and getattr(module, "mode", "affine") == "affine")
        if path not in lora and (same_quant or (not is_quantized and quant is None)):
            groups.append(TensorGroup(path, [(n, tensors[n]) for n in names], "copied"))
            continue
        weight, actions = t["weight"], []
        if is_quantized:
            weight = mx.dequantize(weight, t["scales"], t.get("biases"), group_size=module.group_size,
                                   bits=module.bits, mode=getattr(module, "mode", "affine"))
            actions.append("dequantized")
        if path in lora:
            a, b = lora[path]
            delta = adapter.scale * (b.T.astype(mx.float32) @ a.T.astype(mx.float32))
            weight = (weight.astype(mx.float32) + delta).astype(weight.dtype)
            actions.append("fused")
        out = []
        if quant is not None and weight.shape[-1] % quant.group_size == 0:
            wq, scales, biases = mx.quantize(weight, group_size=quant.group_size, bits=quant.bits)
            out += [(f"{path}.weight", wq), (f"{path}.scales", scales), (f"{path}.biases", biases)]
            actions.append("quantized")
        else:
            out.append((f"{path}.weight", weight))
        # Other parameters of the module (a linear layer's bias) are kept as they are.
        out += [(f"{path}.{leaf}", v) for leaf, v in t.items() if leaf not in ("weight", "scales", "biases")]
        groups.append(TensorGroup(path, sorted(out, key=lambda kv: kv[0]), "+".join(actions) or "copied"))
    return groups


def output_config(config: dict, quant: Quantization | None) -> dict:
    """The base's config.json with the output's quantization (none, or mlx-lm's `quantization` keys)."""
    out = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    if quant is not None:
        out["quantization"] = quant.as_config()
        out["quantization_config"] = quant.as_config()  # what Hugging Face tooling looks for
    return out


# --- writing ---------------------------------------------------------------------------------------

@dataclass
class Deferred:
    """A tensor known by shape and dtype now, computed by `make()` only when it is written
    (for values MLX cannot express lazily, such as numpy dequantization)."""

    shape: tuple
    dtype: object
    make: Callable[[], object]


def write_groups(path: Path, groups: list[TensorGroup], metadata: dict,
                 on_group: Callable[[TensorGroup], None] | None = None) -> dict:
    """Stream the planned tensors into one safetensors file; returns counts for the summary.

    The header is built from the lazy arrays' shapes and dtypes (known without
    computing them); then each group is evaluated, written and dropped, so only
    one group's tensors are in memory at a time. `groups` is emptied as it goes.
    """
    import mlx.core as mx

    header: dict = {"__metadata__": metadata}
    offset = 0
    for g in groups:
        for name, array in g.tensors:
            dtype = str(array.dtype).removeprefix("mlx.core.")
            if dtype not in _ST_DTYPE:
                raise ValueError(f"{name}: dtype {dtype} has no safetensors code")
            nbytes = array.dtype.size * math.prod(array.shape)
            header[name] = {"dtype": _ST_DTYPE[dtype], "shape": list(array.shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8 bytes
    counts: dict[str, int] = {}
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for i in range(len(groups)):
            group, groups[i] = groups[i], None  # drop our reference: written tensors are freed
            arrays = [a.make() if isinstance(a, Deferred) else a for _, a in group.tensors]
            mx.eval(*arrays)
            for array in arrays:
                view = memoryview(array)
                f.write(view if view.c_contiguous else view.tobytes())
            counts[group.action] = counts.get(group.action, 0) + 1
            if on_group is not None:
                on_group(group)
            del group, arrays
    return {"tensors": len(header) - 1, "bytes": offset, "modules": counts}


def write_fused_weights(base: BaseModel, adapter: LoraAdapter | None, quant: Quantization | None,
                        out_file: Path, echo: Callable[[str], None]) -> dict:
    """Fuse (and quantize) `base` + `adapter` into `out_file`, reporting progress per layer.

    The metadata format is "pt" for an unquantized output (transformers
    requires it; it is a Hugging Face checkpoint) and "mlx" for a quantized one.
    """
    n_layers = base.num_layers
    groups = plan_tensors(base, adapter, quant)
    done_layers: set[int] = set()
    per_layer = {}
    for g in groups:
        per_layer.setdefault(layer_index(g.module), []).append(g.module)
    remaining = {k: len(v) for k, v in per_layer.items()}
    adapted = set(adapter.layers()) if adapter else set()

    def report(group: TensorGroup) -> None:
        layer = layer_index(group.module)
        remaining[layer] -= 1
        if layer is not None and remaining[layer] == 0 and layer not in done_layers:
            done_layers.add(layer)
            steps = (["fused"] if layer in adapted else []) + (["quantized"] if quant is not None else [])
            what = " + ".join(steps) or "copied"
            echo(f"  layer {len(done_layers)}/{n_layers} {what}")
        elif layer is None and group.action != "copied":
            echo(f"  {group.module}: {group.action}")

    verb = "fusing" if adapter else "converting"
    echo(f"{verb} {len(groups)} modules ({n_layers} layers){' and quantizing to ' + quant.describe() if quant else ''}"
         f", writing {out_file.name} as it goes")
    stats = write_groups(out_file, groups, {"format": "mlx" if quant else "pt"}, report)
    echo(f"wrote {out_file.name}: {stats['tensors']} tensors, {stats['bytes'] / 1e6:.1f} MB")
    return stats
