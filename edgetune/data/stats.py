"""`edgetune data stats`: what a built dataset folder holds.

Rows and persona shares per output, and with a tokenizer the token-length
distribution of each output, measured the way a trainer sees the rows: the
prompt rendered by the tokenizer's chat template with the generation prompt,
the completion as what rendering prompt + completion adds to that.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Iterator, Sequence

from edgetune.data.rules import OUTPUTS, SPLITS, UNTAGGED
from edgetune.errors import UserError

QUANTILES = (50, 90, 99)


def distribution(values: Sequence[int]) -> dict | None:
    """min, p50, p90, p99, max by the nearest-rank rule (a percentile is a value that occurs).

    Nearest rank: the p-th percentile of n sorted values is the one at rank
    ceil(p/100 * n). For [1..10]: p50 = 5, p90 = 9, p99 = 10. None when empty.
    """
    if not values:
        return None
    ordered = sorted(values)
    n = len(ordered)
    out = {"min": ordered[0]}
    for q in QUANTILES:
        out[f"p{q}"] = ordered[max(1, math.ceil(q / 100 * n)) - 1]
    out["max"] = ordered[-1]
    return out


def iter_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """`(line, row)` of one output file; a damaged file is a UserError naming the line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg}); rebuild this dataset") from None
            if not isinstance(row, dict) or "prompt" not in row:
                raise UserError(f"{path}:{lineno}: not a dataset row (no 'prompt'); rebuild this dataset")
            yield lineno, row


def output_files(folder: Path) -> dict[tuple[str, str], Path]:
    """The six outputs of a build folder; UserError if the folder is not one."""
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder; pass the --out folder of `edgetune data build`")
    files = {(s, o): folder / s / f"{o}.jsonl" for s in SPLITS for o in OUTPUTS}
    missing = [f"{s}/{o}.jsonl" for (s, o), p in files.items() if not p.is_file()]
    if missing:
        raise UserError(f"{folder}: not a dataset folder of `edgetune data build` "
                        f"(missing {', '.join(missing)})")
    return files


class TokenLengths:
    """Token counts of rows under one tokenizer's chat template."""

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("the tokenizer has no chat template, so prompts cannot be rendered as a "
                            "trainer would; pass the tokenizer of a chat (instruct) model")
        self.tokenizer = tokenizer

    def _count(self, messages: list[dict], generation_prompt: bool) -> int:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                                 tokenize=True, return_dict=False)
        return len(ids)

    def row(self, output: str, row: dict) -> dict[str, int]:
        """{"prompt", "completion" (or "chosen" and "rejected"), "total"} for one row.

        Raises whatever the template raises (callers name the file and line).
        """
        prompt = self._count(row["prompt"], True)
        if output == "dpo":
            chosen = self._count(row["prompt"] + row["chosen"], False)
            rejected = self._count(row["prompt"] + row["rejected"], False)
            return {"prompt": prompt, "chosen": chosen - prompt, "rejected": rejected - prompt,
                    "total": max(chosen, rejected)}
        total = self._count(row["prompt"] + row["completion"], False)
        return {"prompt": prompt, "completion": total - prompt, "total": total}


def load_tokenizer(name_or_path: str):
    """`AutoTokenizer.from_pretrained`, with a user-facing error when it cannot be loaded."""
    from transformers import AutoTokenizer  # heavy: only when asked for

    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise UserError(f"--tokenizer {name_or_path}: cannot load it ({str(e).splitlines()[0]}); pass a "
                        "local tokenizer folder or a Hugging Face id that is in the local cache") from None


def dataset_stats(folder: str | Path, tokenizer=None) -> dict:
    """Per `split/output`: rows, persona rows and shares, and token distributions with `tokenizer`."""
    files = output_files(Path(folder))
    lengths = TokenLengths(tokenizer) if tokenizer is not None else None
    stats = {}
    for (split, output), path in files.items():
        personas: Counter = Counter()
        tokens: dict[str, list[int]] = {}
        for lineno, row in iter_rows(path):
            personas[row.get("source", {}).get("persona", UNTAGGED)] += 1
            if lengths is None:
                continue
            try:
                counts = lengths.row(output, row)
            except Exception as e:  # a template raising on this row's roles is the user's data, not a bug
                raise UserError(f"{path}:{lineno}: the tokenizer's chat template rejects this row "
                                f"({type(e).__name__}: {e})") from None
            for key, n in counts.items():
                tokens.setdefault(key, []).append(n)
        rows = sum(personas.values())
        entry = {"rows": rows, "personas": {p: {"rows": n, "share": round(n / rows, 4)}
                                            for p, n in sorted(personas.items(), key=lambda kv: (-kv[1], kv[0]))}}
        if lengths is not None:
            entry["tokens"] = {key: distribution(v) for key, v in tokens.items()}
        stats[f"{split}/{output}"] = entry
    return stats


def render_stats(stats: dict) -> str:
    from edgetune.data.report import persona_summary, table

    lines = table(["output", "rows", "personas"],
                  [[name, f"{s['rows']:,}", persona_summary(s["personas"])] for name, s in stats.items()],
                  align="lrl")
    token_rows = [[name, key, *(str(d[k]) for k in ("min", "p50", "p90", "p99", "max"))]
                  for name, s in stats.items() for key, d in s.get("tokens", {}).items()]
    if token_rows:
        lines += ["", "tokens (chat template applied)"]
        lines += table(["output", "part", "min", "p50", "p90", "p99", "max"], token_rows, align="llrrrrr")
    return "\n".join(lines)
