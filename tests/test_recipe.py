"""The recipe schema: every shipped recipe validates, every mistake is named at once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edgetune.errors import UserError
from edgetune.recipe import ALL_LINEAR, RecipeError, load_recipe, recipe_keys, recipe_to_dict

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "recipes").glob("*.yaml"))

MINIMAL = """\
model: Qwen/Qwen2.5-0.5B-Instruct
output: runs/x
data: build
sft:
  steps: 10
"""


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems(path: Path, overrides=()) -> list[str]:
    with pytest.raises(RecipeError) as e:
        load_recipe(path, overrides)
    return str(e.value).splitlines()


def test_recipes_folder_is_not_empty():
    assert {p.name for p in SHIPPED} >= {"sft-tiny.yaml", "sft-qwen2.5-0.5b.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert any(getattr(recipe, stage) is not None for stage in ("sft", "dpo", "kto", "orpo"))
    # Shipped recipes keep their run folders out of recipes/.
    assert not Path(recipe.output).is_relative_to(REPO / "recipes")


def test_defaults_live_in_the_schema(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL))
    assert (r.backend, r.quantize, r.trust_remote_code, r.revision) == ("mlx", None, False, None)
    s = r.sft
    assert (s.lora.rank, s.lora.alpha, s.lora.dropout, s.lora.layers) == (8, 16.0, 0.0, "all")
    assert s.lora.targets == ALL_LINEAR
    assert (s.batch_size, s.grad_accumulation, s.learning_rate, s.warmup_steps) == (4, 1, 1e-4, 0)
    assert (s.lr_schedule, s.min_lr_ratio, s.weight_decay, s.max_grad_norm) == ("constant", 0.0, 0.0, 1.0)
    assert (s.max_seq_len, s.truncation, s.packing, s.grad_checkpoint) == (2048, "left", False, False)
    assert (s.seed, s.eval_every, s.eval_batches, s.save_every, s.keep_checkpoints) == (0, 0, None, 100, 3)
    assert (s.max_nonfinite_steps, s.log_every, s.steps, s.epochs) == (5, 10, 10, None)
    assert r.data.format == "auto"


def test_relative_paths_resolve_against_the_recipe_folder(tmp_path):
    sub = tmp_path / "recipes"
    sub.mkdir()
    r = load_recipe(write(sub, "model: ./tiny\noutput: ../runs/a\ndata: {train: [t/*.jsonl, b.jsonl], "
                              "eval: e.jsonl}\nsft: {epochs: 1}\n"))
    assert r.model == str(sub / "tiny")
    assert r.output == str(tmp_path / "runs" / "a")
    assert r.data.train == [str(sub / "t" / "*.jsonl"), str(sub / "b.jsonl")]
    assert r.data.eval == [str(sub / "e.jsonl")]  # a single path means a list of one
    assert r.data.dir is None


def test_model_is_a_hub_id_unless_it_looks_like_or_is_a_local_folder(tmp_path):
    assert load_recipe(write(tmp_path, MINIMAL)).model == "Qwen/Qwen2.5-0.5B-Instruct"
    (tmp_path / "org" / "local").mkdir(parents=True)
    r = load_recipe(write(tmp_path, MINIMAL.replace("Qwen/Qwen2.5-0.5B-Instruct", "org/local")))
    assert r.model == str(tmp_path / "org" / "local")


def test_data_string_is_a_data_build_folder(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL))
    assert r.data.dir == str(tmp_path / "build") and r.data.train == []


def test_misspelt_key_is_named_with_its_line_and_the_closest_key(tmp_path):
    path = write(tmp_path, MINIMAL + "  learnig_rate: 0.001\n")
    assert problems(path) == [f"{path}:6: sft.learnig_rate: unknown key; did you mean sft.learning_rate?"]


def test_key_in_the_wrong_section_points_to_the_right_one(tmp_path):
    path = write(tmp_path, MINIMAL + "learning_rate: 0.001\n")
    assert problems(path) == [f"{path}:6: learning_rate: unknown key here; did you mean sft.learning_rate?"]


def test_every_problem_is_reported_at_once(tmp_path):
    path = write(tmp_path, """\
output: 3
data: {train: a.jsonl, format: csv}
backend: jax
sft:
  lora: {rank: 0, alhpa: 2, layers: some, targets: []}
  steps: 10
  epochs: 1
  batch_size: "4"
  packing: 1
  max_grad_norm: -1
  lr_schedule: cosine
  learning_rate: 1e-4
""")
    lines = problems(path)
    expected = [
        (":1: output", "expected a string, got integer 3"),
        (": model", "required key missing"),
        (":2: data.format", "expected one of auto, edgetune, messages, prompt_completion, mlx_chat, "
                            "mlx_completions, mlx_text, got string 'csv'"),
        (":3: backend", "expected one of mlx, torch, auto, got string 'jax'"),
        (":5: sft.lora.rank", "must be at least 1, got 0"),
        (":5: sft.lora.alhpa", "unknown key; did you mean sft.lora.alpha?"),
        (":5: sft.lora.layers", "expected an integer or one of all, got string 'some'"),
        (":5: sft.lora.targets", "must not be empty"),
        (":6: sft.steps", "set exactly one of sft.steps and sft.epochs (both are set"),
        (":8: sft.batch_size", "expected an integer or one of auto, got string '4'"),
        (":9: sft.packing", "expected true or false, got integer 1"),
        (":10: sft.max_grad_norm", "must be greater than 0, got -1.0"),
    ]
    assert len(lines) == len(expected), lines
    for where, reason in expected:
        assert any(line.startswith(f"{path}{where}: {reason}") for line in lines), (where, lines)
    # PyYAML reads `1e-4` as a string; the schema takes it as the number it plainly is.
    assert not any("learning_rate" in line for line in lines)


def test_key_given_twice_is_an_error(tmp_path):
    path = write(tmp_path, MINIMAL + "  steps: 20\n")
    assert problems(path) == [f"{path}:5: sft.steps: given twice (again on line 6); keep one"]


def test_steps_or_epochs_exactly_one(tmp_path):
    path = write(tmp_path, MINIMAL.replace("  steps: 10\n", "  batch_size: 2\n"))
    assert problems(path) == [f"{path}: sft.steps: set exactly one of sft.steps and sft.epochs (neither is set; "
                              "to switch with --set, also set the other to null)"]


def test_data_dir_and_files_are_exclusive(tmp_path):
    path = write(tmp_path, MINIMAL.replace("data: build", "data: {dir: b, train: t.jsonl}"))
    assert problems(path) == [f"{path}:3: data: give either data.dir (a data build folder) or "
                              "data.train/data.eval files, not both"]


def test_absent_stage_section_is_none_and_empty_mapping_is_rejected_where_required(tmp_path):
    r = load_recipe(write(tmp_path, "model: m/x\noutput: o\ndata: d\n"))
    assert r.sft is None
    assert "sft" not in recipe_to_dict(r)
    path = write(tmp_path, "model: m/x\noutput: o\ndata: d\nsft:\n")
    assert any("neither is set" in line for line in problems(path))


def test_overrides_are_applied_and_parsed_as_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sub = tmp_path / "recipes"
    sub.mkdir()
    path = write(sub, MINIMAL)
    r = load_recipe(path, ["sft.steps=null", "sft.epochs=2", "sft.learning_rate=3e-4",
                           "sft.lora.targets=[q_proj, v_proj]", "sft.packing=true", "quantize=q4",
                           "output=elsewhere", "data.format=edgetune"])
    assert (r.sft.steps, r.sft.epochs, r.sft.learning_rate) == (None, 2.0, 3e-4)
    assert r.sft.lora.targets == ["q_proj", "v_proj"]
    assert (r.sft.packing, r.quantize) == (True, "q4")
    # Typed at the shell: relative to where it was typed, not to the recipe file.
    assert r.output == str(tmp_path / "elsewhere")
    # `data: build` became {dir: build, format: edgetune}; the file's path keeps the file's folder.
    assert (r.data.dir, r.data.format) == (str(sub / "build"), "edgetune")


def test_bad_overrides_are_named(tmp_path):
    path = write(tmp_path, MINIMAL)
    lines = problems(path, ["sft.learnig_rate=1", "sft.steps", "sft.steps.x=1", "sft.batch_size=[1"])
    assert lines == [
        f"{path}: sft.steps: expected KEY=VALUE with a dotted key, e.g. sft.steps=20 (from --set sft.steps)",
        f"{path}: sft.steps: holds integer 10, not a mapping; set the whole value instead "
        "(from --set sft.steps.x=1)",
        f"{path}: sft.batch_size: the value is not valid YAML (expected ',' or ']', but got '<stream end>') "
        "(from --set sft.batch_size=[1)",
        f"{path}: sft.learnig_rate: unknown key; did you mean sft.learning_rate? (from --set sft.learnig_rate=1)",
    ]


def test_recipe_to_dict_loads_back_as_the_same_recipe(tmp_path):
    original = load_recipe(SHIPPED[0])
    again = load_recipe(write(tmp_path, yaml.safe_dump(recipe_to_dict(original))))
    assert again == original


def test_schema_keys_cover_the_documented_sections():
    keys = set(recipe_keys())
    assert {"model", "backend", "output", "data.train", "data.format", "quantize", "trust_remote_code",
            "revision", "sft.lora.rank", "sft.lora.targets", "sft.max_nonfinite_steps"} <= keys


def test_unreadable_and_non_yaml_recipes_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="cannot read recipe"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(UserError, match=r"recipe.yaml:2: not valid YAML"):
        load_recipe(write(tmp_path, "model: a\nsft: x: y\n"))
    with pytest.raises(UserError, match="a recipe is a YAML mapping"):
        load_recipe(write(tmp_path, "- a\n- b\n"))


def _edgetune(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # What the `edgetune` console script runs, without depending on PATH.
    return subprocess.run([sys.executable, "-c", "from edgetune.cli import main; main()", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_cli_validate_prints_ok_or_every_problem(tmp_path):
    bad = write(tmp_path, MINIMAL + "  learnig_rate: 1\n  batch_size: 0\n", "bad.yaml")
    ok = _edgetune("recipe", "validate", *map(str, SHIPPED), cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines() == [f"{p}: OK" for p in SHIPPED]
    sft_recipe = REPO / "recipes" / "sft-tiny.yaml"  # `--set sft.seed` adds an sft section to any recipe
    res = _edgetune("recipe", "validate", str(sft_recipe), str(bad), "--set", "sft.seed=1", cwd=tmp_path)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert f"{bad}:6: sft.learnig_rate: unknown key; did you mean sft.learning_rate?" in res.stderr
    assert f"{bad}:7: sft.batch_size: must be at least 1, got 0" in res.stderr
    assert "error: 1 of 2 recipe(s) have problems" in res.stderr
