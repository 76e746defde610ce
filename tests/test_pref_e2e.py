"""`edgetune dpo` / `kto` / `orpo` through the real CLI on the tiny model.

The reference log-probs stored by the pre-pass are checked against a fresh,
independent forward (mlx_lm.load + full logits, one row at a time) within 1e-5
plus 2e-7 relative (a float32 sum near -200 has a resolution of 1.5e-5), for
`init_from: base` and for an SFT adapter; DPO from SFT must learn the pairs;
KTO must move desirable up and undesirable down; a SIGKILLed DPO run must
resume to the same adapter.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.test_sft_e2e import adapter, edgetune

SYSTEM = {"role": "system", "content": "You are a terse assistant."}
# (question, chosen, rejected): each prompt is a whole conversation (system + earlier turns).
TRIPLES = [
    ("What is the capital of France?", "Paris.", "I think it might be Lyon, or maybe Paris."),
    ("Say hello to Ada.", "Hello, Ada!", "Greetings to whoever Ada is, I suppose."),
    ("What colour is the sky?", "Blue.", "The sky can be many colours depending on weather."),
    ("Name a fruit.", "An apple.", "There are many fruits, such as bananas."),
    ("What is two plus two?", "Four.", "Two plus two is probably five."),
    ("Who wrote Hamlet?", "Shakespeare.", "Hamlet was written by an unknown author."),
]
COMMON = {"lora": {"rank": 8, "alpha": 16}, "batch_size": 6, "learning_rate": 1e-3, "max_seq_len": 256,
          "save_every": 0, "log_every": 5}


def prompt_of(question: str) -> list[dict]:
    return [SYSTEM, {"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": question}]


def reply(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def write_data(folder: Path) -> None:
    with open(folder / "dpo.jsonl", "w") as f:
        for q, c, r in TRIPLES:
            f.write(json.dumps({"prompt": prompt_of(q), "chosen": reply(c), "rejected": reply(r)}) + "\n")
    with open(folder / "sft.jsonl", "w") as f:
        for q, c, _ in TRIPLES:
            f.write(json.dumps({"messages": prompt_of(q) + reply(c)}) + "\n")
    with open(folder / "kto.jsonl", "w") as f:
        for q, c, r in TRIPLES:
            f.write(json.dumps({"prompt": prompt_of(q), "completion": reply(c), "label": True}) + "\n")
            f.write(json.dumps({"prompt": prompt_of(q), "completion": reply(r), "label": False}) + "\n")


# The CLI training paths run on both backends; torch's skip cleanly without the extra installed.
BACKENDS = ["mlx", pytest.param("torch", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("peft") is None, reason="the torch extra is not installed"))]
# Stored reference vs an independent mlx_lm forward: the same library within 1e-5; torch against
# mlx_lm is a cross-library comparison (float32 sums of ~40 log-probs), within 1e-4.
REF_ATOL = {"mlx": 1e-5, "torch": 1e-4}


def write_recipe(folder: Path, model_dir: Path, stage: str, data: str, backend: str = "mlx", **section) -> Path:
    write_data(folder)
    recipe = {"model": str(model_dir), "backend": backend, "output": str(folder / f"{stage}-run"),
              "data": {"train": [data], "eval": [data]}, stage: {**COMMON, **section}}
    path = folder / f"{stage}.yaml"
    path.write_text(json.dumps(recipe))
    return path


def fresh_logps(model_dir: Path, adapter_path: Path | None, rows: list[tuple[list, list]]) -> np.ndarray:
    """Completion log-prob sums by an independent route: mlx_lm.load, the chat template, the full
    logits of one unpadded row at a time; the completion runs up to its <|im_end|>."""
    from mlx_lm import load

    from edgetune.runtime import mlx_core

    mx = mlx_core()
    model, tok = load(str(model_dir), adapter_path=str(adapter_path) if adapter_path else None)
    model.set_dtype(mx.float32)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    out = []
    for prompt, completion in rows:
        p = tok.encode(tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False))
        full = tok.encode(tok.apply_chat_template(prompt + completion, tokenize=False))
        full = full[: max(i for i, t in enumerate(full) if t == end) + 1]
        logits = model(mx.array([full[:-1]]))[0].astype(mx.float32)
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        picked = np.array(mx.take_along_axis(lp, mx.array(full[1:])[:, None], axis=-1))[:, 0]
        out.append(picked[len(p) - 1:].sum())
    return np.array(out)


def pair_rows() -> list[tuple[list, list]]:
    return [(prompt_of(q), reply(x)) for q, c, r in TRIPLES for x in (c, r)]


def stored_reference(run: Path) -> np.ndarray:
    from edgetune.runtime import mlx_core

    return np.array(mlx_core().load(str(run / "reference_logps.safetensors"))["train"])


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory, tiny_model_dir) -> Path:
    folder = tmp_path_factory.mktemp("sft")
    res = edgetune("sft", str(write_recipe(folder, tiny_model_dir, "sft", "sft.jsonl", steps=20)))
    assert res.returncode == 0, res.stderr
    return folder / "sft-run"


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_dpo_from_sft_adapter_learns_pairs_and_reference_matches_fresh_forward(tmp_path, tiny_model_dir,
                                                                               sft_adapter, backend):
    # The SFT adapter is MLX-trained: on torch this also continues an MLX adapter.
    recipe = write_recipe(tmp_path, tiny_model_dir, "dpo", "dpo.jsonl", backend, steps=12,
                          init_from=str(sft_adapter), beta=0.1)
    res = edgetune("dpo", str(recipe))
    assert res.returncode == 0, res.stderr
    assert "reference train: 12/12 completions scored" in res.stderr and "the dpo.lora keys are ignored" in res.stderr
    run = tmp_path / "dpo-run"
    # The reference is base + SFT adapter, exactly as an independent loader computes it.
    np.testing.assert_allclose(stored_reference(run), fresh_logps(tiny_model_dir, sft_adapter / "adapter",
                                                                  pair_rows()), rtol=2e-7, atol=REF_ATOL[backend])
    recs = [r for r in records(run) if r.get("loss") is not None]
    final_eval = [r["eval"] for r in records(run) if "eval" in r][-1]  # eval split = the training pairs
    assert final_eval["accuracy"] >= 0.95
    assert final_eval["margin"] > recs[0]["margin"] + 1.0
    assert "accuracy" in res.stderr and "margin" in res.stderr  # the progress line shows them
    # The output is an mlx-lm adapter folder with the SFT adapter's shape; the DPO adapter ranks the
    # chosen completion above the rejected one under an independent forward too.
    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert cfg == json.loads((sft_adapter / "adapter" / "adapter_config.json").read_text())
    after = fresh_logps(tiny_model_dir, run / "adapter", pair_rows())
    assert np.all(after[0::2] - after[1::2] > stored_reference(run)[0::2] - stored_reference(run)[1::2])


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_kto_raises_desirable_and_lowers_undesirable_logprobs(tmp_path, tiny_model_dir, backend):
    recipe = write_recipe(tmp_path, tiny_model_dir, "kto", "kto.jsonl", backend, steps=10, batch_size=12, beta=0.5)
    res = edgetune("kto", str(recipe))
    assert res.returncode == 0, res.stderr
    run = tmp_path / "kto-run"
    rows = [(prompt_of(q), reply(x)) for q, c, r in TRIPLES for x in (c, r)]  # kto.jsonl order: up, down
    ref = stored_reference(run)
    np.testing.assert_allclose(ref, fresh_logps(tiny_model_dir, None, rows), rtol=2e-7, atol=REF_ATOL[backend])
    after = fresh_logps(tiny_model_dir, run / "adapter", rows)
    assert np.all(after[0::2] > ref[0::2]), (after, ref)
    assert np.all(after[1::2] < ref[1::2]), (after, ref)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_sigkilled_dpo_run_resumes_to_the_same_adapter_and_reuses_its_reference(tmp_path, tiny_model_dir, backend):
    ref_dir, killed_dir = tmp_path / "ref", tmp_path / "killed"
    ref_dir.mkdir(), killed_dir.mkdir()
    common = {"steps": 8, "batch_size": 2, "grad_accumulation": 2, "save_every": 4, "lr_schedule": "cosine",
              "warmup_steps": 2, "lora": {"rank": 8, "alpha": 16, "dropout": 0.1}, "loss": "sigmoid",
              "label_smoothing": 0.1, "log_every": 1}
    ref = edgetune("dpo", str(write_recipe(ref_dir, tiny_model_dir, "dpo", "dpo.jsonl", backend, **common)))
    assert ref.returncode == 0, ref.stderr
    # init_from: base -> the reference is the base model itself.
    np.testing.assert_allclose(stored_reference(ref_dir / "dpo-run"), fresh_logps(tiny_model_dir, None, pair_rows()),
                               rtol=2e-7, atol=REF_ATOL[backend])

    recipe = write_recipe(killed_dir, tiny_model_dir, "dpo", "dpo.jsonl", backend, **common)
    proc = subprocess.Popen([sys.executable, "-m", "edgetune.cli", "dpo", str(recipe)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ckpts = killed_dir / "dpo-run" / "checkpoints"
    deadline = time.time() + 300
    while not (ckpts / "step-0000004").exists():
        assert proc.poll() is None, "run ended before it could be killed: " + proc.stderr.read()
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed_dir / "dpo-run" / "adapter").exists()

    resumed = edgetune("dpo", str(recipe), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "reference log-probs: reusing" in resumed.stderr and "resuming from step-" in resumed.stderr
    a, b = adapter(killed_dir / "dpo-run"), adapter(ref_dir / "dpo-run")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-6, err_msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_orpo_learns_pairs_without_a_reference(tmp_path, tiny_model_dir, backend):
    res = edgetune("orpo", str(write_recipe(tmp_path, tiny_model_dir, "orpo", "dpo.jsonl", backend, steps=8, beta=0.5,
                                          learning_rate=2e-3)))
    assert res.returncode == 0, res.stderr
    run = tmp_path / "orpo-run"
    assert not (run / "reference_logps.safetensors").exists() and "reference" not in res.stderr.split("ORPO")[0]
    recs = [r for r in records(run) if r.get("loss") is not None]
    assert recs[-1]["loss"] < recs[0]["loss"] and recs[-1]["accuracy"] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("stage,backend", [("dpo", "mlx"), ("kto", "mlx"), pytest.param("dpo", BACKENDS[1].values[0],
                                                                                     marks=BACKENDS[1].marks)])
def test_packed_preference_rows_train_every_item_once_per_epoch_and_learn(tmp_path, tiny_model_dir, sft_adapter,
                                                                          stage, backend):
    """packing: true fills batch_size rows of max_seq_len with whole pairs (completions for KTO):
    several per micro-batch, each once per epoch, and the stage learns as it does unpacked."""
    data = "dpo.jsonl" if stage == "dpo" else "kto.jsonl"
    recipe = write_recipe(tmp_path, tiny_model_dir, stage, data, backend, steps=16, init_from=str(sft_adapter),
                          beta=0.1 if stage == "dpo" else 0.5, packing=True, batch_size=2)
    res = edgetune(stage, str(recipe))
    assert res.returncode == 0, res.stderr
    run = tmp_path / f"{stage}-run"
    recs = [r for r in records(run) if r.get("loss") is not None]
    items = 6 if stage == "dpo" else 12
    per_epoch = json.loads((run / "manifest.json").read_text())["batches_per_epoch"]
    assert f"packing: {per_epoch} micro-batches of 2 x 256 positions per epoch" in res.stderr
    assert per_epoch < items / 2  # several items share a micro-batch
    assert sum(r["items"] for r in recs[:per_epoch]) == items  # one epoch: every item once
    final_eval = [r["eval"] for r in records(run) if "eval" in r][-1]
    if stage == "dpo":
        assert final_eval["accuracy"] >= 0.95 and final_eval["margin"] > recs[0]["margin"] + 1.0
    else:  # thumbs-up completions end well above thumbs-down ones (both start at 0)
        assert final_eval["reward_desirable"] > final_eval["reward_undesirable"] + 1.0


def test_packed_pairs_that_cannot_share_one_row_are_named_before_the_reference_pass(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path, tiny_model_dir, "dpo", "dpo.jsonl", steps=2, packing=True, batch_size=1,
                          max_seq_len=64)
    res = edgetune("dpo", str(recipe))
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "dpo.jsonl:1: train pair of" in res.stderr and "set dpo.batch_size to 2 or more" in res.stderr
    assert "reference" not in res.stderr
