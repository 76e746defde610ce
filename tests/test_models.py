"""Model loading: local folders, hub ids (offline here), remote-code refusal, QLoRA."""

import json
import shutil
import subprocess
import sys

import pytest

from edgetune.errors import UserError
from edgetune.models import load_for_training, resolve_model_path


def test_missing_local_folder_is_named(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        resolve_model_path(str(tmp_path / "nope"))


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        resolve_model_path(str(tmp_path))


def test_hub_id_goes_through_huggingface_hub_and_fails_clearly_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # empty cache: nothing to find offline
    with pytest.raises(UserError) as e:
        resolve_model_path("edgetune-test/does-not-exist")
    assert "Hugging Face hub" in str(e.value) and "local folder" in str(e.value)


def test_remote_code_is_refused_unless_trusted(tmp_path, tiny_model_dir):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="trust_remote_code"):
        resolve_model_path(str(folder))
    assert resolve_model_path(str(folder), trust_remote_code=True) == folder


def test_quantize_at_load_gives_a_qlora_base(tiny_model_dir):
    import mlx.nn as nn

    loaded = load_for_training(str(tiny_model_dir), quantize="q4")
    q = loaded.model.layers[0].self_attn.q_proj
    assert isinstance(q, nn.QuantizedLinear) and q.bits == 4
    assert "QLoRA" in loaded.why_dtype


def test_bad_quantize_value_is_named(tiny_model_dir):
    with pytest.raises(UserError, match="q4, q8"):
        load_for_training(str(tiny_model_dir), quantize="q3")


@pytest.mark.slow
def test_sft_trains_on_a_prequantized_mlx_folder(tmp_path, tiny_model_dir):
    """An mlx-lm 4-bit folder (as mlx-community ships them) trains as QLoRA and the adapter loads back."""
    q_dir = tmp_path / "q4"
    res = subprocess.run([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(tiny_model_dir),
                          "--mlx-path", str(q_dir), "-q", "--q-bits", "4", "--q-group-size", "64"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    from tests.test_sft_e2e import edgetune, losses, write_recipe

    recipe = write_recipe(tmp_path, q_dir, steps=30, learning_rate=1e-3, lora={"rank": 16, "alpha": 32},
                          batch_size=6, packing=False, log_every=10)
    out = edgetune("sft", str(recipe))
    assert out.returncode == 0, out.stderr
    assert "4-bit quantized (QLoRA)" in out.stderr
    run_losses = losses(tmp_path / "run")
    assert run_losses[-1] < run_losses[0] * 0.8

    from mlx_lm import generate, load

    model, tok = load(str(q_dir), adapter_path=str(tmp_path / "run" / "adapter"))
    assert isinstance(generate(model, tok, prompt="Hi", max_tokens=5), str)
