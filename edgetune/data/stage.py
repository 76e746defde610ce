"""The parallel half of a build: read a chunk of the log once, check it, curate it, stage the rows.

A log is cut into chunks (byte ranges of plain `.jsonl` files; whole files
for `.gz` and imported formats). `stage_chunk` runs in a worker process per
chunk and decodes every line exactly once, because JSON decoding is most of
the cost of a build:

- every record is validated; problems come back with chunk-relative lines;
- conversations come back as an index entry `(id, position, unused)`, and
  the ones with an inline signal, and all comparisons, are curated right
  away (rules.py), scrubbed (pii.py) and *staged*: their rows are written in
  their final form, so the parent never decodes or encodes them again;
- split-out `feedback` records (few) come back whole.

A conversation that split-out feedback points to is curated again by
`restage_conversations`, which reads just those lines back by position, once
the parent knows every feedback record of the log.

Staging files, per chunk and phase ("a": first pass, "b": curated again),
each in log order (positions increasing):

- `{phase}-{chunk}-{split}-{output}.jsonl`: the rows of one output file,
  exactly as they will be written (the merge copies byte ranges of them into
  the outputs, leaving out duplicates and replaced records);
- `{phase}-{chunk}-{output}.index`: what the merge needs to know about each
  row of one output, a line each:

      position <TAB> split <TAB> dedup key (hex) <TAB> bytes <TAB> rule <TAB> persona (JSON) <TAB> e,p,c,i

  where `position` is its record's, `bytes` its size in its rows file and
  `e,p,c,i` its PII placeholders by kind;
- `{phase}-{chunk}.tallies`: `position <TAB> {"signals": .., "drops": ..,
  "conflicts": [[cid, mid], ..]}` per record with something to report.

One file per output lets the merge of each output run in its own process.
"""

from __future__ import annotations

import json
import operator
from collections import Counter
from dataclasses import dataclass, field
from hashlib import blake2b
from json.encoder import encode_basestring_ascii
from pathlib import Path
from typing import IO, Iterator

from edgetune.data import pii, rules
from edgetune.data.records import Conversation, FeedbackRecord, build_record, validate_record
from edgetune.data.source import Invalid, iter_jsonl
from edgetune.errors import UserError

try:  # 2x faster than the stdlib on log lines, 5x on rows; optional (see `_decode_line`, `row_json`)
    from orjson import OPT_APPEND_NEWLINE as _APPEND_NEWLINE, dumps as _fast_dumps, loads as _fast_loads
except ImportError:  # pragma: no cover - the parity test runs the build without it too
    _fast_dumps = _fast_loads = None

POSITION_BITS = 40  # position = file index << 40 | byte offset (or line/ordinal): one int that sorts in log order
PII_KINDS = ("email", "phone", "card", "ip")
NO_PII = "0,0,0,0"
# readline() is fastest with a buffer that stays in the L2 cache: 1 us per 3 KB line with 64 KiB,
# 2.8 us with the default 8 KiB (more refills) or with 1 MiB (measured on the 2-core build machine).
READ_BUFFER = 1 << 16
WRITE_BUFFER = 1 << 18  # rows are a few KB: the default 8 KiB buffer would write almost every row on its own

_encode_index = json.JSONEncoder(separators=(",", ":")).encode  # ASCII: a lone surrogate is escaped


def _index_json(obj) -> str:
    """Compact JSON for the staging index (only the merge reads it)."""
    if _fast_dumps is not None:
        try:
            return _fast_dumps(obj).decode()  # 5x faster than the stdlib encoder
        except TypeError:  # a lone surrogate
            pass
    return _encode_index(obj)


def parse_tally(text: str) -> dict:
    """A record's tally from the staging index (see `_index_json`)."""
    return _fast_loads(text) if _fast_loads is not None else json.loads(text)


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


# --- reading -------------------------------------------------------------------------

def _decode_line(raw: bytes, fast: bool = True) -> dict | Invalid | None:
    """One log line: its object, Invalid(reason), or None for a blank line (same reasons as iter_jsonl).

    The fast decoder (orjson) reads every valid line as the stdlib does, but
    rejects what the stdlib accepts (NaN, lone surrogates, numbers beyond a
    double) and gives other error messages: any line it refuses is decoded
    again by the stdlib, which decides. It also reads integers beyond 64
    bits as floats: no valid record holds one where it matters, but the
    reason an invalid record gives may name it, so `stage_chunk` asks for
    the stdlib's reading (`fast=False`) of a line it finds invalid.
    """
    if fast and _fast_loads is not None and raw[:1] == b"{":
        try:
            return _fast_loads(raw)  # a line that starts with "{" and decodes is an object
        except ValueError:
            pass
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


def _open_binary(path: str, buffering: int = READ_BUFFER) -> IO[bytes]:
    try:
        return open(path, "rb", buffering=buffering)
    except OSError as e:
        raise UserError(f"{path}: cannot open ({e.strerror or e})") from None


def iter_chunk(chunk: Chunk, lines_out: list[int] | None = None
               ) -> Iterator[tuple[int, int, dict | Invalid, bytes | None]]:
    """Yield `(position, line, object_or_Invalid, raw line)` for each record of `chunk`, in order.

    A "lines" chunk owns the lines that *start* in [start, end); its line
    numbers count from 1 at its first line, and the number of lines it spans
    is put in `lines_out[0]`. The raw line is there for "lines" chunks only
    (None otherwise), for `_decode_line(raw, fast=False)`.
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
                    yield base | offset, lineno, item, raw
                offset += len(raw)
            if lines_out is not None:
                lines_out[0] = lineno
    elif chunk.reader == "jsonl":
        for lineno, item in iter_jsonl(chunk.path):
            yield base | lineno, lineno, item, None
    else:
        from edgetune.data.importers import iter_records

        for ordinal, (lineno, item) in enumerate(iter_records(chunk.reader, Path(chunk.path))):
            yield base | ordinal, lineno, item, None


def fetch_records(chunk: Chunk, positions: list[int]) -> Iterator[tuple[int, dict]]:
    """Yield `(position, object)` at the given sorted positions of `chunk` (for records read before)."""
    if chunk.reader == "lines":
        mask = (1 << POSITION_BITS) - 1
        with _open_binary(chunk.path, buffering=8192) as f:  # each seek refills the buffer: keep it small
            for pos in positions:
                f.seek(pos & mask)
                item = _decode_line(f.readline())
                if not isinstance(item, dict):
                    raise UserError(f"{chunk.path}: changed while edgetune was reading it; run the build again")
                yield pos, item
    else:
        wanted = set(positions)
        for pos, _, item, _ in iter_chunk(chunk):
            if pos in wanted:
                yield pos, item


# --- assembling rows -------------------------------------------------------------------

# Rows are written as compact JSON (no space after "," and ":"), the separators of orjson, which
# encodes a row in one call; the stdlib encoder gives the same bytes where orjson is missing.
_encode_compact = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False).encode


def row_json(row: dict) -> bytes:
    """One output line: `row` as compact JSON in UTF-8, with a lone surrogate (JSON "\ud83d"
    in the log) written back as that same escape, so the row round-trips."""
    if _fast_dumps is not None:
        try:
            return _fast_dumps(row, option=_APPEND_NEWLINE)
        except TypeError:  # a lone surrogate
            pass
    return (_encode_compact(row) + "\n").encode("utf-8", "backslashreplace")


_NOT_PLAIN = pii.NEEDED + rules.ASCII_BREAKS


class _TextTable:
    """One record's texts and message lists, each scrubbed (rule 8) and keyed (rule 7) once.

    A conversation's context recurs in every row it gives (SFT, KTO, DPO of
    each rated message); scrubbing and normalising it per row was most of a
    build's time.
    """

    def __init__(self):
        self.texts: dict[str, tuple[str, bytes, tuple | None]] = {}  # text -> (clean, key, PII)
        self.pieces: dict[int, tuple[str, bytes, tuple | None]] = {}  # id(message) -> (clean, key, PII)
        self.lists: dict[int, tuple[list, bytes, tuple | None]] = {}  # id(message list) -> (clean, key, PII)
        self._counts: Counter = Counter()  # reused: a Counter per text costs as much as scrubbing a short one

    def text(self, text: str) -> tuple[str, bytes, tuple | None]:
        """Scrubbed text, its part of a dedup key (normalised, UTF-8) and its PII by kind (None: none)."""
        hit = self.texts.get(text)
        if hit is None:
            # Most texts hold no PII and are already normal; one pass in C over the key's bytes
            # tells (pii.NEEDED: what every PII kind needs; the normal form of
            # rules.normalize_whitespace), where the full work below takes three.
            key = text.encode("utf-8", "surrogatepass")
            if (text.isascii() and len(key.translate(None, _NOT_PLAIN)) == len(key) and b"  " not in key
                    and key[:1] != b" " and key[-1:] != b" "):
                hit = self.texts[text] = (text, key, None)
                return hit
            counts = self._counts
            counts.clear()
            clean = pii.scrub(text, counts)  # changes the text exactly when it counts something
            found = tuple(counts[k] for k in PII_KINDS) if counts else None
            hit = self.texts[text] = (clean, rules.normalize_whitespace(clean).encode("utf-8", "surrogatepass"),
                                      found)
        return hit

    def messages(self, messages: list[dict]) -> tuple[list[dict], bytes, tuple | None]:
        """The scrubbed list (`messages` itself when nothing changed), its dedup key part
        (`rules.messages_key_text` of the scrubbed list, UTF-8) and its PII by kind.

        Cached by the list's id, and each message by its dict's id: the rows of
        one message share its lists, a conversation's prompts share its turns,
        and `curated.rows` keeps them all alive (so no id is reused) while the
        record is staged.
        """
        hit = self.lists.get(id(messages))
        if hit is None:
            clean_list, keys, pii = messages, [], None
            for k, m in enumerate(messages):
                piece = self.pieces.get(id(m))
                if piece is None:
                    clean, key, text_pii = self.text(m["content"])
                    piece = self.pieces[id(m)] = (clean, m["role"].encode() + b"\x1f" + key, text_pii)
                keys.append(piece[1])
                if piece[2]:
                    pii = piece[2] if pii is None else tuple(map(operator.add, pii, piece[2]))
                    if clean_list is messages:
                        clean_list = list(messages)
                    clean_list[k] = {"role": m["role"], "content": piece[0]}
            hit = self.lists[id(messages)] = (clean_list, b"\x1e".join(keys), pii)
        return hit


def stage_rows(curated: rules.Curated, split: str, conversation_id: str | None
               ) -> tuple[str | None, list[tuple[str, str, str, str, bytes]]]:
    """Scrub (rule 8) and drop empty preferences (rule 7) in one record's rows, and encode them.

    Returns the record's tally for the report (JSON; None when the record has
    nothing to report) and per row `(output, split, dedup key, "rule <TAB>
    persona <TAB> e,p,c,i", row JSON line)`, the fields of its line in the
    staging index. Each row carries the PII placeholders it holds, so the
    report can count exactly what the written files contain.
    """
    drops = curated.drops
    table = _TextTable()
    prompt_hashes: dict[int, object] = {}  # id(prompt list) -> blake2b state after its key part
    personas: dict[str, str] = {}  # persona -> its JSON, encoded once per record
    staged = []
    for output, row in curated.rows:
        prompt = row["prompt"]
        clean_prompt, prompt_key, pii = table.messages(prompt)
        if output == "dpo":
            chosen, chosen_key, chosen_pii = table.messages(row["chosen"])
            rejected, rejected_key, rejected_pii = table.messages(row["rejected"])
            if chosen_key == rejected_key:  # rules.chosen_equals_rejected, on the scrubbed texts
                drops = drops + Counter(dpo_chosen_equals_rejected=1)  # not in place: curated is the caller's
                continue
            rest_key = b"\x1d" + chosen_key + b"\x1d" + rejected_key
            clean = {"prompt": clean_prompt, "chosen": chosen, "rejected": rejected}
            more_pii = [chosen_pii, rejected_pii]
        else:
            completion, completion_key, completion_pii = table.messages(row["completion"])
            rest_key = b"\x1d" + completion_key
            clean = {"prompt": clean_prompt, "completion": completion}
            if output == "kto":
                rest_key += b"\x1d1" if row["label"] else b"\x1d0"
                clean["label"] = row["label"]
            more_pii = [completion_pii]
        source = clean["source"] = row["source"]
        if "comments" in source:
            comments = [table.text(c) for c in source["comments"]]
            clean["source"] = {**source, "comments": [c[0] for c in comments]}
            more_pii += [c[2] for c in comments]
        for p in more_pii:
            if p:
                pii = p if pii is None else tuple(map(operator.add, pii, p))
        persona = source.get("persona", rules.UNTAGGED)
        persona_json = personas.get(persona) or personas.setdefault(persona, encode_basestring_ascii(persona))
        # rules.dedup_key(output, row) of the scrubbed row (a test checks it): the blake2b of the
        # parts' keys joined by \x1d, the prompt's part hashed once for all the rows that share it.
        digest = prompt_hashes.get(id(prompt))
        if digest is None:
            digest = prompt_hashes[id(prompt)] = blake2b(prompt_key, digest_size=16)
        digest = digest.copy()
        digest.update(rest_key)
        staged.append((output, split, digest.hexdigest(),
                       f"{source['rule']}\t{persona_json}\t{','.join(map(str, pii)) if pii else NO_PII}",
                       row_json(clean)))
    if not (staged or curated.signals or drops or curated.conflicts):
        return None, staged
    tally = {"signals": curated.signals, "drops": drops,
             "conflicts": [[conversation_id, mid] for mid in curated.conflicts]}
    return _index_json(tally), staged


# --- staging files -----------------------------------------------------------------------

def staging_tallies(folder: str | Path, chunk: Chunk, phase: str) -> Path:
    """The records' tallies that `phase` ("a": first pass, "b": curated again) staged for `chunk`."""
    return Path(folder) / f"{phase}-{chunk.index:05d}.tallies"


def staging_index(folder: str | Path, chunk: Chunk, phase: str, output: str) -> Path:
    """The index of the staged rows of one output (see the module docstring)."""
    return Path(folder) / f"{phase}-{chunk.index:05d}-{output}.index"


def staging_rows(folder: str | Path, chunk: Chunk, phase: str, split: str, output: str) -> Path:
    """The staged rows of one output and split."""
    return Path(folder) / f"{phase}-{chunk.index:05d}-{split}-{output}.jsonl"


class _Staging:
    """Where one chunk and phase stages its records: tallies, and an index and rows files per output."""

    def __init__(self, folder: str, chunk: Chunk, phase: str):
        self.tallies = open(staging_tallies(folder, chunk, phase), "w", encoding="utf-8", newline="\n")
        self.index = {output: open(staging_index(folder, chunk, phase, output), "w", encoding="utf-8", newline="\n")
                      for output in rules.OUTPUTS}
        self.rows = {(split, output): open(staging_rows(folder, chunk, phase, split, output), "wb",
                                           buffering=WRITE_BUFFER)
                     for split in rules.SPLITS for output in rules.OUTPUTS}

    def add(self, pos: int, curated: rules.Curated, split: str, conversation_id: str | None) -> None:
        tally, rows = stage_rows(curated, split, conversation_id)
        if tally is None:
            return
        self.tallies.write(f"{pos}\t{tally}\n")
        for output, split, key, fields, row in rows:
            self.rows[split, output].write(row)
            self.index[output].write(f"{pos}\t{split}\t{key}\t{len(row)}\t{fields}\n")

    def close(self) -> None:
        for f in [self.tallies, *self.index.values(), *self.rows.values()]:
            f.close()


def read_staged(path: Path) -> Iterator[tuple[int, str]]:
    """Yield `(position, rest of the line)` per line of a staged tallies or index file, in position order."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            pos, rest = line.split("\t", 1)
            yield int(pos), rest


# --- the two worker entry points -----------------------------------------------------

def stage_chunk(chunk: Chunk, options, staging: str | None) -> ChunkResult:
    """Pass over one chunk: check every record; with a `staging` folder, curate and stage.

    `options` is a build.BuildOptions. Without `staging` (validate only) no
    rows are made. Raises UserError only for an unreadable file.
    """
    result = ChunkResult()
    out = _Staging(staging, chunk, "a") if staging else None
    counts = result.counts
    lines_out = [0]
    try:
        for pos, lineno, obj, raw in iter_chunk(chunk, lines_out):
            counts["records"] += 1
            reason = obj.reason if type(obj) is Invalid else validate_record(obj)
            if reason is not None:
                if raw is not None and type(obj) is not Invalid:  # explain it from the stdlib's reading
                    obj = _decode_line(raw, fast=False)
                    reason = obj.reason if type(obj) is Invalid else validate_record(obj)
                counts["invalid"] += 1
                result.problems.append((lineno, reason))
                continue
            kind = obj["type"]
            counts[kind] += 1
            if kind == "conversation":
                unused, signal = 0, False  # only assistant messages may carry a signal (validated)
                for m in obj["messages"]:
                    if m["role"] == "assistant":
                        unused += 1
                        # more keys than id, role and content: maybe a signal
                        if len(m) > 3 and not signal:
                            signal = m.get("feedback") is not None or m.get("corrects") is not None
                if signal and out:
                    conv = build_record(obj)
                    curated = rules.curate_conversation(conv, None, options.correction_prompt)
                    split = rules.split_of(options.seed, "conversation", conv.conversation_id, options.eval_fraction)
                    out.add(pos, curated, split, conv.conversation_id)
                    unused = curated.unused
                result.conversations.append((obj["conversation_id"], pos, unused))
            elif kind == "comparison":
                if out:
                    comp = build_record(obj)
                    split = rules.split_of(options.seed, "comparison", comp.comparison_id, options.eval_fraction)
                    out.add(pos, rules.curate_comparison(comp), split, None)
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
    out = _Staging(staging, chunk, "b")
    try:
        for pos, obj in fetch_records(chunk, [p for p, _ in requests]):
            if validate_record(obj) is not None or obj["type"] != "conversation":
                raise UserError(f"{chunk.path}: changed while edgetune was reading it; run the build again")
            conv = build_record(obj)
            joined, lost = join_feedback(conv, feedback[pos])
            orphans += lost
            curated = rules.curate_conversation(conv, joined, options.correction_prompt)
            split = rules.split_of(options.seed, "conversation", conv.conversation_id, options.eval_fraction)
            out.add(pos, curated, split, conv.conversation_id)
            unused[pos] = curated.unused
    finally:
        out.close()
    return orphans, unused
