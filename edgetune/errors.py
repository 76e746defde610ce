"""User-facing errors.

A `UserError` is a mistake the user can fix (bad input, bad recipe, missing
file). The CLI prints its message without a traceback and exits with status 2.
Anything else is a bug in edgetune and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; the message says what and how."""


class InputError(UserError):
    """One or more problems located in input files, each `FILE:LINE: reason`."""

    def __init__(self, problems: list[tuple[str, int | None, str]]):
        self.problems = problems
        super().__init__("\n".join(format_location(*p) for p in problems))


def format_location(path: str, line: int | None, reason: str) -> str:
    return f"{path}:{line}: {reason}" if line is not None else f"{path}: {reason}"
