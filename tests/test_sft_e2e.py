"""`edgetune sft` through the real CLI on the tiny model: learning, EOS, exact resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

# The CLI training paths run on both backends; torch's skip cleanly without the extra installed.
BACKENDS = ["mlx", pytest.param("torch", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("peft") is None, reason="the torch extra is not installed"))]

PAIRS = [
    ("What is the capital of France?", "Paris is the capital of France."),
    ("Say hello to Ada.", "Hello, Ada!"),
    ("What colour is the sky?", "The sky is blue."),
    ("Name a fruit.", "An apple."),
    ("What is two plus two?", "Two plus two is four."),
    ("Who wrote Hamlet?", "Shakespeare wrote Hamlet."),
]


def write_pairs(path: Path, pairs=PAIRS):
    with open(path, "w") as f:
        for p, c in pairs:
            f.write(json.dumps({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c}]}) + "\n")


def write_recipe(folder: Path, model_dir: Path, backend: str = "mlx", **sft) -> Path:
    write_pairs(folder / "train.jsonl")
    write_pairs(folder / "eval.jsonl", PAIRS[:2])
    settings = {"lora": {"rank": 8, "alpha": 16}, "steps": 12, "batch_size": 2, "learning_rate": 3e-3,
                "max_seq_len": 128, "save_every": 4, "eval_every": 0, "log_every": 1, **sft}
    recipe = {"model": str(model_dir), "backend": backend, "output": str(folder / "run"),
              "data": {"train": ["train.jsonl"], "eval": ["eval.jsonl"]}, "sft": settings}
    path = folder / "recipe.yaml"
    path.write_text(json.dumps(recipe))  # JSON is valid YAML
    return path


def edgetune(*args, **kw):
    return subprocess.run([sys.executable, "-m", "edgetune.cli", *args], capture_output=True, text=True, **kw)


def losses(run: Path) -> list[float]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r]


def adapter(run: Path) -> dict:
    from edgetune.runtime import mlx_core

    mx = mlx_core()
    return {k: np.array(v) for k, v in mx.load(str(run / "adapter" / "adapters.safetensors")).items()}


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_sft_learns_answers_that_mlx_lm_generate_reproduces_and_stops(tmp_path, tiny_model_dir, backend):
    # On torch this is also the crossing-over check: mlx_lm reads the torch-trained adapter.
    recipe = write_recipe(tmp_path, tiny_model_dir, backend, steps=200, batch_size=6, packing=False,
                          lora={"rank": 16, "alpha": 32}, learning_rate=1e-3, save_every=0, log_every=25)
    res = edgetune("sft", str(recipe))
    assert res.returncode == 0, res.stderr
    assert "SFT finished" in res.stderr and "tok/s" in res.stderr and "ETA" in res.stderr

    from mlx_lm import generate, load

    model, tokenizer = load(str(tiny_model_dir), adapter_path=str(tmp_path / "run" / "adapter"))
    for prompt, answer in PAIRS:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        out = generate(model, tokenizer, prompt=text, max_tokens=40)
        # Exact: the answer and nothing after it, so the end-of-turn token was learned.
        assert out == answer, (prompt, out)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["final_loss"] < 0.1 < summary["first_loss"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_sigkill_after_checkpoint_then_resume_matches_uninterrupted_run(tmp_path, tiny_model_dir, backend):
    ref_dir, killed_dir = tmp_path / "ref", tmp_path / "killed"
    ref_dir.mkdir(), killed_dir.mkdir()
    common = {"steps": 40, "lora": {"rank": 8, "alpha": 16, "dropout": 0.1}, "lr_schedule": "cosine",
              "warmup_steps": 3, "grad_accumulation": 2, "batch_size": 1, "packing": True}
    ref = edgetune("sft", str(write_recipe(ref_dir, tiny_model_dir, backend, **common)))
    assert ref.returncode == 0, ref.stderr

    recipe = write_recipe(killed_dir, tiny_model_dir, backend, **common)
    proc = subprocess.Popen([sys.executable, "-m", "edgetune.cli", "sft", str(recipe)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ckpts = killed_dir / "run" / "checkpoints"
    deadline = time.time() + 300
    while not (ckpts / "step-0000008").exists():
        assert proc.poll() is None, "run ended before it could be killed: " + proc.stderr.read()
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed_dir / "run" / "adapter").exists()

    resumed = edgetune("sft", str(recipe), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from step-0000008" in resumed.stderr
    np.testing.assert_allclose(losses(killed_dir / "run"), losses(ref_dir / "run"), rtol=0, atol=1e-6)
    a, b = adapter(killed_dir / "run"), adapter(ref_dir / "run")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-6, err_msg=k)


@pytest.mark.slow
def test_resume_skips_a_truncated_checkpoint_with_a_warning(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path, tiny_model_dir, steps=8)
    assert edgetune("sft", str(recipe)).returncode == 0
    newest = tmp_path / "run" / "checkpoints" / "step-0000008"
    blob = (newest / "adapters.safetensors").read_bytes()
    (newest / "adapters.safetensors").write_bytes(blob[:100])
    res = edgetune("sft", str(recipe), "--resume", "--set", "sft.steps=10")
    assert res.returncode == 0, res.stderr
    assert "skipping damaged checkpoint" in res.stderr and "step-0000008" in res.stderr
    assert "resuming from step-0000004" in res.stderr


def test_misspelt_recipe_key_is_named_without_traceback(tmp_path):
    (tmp_path / "r.yaml").write_text("model: ./m\noutput: run\ndata: d\nsft:\n  steps: 3\n  learnig_rate: 0.1\n")
    res = edgetune("sft", str(tmp_path / "r.yaml"))
    assert res.returncode == 2
    assert "sft.learnig_rate" in res.stderr and "learning_rate" in res.stderr
    assert "Traceback" not in res.stderr


def test_existing_run_folder_is_not_overwritten_without_resume_or_force(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path, tiny_model_dir, steps=2)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("precious")
    res = edgetune("sft", str(recipe))
    assert res.returncode == 2 and "--resume" in res.stderr and "--force" in res.stderr
    assert (tmp_path / "run" / "keep.txt").read_text() == "precious"
