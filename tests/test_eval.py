"""edgetune eval: suite files, gate files and checks, the recipe's eval: section, the report, and the
scorer's parity with training (loss) and with mlx_lm.generate (greedy text), on the tiny model."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from edgetune.errors import InputError, UserError
from edgetune.eval.gate import GateFailed, check_gate, failed, load_gate, quantization_reference
from edgetune.eval.suites import builtin_suite_path, load_suites
from edgetune.recipe import GateConfig, RecipeError, load_recipe


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def suite_problems(tmp_path: Path, lines: list[str]) -> list[str]:
    path = write(tmp_path / "s.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(InputError) as e:
        load_suites([str(path)], builtin=False)
    return str(e.value).splitlines()


# --- suites -----------------------------------------------------------------------------------------

def test_builtin_suite_ships_150_varied_items_with_unique_ids():
    (suite,) = load_suites([], builtin=True)
    assert suite.name == "general" and len(suite.items) == 150
    assert {i.category for i in suite.items} == {"arithmetic", "formatting", "instruction", "facts"}
    assert set(suite.counts()) == {"exact", "contains", "choice", "loglik"}
    assert len({i.id for i in suite.items}) == 150
    assert min(suite.counts().values()) >= 20  # every scoring type is exercised, not a token few
    # It is package data: found through importlib.resources, next to the sample feedback log.
    assert builtin_suite_path().parent.name == "assets"


def test_builtin_arithmetic_answers_are_right():
    """Every 'What is A op B?' item's answer is recomputed here, so a typo in the asset fails the build."""
    (suite,) = load_suites([], builtin=True)
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "×": lambda a, b: a * b, "÷": lambda a, b: a / b}
    checked = 0
    for item in suite.items:
        m = re.fullmatch(r"What is (\d+) ([+\-×÷]) (\d+)\? Reply with the number only\.", item.prompt[-1]["content"])
        if m:
            value = ops[m[2]](int(m[1]), int(m[3]))
            assert value == int(value) and item.answers == (str(int(value)),), item
            checked += 1
    assert checked == 16


def test_suite_items_parse_all_four_types(tmp_path):
    path = write(tmp_path / "pinned.jsonl", "\n".join([
        '{"id": "a", "type": "exact", "prompt": "2+2?", "answer": "4", "max_tokens": 8}',
        '// comments and blank lines are skipped',
        '',
        '{"type": "contains", "prompt": [{"role": "system", "content": "Be brief."}, '
        '{"role": "user", "content": "Hi"}], "answer": ["hello", "hi"], "category": "greeting"}',
        '{"id": "c", "type": "choice", "prompt": "Pick", "choices": ["x", "y"], "answer": "y"}',
        '{"id": "d", "type": "loglik", "prompt": "Say OK", "answer": "OK"}',
    ]))
    (suite,) = load_suites([str(path)], builtin=False)
    assert suite.name == "pinned"
    a, b, c, d = suite.items
    assert (a.type, a.answers, a.max_tokens) == ("exact", ("4",), 8)
    assert b.id == f"{path}:4" and b.prompt[0]["role"] == "system" and b.answers == ("hello", "hi")
    assert (c.answers, c.answer_index) == (("x", "y"), 1)
    assert (d.type, d.answers) == ("loglik", ("OK",))


@pytest.mark.parametrize("line, message", [
    ('{"type": "exact", "prompt": "p", "answer": "a", "anwser": "a"}', "unknown key 'anwser'"),
    ('{"type": "regex", "prompt": "p", "answer": "a"}', "`type` must be one of exact, contains, choice, loglik"),
    ('{"type": "exact", "prompt": "p"}', "`answer` must be a non-empty string or a list of them"),
    ('{"type": "loglik", "prompt": "p", "answer": ["a", "b"]}', "`answer` must be a non-empty string; got"),
    ('{"type": "choice", "prompt": "p", "choices": ["a", "b"], "answer": 2}', "index (0 to 1) or the text"),
    ('{"type": "choice", "prompt": "p", "choices": ["a"], "answer": 0}', "at least two non-empty strings"),
    ('{"type": "choice", "prompt": "p", "choices": ["a", "a"], "answer": 0}', "the same choice twice"),
    ('{"type": "exact", "prompt": "", "answer": "a"}', "`prompt` must be a non-empty string"),
    ('{"type": "exact", "prompt": [{"role": "assistant", "content": "x"}], "answer": "a"}', "end with the user's turn"),
    ('{"type": "loglik", "prompt": "p", "answer": "a", "max_tokens": 5}', "applies to generated items"),
    ('{"type": "exact", "prompt": "p", "answer": "a", "case_sensitive": "yes"}', "must be true or false"),
    ('{"type": "exact", "prompt": "p", "answer": "a"', "not valid JSON"),
    ('["exact", "p", "a"]', "an item is a JSON object"),
])
def test_bad_suite_lines_are_named_with_file_and_line(tmp_path, line, message):
    (problem,) = suite_problems(tmp_path, ['{"type": "exact", "prompt": "ok", "answer": "ok"}', line])
    assert problem.startswith(f"{tmp_path / 's.jsonl'}:2: ") and message in problem, problem


def test_every_bad_suite_line_is_reported_at_once_and_ids_are_unique(tmp_path):
    problems = suite_problems(tmp_path, ['{"id": "x", "type": "exact", "prompt": "p", "answer": "a"}',
                                         '{"id": "x", "type": "exact", "prompt": "q", "answer": "b"}',
                                         '{"type": "nope"}'])
    assert len(problems) == 2
    assert "s.jsonl:2: id 'x' is already used on line 1" in problems[0]
    assert "s.jsonl:3:" in problems[1]


def test_suite_name_clash_and_missing_file_are_user_errors(tmp_path):
    write(tmp_path / "general.jsonl", '{"type": "exact", "prompt": "p", "answer": "a"}\n')
    with pytest.raises(UserError, match="a suite named 'general' is already loaded"):
        load_suites([str(tmp_path / "general.jsonl")], builtin=True)
    with pytest.raises(UserError, match="no such file"):
        load_suites([str(tmp_path / "missing.jsonl")], builtin=False)
    with pytest.raises(InputError, match="no items"):
        load_suites([str(write(tmp_path / "empty.jsonl", "\n"))], builtin=False)


# --- gate files and the recipe's eval: section ----------------------------------------------------

def test_gate_file_defaults_and_values(tmp_path):
    gate = load_gate(write(tmp_path / "gate.yaml", "max_suite_drop: 1\nsuite_max_drop: {pinned: 0}\n"
                                                   "min_thumbs_down_share: 0.6\n"))
    assert (gate.eval_loss_must_drop, gate.min_eval_loss_drop) == (True, 0.0)
    assert (gate.max_suite_drop, gate.suite_max_drop) == (1.0, {"pinned": 0.0})
    assert (gate.min_thumbs_down_share, gate.max_quantization_loss_increase) == (0.6, 0.05)


def test_gate_file_rejects_unknown_keys_and_bad_values_all_at_once(tmp_path):
    path = write(tmp_path / "gate.yaml", "max_suite_dropp: 2\nmin_thumbs_down_share: 1.5\n"
                                         "suite_max_drop: {general: -1}\ncandidates: tuned\n"
                                         "quantized_reference: {q4: 3}\n")
    with pytest.raises(RecipeError) as e:
        load_gate(path)
    lines = str(e.value).splitlines()
    assert f"{path}:1: max_suite_dropp: unknown key; did you mean max_suite_drop?" in lines
    assert f"{path}:2: min_thumbs_down_share: must be between 0 and 1, got 1.5" in lines
    assert any(line.startswith(f"{path}:3: suite_max_drop: drops must be at least 0") for line in lines)
    assert any(line.startswith(f"{path}:5: quantized_reference: expected a mapping of strings to strings")
               for line in lines)
    assert len(lines) == 4  # `candidates: tuned` is a list of one, as `train: a.jsonl` is


def test_gate_file_errors_for_unreadable_non_mapping_and_path(tmp_path):
    with pytest.raises(UserError, match="cannot read gate file"):
        load_gate(tmp_path / "missing.yaml")
    with pytest.raises(UserError, match="a gate file is a YAML mapping"):
        load_gate(write(tmp_path / "list.yaml", "- 1\n"))
    with pytest.raises(UserError, match="holds the thresholds themselves"):
        load_gate(write(tmp_path / "nested.yaml", "path: other.yaml\n"))


RECIPE = "model: ./m\noutput: run\ndata: d\nsft: {steps: 1}\n"


def test_recipe_eval_section_defaults_and_gate_file_shorthand(tmp_path):
    r = load_recipe(write(tmp_path / "r.yaml", RECIPE + "eval:\n  suites: [s/*.jsonl]\n  gate: gates/release.yaml\n"))
    e = r.eval
    assert e.suites == [str(tmp_path / "s" / "*.jsonl")] and e.builtin_suite is True
    assert (e.generations, e.max_new_tokens, e.max_seq_len, e.batch_size, e.compare, e.out) == (8, 96, None, 8, [],
                                                                                                  None)
    assert e.gate == GateConfig(path=str(tmp_path / "gates" / "release.yaml"))  # relative to the recipe
    assert load_recipe(write(tmp_path / "r2.yaml", RECIPE)).eval is None


def test_recipe_eval_gate_inline_and_its_errors(tmp_path):
    r = load_recipe(write(tmp_path / "r.yaml", RECIPE + "eval:\n  gate:\n    max_suite_drop: 0.5\n"
                                                        "    suite_max_drop: {pinned: 0}\n"))
    assert (r.eval.gate.max_suite_drop, r.eval.gate.suite_max_drop, r.eval.gate.path) == (0.5, {"pinned": 0.0}, None)
    path = write(tmp_path / "bad.yaml", RECIPE + "eval:\n  batchsize: 4\n  gate:\n    path: g.yaml\n"
                                                 "    max_suite_drop: 1\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    text = str(e.value)
    assert f"{path}:6: eval.batchsize: unknown key; did you mean eval.batch_size?" in text
    assert f"{path}:8: eval.gate.path: give either a gate file or inline thresholds, not both " \
           "(max_suite_drop set too)" in text


def test_recipe_override_reaches_into_the_gate(tmp_path):
    r = load_recipe(write(tmp_path / "r.yaml", RECIPE), ["eval.gate.suite_max_drop.pinned=1", "eval.generations=0"])
    assert r.eval.gate.suite_max_drop == {"pinned": 1.0} and r.eval.generations == 0


# --- gate checks on results (pure) ----------------------------------------------------------------

def results(loss, suites, **task):
    return {"task": {"eval_loss": loss, "pairs": 4, "thumbs_down": 5, **task}, "personas": {},
            "suites": {name: {"score": s} for name, s in suites.items()}}


CANDIDATES = [{"name": "base", "role": "base"}, {"name": "tuned", "role": "adapter"},
              {"name": "fused", "role": "model"}, {"name": "q4", "role": "model", "quantization": "4-bit, group 64"}]


def test_check_gate_lines_pass_fail_and_skip():
    res = {"base": results(2.0, {"general": 50.0, "pinned": 80.0}),
           "tuned": results(1.5, {"general": 48.0, "pinned": 70.0}, thumbs_down_less_likely=0.8,
                            preference_accuracy=None),
           "fused": results(1.5, {"general": 48.0, "pinned": 70.0}),
           "q4": results(1.58, {"general": 47.0, "pinned": 70.0})}
    gate = GateConfig(candidates=["tuned", "q4"], min_thumbs_down_share=0.5, min_preference_accuracy=0.6)
    lines = check_gate(gate, res, CANDIDATES, "base")
    text = [line.render() for line in lines]
    assert "PASS tuned: eval loss: 1.5000 vs base 2.0000 (-0.5000 nats; must drop)" in text
    # exactly 2 points down passes a limit of 2 (float means must not fail on rounding)
    assert "PASS tuned: suite general: 48.0 vs base 50.0 (-2.0 points; may fall at most 2)" in text
    assert "FAIL tuned: suite pinned: 70.0 vs base 80.0 (-10.0 points; may fall at most 2)" in text
    assert "SKIP tuned: preference accuracy: no held-out DPO pairs" in text
    assert any(t.startswith("PASS tuned: thumbs-down: 80.0% of 5") for t in text)
    assert "FAIL q4: suite general: 47.0 vs base 50.0 (-3.0 points; may fall at most 2)" in text
    # the quantized candidate is checked against the one unquantized merged model: fused
    assert "FAIL q4: quantization vs fused: eval loss 1.5800 vs 1.5000 (+0.0800 nats; may rise at most 0.05)" in text
    assert {(x.candidate, x.check) for x in failed(lines)} == {("tuned", "suite pinned"), ("q4", "suite general"),
                                                               ("q4", "suite pinned"),
                                                               ("q4", "quantization vs fused")}
    relaxed = GateConfig(suite_max_drop={"pinned": 10, "general": 3}, max_quantization_loss_increase=0.1,
                         quantized_reference={"q4": "tuned"})
    lines = check_gate(relaxed, res, CANDIDATES, "base")
    assert not failed(lines)
    assert "PASS q4: quantization vs tuned: eval loss 1.5800 vs 1.5000 (+0.0800 nats; may rise at most 0.1)" in \
        [line.render() for line in lines]


def test_check_gate_eval_loss_must_drop_by_the_minimum_and_is_skipped_without_data():
    res = {"base": results(2.0, {}), "tuned": results(1.99, {})}
    two = CANDIDATES[:2]
    assert not failed(check_gate(GateConfig(), res, two, "base"))
    (line,) = check_gate(GateConfig(min_eval_loss_drop=0.05), res, two, "base")
    assert line.status == "fail" and "must drop by at least 0.05" in line.text
    res = {"base": results(None, {}), "tuned": results(None, {})}
    (line,) = check_gate(GateConfig(), res, two, "base")
    assert line.status == "skip" and "no SFT eval rows" in line.text


def test_check_gate_persona_regression_is_named():
    res = {"base": results(2.0, {}), "tuned": results(1.0, {})}
    res["base"]["personas"] = {"novice": {"eval_loss": 2.0}, "power": {"eval_loss": 3.0}}
    res["tuned"]["personas"] = {"novice": {"eval_loss": 2.2}, "power": {"eval_loss": 0.5}}
    bad = failed(check_gate(GateConfig(max_persona_loss_increase=0.1), res, CANDIDATES[:2], "base"))
    assert [line.render() for line in bad] == [
        "FAIL tuned: persona novice: eval loss 2.2000 vs base 2.0000 (+0.2000 nats; may rise at most 0.1)"]


def test_check_gate_rejects_names_the_evaluation_does_not_have():
    res = {"base": results(2.0, {"general": 1.0}), "tuned": results(1.0, {"general": 1.0})}
    with pytest.raises(UserError, match="candidates q8 are not in this evaluation"):
        check_gate(GateConfig(candidates=["q8"]), res, CANDIDATES[:2], "base")
    with pytest.raises(UserError, match="suite_max_drop names pinned, which this evaluation does not run"):
        check_gate(GateConfig(suite_max_drop={"pinned": 1}), res, CANDIDATES[:2], "base")
    with pytest.raises(UserError, match="quantized_reference q4 -> fused"):
        check_gate(GateConfig(quantized_reference={"q4": "fused"}), res, CANDIDATES[:2], "base")


def test_quantization_reference_falls_back_to_base_plus_adapter_then_base():
    assert quantization_reference("q4", CANDIDATES, "base") == "fused"
    two_models = CANDIDATES + [{"name": "fused-2", "role": "model"}]
    assert quantization_reference("q4", two_models, "base") == "tuned"  # ambiguous exports: what was merged
    assert quantization_reference("q4", [CANDIDATES[0], CANDIDATES[3]], "base") == "base"


def test_gate_failed_message_lists_the_lines():
    e = GateFailed(["FAIL tuned: suite pinned: ..."], "out/report.md")
    assert str(e) == "release gate failed:\n  FAIL tuned: suite pinned: ..."


# --- the report ------------------------------------------------------------------------------------

def fake_info(gate_ok=True) -> dict:
    task = {"eval_loss": 2.0, "perplexity": 7.389, "eval_rows": 3, "eval_tokens": 30, "preference_accuracy": 0.5,
            "preference_margin": -0.1, "pairs": 2, "reward_accuracy": None, "reward_margin": None,
            "thumbs_down_less_likely": None, "thumbs_down": 2}
    tuned = {**task, "eval_loss": 1.5, "perplexity": 4.48, "preference_accuracy": 1.0, "reward_accuracy": 1.0,
             "reward_margin": 3.0, "thumbs_down_less_likely": 0.5}
    timing = {"load_s": 1.0, "score_s": 2.0, "generate_s": 1.0, "items": 12, "items_per_s": 4.0}
    suites = {"general": {"score": 40.0, "items": 10, "categories": {"facts": 50.0}}}
    return {
        "created": "2026-01-01T00:00:00Z", "base": "base",
        "candidates": [{"name": "base", "role": "base", "model": "m", "adapter": None, "quantization": None},
                       {"name": "tuned", "role": "adapter", "model": "m", "adapter": "a", "quantization": None}],
        "results": {"base": {"task": task, "suites": suites, "timing": timing,
                             "personas": {"novice": task}},
                    "tuned": {"task": tuned, "timing": timing, "personas": {"novice": tuned},
                              "suites": {"general": {"score": 37.5, "items": 10, "categories": {"facts": 40.0}}}}},
        "settings": {"batching": "length-grouped, as training", "batch_size": 8, "blas": "openblas"},
        "gate": {"ok": gate_ok, "lines": ["FAIL tuned: suite general: 37.5 vs base 40.0 (-2.5 points; ...)"]},
    }


def test_terminal_table_puts_candidates_side_by_side_with_changes():
    from edgetune.eval.report import terminal_table

    table = terminal_table(fake_info(gate_ok=False))
    assert re.search(r"eval loss \(3 rows\)\s+2\.0000\s+1\.5000 \(-0\.5000\)", table)
    assert re.search(r"preference accuracy \(2 pairs\)\s+50\.0%\s+100\.0% \(\+50\.0\)", table)
    assert re.search(r"reward accuracy vs base\s+-\s+100\.0%\n", table)  # already against the base: no change
    assert re.search(r"suite general \(10 items\)\s+40\.0\s+37\.5 \(-2\.5\)", table)
    assert re.search(r"novice: eval loss\s+2\.0000\s+1\.5000 \(-0\.5000\)", table)
    assert "gate: FAILED\n  FAIL tuned: suite general" in table


def test_loss_curve_png_with_matplotlib_and_a_table_without(tmp_path, monkeypatch):
    from edgetune.eval import report

    metrics = tmp_path / "metrics.jsonl"
    recs = [{"step": s, "loss": 3.0 - 0.1 * s} for s in range(1, 21)] + [{"step": 20, "eval": {"loss": 1.2}}]
    metrics.write_text("\n".join(json.dumps(r) for r in recs) + "\n{torn line\n")
    curve = report.read_loss_curve(metrics)
    assert len(curve["train"]) == 20 and curve["eval"] == [(20, 1.2)]
    rows = report.curve_table(curve)
    assert rows[0] == ["1", "2.9000", "-"] and rows[-1] == ["20", "1.0000", "1.2000"] and len(rows) == 12

    pytest.importorskip("matplotlib")
    assert report.draw_loss_curve(curve, tmp_path / "c.png") == "c.png"
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = report.markdown_report(fake_info(), curve, "c.png", [])
    assert "![training and eval loss](c.png)" in md

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    assert report.draw_loss_curve(curve, tmp_path / "d.png") is None and not (tmp_path / "d.png").exists()
    md = report.markdown_report(fake_info(), curve, None, [])
    assert "matplotlib is not installed" in md and "| 20 | 1.0000 | 1.2000 |" in md
    assert "## Release gate: passed" in md and "| general / facts | 50.0 | 40.0 |" in md


# --- candidates ------------------------------------------------------------------------------------

def test_parse_compare_tells_models_adapters_and_runs_apart(tmp_path):
    from edgetune.eval.run_eval import parse_compare

    (tmp_path / "exp" / "q4").mkdir(parents=True)
    write(tmp_path / "exp" / "q4" / "config.json", json.dumps({"quantization": {"bits": 4, "group_size": 64}}))
    (tmp_path / "run" / "adapter").mkdir(parents=True)
    write(tmp_path / "run" / "adapter" / "adapter_config.json", "{}")
    write(tmp_path / "run" / "adapter" / "adapters.safetensors", "")
    (tmp_path / "peft").mkdir()
    write(tmp_path / "peft" / "adapter_config.json", "{}")
    write(tmp_path / "peft" / "adapter_model.safetensors", "")

    taken = {"base"}
    q4 = parse_compare(str(tmp_path / "exp" / "q4"), "BASE", taken)
    assert (q4.name, q4.role, q4.model, q4.adapter) == ("q4", "model", str(tmp_path / "exp" / "q4"), None)
    assert q4.record()["quantization"] == "4-bit, group 64"
    run = parse_compare(f"mine={tmp_path / 'run'}", "BASE", taken)
    assert (run.name, run.role, run.model) == ("mine", "adapter", "BASE")
    assert run.adapter == str(tmp_path / "run" / "adapter")
    again = parse_compare(str(tmp_path / "run" / "adapter"), "BASE", taken)
    assert again.name == "run"  # an adapter/ folder is named after its run
    assert parse_compare(str(tmp_path / "run"), "BASE", taken).name == "run-2"
    with pytest.raises(UserError, match="a PEFT adapter.*edgetune export"):
        parse_compare(str(tmp_path / "peft"), "BASE", taken)
    with pytest.raises(UserError, match="no such folder"):
        parse_compare(str(tmp_path / "nope"), "BASE", taken)
    with pytest.raises(UserError, match="neither a model folder"):
        parse_compare(str(tmp_path / "exp"), "BASE", taken)


def edgetune(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "edgetune.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_cli_user_errors_exit_2_without_traceback(tmp_path):
    res = edgetune("eval", "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and "error: eval: no base model; give --model" in res.stderr
    (tmp_path / "o").mkdir()
    res = edgetune("eval", "--model", str(tmp_path), "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and "already exists; choose another --out or pass --force" in res.stderr
    res = edgetune("eval", "--model", str(tmp_path), "--out", str(tmp_path / "p"), "--gate",
                   str(write(tmp_path / "g.yaml", "max_suit_drop: 1\n")))
    assert res.returncode == 2 and "g.yaml:1: max_suit_drop: unknown key; did you mean max_suite_drop?" in res.stderr
    # Names in the gate are checked before any model is loaded (the --model here is not even one).
    res = edgetune("eval", "--model", str(tmp_path), "--out", str(tmp_path / "p"), "--gate",
                   str(write(tmp_path / "g.yaml", "suite_max_drop: {pinned: 1}\n")))
    assert res.returncode == 2 and "suite_max_drop names pinned, which this evaluation does not run" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "p").exists()


# --- the scorer against training and mlx_lm.generate (tiny model) ---------------------------------

PAIRS = [("What is the capital of France?", "Paris is the capital of France."), ("Hi", "Hello!"),
         ("Repeat after me: The map works offline once you download the region.",
          "The map works offline once you download the region."),
         ("How do I reset my password?", "Open settings, choose account, then tap reset password."),
         ("Name a fruit.", "An apple.")]


def test_eval_loss_equals_the_training_loop_evaluation(tiny_model_dir, tmp_path):
    """The scorer's length-grouped batches give the loss `edgetune sft` reports on the same rows."""
    from edgetune.eval.run_eval import Candidate, build_plan, EvalData, evaluate_candidate, load_candidate, task_metrics
    from edgetune.kernels import training_kernels
    from edgetune.sft import evaluate_loss, to_micro_batch
    from edgetune.sft_data import load_sft_rows, make_batches, tokenize_dataset

    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p}, {"role": "assistant",
                                                                                      "content": c}]}) + "\n"
                            for p, c in PAIRS))
    rows = load_sft_rows(str(path), "eval")
    scorer = load_candidate(Candidate("base", "base", str(tiny_model_dir)))
    plan = build_plan(EvalData(sft=rows), [], scorer.tokenizer, scorer.vocab_size, 128, 0, 8)
    raw = evaluate_candidate(scorer, plan, batch_size=2)
    ours = task_metrics(plan, raw, None, list(range(len(rows))), [], [])
    examples, _ = tokenize_dataset(rows, scorer.tokenizer, 128, "left", scorer.vocab_size)
    with training_kernels(scorer.model):  # as the training loop evaluates
        theirs = evaluate_loss(scorer.model, [to_micro_batch(b) for b in make_batches(examples, 3, 128, False, 0, 0)])
    assert ours["eval_loss"] == pytest.approx(theirs["loss"], rel=1e-6)
    assert ours["eval_rows"] == 5 and ours["perplexity"] == pytest.approx(theirs["perplexity"], rel=1e-4)


def test_batched_greedy_generation_equals_mlx_lm_generate(tiny_model_dir):
    from mlx_lm import generate

    from edgetune.eval.run_eval import Candidate, load_candidate

    scorer = load_candidate(Candidate("base", "base", str(tiny_model_dir)))
    tok = scorer.tokenizer
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p, _ in PAIRS]
    prompts = [tok.encode(t, add_special_tokens=False) for t in texts]
    assert len({len(p) for p in prompts}) > 2  # different lengths: left padding is exercised
    ours = scorer.generate(prompts, [24, 24, 12, 24, 24], batch_size=3)
    theirs = [generate(scorer.model, tok, prompt=t, max_tokens=n) for t, n in zip(texts, [24, 24, 12, 24, 24])]
    assert ours == theirs
