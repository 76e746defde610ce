"""Importers: each export format's exact mapping to v1 records, on handwritten samples.

The sample files in tests/data/importers/ mimic real exports (field names
from Langfuse's and LangSmith's public schemas, OpenAI's fine-tuning formats)
and include the edge cases: scores before their trace, orphans, embedded
scores, content-part lists, batches, corrections, and one line per kind of
invalid input. Every record an importer yields must also pass the v1 parser.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from edgetune.data.importers import FORMATS, iter_records
from edgetune.data.importers._common import Bad, rating_from_label, rating_from_number, text_content
from edgetune.data.records import parse_record
from edgetune.data.source import Invalid
from edgetune.errors import UserError

DATA = Path(__file__).parent / "data" / "importers"


def read(fmt: str, name: str) -> list[tuple[int, dict | Invalid]]:
    return list(iter_records(fmt, DATA / name))


def conversation(cid, messages, **extra):
    return {"type": "conversation", "conversation_id": cid, **extra, "messages": messages}


def feedback(cid, **fields):
    return {"type": "feedback", "conversation_id": cid, "message_id": "output", **fields}


def msg(mid, role, content, **extra):
    return {"id": mid, "role": role, "content": content, **extra}


# --- pure rules ------------------------------------------------------------------------

@pytest.mark.parametrize("value, rating", [
    (1, "up"), (0, "down"), (-1, "down"), (True, "up"), (False, "down"),
    (0.5, "up"), (0.49, "down"), (0.8, "up"), (1.0, "up"), (0.0, "down"), (-0.3, "down"),
])
def test_numeric_rating_threshold(value, rating):
    assert rating_from_number(value, "value") == rating


@pytest.mark.parametrize("value, reason", [
    (4, "value: 4 is outside [-1, 1]"),
    (-2, "value: -2 is outside [-1, 1]"),
    (math.nan, "value: expected a number or a boolean, got a number"),
    ("1", "value: expected a number or a boolean, got a string"),
    (None, "value: expected a number or a boolean, got null"),
])
def test_numeric_rating_refuses_unknown_scales(value, reason):
    with pytest.raises(Bad) as e:
        rating_from_number(value, "value")
    assert str(e.value).startswith(reason)


@pytest.mark.parametrize("label, rating", [
    ("up", "up"), ("Thumbs Up", "up"), ("thumbs-down", "down"), ("GOOD", "up"),
    ("incorrect", "down"), ("yes", "up"), ("👎", "down"),
])
def test_label_rating(label, rating):
    assert rating_from_label(label, "value") == rating


def test_label_that_is_not_a_rating_is_refused_with_advice():
    with pytest.raises(Bad, match=r"^value: 'billing' is not a rating .*--skip-invalid"):
        rating_from_label("billing", "value")


def test_text_content_joins_text_parts_and_refuses_others():
    parts = [{"type": "text", "text": "a"}, "b", {"type": "input_text", "text": "c"}]
    assert text_content(parts, "content") == "a\nb\nc"
    with pytest.raises(Bad, match=r"^content\[0\]\.type: 'input_audio' parts are not supported"):
        text_content([{"type": "input_audio", "input_audio": {}}], "content")
    with pytest.raises(Bad, match=r"^content: missing"):
        text_content(None, "content")


# --- format selection ------------------------------------------------------------------

def test_unknown_format_is_a_user_error_naming_the_valid_ones():
    # Raised on the call, before anything is read (the path does not exist).
    with pytest.raises(UserError) as e:
        iter_records("helicone", DATA / "no-such-file.jsonl")
    assert str(e.value) == ("unknown feedback format 'helicone': expected one of "
                            "v1, langfuse, langsmith, openai (--format)")
    assert FORMATS == ("v1", "langfuse", "langsmith", "openai")


def test_v1_is_read_as_it_is(tmp_path):
    line = {"type": "feedback", "conversation_id": "c-1", "message_id": "m2", "rating": "up"}
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps(line) + "\n\n[1]\n", encoding="utf-8")
    assert list(iter_records("v1", log)) == [(1, line), (3, Invalid("expected a JSON object, got list"))]


def test_missing_file_is_a_user_error():
    with pytest.raises(UserError, match="cannot open"):
        list(iter_records("langfuse", DATA / "no-such-file.jsonl"))


@pytest.mark.parametrize("fmt, name", [
    ("langfuse", "langfuse.jsonl"), ("langsmith", "langsmith.jsonl"),
    ("openai", "openai_sft.jsonl"), ("openai", "openai_pref.jsonl"),
])
def test_every_imported_record_is_valid_v1_and_reading_is_repeatable(fmt, name):
    items = read(fmt, name)
    for lineno, item in items:
        if not isinstance(item, Invalid):
            assert not isinstance(parse_record(item), str), (lineno, parse_record(item))
    # The build reads each file twice and addresses records by position.
    assert read(fmt, name) == items


# --- Langfuse --------------------------------------------------------------------------

LF_TRACE_1 = "7f3c9b2e4a1d4c6f8e0b5a9d2c1f3e47"
LF_TRACE_2 = "2b8d4f6a1c3e4a5b9d7f0e2c4a6b8d01"
LF_TRACE_3 = "9e0a1b2c3d4e4f5a8b6c7d8e9f0a1b2c"


def test_langfuse_mapping():
    assert read("langfuse", "langfuse.jsonl") == [
        # A score before its trace: BOOLEAN 1 -> up.
        (1, feedback(LF_TRACE_1, rating="up", comment="Exactly what I needed",
                     timestamp="2026-10-02T09:15:10.000Z")),
        # Chat-message input, message output; persona from metadata, not userId.
        (2, conversation(LF_TRACE_1, [
            msg("m1", "system", "You are a helpful assistant."),
            msg("m2", "user", "How do I export a CSV from the dashboard?"),
            msg("output", "assistant", "Open the dashboard, click Export and choose CSV."),
        ], persona="analyst", timestamp="2026-10-02T09:14:58.120Z",
            metadata={"source": "langfuse", "session_id": "sess-88", "user_id": "u-42", "name": "support-chat"})),
        # String input and output; no metadata.persona, so userId is the persona.
        (3, conversation(LF_TRACE_2, [
            msg("m1", "user", "What is the refund window?"),
            msg("output", "assistant", "Refunds are possible within 30 days of purchase."),
        ], persona="u-7", timestamp="2026-10-02T10:02:11.500Z", metadata={"source": "langfuse", "user_id": "u-7"})),
        # NUMERIC 0.2 < 0.5 -> down.
        (4, feedback(LF_TRACE_2, rating="down", comment="Too vague", timestamp="2026-10-02T10:05:00.000Z")),
        # CORRECTION -> edited_content (observationId is not used).
        (5, feedback(LF_TRACE_2, edited_content="Refunds are possible within 30 days of purchase; reply with "
                                                "your order number to start one.",
                     timestamp="2026-10-02T10:06:30.000Z")),
        # Input under `messages`, content-part lists; an embedded score (the score id is skipped).
        (6, conversation(LF_TRACE_3, [
            msg("m1", "user", "Summarise this ticket:\nPrinter on floor 3 jams on A3 paper."),
            msg("output", "assistant", "The floor 3 printer jams with A3 paper."),
        ], timestamp="2026-10-03T08:00:00Z", metadata={"source": "langfuse"})),
        (6, feedback(LF_TRACE_3, rating="down", timestamp="2026-10-03T08:01:00Z")),
        # CATEGORICAL rating label.
        (7, feedback(LF_TRACE_3, rating="down", timestamp="2026-10-03T08:01:30Z")),
        (8, Invalid("value: 4 is outside [-1, 1]; numeric scores are read as 0..1 or -1/1 ratings (>= 0.5 is "
                    "up): rescale this score or leave it out of the export")),
        (9, Invalid("input[0].role: unknown role 'bot' (expected system, developer, user, assistant or tool)")),
        (10, Invalid("traceId: missing; only trace scores can rate a message (session and dataset-run scores "
                     "cannot)")),
        (11, Invalid("output: missing; a trace without an output has no assistant message to rate")),
        (12, Invalid("not valid JSON (Expecting ',' delimiter at column 24)")),
        (13, Invalid("stringValue (score 'topic'): 'billing' is not a rating (a rating label such as up/down, "
                     "thumbs_up/thumbs_down, good/bad, correct/incorrect, yes/no); leave such scores out of the "
                     "export, or pass --skip-invalid to count and skip them")),
        # No dataType (older exports): the number -1 -> down; its trace is not in the file.
        (14, feedback("0000aaaa1111bbbb2222cccc3333dddd", rating="down", timestamp="2026-10-04T12:00:00Z")),
        (15, Invalid("input[0].content[1].type: 'image_url' parts are not supported (text only)")),
    ]


def test_langfuse_bad_embedded_score_is_reported_beside_its_trace(tmp_path):
    trace = {"id": "t1", "input": "q", "output": "a",
             "scores": [{"name": "stars", "value": 5, "dataType": "NUMERIC"}, {"name": "ok", "value": True}]}
    log = tmp_path / "lf.jsonl"
    log.write_text(json.dumps(trace) + "\n", encoding="utf-8")
    assert list(iter_records("langfuse", log)) == [
        (1, conversation("t1", [msg("m1", "user", "q"), msg("output", "assistant", "a")],
                         metadata={"source": "langfuse"})),
        (1, Invalid("scores[0].value: 5 is outside [-1, 1]; numeric scores are read as 0..1 or -1/1 ratings "
                    "(>= 0.5 is up): rescale this score or leave it out of the export")),
        (1, feedback("t1", rating="up")),
    ]


# --- LangSmith -------------------------------------------------------------------------

LS_RUN_1 = "1f2e3d4c-5b6a-4798-8a9b-0c1d2e3f4a5b"
LS_RUN_2 = "2a3b4c5d-6e7f-4a8b-9c0d-1e2f3a4b5c6d"
LS_RUN_3 = "3b4c5d6e-7f8a-4b9c-8d1e-2f3a4b5c6d7e"
LS_TRACE_4 = "4c5d6e7f-8a9b-4c0d-9e2f-3a4b5c6d7e8f"


def test_langsmith_mapping():
    assert read("langsmith", "langsmith.jsonl") == [
        # Feedback before its run: score 1 -> up.
        (1, feedback(LS_RUN_1, rating="up", comment="Clear and correct", timestamp="2026-10-02T11:00:05.000000")),
        # LangChain chat model: a batch of one, serialised messages, generations.
        (2, conversation(LS_RUN_1, [
            msg("m1", "system", "Answer briefly."),
            msg("m2", "user", "What does DNS do?"),
            msg("output", "assistant", "DNS maps names to IP addresses."),
        ], persona="novice", timestamp="2026-10-02T11:00:00.000000",
            metadata={"source": "langsmith", "run_type": "llm", "name": "ChatOpenAI", "trace_id": LS_RUN_1,
                      "session_id": "proj-7"})),
        # Wrapped OpenAI client: role/content messages, `choices`.
        (3, conversation(LS_RUN_2, [
            msg("m1", "user", "Give me a regex for a US ZIP code."),
            msg("output", "assistant", "\\d{5}"),
        ], timestamp="2026-10-02T12:30:00.000000",
            metadata={"source": "langsmith", "run_type": "llm", "name": "openai.chat.completions"})),
        # score 0 -> down, and an output-shaped correction -> edited_content.
        (4, feedback(LS_RUN_2, rating="down", edited_content="^\\d{5}(-\\d{4})?$",
                     comment="Misses ZIP+4 and anchors", timestamp="2026-10-02T12:35:00.000000")),
        # A chain with one text input and `output`; persona from top-level metadata.
        (5, conversation(LS_RUN_3, [
            msg("m1", "user", "How many seats does the Team plan include?"),
            msg("output", "assistant", "The Team plan includes 10 seats."),
        ], persona="admin", timestamp="2026-10-02T13:00:00.000000",
            metadata={"source": "langsmith", "run_type": "chain", "name": "qa-chain"})),
        # A string value is a rating label.
        (6, feedback(LS_RUN_3, rating="up", timestamp="2026-10-02T13:01:00.000000")),
        # A string correction.
        (7, feedback(LS_RUN_3, edited_content="The Team plan includes 10 seats; more can be added for a fee.",
                     timestamp="2026-10-02T13:02:00.000000")),
        # trace_id only: the root run.
        (8, feedback(LS_TRACE_4, rating="up")),
        # LangGraph state: `{"type": ...}` messages, the answer is the last output message.
        (9, conversation(LS_TRACE_4, [
            msg("m1", "user", "Book a room for Friday."),
            msg("output", "assistant", "Room 4B is booked for Friday."),
        ], metadata={"source": "langsmith", "run_type": "chain", "name": "agent"})),
        (10, Invalid("outputs: missing; the run has no output (did it fail or is it still running?)")),
        (11, Invalid("score: 3.5 is outside [-1, 1]; numeric scores are read as 0..1 or -1/1 ratings (>= 0.5 is "
                     "up): rescale this score or leave it out of the export")),
        (12, Invalid("run_type: 'retriever' runs are not chat turns; export llm and chain runs (or pass "
                     "--skip-invalid to count and skip these)")),
        (13, Invalid("score: feedback 'seen' has no score, value, correction or comment")),
        # A corrected evaluator score replaces the score: 0 -> 1 -> up.
        (14, feedback(LS_RUN_2, rating="up", comment="Judge was wrong")),
    ]


# --- OpenAI ----------------------------------------------------------------------------

def test_openai_chat_mapping():
    cid = f"{DATA / 'openai_sft.jsonl'}:{{}}".format
    up = {"rating": "up"}
    assert read("openai", "openai_sft.jsonl") == [
        (1, conversation(cid(1), [
            msg("m1", "system", "You answer geography questions in one line."),
            msg("m2", "user", "What's the capital of Canada?"),
            msg("m3", "assistant", "Ottawa.", feedback=up),
        ])),
        # weight 0 -> not rated; weight 1 -> up.
        (2, conversation(cid(2), [
            msg("m1", "user", "Who wrote Romeo and Juliet?"),
            msg("m2", "assistant", "Shakespeare, I think?"),
            msg("m3", "user", "Are you sure?"),
            msg("m4", "assistant", "Yes: William Shakespeare wrote it.", feedback=up),
        ])),
        # developer -> system; text parts joined.
        (3, conversation(cid(3), [
            msg("m1", "system", "Reply in one word."),
            msg("m2", "user", "Colour of the sky\non a clear day?"),
            msg("m3", "assistant", "Blue.", feedback=up),
        ])),
        # (line 4 is blank)
        (5, Invalid("messages[1].tool_calls: assistant tool calls are not supported (v1 messages are text)")),
        (6, Invalid("messages[1].weight: expected 0 or 1, got 2")),
        (7, Invalid("messages[0].weight: only assistant messages carry a weight")),
        (8, Invalid("expected a chat line (`messages`) or a preference line (`input`, `preferred_output`, "
                    "`non_preferred_output`); got keys completion, prompt")),
        # Only weight-0 answers: a conversation without signal (the build uses it for nothing).
        (9, conversation(cid(9), [
            msg("m1", "user", "Tell me a joke."),
            msg("m2", "assistant", "Why did the chicken cross the road?"),
        ])),
    ]


def test_openai_preference_mapping():
    cid = f"{DATA / 'openai_pref.jsonl'}:{{}}".format

    def comparison(n, prompt, chosen, rejected):
        return {"type": "comparison", "comparison_id": cid(n), "prompt": prompt,
                "responses": [{"id": "preferred", "content": chosen}, {"id": "non_preferred", "content": rejected}],
                "preferred": "preferred"}

    assert read("openai", "openai_pref.jsonl") == [
        (1, comparison(1, [{"role": "user", "content": "Is it cold in Oslo in March?"}],
                       "Yes: March in Oslo averages around 0 °C, with nights often at −5 °C, so pack a warm coat.",
                       "It depends.")),
        (2, comparison(2, [{"role": "system", "content": "Be concise."},
                           {"role": "user", "content": "Name a prime number."},
                           {"role": "assistant", "content": "7"},
                           {"role": "user", "content": "Another one, larger."}], "11", "9")),
        (3, Invalid("preferred_output: expected a list of exactly one assistant message, got 2 messages")),
        (4, Invalid("non_preferred_output: missing")),
        (5, Invalid("input.messages: must not be empty")),
        (6, Invalid("preferred_output[0].role: expected assistant, got 'user'")),
    ]


# --- through the real CLI ------------------------------------------------------------------

def _edgetune(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from edgetune.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_cli_reports_invalid_export_lines_with_file_and_line():
    log = DATA / "langsmith.jsonl"
    result = _edgetune("data", "validate", str(log), "--format", "langsmith")
    assert result.returncode == 2
    assert f"{log}:10: outputs: missing;" in result.stderr
    assert f"{log}:12: run_type: 'retriever' runs are not chat turns;" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_cli_builds_datasets_from_a_langfuse_export(tmp_path):
    out = tmp_path / "out"
    result = _edgetune("data", "build", str(DATA / "langfuse.jsonl"), "--format", "langfuse",
                       "--skip-invalid", "--eval-fraction", "0", "--out", str(out))
    assert result.returncode == 0, result.stderr
    rows = {name: [json.loads(line) for line in (out / "train" / f"{name}.jsonl").read_text().splitlines()]
            for name in ("sft", "dpo", "kto")}
    # Trace 1 rated up (score before trace) -> SFT; trace 2 corrected -> SFT + DPO of the edit.
    assert sorted(r["completion"][0]["content"] for r in rows["sft"]) == [
        "Open the dashboard, click Export and choose CSV.",
        "Refunds are possible within 30 days of purchase; reply with your order number to start one.",
    ]
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows["dpo"]] == [(
        "Refunds are possible within 30 days of purchase; reply with your order number to start one.",
        "Refunds are possible within 30 days of purchase.",
    )]
    # Trace 1 up; trace 2 and trace 3 down.
    assert sorted((r["source"]["conversation_id"], r["label"]) for r in rows["kto"]) == [
        (LF_TRACE_2, False), (LF_TRACE_1, True), (LF_TRACE_3, False)]
