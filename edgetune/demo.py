"""`edgetune demo`: the whole pipeline, offline, on the embedded tiny model.

Uses only what ships in the package: the sample feedback log
(`edgetune/assets/sample_feedback.jsonl`) and the tiny-model builder. Each
stage prints its own progress; the demo ends with a before/after generation on
held-out prompts and a summary (`demo_summary.json`).
"""

from __future__ import annotations

import json
import shutil
import time
from importlib import resources
from pathlib import Path
from typing import Callable

from edgetune.errors import UserError
from edgetune.fileio import write_json

DEMO_SFT = {
    "lora": {"rank": 16, "alpha": 32},
    "epochs": 3,
    "batch_size": 4,
    "learning_rate": 1.0e-3,
    "warmup_steps": 5,
    "lr_schedule": "cosine",
    "max_seq_len": 512,
    "packing": False,
    "save_every": 50,
    "eval_every": 50,
    "log_every": 10,
}


def sample_log() -> Path:
    return Path(str(resources.files("edgetune") / "assets" / "sample_feedback.jsonl"))


def run_demo(out: Path, force: bool = False, echo: Callable[[str], None] = print) -> dict:
    from edgetune.data.build import build
    from edgetune.data.report import render_report
    from edgetune.model.tiny import build_tiny_model
    from edgetune.recipe import load_recipe
    from edgetune.sft import run_sft

    out = Path(out)
    if out.exists():
        if not force:
            raise UserError(f"{out}: already exists; pass --force to replace it or choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    started = time.perf_counter()

    echo("== 1/3 feedback log -> datasets (edgetune data build)")
    report = build([sample_log()], out / "data", progress=echo)
    echo(render_report(report))

    echo("== 2/3 tiny model (edgetune model tiny)")
    model_dir = build_tiny_model(out / "model", arch="qwen2", preset="tiny", seed=0)
    echo(f"built {model_dir}")

    echo("== 3/3 LoRA SFT on the thumbs-up and corrected answers (edgetune sft)")
    recipe_path = out / "recipe.yaml"
    recipe_path.write_text(json.dumps({"model": "./model", "output": "./runs/sft", "data": "./data",
                                       "sft": DEMO_SFT}, indent=2))
    sft = run_sft(load_recipe(recipe_path), echo=echo)

    samples = _before_after(model_dir, out / "runs" / "sft" / "adapter", out / "data" / "eval" / "sft.jsonl")
    summary = {
        "seconds": round(time.perf_counter() - started, 1),
        "data": {split: report.get("outputs", {}).get(split) for split in ("train", "eval")},
        "sft": {k: sft.get(k) for k in ("first_loss", "final_loss", "final_eval", "steps", "adapter")},
        "samples": samples,
    }
    write_json(out / "demo_summary.json", summary)
    echo(_render(summary, out))
    return summary


def _before_after(model_dir: Path, adapter: Path, eval_rows: Path, n: int = 2) -> list[dict]:
    """Greedy answers of the base model and of base + adapter on held-out prompts."""
    from mlx_lm import generate, load

    rows = [json.loads(line) for line in eval_rows.read_text().splitlines()[:n]]
    base, tok = load(str(model_dir))
    tuned, _ = load(str(model_dir), adapter_path=str(adapter))
    out = []
    for row in rows:
        prompt = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
        out.append({
            "prompt": row["prompt"][-1]["content"],
            "reference": row["completion"][0]["content"],
            "base": generate(base, tok, prompt=prompt, max_tokens=48),
            "tuned": generate(tuned, tok, prompt=prompt, max_tokens=48),
        })
    return out


def _render(summary: dict, out: Path) -> str:
    sft = summary["sft"]
    ev = sft.get("final_eval") or {}
    lines = ["", "Demo finished in %.0f s" % summary["seconds"],
             f"  SFT loss       {sft['first_loss']:.3f} -> {sft['final_loss']:.3f}"
             + (f"; eval loss {ev['loss']:.3f}" if ev else ""),
             f"  adapter        {sft['adapter']}",
             f"  summary        {out / 'demo_summary.json'}"]
    for s in summary["samples"]:
        lines += ["", f"  prompt     {s['prompt'][:100]}", f"  reference  {s['reference'][:100]}",
                  f"  base       {s['base'][:100]!r}", f"  tuned      {s['tuned'][:100]!r}"]
    return "\n".join(lines)
