"""Pure functions of the data stage: record validation and the curation rules of
/work/shared/spec/feedback-v1.md, checked against rows worked out by hand."""

from __future__ import annotations

import pytest

from edgetune.data import rules
from edgetune.data.records import (Comparison, Conversation, Feedback, Message, Response, Turn, normalize_rating,
                                   parse_record)
from edgetune.data.rules import UNTAGGED, persona_keep_counts


def conv(*messages, cid="c1", persona=None):
    return Conversation(cid, tuple(messages), persona)


def msg(mid, role, content, rating=None, edit=None, comment=None, corrects=None):
    fb = Feedback(rating, edit, comment) if (rating or edit is not None or comment) else None
    return Message(mid, role, content, fb, corrects)


def user(content):
    return {"role": "user", "content": content}


def assistant(content):
    return [{"role": "assistant", "content": content}]


def src(rule, ids, cid="c1", **extra):
    return {"rule": rule, "conversation_id": cid, "message_ids": ids, **extra}


def rows_of(curated, output):
    return [row for out, row in curated.rows if out == output]


# --- records -----------------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    ("up", "up"), ("down", "down"), (True, "up"), (False, "down"), (1, "up"), (-1, "down"), (0, "down"),
    ("Up", None), ("meh", None), (2, None), (1.0, None), (None, None), ([], None),
])
def test_normalize_rating_accepts_exactly_the_spec_spellings(value, expected):
    assert normalize_rating(value) == expected


def _conversation(*messages, **fields):
    return {"type": "conversation", "conversation_id": "c1", **fields, "messages": list(messages)}


U = {"id": "m1", "role": "user", "content": "Hi"}


@pytest.mark.parametrize("record, reason", [
    ({"conversation_id": "c"}, "type: missing (expected conversation|feedback|comparison)"),
    ({"type": "chat"}, "type: unknown type 'chat' (expected conversation|feedback|comparison)"),
    ({"type": "conversation", "messages": [U]}, "conversation_id: missing"),
    ({"type": "conversation", "conversation_id": 3, "messages": [U]},
     "conversation_id: expected a string, got a number"),
    ({"type": "conversation", "conversation_id": "", "messages": [U]}, "conversation_id: must not be empty"),
    ({"type": "conversation", "conversation_id": "c"}, "messages: missing"),
    (_conversation(), "messages: must not be empty"),
    ({"type": "conversation", "conversation_id": "c", "messages": "hi"},
     "messages: expected a list of messages, got a string"),
    (_conversation("hi"), "messages[0]: expected an object, got a string"),
    (_conversation({"role": "user", "content": "x"}), "messages[0].id: missing"),
    (_conversation({"id": "m1", "content": "x"}), "messages[0].role: missing (expected system|user|assistant|tool)"),
    (_conversation(U, {"id": "m2", "role": "bot", "content": "x"}),
     "messages[1].role: unknown role 'bot' (expected system|user|assistant|tool)"),
    (_conversation({"id": "m1", "role": "user"}), "messages[0].content: missing"),
    (_conversation({"id": "m1", "role": "user", "content": None}), "messages[0].content: expected a string, got null"),
    (_conversation({"id": "m1", "role": "user", "content": ["a"]}),
     "messages[0].content: expected a string, got a list"),
    (_conversation(U, {"id": "m1", "role": "assistant", "content": "x"}),
     "messages[1].id: duplicate id 'm1' (first at messages[0])"),
    (_conversation(U, {"id": "m2", "role": "system", "content": "x"}),
     "messages[1].role: a system message may only come first"),
    (_conversation({**U, "feedback": {"rating": "up"}}),
     "messages[0].feedback: only assistant messages carry feedback (this one is user)"),
    (_conversation(U, {"id": "m2", "role": "assistant", "content": "x", "feedback": "up"}),
     "messages[1].feedback: expected an object, got a string"),
    (_conversation(U, {"id": "m2", "role": "assistant", "content": "x", "feedback": {"rating": "meh"}}),
     "messages[1].feedback.rating: unknown rating 'meh' (expected \"up\"/\"down\", true/false, 1/-1 or 1/0)"),
    (_conversation(U, {"id": "m2", "role": "assistant", "content": "x", "feedback": {"edited_content": 5}}),
     "messages[1].feedback.edited_content: expected a string, got a number"),
    (_conversation({**U, "corrects": "m0"}),
     "messages[0].corrects: only assistant messages can correct (this one is user)"),
    (_conversation(U, {"id": "m2", "role": "assistant", "content": "x", "corrects": "m9"}),
     "messages[1].corrects: 'm9' points nowhere (no such message)"),
    (_conversation(U, {"id": "m2", "role": "assistant", "content": "x", "corrects": "m3"},
                   {"id": "m3", "role": "assistant", "content": "y"}),
     "messages[1].corrects: 'm3' points nowhere (it comes later; corrects must name an earlier message)"),
    (_conversation(U, {"id": "m2", "role": "assistant", "content": "x", "corrects": "m1"}),
     "messages[1].corrects: 'm1' is a user message; corrects must name an earlier assistant message"),
    (_conversation(U, persona=7), "persona: expected a string, got a number"),
    (_conversation(U, metadata="x"), "metadata: expected an object, got a string"),
    ({"type": "feedback", "conversation_id": "c", "rating": "up"}, "message_id: missing"),
    ({"type": "feedback", "conversation_id": "c", "message_id": "m"},
     "feedback: no signal (expected at least one of rating, edited_content, comment)"),
    ({"type": "feedback", "conversation_id": "c", "message_id": "m", "rating": 5},
     "rating: unknown rating 5 (expected \"up\"/\"down\", true/false, 1/-1 or 1/0)"),
    ({"type": "comparison", "comparison_id": "x", "prompt": [], "responses": [], "preferred": "a"},
     "prompt: must not be empty"),
    ({"type": "comparison", "comparison_id": "x", "prompt": [{"role": "human", "content": "q"}]},
     "prompt[0].role: unknown role 'human' (expected system|user|assistant|tool)"),
    ({"type": "comparison", "comparison_id": "x", "prompt": [user("q")],
      "responses": [{"id": "a", "content": "1"}], "preferred": "a"},
     "responses: expected exactly two responses, got 1"),
    ({"type": "comparison", "comparison_id": "x", "prompt": [user("q")],
      "responses": [{"id": "a", "content": "1"}, {"id": "a", "content": "2"}], "preferred": "a"},
     "responses[1].id: duplicate id 'a'"),
    ({"type": "comparison", "comparison_id": "x", "prompt": [user("q")],
      "responses": [{"id": "tie", "content": "1"}, {"id": "b", "content": "2"}], "preferred": "b"},
     "responses[0].id: 'tie' is reserved for `preferred`; rename this response"),
    ({"type": "comparison", "comparison_id": "x", "prompt": [user("q")],
      "responses": [{"id": "a", "content": "1"}, {"id": "b", "content": "2"}], "preferred": "c"},
     "preferred: 'c' is not a response id (expected 'a', 'b' or \"tie\")"),
    ({"type": "comparison", "comparison_id": "x", "prompt": [user("q")],
      "responses": [{"id": "a", "content": "1"}, {"id": "b", "content": "2"}]}, "preferred: missing"),
])
def test_invalid_record_reason_names_the_field(record, reason):
    assert parse_record(record) == reason


@pytest.mark.parametrize("role", [[], {}, ["user"]])
def test_regression_unhashable_role_is_an_invalid_record_not_a_crash(role):
    """A JSON list or object as a role was looked up in a set of roles: TypeError, a traceback."""
    assert parse_record(_conversation({"id": "m1", "role": role, "content": "x"})) == \
        f"messages[0].role: unknown role {role!r} (expected system|user|assistant|tool)"


def test_valid_records_parse_to_typed_records_with_normalised_ratings():
    record = _conversation(
        {"id": "s", "role": "system", "content": "Be brief."}, U,
        {"id": "a1", "role": "assistant", "content": "x", "feedback": {"rating": 0, "comment": "no"}},
        {"id": "a2", "role": "assistant", "content": "y", "corrects": "a1", "feedback": {"rating": True}},
        {"id": "t", "role": "tool", "content": "{}"},
        persona="analyst", timestamp="2026-10-02T09:14:00Z", metadata={"app": "x"}, extra_key="ignored")
    assert parse_record(record) == Conversation("c1", (
        Message("s", "system", "Be brief."), Message("m1", "user", "Hi"),
        Message("a1", "assistant", "x", Feedback("down", None, "no")),
        Message("a2", "assistant", "y", Feedback("up"), "a1"), Message("t", "tool", "{}")), "analyst")
    # null reads as absent in optional fields
    assert parse_record(_conversation({**U, "feedback": None, "corrects": None}, persona=None)) == \
        Conversation("c1", (Message("m1", "user", "Hi"),))
    assert parse_record({"type": "comparison", "comparison_id": "x", "prompt": [user("q")],
                         "responses": [{"id": "a", "content": "1"}, {"id": "b", "content": "2"}],
                         "preferred": "tie"}) == \
        Comparison("x", (Turn("user", "q"),), (Response("a", "1"), Response("b", "2")), "tie")


# --- rule 1: thumbs up --------------------------------------------------------------------

def test_rule1_thumbs_up_gives_sft_and_kto_true_with_the_context():
    c = conv(msg("s", "system", "Sys"), msg("u", "user", "Q"), msg("a", "assistant", "A", rating="up"),
             msg("u2", "user", "thanks"), persona="admin")
    out = rules.curate_conversation(c)
    prompt = [{"role": "system", "content": "Sys"}, user("Q")]
    source = src("thumbs_up", ["a"], persona="admin")
    assert out.rows == [
        ("sft", {"prompt": prompt, "completion": assistant("A"), "source": source}),
        ("kto", {"prompt": prompt, "completion": assistant("A"), "label": True, "source": source}),
    ]
    assert out.signals == {"thumbs_up": 1} and out.unused == 0


# --- rule 2: correction chains --------------------------------------------------------------

SPEC_EXAMPLE = conv(
    msg("m1", "system", "You are a helpful assistant."), msg("m2", "user", "Write code that prints hello."),
    msg("m3", "assistant", "print 'hello'", rating="down"), msg("m4", "user", "No, you used Python 2, use Python 3."),
    msg("m5", "assistant", "print('hello')", rating="up", corrects="m3"), msg("m6", "user", "Perfect, thanks."),
    cid="c-17", persona="analyst")


def test_rule2_spec_example_skips_the_mistake_in_every_prompt():
    out = rules.curate_conversation(SPEC_EXAMPLE)
    ctx = [{"role": "system", "content": "You are a helpful assistant."}, user("Write code that prints hello.")]
    s = dict(cid="c-17", persona="analyst")
    assert out.rows == [
        ("kto", {"prompt": ctx, "completion": assistant("print 'hello'"), "label": False,
                 "source": src("thumbs_down", ["m3"], **s)}),
        ("sft", {"prompt": ctx, "completion": assistant("print('hello')"),
                 "source": src("correction", ["m3", "m5"], **s)}),
        ("dpo", {"prompt": ctx, "chosen": assistant("print('hello')"), "rejected": assistant("print 'hello'"),
                 "source": src("correction", ["m3", "m5"], **s)}),
        # rule 1 adds the KTO row of the final, with the context of A, and no second SFT row
        ("kto", {"prompt": ctx, "completion": assistant("print('hello')"), "label": True,
                 "source": src("thumbs_up", ["m5"], **s)}),
    ]
    assert out.signals == {"thumbs_down": 1, "correction": 1, "thumbs_up": 1}


def test_rule2_merge_appends_the_follow_ups_to_the_original_request():
    out = rules.curate_conversation(SPEC_EXAMPLE, correction_prompt=rules.MERGE)
    merged = [{"role": "system", "content": "You are a helpful assistant."},
              user("Write code that prints hello.\n\nNo, you used Python 2, use Python 3.")]
    sft = rows_of(out, "sft")
    assert [r["prompt"] for r in sft] == [merged]
    assert rows_of(out, "dpo")[0]["prompt"] == merged
    # A's own KTO row keeps A's plain context: nothing follows A in it
    assert rows_of(out, "kto")[0]["prompt"][-1] == user("Write code that prints hello.")
    # the shared prompt dicts were not mutated
    assert SPEC_EXAMPLE.messages[1].content == "Write code that prints hello."


def test_rule2_merge_without_an_earlier_user_message_makes_the_follow_ups_the_request():
    c = conv(msg("s", "system", "Sys"), msg("a", "assistant", "Hello!"), msg("u", "user", "Say it in French"),
             msg("b", "assistant", "Bonjour !", corrects="a"))
    out = rules.curate_conversation(c, correction_prompt=rules.MERGE)
    assert rows_of(out, "sft")[0]["prompt"] == [{"role": "system", "content": "Sys"}, user("Say it in French")]


def test_rule2_long_chain_pairs_the_final_against_every_failed_attempt():
    c = conv(msg("u", "user", "Q"), msg("a", "assistant", "A1"), msg("u2", "user", "no"),
             msg("b", "assistant", "A2", rating="up", corrects="a"), msg("u3", "user", "still no"),
             msg("c", "assistant", "A3", corrects="b"))
    out = rules.curate_conversation(c)
    assert rows_of(out, "sft") == [{"prompt": [user("Q")], "completion": assistant("A3"),
                                    "source": src("correction", ["a", "b", "c"])}]
    assert [(r["chosen"], r["rejected"], r["source"]["message_ids"]) for r in rows_of(out, "dpo")] == [
        (assistant("A3"), assistant("A1"), ["a", "c"]), (assistant("A3"), assistant("A2"), ["b", "c"])]
    # b's thumbs up is overridden by the later correction: no SFT/KTO row with b as the answer
    assert rows_of(out, "kto") == []
    assert out.drops == {"thumbs_up_then_corrected": 1}
    assert out.signals == {"correction": 1, "thumbs_up": 1}


def test_rule2_final_rated_down_gives_no_sft_and_no_pair():
    c = conv(msg("u", "user", "Q"), msg("a", "assistant", "A1"), msg("u2", "user", "no"),
             msg("b", "assistant", "A2", rating="down", corrects="a"))
    out = rules.curate_conversation(c)
    assert [o for o, _ in out.rows] == ["kto"]
    assert rows_of(out, "kto")[0]["prompt"] == [user("Q")] and rows_of(out, "kto")[0]["label"] is False
    assert out.drops == {"correction_final_rated_down": 1}


def test_rule2_branching_chain_gives_each_final_its_own_rows():
    c = conv(msg("u", "user", "Q"), msg("a", "assistant", "A1"), msg("b", "assistant", "B", corrects="a"),
             msg("c", "assistant", "C", corrects="a"))
    out = rules.curate_conversation(c)
    assert [r["completion"] for r in rows_of(out, "sft")] == [assistant("B"), assistant("C")]
    assert [r["source"]["message_ids"] for r in rows_of(out, "dpo")] == [["a", "b"], ["a", "c"]]


# --- rule 3: edits ----------------------------------------------------------------------------

def test_rule3_edit_gives_sft_of_the_edit_and_a_pair_against_the_original():
    c = conv(msg("u", "user", "Q"), msg("a", "assistant", "short", edit="longer answer", comment="too short"))
    out = rules.curate_conversation(c)
    s = src("edit", ["a"], comments=["too short"])
    assert out.rows == [
        ("sft", {"prompt": [user("Q")], "completion": assistant("longer answer"), "source": s}),
        ("dpo", {"prompt": [user("Q")], "chosen": assistant("longer answer"), "rejected": assistant("short"),
                 "source": s}),
    ]


def test_rule3_edit_equal_after_whitespace_normalisation_is_dropped():
    c = conv(msg("u", "user", "Q"), msg("a", "assistant", "Hi there!", edit="  Hi\n there! "))
    out = rules.curate_conversation(c)
    assert out.rows == [] and out.drops == {"edit_unchanged": 1} and out.signals == {"edit": 1}


def test_rule3_and_rule4_down_rated_message_with_an_edit():
    c = conv(msg("u", "user", "Q"), msg("a", "assistant", "bad", rating="down", edit="good"))
    out = rules.curate_conversation(c)
    assert [(o, r.get("completion") or r.get("chosen")) for o, r in out.rows] == [
        ("sft", assistant("good")), ("dpo", assistant("good")), ("kto", assistant("bad"))]


# --- rule 4: thumbs down ----------------------------------------------------------------------

def test_rule4_thumbs_down_is_never_sft_only_kto_false():
    c = conv(msg("u", "user", "Capital of Australia?"), msg("a", "assistant", "Sydney.", rating="down"))
    out = rules.curate_conversation(c)
    assert out.rows == [("kto", {"prompt": [user("Capital of Australia?")], "completion": assistant("Sydney."),
                                 "label": False, "source": src("thumbs_down", ["a"])})]


# --- rule 5: comparisons ------------------------------------------------------------------------

def test_rule5_comparison_gives_one_pair_and_a_tie_nothing():
    cmp = Comparison("x-3", (Turn("user", "Explain DNS."),),
                     (Response("a", "Maps names to IPs."), Response("b", "A phonebook...")), "a", "novice")
    assert rules.curate_comparison(cmp).rows == [("dpo", {
        "prompt": [user("Explain DNS.")], "chosen": assistant("Maps names to IPs."),
        "rejected": assistant("A phonebook..."),
        "source": {"rule": "comparison", "comparison_id": "x-3", "message_ids": ["a", "b"], "persona": "novice"}})]
    cmp.preferred = "b"
    assert rules.curate_comparison(cmp).rows[0][1]["chosen"] == assistant("A phonebook...")
    cmp.preferred = "tie"
    tie = rules.curate_comparison(cmp)
    assert tie.rows == [] and tie.drops == {"comparison_tie": 1} and tie.signals == {"comparison": 1}


# --- rule 6: no signal, conflicts -------------------------------------------------------------------

def test_rule6_messages_without_signal_are_unused():
    c = conv(msg("u", "user", "Q"), msg("a", "assistant", "A"), msg("u2", "user", "Q2"), msg("b", "assistant", "B"))
    out = rules.curate_conversation(c)
    assert out.rows == [] and out.unused == 2


def test_rule6_conflict_across_inline_and_split_out_feedback_is_used_for_nothing():
    c = conv(msg("u", "user", "Q"), msg("a", "assistant", "A", rating="up", edit="A!"))
    out = rules.curate_conversation(c, {"a": [Feedback("down")]})
    assert out.rows == [] and out.conflicts == ["a"] and out.signals == {}


def test_rule6_conflicted_attempt_is_left_out_of_its_chain_pairs():
    c = conv(msg("u", "user", "Q"), msg("a", "assistant", "A1", rating="up"), msg("b", "assistant", "A2", corrects="a"),
             msg("c", "assistant", "A3", corrects="b"))
    out = rules.curate_conversation(c, {"a": [Feedback("down")]})
    assert out.conflicts == ["a"]
    assert [r["source"]["message_ids"] for r in rows_of(out, "dpo")] == [["b", "c"]]
    assert len(rows_of(out, "sft")) == 1


def test_split_out_feedback_adds_signals_and_comments():
    c = conv(msg("u", "user", "Q"), msg("a", "assistant", "A"))
    out = rules.curate_conversation(c, {"a": [Feedback("up", comment="nice"), Feedback(None, "A, better")]})
    assert [(o, r["source"]["rule"]) for o, r in out.rows] == [
        ("sft", "thumbs_up"), ("kto", "thumbs_up"), ("sft", "edit"), ("dpo", "edit")]
    assert all(r["source"]["comments"] == ["nice"] for _, r in out.rows)


# --- rule 7: dedup keys ---------------------------------------------------------------------------

def _sft(prompt, completion, cid="c"):
    return {"prompt": [user(prompt)], "completion": assistant(completion), "source": src("thumbs_up", ["a"], cid=cid)}


def test_dedup_key_ignores_whitespace_and_source_but_not_roles_text_or_label():
    key = rules.dedup_key("sft", _sft("Reset my password", "Use the link."))
    assert rules.dedup_key("sft", _sft("  Reset  my\npassword ", "Use the\tlink.", cid="other")) == key
    assert rules.dedup_key("sft", _sft("Reset my password", "Use the link!")) != key
    assert len(key) == 16
    system = {"prompt": [{"role": "system", "content": "Reset my password"}], "completion": assistant("Use the link."),
              "source": {}}
    assert rules.dedup_key("sft", system) != key
    kto = {**_sft("Q", "A"), "label": True}
    assert rules.dedup_key("kto", kto) != rules.dedup_key("kto", {**kto, "label": False})
    # the parts are joined with separators: moving text between messages changes the key
    split_a = {"prompt": [user("a b")], "completion": assistant("c"), "source": {}}
    split_b = {"prompt": [user("a")], "completion": assistant("b c"), "source": {}}
    assert rules.dedup_key("sft", split_a) != rules.dedup_key("sft", split_b)


def test_chosen_equals_rejected_after_whitespace_normalisation():
    row = {"prompt": [user("Q")], "chosen": assistant("Yes."), "rejected": assistant(" Yes.\n"), "source": {}}
    assert rules.chosen_equals_rejected(row)
    assert not rules.chosen_equals_rejected({**row, "rejected": assistant("No.")})


# --- rule 9: split ----------------------------------------------------------------------------------

def test_split_is_a_deterministic_function_of_seed_kind_and_id():
    ids = [f"c-{i}" for i in range(2000)]
    splits = [rules.split_of(0, "conversation", i, 0.25) for i in ids]
    assert splits == [rules.split_of(0, "conversation", i, 0.25) for i in ids]
    assert 0.2 < splits.count("eval") / len(ids) < 0.3
    assert splits != [rules.split_of(1, "conversation", i, 0.25) for i in ids]
    assert splits != [rules.split_of(0, "comparison", i, 0.25) for i in ids]
    assert {rules.split_of(0, "conversation", i, 0.0) for i in ids} == {"train"}


# --- persona cap ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("counts, share, kept", [
    # a keeps T=4: 4 <= 0.5 * (4 + 2 + 2); T=5 would need 5 <= 0.5 * 9
    ({"a": 6, "b": 2, UNTAGGED: 2}, 0.5, {"a": 4, "b": 2, UNTAGGED: 2}),
    # nothing over the cap: unchanged
    ({"a": 3, "b": 3, "c": 4}, 0.4, {"a": 3, "b": 3, "c": 4}),
    # exactly at the cap (1/3 of 30) is allowed despite float rounding
    ({"a": 10, "b": 10, "c": 10}, 1 / 3, {"a": 10, "b": 10, "c": 10}),
    # a keeps T=2: 2 <= 0.5 * (2 + 1 + 1)
    ({"a": 8, "b": 1, "c": 1}, 0.5, {"a": 2, "b": 1, "c": 1}),
    # two personas over the cap both keep T=3: 3 <= 0.3 * (3 + 3 + 2 + 2)
    ({"a": 9, "b": 7, "c": 2, "d": 2}, 0.3, {"a": 3, "b": 3, "c": 2, "d": 2}),
    # untagged rows are never dropped
    ({"a": 5, UNTAGGED: 9}, 0.1, {"a": 1, UNTAGGED: 9}),
    # cannot be met with one persona and nothing else
    ({"a": 5}, 0.5, {"a": 0}),
])
def test_persona_keep_counts_hand_worked(counts, share, kept):
    assert persona_keep_counts(counts, share) == kept
    total = sum(kept.values())
    if total:
        assert all(n <= share * total + 1e-9 for p, n in kept.items() if p != UNTAGGED)


def test_persona_keep_counts_rejects_a_share_out_of_range():
    with pytest.raises(ValueError):
        persona_keep_counts({"a": 1}, 0)
