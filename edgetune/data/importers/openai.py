"""OpenAI fine-tuning files (chat SFT and preference JSONL) read as v1 records.

OpenAI files carry no ids, so each line's id is `FILE:LINE` (the path as it
was given, so two files of the same name in different folders stay apart; the
holdout split hashes this id, so give the same paths to get the same split).

Chat line `{"messages": [...]}` -> `conversation`:
- messages with ids `m1`, `m2`, ...; `developer` is read as `system`.
- every assistant message is rated up, except those with `"weight": 0`:
  OpenAI trains on every assistant message whose weight is not 0, and a
  thumbs-up gives exactly that (rule 1: an SFT row, plus a KTO row with
  label true, with the messages before it as the prompt). `weight` must be
  0 or 1, and only on assistant messages.
- `tools`/`functions` definitions are ignored; assistant `tool_calls` make
  the line invalid (v1 messages are text).

Preference line `{"input": {"messages": [...]}, "preferred_output": [msg],
"non_preferred_output": [msg]}` -> `comparison` with the input messages as
`prompt`, responses `"preferred"` and `"non_preferred"` (each exactly one
assistant message, as OpenAI requires), and `preferred: "preferred"`.
"""

from __future__ import annotations

from typing import Iterator

from edgetune.data.importers._common import Bad, chat_message, chat_messages, describe, numbered
from edgetune.data.source import Invalid


def records_from_line(obj: dict, line_id: str) -> Iterator[dict | Invalid]:
    """The v1 record of one decoded line; `line_id` (`FILE:LINE`) becomes its id."""
    try:
        if "messages" in obj:
            yield chat_to_conversation(obj, line_id)
        elif "input" in obj or "preferred_output" in obj or "non_preferred_output" in obj:
            yield preference_to_comparison(obj, line_id)
        else:
            raise Bad("expected a chat line (`messages`) or a preference line (`input`, `preferred_output`, "
                      f"`non_preferred_output`); got keys {', '.join(sorted(obj)) or 'none'}")
    except Bad as e:
        yield Invalid(str(e))


def chat_to_conversation(line: dict, conversation_id: str) -> dict:
    """A v1 `conversation` from a chat fine-tuning line; raises `Bad`."""
    raw = line["messages"]
    messages = numbered(chat_messages(raw, "messages"))
    for i, (message, source) in enumerate(zip(messages, raw)):
        weight = source.get("weight", 1)
        if "weight" in source and message["role"] != "assistant":
            raise Bad(f"messages[{i}].weight: only assistant messages carry a weight")
        if weight not in (0, 1) or type(weight) not in (int, bool):
            raise Bad(f"messages[{i}].weight: expected 0 or 1, got {weight!r}")
        if message["role"] == "assistant" and weight:
            message["feedback"] = {"rating": "up"}
    return {"type": "conversation", "conversation_id": conversation_id, "messages": messages}


def preference_to_comparison(line: dict, comparison_id: str) -> dict:
    """A v1 `comparison` from a preference fine-tuning line; raises `Bad`."""
    prompt_input = line.get("input")
    if type(prompt_input) is not dict:
        raise Bad(f"input: expected an object with `messages`, got {describe(prompt_input)}")
    prompt = [{"role": role, "content": content}
              for role, content in chat_messages(prompt_input.get("messages"), "input.messages")]
    responses = [{"id": key, "content": _single_assistant(line.get(f"{key}_output"), f"{key}_output")}
                 for key in ("preferred", "non_preferred")]
    return {"type": "comparison", "comparison_id": comparison_id, "prompt": prompt,
            "responses": responses, "preferred": "preferred"}


def _single_assistant(value, where: str) -> str:
    if value is None:
        raise Bad(f"{where}: missing")
    if type(value) is not list or len(value) != 1:
        got = f"{len(value)} messages" if type(value) is list else describe(value)
        raise Bad(f"{where}: expected a list of exactly one assistant message, got {got}")
    role, content = chat_message(value[0], f"{where}[0]")
    if role != "assistant":
        raise Bad(f"{where}[0].role: expected assistant, got {role!r}")
    return content
