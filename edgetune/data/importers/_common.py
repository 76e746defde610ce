"""What the importers share: chat-message conversion, rating rules, errors.

Every function here raises `Bad(reason)` on input it cannot convert, with the
reason starting with the path of the offending field (`input.messages[2].role:
...`); the importer turns it into `Invalid(reason)` for that line.
"""

from __future__ import annotations

import math

# The assistant message made from a trace's or run's output. Fixed, so that a
# score read before its trace (or without it) can still name the message.
OUTPUT_ID = "output"

# OpenAI's "developer" role replaced "system" for its reasoning models; v1 has
# only "system". "function" is OpenAI's older name for a tool result.
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
          "tool": "tool", "function": "tool"}
_ROLE_HELP = "expected system, developer, user, assistant or tool"

# Text part types of chat content lists (Chat Completions, Responses API,
# Anthropic-style blocks as LangChain passes them on).
_TEXT_PARTS = ("text", "input_text", "output_text")

UP_LABELS = frozenset({"up", "thumbs_up", "thumbsup", "👍", "good", "positive", "correct", "yes", "true",
                       "helpful", "like", "liked"})
DOWN_LABELS = frozenset({"down", "thumbs_down", "thumbsdown", "👎", "bad", "negative", "incorrect", "no", "false",
                         "unhelpful", "dislike", "disliked"})
_LABEL_HELP = "a rating label such as up/down, thumbs_up/thumbs_down, good/bad, correct/incorrect, yes/no"


# The v1 record checks and the importers report problems the same way.
from edgetune.data.records import Bad, describe, required_str  # noqa: E402,F401


def optional_str(obj: dict, key: str, where: str = "") -> str | None:
    value = obj.get(key)
    if value is None or type(value) is str:
        return value
    raise Bad(f"{where}{key}: expected a string, got {describe(value)}")


def optional_object(obj: dict, key: str, where: str = "") -> dict:
    """`obj[key]` if it is an object, `{}` if absent or null."""
    value = obj.get(key)
    if value is None:
        return {}
    if type(value) is not dict:
        raise Bad(f"{where}{key}: expected an object, got {describe(value)}")
    return value


def text_content(content, where: str) -> str:
    """A message content as text: a string, or a list of text parts joined by newlines.

    Raises `Bad` for missing content and for non-text parts (images, audio,
    files): edgetune trains text models, and dropping an image would leave a
    prompt that refers to something the model never sees.
    """
    if type(content) is str:
        return content
    if content is None:
        raise Bad(f"{where}: missing")
    if type(content) is not list:
        raise Bad(f"{where}: expected a string or a list of text parts, got {describe(content)}")
    texts = []
    for i, part in enumerate(content):
        if type(part) is str:
            texts.append(part)
            continue
        if type(part) is not dict:
            raise Bad(f"{where}[{i}]: expected a content part object, got {describe(part)}")
        kind = part.get("type")
        if kind not in _TEXT_PARTS:
            raise Bad(f"{where}[{i}].type: {kind!r} parts are not supported (text only)")
        texts.append(required_str(part, "text", f"{where}[{i}]."))
    return "\n".join(texts)


def chat_message(m, where: str) -> tuple[str, str]:
    """`(role, content)` of one OpenAI-style chat message `{"role", "content"}`.

    Assistant tool calls are refused rather than dropped: v1 messages are
    text, and a conversation with its calls removed would teach the model to
    answer without them.
    """
    if type(m) is not dict:
        raise Bad(f"{where}: expected a message object, got {describe(m)}")
    role = m.get("role")
    if role not in _ROLES:
        if role is None:
            raise Bad(f"{where}.role: missing ({_ROLE_HELP})")
        raise Bad(f"{where}.role: unknown role {role!r} ({_ROLE_HELP})")
    if m.get("tool_calls") or m.get("function_call"):
        raise Bad(f"{where}.tool_calls: assistant tool calls are not supported (v1 messages are text)")
    return _ROLES[role], text_content(m.get("content"), f"{where}.content")


def chat_messages(value, where: str) -> list[tuple[str, str]]:
    """`[(role, content)]` of a non-empty list of OpenAI-style chat messages."""
    if type(value) is not list:
        raise Bad(f"{where}: expected a list of messages, got {describe(value)}")
    if not value:
        raise Bad(f"{where}: must not be empty")
    return [chat_message(m, f"{where}[{i}]") for i, m in enumerate(value)]


def numbered(turns: list[tuple[str, str]]) -> list[dict]:
    """v1 messages with ids `m1`, `m2`, ... in order."""
    return [{"id": f"m{i}", "role": role, "content": content} for i, (role, content) in enumerate(turns, 1)]


def rating_from_number(value, where: str) -> str:
    """"up"/"down" from a boolean or a numeric score.

    The rule (documented for users in the importer docstrings): booleans as
    they are; numbers are read as a 0..1 score or a -1/1 vote, `>= 0.5` is up
    and anything lower is down (so 1 -> up; 0, -1, 0.2 -> down). A number
    outside [-1, 1] has a scale we cannot know (1-5 stars? 0-10?), so it is an
    error rather than a guess.
    """
    if value is True:
        return "up"
    if value is False:
        return "down"
    if type(value) not in (int, float) or math.isnan(value):
        raise Bad(f"{where}: expected a number or a boolean, got {describe(value)}")
    if not -1 <= value <= 1:
        raise Bad(f"{where}: {value!r} is outside [-1, 1]; numeric scores are read as 0..1 or -1/1 "
                  "ratings (>= 0.5 is up): rescale this score or leave it out of the export")
    return "up" if value >= 0.5 else "down"


def rating_from_label(label: str, where: str) -> str:
    """"up"/"down" from a categorical label (case-insensitive), or `Bad`."""
    key = label.strip().lower().replace("-", "_").replace(" ", "_")
    if key in UP_LABELS:
        return "up"
    if key in DOWN_LABELS:
        return "down"
    raise Bad(f"{where}: {label!r} is not a rating ({_LABEL_HELP}); leave such scores out of "
              "the export, or pass --skip-invalid to count and skip them")
