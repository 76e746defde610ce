"""The parallel half of a build: read a chunk of the log once, check it, curate it, stage the rows.

A log is cut into chunks (byte ranges of plain `.jsonl` files; whole files
for `.gz` and imported formats). `stage_chunk` runs in a worker process per
chunk and decodes every line exactly once, because JSON decoding is most of
the cost of a build:

- every record is validated; problems come back with chunk-relative lines;
- conversations come back as an index entry `(id, position, unused)`, and
  the ones with an inline signal, and all comparisons, are curated right
  away (rules.py), scrubbed (pii.py) and *staged*: written to a staging file
  with what the merge needs to know about each row, so the parent never
  decodes them again;
- split-out `feedback` records (few) come back whole.

A conversation that split-out feedback points to is curated again by
`restage_conversations`, which reads just those lines back by position, once
the parent knows every feedback record of the log.

Staging file format (one file per chunk and phase, positions increasing):

    @ <TAB> position <TAB> {"signals": .., "drops": .., "conflicts": [[cid, mid], ..]}
    output <TAB> split <TAB> dedup key (hex) <TAB> rule <TAB> persona (JSON) <TAB> e,p,c,i <TAB> row JSON

where `e,p,c,i` are the row's PII placeholders by kind. Row JSON never holds a
raw tab or newline (JSON escapes them), so the row is always the last field.
"""

from __future__ import annotations

import json
import operator
from collections import Counter
from dataclasses import dataclass, field
from json.encoder import encode_basestring  # the string escaping of json.dumps(..., ensure_ascii=False)
from pathlib import Path
from typing import IO, Iterator

from edgetune.data import rules
from edgetune.data.pii import scrub
from edgetune.data.records import Conversation, FeedbackRecord, build_record, validate_record
from edgetune.data.source import Invalid, iter_jsonl
from edgetune.errors import UserError

POSITION_BITS = 40  # position = file index << 40 | byte offset (or line/ordinal): one int that sorts in log order
PII_KINDS = ("email", "phone", "card", "ip")
NO_PII = "0,0,0,0"

# One encoder for every row: json.dumps with options builds a new one per call.
_encode_row = json.JSONEncoder(ensure_ascii=False, check_circular=False).encode
_encode_compact = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


@dataclass(frozen=True)
class Chunk:
    """One unit of parallel work. `reader`: "lines" (a byte range of a plain v1
    file), "jsonl" (a whole v1 `.gz` file) or an importer format (a whole file)."""

    index: int
    file_index: int
    path: str
    reader: str
    start: int = 0
    end: int = 0


@dataclass
class ChunkResult:
    """What a chunk told the parent; lines are relative to the chunk for "lines" chunks."""

    lines: int = 0  # lines the chunk spans, so the parent can number the next chunk's lines
    conversations: list[tuple[str, int, int]] = field(default_factory=list)  # (id, position, unused assistant msgs)
    comparisons: list[tuple[str, int]] = field(default_factory=list)  # (id, position)
    feedback: list[tuple[int, FeedbackRecord]] = field(default_factory=list)  # (line, record)
    problems: list[tuple[int, str]] = field(default_factory=list)  # (line, reason)
    counts: Counter = field(default_factory=Counter)


def _decode_line(raw: bytes) -> dict | Invalid | None:
    """One log line: its object, Invalid(reason), or None for a blank line (same reasons as iter_jsonl)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Invalid(f"not UTF-8 text (bad byte at column {e.start + 1})")
    if text[:1] != "{" and not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return Invalid(f"not valid JSON ({e.msg} at column {e.colno})")
    if not isinstance(obj, dict):
        return Invalid(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _open_binary(path: str) -> IO[bytes]:
    try:
        return open(path, "rb")
    except OSError as e:
        raise UserError(f"{path}: cannot open ({e.strerror or e})") from None


def iter_chunk(chunk: Chunk, lines_out: list[int] | None = None) -> Iterator[tuple[int, int, dict | Invalid]]:
    """Yield `(position, line, object_or_Invalid)` for each record of `chunk`, in order.

    A "lines" chunk owns the lines that *start* in [start, end); its line
    numbers count from 1 at its first line, and the number of lines it spans
    is put in `lines_out[0]`.
    """
    base = chunk.file_index << POSITION_BITS
    if chunk.reader == "lines":
        with _open_binary(chunk.path) as f:
            if chunk.start:
                f.seek(chunk.start - 1)
                f.readline()  # the rest of the line that straddles `start` belongs to the chunk before
            offset = f.tell()
            lineno = 0
            while offset < chunk.end:
                raw = f.readline()
                if not raw:
                    break
                lineno += 1
                item = _decode_line(raw)
                if item is not None:
                    yield base | offset, lineno, item
                offset += len(raw)
            if lines_out is not None:
                lines_out[0] = lineno
    elif chunk.reader == "jsonl":
        for lineno, item in iter_jsonl(chunk.path):
            yield base | lineno, lineno, item
    else:
        from edgetune.data.importers import iter_records

        for ordinal, (lineno, item) in enumerate(iter_records(chunk.reader, Path(chunk.path))):
            yield base | ordinal, lineno, item


def fetch_records(chunk: Chunk, positions: list[int]) -> Iterator[tuple[int, dict]]:
    """Yield `(position, object)` at the given sorted positions of `chunk` (for records read before)."""
    if chunk.reader == "lines":
        mask = (1 << POSITION_BITS) - 1
        with _open_binary(chunk.path) as f:
            for pos in positions:
                f.seek(pos & mask)
                item = _decode_line(f.readline())
                if not isinstance(item, dict):
                    raise UserError(f"{chunk.path}: changed while edgetune was reading it; run the build again")
                yield pos, item
    else:
        wanted = set(positions)
        for pos, _, item in iter_chunk(chunk):
            if pos in wanted:
                yield pos, item


# --- staging -------------------------------------------------------------------------

class _TextTable:
    """One record's texts, each scrubbed (rule 8), JSON-escaped and whitespace-normalised once.

    A conversation's context recurs in every row it gives (SFT, KTO, DPO of
    each rated message); doing this work per row was most of a build's time.
    Rows are then assembled from the cached pieces as strings, in exactly the
    form `json.dumps(row, ensure_ascii=False)` gives (a test checks it).
    """

    def __init__(self):
        self.texts: dict[str, tuple[str, str, str, tuple | None]] = {}  # text -> (clean, JSON, key text, PII)
        self.lists: dict[int, tuple[str, str, tuple | None]] = {}  # id(message list) -> (JSON, key text, PII)
        self._counts: Counter = Counter()  # reused: a Counter per text costs as much as scrubbing a short one

    def text(self, text: str) -> tuple[str, str, str, tuple | None]:
        hit = self.texts.get(text)
        if hit is None:
            counts = self._counts
            counts.clear()
            clean = scrub(text, counts)
            pii = tuple(counts[k] for k in PII_KINDS) if counts else None
            hit = self.texts[text] = (clean, encode_basestring(clean), rules.normalize_whitespace(clean), pii)
        return hit

    def messages(self, messages: list[dict]) -> tuple[str, str, tuple | None]:
        """JSON, dedup key text (`rules.messages_key_text` of the scrubbed list) and PII of a message list.

        Cached by the list's id: the rows of one message share its prompt list,
        and `curated.rows` keeps every list alive (so no id is reused) while
        the record is staged.
        """
        hit = self.lists.get(id(messages))
        if hit is None:
            jsons, keys, pii = [], [], None
            for m in messages:
                _, escaped, normalized, text_pii = self.text(m["content"])
                role = m["role"]  # one of records.ROLES: nothing to escape
                jsons.append(f'{{"role": "{role}", "content": {escaped}}}')
                keys.append(f"{role}\x1f{normalized}")
                if text_pii:
                    pii = text_pii if pii is None else tuple(map(operator.add, pii, text_pii))
            hit = self.lists[id(messages)] = ("[" + ", ".join(jsons) + "]", "\x1e".join(keys), pii)
        return hit


def _source_json(source: dict) -> str:
    """`json.dumps(source, ensure_ascii=False)` for a dict of strings and lists of strings,
    without building an encoder per row (the rest falls back to the encoder)."""
    items = []
    for key, value in source.items():
        if type(value) is str:
            text = encode_basestring(value)
        elif type(value) is list and all(type(v) is str for v in value):
            text = "[" + ", ".join(map(encode_basestring, value)) + "]"
        else:
            text = _encode_row(value)
        items.append(f"{encode_basestring(key)}: {text}")
    return "{" + ", ".join(items) + "}"


def stage_curated(out: IO[str], pos: int, curated: rules.Curated, split: str, conversation_id: str | None) -> None:
    """Scrub (rule 8), drop empty preferences (rule 7) and write one record's rows to staging.

    Each row carries the PII placeholders it holds, so the report can count
    exactly what the written files contain.
    """
    drops = Counter(curated.drops)
    table = _TextTable()
    personas: dict[str, str] = {}  # persona -> its JSON, encoded once per record
    lines = []
    for output, row in curated.rows:
        prompt_json, prompt_key, pii = table.messages(row["prompt"])
        if output == "dpo":
            chosen_json, chosen_key, chosen_pii = table.messages(row["chosen"])
            rejected_json, rejected_key, rejected_pii = table.messages(row["rejected"])
            if chosen_key == rejected_key:  # rules.chosen_equals_rejected, on the scrubbed texts
                drops["dpo_chosen_equals_rejected"] += 1
                continue
            parts = [prompt_key, chosen_key, rejected_key]
            body = f'{{"prompt": {prompt_json}, "chosen": {chosen_json}, "rejected": {rejected_json}'
            more_pii = [chosen_pii, rejected_pii]
        else:
            completion_json, completion_key, completion_pii = table.messages(row["completion"])
            parts = [prompt_key, completion_key]
            body = f'{{"prompt": {prompt_json}, "completion": {completion_json}'
            if output == "kto":
                parts.append("1" if row["label"] else "0")
                body += ', "label": true' if row["label"] else ', "label": false'
            more_pii = [completion_pii]
        source = row["source"]
        if "comments" in source:
            comments = [table.text(c) for c in source["comments"]]
            source = {**source, "comments": [c[0] for c in comments]}
            more_pii += [c[3] for c in comments]
        for p in more_pii:
            if p:
                pii = p if pii is None else tuple(map(operator.add, pii, p))
        persona = source.get("persona", rules.UNTAGGED)
        persona_json = personas.get(persona) or personas.setdefault(persona, _encode_compact(persona))
        lines.append(f"{output}\t{split}\t{rules.key_digest(parts).hex()}\t{source['rule']}\t{persona_json}\t"
                     f"{','.join(map(str, pii)) if pii else NO_PII}\t{body}, \"source\": {_source_json(source)}}}\n")
    if not (lines or curated.signals or drops or curated.conflicts):
        return
    tally = {"signals": curated.signals, "drops": drops,
             "conflicts": [[conversation_id, mid] for mid in curated.conflicts]}
    out.write(f"@\t{pos}\t{_encode_compact(tally)}\n")
    out.writelines(lines)


def read_staged(path: Path) -> Iterator[tuple[int, dict, list[str]]]:
    """Yield `(position, tally, row_lines)` per staged record, in position order."""
    with open(path, encoding="utf-8") as f:
        pos, tally, rows = None, None, []
        for line in f:
            if line.startswith("@\t"):
                if pos is not None:
                    yield pos, tally, rows
                _, p, t = line.split("\t", 2)
                pos, tally, rows = int(p), json.loads(t), []
            else:
                rows.append(line)
        if pos is not None:
            yield pos, tally, rows


def staging_path(folder: str | Path, chunk: Chunk, phase: str) -> Path:
    """Where `phase` ("a": first pass, "b": conversations curated again) stages `chunk`'s rows."""
    return Path(folder) / f"{phase}-{chunk.index:05d}.txt"


def _staging_file(folder: str, chunk: Chunk, phase: str) -> IO[str]:
    # A lone surrogate (JSON "\ud83d" in the log) cannot be UTF-8 encoded;
    # backslashreplace writes it back as the same JSON escape, so the row
    # still round-trips instead of the build failing.
    return open(staging_path(folder, chunk, phase), "w", encoding="utf-8", errors="backslashreplace",
                newline="\n")


# --- the two worker entry points -----------------------------------------------------

def stage_chunk(chunk: Chunk, options, staging: str | None) -> ChunkResult:
    """Pass over one chunk: check every record; with a `staging` folder, curate and stage.

    `options` is a build.BuildOptions. Without `staging` (validate only) no
    rows are made. Raises UserError only for an unreadable file.
    """
    result = ChunkResult()
    out = _staging_file(staging, chunk, "a") if staging else None
    lines_out = [0]
    try:
        for pos, lineno, obj in iter_chunk(chunk, lines_out):
            result.counts["records"] += 1
            reason = obj.reason if isinstance(obj, Invalid) else validate_record(obj)
            if reason is not None:
                result.counts["invalid"] += 1
                result.problems.append((lineno, reason))
                continue
            kind = obj["type"]
            result.counts[kind] += 1
            if kind == "conversation":
                unused, signal = 0, False  # only assistant messages may carry a signal (validated)
                for m in obj["messages"]:
                    if m["role"] == "assistant":
                        unused += 1
                        signal = signal or m.get("feedback") is not None or m.get("corrects") is not None
                if signal and out:
                    conv = build_record(obj)
                    curated = rules.curate_conversation(conv, None, options.correction_prompt)
                    split = rules.split_of(options.seed, "conversation", conv.conversation_id, options.eval_fraction)
                    stage_curated(out, pos, curated, split, conv.conversation_id)
                    unused = curated.unused
                result.conversations.append((obj["conversation_id"], pos, unused))
            elif kind == "comparison":
                if out:
                    comp = build_record(obj)
                    split = rules.split_of(options.seed, "comparison", comp.comparison_id, options.eval_fraction)
                    stage_curated(out, pos, rules.curate_comparison(comp), split, None)
                result.comparisons.append((obj["comparison_id"], pos))
            else:
                result.feedback.append((lineno, build_record(obj)))
    finally:
        if out:
            out.close()
    result.lines = lines_out[0]
    return result


def join_feedback(conv: Conversation, items: list[tuple[object, FeedbackRecord]]):
    """Split-out feedback of `conv` by message id, and the records that match no assistant message.

    `items` are `(where, record)`; the unmatched come back as `(where, record, reason)`.
    """
    roles = {m.id: m.role for m in conv.messages}
    joined: dict[str, list] = {}
    lost = []
    for where, rec in items:
        role = roles.get(rec.message_id)
        if role == "assistant":
            joined.setdefault(rec.message_id, []).append(rec.feedback)
        else:
            lost.append((where, rec, "unknown_message" if role is None else "not_an_assistant_message"))
    return joined, lost


def restage_conversations(chunk: Chunk, requests: list[tuple[int, list[tuple[object, FeedbackRecord]]]],
                          options, staging: str) -> tuple[list, dict[int, int]]:
    """Curate again, with their split-out feedback, the conversations at the requested positions.

    `requests`: `(position, [(where, record)])` sorted by position, `where`
    locating each feedback record for the report. Returns the orphans
    `[(where, record, reason)]` and `{position: unused assistant messages}`.
    """
    feedback = dict(requests)
    orphans, unused = [], {}
    with _staging_file(staging, chunk, "b") as out:
        for pos, obj in fetch_records(chunk, [p for p, _ in requests]):
            if validate_record(obj) is not None or obj["type"] != "conversation":
                raise UserError(f"{chunk.path}: changed while edgetune was reading it; run the build again")
            conv = build_record(obj)
            joined, lost = join_feedback(conv, feedback[pos])
            orphans += lost
            curated = rules.curate_conversation(conv, joined, options.correction_prompt)
            split = rules.split_of(options.seed, "conversation", conv.conversation_id, options.eval_fraction)
            stage_curated(out, pos, curated, split, conv.conversation_id)
            unused[pos] = curated.unused
    return orphans, unused
