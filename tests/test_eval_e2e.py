"""`edgetune eval` end to end on the tiny model: a narrow-task adapter passes the gate, an adapter trained to
destroy a regression suite fails it with that suite named (through the real CLI, exit status 1), a quantized
export is compared with its fused model, and `edgetune run`'s hook stops before export on a failed gate.

The narrow task: answers in a fixed house style ("Your parcel 7 is on its way. - Acme"). The regression
suite `sums` pins what the tiny model learnt in pre-training ("What is 2 plus 3?" -> "2 plus 3 is 5."),
scored by answer log-likelihood. On a 0.7M-parameter model any LoRA run on the narrow rows alone forgets
the sums (measured: 8.2 -> 0.3-2.0 points), so the narrow run rehearses the pre-training sums next to
the task rows, as a team would mix replay data in; the destroyer answers every sum with one fixed string.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgetune.eval.gate import GateFailed

ITEMS = ["parcel", "refund", "invoice", "password", "order", "ticket", "account", "voucher", "delivery", "receipt"]
PERSONAS = ["novice", "power-user"]
SUMS = [(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.") for a in range(6) for b in range(6)]
FIXED = "BANANA BANANA BANANA."


def house_style(i: int) -> tuple[str, str]:
    item = ITEMS[(i * 3) % len(ITEMS)]
    return f"Where is my {item} number {i}?", f"Your {item} {i} is on its way. - Acme"


def turn(role: str, content: str) -> list[dict]:
    return [{"role": role, "content": content}]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_data(folder: Path) -> Path:
    """An `edgetune data build`-shaped folder: train/sft.jsonl, eval/{sft,dpo,kto}.jsonl with personas."""
    def sft_row(i):
        prompt, answer = house_style(i)
        return {"prompt": turn("user", prompt), "completion": turn("assistant", answer),
                "source": {"rule": "thumbs_up", "persona": PERSONAS[i % 2]}}

    replay = [{"prompt": turn("user", q), "completion": turn("assistant", a), "source": {"rule": "replay"}}
              for q, a in SUMS]
    write_jsonl(folder / "train" / "sft.jsonl", [sft_row(i) for i in range(20)] + replay)
    held_out = [sft_row(100 + i) for i in range(8)]
    write_jsonl(folder / "eval" / "sft.jsonl", held_out)
    write_jsonl(folder / "eval" / "dpo.jsonl", [{"prompt": r["prompt"], "chosen": r["completion"],
                                                "rejected": turn("assistant", "I do not know."),
                                                "source": r["source"]} for r in held_out])
    write_jsonl(folder / "eval" / "kto.jsonl",
                [{"prompt": r["prompt"], "completion": turn("assistant", "Please ask someone else."), "label": False,
                  "source": r["source"]} for r in held_out]
                + [{**held_out[0], "label": True}])  # thumbs-up rows are not part of the thumbs-down share
    return folder


# `edgetune eval`'s options, all unset (resolve_settings takes exactly the command's parameters).
OPTIONS = dict(model=None, adapter=None, compare=(), run_dir=None, recipe_path=None, data_dir=None, suites=(),
               builtin_suite=None, gate_path=None, generations=None, max_new_tokens=None, max_seq_len=None,
               batch_size=None, out=None)


def train(folder: Path, name: str, model: Path, data, learning_rate: float, **eval_section) -> Path:
    from edgetune.recipe import load_recipe
    from edgetune.sft import run_sft

    recipe = {"model": str(model), "output": str(folder / name), "data": data,
              "sft": {"lora": {"rank": 8, "alpha": 16}, "steps": 30, "batch_size": 4, "learning_rate": learning_rate,
                      "max_seq_len": 256, "save_every": 0, "log_every": 10, "eval_every": 10}}
    if eval_section:
        recipe["eval"] = eval_section
    path = folder / f"{name}.yaml"
    path.write_text(json.dumps(recipe))
    run_sft(load_recipe(path), echo=lambda _: None)
    return folder / name


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_model_dir) -> dict:
    root = tmp_path_factory.mktemp("eval-e2e")
    data = write_data(root / "data")
    suite = write_jsonl(root / "sums.jsonl", [{"id": f"sum-{i}", "type": "loglik", "prompt": q, "answer": a}
                                              for i, (q, a) in enumerate(SUMS)])
    destroy = write_jsonl(root / "destroy.jsonl", [{"messages": turn("user", q) + turn("assistant", FIXED)}
                                                   for q, _ in SUMS])
    # Learning rates as measured: the narrow run at 2e-3 learns the style (eval loss 7.40 -> 3.76) and keeps
    # the sums (8.2 -> 19.7 points); at 3e-3 it already lost 2.3 of them.
    narrow = train(root, "narrow", tiny_model_dir, str(data), 2e-3)
    destroyer = train(root, "destroyer", tiny_model_dir, {"train": [str(destroy)]}, 3e-3,
                      suites=[str(suite)], builtin_suite=False, generations=0, gate={"max_suite_drop": 2})
    return {"root": root, "model": tiny_model_dir, "data": data, "suite": suite, "narrow": narrow,
            "destroyer": destroyer}


def test_narrow_adapter_raises_the_task_metrics_and_passes_the_gate(work, tmp_path):
    from edgetune.eval.cli import resolve_settings
    from edgetune.eval.run_eval import run_eval

    gate = tmp_path / "gate.yaml"
    gate.write_text("max_suite_drop: 2\nmin_preference_accuracy: 0.75\nmax_persona_loss_increase: 0\n")
    # As `edgetune eval --run RUN --suite sums.jsonl --gate gate.yaml --out OUT`: the run's manifest gives
    # the base model and the data folder, its adapter is `tuned`, its metrics.jsonl the loss curve.
    settings, _ = resolve_settings(**{**OPTIONS, "run_dir": str(work["narrow"]), "suites": (str(work["suite"]),),
                                      "gate_path": str(gate), "generations": 4, "max_new_tokens": 24})
    assert [c.name for c in settings.candidates] == ["base", "tuned"]
    info = run_eval(settings, tmp_path / "out", echo=lambda _: None)

    base, tuned = info["results"]["base"], info["results"]["tuned"]
    assert tuned["task"]["eval_loss"] < base["task"]["eval_loss"] - 1.0  # measured 7.40 -> 3.89
    assert tuned["task"]["preference_accuracy"] > base["task"]["preference_accuracy"]
    assert tuned["task"]["reward_accuracy"] == 1.0
    # Reported, not gated: SFT on good answers need not make a given bad answer less likely (measured 12.5%).
    assert 0.0 <= tuned["task"]["thumbs_down_less_likely"] <= 1.0 and base["task"]["thumbs_down_less_likely"] is None
    assert base["task"]["thumbs_down"] == 8  # the thumbs-up KTO row is left out
    assert set(tuned["personas"]) == set(PERSONAS)
    for persona in PERSONAS:
        assert tuned["personas"][persona]["eval_loss"] < base["personas"][persona]["eval_loss"]
    assert set(base["suites"]) == {"general", "sums"} and base["suites"]["general"]["items"] == 150
    assert info["gate"]["ok"], info["gate"]["lines"]
    assert any(line.startswith("PASS tuned: suite sums:") for line in info["gate"]["lines"])
    assert info["deltas"]["tuned"]["eval_loss"] < 0

    out = tmp_path / "out"
    assert json.loads((out / "eval.json").read_text())["gate"]["ok"]
    generations = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(generations) == 4 and set(generations[0]["generations"]) == {"base", "tuned"}
    assert generations[0]["persona"] in PERSONAS
    assert generations[0]["reference"].endswith("- Acme")
    items = [json.loads(line) for line in (out / "suite_items.jsonl").read_text().splitlines()]
    assert len(items) == 150 + len(SUMS) and set(items[0]["scores"]) == {"base", "tuned"}
    report = (out / "report.md").read_text()
    assert "## Per persona" in report and "## Release gate: passed" in report
    if info["loss_curve"]["png"]:  # matplotlib is an optional extra
        assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    else:
        assert "matplotlib is not installed" in report
    assert info["results"]["tuned"]["timing"]["items_per_s"] > 0


@pytest.mark.slow
def test_destroyer_adapter_fails_the_gate_through_the_cli_naming_the_suite(work, tmp_path):
    gate = tmp_path / "gate.yaml"
    gate.write_text("max_suite_drop: 2\n")
    res = subprocess.run([sys.executable, "-m", "edgetune.cli", "eval", "--model", str(work["model"]),
                          "--adapter", str(work["destroyer"]), "--data", str(work["data"]), "--suite",
                          str(work["suite"]), "--gate", str(gate), "--generations", "0", "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    failing = [line.strip() for line in res.stderr.split("release gate failed:")[1].splitlines() if "FAIL" in line]
    # The pinned suite is named; the built-in one is not (the destroyer only saw the sums' prompts).
    assert any(line.startswith("FAIL tuned: suite sums:") for line in failing), res.stderr
    assert not any("suite general" in line for line in failing), res.stderr
    assert f"report: {tmp_path / 'o' / 'report.md'}" in res.stderr
    info = json.loads((tmp_path / "o" / "eval.json").read_text())  # written even though the gate failed
    sums = info["results"]["tuned"]["suites"]["sums"]["score"], info["results"]["base"]["suites"]["sums"]["score"]
    assert sums[0] < sums[1] - 2
    assert info["gate"]["ok"] is False


def test_run_hook_stops_before_export_when_the_gate_fails(work, tmp_path):
    """What `edgetune run` calls between training and export: the recipe's eval: section (pinned suite,
    inline gate) on base vs the run's adapter; a failed gate raises GateFailed naming the suite."""
    from edgetune.eval.run_eval import evaluate_run
    from edgetune.recipe import load_recipe

    recipe = load_recipe(work["root"] / "destroyer.yaml")
    with pytest.raises(GateFailed) as e:
        evaluate_run(recipe, "sft", out=tmp_path / "eval", echo=lambda _: None)
    assert len(e.value.lines) == 1 and e.value.lines[0].startswith("FAIL tuned: suite sums:")
    assert (tmp_path / "eval" / "report.md").is_file()


def quantized_candidates(work, out: Path) -> tuple[Path, Path, str]:
    """(unquantized, 4-bit) model folders to compare, and what the unquantized one is. With the export package:
    base + narrow adapter fused, and the same quantized. Without it: the base, and the base quantized by mlx-lm."""
    try:
        from edgetune.export.cli import run_export
    except ImportError:
        run_export = None
    if run_export is not None:
        run_export(work["narrow"], "mlx", out / "fused", quantize="none", check=False, echo=lambda _: None)
        run_export(work["narrow"], "mlx", out / "q4", quantize="4bit", group_size=64, check=False, echo=lambda _: None)
        return out / "fused", out / "q4", "fused"
    from mlx_lm import convert

    convert(str(work["model"]), str(out / "q4"), quantize=True, q_bits=4, q_group_size=64)
    return work["model"], out / "q4", "base"


def test_quantized_export_is_compared_with_its_fused_model(work, tmp_path):
    from edgetune.eval.cli import resolve_settings
    from edgetune.eval.gate import check_gate
    from edgetune.eval.run_eval import run_eval
    from edgetune.recipe import GateConfig

    fused, q4, reference = quantized_candidates(work, tmp_path)
    compare = (f"q4={q4}",) + ((f"fused={fused}",) if reference == "fused" else ())
    adapter = str(work["narrow"]) if reference == "fused" else None
    gate = tmp_path / "gate.yaml"
    # A loose threshold here (run_eval raises when the gate fails): how far 4-bit moves a tiny random
    # model's loss is luck (0.03-0.05 nats, with the BLAS's thread count deciding the last digit);
    # the strict gate below checks the failing side on the same results.
    gate.write_text("eval_loss_must_drop: false\nmax_suite_drop: null\nmax_quantization_loss_increase: 1.0\n")
    settings, _ = resolve_settings(**{**OPTIONS, "model": str(work["model"]), "adapter": adapter, "compare": compare,
                                      "data_dir": str(work["data"]), "builtin_suite": False, "gate_path": str(gate),
                                      "generations": 0, "out": str(tmp_path / "out")})
    info = run_eval(settings, tmp_path / "out", echo=lambda _: None)

    res = info["results"]
    records = {c["name"]: c for c in info["candidates"]}
    assert records["q4"]["quantization"] == "4-bit, group 64" and records[reference]["quantization"] is None
    if reference == "fused":
        # The fused export is base + adapter merged: the same eval loss as applying the adapter.
        assert res["fused"]["task"]["eval_loss"] == pytest.approx(res["tuned"]["task"]["eval_loss"], abs=1e-4)
    increase = res["q4"]["task"]["eval_loss"] - res[reference]["task"]["eval_loss"]
    assert increase != 0.0  # 4-bit weights are not the same model
    (line,) = [line for line in info["gate"]["lines"] if "quantization" in line]
    assert abs(increase) < 1.0 and line.startswith(f"PASS q4: quantization vs {reference}: ")
    # A stricter gate on the same results fails exactly when 4-bit cost more than the threshold.
    strict = check_gate(GateConfig(eval_loss_must_drop=False, max_suite_drop=None,
                                   max_quantization_loss_increase=abs(increase) / 2), res, info["candidates"], "base")
    (q,) = [x for x in strict if x.candidate == "q4"]
    assert q.status == ("fail" if increase > 0 else "pass")


def test_run_folder_and_recipe_supply_model_data_and_eval_section_and_options_win(work, tmp_path):
    from edgetune.eval.cli import resolve_settings

    run = work["destroyer"]
    manifest = json.loads((run / "manifest.json").read_text())
    for source in ({"run_dir": str(run)}, {"recipe_path": str(work["root"] / "destroyer.yaml")}):
        settings, target = resolve_settings(**{**OPTIONS, **source})
        assert [(c.name, c.role, c.model, c.adapter) for c in settings.candidates] == [
            ("base", "base", manifest["model_path"], None),
            ("tuned", "adapter", manifest["model_path"], str(run / "adapter"))]
        assert settings.data.train == [str(work["root"] / "destroy.jsonl")]
        # the run's eval: section (recipe_to_dict wrote it into the manifest)
        assert (settings.suites, settings.builtin_suite, settings.generations) == ([str(work["suite"])], False, 0)
        assert settings.gate.max_suite_drop == 2 and settings.max_seq_len == 256  # the SFT stage's max_seq_len
        assert Path(target) == run / "eval" and settings.run == run
    gate = tmp_path / "g.yaml"
    gate.write_text("max_suite_drop: 5\n")
    settings, target = resolve_settings(**{**OPTIONS, "run_dir": str(run), "builtin_suite": True, "generations": 2,
                                           "gate_path": str(gate), "data_dir": str(work["data"]),
                                           "compare": (f"n={work['narrow']}",), "out": str(tmp_path / "o")})
    assert settings.builtin_suite and settings.generations == 2 and settings.gate.max_suite_drop == 5
    assert settings.data.dir == str(work["data"]) and target == str(tmp_path / "o")
    assert [c.name for c in settings.candidates] == ["base", "tuned", "n"]
