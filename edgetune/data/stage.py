"""The parallel half of a build: read a chunk of the log once, check it, curate it, stage the rows.

A log is cut into chunks (byte ranges of plain `.jsonl` files; whole files
for `.gz` and imported formats). `stage_chunk` runs in a worker process per
chunk and decodes every line exactly once, because JSON decoding is most of
the cost of a build:

- every record is validated (a valid line is decoded and checked in one C
  pass by wire.py; any other falls back to orjson or the stdlib and
  records.py, which word the reasons); problems come back with
  chunk-relative lines;
- conversations come back as an index entry `(id, position, unused)`, and
  the ones with an inline signal, and all comparisons, are curated right
  away (rules.py), scrubbed (pii.py) and *staged*: their rows are written in
  their final form, so the parent never decodes or encodes them again;
- split-out `feedback` records (few) come back whole.

Most lines (valid conversations and comparisons) take a shortcut: `_native.c`
does all of the above for them in one C pass, the same work line by line as
`wire.decode`/records.py, rules.py and `stage_rows` here, which stay the
definition (it steps aside on any line it is not sure of, and a test holds it
to them); it calls back into `pii.scrub` for texts that may hold PII.

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

import functools
import json
import operator
from collections import Counter
from dataclasses import dataclass, field
from hashlib import blake2b
from json.encoder import encode_basestring_ascii
from pathlib import Path
from typing import IO, Callable, Iterator

from edgetune.data import pii, rules
from edgetune.data.records import (RECORD_TYPES, ROLES, Bad, Conversation, FeedbackRecord, build_record,
                                   check_conversation, validate_record)
from edgetune.data.source import Invalid, decode_json, iter_jsonl
from edgetune.errors import UserError

try:  # 2x faster than the stdlib on log lines, 5x on rows; optional (see `_decode_line`, `row_json`)
    from orjson import OPT_APPEND_NEWLINE as _APPEND_NEWLINE, dumps as _fast_dumps, loads as _fast_loads
except ImportError:  # pragma: no cover - the parity test runs the build without it too
    _fast_dumps = _fast_loads = None
try:  # decodes and checks a valid line in half the time of orjson and records.py (wire.py)
    from edgetune.data.wire import WireComparison, decode as _fast_records
except ImportError:  # pragma: no cover - the parity test runs the build without it too
    WireComparison, _fast_records = None, None
try:  # checks, curates and encodes a common line in one C pass (_native.c; optional, built by setup.py)
    from edgetune.data._native import stage_line as _native_stage_line
except ImportError:  # pragma: no cover - the parity tests run the build without it too
    _native_stage_line = None

POSITION_BITS = 40  # position = file index << 40 | byte offset (or line/ordinal): one int that sorts in log order
PII_KINDS = ("email", "phone", "card", "ip")
NO_PII = "0,0,0,0"
# readline() is fastest with a buffer that stays in the L2 cache: 1 us per 3 KB line with 64 KiB,
# 2.8 us with the default 8 KiB (more refills) or with 1 MiB (measured on the 2-core build machine).
READ_BUFFER = 1 << 16
WRITE_BUFFER = 1 << 18  # rows are a few KB: the default 8 KiB buffer would write almost every row on its own
PENDING_LINES = 4096  # staged records whose index and tally lines are kept to be written at once

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
    obj = decode_json(text)
    if type(obj) is Invalid:
        return obj
    if not isinstance(obj, dict):
        return Invalid(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _open_binary(path: str, buffering: int = READ_BUFFER) -> IO[bytes]:
    try:
        return open(path, "rb", buffering=buffering)
    except OSError as e:
        raise UserError(f"{path}: cannot open ({e.strerror or e})") from None


def iter_chunk(chunk: Chunk, lines_out: list[int] | None = None, checked: bool = False,
               staged: Callable[[bytes], tuple | None] | None = None) -> Iterator[tuple[int, int, object, bytes | None]]:
    """Yield `(position, line, object_or_Invalid, raw line)` for each record of `chunk`, in order.

    A "lines" chunk owns the lines that *start* in [start, end); its line
    numbers count from 1 at its first line, and the number of lines it spans
    is put in `lines_out[0]`. The raw line is there for "lines" chunks only
    (None otherwise), for `_decode_line(raw, fast=False)`.

    With `checked`, a line of a "lines" chunk that `wire.decode` finds valid
    comes as what it returns (a checked record, see there), not as a dict.
    With `staged` (`_stage_native`), a line it takes comes as what it returns
    (a 4-tuple), before any of that.
    """
    base = chunk.file_index << POSITION_BITS
    if chunk.reader == "lines":
        with _open_binary(chunk.path) as f:
            if chunk.start:
                f.seek(chunk.start - 1)
                f.readline()  # the rest of the line that straddles `start` belongs to the chunk before
            offset = f.tell()
            lineno = 0
            readline, end, loads = f.readline, chunk.end, _fast_loads or _decode_line
            decode_checked = _fast_records if checked else None
            while offset < end:
                raw = readline()
                if not raw:
                    break
                lineno += 1
                item = staged(raw) if staged is not None else None
                if item is None and decode_checked is not None:
                    item = decode_checked(raw)
                if item is None:  # not checked, or not valid as wire.decode reads it: the plain path
                    try:  # `_decode_line`'s fast path, inline: a call per line costs a tenth of the loop
                        item = loads(raw) if raw[:1] == b"{" else _decode_line(raw)
                    except ValueError:  # a line orjson refuses: the stdlib decides
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


def fetch_conversations(chunk: Chunk, positions: list[int], staged: Callable[[int, bytes], tuple | None] | None = None
                        ) -> Iterator[tuple[int, object]]:
    """Yield `(position, conversation record)` at the given sorted positions of `chunk`, where
    conversations were found valid before (a `records.Conversation`, or what `wire.decode` makes).
    With `staged` (a "lines" chunk), a line for which `staged(position, line)` returns a result
    comes as that result."""
    if chunk.reader == "lines":
        mask = (1 << POSITION_BITS) - 1
        with _open_binary(chunk.path, buffering=8192) as f:  # each seek refills the buffer: keep it small
            for pos in positions:
                f.seek(pos & mask)
                raw = f.readline()
                done = staged(pos, raw) if staged is not None else None
                if done is not None:
                    yield pos, done
                    continue
                checked = _fast_records(raw) if _fast_records is not None else None
                yield pos, checked[0] if type(checked) is tuple else _read_again(chunk, _decode_line(raw))
    else:
        wanted = set(positions)
        for pos, _, item, _ in iter_chunk(chunk):
            if pos in wanted:
                yield pos, _read_again(chunk, item)


def _read_again(chunk: Chunk, obj) -> Conversation:
    """The conversation record of `obj`, read before; UserError if it is not one now."""
    if type(obj) is not dict or validate_record(obj) is not None or obj["type"] != "conversation":
        raise UserError(f"{chunk.path}: changed while edgetune was reading it; run the build again")
    return build_record(obj)


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
# Maps the bytes of _NOT_PLAIN to NUL and every other byte to itself: bytes.translate returns its
# input object itself when nothing changes, which is cheaper to find out than deleting them.
_MARK_NOT_PLAIN = bytes(0 if c in _NOT_PLAIN else c for c in range(256))


_ROLE_KEYS = {role: role.encode() + b"\x1f" for role in ROLES}  # how a message's dedup key part starts


class _TextTable:
    """One record's texts, messages and message lists, each scrubbed (rule 8) and keyed (rule 7) once.

    A conversation's context recurs in every row it gives (SFT, KTO, DPO of
    each rated message); scrubbing, normalising and hashing it per row was
    most of a build's time. Texts, messages and lists are looked up by their
    id(): hashing a long text to find it costs as much as checking it again,
    and the record's rows keep every one of them alive (so no id is reused)
    while the record is staged.
    """

    def __init__(self):
        self.texts: dict[int, tuple[str, bytes, tuple | None]] = {}  # id(text) -> (clean, key, PII)
        self.pieces: dict[int, tuple[dict, bytes, tuple | None]] = {}  # id(message) -> (clean, key, PII)
        self.lists: dict[int, tuple[list, bytes, tuple | None]] = {}  # id(list) -> (clean, key, PII)
        self.prompts: dict[int, tuple[list, object, tuple | None]] = {}  # id(prompt) -> (clean, hash, PII)
        self.hashed: list[tuple[list, object]] = []  # the prompts hashed, with their blake2b state
        self._counts: Counter | None = None  # reused: a Counter per text costs as much as scrubbing a short one

    def text(self, text: str) -> tuple[str, bytes, tuple | None]:
        """Scrubbed text, its part of a dedup key (normalised, UTF-8) and its PII by kind (None: none)."""
        hit = self.texts.get(id(text))
        if hit is None:
            # Most texts hold no PII and are already normal; two passes in C over the text tell
            # (pii.NEEDED: what every PII kind needs; the normal form of
            # rules.normalize_whitespace), where the full work below takes three or more.
            # `bytes.translate` returns its input itself when nothing changes (in CPython; elsewhere
            # the full work runs, to the same result). The double space is looked for in the str:
            # `bytes in bytes` first tries the needle as an int, and raising and clearing that
            # TypeError costs more than the search.
            if text.isascii():  # (then a plain encode gives the same bytes, in half the time)
                key = text.encode()
                if (key[:1] != b" " and key[-1:] != b" " and key.translate(_MARK_NOT_PLAIN) is key
                        and "  " not in text):
                    hit = self.texts[id(text)] = (text, key, None)
                    return hit
            counts = self._counts
            if counts is None:
                counts = self._counts = Counter()
            counts.clear()
            clean = pii.scrub(text, counts)  # changes the text exactly when it counts something
            found = tuple(counts[k] for k in PII_KINDS) if counts else None
            hit = self.texts[id(text)] = (clean, rules.normalize_whitespace(clean).encode("utf-8", "surrogatepass"),
                                          found)
        return hit

    def piece(self, m: dict) -> tuple[dict, bytes, tuple | None]:
        """The scrubbed message (`m` itself when nothing changed), its part of a dedup key
        (role, \\x1f, normalised content: as in `rules.messages_key_text`) and its PII."""
        hit = self.pieces.get(id(m))
        if hit is None:
            content, role = m["content"], m["role"]
            clean, key, found = self.texts.get(id(content)) or self.text(content)
            hit = self.pieces[id(m)] = (m if found is None else {"role": role, "content": clean},
                                        (_ROLE_KEYS.get(role) or role.encode() + b"\x1f") + key, found)
        return hit

    def messages(self, messages: list[dict]) -> tuple[list[dict], bytes, tuple | None]:
        """The scrubbed list (`messages` itself when nothing changed), its dedup key part
        (`rules.messages_key_text` of the scrubbed list, UTF-8) and its PII by kind."""
        hit = self.lists.get(id(messages))
        if hit is None:
            if len(messages) == 1:  # an answer (completion, chosen, rejected): nearly every list here
                clean_m, key, found = self.piece(messages[0])
                hit = self.lists[id(messages)] = (messages if found is None else [clean_m], key, found)
                return hit
            clean, keys, found = messages, [], None
            for k, m in enumerate(messages):
                clean_m, key, piece_pii = self.piece(m)
                keys.append(key)
                if piece_pii:
                    found = piece_pii if found is None else tuple(map(operator.add, found, piece_pii))
                    if clean is messages:
                        clean = list(messages)
                    clean[k] = clean_m
            hit = self.lists[id(messages)] = (clean, b"\x1e".join(keys), found)
        return hit

    def prompt(self, prompt: list[dict]) -> tuple[list[dict], object, tuple | None]:
        """`messages(prompt)`, but with the blake2b state (digest_size 16) after the key part
        in place of the key part.

        A conversation's prompts are mostly prefixes of one another (each rated
        message's context: its turns so far), so each is hashed on from the
        state of the longest prompt hashed before that starts it: the key part
        is the pieces joined by \\x1e, so the state after a prefix is the same
        in every prompt that starts with it.
        """
        hit = self.prompts.get(id(prompt))
        if hit is None:
            pieces = [self.pieces.get(id(m)) or self.piece(m) for m in prompt]
            start, state = 0, None
            for before, before_state in self.hashed:  # a few per record
                if start < len(before) <= len(prompt) and all(map(operator.is_, before, prompt)):
                    start, state = len(before), before_state
            if state is None:
                state = blake2b(b"\x1e".join([p[1] for p in pieces]), digest_size=16)
            elif start < len(prompt):
                state = state.copy()
                state.update(b"\x1e" + b"\x1e".join([p[1] for p in pieces[start:]]))
            self.hashed.append((prompt, state))
            if any(map(_PII_OF, pieces)):  # rare: sum the PII, and make the scrubbed list
                found = None
                for p in pieces:
                    if p[2]:
                        found = p[2] if found is None else tuple(map(operator.add, found, p[2]))
                hit = ([p[0] for p in pieces], state, found)
            else:
                hit = (prompt, state, None)
            self.prompts[id(prompt)] = hit
        return hit


_PII_OF = operator.itemgetter(2)


def stage_rows(curated: rules.Curated, split: str, conversation_id: str | None
               ) -> tuple[str | None, list[tuple[str, str, str, str, bytes]]]:
    """Scrub (rule 8) and drop empty preferences (rule 7) in one record's rows, and encode them.

    Returns the record's tally for the report (JSON; None when the record has
    nothing to report) and per row `(output, split, dedup key, "rule <TAB>
    persona <TAB> e,p,c,i", row JSON line)`, the fields of its line in the
    staging index. Each row carries the PII placeholders it holds, so the
    report can count exactly what the written files contain.

    The dedup key, `rules.dedup_key(output, row)` of the scrubbed row (a test
    checks it), is the blake2b of the parts' keys joined by \\x1d. The rows of
    one message come one after the other and share their prompt and answer:
    what the last row worked out for them is used again.
    """
    drops = curated.drops
    table = _TextTable()
    lists = table.messages
    staged = []
    last_prompt = last_answer = last_persona = None
    for output, row in curated.rows:
        prompt = row["prompt"]
        if prompt is not last_prompt:
            last_prompt, last_answer = prompt, None
            clean_prompt, prompt_hash, prompt_pii = table.prompt(prompt)
        if output == "dpo":
            chosen, chosen_key, chosen_pii = lists(row["chosen"])
            rejected, rejected_key, rejected_pii = lists(row["rejected"])
            if chosen_key == rejected_key:  # rules.chosen_equals_rejected, on the scrubbed texts
                # Counted in a copy: `curated` is the caller's.
                drops = {**drops, "dpo_chosen_equals_rejected": drops.get("dpo_chosen_equals_rejected", 0) + 1}
                continue
            digest = prompt_hash.copy()
            digest.update(b"\x1d" + chosen_key + b"\x1d" + rejected_key)
            pii = _add_pii(_add_pii(prompt_pii, chosen_pii), rejected_pii)
            unchanged = chosen is row["chosen"] and rejected is row["rejected"]
        else:
            answer = row["completion"]
            if answer is not last_answer:  # else: the KTO row after the SFT row of the same message
                last_answer = answer
                completion, completion_key, completion_pii = lists(answer)
                answered = prompt_hash.copy()
                answered.update(b"\x1d" + completion_key)
            if output == "kto":
                digest = answered.copy()
                digest.update(b"\x1d1" if row["label"] else b"\x1d0")
            else:
                digest = answered
            pii = _add_pii(prompt_pii, completion_pii)
            unchanged = completion is answer
        source = row["source"]
        if "comments" in source:
            comments = [table.text(c) for c in source["comments"]]
            if any(c[2] for c in comments):
                for c in comments:
                    pii = _add_pii(pii, c[2])
                source = {**source, "comments": [c[0] for c in comments]}
                unchanged = False
        if unchanged and clean_prompt is prompt:
            clean = row  # nothing to scrub: the usual case
        elif output == "dpo":
            clean = {"prompt": clean_prompt, "chosen": chosen, "rejected": rejected, "source": source}
        elif output == "kto":
            clean = {"prompt": clean_prompt, "completion": completion, "label": row["label"], "source": source}
        else:
            clean = {"prompt": clean_prompt, "completion": completion, "source": source}
        persona = source.get("persona", rules.UNTAGGED)
        if persona is not last_persona:
            last_persona, persona_json = persona, encode_basestring_ascii(persona)
        staged.append((output, split, digest.hexdigest(),
                       f"{source['rule']}\t{persona_json}\t{','.join(map(str, pii)) if pii else NO_PII}",
                       row_json(clean)))
    if not (staged or curated.signals or drops or curated.conflicts):
        return None, staged
    tally = {"signals": curated.signals, "drops": drops,
             "conflicts": [[conversation_id, mid] for mid in curated.conflicts]}
    return _index_json(tally), staged


def _add_pii(a: tuple | None, b: tuple | None) -> tuple | None:
    """PII counts by kind, summed (None: none)."""
    if not b:
        return a
    return b if a is None else tuple(map(operator.add, a, b))


def _scrub_counted(text: str) -> tuple[str, tuple | None]:
    """pii.scrub for _native.c: the scrubbed text and its PII by kind (None: none)."""
    counts = Counter()
    clean = pii.scrub(text, counts)
    return clean, (tuple(counts[k] for k in PII_KINDS) if counts else None)


_RATING_CODES = {"up": 1, "down": 0, None: -1}  # a normalised rating as _native.c takes it


def _stage_native(options) -> Callable[..., tuple | None] | None:
    """The C staging pass for one build's options (None where it is not built): a line's
    `(kind, id, unused, staged)`, or None to read it on the Python path (see _native.c);
    given a conversation's split-out feedback too, `(kind, id, unused, staged, lost)`."""
    if _native_stage_line is None:
        return None
    merge = options.correction_prompt == rules.MERGE
    seed_prefix = f"{options.seed}\x00".encode()  # how rules.split_of's hashed material starts
    return functools.partial(_native_stage_line, merge, _scrub_counted, seed_prefix, options.eval_fraction)


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
    """Where one chunk and phase stages its records: tallies, and an index and rows files per output.

    The lines of the tallies and indexes are written a few thousand at a time:
    a text file's `write` per line cost more than making the line.
    """

    def __init__(self, folder: str, chunk: Chunk, phase: str):
        self.tallies = open(staging_tallies(folder, chunk, phase), "w", encoding="utf-8", newline="\n")
        self.index = {output: open(staging_index(folder, chunk, phase, output), "w", encoding="utf-8", newline="\n")
                      for output in rules.OUTPUTS}
        self.rows = {(split, output): open(staging_rows(folder, chunk, phase, split, output), "wb",
                                           buffering=WRITE_BUFFER)
                     for split in rules.SPLITS for output in rules.OUTPUTS}
        self.tally_lines: list[str] = []
        self.index_lines: dict[str, list[str]] = {output: [] for output in rules.OUTPUTS}

    def add(self, pos: int, curated: rules.Curated, split: str, conversation_id: str | None) -> None:
        """Stage one curated record's rows (`stage_rows`)."""
        tally, rows = stage_rows(curated, split, conversation_id)
        if tally is not None:
            self.add_encoded(pos, (split, tally, [(output, f"{split}\t{key}\t{len(row)}\t{fields}", row)
                                                  for output, _, key, fields, row in rows]))

    def add_encoded(self, pos: int, staged: tuple) -> None:
        """Stage one record's tally and rows, encoded: `(split, tally, [(output, its index line's
        fields after the position, row JSON line)])`, as `add` and `_native.stage_line` make them."""
        split, tally, rows = staged
        self.tally_lines.append(f"{pos}\t{tally}\n")
        for output, fields, row in rows:
            self.rows[split, output].write(row)
            self.index_lines[output].append(f"{pos}\t{fields}\n")
        if len(self.tally_lines) >= PENDING_LINES:
            self.flush()

    def flush(self) -> None:
        self.tallies.write("".join(self.tally_lines))
        self.tally_lines.clear()
        for output, lines in self.index_lines.items():
            self.index[output].write("".join(lines))
            lines.clear()

    def close(self) -> None:
        try:
            self.flush()
        finally:
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
    conversations, comparisons, problems = result.conversations, result.comparisons, result.problems
    kinds = dict.fromkeys(RECORD_TYPES, 0)  # records of each type; ints, not a Counter: 2 increments per record
    lines_out = [0]
    try:
        for pos, lineno, obj, raw in iter_chunk(chunk, lines_out, checked=True,
                                                staged=_stage_native(options) if out else None):
            kind = type(obj)
            if kind is tuple and len(obj) == 4:  # checked, curated and encoded by _native.c: most records
                native_kind, record_id, unused, staged = obj
                if native_kind == 0:
                    kinds["conversation"] += 1
                    conversations.append((record_id, pos, unused))
                else:
                    kinds["comparison"] += 1
                    comparisons.append((record_id, pos))
                if staged is not None:
                    out.add_encoded(pos, staged)
                continue
            if kind is tuple:  # a conversation that wire.decode checked
                record, unused, signal = obj
                kind = "conversation"
            elif kind is WireComparison:
                record, kind = obj, "comparison"
            elif kind is FeedbackRecord:
                record, kind = obj, "feedback"
            else:  # the plain path: a line wire.decode left to records.py, maybe invalid
                if kind is Invalid:
                    reason = obj.reason
                elif obj.get("type") == "conversation":
                    try:
                        unused, signal = check_conversation(obj)
                        reason = None
                    except Bad as e:
                        reason = str(e)
                else:
                    reason = validate_record(obj)
                if reason is not None:
                    if raw is not None and kind is not Invalid:  # explain it from the stdlib's reading
                        obj = _decode_line(raw, fast=False)
                        reason = obj.reason if type(obj) is Invalid else validate_record(obj)
                    problems.append((lineno, reason))
                    continue
                record, kind = build_record(obj), obj["type"]
            kinds[kind] += 1
            if kind == "conversation":
                if signal and out:  # only assistant messages may carry a signal (checked)
                    curated = rules.curate_conversation(record, None, options.correction_prompt)
                    split = rules.split_of(options.seed, "conversation", record.conversation_id,
                                           options.eval_fraction)
                    out.add(pos, curated, split, record.conversation_id)
                    unused = curated.unused
                conversations.append((record.conversation_id, pos, unused))
            elif kind == "comparison":
                if out:
                    split = rules.split_of(options.seed, "comparison", record.comparison_id, options.eval_fraction)
                    out.add(pos, rules.curate_comparison(record), split, None)
                comparisons.append((record.comparison_id, pos))
            else:
                result.feedback.append((lineno, record))
    finally:
        if out:
            out.close()
    result.counts = +Counter(records=sum(kinds.values()) + len(problems), invalid=len(problems), **kinds)
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
    native = _stage_native(options)

    def staged(pos: int, raw: bytes) -> tuple | None:  # _native.c, given the line's split-out feedback
        return native(raw, [(rec.message_id, _RATING_CODES[rec.feedback.rating], rec.feedback.edited_content,
                             rec.feedback.comment) for _, rec in feedback[pos]])
    try:
        for pos, conv in fetch_conversations(chunk, [p for p, _ in requests], staged if native else None):
            if type(conv) is tuple:  # curated and encoded by _native.c
                _, _, unused[pos], encoded, lost = conv
                items = feedback[pos]
                orphans += [(*items[k], why) for k, why in lost]
                if encoded is not None:
                    out.add_encoded(pos, encoded)
                continue
            joined, lost = join_feedback(conv, feedback[pos])
            orphans += lost
            curated = rules.curate_conversation(conv, joined, options.correction_prompt)
            split = rules.split_of(options.seed, "conversation", conv.conversation_id, options.eval_fraction)
            out.add(pos, curated, split, conv.conversation_id)
            unused[pos] = curated.unused
    finally:
        out.close()
    return orphans, unused
