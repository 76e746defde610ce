"""The build report: `report.json` (made by `build._report`) rendered for people.

report.json keys, all counts exact (lists of examples are capped at
`build.EXAMPLES`):

- `format`, `inputs` (path, sha256), `options` (as resolved)
- `records`: read, invalid, per type, superseded versions (a repeated id: the later line won)
- `invalid_examples`: `FILE:LINE: reason` of skipped records (`--skip-invalid`)
- `rules`: per rule, `in` (signals seen) and rows written to sft/dpo/kto
- `unused_assistant_messages`: rule 6, assistant messages without a signal
- `drops`: rows not written (or records not used), by reason
- `conflicts`: messages rated both up and down (used for nothing)
- `orphans`: split-out feedback that matches no assistant message, by reason
- `pii_redactions`: placeholders in the written files, by kind
- `outputs`: per split and output: rows, sha256, persona rows and shares
- `warnings`: e.g. one persona over half of an output
"""

from __future__ import annotations

RULE_TITLES = {
    "thumbs_up": "1 thumbs up",
    "correction": "2 correction chain",
    "edit": "3 edited response",
    "thumbs_down": "4 thumbs down",
    "comparison": "5 side-by-side",
}
SHOWN_PERSONAS = 4  # per output line; the rest are summed as "others"


def _n(value: int) -> str:
    return f"{value:,}"


def table(header: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    """Text table lines; `align` has one "l" or "r" per column (default: first left, others right)."""
    align = align or "l" + "r" * (len(header) - 1)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align)).rstrip()
            for r in [header, *rows]]


def persona_summary(personas: dict) -> str:
    """`analyst 50%, novice 30%, (none) 20%` from report.json's `personas` of one output."""
    items = list(personas.items())
    text = [f"{p} {v['share']:.0%}" for p, v in items[:SHOWN_PERSONAS]]
    if len(items) > SHOWN_PERSONAS:
        rest = sum(v["share"] for _, v in items[SHOWN_PERSONAS:])
        text.append(f"{len(items) - SHOWN_PERSONAS} others {rest:.0%}")
    return ", ".join(text) or "-"


def render_report(report: dict) -> str:
    """The human-readable summary of a build printed at the end of `edgetune data build`."""
    rec = report["records"]
    lines = [
        f"read {_n(rec['read'])} records from {len(report['inputs'])} file(s): "
        f"{_n(rec['conversation'])} conversations, {_n(rec['feedback'])} feedback, "
        f"{_n(rec['comparison'])} comparisons, {_n(rec['invalid'])} invalid" + (" (skipped)" if rec["invalid"] else ""),
    ]
    if rec["superseded_conversations"] or rec["superseded_comparisons"]:
        lines.append(f"newer versions replaced {_n(rec['superseded_conversations'])} conversation(s) and "
                     f"{_n(rec['superseded_comparisons'])} comparison(s) (the later line wins)")
    lines.append("")
    rows = [[RULE_TITLES[r], _n(v["in"]), _n(v["sft"]), _n(v["dpo"]), _n(v["kto"])]
            for r, v in report["rules"].items()]
    rows.append(["6 no signal (unused)", _n(report["unused_assistant_messages"]), "-", "-", "-"])
    rows.append(["6 conflict (up+down)", _n(report["conflicts"]["count"]), "-", "-", "-"])
    total = {o: sum(v[o] for v in report["rules"].values()) for o in ("sft", "dpo", "kto")}
    rows.append(["written", "", _n(total["sft"]), _n(total["dpo"]), _n(total["kto"])])
    lines += table(["rule", "in", "sft", "dpo", "kto"], rows)

    lines.append("")
    drops = report["drops"]
    lines += table(["dropped", "rows"], [[k, _n(v)] for k, v in drops.items()]) if drops else ["dropped: nothing"]
    orphans = report["orphans"]
    by_reason = ", ".join(f"{k} {_n(v)}" for k, v in orphans["by_reason"].items())
    lines.append(f"orphaned feedback: {_n(orphans['count'])}" + (f" ({by_reason})" if by_reason else ""))
    pii = report["pii_redactions"]
    lines.append("PII redacted: " + ", ".join(f"{k} {_n(v)}" for k, v in pii.items()))

    lines.append("")
    out_rows = []
    for split, outputs in report["outputs"].items():
        for output, info in outputs.items():
            out_rows.append([f"{split}/{output}.jsonl", _n(info["rows"]), persona_summary(info["personas"])])
    lines += table(["output", "rows", "personas"], out_rows, align="lrl")
    lines += [f"warning: {w}" for w in report["warnings"]]
    return "\n".join(lines)
