"""`edgetune run RECIPE`: every stage the recipe configures, in order, in one run folder.

    feedback logs -> data/ -> sft/ -> dpo/ | kto/ | orpo/ -> eval/ (gate) -> export/

Each stage's *fingerprint* hashes what its output depends on: its recipe
section, the base model, and the fingerprints of the stages it reads (the data
stage hashes the feedback logs' bytes). `pipeline.json` in the run folder
records, per stage, the fingerprint and whether it finished. Re-running:

- finished with the same fingerprint -> skipped;
- started with the same fingerprint but not finished (a crash, Ctrl-C,
  SIGKILL) -> the training stage resumes from its newest checkpoint;
- anything else -> the stage starts over (and so does everything after it,
  because their fingerprints include its own).

One visible flow in `run_pipeline`; each stage is the same function its own
command runs (`data build`, `sft`, `dpo`/`kto`/`orpo`, `eval`, `export`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Callable

from edgetune.errors import UserError
from edgetune.fileio import sha256_file, write_json

PIPELINE_FILE = "pipeline.json"
PREFERENCE_STAGES = ("dpo", "kto", "orpo")


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class Ledger:
    """pipeline.json: per stage {fingerprint, status, seconds, outputs}; rewritten atomically."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.stages = json.loads(path.read_text()).get("stages", {}) if path.exists() else {}
        except json.JSONDecodeError:
            self.stages = {}  # a damaged ledger only costs re-running stages

    def state(self, stage: str, fingerprint: str) -> str:
        """'done' (skip), 'partial' (resume) or 'new' (start over)."""
        entry = self.stages.get(stage)
        if not entry or entry.get("fingerprint") != fingerprint:
            return "new"
        return "done" if entry.get("status") == "done" else "partial"

    def mark(self, stage: str, fingerprint: str, status: str, **extra) -> None:
        self.stages[stage] = {"fingerprint": fingerprint, "status": status, **extra}
        write_json(self.path, {"stages": self.stages})


def stage_plan(recipe) -> list[str]:
    """The stages this recipe runs, in order."""
    plan = ["data"] if recipe.feedback is not None else []
    if recipe.sft is not None:
        plan.append("sft")
    preference = [s for s in PREFERENCE_STAGES if getattr(recipe, s) is not None]
    if len(preference) > 1:
        raise UserError(f"the recipe has {' and '.join(preference)} sections; `edgetune run` trains one "
                        "preference stage after SFT — keep one")
    plan += preference
    trains = any(s in plan for s in ("sft", *PREFERENCE_STAGES))
    if recipe.eval is not None and trains:
        plan.append("eval")  # the release gate: a failing gate stops the run before export
    if recipe.export is not None:
        if not trains:
            raise UserError("export: the recipe trains nothing to export; add an `sft:` or preference section, "
                            "or run `edgetune export MODEL_OR_ADAPTER` directly")
        plan.append("export")
    if not plan:
        raise UserError("the recipe configures no stage: add `feedback:` (data build), `sft:`, or a preference "
                        "section (`dpo:`, `kto:`, `orpo:`)")
    return plan


def run_pipeline(recipe, echo: Callable[[str], None] = print) -> dict:
    """Run (or continue) every stage of `recipe` in `recipe.output`; returns the run summary."""
    from edgetune.recipe import recipe_to_dict

    root = Path(recipe.output)
    root.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(root / PIPELINE_FILE)
    plan = stage_plan(recipe)
    resolved = recipe_to_dict(recipe)
    from edgetune.backends import choose_backend

    # The backend that will train: a switch (say mlx -> torch) retrains rather than resuming
    # another backend's checkpoints.
    base = _digest(resolved["model"], resolved.get("revision"), resolved.get("quantize"),
                   choose_backend(recipe.backend)[0])
    echo(f"run {root}: {' -> '.join(plan)}")

    upstream = ""  # the fingerprint chain: a changed stage invalidates everything after it
    results: dict[str, dict] = {}
    data_dir = Path(recipe.data.dir) if recipe.data is not None and recipe.data.dir else None
    adapter: Path | None = None
    started = time.perf_counter()
    for i, stage in enumerate(plan, 1):
        if stage == "data":
            logs = _feedback_logs(recipe.feedback)
            fingerprint = _digest(resolved["feedback"], [sha256_file(p) for p in logs])
        else:
            fingerprint = _digest(base, upstream, resolved[stage], _data_hashes(recipe, data_dir, stage))
        state = ledger.state(stage, fingerprint)
        header = f"== {i}/{len(plan)} {stage}"
        if state == "done":
            echo(f"{header}: unchanged since the last run, skipped")
            results[stage] = ledger.stages[stage].get("result", {})
        else:
            echo(f"{header}" + (": resuming the interrupted stage" if state == "partial" else ""))
            ledger.mark(stage, fingerprint, "running")
            t0 = time.perf_counter()
            if stage == "data":
                results[stage] = _run_data(recipe.feedback, logs, root / "data", echo)
            elif stage == "sft":
                results[stage] = _run_training(recipe, stage, root / stage, data_dir, None, state, echo)
            elif stage == "export":
                results[stage] = _run_export(recipe.export, adapter.parent, root, data_dir, echo)
            elif stage == "eval":
                results[stage] = _run_eval(recipe, adapter.parent.name, root, data_dir, adapter, echo)
            else:
                results[stage] = _run_training(recipe, stage, root / stage, data_dir, adapter, state, echo)
            ledger.mark(stage, fingerprint, "done", seconds=round(time.perf_counter() - t0, 1),
                        result=_jsonable(results[stage]))
        upstream = fingerprint
        if stage == "data":
            data_dir = root / "data"
        elif stage not in ("eval", "export"):
            adapter = root / stage / "adapter"

    summary = {"run": str(root), "stages": plan, "seconds": round(time.perf_counter() - started, 1),
               "results": _jsonable(results), "adapter": str(adapter) if adapter else None}
    write_json(root / "run_summary.json", summary)
    echo(summary_text(summary, recipe))
    return summary


# --- stages ---------------------------------------------------------------------------------------

def _feedback_logs(feedback) -> list[Path]:
    from edgetune.fileio import expand_inputs

    return expand_inputs(feedback.logs)


def _run_data(feedback, logs: list[Path], out: Path, echo) -> dict:
    from edgetune.data.build import BuildOptions, build
    from edgetune.data.report import render_report

    options = BuildOptions(eval_fraction=feedback.eval_fraction, seed=feedback.seed,
                           skip_invalid=feedback.skip_invalid, correction_prompt=feedback.correction_prompt,
                           max_persona_share=feedback.max_persona_share, format=feedback.format)
    report = build(logs, out, options, force=True, progress=echo)
    echo(render_report(report))
    return {"folder": str(out), "outputs": report.get("outputs")}


def _data_hashes(recipe, data_dir: Path | None, stage: str) -> list[str]:
    """Content hashes of the files a training stage reads (explicit files or a data folder)."""
    from edgetune.sft_data import data_files

    if data_dir is not None and recipe.feedback is not None:
        return []  # produced by the data stage: covered by its fingerprint
    data = _data_for(recipe, data_dir)
    try:
        if stage in PREFERENCE_STAGES:
            from edgetune.pref_data import preference_files

            kind = "kto" if stage == "kto" else "dpo"
            files = preference_files(data, "train", kind) + preference_files(data, "eval", kind)
        else:
            files = data_files(data)
    except UserError:
        return []  # the stage itself will report the missing data, with the right words
    return [sha256_file(p) for p in files]


def _data_for(recipe, data_dir: Path | None):
    from edgetune.recipe import DataConfig

    if data_dir is not None:
        return DataConfig(dir=str(data_dir))
    return recipe.data


def _stage_recipe(recipe, stage: str, out: Path, data_dir: Path | None, adapter: Path | None):
    """The recipe as the single-stage command sees it: its own run folder and the run's datasets."""
    changes = {"output": str(out), "data": _data_for(recipe, data_dir), "feedback": None}
    if stage in PREFERENCE_STAGES and adapter is not None:
        cfg = getattr(recipe, stage)
        if cfg.init_from == "base":
            # In a run with SFT, the preference stage continues the SFT adapter (the usual recipe).
            changes[stage] = dataclasses.replace(cfg, init_from=str(adapter))
    return dataclasses.replace(recipe, **changes)


def _run_training(recipe, stage: str, out: Path, data_dir: Path | None, adapter: Path | None, state: str,
                  echo) -> dict:
    """One training stage in its own folder of the run; `adapter`: the previous stage's, to continue."""
    from edgetune.preference import run_preference
    from edgetune.sft import run_sft

    stage_recipe = _stage_recipe(recipe, stage, out, data_dir, adapter)
    resume, force = state == "partial", state == "new"
    if stage == "sft":
        return run_sft(stage_recipe, resume=resume, force=force, echo=echo)
    return run_preference(stage_recipe, stage, resume=resume, force=force, echo=echo)


def _run_eval(recipe, stage: str, root: Path, data_dir: Path | None, adapter: Path, echo) -> dict:
    """Base vs the last stage's adapter, as the `eval:` section says; GateFailed stops the run here."""
    from edgetune.eval.run_eval import evaluate_run

    stage_recipe = _stage_recipe(recipe, stage, adapter.parent, data_dir, None)
    result = evaluate_run(stage_recipe, stage, out=root / "eval", echo=echo)
    return {"folder": str(root / "eval"), "gate": (result or {}).get("gate")}


def _run_export(export, trained_run: Path, root: Path, data_dir: Path | None, echo) -> dict:
    """One folder per format under export.out (default: {run}/export), from the last trained stage."""
    from edgetune.export.cli import run_export

    out_root = Path(export.out) if export.out else root / "export"
    eval_file = data_dir / "eval" / "sft.jsonl" if data_dir is not None else None
    results = {}
    for fmt in export.formats:
        quantize = {"mlx": export.quantize.mlx, "gguf": export.quantize.gguf}.get(fmt)
        results[fmt] = run_export(trained_run, fmt, out_root / fmt, quantize=quantize, group_size=export.group_size,
                                  force=True, eval_data=str(eval_file) if eval_file and eval_file.exists() else None,
                                  max_loss_increase=export.max_loss_increase, echo=echo)
    return {"folder": str(out_root), "formats": {fmt: str(out_root / fmt) for fmt in export.formats},
            "details": results}


# --- summary --------------------------------------------------------------------------------------

def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def summary_text(summary: dict, recipe) -> str:
    lines = ["", f"Run finished in {summary['seconds']:.0f} s: {summary['run']}"]
    results = summary["results"]
    if "data" in results:
        outs = results["data"].get("outputs") or {}
        train = outs.get("train") or {}
        lines.append(f"  data      {results['data']['folder']}: "
                     + ", ".join(f"{k} {v}" for k, v in train.items() if isinstance(v, int)))
    for stage in summary["stages"]:
        r = results.get(stage) or {}
        if stage in ("data", "export") or not r:
            continue
        ev = r.get("final_eval") or {}
        loss = f"loss {r['first_loss']:.3f} -> {r['final_loss']:.3f}" if r.get("final_loss") is not None else ""
        lines.append(f"  {stage:<9} {loss}" + (f"; eval loss {ev['loss']:.3f}" if ev.get("loss") is not None else "")
                     + f"  ({r.get('adapter', '')})")
    exported = (results.get("export") or {}).get("formats", {})
    for fmt, folder in exported.items():
        lines.append(f"  export    {fmt:<5} {folder}")
    lines += ["", "Chat with it:"]
    if "mlx" in exported:
        lines.append(f"  mlx_lm.generate --model {exported['mlx']} --prompt \"Hello\"    "
                     f"(or mlx_lm.server --model {exported['mlx']}; LM Studio opens the folder too)")
    elif summary.get("adapter"):
        lines.append(f"  mlx_lm.generate --model {recipe.model} --adapter-path {summary['adapter']} --prompt \"Hello\"")
    if "gguf" in exported:
        gguf_file = next(iter(sorted(Path(exported["gguf"]).glob("*.gguf"))), Path(exported["gguf"]) / "model.gguf")
        lines.append(f"  llama-cli -m {gguf_file} -cnv    or    ollama create my-model -f {Path(exported['gguf']) / 'Modelfile'}")
    return "\n".join(lines)
