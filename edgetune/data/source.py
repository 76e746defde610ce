"""Reading log lines: every reader yields `(line_number, record_or_Invalid)`.

Readers never raise on bad lines: they yield `Invalid(reason)` so the build
can either report every error at once (strict) or count and skip them
(`--skip-invalid`). Only a missing/unreadable file raises `UserError`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

from edgetune.errors import UserError
from edgetune.fileio import open_text


@dataclass(frozen=True)
class Invalid:
    """A line that could not be read as a valid record; `reason` says why."""

    reason: str


SourceItem = tuple[int, Union[dict, Invalid]]


def decode_json(text: str) -> object:
    """`json.loads(text)`, or Invalid(reason) for a line it cannot read: never an exception."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        return Invalid(f"not valid JSON ({e.msg} at column {e.colno})")
    except ValueError:  # (after JSONDecodeError, a ValueError too) Python's limit on integer digits
        return Invalid(f"not readable as JSON (a number of more than {sys.get_int_max_str_digits()} digits)")
    except RecursionError:
        return Invalid("not readable as JSON (nested too deeply)")


def iter_jsonl(path: str | Path) -> Iterator[SourceItem]:
    """Yield `(line_number, obj)` for each non-blank line of a JSONL (or .jsonl.gz) file."""
    try:
        f = open_text(path)
    except OSError as e:
        raise UserError(f"{path}: cannot open ({e.strerror or e})") from None
    with f:
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                obj = decode_json(line)
                if type(obj) is Invalid:
                    yield lineno, obj
                    continue
                if not isinstance(obj, dict):
                    yield lineno, Invalid(f"expected a JSON object, got {type(obj).__name__}")
                    continue
                yield lineno, obj
        except (UnicodeDecodeError, EOFError, OSError) as e:
            raise UserError(f"{path}: cannot read file ({e}); is it UTF-8 JSONL or a complete .gz?") from None
