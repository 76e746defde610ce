"""The curation rules of the feedback format v1: what each signal becomes.

Pure functions over typed records (`records.py`) returning plain row dicts in
the TRL shapes of the spec:

- sft: `{"prompt": [...], "completion": [assistant], "source": {...}}`
- dpo: `{"prompt": [...], "chosen": [assistant], "rejected": [assistant], "source": {...}}`
- kto: `{"prompt": [...], "completion": [assistant], "label": bool, "source": {...}}`

`source` = `{"rule", "conversation_id" | "comparison_id", "message_ids",
"persona"?, "comments"?}`. Rule numbers below are the spec's.

Rows carry the raw text: PII scrubbing (rule 8), duplicate removal (rule 7,
which needs the whole log) and the split (rule 9) are applied by the build,
using the helpers at the end of this module. The rows of one record share
their message lists (a message's context and answer recur in its SFT, KTO
and DPO rows; the build encodes each list once): treat rows as read-only.

Decisions the spec leaves open, made here:
- The *effective context* of a message that corrects another is the context
  of the first message of its chain (the original mistake), for every row the
  message gives (SFT, KTO, DPO). With `merge`, the user messages between the
  mistake and the message are appended to the last user message of that
  context.
- Chains may branch (two answers correcting the same mistake): each message
  that nothing corrects is a final, paired against every earlier attempt on
  its own path.
- An `up` rating on a message that a later message corrects is overridden by
  the correction: no SFT/KTO row, counted as `thumbs_up_then_corrected`.
- A message rated both `up` and `down` is used for nothing: none of its
  ratings, edits or chain roles produce a row (a chain it belongs to still
  gives the rows that do not contain it).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from edgetune.data.records import TIE, Comparison, Conversation, Feedback, Message

THUMBS_UP, CORRECTION, EDIT, THUMBS_DOWN, COMPARISON = (
    "thumbs_up", "correction", "edit", "thumbs_down", "comparison")
RULES = (THUMBS_UP, CORRECTION, EDIT, THUMBS_DOWN, COMPARISON)  # spec rules 1-5, in order
OUTPUTS = ("sft", "dpo", "kto")
SPLITS = ("train", "eval")

SKIP_MISTAKE, MERGE = "skip-mistake", "merge"
CORRECTION_PROMPTS = (SKIP_MISTAKE, MERGE)
UNTAGGED = "(none)"  # persona name used in shares for rows without a persona


@dataclass
class Curated:
    """What one record gave: rows in order, and the tallies for the report."""

    rows: list[tuple[str, dict]] = field(default_factory=list)  # (output, row)
    # defaultdict(int), not Counter: a build makes two per record, and Counter() takes 3x as long
    signals: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # rule -> signals seen
    drops: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # reason -> rows not made
    conflicts: list[str] = field(default_factory=list)  # message ids rated up and down
    unused: int = 0  # assistant messages without any signal (rule 6)


# What str.split() splits ASCII text on, but the space: with none of these in it (nor a double
# space, nor a space at either end) an ASCII text is already normal.
ASCII_BREAKS = b"\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f"


def normalize_whitespace(text: str) -> str:
    """Collapse every whitespace run to one space and strip the ends (for comparisons only)."""
    # Every text of a build's rows passes here. Checking that it is already normal costs a tenth
    # of splitting and joining a message (isascii is a flag lookup, the rest runs in C).
    if text.isascii() and "  " not in text and text[:1] != " " and text[-1:] != " ":
        raw = text.encode("ascii")
        if len(raw.translate(None, ASCII_BREAKS)) == len(raw):
            return text
    return " ".join(text.split())


def _turn(m) -> dict:
    return {"role": m.role, "content": m.content}


def _assistant(content: str) -> list[dict]:
    return [{"role": "assistant", "content": content}]


def _context(messages: Sequence[Message], turns: list[dict], root: int, end: int, merge: bool) -> list[dict]:
    """Prompt for message `end` whose chain starts at `root` (root == end: no chain).

    `turns` are the messages as prompt dicts, shared by the prompts of one
    conversation (never mutated: merging replaces the dict it changes).
    """
    prompt = turns[:root]
    if not merge or root == end:
        return prompt
    follow_ups = [m.content for m in messages[root + 1:end] if m.role == "user"]
    if not follow_ups:
        return prompt
    for k in range(len(prompt) - 1, -1, -1):
        if prompt[k]["role"] == "user":
            prompt[k] = {"role": "user", "content": "\n\n".join([prompt[k]["content"], *follow_ups])}
            return prompt
    # No user message before the mistake (only a system prompt): the follow-ups are the request.
    prompt.append({"role": "user", "content": "\n\n".join(follow_ups)})
    return prompt


def curate_conversation(conv: Conversation, extra: Mapping[str, Sequence[Feedback]] | None = None,
                        correction_prompt: str = SKIP_MISTAKE) -> Curated:
    """Apply rules 1-4 and 6 to one conversation.

    `extra` maps message id -> split-out `feedback` records already joined to
    this conversation (ids must be assistant messages of it; the build checks).
    Assumes `conv` passed `parse_record`: ids unique, `corrects` names an
    earlier assistant message. Raises nothing.
    """
    if correction_prompt not in CORRECTION_PROMPTS:
        raise ValueError(f"correction_prompt must be one of {CORRECTION_PROMPTS}, got {correction_prompt!r}")
    merge = correction_prompt == MERGE
    msgs = conv.messages
    corrected = {m.corrects for m in msgs if m.corrects is not None}
    position = {m.id: i for i, m in enumerate(msgs)} if corrected else {}  # for walking chains back
    turns = [{"role": m.role, "content": m.content} for m in msgs]
    feedback: dict[int, list[Feedback]] = {}  # filled in message order: a row only names earlier messages
    conflicted: set[int] = set()
    commented = False  # some feedback has a comment: sources name them

    def source(rule: str, ids: list[int]) -> dict:
        src = {"rule": rule, "conversation_id": conv.conversation_id, "message_ids": [msgs[j].id for j in ids]}
        if conv.persona is not None:
            src["persona"] = conv.persona
        if commented:
            comments = [f.comment for j in ids for f in feedback.get(j, ()) if f.comment]
            if comments:
                src["comments"] = comments
        return src

    out = Curated()
    signals, drops, rows = out.signals, out.drops, out.rows
    for i, m in enumerate(msgs):
        if m.role != "assistant":
            continue
        fbs = [m.feedback] if m.feedback is not None else []
        if extra and m.id in extra:
            fbs += extra[m.id]
        ratings = set()
        if fbs:
            feedback[i] = fbs
            for f in fbs:  # a loop, not comprehensions: most messages have one signal or none
                ratings.add(f.rating)
                commented = commented or bool(f.comment)
            if "up" in ratings and "down" in ratings:
                conflicted.add(i)
        elif m.corrects is None and m.id not in corrected:
            out.unused += 1
            continue
        if i in conflicted:
            out.conflicts.append(m.id)
            continue
        path = [i]  # this message back to the first mistake of its chain
        while msgs[path[-1]].corrects is not None:
            path.append(position[msgs[path[-1]].corrects])
        path.reverse()
        prompt = _context(msgs, turns, path[0], i, merge)
        answer = _assistant(m.content)  # shared by this message's rows, like `prompt`: rows are read-only

        if m.corrects is not None and m.id not in corrected:  # rule 2: final of a chain
            signals[CORRECTION] += 1
            if "down" in ratings:
                drops["correction_final_rated_down"] += 1
            else:
                rows.append(("sft", {"prompt": prompt, "completion": answer, "source": source(CORRECTION, path)}))
                for j in path[:-1]:
                    if j in conflicted:
                        continue
                    rows.append(("dpo", {"prompt": prompt, "chosen": answer, "rejected": _assistant(msgs[j].content),
                                         "source": source(CORRECTION, [j, i])}))
        if "up" in ratings:  # rule 1
            signals[THUMBS_UP] += 1
            if m.id in corrected:
                drops["thumbs_up_then_corrected"] += 1
            else:
                src = source(THUMBS_UP, [i])  # one source for both rows: rows are read-only
                if m.corrects is None:  # a chain final already has its SFT row from rule 2
                    rows.append(("sft", {"prompt": prompt, "completion": answer, "source": src}))
                rows.append(("kto", {"prompt": prompt, "completion": answer, "label": True, "source": src}))
        for f in fbs:  # rule 3
            if f.edited_content is None:
                continue
            signals[EDIT] += 1
            if normalize_whitespace(f.edited_content) == normalize_whitespace(m.content):
                drops["edit_unchanged"] += 1
                continue
            edited = _assistant(f.edited_content)
            src = source(EDIT, [i])
            rows.append(("sft", {"prompt": prompt, "completion": edited, "source": src}))
            rows.append(("dpo", {"prompt": prompt, "chosen": edited, "rejected": answer, "source": src}))
        if "down" in ratings:  # rule 4: never SFT; a DPO rejected only via rules 2, 3, 5
            signals[THUMBS_DOWN] += 1
            rows.append(("kto", {"prompt": prompt, "completion": answer, "label": False,
                                 "source": source(THUMBS_DOWN, [i])}))
    return out


def curate_comparison(comp: Comparison) -> Curated:
    """Rule 5: a side-by-side gives one DPO pair; a tie gives nothing."""
    out = Curated()
    out.signals[COMPARISON] += 1
    if comp.preferred == TIE:
        out.drops["comparison_tie"] += 1
        return out
    a, b = comp.responses
    chosen, rejected = (a, b) if comp.preferred == a.id else (b, a)
    src = {"rule": COMPARISON, "comparison_id": comp.comparison_id, "message_ids": [chosen.id, rejected.id]}
    if comp.persona is not None:
        src["persona"] = comp.persona
    out.rows.append(("dpo", {"prompt": [_turn(t) for t in comp.prompt], "chosen": _assistant(chosen.content),
                             "rejected": _assistant(rejected.content), "source": src}))
    return out


# --- rule 7: quality filters ---------------------------------------------------

def messages_key_text(messages: Sequence[dict]) -> str:
    """The part of a dedup key for a message list: roles and whitespace-normalised contents."""
    return "\x1e".join(f"{m['role']}\x1f{normalize_whitespace(m['content'])}" for m in messages)


def key_digest(parts: Sequence[str]) -> bytes:
    """16-byte digest of the parts of a dedup key (see `dedup_key`)."""
    return hashlib.blake2b("\x1d".join(parts).encode("utf-8", "surrogatepass"), digest_size=16).digest()


def dedup_key(output: str, row: dict) -> bytes:
    """16-byte digest of what makes two rows the same example (whitespace-normalised).

    sft: prompt + completion; dpo: prompt + chosen + rejected; kto: prompt +
    completion + label. `source` is not part of it: the same example from two
    conversations is a duplicate.
    """
    parts = [messages_key_text(row["prompt"])]
    if output == "dpo":
        parts += [messages_key_text(row["chosen"]), messages_key_text(row["rejected"])]
    else:
        parts.append(messages_key_text(row["completion"]))
        if output == "kto":
            parts.append("1" if row["label"] else "0")
    return key_digest(parts)


def chosen_equals_rejected(row: dict) -> bool:
    """A DPO pair with no preference in it (same text after whitespace normalisation)."""
    return messages_key_text(row["chosen"]) == messages_key_text(row["rejected"])


# --- rule 9: holdout by conversation ---------------------------------------------

def split_of(seed: int, kind: str, record_id: str, eval_fraction: float) -> str:
    """"eval" for a deterministic `eval_fraction` of ids, else "train".

    The id is hashed with the seed and its record kind ("conversation" or
    "comparison", so equal ids of the two kinds are drawn independently): the
    split depends only on (seed, kind, id), so every row of a conversation
    lands in the same split, whatever the file order.
    """
    material = f"{seed}\x00{kind}\x00{record_id}".encode("utf-8", "surrogatepass")
    draw = int.from_bytes(hashlib.blake2b(material, digest_size=8).digest(), "big")
    return "eval" if draw < eval_fraction * 2.0**64 else "train"


# --- persona balance -------------------------------------------------------------

def persona_keep_counts(counts: Mapping[str, int], max_share: float) -> dict[str, int]:
    """How many rows of each persona to keep so no named persona exceeds `max_share`.

    Rows without a persona (`UNTAGGED`) are never dropped but count in the
    total. Keeps as many rows as possible: every capped persona keeps the same
    number T, the largest T with T <= max_share * kept(T), where kept(T) =
    untagged + sum(min(n, T)). The slack h(T) = max_share * kept(T) - T
    changes by max_share * #{n > T} - 1 per step, which never grows with T, so
    h is concave with h(0) >= 0: the feasible T form an interval [0, T*],
    found by bisection.

    Example: {"a": 6, "b": 2, UNTAGGED: 2}, max_share 0.5 -> a keeps 4
    (4 <= 0.5 * (4 + 2 + 2)). Every row may go when the cap cannot be met
    otherwise ({"a": 5}, 0.5 -> {"a": 0}); callers report that.
    """
    if not 0 < max_share <= 1:
        raise ValueError(f"max_share must be in (0, 1], got {max_share}")
    named = {p: n for p, n in counts.items() if p != UNTAGGED}
    untagged = counts.get(UNTAGGED, 0)
    eps = 1e-9  # so a share of exactly max_share (e.g. 1/3 of 3 rows) is allowed despite float rounding

    def feasible(t: int) -> bool:  # keep min(n, t) of each named persona; t is then the largest share
        return t <= max_share * (untagged + sum(min(n, t) for n in named.values())) + eps

    lo, hi = 0, max(named.values(), default=0)
    if feasible(hi):
        return dict(counts)
    while hi - lo > 1:  # invariant: feasible(lo) (true at 0), not feasible(hi)
        mid = (lo + hi) // 2
        if feasible(mid):
            lo = mid
        else:
            hi = mid
    return {p: (n if p == UNTAGGED else min(n, lo)) for p, n in counts.items()}
