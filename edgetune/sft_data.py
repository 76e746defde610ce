"""SFT data: rows -> token arrays -> batches.

Three steps, each a plain function the trainer calls:

1. `load_sft_rows(data, split)` reads an `edgetune data build` folder or JSONL
   files in the common chat formats into `Example`s (prompt + completion).
2. `tokenize_dataset(...)` renders each example with the model's chat template
   and checks the result (prompt is a token prefix, one BOS, ids within the
   model's vocabulary); loss covers the completion and its end-of-turn token.
3. `make_batches(...)` packs examples into rows (or groups them by length) and
   pads each batch only to its longest row. Batches are a pure function of
   (examples, seed, epoch), so a training cursor is just (epoch, batch index).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgetune.data.source import Invalid, iter_jsonl
from edgetune.errors import InputError, UserError
from edgetune.fileio import expand_inputs

FORMATS = ("auto", "edgetune", "messages", "prompt_completion", "mlx_chat", "mlx_completions", "mlx_text")

# End-of-turn tokens of common chat templates. The template writes one after each
# assistant message; it must be a supervised target or the model never learns to stop.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                      "<|end_of_text|>", "<|eom_id|>", "</s>")

MAX_REPORTED_PROBLEMS = 20


@dataclass(frozen=True)
class Example:
    """One SFT example before tokenisation.

    `prompt`/`completion` are message lists (chat) or plain strings. Plain strings
    with `chat_template=True` are wrapped as one user and one assistant turn when
    the tokenizer has a chat template (mlx-lm's `completions` format); otherwise
    they are joined as raw text with an EOS after the completion (TRL's standard
    prompt-completion and mlx-lm's `text` format).
    """

    id: str  # FILE:LINE, for error reports
    prompt: list[dict] | str
    completion: list[dict] | str
    chat_template: bool = True
    tools: list | None = None
    source: dict | None = None  # provenance from `edgetune data build`


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids of one example; `tokens[prompt_len:]` are the supervised targets."""

    id: str
    tokens: np.ndarray  # int32 [L]
    prompt_len: int

    @property
    def n_positions(self) -> int:
        """Input positions this example takes in a row: every token but the last is an input."""
        return len(self.tokens) - 1


# --- 1. reading rows ------------------------------------------------------------------------------

def data_files(data, split: str | None = None) -> list[Path]:
    """The input files of a data spec (both splits unless `split` is given), for hashing.

    `data` is a recipe `DataConfig`, or a path to a data build folder or a JSONL file.
    """
    spec = _DataSpec.of(data)
    out = []
    for s in (split,) if split else ("train", "eval"):
        out.extend(spec.files(s))
    return out


def load_sft_rows(data, split: str) -> list[Example]:
    """Read the `split` ("train" or "eval") rows of a data spec.

    `data` is a recipe `DataConfig`, or a path to a data build folder or one JSONL
    file (then used for either split). The format of each file is detected from
    its first row unless the spec names one. A data build folder without an eval
    split gives no eval rows. Raises `InputError` listing up to
    MAX_REPORTED_PROBLEMS malformed rows as FILE:LINE: reason, and `UserError`
    for missing folders, files matching nothing, or an empty training split.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    spec = _DataSpec.of(data)
    problems: list[tuple[str, int | None, str]] = []
    examples: list[Example] = []
    for path in spec.files(split):
        examples.extend(_read_file(path, spec.format, problems))
    if problems:
        raise InputError(_capped(problems, lambda n: (problems[-1][0], None, f"... and {n} more problems")))
    if split == "train" and not examples:
        raise UserError(f"{spec.describe(split)}: no training rows")
    return examples


@dataclass(frozen=True)
class _DataSpec:
    dir: str | None
    train: tuple[str, ...]
    eval: tuple[str, ...]
    format: str

    @classmethod
    def of(cls, data) -> _DataSpec:
        if isinstance(data, (str, os.PathLike)):
            p = Path(data)
            if p.is_dir():
                return cls(str(p), (), (), "edgetune")
            return cls(None, (str(p),), (str(p),), "auto")
        fmt = "edgetune" if data.dir is not None else data.format
        return cls(data.dir, tuple(data.train), tuple(data.eval), fmt)

    def files(self, split: str) -> list[Path]:
        if self.dir is None:
            return expand_inputs(list(getattr(self, split)))
        root = Path(self.dir)
        if not root.is_dir():
            raise UserError(f"{root}: no such data folder; make it with `edgetune data build LOG... --out {root}`")
        path = root / split / "sft.jsonl"
        if path.is_file():
            return [path]
        if split == "eval":
            return []
        raise UserError(f"{root}: not an edgetune data build folder (no {split}/sft.jsonl); "
                        f"make it with `edgetune data build LOG... --out {root}`")

    def describe(self, split: str) -> str:
        return str(Path(self.dir) / split / "sft.jsonl") if self.dir else ", ".join(getattr(self, split))


def _read_file(path: Path, fmt: str, problems: list) -> list[Example]:
    out = []
    for lineno, row in iter_jsonl(path):
        if isinstance(row, Invalid):
            problems.append((str(path), lineno, row.reason))
            continue
        if fmt == "auto":
            try:
                fmt = detect_format(row)
            except _RowError as e:
                problems.append((str(path), lineno, f"{e}; set data.format to say which format this file is"))
                return out  # every later row would fail the same way
        try:
            out.append(parse_row(row, fmt, f"{path}:{lineno}"))
        except _RowError as e:
            problems.append((str(path), lineno, f"{e} (format {fmt})"))
    return out


class _RowError(Exception):
    """A malformed row; the caller adds FILE:LINE."""


def detect_format(row: dict) -> str:
    """The format a file is in, judged from one row.

    prompt+completion as message lists is `edgetune` when the row has `source`
    (what `edgetune data build` writes) else TRL's conversational
    `prompt_completion`; as strings it is mlx-lm's `completions` (chat template
    applied), since edgetune trains chat models. Pass `prompt_completion`
    explicitly for raw-text training on plain strings.
    """
    if "messages" in row:
        return "messages"
    if "prompt" in row and "completion" in row:
        if isinstance(row["prompt"], list):
            return "edgetune" if "source" in row else "prompt_completion"
        return "mlx_completions"
    if "text" in row:
        return "mlx_text"
    if "chosen" in row or "rejected" in row:
        raise _RowError("this is a preference (DPO) row (chosen/rejected); SFT needs prompt+completion, "
                        "messages or text rows")
    raise _RowError(f"cannot tell the row format from its keys ({', '.join(sorted(map(str, row))) or 'none'}); "
                    "expected messages, prompt+completion, or text")


def parse_row(row: dict, fmt: str, row_id: str) -> Example:
    """One JSON object in format `fmt` -> Example. Raises `_RowError` saying what is wrong."""
    if fmt in ("messages", "mlx_chat"):
        messages = _messages(row, "messages")
        if not messages:
            raise _RowError("`messages` is empty")
        if messages[-1]["role"] != "assistant":
            raise _RowError(f"the last message must be the assistant's reply (it is what is trained); "
                            f"got role {messages[-1]['role']!r}")
        tools = row.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise _RowError("`tools` must be a list of tool definitions")
        return Example(row_id, messages[:-1], messages[-1:], tools=tools)
    if fmt in ("edgetune", "prompt_completion", "mlx_completions"):
        for key in ("prompt", "completion"):
            if key not in row:
                raise _RowError(f"missing `{key}`")
        prompt, completion = row["prompt"], row["completion"]
        source = row.get("source") if isinstance(row.get("source"), dict) else None
        if isinstance(prompt, str) and isinstance(completion, str) and fmt != "edgetune":
            return Example(row_id, prompt, completion, chat_template=(fmt == "mlx_completions"), source=source)
        if fmt == "mlx_completions":
            raise _RowError("`prompt` and `completion` must be strings")
        if not (isinstance(prompt, list) and isinstance(completion, list)):
            raise _RowError("`prompt` and `completion` must both be message lists"
                            + ("" if fmt == "edgetune" else " or both strings"))
        prompt_msgs, completion_msgs = _messages(row, "prompt"), _messages(row, "completion")
        if not completion_msgs or completion_msgs[-1]["role"] != "assistant":
            raise _RowError("`completion` must end with an assistant message")
        return Example(row_id, prompt_msgs, completion_msgs, tools=row.get("tools"), source=source)
    if fmt == "mlx_text":
        text = row.get("text")
        if not isinstance(text, str) or not text:
            raise _RowError("`text` must be a non-empty string")
        return Example(row_id, "", text, chat_template=False)
    raise ValueError(f"unknown data format {fmt!r}; expected one of {FORMATS}")


def _messages(row: dict, key: str) -> list[dict]:
    messages = row.get(key)
    if not isinstance(messages, list):
        raise _RowError(f"`{key}` must be a list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"]:
            raise _RowError(f"`{key}[{i}]` must be an object with a `role` string")
        if not isinstance(m.get("content"), str) and not m.get("tool_calls"):
            raise _RowError(f"`{key}[{i}].content` must be a string")
    return messages


def _capped(items: list, more) -> list:
    """The first MAX_REPORTED_PROBLEMS items, then `more(count left out)` if any were left out."""
    if len(items) <= MAX_REPORTED_PROBLEMS:
        return items
    return items[:MAX_REPORTED_PROBLEMS] + [more(len(items) - MAX_REPORTED_PROBLEMS)]


# --- 2. tokenising --------------------------------------------------------------------------------

class TokenizationError(UserError):
    """An example that cannot be tokenised safely; the message names the example."""


@dataclass(frozen=True)
class TokenizerFacts:
    """What tokenising needs to know about a tokenizer, worked out once per dataset."""

    bos_id: int | None
    bos_token: str | None
    adds_bos: bool  # does encode(..., add_special_tokens=True) put a BOS first?
    eos_id: int | None
    end_ids: frozenset[int]  # ids that end an assistant turn
    has_chat_template: bool

    @classmethod
    def of(cls, tokenizer) -> TokenizerFacts:
        """Accepts a Hugging Face tokenizer or mlx-lm's TokenizerWrapper (whose `eos_token_ids`
        include the model config's end-of-turn ids)."""
        bos_id, eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        probe = tokenizer.encode("a", add_special_tokens=True)
        # mlx-lm's wrapper holds a set; a transformers tokenizer may answer with one int.
        listed = getattr(tokenizer, "eos_token_ids", None)
        ends = {listed} if isinstance(listed, int) else set(listed or ())
        if eos_id is not None:
            ends.add(eos_id)
        added = tokenizer.get_added_vocab()
        ends.update(added[t] for t in END_OF_TURN_TOKENS if t in added)
        has_template = getattr(tokenizer, "has_chat_template", None)
        if has_template is None:
            has_template = tokenizer.chat_template is not None
        return cls(bos_id, tokenizer.bos_token, bool(probe) and bos_id is not None and probe[0] == bos_id,
                   eos_id, frozenset(ends), bool(has_template))


def tokenize_example(ex: Example, tokenizer, vocab_size: int | None = None,
                     facts: TokenizerFacts | None = None) -> tuple[list[int], int]:
    """Token ids of `ex` and the length of its unsupervised prompt.

    Chat examples: the prompt is rendered with the generation prompt, the
    conversation with the completion; both are encoded, and the prompt's ids
    must be a prefix of the conversation's. The sequence ends at the last
    end-of-turn token the template writes after the completion (tokens the
    template adds after it, such as a newline, are left out: the model stops at
    end-of-turn and never sees them); if the template writes none, EOS is
    appended. Special tokens are added by the tokenizer only when the rendered
    text does not already start with BOS, so BOS is never doubled. Plain text:
    [BOS] + prompt + completion + EOS, encoded piecewise so the boundary is exact.

    Raises `TokenizationError` (naming the example) when the prompt is not a
    prefix, when a tokenizer that uses BOS does not get exactly one at position
    0, when an id is >= `vocab_size` (the model's embedding rows), or when the
    chat template fails.
    """
    facts = facts or TokenizerFacts.of(tokenizer)
    prompt, completion = ex.prompt, ex.completion
    if isinstance(prompt, str) and ex.chat_template and facts.has_chat_template:
        prompt = [{"role": "user", "content": prompt}]
        completion = [{"role": "assistant", "content": completion}]
    if isinstance(prompt, list):
        tokens, prompt_len, uses_bos = _tokenize_chat(ex, prompt, completion, tokenizer, facts)
    else:
        tokens, prompt_len, uses_bos = _tokenize_text(ex, prompt, completion, tokenizer, facts)
    if uses_bos:
        _check_one_bos(ex, tokens, tokenizer, facts)
    if vocab_size is not None:
        bad = next((i for i, t in enumerate(tokens) if t >= vocab_size), None)
        if bad is not None:
            raise TokenizationError(
                f"{ex.id}: token {_show(tokenizer, tokens[bad])} at position {bad} is outside "
                f"the model's vocabulary of {vocab_size}; are the tokenizer and model from the same checkpoint?")
    return tokens, prompt_len


def _tokenize_chat(ex, prompt, completion, tokenizer, facts):
    try:
        prompt_text = tokenizer.apply_chat_template(prompt, tools=ex.tools, add_generation_prompt=True,
                                                    tokenize=False)
        full_text = tokenizer.apply_chat_template(prompt + completion, tools=ex.tools, tokenize=False)
    except Exception as e:  # a template is third-party Jinja code: any failure is about this row
        raise TokenizationError(f"{ex.id}: the chat template failed on this example ({type(e).__name__}: {e})") \
            from None
    starts_with_bos = bool(facts.bos_token) and full_text.startswith(facts.bos_token)
    add_special = facts.adds_bos and not starts_with_bos
    prompt_ids = tokenizer.encode(prompt_text, add_special_tokens=add_special)
    full_ids = tokenizer.encode(full_text, add_special_tokens=add_special)
    n = len(prompt_ids)
    if full_ids[:n] != prompt_ids:
        i = next((i for i, (a, b) in enumerate(zip(prompt_ids, full_ids)) if a != b), min(n, len(full_ids)))
        have = _show(tokenizer, full_ids[i]) if i < len(full_ids) else "the end"
        raise TokenizationError(
            f"{ex.id}: the prompt's tokens are not a prefix of prompt + completion tokens (first difference at "
            f"token {i}: prompt has {_show(tokenizer, prompt_ids[i])}, prompt + completion has {have}); the chat "
            "template renders the prompt differently when a reply follows, so the loss cannot be placed")
    ends = [i for i in range(n, len(full_ids)) if full_ids[i] in facts.end_ids]
    if ends:
        tokens = full_ids[: ends[-1] + 1]
    else:
        tokens = full_ids + [_eos(ex, facts)]
    return tokens, n, facts.adds_bos or starts_with_bos


def _tokenize_text(ex, prompt: str, completion: str, tokenizer, facts):
    bos = [facts.bos_id] if facts.adds_bos else []
    prompt_ids = bos + (tokenizer.encode(prompt, add_special_tokens=False) if prompt else [])
    completion_ids = tokenizer.encode(completion, add_special_tokens=False)
    eos = _eos(ex, facts)
    if not completion_ids or completion_ids[-1] != eos:
        completion_ids.append(eos)
    return prompt_ids + completion_ids, len(prompt_ids), facts.adds_bos


def _eos(ex: Example, facts: TokenizerFacts) -> int:
    if facts.eos_id is None:
        raise TokenizationError(f"{ex.id}: the tokenizer has no EOS token to end the completion with; "
                                "set eos_token in the model's tokenizer_config.json")
    return facts.eos_id


def _check_one_bos(ex: Example, tokens: list[int], tokenizer, facts: TokenizerFacts) -> None:
    bos = facts.bos_id
    if not tokens or tokens[0] != bos:
        raise TokenizationError(f"{ex.id}: expected the BOS token {facts.bos_token!r} at position 0, found "
                                f"{_show(tokenizer, tokens[0]) if tokens else 'nothing'}")
    # Where BOS doubles as EOS/end-of-turn (GPT-2 style), later occurrences are turn ends.
    extra = [i for i, t in enumerate(tokens) if t == bos and i > 0 and (bos not in facts.end_ids or i == 1)]
    if extra:
        why = ("the chat template writes BOS and the tokenizer adds another" if extra[0] == 1
               else "the text contains the BOS token")
        raise TokenizationError(f"{ex.id}: BOS {facts.bos_token!r} appears again at position {extra[0]} ({why}); "
                                "a model expects exactly one")


def _show(tokenizer, token_id: int) -> str:
    return f"{token_id} {tokenizer.decode([token_id])!r}"


def tokenize_dataset(examples: Sequence[Example], tokenizer, max_seq_len: int, truncation: str,
                     vocab_size: int) -> tuple[list[TokenizedExample], dict[str, Any]]:
    """Tokenise every example and fit it to `max_seq_len` tokens.

    An over-long example is cut from the left of its prompt (keeping BOS at
    position 0 and at least one prompt token) with truncation="left", or dropped
    with "drop". The completion is never cut: one too long to fit is dropped.
    Returns the kept examples and JSON-ready stats (counts of truncated and
    dropped examples, with the first few ids of each). Raises one
    `TokenizationError` listing up to MAX_REPORTED_PROBLEMS failing examples.
    """
    if truncation not in ("left", "drop"):
        raise ValueError(f"truncation must be 'left' or 'drop', not {truncation!r}")
    facts = TokenizerFacts.of(tokenizer)
    kept: list[TokenizedExample] = []
    errors: list[str] = []
    truncated: list[str] = []
    dropped: dict[str, list[str]] = {"too_long": [], "completion_too_long": []}
    n_tokens = n_supervised = longest = 0
    for ex in examples:
        try:
            tokens, prompt_len = tokenize_example(ex, tokenizer, vocab_size, facts)
        except TokenizationError as e:
            errors.append(str(e))
            continue
        if len(tokens) > max_seq_len:
            if truncation == "drop":
                dropped["too_long"].append(ex.id)
                continue
            cut = truncate_left(tokens, prompt_len, max_seq_len, n_keep=int(_starts_bos(tokens, facts)))
            if cut is None:
                dropped["completion_too_long"].append(ex.id)
                continue
            tokens, prompt_len = cut
            truncated.append(ex.id)
        kept.append(TokenizedExample(ex.id, np.asarray(tokens, dtype=np.int32), prompt_len))
        n_tokens += len(tokens)
        n_supervised += len(tokens) - max(prompt_len, 1)
        longest = max(longest, len(tokens))
    if errors:
        raise TokenizationError("\n".join(_capped(errors, lambda n: f"... and {n} more examples with problems")))
    stats = {
        "examples": len(examples),
        "kept": len(kept),
        "truncated": len(truncated),
        "dropped_too_long": len(dropped["too_long"]),
        "dropped_completion_too_long": len(dropped["completion_too_long"]),
        "tokens": n_tokens,
        "supervised_tokens": n_supervised,
        "longest": longest,
        "examples_truncated": truncated[:5],
        "examples_dropped": (dropped["too_long"] + dropped["completion_too_long"])[:5],
    }
    return kept, stats


def _starts_bos(tokens: list[int], facts: TokenizerFacts) -> bool:
    return facts.bos_id is not None and bool(tokens) and tokens[0] == facts.bos_id


def truncate_left(tokens: list[int], prompt_len: int, max_len: int, n_keep: int) -> tuple[list[int], int] | None:
    """Cut prompt tokens after the first `n_keep` (BOS) until `tokens` fits `max_len`.

    At least one prompt token after the kept ones must remain, so the first
    completion token is still predicted from some context; returns None when the
    completion is too long for that. Returns (tokens, new prompt_len).
    """
    excess = len(tokens) - max_len
    if excess <= 0:
        return tokens, prompt_len
    if prompt_len - n_keep - excess < 1:
        return None
    return tokens[:n_keep] + tokens[n_keep + excess:], prompt_len - excess


# --- 3. batching ----------------------------------------------------------------------------------

@dataclass
class Batch:
    """One micro-batch, [B, T] numpy arrays; T is the longest row rounded up to `pad_multiple`.

    `targets[b, t]` is the token after `tokens[b, t]` within the same example;
    `loss_mask` is 1 where that target is a completion token. `segment_ids`
    numbers the examples of a row 1..k and is 0 on padding; attention must stay
    within a segment. Positions are not reset per segment (exact for RoPE models).
    """

    tokens: np.ndarray  # int32
    targets: np.ndarray  # int32
    loss_mask: np.ndarray  # float32
    segment_ids: np.ndarray  # int32
    example_ids: list[str] = field(default_factory=list)
    n_supervised: int = 0


def pad_rows(batch: Batch, rows: int) -> Batch:
    """`batch` with empty rows (all padding, nothing supervised) added up to `rows` rows, so a
    compiled step sees one [B, T] shape even for an epoch's last, short batch."""
    extra = rows - batch.tokens.shape[0]
    if extra <= 0:
        return batch

    def grow(a: np.ndarray) -> np.ndarray:
        return np.concatenate([a, np.zeros((extra, a.shape[1]), a.dtype)])

    return Batch(grow(batch.tokens), grow(batch.targets), grow(batch.loss_mask), grow(batch.segment_ids),
                 list(batch.example_ids), batch.n_supervised)


def make_batches(examples: Sequence[TokenizedExample], batch_size: int, max_seq_len: int, packing: bool,
                 seed: int, epoch: int, pad_multiple: int = 8) -> list[Batch]:
    """All batches of one epoch, a pure function of the arguments.

    packing=True: first-fit-decreasing packing of examples into rows of
    `max_seq_len` positions (an example is never split), rows grouped in packing
    order into batches of `batch_size` rows. packing=False: examples sorted by
    length and cut into batches of `batch_size`, so each batch holds similar
    lengths. Either way ties in length are broken by a (seed, epoch) shuffle and
    the batch order is shuffled by (seed, epoch). The last batch may be smaller.
    Raises ValueError if an example does not fit `max_seq_len` (tokenise with
    the same limit).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if not examples:
        return []
    lengths = np.array([ex.n_positions for ex in examples])
    if lengths.max() > max_seq_len:
        i = int(lengths.argmax())
        raise ValueError(f"{examples[i].id}: {lengths[i]} positions exceed max_seq_len {max_seq_len}")
    rng = np.random.default_rng([seed, epoch])
    tiebreak = rng.permutation(len(examples))
    if packing:
        order = np.lexsort((tiebreak, -lengths))  # longest first
        rows = first_fit(lengths[order].tolist(), max_seq_len)
        rows = [[int(order[i]) for i in row] for row in rows]
    else:
        order = np.lexsort((tiebreak, lengths))
        rows = [[int(i)] for i in order]
    groups = [rows[i: i + batch_size] for i in range(0, len(rows), batch_size)]
    batches = [collate([[examples[i] for i in row] for row in group], pad_multiple, max_seq_len)
               for group in groups]
    return [batches[i] for i in rng.permutation(len(batches))]


def first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Put each item (in the given order) into the first row with room: indices per row.

    A max-tree over rows' free space finds that row in O(log n), so packing 100k
    examples takes a second rather than minutes.
    """
    n = len(lengths)
    size = 1 << max(n - 1, 0).bit_length()
    free = [0] * size + [capacity] * size  # leaves: free space per row (unopened rows are empty)
    for i in range(size - 1, 0, -1):
        free[i] = max(free[2 * i], free[2 * i + 1])
    rows: list[list[int]] = []
    for item, length in enumerate(lengths):
        if length > capacity:
            raise ValueError(f"item of length {length} exceeds capacity {capacity}")
        node = 1
        while node < size:
            node = 2 * node if free[2 * node] >= length else 2 * node + 1
        row = node - size
        if row == len(rows):
            rows.append([])
        rows[row].append(item)
        free[node] -= length
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return rows


def collate(rows: list[list[TokenizedExample]], pad_multiple: int = 8, max_len: int | None = None) -> Batch:
    """Lay rows of examples into padded [B, T] arrays (see `Batch`).

    T is the longest row rounded up to `pad_multiple`, but not past `max_len`
    (when given) unless the longest row itself is longer.
    """
    longest = max(sum(ex.n_positions for ex in row) for row in rows)
    width = -(-longest // pad_multiple) * pad_multiple
    if max_len is not None:
        width = max(longest, min(width, max_len))
    shape = (len(rows), width)
    tokens = np.zeros(shape, np.int32)
    targets = np.zeros(shape, np.int32)
    loss_mask = np.zeros(shape, np.float32)
    segment_ids = np.zeros(shape, np.int32)
    ids = []
    for b, row in enumerate(rows):
        start = 0
        for seg, ex in enumerate(row, 1):
            n = ex.n_positions
            end = start + n
            tokens[b, start:end] = ex.tokens[:-1]
            targets[b, start:end] = ex.tokens[1:]
            # Position j predicts token j+1, a completion token when j+1 >= prompt_len.
            loss_mask[b, start + max(ex.prompt_len - 1, 0): end] = 1.0
            segment_ids[b, start:end] = seg
            ids.append(ex.id)
            start = end
    return Batch(tokens, targets, loss_mask, segment_ids, ids, int(loss_mask.sum()))


def padding_fraction(batches: Sequence[Batch]) -> float:
    """Share of batch positions that are padding (wasted compute)."""
    total = sum(b.segment_ids.size for b in batches)
    real = sum(int((b.segment_ids > 0).sum()) for b in batches)
    return 1.0 - real / total if total else 0.0
