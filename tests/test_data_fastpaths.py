"""The fast paths of `edgetune data build`, each held to the plain definition it replaces.

msgspec decodes and checks valid log lines (wire.py, held to records.py in
test_data_wire.py); orjson decodes the others and encodes rows; the stdlib
json is the fallback and the definition (same objects, same bytes, same
error messages). The cheap checks in front of `pii.scrub` and
`rules.normalize_whitespace` must only ever skip texts the full work would
leave as they are. The merge copies byte ranges of the staged rows.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgetune.data import build as build_module
from edgetune.data import pii, records, rules, stage
from edgetune.data.build import BuildOptions, build, scan_logs
from edgetune.fileio import sha256_file

FIXTURES = Path(__file__).parent / "data" / "feedback"
ASSET = Path(__file__).parents[1] / "edgetune" / "assets" / "sample_feedback.jsonl"
PROPERTY = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

# Lines the two decoders treat differently: orjson refuses NaN, infinities, lone surrogates;
# reads integers beyond 64 bits as floats; the stdlib decides and words the errors.
TRICKY_LINES = [
    '{"type": "feedback", "conversation_id": "c1", "message_id": "a", "rating": NaN}',
    '{"type": "feedback", "conversation_id": "c1", "message_id": "a", "rating": 1e400}',
    '{"type": "feedback", "conversation_id": "c1", "message_id": "a", "rating": 123456789012345678901234567890}',
    '{"type": "comparison", "comparison_id": "x", "prompt": [{"role": "user", "content": "q"}], '
    '"responses": [{"id": "a", "content": "A"}, {"id": "b", "content": "B"}], '
    '"preferred": -9223372036854775809}',
    '{"type": "conversation", "conversation_id": "c1", "n": 123456789012345678901234567890, "messages": ['
    '{"id": "u", "role": "user", "content": "lone \\ud83d and mail a@b.com"}, '
    '{"id": "a", "role": "assistant", "content": "ok \\udc00", "feedback": {"rating": "up", "comment": "\\ud800"}}]}',
    '{"type": "conversation", "conversation_id": "c1", "conversation_id": "c2", "messages": ['
    '{"id": "u", "role": "user", "content": "dup key"}, '
    '{"id": "a", "role": "assistant", "content": "yes", "feedback": {"rating": true}}]}',
    '{"type": "feedback", "conversation_id": "c2", "message_id": "a", "rating": "down"}\r',
    '\ufeff{"type": "feedback", "conversation_id": "c2", "message_id": "a", "rating": "up"}',
    '\x0c{"type": "feedback"}',
    '{"type": "feedback", "conversation_id": "c2"',
    '{"type": "feedback", "conversation_id": "c2", "message_id": "a", "rating": "up"} x',
    '\u3000',
    '[1, 2]',
]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def no_orjson(monkeypatch):
    """Run the build on the stdlib alone (forked workers inherit the patch)."""
    monkeypatch.setattr(stage, "_fast_loads", None)
    monkeypatch.setattr(stage, "_fast_dumps", None)
    monkeypatch.setattr(stage, "_fast_records", None)
    monkeypatch.setattr(stage, "_native_stage_line", None)


def tricky_log(tmp_path: Path) -> Path:
    log = tmp_path / "tricky.jsonl"
    log.write_bytes("".join(line + "\n" for line in TRICKY_LINES).encode("utf-8", "surrogatepass")
                    + b'{"type": "feedback", "conversation_id": "c1", "message_id": "\xff"}\n')
    return log


# --- decoding -------------------------------------------------------------------------------

def test_tricky_lines_decode_and_fail_as_the_stdlib_has_them(tmp_path, monkeypatch):
    log = tricky_log(tmp_path)
    fast = scan_logs([log])
    monkeypatch.setattr(stage, "_fast_loads", None)
    monkeypatch.setattr(stage, "_fast_records", None)
    slow = scan_logs([log])
    assert fast.problems == slow.problems
    assert fast.counts == slow.counts
    assert [(w, r.feedback) for items in fast.feedback.values() for w, r in items] == \
           [(w, r.feedback) for items in slow.feedback.values() for w, r in items]
    assert [why for _, _, why in fast.problems] == [
        "rating: unknown rating nan (expected \"up\"/\"down\", true/false, 1/-1 or 1/0)",
        "rating: unknown rating inf (expected \"up\"/\"down\", true/false, 1/-1 or 1/0)",
        "rating: unknown rating 123456789012345678901234567890 (expected \"up\"/\"down\", true/false, 1/-1 or 1/0)",
        "preferred: -9223372036854775809 is not a response id (expected 'a', 'b' or \"tie\")",
        "not valid JSON (Unexpected UTF-8 BOM (decode using utf-8-sig) at column 1)",
        "not valid JSON (Expecting value at column 1)",
        "not valid JSON (Expecting ',' delimiter at column 1)",
        "not valid JSON (Extra data at column 82)",
        "expected a JSON object, got list",
        "not UTF-8 text (bad byte at column 62)",
    ]


def test_regression_integer_beyond_64_bits_is_named_as_written_not_as_orjson_float(tmp_path):
    """orjson reads 123456789012345678901234567890 as 1.2345678901234568e+29; the reason must not."""
    log = tmp_path / "log.jsonl"
    log.write_text(TRICKY_LINES[2] + "\n")
    (problem,) = scan_logs([log]).problems
    assert "123456789012345678901234567890" in problem[2] and "e+29" not in problem[2]


@pytest.mark.parametrize("line, reason", [
    ('{"type": "feedback", "conversation_id": "c", "message_id": "a", "rating": "up", "metadata": {"n": '
     + "9" * 5000 + '}}', "not readable as JSON (a number of more than 4300 digits)"),
    ('{"type": "feedback", "n": ' + "[" * 100_000 + "]" * 100_000 + '}', "not readable as JSON (nested too deeply)"),
], ids=["integer of 5000 digits", "nested 100,000 deep"])
def test_regression_lines_json_loads_raises_on_are_invalid_lines_not_a_crash(tmp_path, line, reason):
    """json.loads raises ValueError (not JSONDecodeError) past Python's integer-digit limit, and
    RecursionError past its nesting limit: both crashed a build; they are invalid lines, named."""
    log = tmp_path / "log.jsonl"
    log.write_text(line + "\n" + '{"type": "feedback", "conversation_id": "c", "message_id": "a", "rating": "up"}\n')
    assert [why for _, _, why in scan_logs([log]).problems] == [reason]
    report = build([log], tmp_path / "out", BuildOptions(skip_invalid=True))
    assert report["records"]["invalid"] == 1 and report["invalid_examples"] == [f"{log}:1: {reason}"]
    gz = tmp_path / "log.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write(log.read_text())
    assert [why for _, _, why in scan_logs([gz]).problems] == [reason]  # source.iter_jsonl, the other reader


# --- encoding -------------------------------------------------------------------------------

def test_row_json_is_compact_json_dumps_for_every_code_point(monkeypatch):
    text = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000)
    rows = [{"prompt": [{"role": "user", "content": text[i:i + 4096]}], "label": True, "source": {"ids": ["a"]}}
            for i in range(0, len(text), 4096)]
    rows.append({"prompt": [{"role": "user", "content": "lone \ud83d surrogate"}]})
    expected = [(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8", "backslashreplace")
                for r in rows]
    assert [stage.row_json(r) for r in rows] == expected
    monkeypatch.setattr(stage, "_fast_dumps", None)
    assert [stage.row_json(r) for r in rows] == expected
    assert json.loads(expected[-1])["prompt"][0]["content"] == "lone \ud83d surrogate"


def test_build_without_orjson_or_msgspec_gives_byte_identical_outputs(tmp_path, monkeypatch):
    """The whole build, in worker processes over many chunks, with and without orjson, msgspec and
    the C staging pass (test_data_native.py holds that one to the Python path line by line)."""
    log = tmp_path / "log.jsonl"
    log.write_bytes((FIXTURES / "signals.jsonl").read_bytes() + ASSET.read_bytes()
                    + (FIXTURES / "invalid.jsonl").read_bytes() + tricky_log(tmp_path).read_bytes())
    options = BuildOptions(eval_fraction=0.3, skip_invalid=True, max_persona_share=0.6)
    monkeypatch.setattr(build_module, "CHUNK_BYTES", 2000)
    build([log], tmp_path / "fast", options, jobs=2)
    monkeypatch.setattr(stage, "_fast_loads", None)
    monkeypatch.setattr(stage, "_fast_dumps", None)
    monkeypatch.setattr(stage, "_fast_records", None)
    monkeypatch.setattr(stage, "_native_stage_line", None)
    build([log], tmp_path / "slow", options, jobs=2)
    assert folder_bytes(tmp_path / "fast") == folder_bytes(tmp_path / "slow")


# --- the checks in front of scrubbing and normalising -----------------------------------------

# Every character the two checks look at, and their look-alikes: ASCII and other digits,
# every whitespace str.split() knows, "@", ":" and the separators of phones and addresses.
TRICKY_TEXT = st.text(alphabet=st.sampled_from(
    list("0123456789@:.+-()/ ab") + ["\t", "\n", "\x0b", "\x0c", "\r", "\x1c", "\x1f", "\x85", "\xa0", "\u2003",
                                      "\u3000", "\u0663", "\uff10", "\ud83d", "é"]), max_size=40)


def _scrub_without_the_fast_path(text: str, counts: Counter) -> str:
    before = sum(counts.values())
    text = pii._scrub_once(text, counts)
    while (after := sum(counts.values())) != before:
        before = after
        text = pii._scrub_once(text, counts)
    return text


@PROPERTY
@given(TRICKY_TEXT)
def test_scrub_fast_path_only_skips_texts_the_full_scrub_leaves_alone(text):
    fast, slow = Counter(), Counter()
    assert pii.scrub(text, fast) == _scrub_without_the_fast_path(text, slow)
    assert fast == slow


@PROPERTY
@given(TRICKY_TEXT)
def test_normalize_whitespace_fast_path_agrees_with_split_and_join(text):
    assert rules.normalize_whitespace(text) == " ".join(text.split())


@PROPERTY
@given(TRICKY_TEXT)
def test_staged_text_is_scrubbed_then_normalised(text):
    """`_TextTable.text` skips both for plain text; it must give what doing both gives."""
    counts = Counter()
    clean = pii.scrub(text, counts)
    expected = (clean, rules.normalize_whitespace(clean).encode("utf-8", "surrogatepass"),
                tuple(counts[k] for k in stage.PII_KINDS) if counts else None)
    assert stage._TextTable().text(text) == expected


@pytest.mark.parametrize("text", ["", " ", "a", "a b", " a", "a ", "a  b", "a\tb", "a\x1fb", "a\x85b", "a\u3000b",
                                  "plain words only."])
def test_normalize_whitespace_on_worked_examples(text):
    assert rules.normalize_whitespace(text) == " ".join(text.split())


# --- checking conversations -------------------------------------------------------------------

# Values of a conversation's own fields that the checks tell apart: absent, null, each JSON type.
ABSENT = object()  # the key is left out
FIELD_VALUES = st.sampled_from([ABSENT, None, "", "c-1", 3, True, [], {}, {"app": "x"},
                                [{"id": "m1", "role": "user", "content": "Hi"}]])


@PROPERTY
@given(st.fixed_dictionaries({k: FIELD_VALUES for k in ("conversation_id", "persona", "timestamp", "metadata",
                                                         "messages")}))
def test_conversation_fields_checked_in_one_test_give_the_reason_of_the_checks_in_order(fields):
    """`check_conversation` tests a conversation's own fields in one expression, and runs the checks
    one by one only when that fails: valid or not, the reason must be theirs."""
    obj = {"type": "conversation", **{k: v for k, v in fields.items() if v is not ABSENT}}
    try:
        records.required_str(obj, "conversation_id")
        records._check_common(obj)
        records._message_list(obj, "messages")
        expected = None
    except records.Bad as e:
        expected = str(e)
    assert records.validate_record(obj) == expected


# Texts that stress every shortcut of the row staging: repeats (shared keys and duplicates), PII,
# whitespace to normalise, non-ASCII and a lone surrogate.
TEXTS = ["Hi", "Same answer.", "Same  answer. ", " lead", "mail a@b.com", "call +1 415 555 2671", "tab\there",
         "é ok", "x \ud83d", "Sure!", "ok", "4111 1111 1111 1111"]


@st.composite
def conversation_records(draw) -> dict:
    """Valid v1 conversations: any roles, feedback of every kind, correction chains (branching too)."""
    roles = draw(st.lists(st.sampled_from(["user", "assistant", "assistant", "tool"]), min_size=1, max_size=8))
    if draw(st.booleans()):
        roles[0] = "system"
    messages, assistants = [], []
    for i, role in enumerate(roles):
        m = {"id": f"m{i}", "role": role, "content": draw(st.sampled_from(TEXTS))}
        if role == "assistant":
            feedback = {}
            if draw(st.booleans()):
                feedback["rating"] = draw(st.sampled_from(["up", "down", True, 0]))
            if draw(st.integers(0, 3)) == 0:
                feedback["edited_content"] = draw(st.sampled_from(TEXTS))
            if draw(st.integers(0, 3)) == 0:
                feedback["comment"] = draw(st.sampled_from(TEXTS))
            if feedback:
                m["feedback"] = feedback
            if assistants and draw(st.booleans()):
                m["corrects"] = draw(st.sampled_from(assistants))
            assistants.append(m["id"])
        messages.append(m)
    record = {"type": "conversation", "conversation_id": "c1", "messages": messages}
    if draw(st.booleans()):
        record["persona"] = draw(st.sampled_from(["analyst", 'p\t"x']))
    return record


@PROPERTY
@given(conversation_records())
def test_check_conversation_counts_assistants_and_signals_as_the_typed_record_has_them(record):
    conv = records.build_record(record)
    assert records.check_conversation(record) == (sum(m.role == "assistant" for m in conv.messages),
                                                  conv.has_signal())


def _scrubbed(row: dict, counts: Counter) -> dict:
    """The plain definition of a staged row: every text scrubbed, in place of the original."""
    out = {key: [{"role": t["role"], "content": pii.scrub(t["content"], counts)} for t in value]
           if key in ("prompt", "completion", "chosen", "rejected") else value for key, value in row.items()}
    if "comments" in row["source"]:
        out["source"] = {**row["source"], "comments": [pii.scrub(c, counts) for c in row["source"]["comments"]]}
    return out


@PROPERTY
@given(conversation_records(), st.sampled_from(rules.CORRECTION_PROMPTS), st.booleans())
def test_staged_rows_keys_and_pii_are_those_of_the_scrubbed_rows(record, correction_prompt, split_out):
    """`stage_rows` scrubs, keys and encodes each text, message, list and prompt hash once per record;
    every row must still be `json.dumps` of its scrubbed row, keyed by `rules.dedup_key`."""
    conv = records.build_record(record)
    extra = {m.id: [records.Feedback("up", comment="see a@b.com")] for m in conv.messages[1::3]
             if m.role == "assistant"} if split_out else None
    curated = rules.curate_conversation(conv, extra, correction_prompt)
    drops_before = dict(curated.drops)
    tally, staged = stage.stage_rows(curated, "train", "c1")
    expected, equal_pairs = [], 0
    for output, row in curated.rows:
        counts = Counter()
        clean = _scrubbed(row, counts)
        if output == "dpo" and rules.chosen_equals_rejected(clean):
            equal_pairs += 1
            continue
        expected.append((output, "train", rules.dedup_key(output, clean).hex(),
                         f"{row['source']['rule']}\t{json.dumps(row['source'].get('persona', rules.UNTAGGED))}\t"
                         + ",".join(str(counts[k]) for k in stage.PII_KINDS),
                         (json.dumps(clean, ensure_ascii=False, separators=(",", ":")) + "\n").encode(
                             "utf-8", "backslashreplace")))
    assert staged == expected
    assert dict(curated.drops) == drops_before  # the caller's record is left as it was
    if tally is not None:
        assert json.loads(tally)["drops"].get("dpo_chosen_equals_rejected", 0) == equal_pairs


# --- the merge's copies ------------------------------------------------------------------------

def test_write_ranges_concatenates_the_ranges_and_returns_the_sha256(tmp_path, monkeypatch):
    monkeypatch.setattr(build_module, "WRITE_BLOCK", 3)  # ranges longer than a block: several reads
    files = [tmp_path / "a", tmp_path / "b"]
    files[0].write_bytes(b"0123456789")
    files[1].write_bytes(b"abcdefghij")
    digest = build_module._write_ranges(files, [[0, 2, 9], [1, 0, 1], [0, 0, 1], [1, 5, 10]], tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == b"2345678" + b"a" + b"0" + b"fghij"
    assert digest == hashlib.sha256(b"2345678a0fghij").hexdigest() == sha256_file(tmp_path / "out")
    assert build_module._write_ranges(files, [], tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


def test_write_ranges_discard_deletes_each_file_once_copied(tmp_path, monkeypatch):
    """The merge frees each staged file as soon as its last range is written; the output is the same."""
    monkeypatch.setattr(build_module, "WRITE_BLOCK", 3)
    files = [tmp_path / name for name in "abc"]
    for f, data in zip(files, (b"0123456789", b"abcdefghij", b"unused")):
        f.write_bytes(data)
    unlinked = []
    real_unlink = build_module.os.unlink

    def unlink(path):
        unlinked.append(Path(path).name)
        real_unlink(path)

    monkeypatch.setattr(build_module.os, "unlink", unlink)
    digest = build_module._write_ranges(files, [[0, 2, 9], [1, 0, 1], [0, 0, 1], [1, 5, 10]], tmp_path / "out",
                                        discard=True)
    assert (tmp_path / "out").read_bytes() == b"2345678" + b"a" + b"0" + b"fghij"
    assert digest == hashlib.sha256(b"2345678a0fghij").hexdigest()
    assert unlinked == ["a", "b", "c"]  # a after its last range, b after its last, c (never read) at the end
    assert not any(f.exists() for f in files)
