"""`edgetune data build` end to end, in-process, on real files (fixtures in tests/data/feedback/)."""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from edgetune.data import build as build_module
from edgetune.data import rules, stage
from edgetune.data.build import BuildOptions, build, scan_logs
from edgetune.data.pii import scrub
from edgetune.data.records import parse_record
from edgetune.data.report import render_report
from edgetune.errors import InputError, UserError

FIXTURES = Path(__file__).parent / "data" / "feedback"
SIGNALS = FIXTURES / "signals.jsonl"
INVALID = FIXTURES / "invalid.jsonl"
ASSET = Path(__file__).parents[1] / "edgetune" / "assets" / "sample_feedback.jsonl"
ALL_TRAIN = BuildOptions(eval_fraction=0.0)


def read_rows(folder: Path, split: str, output: str) -> list[dict]:
    return [json.loads(line) for line in (folder / split / f"{output}.jsonl").read_text(encoding="utf-8").splitlines()]


def all_rows(folder: Path, output: str) -> list[dict]:
    return read_rows(folder, "train", output) + read_rows(folder, "eval", output)


def write_log(path: Path, *records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def conversation(cid, *messages, persona=None):
    record = {"type": "conversation", "conversation_id": cid, "messages": list(messages)}
    if persona:
        record["persona"] = persona
    return record


def m(mid, role, content, **extra):
    return {"id": mid, "role": role, "content": content, **extra}


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- the signals fixture: every rule, conflict, orphan and drop ------------------------------------

@pytest.fixture(scope="module")
def signals_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("signals") / "out"
    report = build([SIGNALS], out, ALL_TRAIN)
    return out, report


def test_outputs_have_the_spec_row_shapes(signals_build):
    out, _ = signals_build
    assert sorted(p.name for p in out.iterdir()) == ["eval", "report.json", "train"]
    for split in rules.SPLITS:
        assert sorted(p.name for p in (out / split).iterdir()) == ["dpo.jsonl", "kto.jsonl", "sft.jsonl"]
    shapes = {"sft": {"prompt", "completion", "source"}, "dpo": {"prompt", "chosen", "rejected", "source"},
              "kto": {"prompt", "completion", "label", "source"}}
    for output, keys in shapes.items():
        rows = all_rows(out, output)
        assert rows
        for row in rows:
            assert set(row) == keys
            assert all(set(t) == {"role", "content"} for t in row["prompt"])
            for key in ("completion", "chosen", "rejected"):
                if key in row:
                    assert [t["role"] for t in row[key]] == ["assistant"]
            assert {"rule", "message_ids"} <= set(row["source"])
            assert ("conversation_id" in row["source"]) != ("comparison_id" in row["source"])


def test_signals_give_the_hand_worked_rows(signals_build):
    out, _ = signals_build

    def summary(output):
        return [(r["source"].get("conversation_id") or r["source"]["comparison_id"], r["source"]["rule"],
                 r["source"]["message_ids"]) for r in read_rows(out, "train", output)]

    assert summary("sft") == [
        ("c-up", "thumbs_up", ["m2"]), ("c-chain", "correction", ["m3", "m5"]), ("c-edit", "edit", ["m2"]),
        ("c-split", "thumbs_up", ["m2"]), ("c-split", "edit", ["m4"]), ("c-dup-1", "thumbs_up", ["m2"])]
    assert summary("dpo") == [
        ("c-chain", "correction", ["m3", "m5"]), ("c-edit", "edit", ["m2"]), ("c-split", "edit", ["m4"]),
        ("x-1", "comparison", ["b", "a"])]
    assert summary("kto") == [
        ("c-up", "thumbs_up", ["m2"]), ("c-chain", "thumbs_down", ["m3"]), ("c-chain", "thumbs_up", ["m5"]),
        ("c-down", "thumbs_down", ["m2"]), ("c-split", "thumbs_up", ["m2"]), ("c-dup-1", "thumbs_up", ["m2"])]
    chain_sft = read_rows(out, "train", "sft")[1]
    assert chain_sft == {
        "prompt": [{"role": "system", "content": "You are a helpful assistant."},
                   {"role": "user", "content": "Write code that prints hello."}],
        "completion": [{"role": "assistant", "content": "print('hello')"}],
        "source": {"rule": "correction", "conversation_id": "c-chain", "message_ids": ["m3", "m5"],
                   "persona": "analyst"}}
    # split-out edit joined to its conversation, comment kept in provenance
    assert read_rows(out, "train", "dpo")[2]["chosen"][0]["content"] == "About 6.2 miles."
    assert read_rows(out, "train", "dpo")[2]["source"]["comments"] == ["precision"]


def test_signals_report_counts_rules_drops_conflicts_orphans(signals_build):
    _, report = signals_build
    assert report["records"] == {"read": 19, "invalid": 0, "conversation": 10, "feedback": 6, "comparison": 3,
                                 "superseded_conversations": 0, "superseded_comparisons": 0}
    assert report["rules"] == {
        "thumbs_up": {"in": 5, "sft": 3, "dpo": 0, "kto": 4},
        "correction": {"in": 1, "sft": 1, "dpo": 1, "kto": 0},
        "edit": {"in": 3, "sft": 2, "dpo": 2, "kto": 0},
        "thumbs_down": {"in": 2, "sft": 0, "dpo": 0, "kto": 2},
        "comparison": {"in": 3, "sft": 0, "dpo": 1, "kto": 0}}
    assert report["drops"] == {"comparison_tie": 1, "dpo_chosen_equals_rejected": 1, "duplicate_kto": 1,
                               "duplicate_sft": 1, "edit_unchanged": 1}
    assert report["unused_assistant_messages"] == 2
    assert report["conflicts"] == {"count": 1, "examples": [{"conversation_id": "c-conflict", "message_id": "m2"}]}
    assert report["orphans"]["by_reason"] == {"not_an_assistant_message": 1, "unknown_conversation": 1,
                                              "unknown_message": 1}
    assert [(o["line"], o["conversation_id"], o["message_id"]) for o in report["orphans"]["examples"]] == [
        (12, "c-missing", "m2"), (13, "c-split", "m9"), (14, "c-split", "m1")]
    assert report["outputs"]["train"]["sft"]["personas"] == {
        "analyst": {"rows": 3, "share": 0.5}, "admin": {"rows": 2, "share": 0.3333},
        UNTAGGED_KEY: {"rows": 1, "share": 0.1667}}
    assert report["outputs"]["eval"]["sft"]["rows"] == 0


UNTAGGED_KEY = rules.UNTAGGED


def test_report_rendering_shows_every_section_and_persona_warnings(signals_build, tmp_path):
    _, report = signals_build
    text = render_report(report)
    for needle in ["1 thumbs up", "2 correction chain", "3 edited response", "4 thumbs down", "5 side-by-side",
                   "6 conflict (up+down)", "duplicate_sft", "orphaned feedback: 3", "PII redacted: email 0",
                   "train/sft.jsonl", "analyst 50%"]:
        assert needle in text
    skewed = build([write_log(tmp_path / "log.jsonl", *[
        conversation(f"c{i}", m("u", "user", f"q{i}"), m("a", "assistant", f"a{i}", feedback={"rating": "up"}),
                     persona="analyst" if i < 3 else "novice") for i in range(4)])], tmp_path / "out", ALL_TRAIN)
    assert ("train/sft: persona 'analyst' is 75% of the rows (3 of 4); consider --max-persona-share"
            in skewed["warnings"])
    assert "warning: train/sft: persona 'analyst' is 75%" in render_report(skewed)


# --- determinism and the parallel path -----------------------------------------------------------------

def test_same_inputs_and_seed_give_byte_identical_outputs(tmp_path):
    options = BuildOptions(eval_fraction=0.3, seed=7)
    build([SIGNALS, ASSET], tmp_path / "a", options)
    build([SIGNALS, ASSET], tmp_path / "b", options)
    assert folder_bytes(tmp_path / "a") == folder_bytes(tmp_path / "b")


def test_file_order_changes_row_order_but_not_the_examples(tmp_path):
    """Inputs without repeated ids or duplicates: the same rows whatever the file order."""
    build([SIGNALS, ASSET], tmp_path / "a", ALL_TRAIN)
    build([ASSET, SIGNALS], tmp_path / "b", ALL_TRAIN)
    for output in rules.OUTPUTS:
        a, b = all_rows(tmp_path / "a", output), all_rows(tmp_path / "b", output)
        assert sorted(map(json.dumps, a)) == sorted(map(json.dumps, b))


def test_worker_processes_and_chunks_give_the_same_outputs_as_one_process(tmp_path, monkeypatch):
    """The parallel path (byte-range chunks in worker processes) against the single-process one."""
    log = tmp_path / "log.jsonl"
    text = SIGNALS.read_text() + ASSET.read_text() + INVALID.read_text()
    log.write_text(text)
    options = BuildOptions(eval_fraction=0.2, skip_invalid=True)
    build([log], tmp_path / "one", options, jobs=1)
    monkeypatch.setattr(build_module, "CHUNK_BYTES", 500)  # dozens of chunks, cut mid-line
    assert len(build_module.plan_chunks([log], "v1", 2)) == 8
    messages = []
    report = build([log], tmp_path / "two", options, jobs=2, progress=messages.append)
    assert folder_bytes(tmp_path / "one") == folder_bytes(tmp_path / "two")
    # each chunk taken in is told, in order, with the records read so far
    told = [m for m in messages if m.startswith("  read ")]
    assert [m.split()[1] for m in told] == [f"{k}/8" for k in range(1, 9)]
    assert f"{report['records']['read']:,} records" in told[-1]
    # line numbers of problems are absolute across chunk boundaries
    offset = len((SIGNALS.read_text() + ASSET.read_text()).splitlines())
    assert report["invalid_examples"][0] == f"{log}:{offset + 2}: not valid JSON (Expecting value at column 1)"


def test_chunks_own_the_lines_that_start_in_their_range(tmp_path):
    log = tmp_path / "log.jsonl"
    lines = [json.dumps({"n": i, "pad": "x" * (i * 7 % 50)}) for i in range(200)]
    log.write_text("\n".join(lines) + "\n\n")  # and a blank line at the end
    size = log.stat().st_size
    seen = []
    for k in range(13):
        chunk = stage.Chunk(k, 0, str(log), "lines", size * k // 13, size * (k + 1) // 13)
        seen += [obj["n"] for _, _, obj, _ in stage.iter_chunk(chunk)]
    assert seen == list(range(200))


# --- invalid input ------------------------------------------------------------------------------------

EXPECTED_PROBLEMS = [
    (2, "not valid JSON (Expecting value at column 1)"),
    (3, "expected a JSON object, got list"),
    (4, "type: missing (expected conversation|feedback|comparison)"),
    (5, "type: unknown type 'chat' (expected conversation|feedback|comparison)"),
    (6, "conversation_id: missing"),
    (7, "conversation_id: expected a string, got a number"),
    (8, "messages: must not be empty"),
    (9, "messages[1].role: unknown role 'bot' (expected system|user|assistant|tool)"),
    (10, "messages[0].content: missing"),
    (11, "messages[1].id: duplicate id 'm1' (first at messages[0])"),
    (12, "messages[1].role: a system message may only come first"),
    (13, "messages[0].feedback: only assistant messages carry feedback (this one is user)"),
    (14, "messages[1].feedback.rating: unknown rating 'meh' (expected \"up\"/\"down\", true/false, 1/-1 or 1/0)"),
    (15, "messages[1].corrects: 'm7' points nowhere (no such message)"),
    (16, "messages[1].corrects: 'm1' is a user message; corrects must name an earlier assistant message"),
    (18, "message_id: missing"),
    (19, "feedback: no signal (expected at least one of rating, edited_content, comment)"),
    (20, "responses: expected exactly two responses, got 3"),
    (21, "preferred: 'c' is not a response id (expected 'a', 'b' or \"tie\")"),
]


def test_strict_build_reports_every_error_and_writes_nothing(tmp_path):
    out = tmp_path / "nested" / "out"
    with pytest.raises(InputError) as err:
        build([SIGNALS, INVALID], out)
    assert err.value.problems == [(str(INVALID), line, why) for line, why in EXPECTED_PROBLEMS]
    assert str(err.value).splitlines()[0] == f"{INVALID}:2: not valid JSON (Expecting value at column 1)"
    assert list(tmp_path.iterdir()) == []  # no out, no parent, no staging left behind


def test_the_collector_is_paused_during_a_build_and_back_after_it_even_after_an_error(tmp_path):
    """build() pauses the cyclic garbage collector (its passes over a build's millions of index
    entries were a fifth of the CPU time); a caller's process must get it back, whatever happens."""
    import gc

    enabled_during = []
    build([SIGNALS], tmp_path / "out", progress=lambda message: enabled_during.append(gc.isenabled()))
    assert enabled_during and not any(enabled_during)
    assert gc.isenabled()
    with pytest.raises(InputError):
        build([SIGNALS, INVALID], tmp_path / "bad")
    assert gc.isenabled()


def test_strict_failure_leaves_an_existing_out_untouched_even_with_force(tmp_path):
    out = tmp_path / "out"
    build([SIGNALS], out, ALL_TRAIN)
    before = folder_bytes(out)
    with pytest.raises(InputError):
        build([INVALID], out, force=True)
    assert folder_bytes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_skip_invalid_builds_from_the_rest_and_counts_them(tmp_path):
    report = build([INVALID], tmp_path / "out", BuildOptions(eval_fraction=0.0, skip_invalid=True))
    assert report["records"]["invalid"] == len(EXPECTED_PROBLEMS)
    assert report["drops"]["invalid_record"] == len(EXPECTED_PROBLEMS)
    assert report["invalid_examples"] == [f"{INVALID}:{line}: {why}" for line, why in EXPECTED_PROBLEMS]
    assert [r["source"]["conversation_id"] for r in read_rows(tmp_path / "out", "train", "sft")] == ["ok-1"]
    assert [r["label"] for r in read_rows(tmp_path / "out", "train", "kto")] == [True, False]


def test_validate_scan_counts_and_problems():
    scan = scan_logs([SIGNALS, INVALID])
    assert scan.counts["records"] == 19 + 21
    assert [(line, why) for _, line, why in scan.problems] == EXPECTED_PROBLEMS


def test_not_utf8_and_crlf_and_blank_lines(tmp_path):
    log = tmp_path / "log.jsonl"
    good = json.dumps(conversation("c1", m("u", "user", "Q"), m("a", "assistant", "A", feedback={"rating": "up"})))
    log.write_bytes(b"\r\n" + good.encode() + b"\r\n" + b'{"type": "conversation", "x": "\xff"}\r\n')
    with pytest.raises(InputError) as err:
        build([log], tmp_path / "out")
    assert err.value.problems == [(str(log), 3, "not UTF-8 text (bad byte at column 32)")]
    build([log], tmp_path / "out", BuildOptions(eval_fraction=0.0, skip_invalid=True))
    assert len(read_rows(tmp_path / "out", "train", "sft")) == 1


def test_out_exists_without_force_is_a_user_error_before_reading(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(UserError, match="already exists; choose another --out or pass --force"):
        build([tmp_path / "missing.jsonl"], tmp_path / "out")


def test_force_replaces_an_existing_out(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    build([SIGNALS], out, ALL_TRAIN, force=True)
    assert not (out / "stale.txt").exists() and (out / "report.json").exists()


# --- versions, joins, splits ----------------------------------------------------------------------------

def test_latest_version_wins_across_files_and_feedback_joins_it(tmp_path):
    first = write_log(tmp_path / "a.jsonl",
                      conversation("c1", m("u", "user", "Q"), m("a", "assistant", "old", feedback={"rating": "up"}),
                                   m("b", "assistant", "gone")),
                      {"type": "feedback", "conversation_id": "c1", "message_id": "b", "rating": "up"})
    second = write_log(tmp_path / "b.jsonl",
                       conversation("c1", m("u", "user", "Q"), m("a", "assistant", "new", feedback={"rating": "up"})))
    report = build([first, second], tmp_path / "out", ALL_TRAIN)
    assert [r["completion"][0]["content"] for r in read_rows(tmp_path / "out", "train", "sft")] == ["new"]
    assert report["records"]["superseded_conversations"] == 1
    assert report["orphans"]["examples"] == [{"file": str(first), "line": 2, "conversation_id": "c1",
                                              "message_id": "b", "reason": "unknown_message"}]
    # in the other order the older line is the later one, so it wins
    build([second, first], tmp_path / "out2", ALL_TRAIN)
    assert [r["completion"][0]["content"] for r in read_rows(tmp_path / "out2", "train", "sft")] == ["old", "gone"]


def test_latest_comparison_wins(tmp_path):
    base = {"type": "comparison", "comparison_id": "x", "prompt": [{"role": "user", "content": "Q"}],
            "responses": [{"id": "a", "content": "A"}, {"id": "b", "content": "B"}]}
    report = build([write_log(tmp_path / "log.jsonl", {**base, "preferred": "a"}, {**base, "preferred": "b"})],
                   tmp_path / "out", ALL_TRAIN)
    assert [r["chosen"][0]["content"] for r in read_rows(tmp_path / "out", "train", "dpo")] == ["B"]
    assert report["records"]["superseded_comparisons"] == 1


def test_no_conversation_or_comparison_is_in_both_splits(tmp_path):
    report = build([ASSET], tmp_path / "out", BuildOptions(eval_fraction=0.5, seed=3))
    ids = {}
    for split in rules.SPLITS:
        for output in rules.OUTPUTS:
            for row in read_rows(tmp_path / "out", split, output):
                key = row["source"].get("conversation_id") or "x:" + row["source"]["comparison_id"]
                assert ids.setdefault(key, split) == split
    assert set(ids.values()) == {"train", "eval"}
    assert report["outputs"]["eval"]["sft"]["rows"] > 0


# --- privacy and quality filters -------------------------------------------------------------------------

PII_TEXT = "Mail jane.doe@example.com, call +1 415 555 2671, card 4111 1111 1111 1111, host 10.0.0.12."


def test_pii_is_scrubbed_from_every_output_text_and_counted_exactly(tmp_path):
    log = write_log(tmp_path / "log.jsonl",
                    conversation("c1", m("s", "system", "Admin is root@corp.example"), m("u", "user", PII_TEXT),
                                 m("a", "assistant", "I emailed jane.doe@example.com",
                                   feedback={"rating": "up", "comment": "ping me at 10.1.2.3"}),
                                 m("u2", "user", "and?"),
                                 m("b", "assistant", "Done",
                                   feedback={"edited_content": "Done, call +44 20 7946 0958"})),
                    {"type": "comparison", "comparison_id": "x", "prompt": [{"role": "user", "content": PII_TEXT}],
                     "responses": [{"id": "a", "content": "ok"}, {"id": "b", "content": "no"}], "preferred": "a"})
    report = build([log], tmp_path / "out", ALL_TRAIN)
    text = "".join((tmp_path / "out" / s / f"{o}.jsonl").read_text() for s in rules.SPLITS for o in rules.OUTPUTS)
    for leaked in ["jane.doe@", "root@corp", "415 555", "4111", "10.0.0.12", "10.1.2.3", "7946"]:
        assert leaked not in text
    placeholders = Counter(re.findall(r"\[(EMAIL|PHONE|CARD|IP)\]", text))
    assert report["pii_redactions"] == {"email": placeholders["EMAIL"], "phone": placeholders["PHONE"],
                                        "card": placeholders["CARD"], "ip": placeholders["IP"]}
    assert all(report["pii_redactions"].values())
    kto = read_rows(tmp_path / "out", "train", "kto")[0]
    assert kto["source"]["comments"] == ["ping me at [IP]"]
    assert kto["prompt"][0]["content"] == "Admin is [EMAIL]"


def test_rows_that_become_equal_after_scrubbing_are_duplicates(tmp_path):
    log = write_log(tmp_path / "log.jsonl", *[
        conversation(f"c{i}", m("u", "user", f"My mail is user{i}@example.com"),
                     m("a", "assistant", "Noted.", feedback={"rating": "up"})) for i in range(3)])
    report = build([log], tmp_path / "out", ALL_TRAIN)
    assert len(read_rows(tmp_path / "out", "train", "sft")) == 1
    assert report["drops"] == {"duplicate_kto": 2, "duplicate_sft": 2}
    assert report["pii_redactions"]["email"] == 2  # one row in sft, one in kto


def test_staged_rows_equal_json_dumps_of_the_scrubbed_rows():
    """The fast row staging in stage.py against the plain definition: scrub, then json.dumps (compact)."""
    conv = parse_record(conversation(
        "c1", m("s", "system", "Be  nice\n\t."),
        m("u1", "user", 'mail a@b.com, call +1 415 555 2671, tab\there "q" é \ud83d'),
        m("a1", "assistant", "Sure   thing",
          feedback={"rating": "up", "comment": "x@y.org", "edited_content": "Sure!"}),
        m("u2", "user", "no"), m("a2", "assistant", "Better", corrects="a1", feedback={"rating": "down"}),
        m("a3", "assistant", "Best", corrects="a2"), persona='p\t"x'))
    curated = rules.curate_conversation(conv)
    tally, staged = stage.stage_rows(curated, "train", "c1")
    assert json.loads(tally) == {"signals": curated.signals, "drops": curated.drops, "conflicts": []}
    assert len(staged) == len(curated.rows)
    for (output, row), (staged_output, split, key, fields, row_json) in zip(curated.rows, staged):
        counts = Counter()
        expected = _scrub_reference(row, counts)
        rule, persona, pii = fields.split("\t")
        assert (staged_output, split, rule) == (output, "train", row["source"]["rule"])
        assert row_json == (json.dumps(expected, ensure_ascii=False, separators=(",", ":")) + "\n").encode(
            "utf-8", "backslashreplace")
        assert key == rules.dedup_key(output, expected).hex()
        assert pii == ",".join(str(counts[k]) for k in stage.PII_KINDS)
        assert json.loads(persona) == 'p\t"x'


def _scrub_reference(row: dict, counts: Counter) -> dict:
    def texts(messages):
        return [{"role": t["role"], "content": scrub(t["content"], counts)} for t in messages]

    out = {key: texts(value) if key in ("prompt", "completion", "chosen", "rejected") else value
           for key, value in row.items() if key != "source"}
    source = dict(row["source"])
    if "comments" in source:
        source["comments"] = [scrub(c, counts) for c in source["comments"]]
    return {**out, "source": source}


def test_regression_lone_surrogate_in_a_log_round_trips_instead_of_crashing(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"type": "conversation", "conversation_id": "c1", "messages": [{"id": "u", "role": "user", '
                   '"content": "emoji \\ud83d"}, {"id": "a", "role": "assistant", "content": "ok", '
                   '"feedback": {"rating": "up"}}]}\n')
    build([log], tmp_path / "out", ALL_TRAIN)
    assert read_rows(tmp_path / "out", "train", "sft")[0]["prompt"][0]["content"] == "emoji \ud83d"


# --- options ---------------------------------------------------------------------------------------------

def test_correction_prompt_merge_end_to_end(tmp_path):
    build([SIGNALS], tmp_path / "out", BuildOptions(eval_fraction=0.0, correction_prompt="merge"))
    chain = [r for r in read_rows(tmp_path / "out", "train", "sft") if r["source"]["rule"] == "correction"]
    assert chain[0]["prompt"][-1] == {"role": "user", "content": "Write code that prints hello.\n\n"
                                                                 "No, you used Python 2, use Python 3."}


def _persona_log(tmp_path: Path) -> Path:
    records = []
    for i in range(40):
        persona = "analyst" if i < 28 else ("novice" if i < 34 else None)
        records.append(conversation(f"c{i}", m("u", "user", f"question {i}"),
                                    m("a", "assistant", f"answer {i}", feedback={"rating": "up"}), persona=persona))
    return write_log(tmp_path / "log.jsonl", *records)


def test_max_persona_share_down_samples_sft_deterministically(tmp_path):
    log = _persona_log(tmp_path)
    options = BuildOptions(eval_fraction=0.0, max_persona_share=0.5)
    report = build([log], tmp_path / "a", options)
    # 28 analyst, 6 novice, 6 untagged: analyst keeps T=12 (12 <= 0.5 * (12 + 6 + 6))
    assert report["outputs"]["train"]["sft"]["personas"]["analyst"] == {"rows": 12, "share": 0.5}
    assert report["drops"]["persona_cap"] == 16
    assert report["rules"]["thumbs_up"]["sft"] == 24
    assert report["outputs"]["train"]["kto"]["rows"] == 40  # the cap is for SFT only
    sft = read_rows(tmp_path / "a", "train", "sft")
    assert Counter(r["source"].get("persona") for r in sft) == {"analyst": 12, "novice": 6, None: 6}
    assert not (tmp_path / "a" / "train" / "sft.uncapped.jsonl").exists()
    build([log], tmp_path / "b", options)
    assert folder_bytes(tmp_path / "a") == folder_bytes(tmp_path / "b")
    build([log], tmp_path / "c", BuildOptions(eval_fraction=0.0, max_persona_share=0.5, seed=1))
    assert read_rows(tmp_path / "c", "train", "sft") != sft  # another seed, another sample


def test_persona_cap_applies_to_train_only_eval_keeps_the_log_mix(tmp_path):
    log = _persona_log(tmp_path)
    capped = build([log], tmp_path / "capped", BuildOptions(eval_fraction=0.5, max_persona_share=0.5))
    plain = build([log], tmp_path / "plain", BuildOptions(eval_fraction=0.5))
    assert (tmp_path / "capped" / "eval" / "sft.jsonl").read_bytes() == \
        (tmp_path / "plain" / "eval" / "sft.jsonl").read_bytes()
    train = capped["outputs"]["train"]["sft"]["personas"]
    assert train["analyst"]["share"] <= 0.5 < plain["outputs"]["train"]["sft"]["personas"]["analyst"]["share"]


def test_max_persona_share_that_would_drop_everything_is_a_user_error(tmp_path):
    log = write_log(tmp_path / "log.jsonl", conversation(
        "c1", m("u", "user", "Q"), m("a", "assistant", "A", feedback={"rating": "up"}), persona="analyst"))
    with pytest.raises(UserError, match=r"train/sft has only the persona\(s\) analyst and no untagged rows"):
        build([log], tmp_path / "out", BuildOptions(eval_fraction=0.0, max_persona_share=0.5))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("options, message", [
    (BuildOptions(eval_fraction=1.0), "--eval-fraction 1.0: must be at least 0 and below 1"),
    (BuildOptions(max_persona_share=0.0), "--max-persona-share 0.0: must be above 0 and at most 1"),
    (BuildOptions(correction_prompt="keep"), "--correction-prompt keep: expected one of skip-mistake, merge"),
    (BuildOptions(format="csv"), "--format csv: expected one of v1, langfuse, langsmith, openai"),
])
def test_options_out_of_range_are_user_errors(tmp_path, options, message):
    with pytest.raises(UserError, match=re.escape(message)):
        build([SIGNALS], tmp_path / "out", options)


def test_gz_input_gives_the_same_rows(tmp_path):
    gz = tmp_path / "signals.jsonl.gz"
    with gzip.open(gz, "wb") as f:
        f.write(SIGNALS.read_bytes())
    build([gz], tmp_path / "gz", ALL_TRAIN)
    build([SIGNALS], tmp_path / "plain", ALL_TRAIN)
    for output in rules.OUTPUTS:
        assert all_rows(tmp_path / "gz", output) == all_rows(tmp_path / "plain", output)


# --- the shipped sample ---------------------------------------------------------------------------------

def test_shipped_sample_log_is_valid_and_has_every_signal_kind(tmp_path):
    report = build([ASSET], tmp_path / "out", BuildOptions())
    assert report["records"]["invalid"] == 0
    assert all(report["rules"][rule]["in"] > 0 for rule in rules.RULES)
    assert report["conflicts"]["count"] > 0 and report["orphans"]["count"] > 0
    assert report["drops"].get("comparison_tie", 0) > 0
    assert all(report["pii_redactions"].values())
    assert report["records"]["feedback"] > 0
    assert len(report["outputs"]["train"]["sft"]["personas"]) >= 3
    assert report["records"]["conversation"] >= 200


@pytest.mark.parametrize("name", ["nope.jsonl", "nope.jsonl.gz"])
def test_missing_log_is_a_user_error(tmp_path, name):
    with pytest.raises(UserError, match=f"{name}: cannot open"):
        build([tmp_path / name], tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- imported formats ----------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, name", [("langfuse", "langfuse.jsonl"), ("langsmith", "langsmith.jsonl"),
                                       ("openai", "openai_pref.jsonl")])
def test_imported_format_builds_the_same_rows_as_its_v1_records(tmp_path, fmt, name):
    """An export read with --format gives what its converted v1 records give (several records per
    line included: positions are ordinals in the importer's output, not line numbers)."""
    from edgetune.data.importers import iter_records
    from edgetune.data.source import Invalid

    export = Path(__file__).parent / "data" / "importers" / name
    converted = [record for _, record in iter_records(fmt, export) if not isinstance(record, Invalid)]
    v1 = write_log(tmp_path / "v1.jsonl", *converted)
    options = BuildOptions(eval_fraction=0.3, skip_invalid=True, format=fmt)
    report = build([export], tmp_path / "imported", options)
    build([v1], tmp_path / "v1", BuildOptions(eval_fraction=0.3))
    for output in rules.OUTPUTS:
        assert all_rows(tmp_path / "imported", output) == all_rows(tmp_path / "v1", output)
    assert sum(report["rules"][rule][o] for rule in rules.RULES for o in rules.OUTPUTS) > 0
