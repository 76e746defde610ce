"""`edgetune run`: every stage in one run folder; unchanged stages skipped, an interrupted one resumed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgetune.demo import sample_log


def write_run_recipe(folder: Path, model_dir: Path, sft_steps: int = 4, dpo: bool = True,
                     export: dict | None = None, backend: str = "mlx") -> Path:
    recipe = {
        "model": str(model_dir),
        "backend": backend,
        "output": str(folder / "run"),
        "feedback": {"logs": [str(sample_log())], "eval_fraction": 0.1},
        "sft": {"lora": {"rank": 4, "alpha": 8}, "steps": sft_steps, "batch_size": 2, "max_seq_len": 192,
                "learning_rate": 1e-3, "save_every": 2, "log_every": 1},
    }
    if dpo:
        recipe["dpo"] = {"steps": 2, "batch_size": 2, "max_seq_len": 192, "learning_rate": 1e-4, "log_every": 1}
    if export:
        recipe["export"] = export
    path = folder / "recipe.yaml"
    path.write_text(json.dumps(recipe))
    return path


def edgetune(*args, **kw):
    return subprocess.run([sys.executable, "-m", "edgetune.cli", *args], capture_output=True, text=True, **kw)


def ledger(run: Path) -> dict:
    return json.loads((run / "pipeline.json").read_text())["stages"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["mlx", pytest.param("torch", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("peft") is None, reason="the torch extra is not installed"))])
def test_run_builds_data_trains_sft_then_dpo_and_skips_unchanged_stages(tmp_path, tiny_model_dir, backend):
    recipe = write_run_recipe(tmp_path, tiny_model_dir, backend=backend)
    first = edgetune("run", str(recipe))
    assert first.returncode == 0, first.stderr
    run = tmp_path / "run"
    stages = ledger(run)
    assert list(stages) == ["data", "sft", "dpo"] and all(s["status"] == "done" for s in stages.values())
    assert (run / "data" / "train" / "sft.jsonl").exists()
    assert (run / "sft" / "adapter" / "adapters.safetensors").exists()
    # DPO continued the SFT adapter (the usual recipe), not a fresh LoRA.
    dpo_manifest = json.loads((run / "dpo" / "manifest.json").read_text())
    assert dpo_manifest["recipe"]["dpo"]["init_from"] == str(run / "sft" / "adapter")
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["stages"] == ["data", "sft", "dpo"] and summary["adapter"] == str(run / "dpo" / "adapter")
    assert "mlx_lm.generate" in first.stderr

    adapter_bytes = (run / "dpo" / "adapter" / "adapters.safetensors").read_bytes()
    again = edgetune("run", str(recipe))
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("unchanged since the last run, skipped") == 3
    assert (run / "dpo" / "adapter" / "adapters.safetensors").read_bytes() == adapter_bytes

    # A changed SFT section re-runs SFT and everything after it, not the data build.
    changed = edgetune("run", str(recipe), "--set", "sft.steps=6")
    assert changed.returncode == 0, changed.stderr
    assert changed.stderr.count("skipped") == 1 and "== 1/3 data: unchanged" in changed.stderr
    assert json.loads((run / "sft" / "summary.json").read_text())["steps"] == 6
    assert json.loads((run / "sft" / "manifest.json").read_text())["backend"]["name"] == backend
    if backend == "mlx" and __import__("importlib").util.find_spec("peft") is not None:
        # Another backend retrains (it cannot resume MLX's optimizer state); the data stays.
        switched = edgetune("run", str(recipe), "--set", "sft.steps=6", "--set", "backend=torch")
        assert switched.returncode == 0, switched.stderr
        assert switched.stderr.count("skipped") == 1 and "== 1/3 data: unchanged" in switched.stderr
        assert json.loads((run / "dpo" / "manifest.json").read_text())["backend"]["name"] == "torch"


@pytest.mark.slow
def test_run_killed_in_sft_resumes_it_and_skips_the_finished_data_stage(tmp_path, tiny_model_dir):
    recipe = write_run_recipe(tmp_path, tiny_model_dir, sft_steps=30, dpo=False,
                              export={"formats": ["mlx"], "quantize": {"mlx": "4bit"}})
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "edgetune.cli", "run", str(recipe)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (run / "sft" / "checkpoints" / "step-0000004").exists():
        assert proc.poll() is None, "run ended before it could be killed: " + proc.stderr.read()
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ledger(run)["sft"]["status"] == "running" and not (run / "sft" / "adapter").exists()

    resumed = edgetune("run", str(recipe))
    assert resumed.returncode == 0, resumed.stderr
    assert "== 1/3 data: unchanged since the last run, skipped" in resumed.stderr
    assert "resuming the interrupted stage" in resumed.stderr and "resuming from step-" in resumed.stderr
    assert ledger(run)["sft"]["status"] == "done" and ledger(run)["export"]["status"] == "done"

    from mlx_lm import generate, load

    model, tokenizer = load(str(run / "export" / "mlx"))  # the fused 4-bit export, unchanged
    assert json.loads((run / "export" / "mlx" / "config.json").read_text())["quantization"]["bits"] == 4
    text = generate(model, tokenizer, prompt="Hello", max_tokens=8)
    assert isinstance(text, str) and text  # a 4-bit 0.7M-parameter model: any tokens, not good ones


def test_feedback_only_recipe_refuses_single_stage_commands(tmp_path, tiny_model_dir):
    recipe = write_run_recipe(tmp_path, tiny_model_dir, dpo=False)
    out = edgetune("sft", str(recipe))
    assert out.returncode == 2 and "edgetune run RECIPE" in out.stderr and "Traceback" not in out.stderr


def test_recipe_with_both_feedback_and_data_is_rejected(tmp_path, tiny_model_dir):
    recipe = write_run_recipe(tmp_path, tiny_model_dir, dpo=False)
    out = edgetune("run", str(recipe), "--set", "data=./built")
    assert out.returncode == 2 and "give either feedback:" in out.stderr


@pytest.mark.slow
def test_failing_gate_stops_the_run_before_export(tmp_path, tiny_model_dir):
    recipe = write_run_recipe(tmp_path, tiny_model_dir, dpo=False,
                              export={"formats": ["mlx"], "quantize": {"mlx": "none"}})
    raw = json.loads(recipe.read_text())
    # An impossible threshold: 4 SFT steps cannot lower the eval loss by 100 nats.
    raw["eval"] = {"builtin_suite": False, "generations": 0, "gate": {"min_eval_loss_drop": 100.0}}
    recipe.write_text(json.dumps(raw))
    out = edgetune("run", str(recipe))
    assert out.returncode == 1, out.stderr
    assert "FAIL" in out.stderr and "eval loss" in out.stderr and "Traceback" not in out.stderr
    run = tmp_path / "run"
    assert not (run / "export").exists() and "export" not in ledger(run)
    assert (run / "eval" / "eval.json").exists()  # the verdict is written before the run stops
