"""Other tools' feedback exports, read as v1 records (`/work/shared/spec/feedback-v1.md`).

`iter_records(fmt, path)` yields `(line_number, record_or_Invalid)` like
`source.iter_jsonl`, where each record is a v1 dict (`conversation`,
`feedback` or `comparison`) made from one export line. A line may give
several records (a Langfuse trace with its scores embedded) or one
`Invalid("field: what is wrong")`. Each format's module says exactly how its
fields map to v1:

- `langfuse`: traces and scores (`langfuse.py`)
- `langsmith`: runs and feedback (`langsmith.py`)
- `openai`: chat and preference fine-tuning files (`openai.py`)
- `v1`: edgetune's own format, read as it is

Conversion is per line and keeps no state, so reading a file twice gives the
same records in the same order (the build reads it in two passes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

from edgetune.data.importers import langfuse, langsmith, openai
from edgetune.data.source import Invalid, SourceItem, iter_jsonl
from edgetune.errors import UserError

_CONVERTERS: dict[str, Callable[[dict, str], Iterator[dict | Invalid]]] = {
    "langfuse": langfuse.records_from_line,
    "langsmith": langsmith.records_from_line,
    "openai": openai.records_from_line,
}
FORMATS = ("v1", *_CONVERTERS)


def iter_records(fmt: str, path: str | Path) -> Iterator[SourceItem]:
    """Yield `(line_number, v1_record_or_Invalid)` for every record of one export file.

    Raises `UserError` at once (not on first iteration) for an unknown `fmt`,
    and, while iterating, for a file that cannot be opened or read.
    """
    if fmt == "v1":
        return iter_jsonl(path)
    convert = _CONVERTERS.get(fmt)
    if convert is None:
        raise UserError(f"unknown feedback format {fmt!r}: expected one of {', '.join(FORMATS)} (--format)")
    return _converted(convert, path)


def _converted(convert, path: str | Path) -> Iterator[SourceItem]:
    for lineno, obj in iter_jsonl(path):
        if isinstance(obj, Invalid):
            yield lineno, obj
            continue
        for record in convert(obj, f"{path}:{lineno}"):
            yield lineno, record
