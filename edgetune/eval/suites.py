"""Regression suites: JSONL files of prompts with reference answers that a tuned model must not lose.

One item per line (blank lines and lines starting with `//` are skipped):

    {"id": "add-1", "type": "exact", "prompt": "What is 7 + 5? Reply with the number only.", "answer": "12"}
    {"type": "contains", "prompt": "Name the capital of Japan.", "answer": ["Tokyo"]}
    {"type": "choice", "prompt": "Which is a prime number?", "choices": ["9", "11", "15"], "answer": 1}
    {"type": "loglik", "prompt": "Say hello.", "answer": "Hello!"}

- `prompt`: the user's message (a string; the model's chat template wraps it),
  or a list of chat messages ending with the user's turn.
- `exact`: the greedy reply, normalised (case, spaces, trailing punctuation,
  see `metrics.normalize_answer`), must equal the answer (or one of a list).
- `contains`: one answer must appear in the greedy reply as whole words.
- `choice`: each of `choices` is scored as the whole assistant reply by
  log-likelihood; right when the `answer` (index or the choice's text) is the
  most likely. No generation, so it is cheap and deterministic.
- `loglik`: the per-token probability of `answer` as the reply, exp(mean
  token log-prob), 0-1; it moves smoothly, so it catches small regressions that
  right/wrong scores miss.
- optional: `id` (default FILE:LINE), `category` (sub-scores inside a suite),
  `max_tokens` (generation length for exact/contains; default 48),
  `case_sensitive` (exact/contains compare case too; default false).

A suite's score is the mean item score on a 0-100 scale. Its name is the file
name without `.jsonl`. The built-in general suite (`edgetune/assets/
eval_general.jsonl`: arithmetic, formatting, instruction following, short
facts) uses the same format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from edgetune.errors import InputError, UserError
from edgetune.fileio import expand_inputs

TYPES = ("exact", "contains", "choice", "loglik")
GENERATED = ("exact", "contains")
KEYS = {"id", "type", "prompt", "answer", "choices", "category", "max_tokens", "case_sensitive"}
DEFAULT_MAX_TOKENS = 48
BUILTIN_NAME = "general"
MAX_REPORTED_PROBLEMS = 20


@dataclass(frozen=True)
class SuiteItem:
    id: str
    type: str
    prompt: list[dict]  # chat messages, ending with the user's turn
    answers: tuple[str, ...]  # exact/contains: accepted answers; loglik: one reference; choice: the choices
    answer_index: int | None = None  # choice: index of the right choice
    category: str | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    case_sensitive: bool = False
    where: str = ""  # FILE:LINE, for messages


@dataclass(frozen=True)
class Suite:
    name: str
    file: str
    items: tuple[SuiteItem, ...]

    def counts(self) -> dict:
        out: dict = {}
        for item in self.items:
            out[item.type] = out.get(item.type, 0) + 1
        return out


def builtin_suite_path() -> Path:
    return Path(str(resources.files("edgetune") / "assets" / "eval_general.jsonl"))


def load_suites(patterns: list[str], builtin: bool) -> list[Suite]:
    """The built-in suite (when `builtin`) and each file matched by `patterns`, in that order.

    Raises UserError for a pattern matching nothing and for two suites with one
    name, and InputError listing up to MAX_REPORTED_PROBLEMS bad lines as FILE:LINE: reason.
    """
    paths = ([builtin_suite_path()] if builtin else []) + expand_inputs(patterns)
    suites, problems = [], []
    for i, path in enumerate(paths):
        name = BUILTIN_NAME if builtin and i == 0 else path.name.removesuffix(".jsonl")
        suite = read_suite(path, name, problems)
        if any(s.name == suite.name for s in suites):
            raise UserError(f"{path}: a suite named {suite.name!r} is already loaded (suites are named by file "
                            "name; the built-in one is `general`); rename the file")
        suites.append(suite)
    if problems:
        more = len(problems) - MAX_REPORTED_PROBLEMS
        raise InputError(problems[:MAX_REPORTED_PROBLEMS]
                         + ([(problems[-1][0], None, f"... and {more} more problems")] if more > 0 else []))
    return suites


def read_suite(path: Path, name: str, problems: list) -> Suite:
    """Parse one suite file, appending (file, line, reason) to `problems` for each bad line."""
    items, seen = [], {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read suite ({getattr(e, 'strerror', None) or e})") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("//"):
            continue
        try:
            raw = json.loads(line)
            item = parse_item(raw, f"{path}:{lineno}")
        except json.JSONDecodeError as e:
            problems.append((str(path), lineno, f"not valid JSON ({e.msg} at column {e.colno})"))
            continue
        except ValueError as e:
            problems.append((str(path), lineno, str(e)))
            continue
        if item.id in seen:
            problems.append((str(path), lineno, f"id {item.id!r} is already used on line {seen[item.id]}"))
            continue
        seen[item.id] = lineno
        items.append(item)
    if not items and not problems:
        problems.append((str(path), None, "no items; a suite holds one JSON object per line"))
    return Suite(name, str(path), tuple(items))


def parse_item(raw, where: str) -> SuiteItem:
    """One JSON value -> SuiteItem; raises ValueError saying what is wrong and what is expected."""
    if not isinstance(raw, dict):
        raise ValueError(f"an item is a JSON object with type, prompt and answer; got {type(raw).__name__}")
    unknown = sorted(set(raw) - KEYS)
    if unknown:
        raise ValueError(f"unknown key {', '.join(map(repr, unknown))}; valid keys: {', '.join(sorted(KEYS))}")
    kind = raw.get("type")
    if kind not in TYPES:
        raise ValueError(f"`type` must be one of {', '.join(TYPES)}; got {kind!r}")
    prompt = _prompt(raw.get("prompt"))
    item_id = raw.get("id", where)
    if not isinstance(item_id, (str, int)) or isinstance(item_id, bool):
        raise ValueError("`id` must be a string")
    category = raw.get("category")
    if category is not None and (not isinstance(category, str) or not category):
        raise ValueError("`category` must be a non-empty string")
    max_tokens = raw.get("max_tokens", DEFAULT_MAX_TOKENS)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= 4096:
        raise ValueError(f"`max_tokens` must be an integer from 1 to 4096; got {max_tokens!r}")
    if max_tokens != DEFAULT_MAX_TOKENS and kind not in GENERATED:
        raise ValueError(f"`max_tokens` applies to generated items (exact, contains), not {kind}")
    case_sensitive = raw.get("case_sensitive", False)
    if not isinstance(case_sensitive, bool):
        raise ValueError(f"`case_sensitive` must be true or false; got {case_sensitive!r}")
    if case_sensitive and kind not in GENERATED:
        raise ValueError(f"`case_sensitive` applies to generated items (exact, contains), not {kind}")
    answer = raw.get("answer")
    index = None
    if kind == "choice":
        choices = raw.get("choices")
        if not isinstance(choices, list) or len(choices) < 2 or not all(_text(c) for c in choices):
            raise ValueError("`choices` must be a list of at least two non-empty strings")
        if len(set(choices)) != len(choices):
            raise ValueError("`choices` has the same choice twice")
        if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
            index = answer
        elif isinstance(answer, str) and answer in choices:
            index = choices.index(answer)
        else:
            raise ValueError(f"`answer` must be the index (0 to {len(choices) - 1}) or the text of one of "
                             f"`choices`; got {answer!r}")
        answers = tuple(choices)
    else:
        if "choices" in raw:
            raise ValueError(f"`choices` applies to type choice, not {kind}")
        if _text(answer):
            answers = (answer,)
        elif kind != "loglik" and isinstance(answer, list) and answer and all(_text(a) for a in answer):
            answers = tuple(answer)
        else:
            want = "a non-empty string" if kind == "loglik" else "a non-empty string or a list of them"
            raise ValueError(f"`answer` must be {want}; got {answer!r}")
    return SuiteItem(str(item_id), kind, prompt, answers, index, category, max_tokens, case_sensitive, where)


def _text(value) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _prompt(value) -> list[dict]:
    if _text(value):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value:
        for i, m in enumerate(value):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"`prompt[{i}]` must be an object with `role` and `content` strings")
        if value[-1]["role"] != "user":
            raise ValueError(f"`prompt` must end with the user's turn; the last message is {value[-1]['role']!r}")
        return value
    raise ValueError("`prompt` must be a non-empty string (the user's message) or a list of chat messages")
