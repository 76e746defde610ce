"""`edgetune export` to MLX on the tiny model: fused = base + adapter, quantized exports that
mlx-lm loads and serves, quantized bases, the model card, user errors, bounded memory."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.test_sft_e2e import PAIRS  # the same six answers the SFT tests teach

PROMPTS = ["Say hello to Ada.", "What colour is the sky?", "Who wrote Hamlet?"]


def write_rows(path: Path, pairs) -> None:
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p}, {"role": "assistant",
                                                                                       "content": c}]}) + "\n"
                            for p, c in pairs))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A real `edgetune sft` run on the tiny model: 30 steps, so the adapter is far from zero."""
    from edgetune.recipe import load_recipe
    from edgetune.sft import run_sft

    folder = tmp_path_factory.mktemp("sft")
    write_rows(folder / "train.jsonl", PAIRS)
    write_rows(folder / "eval.jsonl", PAIRS)
    recipe = {"model": str(tiny_model_dir), "output": str(folder / "run"),
              "data": {"train": ["train.jsonl"], "eval": ["eval.jsonl"]},
              "sft": {"lora": {"rank": 8, "alpha": 16}, "steps": 30, "batch_size": 3, "learning_rate": 1e-3,
                      "max_seq_len": 128, "save_every": 0, "log_every": 10}}
    (folder / "recipe.yaml").write_text(json.dumps(recipe))
    run_sft(load_recipe(folder / "recipe.yaml"), echo=lambda _: None)
    return folder / "run"


def export(*args, **kw):
    from edgetune.export.cli import run_export

    return run_export(*args, echo=lambda _: None, **kw)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "edgetune.cli", "export", *map(str, args)],
                          capture_output=True, text=True)


def chat_prompt(tokenizer, text: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         tokenize=False)


def logits(model, ids) -> np.ndarray:
    import mlx.core as mx

    return np.array(model(mx.array([ids]))[0].astype(mx.float32))


def greedy(model, tokenizer, text: str, n: int = 24) -> str:
    from mlx_lm import generate

    return generate(model, tokenizer, prompt=chat_prompt(tokenizer, text), max_tokens=n)


def test_unquantized_export_equals_base_plus_adapter(tmp_path, trained_run, tiny_model_dir):
    from mlx_lm import load

    info = export(trained_run, "mlx", tmp_path / "out", quantize="none")
    out = tmp_path / "out"
    ref, tok = load(str(tiny_model_dir), adapter_path=str(trained_run / "adapter"))
    fused, fused_tok = load(str(out))
    base, _ = load(str(tiny_model_dir))
    ids = tok.encode(chat_prompt(tok, PROMPTS[0]) + "Hello")
    # The adapter matters (else the comparison below proves nothing) and the merge reproduces it.
    assert np.abs(logits(base, ids) - logits(ref, ids)).max() > 0.1
    np.testing.assert_allclose(logits(fused, ids), logits(ref, ids), atol=1e-4, rtol=0)
    for prompt in PROMPTS:
        assert greedy(fused, fused_tok, prompt) == greedy(ref, tok, prompt)

    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).read_bytes() == (tiny_model_dir / name).read_bytes()
    assert info["check"]["ok"] and abs(info["check"]["increase"]) < 1e-4
    assert json.loads((out / "export.json").read_text())["files"]["model.safetensors"] > 0


def test_unquantized_export_is_a_hugging_face_checkpoint(tmp_path, trained_run):
    """The GGUF writer and transformers read the unquantized export: same logits as mlx-lm."""
    import torch
    from mlx_lm import load
    from transformers import AutoModelForCausalLM

    export(trained_run, "mlx", tmp_path / "out", quantize="none", check=False)
    model, tok = load(str(tmp_path / "out"))
    ids = tok.encode(chat_prompt(tok, PROMPTS[1]))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    with torch.no_grad():
        hf_logits = hf(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(hf_logits, logits(model, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("quantize,group_size,bound", [("8bit", 64, 0.02), ("4bit", 64, 0.25), ("4bit", 32, 0.25)])
def test_quantized_export_loads_generates_and_keeps_eval_loss(tmp_path, trained_run, quantize, group_size, bound):
    import mlx.core as mx
    from mlx_lm import load

    info = export(trained_run, "mlx", tmp_path / "out", quantize=quantize, group_size=group_size)
    out = tmp_path / "out"
    bits = int(quantize[0])
    assert json.loads((out / "config.json").read_text())["quantization"] == {"group_size": group_size, "bits": bits,
                                                                             "mode": "affine"}
    tensors = mx.load(str(out / "model.safetensors"))
    scales = tensors["model.layers.0.self_attn.q_proj.scales"]
    assert tensors["model.layers.0.self_attn.q_proj.weight"].dtype == mx.uint32
    assert scales.shape == (128, 128 // group_size)
    model, tok = load(str(out))
    for prompt in PROMPTS:
        assert greedy(model, tok, prompt).strip()
    check = info["check"]
    assert check["examples"] == len(PAIRS) and check["ok"] == (check["increase"] <= 0.05)
    assert abs(check["increase"]) < bound, {k: check[k] for k in ("reference", "exported", "increase")}
    card = (out / "README.md").read_text()
    assert f"this export ({bits}-bit (group size {group_size}, affine))" in card
    assert f"{check['exported']['loss']:.4f}" in card


def test_loss_above_the_limit_is_a_warning_in_card_and_summary(tmp_path, trained_run):
    info = export(trained_run, "mlx", tmp_path / "out", quantize="4bit", max_loss_increase=0.0)
    increase = info["check"]["increase"]
    assert increase > 0 and info["check"]["ok"] is False
    assert any("--max-loss-increase 0.0" in w for w in info["warnings"])
    assert "> **Warning:** quantization raised the eval loss" in (tmp_path / "out" / "README.md").read_text()


def test_fuse_into_quantized_base_matches_mlx_lm_fuse(tmp_path, tiny_model_dir):
    """QLoRA on a 4-bit base folder: dequantize -> merge -> re-quantize, layer by layer; layers the
    adapter does not touch are copied bit for bit."""
    import mlx.core as mx
    from mlx.utils import tree_unflatten
    from mlx_lm import load

    from edgetune.lora import LoraSpec, attach_lora, save_adapter

    qbase = tmp_path / "q4-base"
    info = export(tiny_model_dir, "mlx", qbase, quantize="4bit")
    assert info["source_kind"] == "model" and info["check"]["skipped"].startswith("no eval data")
    model, tok = load(str(qbase))
    cfg = attach_lora(model, LoraSpec(rank=4, alpha=8, layers=2), seed=0)
    rng = np.random.default_rng(0)
    model.update(tree_unflatten([(f"model.layers.{i}.{k}.lora_b", mx.array(rng.normal(0, 0.5, v.lora_b.shape),
                                                                            dtype=mx.float32))
                                 for i in (2, 3) for k, v in model.layers[i].named_modules()
                                 if hasattr(v, "lora_b")]))
    save_adapter(model, cfg, tmp_path / "adapter", extra_config={"base_model": str(qbase)})

    export(tmp_path / "adapter", "mlx", tmp_path / "fused", quantize="4bit", check=False)
    ours, _ = load(str(tmp_path / "fused"))
    theirs, _ = load(str(qbase), adapter_path=str(tmp_path / "adapter"))
    ids = tok.encode(chat_prompt(tok, PROMPTS[0]))
    unfused = logits(theirs, ids)
    theirs.update_modules(tree_unflatten([(n, m.fuse()) for n, m in theirs.named_modules() if hasattr(m, "fuse")]))
    np.testing.assert_allclose(logits(ours, ids), logits(theirs, ids), atol=1e-4, rtol=0)
    # Re-quantizing costs something, but far less than the adapter's own effect.
    base_logits = logits(load(str(qbase))[0], ids)
    assert np.abs(logits(ours, ids) - unfused).max() < 0.25 * np.abs(unfused - base_logits).max()

    before, after = mx.load(str(qbase / "model.safetensors")), mx.load(str(tmp_path / "fused" / "model.safetensors"))
    assert before.keys() == after.keys()
    for name in before:
        same = np.array_equal(np.array(before[name]), np.array(after[name]))
        # Linear biases (q/k/v `.bias`) and norms are not adapted; weights, scales and biases of
        # the quantized linear layers in the two adapted blocks are.
        adapted = (name.startswith(("model.layers.2.", "model.layers.3.")) and "norm" not in name
                   and not name.endswith(".bias"))
        assert same != adapted, name


def test_cli_prints_progress_and_writes_card_with_provenance(tmp_path, trained_run):
    res = cli(trained_run, "--format", "mlx", "--quantize", "8bit", "--out", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    assert "layer 4/4 fused + quantized" in res.stderr and "export finished: mlx, 8-bit" in res.stderr
    card = (tmp_path / "out" / "README.md").read_text()
    manifest = json.loads((trained_run / "manifest.json").read_text())
    for path, digest in manifest["data_files"].items():
        assert f"| `{path}` | `{digest}` |" in card
    assert "## Quantization check" in card and "library_name: mlx" in card and "steps: 30" in card
    summary = json.loads((tmp_path / "out" / "export.json").read_text())
    assert summary["format"] == "mlx" and summary["base_model"] == manifest["recipe"]["model"]
    assert summary["size_bytes"] == sum(summary["files"].values())
    umask = os.umask(0)
    os.umask(umask)
    for file in (tmp_path / "out").iterdir():  # not the 0600 of atomic writes' temp files: meant to be shared
        assert file.stat().st_mode & 0o777 == 0o666 & ~umask, file.name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlx_lm_server_serves_the_export_and_stops_at_end_of_turn(tmp_path, trained_run):
    export(trained_run, "mlx", tmp_path / "out", quantize="8bit", check=False)
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlx_lm", "server", "--model", str(tmp_path / "out"),
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        body = json.dumps({"messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 40,
                           "temperature": 0}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        deadline = time.time() + 60
        while True:
            try:
                reply = json.loads(urllib.request.urlopen(request, timeout=30).read())
                break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()
                assert time.time() < deadline, "mlx_lm.server did not answer within 60 s"
                time.sleep(0.2)
    finally:
        server.terminate()
        server.wait(timeout=30)
    choice = reply["choices"][0]
    assert choice["message"]["content"].strip()
    assert choice["finish_reason"] == "stop", choice  # stopped at <|im_end|>, not at max_tokens


# --- user errors: exit 2, a message naming what to do, no traceback ---------------------------------

def test_existing_output_is_refused_without_force_and_replaced_with_it(tmp_path, trained_run):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    res = cli(trained_run, "--format", "peft", "--out", out)
    assert res.returncode == 2 and "--force" in res.stderr and "Traceback" not in res.stderr
    assert (out / "keep.txt").read_text() == "precious"
    res = cli(trained_run, "--format", "peft", "--out", out, "--force")
    assert res.returncode == 0, res.stderr
    assert not (out / "keep.txt").exists() and (out / "adapter_model.safetensors").is_file()


def test_unknown_source_kind_says_what_is_expected(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hi")
    for source in (tmp_path / "empty", tmp_path / "notes.txt"):
        res = cli(source, "--format", "mlx", "--out", tmp_path / "out")
        assert res.returncode == 2 and "Traceback" not in res.stderr
        assert "run folder (manifest.json + adapter/)" in res.stderr and "model folder (config.json" in res.stderr
    assert not (tmp_path / "out").exists()


def test_adapter_that_does_not_fit_the_base_names_the_keys(tmp_path, trained_run, tiny_model_dir):
    import mlx.core as mx

    bad = tmp_path / "bad-adapter"
    shutil.copytree(trained_run / "adapter", bad)
    weights = dict(mx.load(str(bad / "adapters.safetensors")))
    weights["model.layers.0.mlp.up_proj.lora_a"] = mx.zeros((64, 8))  # the base's up_proj takes 128 inputs
    weights["model.layers.7.self_attn.q_proj.lora_a"] = mx.zeros((128, 8))  # the base has 4 layers
    weights["model.layers.7.self_attn.q_proj.lora_b"] = mx.zeros((8, 128))
    mx.save_safetensors(str(bad / "adapters.safetensors"), weights)
    res = cli(bad, "--format", "mlx", "--base", tiny_model_dir, "--out", tmp_path / "out")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "model.layers.0.mlp.up_proj: adapter maps 64 -> 256 features, the base layer 128 -> 256" in res.stderr
    assert "model.layers.7.self_attn.q_proj.lora_a: the base has 4 layers" in res.stderr


def test_bare_adapter_needs_base_and_run_adapter_finds_it(tmp_path, trained_run, tiny_model_dir):
    # A copied-out adapter finds its base through the `base_model` its training run recorded ...
    copied = tmp_path / "copied"
    shutil.copytree(trained_run / "adapter", copied)
    assert json.loads((copied / "adapter_config.json").read_text())["base_model"] == str(tiny_model_dir)
    assert export(copied, "peft", tmp_path / "out0")["base_model"] == str(tiny_model_dir)
    # ... and one that does not record it (e.g. trained by mlx_lm.lora) asks for --base.
    bare = tmp_path / "bare"
    shutil.copytree(trained_run / "adapter", bare)
    cfg = json.loads((bare / "adapter_config.json").read_text())
    del cfg["base_model"]
    (bare / "adapter_config.json").write_text(json.dumps(cfg))
    res = cli(bare, "--format", "peft", "--out", tmp_path / "out")
    assert res.returncode == 2 and "pass --base" in res.stderr
    # Inside its run folder the adapter finds the base through the run's manifest.
    info = export(trained_run / "adapter", "peft", tmp_path / "out2")
    assert info["base_model"] == str(tiny_model_dir) and info["run"] == str(trained_run)


@pytest.mark.parametrize("args,message", [
    (["--format", "mlx", "--quantize", "3bit"], "for --format mlx choose one of 4bit, 8bit, none"),
    (["--format", "mlx", "--group-size", "48"], "--group-size 48: choose one of 32, 64, 128"),
    (["--format", "peft", "--quantize", "4bit"], "--format peft writes the adapter's tensors as they are"),
])
def test_bad_options_are_named(tmp_path, trained_run, args, message):
    res = cli(trained_run, *args, "--out", tmp_path / "out")
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr


def test_export_recipe_section_defaults_and_errors(tmp_path):
    from edgetune.recipe import RecipeError, load_recipe

    (tmp_path / "ok.yaml").write_text("model: ./m\noutput: run\ndata: d\nexport:\n  formats: [mlx, peft]\n"
                                      "  quantize: {gguf: q4_0}\n")
    cfg = load_recipe(tmp_path / "ok.yaml").export
    assert (cfg.formats, cfg.quantize.mlx, cfg.quantize.gguf, cfg.group_size, cfg.max_loss_increase) == \
        (["mlx", "peft"], "4bit", "q4_0", 64, 0.05)
    (tmp_path / "bad.yaml").write_text("model: ./m\noutput: run\ndata: d\nexport:\n  formats: [mlx, mlx]\n"
                                       "  quantize: {mlx: 3bit}\n  group_size: 48\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(tmp_path / "bad.yaml")
    keys = [k for k, _ in e.value.problems]
    assert keys == ["export.quantize.mlx", "export.group_size", "export.formats"]


# --- memory: a real-shaped model ---------------------------------------------------------------

@pytest.mark.slow
def test_qwen05b_shape_exports_to_q4_in_bounded_memory(tmp_path):
    """qwen2.5-0.5b shape (494M parameters, bf16: 0.99 GB on disk; 1.98 GB as float32) plus a rank-8
    adapter on every linear layer, fused and quantized to 4 bits in a child process.

    The export streams one tensor at a time, so its peak RSS must stay well under the float32 model
    (and under the bf16 model plus its quantized copy).
    """
    import mlx.core as mx

    from edgetune.model.tiny import build_tiny_model

    base = build_tiny_model(tmp_path / "qwen05b", preset="qwen2.5-0.5b")
    config = json.loads((base / "config.json").read_text())
    hidden, inter, kv = config["hidden_size"], config["intermediate_size"], 2 * 64  # 2 kv heads x 64
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, kv),
              "self_attn.v_proj": (hidden, kv), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (hidden, inter), "mlp.up_proj": (hidden, inter), "mlp.down_proj": (inter, hidden)}
    rng = np.random.default_rng(0)
    weights = {}
    for layer in range(config["num_hidden_layers"]):
        for key, (n_in, n_out) in shapes.items():
            weights[f"model.layers.{layer}.{key}.lora_a"] = mx.array(rng.normal(0, 0.02, (n_in, 8)), dtype=mx.float32)
            weights[f"model.layers.{layer}.{key}.lora_b"] = mx.array(rng.normal(0, 0.02, (8, n_out)), dtype=mx.float32)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    mx.save_safetensors(str(adapter / "adapters.safetensors"), weights)
    (adapter / "adapter_config.json").write_text(json.dumps({
        "fine_tune_type": "lora", "num_layers": config["num_hidden_layers"], "base_model": str(base),
        "lora_parameters": {"rank": 8, "scale": 2.0, "dropout": 0.0, "keys": sorted(shapes)}, "lora_alpha": 16}))

    start = time.perf_counter()
    res = cli(adapter, "--format", "mlx", "--quantize", "4bit", "--out", tmp_path / "q4")
    elapsed = time.perf_counter() - start
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "q4" / "export.json").read_text())
    peak_mb = summary["peak_rss_mb"]  # the export process's own peak (getrusage), not other children's
    print(f"\nqwen2.5-0.5b shape -> MLX q4: {elapsed:.1f} s wall, peak RSS {peak_mb:.0f} MB, "
          f"{summary['size_bytes'] / 1e6:.0f} MB on disk")
    # The float32 model alone would be 1,977 MB and the bf16 one 988 MB. Measured here: ~600 MB, i.e.
    # the process (~270 MB of imports) plus the largest tensor (the 272 MB bf16 embedding) and its 4-bit copy.
    assert peak_mb < 800, peak_mb
    assert "layer 24/24 fused + quantized" in res.stderr
    tensors = mx.load(str(tmp_path / "q4" / "model.safetensors"))
    assert tensors["model.embed_tokens.weight"].dtype == mx.uint32 and len(tensors) == 24 * 7 * 3 + 24 * 5 + 4
    del tensors
    from mlx_lm import load

    model, _ = load(str(tmp_path / "q4"))
    assert np.isfinite(np.array(model(mx.array([[1, 2, 3, 4]])).astype(mx.float32))).all()


@pytest.mark.parametrize("quant,bound", [("f16", 1e-3), ("q4_0", 0.25)])
def test_gguf_export_is_checked_by_reading_its_weights_back(tmp_path, tiny_llama_dir, quant, bound):
    """llama (q/k rows permuted in GGUF, untied head): the weights read back from the file give the
    model's own eval loss at f16, so names and row order map back exactly; q4_0 stays within a bound."""
    write_rows(tmp_path / "eval.jsonl", PAIRS)
    res = cli(tiny_llama_dir, "--format", "gguf", "--quantize", quant, "--eval-data", tmp_path / "eval.jsonl",
              "--out", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    info = json.loads((tmp_path / "out" / "export.json").read_text())
    assert sorted(info["files"]) == ["Modelfile", f"model-{quant}.gguf"]
    check = info["check"]
    assert check["examples"] == len(PAIRS) and abs(check["increase"]) < bound, check
    assert "rounding in the file" in (tmp_path / "out" / "README.md").read_text()


def test_output_may_sit_in_the_run_but_never_replace_it(tmp_path, trained_run):
    res = cli(trained_run, "--format", "peft", "--out", trained_run.parent, "--force")
    assert res.returncode == 2 and "would replace SOURCE" in res.stderr
    assert (trained_run / "manifest.json").is_file()
    info = export(trained_run, "peft", trained_run / "export" / "peft")
    assert Path(info["folder"]).parent.parent == trained_run
