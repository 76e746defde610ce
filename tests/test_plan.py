"""The memory planner: each part on hand-worked numbers, `auto` choices, refusal before loading,
a real run's measured peak against the plan, and every shipped Mac-tier recipe against its tier."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgetune.errors import UserError
from edgetune.plan import (AUTO_HEADROOM, GB, Budget, ModelShape, Settings, activation_bytes,
                           backward_working_bytes, device_budget, estimate, logits_bytes, lora_parameter_count,
                           lora_state_bytes, mac_tier_budget, mem_available, parameter_counts, plan_recipe,
                           resolve_auto, supervised_positions, weight_bytes)
from edgetune.recipe import ALL_LINEAR, load_recipe

REPO = Path(__file__).resolve().parents[1]

# The config.json shapes of the models the shipped recipes name. The hub is unreachable from CI,
# so they are written out here from the models' published config.json files (hidden_size,
# num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim, intermediate_size,
# vocab_size, tie_word_embeddings, torch_dtype; mlx-community 4-bit repos add `quantization`).
_QWEN = {"model_type": "qwen2", "vocab_size": 151936, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
         "max_position_embeddings": 32768}
_LLAMA = {"model_type": "llama", "vocab_size": 128256, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
          "max_position_embeddings": 131072}
_Q4 = {"quantization": {"group_size": 64, "bits": 4}}
QWEN_0_5B = {**_QWEN, "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
             "num_key_value_heads": 2, "intermediate_size": 4864}
QWEN_1_5B = {**_QWEN, "hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12,
             "num_key_value_heads": 2, "intermediate_size": 8960}
QWEN_3B = {**_QWEN, "hidden_size": 2048, "num_hidden_layers": 36, "num_attention_heads": 16,
           "num_key_value_heads": 2, "intermediate_size": 11008}
LLAMA_1B = {**_LLAMA, "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 64, "intermediate_size": 8192}
LLAMA_3B = {**_LLAMA, "hidden_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 24,
            "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 8192}
KNOWN_CONFIGS = {
    "Qwen/Qwen2.5-0.5B-Instruct": QWEN_0_5B,
    "Qwen/Qwen2.5-1.5B-Instruct": QWEN_1_5B,
    "Qwen/Qwen2.5-3B-Instruct": QWEN_3B,
    "meta-llama/Llama-3.2-1B-Instruct": LLAMA_1B,
    "meta-llama/Llama-3.2-3B-Instruct": LLAMA_3B,
    "mlx-community/Qwen2.5-0.5B-Instruct-4bit": {**QWEN_0_5B, **_Q4},
    "mlx-community/Qwen2.5-1.5B-Instruct-4bit": {**QWEN_1_5B, **_Q4},
    "mlx-community/Qwen2.5-3B-Instruct-4bit": {**QWEN_3B, **_Q4},
    "mlx-community/Llama-3.2-1B-Instruct-4bit": {**LLAMA_1B, **_Q4},
    "mlx-community/Llama-3.2-3B-Instruct-4bit": {**LLAMA_3B, **_Q4},
}
TIER_RECIPES = sorted((REPO / "recipes").glob("mac*gb-*.yaml"))

# A toy shape small enough to work out by hand: D=64, 1 block, 2 heads of 32, 1 kv head, I=128, V=256.
TOY = ModelShape("llama", hidden=64, layers=1, heads=2, kv_heads=1, head_dim=32, intermediate=128, vocab=256,
                 tied=True, stored_bytes=2)
SMALL = ModelShape("qwen2", hidden=512, layers=8, heads=8, kv_heads=8, head_dim=64, intermediate=1376, vocab=8192,
                   tied=True, stored_bytes=4, attention_bias=True)
CPU = Budget(10**12, "test", gpu=False)


def settings(stage="sft", batch=4, seq=512, ckpt=False, **kw) -> Settings:
    base = dict(packing=False, lora_rank=8, lora_targets=tuple(ALL_LINEAR), lora_layers=None, quantize=None)
    return Settings(stage, batch, seq, ckpt, **{**base, **kw})


# --- the parts, on hand-worked numbers ----------------------------------------------------------------

def test_parameter_count_of_qwen2_5_0_5b_is_its_published_494m():
    matrices, vectors = parameter_counts(ModelShape.from_config(QWEN_0_5B))
    # 151936*896 embedding + 24 blocks * 14,909,440; vectors: 24 * (2*896 norms + 1152 q/k/v bias) + 896
    assert (matrices, vectors) == (493_961_216, 71_552)
    assert matrices + vectors == 494_032_768  # the model card's 0.49B


def test_weight_bytes_toy_shape_fp32_and_4bit_groups():
    # matrices: q 64*64 + k 64*32 + v 64*32 + o 64*64 + 3 * 64*128 = 36,864; embedding 256*64 = 16,384
    assert parameter_counts(TOY) == (53_248, 2 * 64 + 64)
    assert weight_bytes(TOY, None, 4) == (53_248 + 192) * 4
    # 4 bits: 53,248 / 2 bytes + (scale, bias) per 64 weights at 4 bytes + vectors at 4 bytes
    assert weight_bytes(TOY, 4, 4) == 26_624 + 2 * 832 * 4 + 192 * 4
    assert weight_bytes(TOY, 8, 2) == 53_248 + 2 * 832 * 2 + 192 * 2


def test_lora_count_and_state_bytes():
    qwen = ModelShape.from_config(QWEN_0_5B)
    assert lora_parameter_count(qwen, 8, ["q_proj", "v_proj"], 24) == 8 * (1792 + 1024) * 24 == 540_672
    assert lora_state_bytes(1000) == 20_000  # weight, grad, summed grad, AdamW m and v, float32
    with pytest.raises(UserError, match="c_attn not planned for.*q_proj"):
        lora_parameter_count(qwen, 8, ["c_attn"], 24)


def test_lora_count_equals_mlx_trainable_parameters(tiny_model_dir):
    """The planner's LoRA count is exactly what attach_lora creates on a real model."""
    from edgetune.lora import LoraSpec, attach_lora, trainable_count
    from edgetune.models import load_for_training

    shape = ModelShape.from_config(json.loads((tiny_model_dir / "config.json").read_text()))
    for rank, targets, layers in [(8, tuple(ALL_LINEAR), None), (4, ("q_proj", "v_proj", "down_proj"), 2)]:
        model = load_for_training(str(tiny_model_dir)).model
        attach_lora(model, LoraSpec(rank, 16.0, 0.0, targets, layers), 0)
        assert trainable_count(model) == lora_parameter_count(shape, rank, targets, layers or shape.layers)


def test_activations_working_set_and_logits_hand_worked():
    # Per block and token 4*512 + 1.5*512 + 5*1376 = 9,696 elements, plus one block of 4 rows *
    # 8 heads * 512^2 probabilities; 8 blocks, float32.
    assert activation_bytes(SMALL, 4, 512, 8, False, 4) == 8 * (2048 * 9_696 + 8_388_608) * 4 == 903_872_512
    # Checkpointed: 512 per block and token (its input), plus one block's full set.
    assert activation_bytes(SMALL, 4, 512, 8, True, 4) == (8 * 2048 * 512 + 2048 * 9_696 + 8_388_608) * 4
    # Only adapted blocks keep activations: 2 of 8.
    assert activation_bytes(SMALL, 4, 512, 2, False, 4) == activation_bytes(SMALL, 4, 512, 8, False, 4) // 4
    # 4*1376 per token, plus 4.5 probability blocks (7 when checkpointing recomputes the forward).
    assert backward_working_bytes(SMALL, 4, 512, False, 4) == (2048 * 5_504 + 4.5 * 8_388_608) * 4 == 196_083_712
    assert backward_working_bytes(SMALL, 4, 512, True, 4) == (2048 * 5_504 + 7 * 8_388_608) * 4
    # [S, V] logits in float32 plus two float32 copies (log-softmax and its gradient): 12 bytes.
    assert logits_bytes(ModelShape.from_config(QWEN_0_5B), 1024, 4) == 1024 * 151_936 * 12
    # On a GPU in bf16: 2 + 8 bytes.
    assert logits_bytes(ModelShape.from_config(QWEN_0_5B), 1024, 2) == 1024 * 151_936 * 10


def test_supervised_positions_are_padded_to_64_like_the_loss_head():
    assert supervised_positions(2, 100, 0.5) == 128
    assert supervised_positions(1, 1) == 64
    assert supervised_positions(4, 512) == 2048


def test_a_dpo_pair_costs_two_rows():
    sft = estimate(SMALL, settings("sft", batch=4, seq=256), CPU)
    dpo = estimate(SMALL, settings("dpo", batch=2, seq=256), CPU)
    kto = estimate(SMALL, settings("kto", batch=4, seq=256), CPU)
    parts = lambda plan: {p.name: p.bytes for p in plan.parts}  # noqa: E731
    assert parts(dpo)["reference cache"] == parts(kto)["reference cache"] == 4_000_000  # 1M floats: negligible
    assert {k: v for k, v in parts(dpo).items() if k != "reference cache"} == parts(sft)
    assert "reference cache" not in parts(estimate(SMALL, settings("orpo", batch=2, seq=256), CPU))


def test_packed_preference_batches_count_rows_not_pairs():
    """packing: true -> batch_size is rows of max_seq_len (pairs fill them), so 4 packed rows cost
    what 4 packed SFT rows cost, not 8."""
    parts = lambda plan: {p.name: p.bytes for p in plan.parts if p.name != "reference cache"}  # noqa: E731
    packed = estimate(SMALL, settings("dpo", batch=4, seq=256, packing=True), CPU)
    assert parts(packed) == parts(estimate(SMALL, settings("sft", batch=4, seq=256, packing=True), CPU))
    from edgetune.plan import render

    assert "batch 4 rows x 256 tokens" in render(packed, "m")


def test_quantizing_shrinks_only_the_weights():
    plain = {p.name: p.bytes for p in estimate(SMALL, settings(), CPU).parts}
    q4 = {p.name: p.bytes for p in estimate(SMALL, settings(quantize="q4"), CPU).parts}
    assert q4["base weights"] == weight_bytes(SMALL, 4, 4) < plain["base weights"] / 4
    assert {k: v for k, v in q4.items() if k != "base weights"} == {k: v for k, v in plain.items()
                                                                     if k != "base weights"}


# --- the device -------------------------------------------------------------------------------------------

def test_mem_available_reads_proc_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   21000000 kB\n")
    assert mem_available(str(meminfo)) == 21_000_000 * 1024
    meminfo.write_text("MemTotal: 1 kB\n")
    with pytest.raises(UserError, match="EDGETUNE_MEMORY_BUDGET_GB"):
        mem_available(str(meminfo))


def test_budget_override_and_mac_tiers(monkeypatch):
    monkeypatch.setenv("EDGETUNE_MEMORY_BUDGET_GB", "3.5")
    assert device_budget().bytes == 3_500_000_000
    monkeypatch.setenv("EDGETUNE_MEMORY_BUDGET_GB", "lots")
    with pytest.raises(UserError, match="expected a number"):
        device_budget()
    monkeypatch.delenv("EDGETUNE_MEMORY_BUDGET_GB")
    if sys.platform.startswith("linux"):
        assert device_budget().source == "Linux MemAvailable" and device_budget().bytes > 0
    assert mac_tier_budget(16).bytes == int(16 * 2**30 * 2 / 3) and mac_tier_budget(16).gpu
    assert mac_tier_budget(64).bytes == int(64 * 2**30 * 3 / 4)


def test_config_without_the_shape_keys_is_named():
    with pytest.raises(UserError, match="x/config.json: cannot plan memory: missing or non-integer "
                                        "num_hidden_layers, vocab_size"):
        ModelShape.from_config({"hidden_size": 8, "num_attention_heads": 2, "intermediate_size": 16},
                               "x/config.json")


# --- auto values -----------------------------------------------------------------------------------------

def write_recipe(folder: Path, model: Path, rows: list[dict] | None = None, **section) -> Path:
    rows = rows or [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sft = {"steps": 2, "save_every": 0, "log_every": 1, "learning_rate": 1e-3, "lora": {"rank": 8, "alpha": 16},
           **section}
    path = folder / "recipe.yaml"
    path.write_text(json.dumps({"model": str(model), "output": str(folder / "run"),
                                "data": {"train": ["train.jsonl"]}, "sft": sft}))
    return path


AUTO = {"batch_size": "auto", "max_seq_len": "auto", "grad_checkpoint": "auto"}


def test_schema_takes_auto_for_batch_length_and_checkpointing_only(tmp_path, tiny_model_dir):
    from edgetune.recipe import RecipeError

    recipe = load_recipe(write_recipe(tmp_path, tiny_model_dir, **AUTO))
    assert (recipe.sft.batch_size, recipe.sft.max_seq_len, recipe.sft.grad_checkpoint) == ("auto",) * 3
    with pytest.raises(RecipeError) as e:
        load_recipe(write_recipe(tmp_path, tiny_model_dir, batch_size="big", max_seq_len=4, grad_checkpoint="yes",
                                 learning_rate="auto"))
    assert [line.split(": ", 1)[1] for line in str(e.value).splitlines()] == [
        "sft.batch_size: expected an integer or one of auto, got string 'big'",
        "sft.learning_rate: expected a number, got string 'auto'",
        "sft.max_seq_len: must be at least 8, got 4",
        "sft.grad_checkpoint: expected true or false or one of auto, got string 'yes'",
    ]


def test_auto_prefers_long_sequences_then_no_checkpointing_then_big_batches(tmp_path, tiny_model_dir):
    recipe = load_recipe(write_recipe(tmp_path, tiny_model_dir, **AUTO))
    config = json.loads((tiny_model_dir / "config.json").read_text())
    shape = ModelShape.from_config(config)

    def total(batch, seq, ckpt):
        return estimate(shape, settings(batch=batch, seq=seq, ckpt=ckpt), CPU).total

    def budget_for(total_bytes):  # just enough for this total with the auto headroom
        return Budget(int(total_bytes / (1 - AUTO_HEADROOM)) + 1, "test")

    # Room for 2048 tokens x 2 rows without checkpointing (but not 4 rows): that is the pick.
    plan = plan_recipe(recipe, "sft", budget_for(total(2, 2048, False)), config)
    assert (plan.settings.max_seq_len, plan.settings.grad_checkpoint, plan.settings.batch_size) == (2048, False, 2)
    assert total(4, 2048, False) > plan.budget.bytes * (1 - AUTO_HEADROOM) >= plan.total
    # Room for 2048 tokens only with checkpointing: checkpointing before a shorter limit.
    plan = plan_recipe(recipe, "sft", budget_for(total(1, 2048, True)), config)
    assert (plan.settings.max_seq_len, plan.settings.grad_checkpoint, plan.settings.batch_size) == (2048, True, 1)
    assert "does not fit without recomputing" in plan.chosen["grad_checkpoint"]
    # Not even that: a shorter limit.
    plan = plan_recipe(recipe, "sft", budget_for(total(1, 2048, True) - 1), config)
    assert plan.settings.max_seq_len == 1024 and plan.fits_with_headroom
    # Values given in the recipe are never changed.
    fixed = load_recipe(write_recipe(tmp_path, tiny_model_dir, batch_size=3, max_seq_len=64))
    plan = plan_recipe(fixed, "sft", budget_for(total(8, 512, False)), config)
    assert (plan.settings.batch_size, plan.settings.max_seq_len, plan.chosen) == (3, 64, {})


def test_resume_keeps_the_auto_values_the_run_started_with(tmp_path, tiny_model_dir):
    recipe = load_recipe(write_recipe(tmp_path, tiny_model_dir, **AUTO))
    resolved, plan = resolve_auto(recipe, "sft", Budget(10 * 10**9, "test"), echo=lambda m: None,
                                  previous={"batch_size": 2, "max_seq_len": 256, "grad_checkpoint": True})
    assert (resolved.sft.batch_size, resolved.sft.max_seq_len, resolved.sft.grad_checkpoint) == (2, 256, True)
    assert "kept on resume" in plan.chosen["batch_size"]


def test_a_run_that_cannot_fit_is_refused_before_the_model_loads(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path, tiny_model_dir, batch_size=4, max_seq_len=512)
    env = {**os.environ, "EDGETUNE_MEMORY_BUDGET_GB": "0.005"}
    res = subprocess.run([sys.executable, "-m", "edgetune.cli", "sft", str(recipe)], capture_output=True, text=True,
                         env=env)
    assert res.returncode == 2
    assert "refused before loading the model" in res.stderr and "EDGETUNE_MEMORY_BUDGET_GB offers 0.01 GB" in res.stderr
    for fix in ("quantize: q4 ->", "sft.max_seq_len: 256 ->", "sft.lora.layers: 1 ->", "sft.batch_size: 1 ->",
                "sft.grad_checkpoint: true ->"):
        assert fix in res.stderr, fix
    assert "model:" not in res.stderr  # the model was never loaded
    assert not (tmp_path / "run").exists()  # nor the run folder made
    # An auto recipe that cannot fit even at its smallest choice is refused the same way.
    recipe = write_recipe(tmp_path, tiny_model_dir, **AUTO)
    res = subprocess.run([sys.executable, "-m", "edgetune.cli", "sft", str(recipe)], capture_output=True, text=True,
                         env={**env, "EDGETUNE_MEMORY_BUDGET_GB": "0.001"})
    assert res.returncode == 2 and "refused before loading the model" in res.stderr


# --- a real run against the plan -----------------------------------------------------------------------

def filled_rows(model_dir: Path, n: int, seq_len: int) -> tuple[list[dict], int]:
    """`n` chat rows of seq_len - 6 .. seq_len + 1 tokens, mostly completion (so every batch is
    n x seq_len positions), and their supervised position count."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    words = sorted(t[1:] for t in tok.get_vocab() if t.startswith("Ġ") and t[1:].isalpha())
    rng = np.random.default_rng(0)
    rows, supervised = [], 0
    for _ in range(n):
        prompt, completion = " ".join(rng.choice(words, 4)), list(rng.choice(words, seq_len))

        def messages():
            return [{"role": "user", "content": prompt}, {"role": "assistant", "content": " ".join(completion)}]

        while len(tok.apply_chat_template(messages(), tokenize=True, return_dict=False)) > seq_len + 1:
            completion.pop()
        while len(tok.apply_chat_template(messages(), tokenize=True, return_dict=False)) < seq_len - 6:
            completion.append(str(rng.choice(words)))
        header = tok.apply_chat_template(messages()[:1], tokenize=True, add_generation_prompt=True, return_dict=False)
        supervised += len(tok.apply_chat_template(messages(), tokenize=True, return_dict=False)) - len(header)
        rows.append({"messages": messages()})
    return rows, supervised


def test_measured_peak_of_a_real_run_is_within_20_percent_of_the_plan(tmp_path, tiny_model_dir):
    """`edgetune sft` on the tiny model, batches of exactly 4 x 256 positions: MLX's measured peak
    (summary.json) against the plan at the data's supervised share."""
    rows, supervised = filled_rows(tiny_model_dir, 8, 256)
    recipe = write_recipe(tmp_path, tiny_model_dir, rows, batch_size=4, max_seq_len=256)
    res = subprocess.run([sys.executable, "-m", "edgetune.cli", "sft", str(recipe)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert re.search(r"plan: predicted peak \d+\.\d\d GB of \d+\.\d\d GB \(Linux MemAvailable\)", res.stderr) \
        or sys.platform != "linux"
    measured = json.loads((tmp_path / "run" / "summary.json").read_text())["peak_memory_gb"] * GB
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["data_stats"]["train"]["truncated"] == 0
    shape = ModelShape.from_config(json.loads((tiny_model_dir / "config.json").read_text()))
    predicted = estimate(shape, settings(batch=4, seq=256, supervised_share=supervised / (8 * 256)), CPU).total
    assert abs(predicted / measured - 1) <= 0.2, (predicted, measured)
    # The worst case the run was planned with (every position supervised) is above the measurement.
    assert manifest["memory_plan"]["total_bytes"] >= measured


def test_auto_values_chosen_for_a_tight_budget_fit_when_the_run_happens(tmp_path, tiny_model_dir):
    """A budget too small for 2048 tokens: the run resolves the auto values as the planner says,
    says why, and its measured peak stays inside the budget with rows that fill the chosen length."""
    config = json.loads((tiny_model_dir / "config.json").read_text())
    budget = Budget(int(0.12 * GB), "test")
    probe = load_recipe(write_recipe(tmp_path, tiny_model_dir, **AUTO))
    expected = plan_recipe(probe, "sft", budget, config).settings
    assert expected.max_seq_len < 2048  # the budget really constrains the choice
    rows, _ = filled_rows(tiny_model_dir, 2 * expected.batch_size, expected.max_seq_len)
    recipe = write_recipe(tmp_path, tiny_model_dir, rows, **AUTO)
    res = subprocess.run([sys.executable, "-m", "edgetune.cli", "sft", str(recipe)], capture_output=True, text=True,
                         env={**os.environ, "EDGETUNE_MEMORY_BUDGET_GB": "0.12"})
    assert res.returncode == 0, res.stderr
    assert f"plan: sft.max_seq_len auto -> {expected.max_seq_len} (the longest of" in res.stderr
    assert f"plan: sft.batch_size auto -> {expected.batch_size}" in res.stderr
    sft = json.loads((tmp_path / "run" / "manifest.json").read_text())["recipe"]["sft"]
    assert (sft["batch_size"], sft["max_seq_len"], sft["grad_checkpoint"]) == (
        expected.batch_size, expected.max_seq_len, expected.grad_checkpoint)
    measured = json.loads((tmp_path / "run" / "summary.json").read_text())["peak_memory_gb"] * GB
    assert measured <= budget.bytes


def test_dpo_resolves_auto_values_for_pairs_before_loading(tmp_path, tiny_model_dir):
    """`edgetune dpo` plans 2 rows per pair, says what it chose, and records the resolved values."""
    pair = {"prompt": [{"role": "user", "content": "Name a fruit."}],
            "chosen": [{"role": "assistant", "content": "An apple."}],
            "rejected": [{"role": "assistant", "content": "There are many fruits."}]}
    (tmp_path / "dpo.jsonl").write_text(json.dumps(pair) + "\n" + json.dumps(pair) + "\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"model": str(tiny_model_dir), "output": str(tmp_path / "run"),
                                  "data": {"train": ["dpo.jsonl"]},
                                  "dpo": {"steps": 1, "save_every": 0, "lora": {"rank": 4, "alpha": 8}, **AUTO}}))
    res = subprocess.run([sys.executable, "-m", "edgetune.cli", "dpo", str(recipe)], capture_output=True, text=True,
                         env={**os.environ, "EDGETUNE_MEMORY_BUDGET_GB": "0.25"})
    assert res.returncode == 0, res.stderr
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    dpo = manifest["recipe"]["dpo"]
    config = json.loads((tiny_model_dir / "config.json").read_text())
    expected = plan_recipe(load_recipe(recipe), "dpo", Budget(int(0.25 * GB), "test"), config).settings
    assert (dpo["batch_size"], dpo["max_seq_len"], dpo["grad_checkpoint"]) == (
        expected.batch_size, expected.max_seq_len, expected.grad_checkpoint)
    assert f"plan: dpo.batch_size auto -> {expected.batch_size}" in res.stderr
    plan = manifest["memory_plan"]
    assert "reference cache" in [p["name"] for p in plan["parts"]] and plan["total_bytes"] <= 0.25 * GB
    assert f"{expected.batch_size} pair" in next(p["note"] for p in plan["parts"] if p["name"] == "activations")


# --- the command and the shipped recipes ------------------------------------------------------------------

def test_plan_command_prints_the_table_and_json(tmp_path, tiny_model_dir):
    from edgetune.cli import main

    recipe = write_recipe(tmp_path, tiny_model_dir, **AUTO)
    res = CliRunner().invoke(main, ["plan", str(recipe), "--mac", "8"])
    assert res.exit_code == 0, res.output
    for text in ("base weights", "LoRA + optimizer", "activations", "backward working set", "logits",
                 "total (peak)", "Mac 8 GB (Metal working set ~67% of RAM): fits", "sft.batch_size -> ",
                 "sft.max_seq_len -> 2048 (the longest of"):
        assert text in res.output, text
    res = CliRunner().invoke(main, ["plan", str(recipe), "--json", "--set", "sft.max_seq_len=512"])
    out = json.loads(res.output)["stages"]["sft"]
    assert out["settings"]["max_seq_len"] == 512 and out["fits"] is True
    assert sum(p["bytes"] for p in out["parts"]) == out["total_bytes"]
    res = CliRunner().invoke(main, ["plan", str(recipe), "--set", "sft.max_seq_len=4096", "--set",
                                    "sft.batch_size=64", "--mac", "8"])
    assert res.exit_code == 2 and "does NOT fit" in res.output and "refused before loading" in res.output


def test_tier_recipes_cover_every_tier_and_laptop_model():
    tiers = {int(re.match(r"mac(\d+)gb-", p.name).group(1)) for p in TIER_RECIPES}
    assert tiers == {8, 16, 32, 64}
    models = {load_recipe(p).model for p in TIER_RECIPES}
    assert models <= set(KNOWN_CONFIGS), models - set(KNOWN_CONFIGS)
    for family in ("Qwen2.5-0.5B", "Qwen2.5-1.5B", "Qwen2.5-3B", "Llama-3.2-1B", "Llama-3.2-3B"):
        assert any(family in m for m in models), family


@pytest.mark.parametrize("path", TIER_RECIPES, ids=lambda p: p.name)
def test_every_tier_recipe_fits_its_mac_with_headroom(path):
    """Each shipped Mac-tier recipe, planned against its tier with the model's real config, fits
    with the auto headroom for every stage it configures (feedback -> sft -> dpo)."""
    recipe = load_recipe(path)
    assert recipe.feedback is not None and recipe.sft is not None and recipe.dpo is not None
    budget = mac_tier_budget(int(re.match(r"mac(\d+)gb-", path.name).group(1)))
    for stage in ("sft", "dpo"):
        plan = plan_recipe(recipe, stage, budget, KNOWN_CONFIGS[recipe.model], recipe.model)
        assert plan.fits_with_headroom, (stage, plan.total / GB, budget.bytes / GB)
