"""What `edgetune eval` writes: eval.json, a terminal table, report.md, and the loss curve.

The table and the report put the candidates side by side, one column each,
with each number's change against the base in parentheses. The loss curve of
the run's `metrics.jsonl` is drawn as `loss_curve.png` when matplotlib is
importable (`pip install "edgetune[plots]"`); without it the report shows the
curve as a table of sampled steps instead.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from edgetune.fileio import atomic_write, write_json

CURVE_FILE = "loss_curve.png"
CURVE_TABLE_POINTS = 12
# Metrics that are already a comparison with the base: no "(change)" after them.
AGAINST_BASE = ("reward_accuracy", "reward_margin", "thumbs_down_less_likely")


def write_outputs(folder: Path, info: dict, plan, raws: dict, data, item_records: dict, run: Path | None,
                  plots: bool = True) -> None:
    """Every output file into `folder` (the caller's temporary folder, renamed into place when done)."""
    names = [c["name"] for c in info["candidates"]]
    _write_jsonl(folder / "generations.jsonl", generation_records(plan, raws, data, names))
    _write_jsonl(folder / "suite_items.jsonl", suite_item_records(item_records, names))
    curve = read_loss_curve(run / "metrics.jsonl") if run is not None else None
    png = draw_loss_curve(curve, folder / CURVE_FILE) if curve and plots else None
    info["loss_curve"] = {"source": str(run / "metrics.jsonl"), "png": png,
                          "points": len(curve["train"]) if curve else 0} if run is not None else None
    write_json(folder / "eval.json", info)
    samples = [json.loads(line) for line in (folder / "generations.jsonl").read_text().splitlines()[:3]]
    (folder / "report.md").write_text(markdown_report(info, curve, png, samples), encoding="utf-8")
    # atomic_write's temp files are 0600; a report is meant to be read by the team (the umask decides).
    umask = os.umask(0)
    os.umask(umask)
    for f in folder.iterdir():
        os.chmod(f, 0o666 & ~umask)


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with atomic_write(path) as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def generation_records(plan, raws: dict, data, names: list[str]) -> list[dict]:
    """One line per sampled eval prompt: the prompt's last user turn, the reference answer, and each
    candidate's greedy reply side by side."""
    rows = {ex.id: ex for ex in data.sft}
    out = []
    for key in plan.prompt_keys:
        if key[0] != "sample":
            continue
        ex = rows[key[1]]
        prompt = ex.prompt if isinstance(ex.prompt, str) else ex.prompt[-1]["content"]
        reference = ex.completion if isinstance(ex.completion, str) else ex.completion[-1].get("content")
        out.append({"id": ex.id, "persona": data.personas.get(ex.id), "prompt": prompt, "reference": reference,
                    "generations": {n: raws[n].texts[key] for n in names}})
    return out


def suite_item_records(item_records: dict, names: list[str]) -> list[dict]:
    """One line per suite item with each candidate's score and reply (or picked choice)."""
    merged: dict = {}
    for name in names:
        for rec in item_records[name]:
            key = (rec["suite"], rec["id"])
            entry = merged.setdefault(key, {k: rec[k] for k in ("suite", "id", "type", "category")} | {"scores": {}})
            entry["scores"][name] = {k: v for k, v in rec.items() if k in ("score", "prediction", "picked")}
    return list(merged.values())


# --- numbers as text ------------------------------------------------------------------------------

def _fmt(value, kind: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return {"loss": f"{value:.4f}", "ppl": f"{value:.2f}", "pct": f"{100 * value:.1f}%", "nats": f"{value:+.2f}",
            "points": f"{value:.1f}"}[kind]


def _delta(value, base, kind: str) -> str:
    if value is None or base is None or any(isinstance(v, float) and math.isnan(v) for v in (value, base)):
        return ""
    d = value - base
    return {"loss": f" ({d:+.4f})", "ppl": f" ({d:+.2f})", "pct": f" ({100 * d:+.1f})", "nats": f" ({d:+.2f})",
            "points": f" ({d:+.1f})"}[kind]


def metric_rows(info: dict) -> list[list[str]]:
    """[label, cell per candidate]: task metrics, then one row per suite, changes against the base."""
    names = [c["name"] for c in info["candidates"]]
    res, base = info["results"], info["base"]
    bt = res[base]["task"]
    rows = []
    specs = [("eval_loss", "eval loss", "loss", f" ({bt['eval_rows']} rows)"),
             ("perplexity", "perplexity", "ppl", ""),
             ("preference_accuracy", "preference accuracy", "pct", f" ({bt['pairs']} pairs)"),
             ("preference_margin", "preference margin (nats/token)", "nats", ""),
             ("reward_accuracy", "reward accuracy vs base", "pct", ""),
             ("reward_margin", "reward margin vs base (nats)", "nats", ""),
             ("thumbs_down_less_likely", "thumbs-down less likely", "pct", f" ({bt['thumbs_down']} rows)")]
    for key, label, kind, count in specs:
        if all(res[n]["task"].get(key) is None for n in names):
            continue
        cells = []
        for n in names:
            v = res[n]["task"].get(key)
            cells.append(_fmt(v, kind) + ("" if n == base or key in AGAINST_BASE else _delta(v, bt.get(key), kind)))
        rows.append([label + count] + cells)
    for suite in res[base]["suites"]:
        b = res[base]["suites"][suite]["score"]
        cells = [_fmt(res[n]["suites"][suite]["score"], "points")
                 + ("" if n == base else _delta(res[n]["suites"][suite]["score"], b, "points")) for n in names]
        rows.append([f"suite {suite} ({res[base]['suites'][suite]['items']} items)"] + cells)
    return rows


def persona_rows(info: dict) -> list[list[str]]:
    """[persona metric, cell per candidate] for the eval loss, preference accuracy and thumbs-down share."""
    names = [c["name"] for c in info["candidates"]]
    res, base = info["results"], info["base"]
    rows = []
    for persona, bp in (res[base].get("personas") or {}).items():
        for key, label, kind in (("eval_loss", "eval loss", "loss"),
                                 ("preference_accuracy", "preference accuracy", "pct"),
                                 ("thumbs_down_less_likely", "thumbs-down less likely", "pct")):
            values = [res[n]["personas"][persona].get(key) for n in names]
            if all(v is None for v in values):
                continue
            cells = [_fmt(v, kind) + ("" if n == base or key in AGAINST_BASE else _delta(v, bp.get(key), kind))
                     for n, v in zip(names, values)]
            rows.append([f"{persona}: {label}"] + cells)
    return rows


def _align(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in [header] + rows)


def terminal_table(info: dict) -> str:
    names = [c["name"] for c in info["candidates"]]
    header = ["metric (change vs " + info["base"] + ")"] + names
    out = ["", _align(header, metric_rows(info))]
    personas = persona_rows(info)
    if personas:
        out += ["", _align(["per persona"] + names, personas)]
    timing = [[n, f"{t['items_per_s']:.1f}" if t["items_per_s"] else "-", f"{t['score_s'] + t['generate_s']:.1f}"]
              for n, t in ((n, info["results"][n]["timing"]) for n in names)]
    out += ["", _align(["speed", "items/s", "seconds"], timing)]
    if info.get("gate"):
        out += ["", "gate: " + ("passed" if info["gate"]["ok"] else "FAILED")] + \
               [f"  {line}" for line in info["gate"]["lines"]]
    return "\n".join(out)


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    esc = [[c.replace("|", "\\|") for c in r] for r in [header] + rows]
    return ["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |"
                                                                           for r in esc[1:]]


def markdown_report(info: dict, curve: dict | None, png: str | None, samples: list[dict]) -> str:
    names = [c["name"] for c in info["candidates"]]
    lines = [f"# Evaluation ({info['created']})", ""]
    lines += _md_table(["candidate", "role", "model", "adapter", "quantization"],
                       [[c["name"], c["role"], c["model"], c["adapter"] or "-", c["quantization"] or "-"]
                        for c in info["candidates"]])
    lines += ["", f"## Metrics (change against `{info['base']}` in parentheses)", ""]
    lines += _md_table(["metric"] + names, metric_rows(info))
    lines += ["", "Eval loss: mean negative log-probability per completion token of the eval split (nats), "
                  "tokenised as in training. Preference accuracy: held-out DPO pairs whose chosen answer is more "
                  "likely per token than the rejected one; reward accuracy: pairs where tuning raised the chosen "
                  "answer's log-probability more than the rejected one's (DPO's implicit reward, against the "
                  "base). Thumbs-down less likely: held-out thumbs-down completions now "
                  "less likely than under the base. Suites: 0-100 points."]
    personas = persona_rows(info)
    if personas:
        lines += ["", "## Per persona", ""] + _md_table(["persona: metric"] + names, personas)
    cats = []
    for suite, s in info["results"][info["base"]]["suites"].items():
        for cat in s["categories"]:
            cells = [_fmt(info["results"][n]["suites"][suite]["categories"][cat], "points") for n in names]
            cats.append([f"{suite} / {cat}"] + cells)
    if cats:
        lines += ["", "## Suite categories", ""] + _md_table(["suite / category"] + names, cats)
    if info.get("gate"):
        lines += ["", "## Release gate: " + ("passed" if info["gate"]["ok"] else "**FAILED**"), ""]
        lines += [f"- `{line}`" for line in info["gate"]["lines"]]
    if curve:
        lines += ["", "## Training loss", ""]
        if png:
            lines.append(f"![training and eval loss]({png})")
        else:
            lines += ["(matplotlib is not installed: `pip install \"edgetune[plots]\"` draws this as a PNG)", ""]
            lines += _md_table(["step", "train loss", "eval loss"], curve_table(curve))
    if samples:
        lines += ["", "## Sample generations (greedy; all in generations.jsonl)", ""]
        for s in samples:
            lines += [f"**{s['id']}**" + (f" ({s['persona']})" if s.get("persona") else ""), "",
                      f"- prompt: {_one_line(s['prompt'])}", f"- reference: {_one_line(s['reference'])}"]
            lines += [f"- {n}: {_one_line(text)}" for n, text in s["generations"].items()]
            lines.append("")
    timing = [[n, f"{t['items']}", f"{t['load_s']:.1f}", f"{t['score_s']:.1f}", f"{t['generate_s']:.1f}",
               f"{t['items_per_s']:.1f}" if t["items_per_s"] else "-"]
              for n, t in ((n, info["results"][n]["timing"]) for n in names)]
    lines += ["", "## Speed", ""] + _md_table(["candidate", "items", "load s", "score s", "generate s", "items/s"],
                                              timing)
    lines += ["", f"Batching: {info['settings']['batching']}, batch size {info['settings']['batch_size']}; "
                  f"BLAS: {info['settings']['blas']}.", ""]
    return "\n".join(lines)


def _one_line(text) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= 200 else text[:197] + "..."


# --- the loss curve -------------------------------------------------------------------------------

def read_loss_curve(path: Path) -> dict | None:
    """{"train": [(step, loss)], "eval": [(step, loss)]} from a run's metrics.jsonl; None when absent.
    Torn lines (a crash mid-write) and skipped steps (loss null) are left out."""
    if not path.is_file():
        return None
    train, evals = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec.get("eval"), dict) and rec["eval"].get("loss") is not None:
            evals.append((rec["step"], rec["eval"]["loss"]))
        elif rec.get("loss") is not None and "step" in rec:
            train.append((rec["step"], rec["loss"]))
    return {"train": train, "eval": evals} if train or evals else None


def curve_table(curve: dict) -> list[list[str]]:
    """Up to CURVE_TABLE_POINTS evenly spaced train steps (first and last included), with the eval loss
    at the steps that have one."""
    train, evals = curve["train"], dict(curve["eval"])
    n = len(train)
    picks = sorted({round(i * (n - 1) / (CURVE_TABLE_POINTS - 1)) for i in range(CURVE_TABLE_POINTS)}) if n else []
    steps = sorted({train[i][0] for i in picks} | set(evals))
    by_step = dict(train)
    return [[str(s), f"{by_step[s]:.4f}" if s in by_step else "-", f"{evals[s]:.4f}" if s in evals else "-"]
            for s in steps]


def draw_loss_curve(curve: dict, path: Path) -> str | None:
    """Draw train (and eval) loss against step into `path`; the file name, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: never open a window or need a display
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        if curve["train"]:
            ax.plot(*zip(*curve["train"]), label="train loss", linewidth=1)
        if curve["eval"]:
            ax.plot(*zip(*curve["eval"]), "o-", label="eval loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats per token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        with atomic_write(path, "wb") as f:
            fig.savefig(f, format="png")
    finally:
        plt.close(fig)
    return path.name
