"""Langfuse exports (traces and scores, JSONL) read as v1 records.

A line is a **score** when it has `traceId`, `dataType`, `stringValue` or
`observationId` (or `name` and `value` and no `input`/`output`); otherwise it
is a **trace** (`id`, `input`, `output`). Field names follow Langfuse's public
API (`/api/public/traces`, `/api/public/scores`) and its UI table export.

Trace -> `conversation`:
- `conversation_id` = `id`; `timestamp` = `timestamp`.
- messages = the `input` (a string becomes one user message; a list of chat
  messages, or an object with such a list under `messages`, is taken as is,
  with ids `m1`, `m2`, ...), then the `output` (a string, or a message object
  with `content`) as the assistant message with id `"output"`.
- `persona` = `metadata.persona` when present, else `userId` (an individual
  user, so the diversity report then shows whether a few users dominate).
- `metadata` = `{"source": "langfuse"}` plus `session_id`, `user_id`, `name`
  when the trace has them.
- Scores embedded in the trace (`scores: [{...}]`, as in the UI's trace
  download) are read as score lines; score ids (strings) are ignored.

Score -> `feedback` on message `"output"` of conversation `traceId`:
- `BOOLEAN`: `value` 1/0 (or true/false) -> up/down.
- `NUMERIC`: read as a 0..1 score or a -1/1 vote: `value >= 0.5` is up,
  lower is down; a value outside [-1, 1] (a scale we cannot know) is invalid.
- `CATEGORICAL`: `stringValue` (or a string `value`) must be a rating label
  (up/down, thumbs_up/thumbs_down, good/bad, correct/incorrect, yes/no, ...);
  other categories (`topic: billing`) are invalid lines, so they are reported
  rather than silently dropped (`--skip-invalid` counts and skips them).
- `CORRECTION`: the corrected output (`stringValue`, or a string `value`) ->
  `edited_content`.
- `TEXT` and unknown data types are invalid. Without `dataType`, the type of
  `value` decides (boolean, number, or a string label).
- `comment` -> `comment`; `timestamp` -> `timestamp`.
- `observationId` is not used: the export does not say which message an
  observation produced, so every score of a trace rates the trace's output.
  A score without `traceId` (session or dataset-run scores) is invalid.

Scores may come before their trace, or without it: they are yielded as they
are read, and the build joins them (orphans are reported there).
"""

from __future__ import annotations

from typing import Iterator

from edgetune.data.importers._common import (
    OUTPUT_ID, Bad, chat_messages, describe, numbered, optional_object, optional_str, rating_from_label,
    rating_from_number, required_str, text_content,
)
from edgetune.data.source import Invalid

_SCORE_KEYS = ("traceId", "dataType", "stringValue", "observationId")


def records_from_line(obj: dict, line_id: str) -> Iterator[dict | Invalid]:
    """The v1 records of one decoded export line (`line_id` is unused: ids come from Langfuse)."""
    is_score = any(k in obj for k in _SCORE_KEYS) or (
        "name" in obj and "value" in obj and "input" not in obj and "output" not in obj)
    try:
        if is_score:
            yield score_to_feedback(obj)
            return
        if "input" not in obj and "output" not in obj:
            raise Bad("expected a Langfuse trace (id, input, output) or score (traceId, name, value); "
                      f"got keys {', '.join(sorted(obj)) or 'none'}")
        conversation = trace_to_conversation(obj)
    except Bad as e:
        yield Invalid(str(e))
        return
    yield conversation
    embedded = obj.get("scores")
    if type(embedded) is list:
        for i, score in enumerate(embedded):
            if type(score) is str:  # a score id: the score itself is elsewhere
                continue
            try:
                if type(score) is not dict:
                    raise Bad(f"expected a score object or id, got {describe(score)}")
                yield score_to_feedback({"traceId": conversation["conversation_id"], **score})
            except Bad as e:
                yield Invalid(f"scores[{i}].{e}")


def trace_to_conversation(trace: dict) -> dict:
    """A v1 `conversation` from a Langfuse trace; raises `Bad`."""
    trace_id = required_str(trace, "id")
    metadata = optional_object(trace, "metadata")
    persona = optional_str(metadata, "persona", "metadata.") or optional_str(trace, "userId")
    turns = _input_turns(trace.get("input"))
    output = trace.get("output")
    if output is None:
        raise Bad("output: missing; a trace without an output has no assistant message to rate")
    messages = numbered(turns) + [{"id": OUTPUT_ID, "role": "assistant", "content": _output_text(output)}]
    record = {"type": "conversation", "conversation_id": trace_id}
    if persona:
        record["persona"] = persona
    if (timestamp := optional_str(trace, "timestamp")) is not None:
        record["timestamp"] = timestamp
    record["metadata"] = {"source": "langfuse"}
    for key, name in (("sessionId", "session_id"), ("userId", "user_id"), ("name", "name")):
        if (value := optional_str(trace, key)) is not None:
            record["metadata"][name] = value
    record["messages"] = messages
    return record


def _input_turns(value) -> list[tuple[str, str]]:
    if value is None:
        raise Bad("input: missing; a trace needs the user's input to make a prompt")
    if type(value) is str:
        return [("user", value)]
    if type(value) is dict:
        if "messages" not in value:
            raise Bad("input: expected a string, a list of chat messages or an object with `messages`, "
                      f"got an object with keys {', '.join(sorted(value)) or 'none'}")
        return chat_messages(value["messages"], "input.messages")
    return chat_messages(value, "input")


def _output_text(value) -> str:
    if type(value) is str:
        return value
    if type(value) is dict and "content" in value:
        role = value.get("role", "assistant")
        if role != "assistant":
            raise Bad(f"output.role: expected an assistant message, got role {role!r}")
        return text_content(value["content"], "output.content")
    raise Bad(f"output: expected a string or a message with `content`, got {describe(value)}")


def score_to_feedback(score: dict) -> dict:
    """A v1 `feedback` record from a Langfuse score; raises `Bad`."""
    trace_id = score.get("traceId")
    if trace_id is None:
        raise Bad("traceId: missing; only trace scores can rate a message (session and dataset-run "
                  "scores cannot)")
    trace_id = required_str(score, "traceId")
    record = {"type": "feedback", "conversation_id": trace_id, "message_id": OUTPUT_ID}
    data_type = score.get("dataType")
    value = score.get("value")
    string_value = optional_str(score, "stringValue")
    if data_type is None:  # older exports: the value's type says it
        data_type = {bool: "BOOLEAN", int: "NUMERIC", float: "NUMERIC", str: "CATEGORICAL"}.get(type(value))
        if data_type is None:
            raise Bad(f"value: expected a number, boolean or string, got {describe(value)}")
    if data_type in ("BOOLEAN", "NUMERIC"):
        if data_type == "BOOLEAN" and value not in (0, 1):  # 0/1, 0.0/1.0, false/true
            raise Bad(f"value: a BOOLEAN score is 1 or 0, got {value!r}")
        record["rating"] = rating_from_number(value, "value")
    elif data_type == "CATEGORICAL":
        label = string_value if string_value is not None else value
        if type(label) is not str:
            raise Bad(f"stringValue: a CATEGORICAL score needs its category as a string, got {describe(label)}")
        record["rating"] = rating_from_label(label, f"stringValue (score {score.get('name')!r})")
    elif data_type == "CORRECTION":
        corrected = string_value if string_value is not None else value
        if type(corrected) is not str or not corrected.strip():
            raise Bad("stringValue: a CORRECTION score needs the corrected output as a non-empty string")
        record["edited_content"] = corrected
    else:
        raise Bad(f"dataType: {data_type!r} scores are not ratings or corrections "
                  "(expected BOOLEAN, NUMERIC, CATEGORICAL or CORRECTION)")
    if (comment := optional_str(score, "comment")) is not None:
        record["comment"] = comment
    if (timestamp := optional_str(score, "timestamp")) is not None:
        record["timestamp"] = timestamp
    return record
