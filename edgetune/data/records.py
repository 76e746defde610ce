"""Typed records of the feedback log format v1 (`/work/shared/spec/feedback-v1.md`).

`parse_record(obj)` turns one decoded JSON object into a `Conversation`,
`FeedbackRecord` or `Comparison`, or returns a reason string naming the field
that breaks the format (`messages[2].role: unknown role 'bot' ...`). It never
raises on bad input: the build decides whether a bad line is an error
(strict) or is counted and skipped (`--skip-invalid`).

It is two steps, also usable apart: `validate_record` (every check, no
objects made: the build runs it on every line of a log, most of which give
no rows) and `build_record` (typed objects from an object that passed).
`check_conversation` is the check of a conversation, which also returns what
the build needs of every one (its assistant messages, whether one carries a
signal). Checks test the common valid case first and work out the precise
reason only once something is wrong.

Leniency, on purpose: keys the format does not define are ignored (exporters
add their own), and `null` in an optional field reads as absent (exporters
write `"persona": null` rather than leaving the key out).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

ROLES = ("system", "user", "assistant", "tool")
RECORD_TYPES = ("conversation", "feedback", "comparison")
TIE = "tie"

_RATING_HELP = 'expected "up"/"down", true/false, 1/-1 or 1/0'


@dataclass(slots=True)
class Feedback:
    """One human signal on one assistant message (inline or split out)."""

    rating: str | None = None  # "up" | "down" after normalisation
    edited_content: str | None = None
    comment: str | None = None


@dataclass(slots=True)
class Message:
    id: str
    role: str
    content: str
    feedback: Feedback | None = None
    corrects: str | None = None  # id of an earlier assistant message this one replaces


@dataclass(slots=True)
class Conversation:
    conversation_id: str
    messages: tuple[Message, ...]
    persona: str | None = None

    def has_signal(self) -> bool:
        """True when some message carries inline feedback or corrects another."""
        return any(m.feedback is not None or m.corrects is not None for m in self.messages)


@dataclass(slots=True)
class FeedbackRecord:
    """A `feedback` line: a signal joined to its conversation by ids."""

    conversation_id: str
    message_id: str
    feedback: Feedback


@dataclass(slots=True)
class Turn:
    """A prompt message of a comparison (ids are optional there)."""

    role: str
    content: str


@dataclass(slots=True)
class Response:
    id: str
    content: str


@dataclass(slots=True)
class Comparison:
    comparison_id: str
    prompt: tuple[Turn, ...]
    responses: tuple[Response, Response]
    preferred: str  # a response id, or "tie"
    persona: str | None = None


Record = Union[Conversation, FeedbackRecord, Comparison]

# Records are not frozen: a frozen dataclass sets each field through
# object.__setattr__, 3x slower to create, and a build creates millions.
# Treat them as read-only all the same.


class Bad(Exception):
    """A record (or importer line) that breaks the format; the message is the reason.

    Shared with the importers (`importers/_common.py`), so both name problems the same way."""


def normalize_rating(value) -> str | None:
    """Map the accepted spellings of a rating to "up"/"down"; None if not one of them.

    Accepted: "up"/"down", true/false, 1/-1, 1/0. bool is tested before int
    because `True == 1` in Python; floats are not accepted (1.0 is not in the spec).
    """
    if value is True:
        return "up"
    if value is False:
        return "down"
    if type(value) is int:
        return {1: "up", 0: "down", -1: "down"}.get(value)
    if value == "up" or value == "down":
        return value
    return None


def parse_record(obj: dict) -> Record | str:
    """Validate one log object; return the typed record or a reason naming the field."""
    reason = validate_record(obj)
    return reason if reason is not None else build_record(obj)


def validate_record(obj: dict) -> str | None:
    """None if `obj` is a valid v1 record, else the reason (`field: what is wrong`)."""
    kind = obj.get("type")
    try:
        if kind == "conversation":
            check_conversation(obj)
        elif kind == "feedback":
            _check_feedback_record(obj)
        elif kind == "comparison":
            _check_comparison(obj)
        elif kind is None:
            return f"type: missing (expected {'|'.join(RECORD_TYPES)})"
        else:
            return f"type: unknown type {kind!r} (expected {'|'.join(RECORD_TYPES)})"
    except Bad as e:
        return str(e)
    return None


def build_record(obj: dict) -> Record:
    """Typed record of an object that passed `validate_record` (not checked again)."""
    kind = obj["type"]
    if kind == "conversation":
        # A message of three keys (id, role, content: checked) carries no signal: most of them.
        return Conversation(obj["conversation_id"], tuple(
            Message(m["id"], m["role"], m["content"]) if len(m) == 3 else
            Message(m["id"], m["role"], m["content"], _feedback(m.get("feedback")), m.get("corrects"))
            for m in obj["messages"]), obj.get("persona"))
    if kind == "feedback":
        return FeedbackRecord(obj["conversation_id"], obj["message_id"], _feedback(obj))
    a, b = obj["responses"]
    return Comparison(obj["comparison_id"], tuple(Turn(m["role"], m["content"]) for m in obj["prompt"]),
                      (Response(a["id"], a["content"]), Response(b["id"], b["content"])), obj["preferred"],
                      obj.get("persona"))


def _feedback(obj: dict | None) -> Feedback | None:
    if obj is None:
        return None
    rating = obj.get("rating")
    return Feedback(None if rating is None else normalize_rating(rating), obj.get("edited_content"),
                    obj.get("comment"))


# --- checks: each raises Bad with the reason ------------------------------------

def describe(value) -> str:
    """How a JSON value is named in reasons: 'a string', 'null', 'an object'."""
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def required_str(obj: dict, key: str, where: str = "") -> str:
    value = obj.get(key)
    if value is None:
        raise Bad(f"{where}{key}: missing")
    if type(value) is not str:
        raise Bad(f"{where}{key}: expected a string, got {describe(value)}")
    if not value:
        raise Bad(f"{where}{key}: must not be empty")
    return value


def _optional_str(obj: dict, key: str, where: str = "") -> None:
    value = obj.get(key)
    if value is not None and type(value) is not str:
        raise Bad(f"{where}{key}: expected a string, got {describe(value)}")


def _check_content(obj: dict, where: str) -> None:
    value = obj.get("content")
    if type(value) is str:
        return
    if value is None and "content" not in obj:
        raise Bad(f"{where}content: missing")
    raise Bad(f"{where}content: expected a string, got {describe(value)}")


def _check_role(obj: dict, where: str) -> str:
    role = obj.get("role")
    if role in ROLES:
        return role
    if role is None:
        raise Bad(f"{where}role: missing (expected {'|'.join(ROLES)})")
    raise Bad(f"{where}role: unknown role {role!r} (expected {'|'.join(ROLES)})")


def _message_list(obj: dict, key: str) -> list:
    value = obj.get(key)
    if type(value) is list and value:
        return value
    if value is None:
        raise Bad(f"{key}: missing")
    if type(value) is not list:
        raise Bad(f"{key}: expected a list of messages, got {describe(value)}")
    raise Bad(f"{key}: must not be empty")


def _object(value, where: str) -> dict:
    if type(value) is not dict:
        raise Bad(f"{where}: expected an object, got {describe(value)}")
    return value


def _check_feedback_fields(obj: dict, where: str) -> None:
    rating = obj.get("rating")
    if rating is not None and normalize_rating(rating) is None:
        raise Bad(f"{where}rating: unknown rating {rating!r} ({_RATING_HELP})")
    _optional_str(obj, "edited_content", where)
    _optional_str(obj, "comment", where)


def _check_common(obj: dict) -> None:
    """Optional fields shared by the record types; only their types are checked."""
    _optional_str(obj, "persona")
    _optional_str(obj, "timestamp")
    metadata = obj.get("metadata")
    if metadata is not None and type(metadata) is not dict:
        raise Bad(f"metadata: expected an object, got {describe(metadata)}")


_CONVERSATION_KEYS = ("conversation_id", "persona", "timestamp", "metadata", "messages")


def check_conversation(obj: dict) -> tuple[int, bool]:
    """Raise Bad with the reason unless `obj` is a valid conversation record; else return its
    number of assistant messages and whether one of them carries a signal (feedback or corrects).

    The build needs both for every conversation of a log (rule 6 counts the
    unused assistant messages; only a conversation with a signal is curated
    right away), and the checks' loop over the messages looks at every role
    and extra key anyway.
    """
    cid, persona, timestamp, metadata, raw = map(obj.get, _CONVERSATION_KEYS)
    if not (type(cid) is str and cid and (persona is None or type(persona) is str)
            and (timestamp is None or type(timestamp) is str) and (metadata is None or type(metadata) is dict)
            and type(raw) is list and raw):  # the common shape in one test; else the checks in order
        required_str(obj, "conversation_id")
        _check_common(obj)
        raw = _message_list(obj, "messages")
    roles: dict[str, str] = {}  # id -> role, for duplicates and `corrects`
    assistants, signal = 0, False
    for i, m in enumerate(raw):
        # Fast path: the shape of almost every message, tested in one expression. (A tuple, not a
        # set, of roles: a role that is a JSON list or object is not hashable.)
        if type(m) is dict:
            mid = m.get("id")
            role = m.get("role")
            if not (type(mid) is str and mid and role in ROLES and type(m.get("content")) is str):
                _check_message_fields(m, f"messages[{i}].")  # raises with the precise reason
        else:
            _object(m, f"messages[{i}]")
        if mid in roles:
            first = next(j for j, n in enumerate(raw) if n.get("id") == mid)
            raise Bad(f"messages[{i}].id: duplicate id {mid!r} (first at messages[{first}])")
        if role == "assistant":
            assistants += 1
        elif role == "system" and i:
            raise Bad(f"messages[{i}].role: a system message may only come first")
        if len(m) > 3:  # more keys than id, role and content (checked above): maybe a signal
            feedback = m.get("feedback")
            if feedback is not None:
                if role != "assistant":
                    raise Bad(f"messages[{i}].feedback: only assistant messages carry feedback "
                               f"(this one is {role})")
                _check_feedback_fields(_object(feedback, f"messages[{i}].feedback"), f"messages[{i}].feedback.")
                signal = True
            corrects = m.get("corrects")
            if corrects is not None:
                _check_corrects(corrects, role, roles, raw[i + 1:], f"messages[{i}].")
                signal = True
        roles[mid] = role
    return assistants, signal


def _check_message_fields(m: dict, where: str) -> None:
    required_str(m, "id", where)
    _check_role(m, where)
    _check_content(m, where)


def _check_corrects(corrects, role: str, earlier: dict[str, str], later: list, where: str) -> None:
    if role != "assistant":
        raise Bad(f"{where}corrects: only assistant messages can correct (this one is {role})")
    if type(corrects) is not str:
        raise Bad(f"{where}corrects: expected a message id string, got {describe(corrects)}")
    target = earlier.get(corrects)
    if target is None:
        comes_later = any(type(n) is dict and n.get("id") == corrects for n in later)
        hint = "it comes later; corrects must name an earlier message" if comes_later else "no such message"
        raise Bad(f"{where}corrects: {corrects!r} points nowhere ({hint})")
    if target != "assistant":
        raise Bad(f"{where}corrects: {corrects!r} is a {target} message; "
                   "corrects must name an earlier assistant message")


def _check_feedback_record(obj: dict) -> None:
    required_str(obj, "conversation_id")
    required_str(obj, "message_id")
    _optional_str(obj, "timestamp")
    _check_feedback_fields(obj, "")
    if all(obj.get(k) is None for k in ("rating", "edited_content", "comment")):
        raise Bad("feedback: no signal (expected at least one of rating, edited_content, comment)")


def _check_comparison(obj: dict) -> None:
    required_str(obj, "comparison_id")
    _check_common(obj)
    for i, m in enumerate(_message_list(obj, "prompt")):
        m = _object(m, f"prompt[{i}]")
        role = _check_role(m, f"prompt[{i}].")
        if role == "system" and i:
            raise Bad(f"prompt[{i}].role: a system message may only come first")
        _check_content(m, f"prompt[{i}].")
    raw = obj.get("responses")
    if raw is None:
        raise Bad("responses: missing")
    if type(raw) is not list:
        raise Bad(f"responses: expected a list of two responses, got {describe(raw)}")
    if len(raw) != 2:
        raise Bad(f"responses: expected exactly two responses, got {len(raw)}")
    ids = []
    for i, r in enumerate(raw):
        r = _object(r, f"responses[{i}]")
        rid = required_str(r, "id", f"responses[{i}].")
        if rid == TIE:
            raise Bad(f"responses[{i}].id: 'tie' is reserved for `preferred`; rename this response")
        _check_content(r, f"responses[{i}].")
        ids.append(rid)
    if ids[0] == ids[1]:
        raise Bad(f"responses[1].id: duplicate id {ids[1]!r}")
    preferred = obj.get("preferred")
    if preferred is None:
        raise Bad("preferred: missing")
    if type(preferred) is not str or preferred not in (ids[0], ids[1], TIE):
        raise Bad(f"preferred: {preferred!r} is not a response id "
                   f"(expected {ids[0]!r}, {ids[1]!r} or \"tie\")")
