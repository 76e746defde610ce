"""_native.c, the C staging pass, held to the Python path it mirrors.

For any log line, `stage_line` must either step aside (None: the Python path
reads the line) or give exactly what the Python path makes of it: the plain
decoder and records.py to check it, rules.py to curate it, stage.stage_rows
to scrub, key and encode its rows, rules.split_of for its split. The lines
here are valid records of every shape, the same broken at random, and the
texts that stress each shortcut (PII, whitespace to normalise, escapes,
non-ASCII, lone surrogates); then whole builds with and without it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgetune.data import build as build_module
from edgetune.data import records, rules, stage
from edgetune.data.build import BuildOptions, build
from edgetune.data.stage import _decode_line

from broken_records import break_record

FIXTURES = Path(__file__).parent / "data" / "feedback"
ASSET = Path(__file__).parents[1] / "edgetune" / "assets" / "sample_feedback.jsonl"
PROPERTY = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

# Texts for every shortcut: repeats (duplicates, equal DPO answers), PII of each kind, digits
# without PII, whitespace to normalise (ASCII and not), JSON escapes, controls, non-ASCII, emoji,
# a lone surrogate (the C pass steps aside), the empty text.
TEXTS = ["Hi", "Same answer.", "Same  answer. ", " lead", "trail ", "mail a@b.com", "call +1 415 555 2671",
         "tab\there", "nl\nx", "a\x1fb", "\x85nel", "nb\xa0sp", "wide\u3000space", "é ok", "😀 emoji", 'q"uote\\s',
         "ctl\x01\x7f", "x \ud83d", "", "Sure!", "4111 1111 1111 1111", "ip 10.0.3.7 down", "v1.2.3 on 2026-10-02",
         "line\u2028sep", "long " * 40]


@st.composite
def conversations(draw) -> dict:
    """Valid conversations: any roles, feedback of every kind and spelling, correction chains."""
    roles = draw(st.lists(st.sampled_from(["user", "assistant", "assistant", "tool"]), min_size=1, max_size=9))
    if draw(st.booleans()):
        roles[0] = "system"
    messages, assistants = [], []
    for i, role in enumerate(roles):
        m = {"id": draw(st.sampled_from([f"m{i}", f"é{i}", f'q"{i}'])), "role": role,
             "content": draw(st.sampled_from(TEXTS))}
        if role == "assistant":
            if draw(st.integers(0, 2)) == 0:
                feedback = {}
                if draw(st.booleans()):
                    feedback["rating"] = draw(st.sampled_from(["up", "down", True, False, 1, 0, -1, None]))
                if draw(st.integers(0, 2)) == 0:
                    feedback["edited_content"] = draw(st.sampled_from(TEXTS))
                if draw(st.integers(0, 2)) == 0:
                    feedback["comment"] = draw(st.sampled_from(TEXTS))
                m["feedback"] = feedback
            if assistants and draw(st.integers(0, 2)) == 0:
                m["corrects"] = draw(st.sampled_from(assistants))
            assistants.append(m["id"])
        if draw(st.integers(0, 5)) == 0:
            m["extra"] = {"k": [1, 2.5, None]}  # keys the format does not define are ignored
        messages.append(m)
    record = {"type": "conversation", "conversation_id": draw(st.sampled_from(["c1", "c-é", "c\t2"])),
              "messages": messages}
    for key, values in (("persona", [None, "analyst", "é", 'p\t"x', ""]), ("timestamp", [None, "2026-11-27"]),
                        ("metadata", [None, {"app": {"v": [1e3, True]}}])):
        if draw(st.booleans()):
            record[key] = draw(st.sampled_from(values))
    return record


@st.composite
def comparisons(draw) -> dict:
    prompt = [{"role": r, "content": draw(st.sampled_from(TEXTS))}
              for r in draw(st.lists(st.sampled_from(["system", "user", "assistant"]), min_size=1, max_size=3))]
    ids = draw(st.sampled_from([("a", "b"), ("b", "a"), ("x", "é")]))
    record = {"type": "comparison", "comparison_id": draw(st.sampled_from(["x1", "x-é"])), "prompt": prompt,
              "responses": [{"id": ids[0], "content": draw(st.sampled_from(TEXTS))},
                            {"id": ids[1], "content": draw(st.sampled_from(TEXTS))}],
              "preferred": draw(st.sampled_from([ids[0], ids[1], "tie"]))}
    if draw(st.booleans()):
        record["persona"] = draw(st.sampled_from(["novice", None]))
    return record


# Values a field is set to when a record is broken: every JSON type, and look-alikes of valid values.
BROKEN = [None, "", "x", "m0", "m1", "a", "tie", "up", "Up", "system", "bot", 0, 1, -1, 2, 1.0, -0.0, True, 2**70, [],
          [{}], {}, {"rating": "up"}]


@st.composite
def lines(draw) -> bytes:
    """A record as one log line, maybe broken in one or two places, in either JSON spelling."""
    record = break_record(draw, draw(st.one_of(conversations(), comparisons())), BROKEN,
                          draw(st.sampled_from([0, 0, 1, 2])))
    text = json.dumps(record, ensure_ascii=draw(st.booleans()), separators=draw(st.sampled_from([None, (",", ":")])))
    return text.encode("utf-8", "surrogatepass") + draw(st.sampled_from([b"\n", b"", b"\r\n", b" \n"]))


OPTIONS = st.builds(BuildOptions, eval_fraction=st.sampled_from([0.0, 0.1, 0.5, 0.999]), seed=st.integers(-3, 3),
                    correction_prompt=st.sampled_from(rules.CORRECTION_PROMPTS))


def _encoded(curated: rules.Curated, split: str, conversation_id: str | None):
    """What the Python path stages for a curated record: (split, tally, [(output, index fields, row)])."""
    tally, rows = stage.stage_rows(curated, split, conversation_id)
    if tally is None:
        return None
    return split, tally, [(output, f"{split}\t{key}\t{len(row)}\t{fields}", row)
                          for output, split, key, fields, row in rows]


def python_path(raw: bytes, options: BuildOptions, extra: list[records.FeedbackRecord] | None = None):
    """What the Python path makes of a line, in the shape of `stage_line`'s answer; a string for a
    line it does not stage (an invalid line, a feedback record)."""
    obj = _decode_line(raw, fast=False)
    if type(obj) is not dict or records.validate_record(obj) is not None:
        return "invalid"
    record = records.build_record(obj)
    if obj["type"] == "comparison" and extra is None:
        split = rules.split_of(options.seed, "comparison", record.comparison_id, options.eval_fraction)
        return 1, record.comparison_id, 0, _encoded(rules.curate_comparison(record), split, None)
    if obj["type"] != "conversation":
        return obj["type"]
    assistants, signal = records.check_conversation(obj)
    cid = record.conversation_id
    split = rules.split_of(options.seed, "conversation", cid, options.eval_fraction)
    if extra is not None:  # curated again with split-out feedback (stage.restage_conversations)
        joined, lost = stage.join_feedback(record, list(enumerate(extra)))
        curated = rules.curate_conversation(record, joined, options.correction_prompt)
        return 0, cid, curated.unused, _encoded(curated, split, cid), [(k, why) for k, _, why in lost]
    if not signal:
        return 0, cid, assistants, None
    curated = rules.curate_conversation(record, None, options.correction_prompt)
    return 0, cid, curated.unused, _encoded(curated, split, cid)


def native_path(raw: bytes, options: BuildOptions, extra: list[records.FeedbackRecord] | None = None):
    staged = stage._stage_native(options)
    if extra is None:
        return staged(raw)
    return staged(raw, [(r.message_id, stage._RATING_CODES[r.feedback.rating], r.feedback.edited_content,
                         r.feedback.comment) for r in extra])


def assert_same(raw: bytes, options: BuildOptions, extra=None) -> bool:
    """True when the C pass took the line (and agreed with Python), False when it stepped aside."""
    fast = native_path(raw, options, extra)
    if fast is None:
        return False
    assert fast == python_path(raw, options, extra), raw
    return True


def test_the_c_staging_pass_is_built():
    """setup.py builds it as optional (an install without a C compiler goes on without it); where this
    suite runs, a missing build is a silent 2x slower build, so it is an error here."""
    assert stage._native_stage_line is not None, (
        "edgetune/data/_native.c is not built: install a C compiler (gcc, or Xcode's command line tools) "
        "and run `pip install -e .` again")


@PROPERTY
@given(lines(), OPTIONS)
def test_a_line_the_c_pass_takes_is_staged_as_the_python_path_stages_it(raw, options):
    assert_same(raw, options)


@PROPERTY
@given(conversations(), OPTIONS)
def test_the_c_pass_takes_valid_conversations_without_lone_surrogates(record, options):
    raw = json.dumps(record, ensure_ascii=False).encode("utf-8", "surrogatepass")
    taken = assert_same(raw, options)
    assert taken == ("\ud83d" not in json.dumps(record, ensure_ascii=False))


FEEDBACK = st.builds(records.Feedback, st.sampled_from(["up", "down", None]), st.sampled_from([None, *TEXTS[:8]]),
                     st.sampled_from([None, "", "see a@b.com", "fine"]))


@PROPERTY
@given(conversations(), OPTIONS, st.lists(st.tuples(st.sampled_from(["m0", "m1", "m2", "m3", "é3", "nope"]), FEEDBACK),
                                          max_size=4))
def test_a_conversation_curated_again_with_split_out_feedback_is_staged_as_in_python(record, options, items):
    extra = [records.FeedbackRecord(record["conversation_id"], mid, fb) for mid, fb in items]
    raw = json.dumps(record).encode()
    taken = assert_same(raw, options, extra)
    once_each = len({r.message_id for r in extra}) == len(extra)
    inline = {m["id"] for m in record["messages"] if m.get("feedback") is not None}
    surrogate = "\ud83d" in json.dumps(record, ensure_ascii=False) + repr(items)
    if once_each and not inline & {r.message_id for r in extra} and not surrogate:
        assert taken  # it only steps aside for a message with two signals (or a lone surrogate)


def test_every_record_of_the_sample_logs_but_feedback_is_taken_and_agrees():
    options = BuildOptions()
    taken = kinds = 0
    for path in (ASSET, FIXTURES / "signals.jsonl", FIXTURES / "invalid.jsonl"):
        for raw in path.read_bytes().splitlines(keepends=True):
            expected = python_path(raw, options)
            took = assert_same(raw, options)
            if expected not in ("invalid", "feedback"):
                kinds += 1
                taken += took
            else:
                assert not took
    assert kinds > 20 and taken == kinds


@pytest.mark.parametrize("line", [
    b'{"type":"conversation","conversation_id":"c","messages":[{"id":"a","role":"assistant","content":"x",'
    b'"feedback":{"rating":"up"}}],"type":"conversation"}',  # a key twice: Python keeps the last
    b'{"type":"conversation","conversation_\\u0069d":"c","messages":[{"id":"a","role":"user","content":"x"}]}',
    b'{"type":"conversation","conversation_id":"c","messages":[{"id":"a","role":"user","content":"\\ud83d"}]}',
    b'{"type":"conversation","conversation_id":"c","messages":[{"id":"a","role":"user","content":"x"}],}',
    b'{"type":"conversation","conversation_id":"c","messages":[{"id":"a","role":"user","content":"x"}]} x',
    b'{"type":"conversation","conversation_id":"c","metadata":{"n":NaN},"messages":[]}',
    b'{"type":"conversation","conversation_id":"c","messages":[{"id":"a","role":"user","content":"\xff"}]}',
    b'{"type":"feedback","conversation_id":"c","message_id":"a","rating":"up"}',
    b'{"type":"conversation","conversation_id":"c","messages":[{"id":"a","role":"assistant","content":"x",'
    b'"feedback":{"rating":1.0}}]}',
    b'{"type":"conversation","conversation_id":"c","messages":[{"id":"a","role":"assistant","content":"x",'
    b'"feedback":{"rating":-0}}]}',
    b'\xef\xbb\xbf{"type":"comparison"}',
    b'{"type":"conversation","conversation_id":"c","metadata":{"n":' + b"9" * 5000 + b'},"messages":['
    b'{"id":"a","role":"assistant","content":"x","feedback":{"rating":"up"}}]}',  # Python refuses its integer
    b'{"type":"conversation","conversation_id":"c","metadata":' + b'[' * 100 + b']' * 100 + b',"messages":[]}',
])
def test_the_c_pass_steps_aside_where_the_python_decoders_could_read_otherwise(line):
    assert native_path(line, BuildOptions()) is None


def test_exactly_the_texts_with_an_ascii_digit_or_at_sign_go_to_the_python_scrubber():
    """The C pass hands pii.scrub only the texts pii.scrub's own first check would look into (an ASCII
    digit or "@", found eight bytes at a time): every byte value, at every place in a word."""
    seen = []

    def scrub(text):
        seen.append(text)
        return text, None

    texts = [("x" * place) + chr(code) + "y" * (16 - place) for code in range(1, 0x800) for place in (0, 5, 7, 8, 13)]
    for start in range(0, len(texts), 200):  # (at most 512 messages a record: MAX_MESSAGES)
        record = {"type": "conversation", "conversation_id": "c", "messages": [
            {"id": f"m{k}", "role": "user" if k % 2 == 0 else "assistant", "content": text,
             **({"feedback": {"rating": "up"}} if k % 2 else {})} for k, text in enumerate(texts[start:start + 200])]}
        assert stage._native_stage_line(False, scrub, b"0\x00", 0.1, json.dumps(record).encode()) is not None
    wanted = [t for t in texts if any(c in "0123456789@" for c in t)]
    assert sorted(set(seen)) == sorted(set(wanted)) and len(wanted) == 11 * 5


def test_regression_memory_for_escaped_strings_is_their_own_length_not_the_rest_of_the_line():
    """Each string with an escape was given the rest of the line to decode into: 20,000 short escaped
    strings in a 200 KB line took gigabytes. Now a line's scratch is about its own size."""
    import tracemalloc

    line = (b'{"type":"conversation","conversation_id":"c","metadata":{"k":[' + b",".join([b'"\\n"'] * 20000)
            + b']},"messages":[{"id":"a","role":"assistant","content":"' + b"x\\n" * 50000
            + b'","feedback":{"rating":"up"}}]}')
    tracemalloc.start()
    try:
        assert native_path(line, BuildOptions()) is not None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * len(line)


def test_split_draw_compares_exactly_at_the_boundary():
    """rules.split_of compares a 64-bit draw with eval_fraction * 2**64 as Python compares an int with a
    float (exactly); fractions whose limit lands on either side of a record's draw must split alike."""
    raw = (b'{"type":"comparison","comparison_id":"x","prompt":[{"role":"user","content":"q"}],'
           b'"responses":[{"id":"a","content":"A"},{"id":"b","content":"B"}],"preferred":"a"}')
    draw = int.from_bytes(__import__("hashlib").blake2b(b"0\x00comparison\x00x", digest_size=8).digest(), "big")
    for fraction in (draw / 2**64, (draw + 1) / 2**64, (draw - 4096) / 2**64, (draw + 4096) / 2**64, 1e-300, 0.0):
        options = BuildOptions(eval_fraction=fraction)
        assert native_path(raw, options)[3][0] == rules.split_of(0, "comparison", "x", fraction)


def _random_log(rng: random.Random, n: int) -> str:
    """A log of `n` records of every kind (split-out feedback, repeats, newer versions, ties)."""
    out = []
    for i in range(n):
        kind = rng.random()
        cid = f"c{rng.randrange(n // 2)}"
        if kind < 0.7:
            messages = []
            for j in range(rng.randint(1, 8)):
                role = "assistant" if j % 2 else rng.choice(["user", "user", "tool"])
                m = {"id": f"m{j}", "role": role, "content": rng.choice(TEXTS[:17] + TEXTS[18:])}
                if role == "assistant" and rng.random() < 0.5:
                    m["feedback"] = {"rating": rng.choice(["up", "down", None]),
                                     **({"edited_content": rng.choice(TEXTS[:6])} if rng.random() < 0.3 else {}),
                                     **({"comment": rng.choice(["c", "mail a@b.com"])} if rng.random() < 0.3 else {})}
                if role == "assistant" and j > 2 and rng.random() < 0.4:
                    m["corrects"] = f"m{j - 2}"
                messages.append(m)
            out.append({"type": "conversation", "conversation_id": cid, "messages": messages,
                        **({"persona": rng.choice(["a", "b", "é"])} if rng.random() < 0.6 else {})})
        elif kind < 0.85:
            out.append({"type": "feedback", "conversation_id": cid, "message_id": f"m{rng.randrange(6)}",
                        "rating": rng.choice(["up", "down"]),
                        **({"edited_content": rng.choice(TEXTS[:6])} if rng.random() < 0.3 else {})})
        else:
            out.append({"type": "comparison", "comparison_id": f"x{rng.randrange(n // 4)}",
                        "prompt": [{"role": "user", "content": rng.choice(TEXTS)}],
                        "responses": [{"id": "a", "content": rng.choice(TEXTS[:6])},
                                      {"id": "b", "content": rng.choice(TEXTS[:6])}],
                        "preferred": rng.choice(["a", "b", "tie"])})
    return "".join(json.dumps(r, ensure_ascii=rng.random() < 0.5) + "\n" for r in out)


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("options", [
    BuildOptions(eval_fraction=0.3, skip_invalid=True, max_persona_share=0.6),
    BuildOptions(eval_fraction=0.0, seed=7, skip_invalid=True, correction_prompt=rules.MERGE),
])
def test_builds_with_and_without_the_c_pass_are_byte_identical(tmp_path, monkeypatch, options):
    """In worker processes over many chunks: the report (counts, drops, conflicts, orphans, PII,
    hashes) and every output file."""
    log = tmp_path / "log.jsonl"
    log.write_bytes(_random_log(random.Random(5), 3000).encode("utf-8", "surrogatepass") + ASSET.read_bytes()
                    + (FIXTURES / "signals.jsonl").read_bytes() + (FIXTURES / "invalid.jsonl").read_bytes())
    monkeypatch.setattr(build_module, "CHUNK_BYTES", 50_000)
    with_c = build([log], tmp_path / "c", options, jobs=2)
    monkeypatch.setattr(stage, "_native_stage_line", None)
    build([log], tmp_path / "py", options, jobs=2)
    assert with_c["records"]["read"] > 3000 and with_c["orphans"]["count"] and with_c["conflicts"]["count"]
    assert _folder_bytes(tmp_path / "c") == _folder_bytes(tmp_path / "py")
