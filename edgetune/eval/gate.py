"""The release gate: thresholds on eval.json that decide whether a candidate ships.

A gate is the recipe's `eval.gate:` section or a YAML file of the same keys
(`edgetune eval --gate GATE.yaml`); its schema is `recipe.GateConfig`, so
unknown keys are rejected with their line and the closest valid key, and
every problem is reported at once. Example:

    eval_loss_must_drop: true          # the task got better ...
    max_suite_drop: 2                  # ... and no regression suite fell more than 2 points
    suite_max_drop: {pinned: 0}        # except this one, which may not fall at all
    max_quantization_loss_increase: 0.05
    min_thumbs_down_share: 0.6

`check_gate` turns the thresholds and an evaluation's results into one line
per check; the gate fails when any line fails. A check whose inputs are absent
(e.g. no eval split, so no eval loss) is listed as skipped, with why, and does
not fail the gate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from edgetune.errors import UserError


class GateFailed(Exception):
    """The gate failed; `lines` are the failing checks. The CLI prints them and exits with status 1."""

    def __init__(self, lines: list[str], report: str | None = None):
        self.lines = lines
        self.report = report
        super().__init__("release gate failed:\n" + "\n".join(f"  {line}" for line in lines))


@dataclass(frozen=True)
class GateLine:
    status: str  # "pass", "fail" or "skip"
    check: str  # short name: "eval loss", "suite general", "quantization q4", ...
    candidate: str
    text: str

    def render(self) -> str:
        return f"{self.status.upper():<4} {self.candidate}: {self.check}: {self.text}"


def load_gate(path: str | Path):
    """Read a gate file into a `GateConfig`; raises RecipeError naming every bad key with its line."""
    from edgetune.recipe import GateConfig, load_section_file

    gate = load_section_file(path, GateConfig, "gate file", "eval_loss_must_drop:, max_suite_drop:, ...")
    if gate.path is not None:
        raise UserError(f"{path}: `path` names a gate file from a recipe; a gate file holds the thresholds "
                        "themselves")
    return gate


def resolve_gate(gate):
    """A recipe's GateConfig that points to a file (`gate: FILE`) -> the file's GateConfig; else as is."""
    return load_gate(gate.path) if gate is not None and gate.path is not None else gate


def check_gate(gate, results: dict, candidates: list[dict], base: str) -> list[GateLine]:
    """One GateLine per check of `gate` (a GateConfig) on eval results.

    `results`: candidate name -> {"task": {...}, "personas": {...}, "suites": {...}} as in eval.json;
    `candidates`: eval.json's candidate records (name, quantization, role). Raises UserError when the gate
    names a candidate or suite the evaluation does not have.
    """
    names = [c["name"] for c in candidates]
    suites = list(results[base]["suites"])
    check_names(gate, names, suites)
    judged = gate.candidates or [n for n in names if n != base]
    b = results[base]
    lines: list[GateLine] = []
    for name in judged:
        c = results[name]
        lines += _task_lines(gate, name, c, b)
        lines += _suite_lines(gate, name, c, b, suites)
        lines += _persona_lines(gate, name, c, b)
    records = {c["name"]: c for c in candidates}
    for name in judged:
        if records[name].get("quantization") and gate.max_quantization_loss_increase is not None:
            ref = gate.quantized_reference.get(name) or quantization_reference(name, candidates, base)
            lines.append(_quantization_line(gate, name, ref, results))
    return lines


def check_names(gate, candidates: list[str], suites: list[str]) -> None:
    """Raise UserError when the gate names a candidate or suite the evaluation does not have (checked
    before any model is loaded, so a typo costs nothing)."""
    unknown = [n for n in gate.candidates if n not in candidates]
    if unknown:
        raise UserError(f"gate: candidates {', '.join(unknown)} are not in this evaluation "
                        f"(its candidates: {', '.join(candidates)})")
    unknown = [s for s in gate.suite_max_drop if s not in suites]
    if unknown:
        raise UserError(f"gate: suite_max_drop names {', '.join(unknown)}, which this evaluation does not run "
                        f"(suites: {', '.join(suites) or 'none'})")
    unknown = [f"{q} -> {r}" for q, r in gate.quantized_reference.items() if q not in candidates or r not in candidates]
    if unknown:
        raise UserError(f"gate: quantized_reference {', '.join(unknown)} names a candidate this evaluation does "
                        f"not have (its candidates: {', '.join(candidates)})")


def quantization_reference(name: str, candidates: list[dict], base: str) -> str:
    """What a quantized candidate is compared with when the gate does not say: the one unquantized merged
    model among the candidates (the fused export), else base + adapter (what the export merged), else base."""
    unquantized = [c["name"] for c in candidates
                   if c["role"] == "model" and not c.get("quantization") and c["name"] != name]
    if len(unquantized) == 1:
        return unquantized[0]
    adapters = [c["name"] for c in candidates if c["role"] == "adapter"]
    return adapters[0] if len(adapters) == 1 else base


def failed(lines: list[GateLine]) -> list[GateLine]:
    return [line for line in lines if line.status == "fail"]


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value)


def _task_lines(gate, name: str, c: dict, b: dict) -> list[GateLine]:
    out = []
    ct, bt = c.get("task") or {}, b.get("task") or {}
    if gate.eval_loss_must_drop:
        check = "eval loss"
        if not (_number(ct.get("eval_loss")) and _number(bt.get("eval_loss"))):
            out.append(GateLine("skip", check, name, "no SFT eval rows to compute it on"))
        else:
            change = ct["eval_loss"] - bt["eval_loss"]
            ok = change < 0 and -change >= gate.min_eval_loss_drop
            need = f"must drop by at least {gate.min_eval_loss_drop:g}" if gate.min_eval_loss_drop else "must drop"
            out.append(GateLine("pass" if ok else "fail", check, name,
                                f"{ct['eval_loss']:.4f} vs base {bt['eval_loss']:.4f} ({change:+.4f} nats; {need})"))
    if gate.min_preference_accuracy is not None:
        out.append(_min_share_line("preference accuracy", name, ct.get("preference_accuracy"),
                                   gate.min_preference_accuracy, "no held-out DPO pairs",
                                   f"of {ct.get('pairs', 0)} pairs"))
    if gate.min_thumbs_down_share is not None:
        out.append(_min_share_line("thumbs-down", name, ct.get("thumbs_down_less_likely"),
                                   gate.min_thumbs_down_share, "no held-out thumbs-down completions",
                                   f"of {ct.get('thumbs_down', 0)} thumbs-down completions less likely "
                                   "than under the base"))
    return out


def _min_share_line(check: str, name: str, share, minimum: float, missing: str, what: str) -> GateLine:
    """A share that must reach `minimum`; skipped when there was nothing to measure it on."""
    if not _number(share):
        return GateLine("skip", check, name, missing)
    return GateLine("pass" if share >= minimum else "fail", check, name,
                    f"{share:.1%} {what} (needs at least {minimum:.1%})")


def _suite_lines(gate, name: str, c: dict, b: dict, suites: list[str]) -> list[GateLine]:
    out = []
    for suite in suites:
        limit = gate.suite_max_drop.get(suite, gate.max_suite_drop)
        if limit is None:
            continue
        cs, bs = c["suites"][suite]["score"], b["suites"][suite]["score"]
        change = cs - bs
        ok = -change <= limit + 1e-9  # scores are means of floats: "exactly 2 points" must pass a limit of 2
        out.append(GateLine("pass" if ok else "fail", f"suite {suite}", name,
                            f"{cs:.1f} vs base {bs:.1f} ({change:+.1f} points; may fall at most {limit:g})"))
    return out


def _persona_lines(gate, name: str, c: dict, b: dict) -> list[GateLine]:
    if gate.max_persona_loss_increase is None:
        return []
    out = []
    for persona, cp in (c.get("personas") or {}).items():
        bp = (b.get("personas") or {}).get(persona) or {}
        if not (_number(cp.get("eval_loss")) and _number(bp.get("eval_loss"))):
            continue
        change = cp["eval_loss"] - bp["eval_loss"]
        ok = change <= gate.max_persona_loss_increase
        out.append(GateLine("pass" if ok else "fail", f"persona {persona}", name,
                            f"eval loss {cp['eval_loss']:.4f} vs base {bp['eval_loss']:.4f} ({change:+.4f} nats; "
                            f"may rise at most {gate.max_persona_loss_increase:g})"))
    if not out:
        out.append(GateLine("skip", "personas", name, "the eval rows carry no personas"))
    return out


def _quantization_line(gate, name: str, ref: str, results: dict) -> GateLine:
    check = f"quantization vs {ref}"
    q, r = (results[name].get("task") or {}).get("eval_loss"), (results[ref].get("task") or {}).get("eval_loss")
    if not (_number(q) and _number(r)):
        return GateLine("skip", check, name, "no SFT eval rows to compare the losses on")
    change = q - r
    ok = change <= gate.max_quantization_loss_increase
    return GateLine("pass" if ok else "fail", check, name,
                    f"eval loss {q:.4f} vs {r:.4f} ({change:+.4f} nats; may rise at most "
                    f"{gate.max_quantization_loss_increase:g})")
