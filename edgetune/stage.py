"""What every training stage (sft, dpo, kto, orpo) does around the shared loop.

The run folder (refuse to overwrite, --force, --resume), the resume check
against the manifest, metrics.jsonl and the environment record. Each stage
module keeps its own visible flow and calls these.
"""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path

from edgetune.errors import UserError


def prepare_run_folder(out: Path, resume: bool, force: bool) -> None:
    """Create `out`; an existing non-empty folder needs `resume` (kept) or `force` (emptied).

    Raises UserError naming both options otherwise.
    """
    if out.exists() and any(out.iterdir()) and not resume:
        if not force:
            raise UserError(f"{out}: run folder already has files; pass --resume to continue it or --force to start over")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def check_resumable(path: Path, new: dict, section: str) -> None:
    """Refuse to resume when the data or training recipe changed since the checkpoint."""
    if not path.exists():
        return
    old = json.loads(path.read_text())
    if old.get("data_files") != new["data_files"]:
        raise UserError(f"{path.parent}: the training data changed since this run's checkpoints; "
                        "start a new run (another `output:`) or --force to start over")
    old_cfg, new_cfg = old.get("recipe", {}).get(section, {}), new["recipe"].get(section, {})
    changed = sorted(k for k in set(old_cfg) | set(new_cfg)
                     if k not in ("steps", "epochs", "eval_every", "save_every", "keep_checkpoints", "log_every")
                     and old_cfg.get(k) != new_cfg.get(k))
    if changed:
        raise UserError(f"{path.parent}: cannot resume, recipe keys changed since the checkpoint: "
                        + ", ".join(f"{section}.{k}" for k in changed))


class MetricsFile:
    """metrics.jsonl, appended per step; on resume, lines after the checkpoint step are dropped
    (those steps are redone), so the file always describes one consistent trajectory."""

    def __init__(self, path: Path, keep_until_step: int):
        self.path = path
        kept = []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a crash
                if rec.get("step", 0) <= keep_until_step:
                    kept.append(line)
        from edgetune.fileio import atomic_write

        with atomic_write(path) as f:
            f.writelines(line + "\n" for line in kept)
        self.records = [json.loads(line) for line in kept]

    def write(self, record: dict) -> None:
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def summary(self) -> dict:
        steps = [r for r in self.records if "loss" in r and r.get("loss") is not None]
        evals = [r for r in self.records if "eval" in r]
        tokens = sum(r.get("tokens", 0) for r in steps)
        return {
            "first_loss": steps[0]["loss"] if steps else None,
            "final_loss": steps[-1]["loss"] if steps else None,
            "final_eval": evals[-1]["eval"] if evals else None,
            "best_eval_loss": min((r["eval"]["loss"] for r in evals), default=None),
            "tokens": tokens,
            "skipped_steps": sum(1 for r in self.records if r.get("skipped")),
        }


def environment(backend) -> dict:
    import edgetune

    return {"edgetune": edgetune.__version__, "python": platform.python_version(),
            "platform": platform.platform(), **backend.describe()}


def run_manifest(stage: str, recipe, loaded, data, plan, steps: int, per_epoch: int, backend, model,
                 backend_why: str = "", **extra) -> dict:
    """manifest.json of a training stage: resolved recipe, data files and hashes, model, dtype, memory plan,
    schedule, trainable parameters, backend (and why) and environment; `extra` adds the stage's own keys."""
    from edgetune.recipe import recipe_to_dict

    return {
        "stage": stage,
        "recipe": recipe_to_dict(recipe),
        "data_files": data.files,
        "data_stats": data.stats,
        "model_path": str(loaded.path),
        **extra,
        "dtype": loaded.why_dtype,
        "memory_plan": plan.to_json(),  # the predicted peak by part, and why each `auto` value was chosen
        "steps": steps,
        "batches_per_epoch": per_epoch,
        "trainable_parameters": backend.trainable_count(model),
        "backend": {"name": backend.name, "why": backend_why},
        "environment": environment(backend),
    }


def start_or_resume(out: Path, manifest: dict, section: str, resume: bool, backend, model, optimizer,
                    echo) -> tuple:
    """Restore the newest complete checkpoint when resuming (after checking the recipe and
    data did not change), write the manifest, and open metrics.jsonl at the resumed step."""
    from edgetune import checkpoint as ckpt
    from edgetune.fileio import write_json
    from edgetune.trainer import restore

    state = ckpt.TrainerState(step=0, cursor=0)
    if resume:
        found = ckpt.latest_valid(out / "checkpoints", warn=lambda m: echo(f"warning: {m}"))
        if found is not None:
            check_resumable(out / "manifest.json", manifest, section)
            state = restore(backend, found, model, optimizer)
            echo(f"resuming from {found.name} (step {state.step}, {state.cursor} micro-batches consumed)")
        else:
            echo("no complete checkpoint found: starting from step 0")
    write_json(out / "manifest.json", manifest)
    return state, MetricsFile(out / "metrics.jsonl", keep_until_step=state.step)
