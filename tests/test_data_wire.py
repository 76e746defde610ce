"""wire.py, the msgspec fast path for valid log lines, held to the plain path (orjson/stdlib + records.py).

For any line, `wire.decode` must either step aside (None: the plain path
reads the line and words the reason) or return exactly what the plain path
makes of it: a valid record, the same fields, ratings normalised the same
way, the same count of assistant messages and signal flag. The lines are
valid records and records broken one field at a time, in every way the
format can be broken (and a few ways msgspec and the stdlib read JSON
differently).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgetune.data import records, stage, wire
from edgetune.data.build import BuildOptions, build
from edgetune.data.records import FeedbackRecord
from edgetune.data.stage import _decode_line
from edgetune.errors import UserError

from broken_records import break_record

FIXTURES = Path(__file__).parent / "data" / "feedback"
ASSET = Path(__file__).parents[1] / "edgetune" / "assets" / "sample_feedback.jsonl"
PROPERTY = settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

# Values a field is set to when a record is broken: every JSON type, and the values the checks
# single out (empty, "tie", role names, ratings and near-ratings, ids of the records below).
VALUES = [None, "", "x", "m0", "m1", "m2", "a", "b", "tie", "up", "down", "Up", "system", "user", "assistant",
          "tool", "bot", 0, 1, -1, 2, 1.0, True, False, 2**70, [], [{}], {}, {"rating": "up"},
          {"id": "m9", "role": "user", "content": "q"}]


def conversation() -> st.SearchStrategy[dict]:
    def make(roles, ratings, corrects, persona):
        messages = []
        for i, role in enumerate(roles):
            m = {"id": f"m{i}", "role": role, "content": f"text {i} é"}
            if role == "assistant" and ratings[i % len(ratings)] is not None:
                m["feedback"] = {"rating": ratings[i % len(ratings)], "comment": "c"}
            if role == "assistant" and i > 1 and corrects:
                m["corrects"] = f"m{i - 2}"
            messages.append(m)
        record = {"type": "conversation", "conversation_id": "c1", "messages": messages, "metadata": {"k": [1]}}
        if persona is not None:
            record["persona"] = persona
        return record

    return st.builds(make, st.lists(st.sampled_from(["system", "user", "assistant", "tool"]), min_size=1, max_size=6),
                     st.lists(st.sampled_from([None, "up", "down", True, False, 1, 0, -1]), min_size=1),
                     st.booleans(), st.sampled_from([None, "analyst"]))


COMPARISON = {"type": "comparison", "comparison_id": "x1", "persona": "novice",
              "prompt": [{"role": "system", "content": "s"}, {"id": "p", "role": "user", "content": "q"}],
              "responses": [{"id": "a", "content": "A"}, {"id": "b", "content": "B"}], "preferred": "a"}


def comparison() -> st.SearchStrategy[dict]:
    """COMPARISON with its ids drawn: equal, "tie", and `preferred` naming neither."""
    def make(first, second, preferred):
        return {**COMPARISON, "responses": [{"id": first, "content": "A"}, {"id": second, "content": "B"}],
                "preferred": preferred}

    ids = st.sampled_from(["a", "b", "tie"])
    return st.builds(make, ids, ids, st.sampled_from(["a", "b", "tie", "c"]))
FEEDBACK = {"type": "feedback", "conversation_id": "c1", "message_id": "m1", "rating": -1, "timestamp": "t",
            "edited_content": "e", "comment": "c", "metadata": 5}


@st.composite
def log_lines(draw) -> bytes:
    record = break_record(draw, draw(st.one_of(conversation(), comparison(), st.just(FEEDBACK))), VALUES,
                          draw(st.integers(0, 2)))
    return json.dumps(record, ensure_ascii=draw(st.booleans())).encode()


def _fields(record) -> tuple:
    """What a build reads of a record, whichever path made it."""
    if isinstance(record, FeedbackRecord):
        return ("feedback", record)
    if hasattr(record, "conversation_id"):
        return ("conversation", record.conversation_id, record.persona,
                [(m.id, m.role, m.content, m.feedback, m.corrects) for m in record.messages])
    return ("comparison", record.comparison_id, record.persona, [(t.role, t.content) for t in record.prompt],
            [(r.id, r.content) for r in record.responses], record.preferred)


def assert_same_as_plain_path(raw: bytes) -> bool:
    """True when wire.decode took the line (and agreed with the plain path), False when it stepped aside."""
    fast = wire.decode(raw)
    if fast is None:
        return False
    obj = _decode_line(raw, fast=False)
    assert type(obj) is dict and records.validate_record(obj) is None, (raw, obj)
    plain = records.build_record(obj)
    if obj["type"] == "conversation":
        fast, assistants, signal = fast
        assert (assistants, signal) == records.check_conversation(obj)
    assert _fields(fast) == _fields(plain)
    return True


@PROPERTY
@given(log_lines())
def test_a_line_wire_takes_reads_as_the_plain_path_reads_it(raw):
    assert_same_as_plain_path(raw)


def test_valid_records_of_every_kind_take_the_fast_path():
    lines = [line for path in (FIXTURES / "signals.jsonl", ASSET) for line in path.read_bytes().splitlines()]
    lines += [json.dumps(COMPARISON).encode(), json.dumps(FEEDBACK).encode()]
    taken = [assert_same_as_plain_path(line) for line in lines if line.strip()]
    assert all(taken) and len(taken) > 20


def test_json_that_msgspec_and_the_stdlib_read_differently_is_left_to_the_plain_path():
    base = '{"type": "feedback", "conversation_id": "c1", "message_id": "m1", "rating": "up"'
    lines = [
        base + ', "x": "\xff"}',  # a bad byte in a key msgspec skips (the stdlib refuses the line)
        base + ', "x": "\\ud83d"}',  # a lone surrogate, which the stdlib reads
        base + ', "x": NaN}',
        base + ', "type": "conversation"}',  # a repeated key: the stdlib keeps the last
        '\ufeff' + base + '}',  # a byte order mark
        base + ', "rating": 1.0}',  # 1.0 == 1 in Python, not a rating in the spec
        base + ', "rating": 123456789012345678901234567890}',
    ]
    for line in lines:
        raw = line.encode("latin-1") if "\xff" in line else line.encode()
        assert wire.decode(raw) is None, line
    # Repeated keys and escaped key names are read as the stdlib reads them (the last one wins).
    fast = wire.decode(b'{"type": "feedback", "conversation_id": "a", "conversation\\u005fid": "b", '
                       b'"message_id": "m", "rating": true}')
    assert fast == records.build_record(json.loads('{"type": "feedback", "conversation_id": "b", '
                                                   '"message_id": "m", "rating": true}'))


def test_build_gives_the_same_outputs_with_and_without_the_fast_path(tmp_path, monkeypatch):
    log = tmp_path / "log.jsonl"
    log.write_bytes((FIXTURES / "signals.jsonl").read_bytes() + ASSET.read_bytes()
                    + (FIXTURES / "invalid.jsonl").read_bytes())
    options = BuildOptions(eval_fraction=0.3, skip_invalid=True)
    fast = build([log], tmp_path / "fast", options, jobs=1)
    monkeypatch.setattr(stage, "_fast_records", None)
    slow = build([log], tmp_path / "slow", options, jobs=1)
    assert fast["records"]["invalid"] > 0 and fast == slow
    for split in ("train", "eval"):
        for output in ("sft", "dpo", "kto"):
            name = f"{split}/{output}.jsonl"
            assert (tmp_path / "fast" / name).read_bytes() == (tmp_path / "slow" / name).read_bytes()


def test_conversations_read_again_by_position_are_those_of_either_path_and_a_changed_line_is_named(
        tmp_path, monkeypatch):
    """The restage reads conversations back by position (stage.fetch_conversations); a line that is
    no longer a valid conversation means the log changed under the build."""
    lines = [json.dumps(COMPARISON).encode(), (FIXTURES / "signals.jsonl").read_bytes().splitlines()[0]]
    log = tmp_path / "log.jsonl"
    log.write_bytes(b"\n".join(lines) + b"\n")
    chunk = stage.Chunk(0, 0, str(log), "lines", 0, log.stat().st_size)
    conversation_at = len(lines[0]) + 1
    expected = _fields(records.build_record(json.loads(lines[1])))
    for fast in (stage._fast_records, None):
        monkeypatch.setattr(stage, "_fast_records", fast)
        ((pos, conv),) = stage.fetch_conversations(chunk, [conversation_at])
        assert pos == conversation_at and _fields(conv) == expected
        with pytest.raises(UserError, match="changed while edgetune was reading it"):
            list(stage.fetch_conversations(chunk, [0]))
