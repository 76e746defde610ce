"""Preference data: rows -> token arrays -> batches, for `edgetune dpo`, `kto` and `orpo`.

Reuses SFT's tokenisation (`sft_data.tokenize_example`: chat template, prompt
prefix check, one BOS, end-of-turn supervised), so a completion is scored
over exactly the tokens SFT trains on. A preference pair is two examples with
the same prompt; a batch of B pairs is one [2B, T] array with rows
[chosen 1, rejected 1, chosen 2, ...], so both go through the policy in one
forward; with `packing: true` the sequences of a batch's pairs share rows
(`pack_items`) and are summed per sequence, in the same order.

Row formats (detected per row from its keys):
- pairs (`{dir}/{split}/dpo.jsonl` of `edgetune data build`, TRL explicit
  prompt): `{"prompt": [msgs] | str, "chosen": [msgs] | str, "rejected": ...}`
- pairs, TRL implicit prompt: `{"chosen": [msgs], "rejected": [msgs]}` (the
  shared leading messages are the prompt)
- unpaired (`kto.jsonl`, TRL unpaired): `{"prompt", "completion", "label": bool}`
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from edgetune.data.source import Invalid, iter_jsonl
from edgetune.errors import InputError, UserError
from edgetune.fileio import expand_inputs
from edgetune.sft_data import (MAX_REPORTED_PROBLEMS, Example, TokenizationError, TokenizedExample, TokenizerFacts,
                               _starts_bos, tokenize_example, truncate_left)


@dataclass(frozen=True)
class PreferenceRow:
    """One pair (`rejected` set) or one unpaired completion (`label` set), before tokenisation."""

    id: str  # FILE:LINE
    prompt: list[dict] | str
    chosen: list[dict] | str  # the completion, for unpaired rows
    rejected: list[dict] | str | None = None
    label: bool | None = None


@dataclass(frozen=True)
class TokenizedPair:
    id: str
    chosen: TokenizedExample
    rejected: TokenizedExample


# --- reading --------------------------------------------------------------------------------------

def preference_files(data, split: str, kind: str) -> list[Path]:
    """The files of `split` for `kind` ("dpo" or "kto"): `{dir}/{split}/{kind}.jsonl` of a data
    build folder, or the recipe's `data.train`/`data.eval`. A build folder without an eval file
    gives none; raises UserError for a missing folder or training file."""
    if data.dir is None:
        return expand_inputs(list(getattr(data, split)))
    root = Path(data.dir)
    if not root.is_dir():
        raise UserError(f"{root}: no such data folder; make it with `edgetune data build LOG... --out {root}`")
    path = root / split / f"{kind}.jsonl"
    if path.is_file():
        return [path]
    if split == "eval":
        return []
    raise UserError(f"{root}: no {split}/{kind}.jsonl; `edgetune data build` writes it when the feedback log has "
                    + ("corrections, edits or side-by-side picks" if kind == "dpo" else "thumbs up/down votes"))


def load_preference_rows(data, split: str, kind: str) -> list[PreferenceRow]:
    """Read the `split` rows for `kind` ("dpo": pairs, "kto": unpaired labelled completions).

    Raises InputError listing up to MAX_REPORTED_PROBLEMS malformed rows as FILE:LINE: reason,
    and UserError when the training split has no rows.
    """
    problems: list[tuple[str, int | None, str]] = []
    rows: list[PreferenceRow] = []
    files = preference_files(data, split, kind)
    for path in files:
        for lineno, raw in iter_jsonl(path):
            if isinstance(raw, Invalid):
                problems.append((str(path), lineno, raw.reason))
                continue
            try:
                rows.append(parse_preference_row(raw, kind, f"{path}:{lineno}"))
            except ValueError as e:
                problems.append((str(path), lineno, str(e)))
    if problems:
        if len(problems) > MAX_REPORTED_PROBLEMS:
            n = len(problems) - MAX_REPORTED_PROBLEMS
            problems = problems[:MAX_REPORTED_PROBLEMS] + [(problems[-1][0], None, f"... and {n} more problems")]
        raise InputError(problems)
    if split == "train" and not rows:
        raise UserError(f"{', '.join(map(str, files))}: no {kind} training rows")
    return rows


def parse_preference_row(row: dict, kind: str, row_id: str) -> PreferenceRow:
    """One JSON object -> PreferenceRow; raises ValueError saying what is wrong and what is expected."""
    if kind == "dpo":
        if "chosen" not in row or "rejected" not in row:
            hint = " (this is an unpaired row: train it with `edgetune kto`)" if "label" in row else ""
            raise ValueError(f"a preference pair needs `chosen` and `rejected`{hint}")
        chosen, rejected = row["chosen"], row["rejected"]
        if "prompt" not in row:  # TRL implicit prompt: whole conversations sharing their start
            if not (isinstance(chosen, list) and isinstance(rejected, list)):
                raise ValueError("without `prompt`, `chosen` and `rejected` must be whole conversations "
                                 "(message lists)")
            _check_messages(chosen, "chosen"), _check_messages(rejected, "rejected")
            n = 0
            while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
                n += 1
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
            if not prompt:
                raise ValueError("`chosen` and `rejected` share no leading messages; give `prompt` explicitly")
        else:
            prompt = row["prompt"]
        return PreferenceRow(row_id, *_prompt_and(prompt, [chosen, rejected], ["chosen", "rejected"]))
    if kind == "kto":
        for key in ("prompt", "completion", "label"):
            if key not in row:
                raise ValueError(f"an unpaired row needs `{key}`"
                                 + (" (this is a pair: train it with `edgetune dpo`)" if "chosen" in row else ""))
        if not isinstance(row["label"], bool):
            raise ValueError("`label` must be true (thumbs up) or false (thumbs down)")
        prompt, completion = _prompt_and(row["prompt"], [row["completion"]], ["completion"])
        return PreferenceRow(row_id, prompt, completion, label=row["label"])
    raise ValueError(f"unknown preference kind {kind!r}")  # a bug in the caller


def _prompt_and(prompt, completions: list, names: list[str]) -> tuple:
    if isinstance(prompt, str):
        if not all(isinstance(c, str) for c in completions):
            raise ValueError(f"with a string `prompt`, {' and '.join(f'`{n}`' for n in names)} must be strings")
        return (prompt, *completions)
    if not isinstance(prompt, list) or not prompt:
        raise ValueError("`prompt` must be a non-empty message list or a string")
    _check_messages(prompt, "prompt")
    for c, name in zip(completions, names):
        if not isinstance(c, list) or not c:
            raise ValueError(f"`{name}` must be a non-empty message list (as `prompt` is one)")
        _check_messages(c, name)
        if c[-1]["role"] != "assistant":
            raise ValueError(f"`{name}` must end with an assistant message; got role {c[-1]['role']!r}")
    return (prompt, *completions)


def _check_messages(messages: list, key: str) -> None:
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"`{key}[{i}]` must be an object with `role` and `content` strings")


# --- tokenising -----------------------------------------------------------------------------------

def tokenize_pairs(rows: Sequence[PreferenceRow], tokenizer, max_seq_len: int, truncation: str,
                   vocab_size: int) -> tuple[list[TokenizedPair], dict]:
    """Tokenise both completions of each pair with the chat template (see `sft_data.tokenize_example`).

    A pair too long for `max_seq_len` is dropped (truncation "drop") or has the start of its prompt
    cut by the same number of tokens on both sides ("left"), so both completions keep one context.
    Raises one TokenizationError listing up to MAX_REPORTED_PROBLEMS failing rows.
    """
    facts = TokenizerFacts.of(tokenizer)
    kept, errors, truncated, dropped = [], [], 0, 0
    for row in rows:
        try:
            sides = [tokenize_example(Example(row.id, row.prompt, c), tokenizer, vocab_size, facts)
                     for c in (row.chosen, row.rejected)]
        except TokenizationError as e:
            errors.append(str(e))
            continue
        excess = max(len(t) for t, _ in sides) - max_seq_len
        if excess > 0:
            if truncation == "drop":
                dropped += 1
                continue
            cut = [truncate_left(t, p, len(t) - excess, int(_starts_bos(t, facts))) for t, p in sides]
            if any(c is None for c in cut):
                dropped += 1
                continue
            sides, truncated = cut, truncated + 1
        c, r = (TokenizedExample(row.id, np.asarray(t, np.int32), p) for t, p in sides)
        kept.append(TokenizedPair(row.id, c, r))
    _raise_errors(errors)
    return kept, {"rows": len(rows), "kept": len(kept), "truncated": truncated, "dropped": dropped,
                  "tokens": int(sum(len(p.chosen.tokens) + len(p.rejected.tokens) for p in kept))}


def tokenize_unpaired(rows: Sequence[PreferenceRow], tokenizer, max_seq_len: int, truncation: str,
                      vocab_size: int) -> tuple[list[TokenizedExample], list[bool], dict]:
    """Tokenise KTO rows; returns examples, their labels and stats (as `tokenize_pairs`)."""
    facts = TokenizerFacts.of(tokenizer)
    kept, labels, errors, truncated, dropped = [], [], [], 0, 0
    for row in rows:
        try:
            tokens, prompt_len = tokenize_example(Example(row.id, row.prompt, row.chosen), tokenizer, vocab_size, facts)
        except TokenizationError as e:
            errors.append(str(e))
            continue
        if len(tokens) > max_seq_len:
            cut = None if truncation == "drop" else truncate_left(tokens, prompt_len, max_seq_len,
                                                                  int(_starts_bos(tokens, facts)))
            if cut is None:
                dropped += 1
                continue
            (tokens, prompt_len), truncated = cut, truncated + 1
        kept.append(TokenizedExample(row.id, np.asarray(tokens, np.int32), prompt_len))
        labels.append(bool(row.label))
    _raise_errors(errors)
    return kept, labels, {"rows": len(rows), "kept": len(kept), "truncated": truncated, "dropped": dropped,
                          "desirable": sum(labels), "undesirable": len(labels) - sum(labels),
                          "tokens": int(sum(len(e.tokens) for e in kept))}


def _raise_errors(errors: list[str]) -> None:
    if errors:
        more = len(errors) - MAX_REPORTED_PROBLEMS
        raise TokenizationError("\n".join(errors[:MAX_REPORTED_PROBLEMS]
                                          + ([f"... and {more} more rows with problems"] if more > 0 else [])))


def rows_fingerprint(rows: Sequence[TokenizedExample]) -> str:
    """sha256 over the token ids and prompt lengths of `rows`, in order (what a score depends on)."""
    h = hashlib.sha256()
    for ex in rows:
        h.update(np.int64(ex.prompt_len).tobytes())
        h.update(np.int64(len(ex.tokens)).tobytes())
        h.update(np.asarray(ex.tokens, np.int32).tobytes())
    return h.hexdigest()


# --- batching -------------------------------------------------------------------------------------

def group_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Item indices per batch for one epoch, a pure function of the arguments.

    Items are sorted by length (ties broken by a (seed, epoch) shuffle) and cut into batches of
    `batch_size`, so a batch pads little; the batch order is shuffled by (seed, epoch). The last
    batch may be smaller.
    """
    if not len(lengths):
        return []
    rng = np.random.default_rng([seed, epoch])
    order = np.lexsort((rng.permutation(len(lengths)), np.asarray(lengths)))
    groups = [[int(i) for i in order[i: i + batch_size]] for i in range(0, len(order), batch_size)]
    return [groups[i] for i in rng.permutation(len(groups))]


# `pack_items` packs the items in chunks of this many: first fit over every open batch of a chunk
# fills ~98% of the positions on chat-like length mixes, and chunking keeps that search linear in
# the dataset (100k pairs in ~5 s) where one global search grew quadratically (~3 minutes).
PACK_CHUNK = 2000


@dataclass(frozen=True)
class PackedBatch:
    """One preference micro-batch: its items in loss order, and per row the (item, j) sequences it
    holds (j: 0 chosen / 1 rejected of a pair; 0 for a KTO completion), in row order. Unpacked
    batches hold one sequence per row."""

    items: list[int]
    rows: list[list[tuple[int, int]]]


def preference_batches(lengths: Sequence[Sequence[int]], batch_size: int, max_seq_len: int, packing: bool,
                       seed: int, epoch: int) -> list[PackedBatch]:
    """One epoch's micro-batches of items whose sequences have `lengths` (see `pack_items`): packed
    into `batch_size` rows of `max_seq_len`, or `batch_size` similar-length items (`group_batches`)
    with one sequence per row. A pure function of the arguments."""
    if packing:
        return pack_items(lengths, batch_size, max_seq_len, seed, epoch)
    groups = group_batches([max(item) for item in lengths], batch_size, seed, epoch)
    return [PackedBatch(g, [[(i, j)] for i in g for j in range(len(lengths[i]))]) for g in groups]


def pack_items(lengths: Sequence[Sequence[int]], rows: int, capacity: int, seed: int,
               epoch: int) -> list[PackedBatch]:
    """Items placed whole, padding-free, into micro-batches of `rows` rows x `capacity` positions:
    a pure function of the arguments.

    `lengths[i]` are item i's sequence lengths (a pair: chosen, rejected; a KTO completion: one).
    A pair's two sequences go in the same batch (its loss needs both) but may sit in different
    rows. The items, shuffled by `seed`, are packed PACK_CHUNK at a time: longest first, each into
    the first open batch where every one of its sequences finds a row with room (first fit), else
    into a new batch. So a batch holds as many items as fit, and the item count varies from batch to
    batch (the loss is normalised per item, as with gradient accumulation). The packing depends on
    `seed` only, so every epoch has the same batches (a step cursor maps to one batch whatever the
    epoch); `epoch` shuffles their order. Raises ValueError for a sequence longer than `capacity`
    or an item that cannot fit an empty batch.
    """
    if rows < 1:
        raise ValueError("rows must be >= 1")
    if not len(lengths):
        return []
    longest = max(max(item) for item in lengths)
    if longest > capacity:
        raise ValueError(f"a sequence of {longest} positions exceeds the row capacity {capacity}")
    smallest = min(min(item) for item in lengths)
    shuffled = np.random.default_rng([seed]).permutation(len(lengths)).tolist()
    batches: list[PackedBatch] = []
    for start in range(0, len(shuffled), PACK_CHUNK):
        chunk = shuffled[start: start + PACK_CHUNK]
        free: dict[int, list[int]] = {}  # open batches of this chunk: free positions per row
        for i in sorted(chunk, key=lambda i: -sum(lengths[i])):  # stable: ties keep the shuffle
            seqs = sorted(enumerate(lengths[i]), key=lambda s: -s[1])  # longest sequence first
            for b, room in free.items():  # oldest first
                placed = _first_fit(room, seqs) if max(room) >= seqs[0][1] else None
                if placed is not None:
                    break
            else:
                b = len(batches)
                batches.append(PackedBatch([], [[] for _ in range(rows)]))
                free[b] = [capacity] * rows
                placed = _first_fit(free[b], seqs)
                if placed is None:
                    raise ValueError(f"item {i}: {len(seqs)} sequences ({sum(lengths[i])} positions) do not fit "
                                     f"{rows} row(s) of {capacity} positions")
            free[b] = placed[0]
            batches[b].items.append(i)
            for row, j in placed[1]:
                batches[b].rows[row].append((i, j))
            if max(free[b]) < smallest:
                del free[b]  # full: nothing could go in any more
    for batch in batches:
        while batch.rows and not batch.rows[-1]:
            batch.rows.pop()  # a batch of few items leaves its last rows empty (padding adds them back)
    return [batches[i] for i in np.random.default_rng([seed, epoch]).permutation(len(batches))]


def _first_fit(room: list[int], seqs: list[tuple[int, int]]) -> tuple[list[int], list[tuple[int, int]]] | None:
    """(free positions per row after placing, [(row, j)]) for sequences (j, length) each put in the
    first row with room, or None when one does not fit."""
    room, placed = list(room), []
    for j, n in seqs:
        row = next((r for r, f in enumerate(room) if f >= n), None)
        if row is None:
            return None
        room[row] -= n
        placed.append((row, j))
    return room, placed
