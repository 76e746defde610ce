"""MLX <-> PEFT adapters on the tiny models: transformers + peft compute what mlx-lm computes,
PEFT -> MLX -> PEFT is bitwise lossless, unsupported PEFT features are refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("peft")  # in the `test` extra; never needed by edgetune itself

PROMPT_IDS = [1022, 5, 100, 200, 300, 1023, 1022, 50, 60, 70, 80]


def export(*args, **kw):
    from edgetune.export.cli import run_export

    return run_export(*args, echo=lambda _: None, **kw)


def mlx_logits(base: Path, adapter: Path | None) -> np.ndarray:
    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(str(base), adapter_path=str(adapter) if adapter else None)
    return np.array(model(mx.array([PROMPT_IDS]))[0])


def peft_logits(base: Path, adapter: Path | None) -> np.ndarray:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return model(torch.tensor([PROMPT_IDS])).logits[0].numpy()


def random_mlx_adapter(folder: Path, base: Path, targets: tuple[str, ...], layers: int | None, seed: int) -> Path:
    """LoRA attached by edgetune with a random non-zero lora_b (a fresh adapter is exactly zero)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm import load

    from edgetune.lora import LoraSpec, adapter_weights, attach_lora, save_adapter

    model, _ = load(str(base))
    cfg = attach_lora(model, LoraSpec(rank=8, alpha=16, targets=targets, layers=layers), seed=seed)
    rng = np.random.default_rng(seed)
    model.update(tree_unflatten([(k, mx.array(rng.normal(0, 0.5, v.shape), dtype=mx.float32))
                                 for k, v in tree_flatten(model.trainable_parameters()) if k.endswith("lora_b")]))
    assert all(np.abs(np.array(v)).max() > 0 for v in adapter_weights(model).values())
    save_adapter(model, cfg, folder, extra_config={"base_model": str(base)})
    return folder


@pytest.mark.parametrize("arch,targets,layers", [
    ("qwen2", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), None),
    ("llama", ("q_proj", "v_proj"), 2),  # untied head, last two of four blocks
])
def test_peft_export_gives_mlx_logits_in_transformers(tmp_path, tiny_model_dir, tiny_llama_dir, arch, targets, layers):
    from safetensors import safe_open

    base = tiny_model_dir if arch == "qwen2" else tiny_llama_dir
    adapter = random_mlx_adapter(tmp_path / "mlx", base, targets, layers, seed=1)
    export(adapter, "peft", tmp_path / "peft")

    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["base_model_name_or_path"]) == ("LORA", 8, 16, str(base))
    assert cfg["target_modules"] == sorted(targets)
    assert cfg["layers_to_transform"] == (None if layers is None else [2, 3])
    with safe_open(tmp_path / "peft" / "adapter_model.safetensors", "np") as f:
        keys = set(f.keys())
        a = f.get_tensor("base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight")
        b = f.get_tensor("base_model.model.model.layers.3.self_attn.v_proj.lora_B.weight")
    assert len(keys) == 2 * len(targets) * (layers or 4)
    assert a.shape == (8, 128) and b.shape == (64, 8)  # [r, in] and [out, r]; v_proj: 2 kv heads x 32

    ref = mlx_logits(base, adapter)
    assert np.abs(ref - mlx_logits(base, None)).max() > 0.1  # the adapter changes the output
    np.testing.assert_allclose(peft_logits(base, tmp_path / "peft"), ref, atol=1e-4, rtol=0)


def make_peft_adapter(folder: Path, base: Path, **lora) -> Path:
    """A PEFT adapter saved by peft itself, with random A and B (init_lora_weights=False)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **lora))
    peft_model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("lora", [
    {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "layers_to_transform": [0, 2]},
    {"r": 8, "lora_alpha": 12, "target_modules": ["o_proj", "up_proj", "down_proj"], "use_rslora": True},
], ids=["layers-0-and-2", "rslora"])
def test_peft_to_mlx_to_peft_is_bitwise_lossless(tmp_path, tiny_llama_dir, lora):
    import torch
    from safetensors.torch import load_file

    original = make_peft_adapter(tmp_path / "peft", tiny_llama_dir, **lora)
    export(original, "adapter", tmp_path / "mlx")
    export(tmp_path / "mlx", "peft", tmp_path / "peft2")

    a, b = load_file(original / "adapter_model.safetensors"), load_file(tmp_path / "peft2" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    before = json.loads((original / "adapter_config.json").read_text())
    after = json.loads((tmp_path / "peft2" / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "layers_to_transform", "use_rslora", "base_model_name_or_path", "lora_dropout"):
        assert after[key] == before[key], key
    assert sorted(after["target_modules"]) == sorted(before["target_modules"])

    # The mlx-lm adapter in between computes what PEFT does: blocks PEFT skips (layer 1 of 0 and 2)
    # get LoRA layers without tensors in mlx-lm, whose zero lora_b adds nothing.
    ref = peft_logits(tiny_llama_dir, original)
    assert np.abs(ref - peft_logits(tiny_llama_dir, None)).max() > 0.1
    np.testing.assert_allclose(mlx_logits(tiny_llama_dir, tmp_path / "mlx"), ref, atol=1e-4, rtol=0)


def test_peft_adapter_merges_into_an_mlx_model(tmp_path, tiny_model_dir):
    from mlx_lm import load

    original = make_peft_adapter(tmp_path / "peft", tiny_model_dir, r=4, lora_alpha=8,
                                 target_modules=["q_proj", "k_proj", "gate_proj"])
    info = export(original, "mlx", tmp_path / "fused", quantize="none")
    assert info["source_kind"] == "peft-adapter" and info["base_model"] == str(tiny_model_dir)
    import mlx.core as mx

    model, _ = load(str(tmp_path / "fused"))
    fused = np.array(model(mx.array([PROMPT_IDS]))[0])
    np.testing.assert_allclose(fused, peft_logits(tiny_model_dir, original), atol=1e-4, rtol=0)


@pytest.mark.parametrize("key,value", [("use_dora", True), ("rank_pattern", {"q_proj": 2}),
                                       ("modules_to_save", ["lm_head"]), ("bias", "all")])
def test_peft_features_mlx_lm_cannot_express_are_refused_by_name(tmp_path, tiny_model_dir, key, value):
    from edgetune.errors import UserError

    original = make_peft_adapter(tmp_path / "peft", tiny_model_dir, r=4, lora_alpha=8, target_modules=["q_proj"])
    cfg = json.loads((original / "adapter_config.json").read_text())
    cfg[key] = value
    (original / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=f"adapter_config.json: cannot convert.*\\n  {key} = "):
        export(original, "adapter", tmp_path / "mlx")
    assert not (tmp_path / "mlx").exists()
