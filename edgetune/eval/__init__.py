"""Evaluation that catches regressions: `edgetune eval` and the release gate.

- metrics.py: pure functions (loss, perplexity, preference accuracy/margin,
  thumbs-down share, suite scoring), tested on hand-worked numbers.
- suites.py: regression suite files (JSONL) and the built-in general suite
  (`edgetune/assets/eval_general.jsonl`).
- run_eval.py: candidates (base, base + adapter, exports) scored on the same
  items in length-grouped batches, one model in memory at a time;
  `evaluate_run(recipe, stage)` is what `edgetune run` calls before export.
- gate.py: thresholds -> one PASS/FAIL line per check; `GateFailed` (exit 1).
- report.py: eval.json, the terminal table, report.md and the loss curve.
- cli.py: the `edgetune eval` command.

Importing this package is cheap (no MLX): `edgetune.cli` imports `GateFailed`.
"""
