"""The build's fast path for well-formed log lines: decode and type-check in one C pass (msgspec).

Most lines of a log are valid records. Decoding them into dicts (orjson) and
then checking every field in Python (`records.validate_record`) cost about
twice as much as letting msgspec decode the line straight into the Structs
below, whose field types are the format's (`/work/shared/spec/feedback-v1.md`):
missing or mistyped fields, unknown roles and ratings, empty ids are all
refused by the decoder. What types cannot say (unique message ids, a system
message only first, feedback and `corrects` only on assistant messages, the
response ids of a comparison) `decode` checks afterwards, on the Structs.

`decode` never explains: on *any* doubt it returns None, and the caller reads
the line on the plain path (orjson or the stdlib, then `records.py`), which
words every reason. A line `decode` takes is one the plain path finds valid
and reads the same (it also takes a few that msgspec refuses, such as a lone
surrogate or NaN under a key the format does not define). So reasons, line
numbers and what a valid line becomes do not depend on this module; a test
holds the two paths to the same answers.

The Structs are not tracked by the garbage collector (`gc=False`: they hold
no cycles), so the collections that a build's many objects trigger do not
visit them. A checked Struct reads like the record `records.build_record`
makes (same attribute names, ratings normalised to "up"/"down"), so
`rules.py` curates either. Keys the format does not define are ignored, as
in `records.py`.
"""

from __future__ import annotations

import re
import sys
from typing import Annotated, Literal, Optional, Union

import msgspec

from edgetune.data.records import TIE, Feedback, FeedbackRecord, normalize_rating

_Id = Annotated[str, msgspec.Meta(min_length=1)]  # required ids: non-empty strings
_Role = Literal["system", "user", "assistant", "tool"]
# Every accepted spelling of a rating (`records.normalize_rating`); a JSON true is a bool, never 1.
_Rating = Optional[Union[bool, Literal[1, 0, -1], Literal["up", "down"]]]


class WireFeedback(msgspec.Struct, gc=False):
    rating: _Rating = None
    edited_content: Optional[str] = None
    comment: Optional[str] = None


class WireMessage(msgspec.Struct, gc=False):
    id: _Id
    role: _Role
    content: str
    feedback: Optional[WireFeedback] = None  # replaced by its `records.Feedback` once checked
    corrects: Optional[str] = None


class WireConversation(msgspec.Struct, gc=False, tag_field="type", tag="conversation"):
    conversation_id: _Id
    messages: Annotated[list[WireMessage], msgspec.Meta(min_length=1)]
    persona: Optional[str] = None
    timestamp: Optional[str] = None
    metadata: Optional[dict] = None


class WireTurn(msgspec.Struct, gc=False):  # a comparison's prompt message: its id, if any, is not checked
    role: _Role
    content: str


class WireResponse(msgspec.Struct, gc=False):
    id: _Id
    content: str


class WireComparison(msgspec.Struct, gc=False, tag_field="type", tag="comparison"):
    comparison_id: _Id
    prompt: Annotated[list[WireTurn], msgspec.Meta(min_length=1)]
    responses: Annotated[list[WireResponse], msgspec.Meta(min_length=2, max_length=2)]
    preferred: str
    persona: Optional[str] = None
    timestamp: Optional[str] = None
    metadata: Optional[dict] = None


class WireFeedbackRecord(msgspec.Struct, gc=False, tag_field="type", tag="feedback"):
    # No persona or metadata: `records.py` does not check them on feedback records.
    conversation_id: _Id
    message_id: _Id
    rating: _Rating = None
    edited_content: Optional[str] = None
    comment: Optional[str] = None
    timestamp: Optional[str] = None


_decoder = msgspec.json.Decoder(Union[WireConversation, WireComparison, WireFeedbackRecord])


def decode(raw: bytes) -> tuple[WireConversation, int, bool] | WireComparison | FeedbackRecord | None:
    """A valid log line's record, checked; None when the plain path must read the line.

    A conversation comes as `(record, assistant messages, has a signal)`, as
    `records.check_conversation` counts them; a feedback record as the
    `records.FeedbackRecord` that `records.build_record` makes.
    """
    # msgspec checks the UTF-8 of the strings it keeps, not of the values it skips (unknown
    # keys); the plain path refuses a line with any bad byte. ASCII lines (most) cannot have one.
    if not raw.isascii():
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if len(raw) > _MAX_DIGITS and _has_long_integer(raw):
        return None
    try:
        record = _decoder.decode(raw)
    except (msgspec.DecodeError, RecursionError):  # malformed, mistyped, read otherwise, or too deep for it
        return None
    kind = type(record)
    if kind is WireConversation:
        return _checked_conversation(record)
    if kind is WireComparison:
        a, b = record.responses
        ok = a.id != TIE and b.id != TIE and a.id != b.id and record.preferred in (a.id, b.id, TIE)
        return record if ok and _system_first(record.prompt) else None
    if record.rating is None and record.edited_content is None and record.comment is None:
        return None  # a feedback record without a signal
    return FeedbackRecord(record.conversation_id, record.message_id,
                          Feedback(normalize_rating(record.rating), record.edited_content, record.comment))


_MAX_DIGITS = sys.get_int_max_str_digits() or 1 << 62  # the longest integer Python reads (0: no limit)


def _has_long_integer(raw: bytes) -> bool:
    """A run of more digits than Python reads as an int: the plain path names such a line invalid
    (`source.decode_json`), where msgspec would skip it under a key the format does not define."""
    digits = len(raw) - len(raw.translate(None, b"0123456789"))
    return digits > _MAX_DIGITS and re.search(rb"[0-9]{%d}" % (_MAX_DIGITS + 1), raw) is not None


def _system_first(turns: list) -> bool:
    return all(t.role != "system" for t in turns[1:])


def _checked_conversation(conv: WireConversation) -> tuple[WireConversation, int, bool] | None:
    """The checks of `records.check_conversation` that types cannot express; None if one fails."""
    roles: dict[str, str] = {}  # id -> role of the messages so far
    assistants, signal = 0, False
    for m in conv.messages:
        role = m.role
        if role == "assistant":
            assistants += 1
            if m.feedback is not None:
                f = m.feedback
                m.feedback = Feedback(normalize_rating(f.rating), f.edited_content, f.comment)
                signal = True
            if m.corrects is not None:
                if roles.get(m.corrects) != "assistant":
                    return None
                signal = True
        elif (role == "system" and roles) or m.feedback is not None or m.corrects is not None:
            return None
        roles[m.id] = role
    if len(roles) != len(conv.messages):  # a repeated id
        return None
    return conv, assistants, signal
