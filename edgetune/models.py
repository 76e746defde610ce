"""Loading base models for training: hub ids or local folders, optional QLoRA.

Hub ids go through huggingface-hub and fetch only weights, config and
tokenizer files. Custom model code (`trust_remote_code`) is refused unless
the recipe asks for it, because it runs arbitrary Python from the hub.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgetune.errors import UserError
from edgetune.runtime import mlx_core

# Only what loading needs: no pickles, no custom code unless allowed.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
QUANTIZE_BITS = {"q4": 4, "q8": 8}


@dataclass
class LoadedModel:
    model: object  # mlx.nn.Module
    tokenizer: object  # mlx_lm TokenizerWrapper
    path: Path
    config: dict
    dtype: str  # compute dtype chosen for training, with the reason in `why_dtype`
    why_dtype: str


def resolve_model_path(name_or_path: str, revision: str | None = None,
                       trust_remote_code: bool = False) -> Path:
    """A local folder as is, else a hub snapshot of the files training needs."""
    local = Path(name_or_path).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise UserError(f"{local}: not a model folder (no config.json)")
        path = local
    elif name_or_path.startswith((".", "/", "~")):
        raise UserError(f"model {name_or_path}: no such folder")
    else:
        from huggingface_hub import snapshot_download

        patterns = HUB_PATTERNS + (["*.py"] if trust_remote_code else [])
        try:
            path = Path(snapshot_download(name_or_path, revision=revision, allow_patterns=patterns))
        except Exception as e:  # network, auth, unknown repo: all user-fixable
            raise UserError(
                f"model {name_or_path}: could not fetch from the Hugging Face hub ({type(e).__name__}: {e}). "
                "Check the id, your network and HF_TOKEN, or point `model:` at a local folder."
            ) from None
    config = json.loads((path / "config.json").read_text())
    if (config.get("auto_map") or config.get("model_file")) and not trust_remote_code:
        raise UserError(
            f"model {name_or_path}: its config asks to run custom code from the repository; "
            "set `trust_remote_code: true` in the recipe only if you trust it"
        )
    return path


def training_dtype(mx) -> tuple[object, str]:
    """float32 on the CPU (bf16 matmul is very slow on MLX's CPU backend), else keep bf16/fp16."""
    if mx.default_device() == mx.cpu or not mx.metal.is_available():
        return mx.float32, "CPU device: float32 (bf16 matmul is slow on MLX's CPU backend)"
    return None, "GPU device: weights keep their stored dtype"


def load_for_training(name_or_path: str, quantize: str | None = None, revision: str | None = None,
                      trust_remote_code: bool = False) -> LoadedModel:
    """Load model + tokenizer, cast for the device, optionally quantize (QLoRA)."""
    mx = mlx_core()
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model, load_tokenizer, quantize_model

    path = resolve_model_path(name_or_path, revision, trust_remote_code)
    try:
        model, config = load_model(path, lazy=True, trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise UserError(f"model {name_or_path}: {e}") from None
    tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))

    already_quantized = "quantization" in config
    dtype, why = training_dtype(mx)
    if dtype is not None:
        # Cast only float parameters that are not quantized tensors' packed data.
        params = dict(tree_flatten(model.parameters()))
        cast = [(k, v.astype(dtype)) for k, v in params.items()
                if mx.issubdtype(v.dtype, mx.floating) and v.dtype != dtype]
        if cast:
            model.load_weights(cast, strict=False)
    if quantize:
        if quantize not in QUANTIZE_BITS:
            raise UserError(f"quantize: {quantize!r} is not one of {', '.join(QUANTIZE_BITS)}")
        if already_quantized:
            why += f"; base already quantized ({config['quantization'].get('bits')}-bit), `quantize` ignored"
        else:
            model, config = quantize_model(model, config, group_size=64, bits=QUANTIZE_BITS[quantize])
            why += f"; base quantized to {QUANTIZE_BITS[quantize]}-bit at load (QLoRA)"
    elif already_quantized:
        why += f"; base is {config['quantization'].get('bits')}-bit quantized (QLoRA)"
    mx.eval(model.parameters())
    return LoadedModel(model, tokenizer, path, config, str(dtype or "stored"), why)


def load_recipe_model(recipe, echo) -> LoadedModel:
    """Load the recipe's base model for a training stage and say what was chosen and why."""
    from edgetune.runtime import blas_info

    loaded = load_for_training(recipe.model, recipe.quantize, recipe.revision, recipe.trust_remote_code)
    echo(f"model: {recipe.model} ({loaded.config.get('model_type')}); {loaded.why_dtype}; BLAS: {blas_info()['why']}")
    return loaded
