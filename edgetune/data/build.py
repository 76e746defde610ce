"""`edgetune data build`: feedback logs in, SFT/DPO/KTO datasets out.

The build decodes each line of the log once, in parallel (JSON decoding is
most of its cost), except the conversations that split-out feedback points
to, which are read again; it keeps in memory only an index the size of the
number of conversation ids:

1. Stage (workers, `stage.stage_chunk`): every record is validated;
   conversations with an inline signal and comparisons are curated, scrubbed
   and their rows staged on disk, encoded as they will be written (compact
   JSON, one row a line). Each worker returns its index entries, its
   split-out `feedback` records (few) and its problems.
2. Resolve (here): latest version wins (a repeated id: the later line);
   invalid records stop the build (nothing written, `--out` untouched)
   unless `--skip-invalid`; split-out feedback is joined by id.
3. Restage (workers, `stage.restage_conversations`): conversations that
   split-out feedback points to are read back by position and curated again
   with all their signals; their first-pass rows are set aside.
4. Merge (here, in log order): staged rows of the latest versions are
   de-duplicated (rule 7, first occurrence wins), counted for the report,
   SFT rows down-sampled per persona if asked, and the byte ranges of the
   rows kept copied from the staging files into the outputs (the only
   serial step: it reads the staging index, never a row).

Row order is log order (files as given, then lines, then messages); the
result does not depend on the number of workers. Same inputs in the same
order and the same options give byte-identical outputs.
"""

from __future__ import annotations

import bisect
import functools
import gc
import hashlib
import json
import multiprocessing
import os
import sys
import tempfile
import time
from array import array
from collections import Counter, defaultdict
from contextlib import contextmanager
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from hashlib import blake2b
from pathlib import Path
from typing import Callable, Iterable, Iterator

from edgetune.data import rules
from edgetune.data.records import FeedbackRecord
from edgetune.data.stage import (NO_PII, PII_KINDS, POSITION_BITS, Chunk, ChunkResult, parse_tally, read_staged,
                                 restage_conversations, stage_chunk, staging_index, staging_rows,
                                 staging_tallies)
from edgetune.errors import InputError, UserError
from edgetune.fileio import atomic_dir, sha256_file, write_json

FORMATS = ("v1", "langfuse", "langsmith", "openai")
REPORT_FORMAT = "edgetune.data-report/v1"
EXAMPLES = 50  # conflicts/orphans/invalid records named in report.json; all are counted
CHUNK_BYTES = 16 << 20  # smallest byte range worth a worker's start-up
WRITE_BLOCK = 1 << 20  # outputs are written in blocks of this size
PARALLEL_BYTES = 32 << 20  # below this much input, one process is faster than a pool


@dataclass(frozen=True)
class BuildOptions:
    """Everything that changes the outputs; recorded in report.json."""

    eval_fraction: float = 0.1
    seed: int = 0
    skip_invalid: bool = False
    correction_prompt: str = rules.SKIP_MISTAKE
    max_persona_share: float | None = None
    format: str = "v1"

    def check(self) -> None:
        """Raise UserError naming the option that is out of range."""
        if not 0 <= self.eval_fraction < 1:
            raise UserError(f"--eval-fraction {self.eval_fraction}: must be at least 0 and below 1")
        if self.correction_prompt not in rules.CORRECTION_PROMPTS:
            raise UserError(f"--correction-prompt {self.correction_prompt}: expected one of "
                            f"{', '.join(rules.CORRECTION_PROMPTS)}")
        if self.max_persona_share is not None and not 0 < self.max_persona_share <= 1:
            raise UserError(f"--max-persona-share {self.max_persona_share}: must be above 0 and at most 1")
        if self.format not in FORMATS:
            raise UserError(f"--format {self.format}: expected one of {', '.join(FORMATS)}")


# --- planning and running the workers ------------------------------------------------

def _without_gc(fn: Callable) -> Callable:
    """`fn`, run with the cyclic garbage collector paused (collected once when it is done).

    A build's objects (index entries, rows, tallies) hold no reference
    cycles, and reference counting frees them as they go; but there are
    millions, and the collector's passes over the ones kept (the index a
    build holds, the entries each chunk returns) took a fifth of a build's
    CPU time: 44 -> 35 us per event on the 1M-event benchmark without them.
    The worker processes run with it off for their whole life (one build).
    """
    @functools.wraps(fn)
    def paused(*args, **kwargs):
        if not gc.isenabled():
            return fn(*args, **kwargs)
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            gc.enable()
            gc.collect()  # whatever cycle was made meanwhile (an exception's traceback)

    return paused


def default_jobs() -> int:
    """Worker processes: the CPUs this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def plan_chunks(paths: list[Path], fmt: str, jobs: int) -> list[Chunk]:
    """Cut the inputs into units of work, in log order.

    Plain v1 files split into byte ranges (a few per worker, for balance); a
    `.gz` file or an imported format cannot be entered mid-way, so it is one chunk.
    """
    chunks: list[Chunk] = []
    for fi, path in enumerate(paths):
        if fmt != "v1" or str(path).endswith(".gz"):
            chunks.append(Chunk(len(chunks), fi, str(path), "jsonl" if fmt == "v1" else fmt))
            continue
        size = _size(path)
        if size >= 1 << POSITION_BITS:
            raise UserError(f"{path}: larger than 1 TiB; split it into several files")
        n = max(1, min(4 * jobs, size // CHUNK_BYTES))
        chunks += [Chunk(len(chunks) + k, fi, str(path), "lines", size * k // n, size * (k + 1) // n)
                   for k in range(n)]
    return chunks


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as e:
        raise UserError(f"{path}: cannot open ({e.strerror or e})") from None


@contextmanager
def _workers(jobs: int) -> Iterator[ProcessPoolExecutor | None]:
    """The worker processes of one build or scan (None for `jobs` 1: everything runs here).

    One pool serves every parallel step: its workers start once (when the
    first step starts, so a forked one inherits little of this process) and
    keep their memory from step to step, where new memory costs the kernel
    more than reused memory (see `_write_ranges`).
    """
    if jobs <= 1:
        yield None
        return
    # fork: workers start in milliseconds and inherit the imports; macOS only supports spawn safely.
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    # (gc off in the workers: see `_without_gc`)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=gc.disable) as pool:
        yield pool


def _run(fn: Callable, calls: list[tuple], pool: ProcessPoolExecutor | None) -> Iterator:
    """`fn(*args) for args in calls`, in the worker processes of `pool` if there is one: the
    results in order, each as soon as it is there (so the caller can take in the first ones
    while the workers make the others)."""
    if pool is None or len(calls) <= 1:
        return (fn(*args) for args in calls)
    return pool.map(fn, *zip(*calls))


def _resolve_jobs(paths: list[Path], jobs: int | None) -> int:
    if jobs is not None:
        return max(1, jobs)
    total = sum(_size(p) for p in paths)
    return default_jobs() if total >= PARALLEL_BYTES else 1


# --- pass 1 and the index --------------------------------------------------------------

@dataclass
class Scan:
    """What the first pass learnt about the log (latest version wins)."""

    paths: list[Path]
    chunks: list[Chunk]
    conversations: dict[str, tuple[int, int]] = field(default_factory=dict)  # id -> (position, unused)
    comparisons: dict[str, int] = field(default_factory=dict)  # id -> position
    superseded: set[int] = field(default_factory=set)  # positions of replaced versions
    feedback: dict[str, list[tuple[tuple[int, int], FeedbackRecord]]] = field(
        default_factory=lambda: defaultdict(list))  # conversation id -> [((file index, line), record)]
    problems: list[tuple[str, int, str]] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)


def _combine(paths: list[Path], chunks: list[Chunk], results: Iterable[ChunkResult],
             taken: Callable[[Chunk, ChunkResult], None] = lambda chunk, res: None) -> Scan:
    """Merge the chunks' findings in log order: absolute line numbers, latest versions.

    `results` may be an iterator that the workers are still filling: each chunk is taken in while
    the later ones are being read, rather than all of them once the last is done (and `taken` is
    told, for progress)."""
    scan = Scan(paths, chunks)
    lines_before: Counter = Counter()  # file index -> lines in its earlier chunks
    for chunk, res in zip(chunks, results):
        taken(chunk, res)
        offset = lines_before[chunk.file_index]
        lines_before[chunk.file_index] += res.lines
        scan.counts += res.counts
        scan.problems += [(chunk.path, line + offset, why) for line, why in res.problems]
        for cid, pos, unused in res.conversations:
            earlier = scan.conversations.get(cid)
            if earlier is not None:
                scan.superseded.add(earlier[0])
                scan.counts["superseded_conversations"] += 1
            scan.conversations[cid] = (pos, unused)
        for xid, pos in res.comparisons:
            earlier = scan.comparisons.get(xid)
            if earlier is not None:
                scan.superseded.add(earlier)
                scan.counts["superseded_comparisons"] += 1
            scan.comparisons[xid] = pos
        for line, rec in res.feedback:
            scan.feedback[rec.conversation_id].append(((chunk.file_index, line + offset), rec))
    return scan


@_without_gc
def scan_logs(paths: list[Path], fmt: str = "v1", jobs: int | None = None) -> Scan:
    """Check every record of `paths` without building (for `edgetune data validate`)."""
    jobs = _resolve_jobs(paths, jobs)
    chunks = plan_chunks(paths, fmt, jobs)
    options = BuildOptions(format=fmt)
    with _workers(min(jobs, len(chunks))) as pool:
        return _combine(paths, chunks, _run(stage_chunk, [(c, options, None) for c in chunks], pool))


# --- the build -------------------------------------------------------------------------

@_without_gc
def build(paths: list[Path], out: str | Path, options: BuildOptions = BuildOptions(), force: bool = False,
          jobs: int | None = None, progress: Callable[[str], None] = lambda message: None) -> dict:
    """Build the datasets of `paths` into `out`; return the report (also written as report.json).

    Raises InputError listing every invalid record (unless `skip_invalid`;
    nothing is written then and `out` is not touched), UserError for an
    existing `out` without `force`, an unreadable input or an unmeetable
    persona cap. `jobs`: worker processes (default: one per CPU for inputs
    over 32 MiB, else 1); it does not change the outputs.
    """
    options.check()
    out = Path(out)
    if out.exists() and not force:  # checked before the long read; atomic_dir checks again
        raise UserError(f"{out}: already exists; choose another --out or pass --force to replace it")
    jobs = _resolve_jobs(paths, jobs)
    chunks = plan_chunks(paths, options.format, jobs)
    # Staged rows live beside the output (same disk, so no surprise on a small /tmp), in a
    # hidden folder that is removed whatever happens.
    stage_dir = out.parent if out.parent.is_dir() else None
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.staging-", dir=stage_dir) as staging, \
            ThreadPoolExecutor(max_workers=1) as background, _workers(min(jobs, len(chunks))) as pool:
        # Input hashes (provenance) are a full extra read: done by a thread while the workers
        # parse (hashlib releases the GIL), not after them.
        input_hashes = background.submit(_sha256_files, paths)
        progress(f"reading {len(paths)} file(s) in {len(chunks)} chunk(s) with {min(jobs, len(chunks))} worker(s)")
        scan = _combine(paths, chunks, _run(stage_chunk, [(c, options, staging) for c in chunks], pool),
                        _reading_progress(chunks, progress) if len(chunks) > 1 else lambda chunk, res: None)
        if scan.problems and not options.skip_invalid:
            raise InputError(scan.problems)

        requests, orphans = _plan_restaging(scan)
        progress(f"joining split-out feedback to {sum(len(r) for r in requests.values())} conversation(s)")
        calls = [(c, requests[c.index], options, staging) for c in chunks if c.index in requests]
        restaged = list(_run(restage_conversations, calls, pool))
        recurated = {pos for reqs in requests.values() for pos, _ in reqs}
        unused = sum(u for pos, u in scan.conversations.values() if pos not in recurated)
        for lost, recurated_unused in restaged:
            orphans += lost
            unused += sum(recurated_unused.values())
        # First-pass rows that do not count: replaced versions, and conversations curated again.
        set_aside = scan.superseded | recurated

        with atomic_dir(out, replace=force) as folder:
            progress("writing outputs")
            # Each output is merged on its own (duplicates are per output), so the merge runs in
            # the workers too; the tallies are summed by a fourth unit. Largest output first.
            units = ["kto", "sft", "dpo", TALLIES]
            restaged_chunks = set(requests)
            calls = [(unit, chunks, restaged_chunks, set_aside, staging, str(folder), options) for unit in units]
            merged = Merged.total(list(_run(merge_unit, calls, pool)))
            report = _report(scan, options, merged, unused, orphans, input_hashes.result())
            write_json(folder / "report.json", report)
    return report


def _reading_progress(chunks: list[Chunk], progress: Callable[[str], None]) -> Callable[[Chunk, ChunkResult], None]:
    """What `_combine` tells as each chunk is taken in: chunks and bytes read, records/s, time left
    (the bytes of the log are the measure of work: chunks are byte ranges, or whole files)."""
    sizes = [c.end - c.start if c.reader == "lines" else _size(Path(c.path)) for c in chunks]
    total, start = sum(sizes) or 1, time.perf_counter()
    done = {"chunks": 0, "bytes": 0, "records": 0}

    def taken(chunk: Chunk, res: ChunkResult) -> None:
        done["chunks"] += 1
        done["bytes"] += sizes[chunk.index]
        done["records"] += res.counts["records"]
        seconds = time.perf_counter() - start
        left = seconds * (total - done["bytes"]) / max(done["bytes"], 1)
        progress(f"  read {done['chunks']}/{len(chunks)} chunks ({done['bytes'] / 2**20:,.0f} of "
                 f"{total / 2**20:,.0f} MiB): {done['records']:,} records, {done['records'] / seconds:,.0f}/s"
                 + (f", about {left:.0f} s left to read" if left >= 1 else ""))

    return taken


def _plan_restaging(scan: Scan) -> tuple[dict[int, list], list]:
    """Per chunk index, `(position, [(where, record)])` of the latest conversations that
    split-out feedback points to, by position; and the orphans of unknown conversations."""
    starts = [(c.file_index << POSITION_BITS) | c.start for c in scan.chunks]
    requests: dict[int, list] = defaultdict(list)
    orphans = []
    for cid, items in scan.feedback.items():
        entry = scan.conversations.get(cid)
        if entry is None:
            orphans += [(where, rec, "unknown_conversation") for where, rec in items]
            continue
        chunk_index = bisect.bisect_right(starts, entry[0]) - 1  # the chunk whose range holds the position
        requests[chunk_index].append((entry[0], items))
    for reqs in requests.values():
        reqs.sort(key=lambda r: r[0])
    return dict(requests), orphans


# --- merging staged rows into the outputs -----------------------------------------------

TALLIES = "tallies"  # the unit of merge work that sums the records' tallies (the others are outputs)


@dataclass
class Merged:
    """What merging found, for the report; each unit of merge work fills its part."""

    signals: Counter = field(default_factory=Counter)  # rule -> signals seen
    drops: Counter = field(default_factory=Counter)  # reason -> rows not made or not written
    conflicts: list[list[str]] = field(default_factory=list)  # the first EXAMPLES [conversation id, message id]
    n_conflicts: int = 0
    written: Counter = field(default_factory=Counter)  # (rule, output) -> rows
    personas: dict[tuple[str, str], Counter] = field(
        default_factory=lambda: defaultdict(Counter))  # (split, output) -> persona -> rows
    pii: Counter = field(default_factory=Counter)  # kind -> placeholders in the written rows
    hashes: dict[tuple[str, str], str] = field(default_factory=dict)  # (split, output) -> sha256 of its file

    @staticmethod
    def total(parts: list[Merged]) -> Merged:
        """The parts of every unit, summed."""
        out = Merged()
        for part in parts:
            out.signals += part.signals
            out.drops += part.drops
            out.conflicts += part.conflicts
            out.n_conflicts += part.n_conflicts
            out.written += part.written
            for key, personas in part.personas.items():
                out.personas[key] += personas
            out.pii.update(part.pii)
            out.hashes.update(part.hashes)
        return out


def merge_unit(unit: str, chunks: list[Chunk], restaged: set[int], set_aside: set[int], staging: str,
               folder: str, options: BuildOptions) -> Merged:
    """One unit of the merge (a worker entry point): the rows of one output, or the tallies.

    Reads the staged files of every chunk in log order: the first pass's,
    but for the records `set_aside` (replaced versions, and conversations
    curated again), and those of the conversations curated again
    (`restaged`: the chunks that have them), at their own positions.
    """
    if unit == TALLIES:
        return _merge_tallies(chunks, restaged, set_aside, staging)
    merge = _OutputMerge(unit, options)
    add = merge.add
    for chunk in chunks:
        first = merge.source(staging, chunk, "a")
        again = merge.source(staging, chunk, "b") if chunk.index in restaged else None
        for first_pass, pos, fields in _in_log_order(first.index, again.index if again else None):
            if first_pass:
                add(first, fields, pos not in set_aside)
            else:
                add(again, fields, True)
        for source in (first, again):  # read once, by this unit only: freed now (see `_write_ranges`)
            if source is not None:
                os.unlink(source.index)
    merge.write(Path(folder))
    return merge.merged


def _merge_tallies(chunks: list[Chunk], restaged: set[int], set_aside: set[int], staging: str) -> Merged:
    merged = Merged()
    signals, drops = merged.signals, merged.drops
    # Most records' tallies are one of a few strings ({"signals":{"thumbs_up":1},...}): each
    # distinct one is decoded once, at the end, and counted as often as it came. A tally that
    # names conflicts is decoded in log order, for the examples.
    alike: Counter = Counter()
    for chunk in chunks:
        again = staging_tallies(staging, chunk, "b") if chunk.index in restaged else None
        for first_pass, pos, tally in _in_log_order(staging_tallies(staging, chunk, "a"), again):
            if first_pass and pos in set_aside:
                continue
            if tally.endswith(_NO_CONFLICTS):
                alike[tally] += 1
                continue
            conflicts = parse_tally(tally)["conflicts"]
            merged.n_conflicts += len(conflicts)
            merged.conflicts += conflicts[:EXAMPLES - len(merged.conflicts)]
            alike[tally] += 1  # its signals and drops
    for tally, times in alike.items():
        tally = parse_tally(tally)
        for rule, n in tally["signals"].items():  # a loop: Counter.update checks its argument's type
            signals[rule] += n * times
        for reason, n in tally["drops"].items():
            drops[reason] += n * times
    return merged


_NO_CONFLICTS = '"conflicts":[]}\n'  # how a staged tally without conflicts ends (stage.stage_rows)


def _in_log_order(first: Path, again: Path | None) -> Iterator[tuple[bool, int, str]]:
    """`(first pass?, position, rest of the line)` of a chunk's staged files, by position: the
    first pass's (many lines) and those of its conversations curated again (few)."""
    pending = list(read_staged(again)) if again else []
    pending.append((1 << 64, ""))  # after every position: ends the inner loop without a length check
    k, next_pos = 0, pending[0][0]
    with open(first, encoding="utf-8") as f:  # `read_staged`, inline: a generator per line costs a tenth
        for line in f:
            pos, rest = line.split("\t", 1)
            pos = int(pos)
            while next_pos <= pos:
                yield False, next_pos, pending[k][1]
                k += 1
                next_pos = pending[k][0]
            yield True, pos, rest
    for item in pending[k:-1]:
        yield False, *item


class _RowSource:
    """The staged rows of one output, chunk and phase, and how far the merge has read into them."""

    def __init__(self, folder: str, chunk: Chunk, phase: str, output: str, number: int):
        self.index = staging_index(folder, chunk, phase, output)
        self.files = {split: staging_rows(folder, chunk, phase, split, output) for split in rules.SPLITS}
        self.number = number  # rank among the output's sources, so a range of rows is `[number, start, end]`
        self.offsets = dict.fromkeys(rules.SPLITS, 0)


class _OutputMerge:
    """Gathers the staged rows of one output into its two files (train, eval), in log order.

    Drops duplicates (rule 7: the same example after whitespace
    normalisation, first occurrence kept) and counts what is written. Rows
    are not read: the staged rows files already hold them as they will be
    written, so the merge only notes which byte ranges of them to keep, and
    `write` copies those ranges (and hashes them for the report). With a
    persona cap, the train SFT rows are noted one by one, so that `write`
    can down-sample them once every row is known. The eval split keeps the
    log's own persona mix: it measures the model on the traffic it will serve.

    Per row it only splits off the fields it needs, and counts rows by the
    rest ("rule, persona, PII"), decoded once per distinct value in `write`.
    """

    def __init__(self, output: str, options: BuildOptions):
        self.output = output
        self.options = options
        self.capped = options.max_persona_share is not None and output == "sft"
        self.sources: list[_RowSource] = []
        self.ranges: dict[str, list[list[int]]] = {split: [] for split in rules.SPLITS}  # [[source, start, end]]
        self.seen: set[bytes] = set()  # 16-byte dedup digests
        self.duplicate = f"duplicate_{output}"  # the drop reason of a duplicate row
        self.kept: Counter = Counter()  # (split, "rule\tpersona\tPII\n") -> rows written
        self.merged = Merged()
        # For the persona cap, in log order, per train SFT row: its fields, sampling key, range.
        self.sft_rows: list[str] = []
        self.sft_keys = array("Q")
        self.sft_ranges = array("Q")

    def source(self, folder: str, chunk: Chunk, phase: str) -> _RowSource:
        """The staged rows of `chunk` and `phase`, to pass to `add`."""
        source = _RowSource(folder, chunk, phase, self.output, len(self.sources))
        self.sources.append(source)
        return source

    def add(self, source: _RowSource, fields: str, counts: bool) -> None:
        """One staged row (its index fields after the position); `counts`: False for the rows of a
        record that does not count (a replaced version, or one curated again)."""
        split, key_hex, size, fields = fields.split("\t", 3)
        offsets = source.offsets
        start = offsets[split]
        end = offsets[split] = start + int(size)
        if not counts:
            return
        key = bytes.fromhex(key_hex)
        seen = self.seen
        if key in seen:
            self.merged.drops[self.duplicate] += 1
            return
        seen.add(key)
        if self.capped and split == "train":
            self.sft_rows.append(fields)
            seeded = blake2b(key, digest_size=8, key=str(self.options.seed).encode()).digest()
            self.sft_keys.append(int.from_bytes(seeded, "big"))
            self.sft_ranges.extend((source.number, start, end))
            return
        self.kept[split, fields] += 1
        ranges = self.ranges[split]
        last = ranges[-1] if ranges else None
        if last is not None and last[0] == source.number and last[2] == start:
            last[2] = end  # the row right after the last one kept: one range
        else:
            ranges.append([source.number, start, end])

    def write(self, folder: Path) -> None:
        """Write the output's two files into `folder`, applying the persona cap to the train SFT rows."""
        if self.capped:
            self._cap_train_sft()
        output, merged = self.output, self.merged
        personas: dict[str, str] = {}  # staged JSON -> name
        for (split, fields), n in self.kept.items():
            rule, persona_json, pii = fields.rstrip("\n").split("\t")
            persona = personas.get(persona_json) or personas.setdefault(persona_json, json.loads(persona_json))
            merged.written[rule, output] += n
            merged.personas[split, output][persona] += n
            if pii != NO_PII:
                for kind, count in zip(PII_KINDS, map(int, pii.split(","))):
                    merged.pii[kind] += n * count
        for split, ranges in self.ranges.items():
            path = folder / split / f"{output}.jsonl"
            path.parent.mkdir(exist_ok=True)
            # Each staged rows file is read by this merge alone: it goes as soon as it is copied, so
            # that the output's pages reuse its memory (see `_write_ranges`).
            merged.hashes[split, output] = _write_ranges([source.files[split] for source in self.sources], ranges,
                                                         path, discard=True)

    def _cap_train_sft(self) -> None:
        rows, keys = self.sft_rows, self.sft_keys
        persona_of = [json.loads(fields.split("\t", 2)[1]) for fields in rows]
        counts = Counter(persona_of)
        keep = rules.persona_keep_counts(counts, self.options.max_persona_share)
        if counts and not any(keep.values()):
            raise UserError(
                f"--max-persona-share {self.options.max_persona_share}: train/sft has only the "
                f"persona(s) {', '.join(sorted(counts))} and no untagged rows, so the cap would drop every "
                f"row; raise it to at least {1 / len(counts):.3g} or leave it out")
        # Keep each capped persona's rows with the smallest seeded keys: a sample
        # that depends on the rows' content and the seed, not on their order.
        limit = {}
        for persona, n in keep.items():
            if n < counts[persona]:
                ordered = sorted(keys[i] for i, p in enumerate(persona_of) if p == persona)
                limit[persona] = ordered[n - 1] if n else -1
        kept: Counter = Counter()
        ranges = self.ranges["train"]
        for i, (persona, fields) in enumerate(zip(persona_of, rows)):
            if persona not in limit or (keys[i] <= limit[persona] and kept[persona] < keep[persona]):
                kept[persona] += 1
                self.kept["train", fields] += 1
                ranges.append(self.sft_ranges[3 * i: 3 * i + 3].tolist())
            else:
                self.merged.drops["persona_cap"] += 1


def _write_ranges(files: list[Path], ranges: list[list[int]], dst: Path, discard: bool = False) -> str:
    """Write `dst` as the byte ranges `[file number, start, end]` of `files`, in order; return its sha256.

    Each range is read once, and hashed and written from the same buffer:
    `os.copy_file_range` would copy in the kernel, but the report's hash
    would then read the file back, and its per-call cost dominates on the
    many small ranges left between duplicates and replaced records.

    With `discard`, each file is deleted once its last range is copied (and
    every file at the end). Staged rows are as large as the outputs: freed
    early, their page-cache memory is what the output's pages are made of,
    where new memory would cost the kernel several times more (on the
    build machine's VM, a fresh page costs more system time than copying it).
    """
    digest = hashlib.sha256()
    handles: dict[int, int] = {}
    last_use = {number: i for i, (number, _, _) in enumerate(ranges)} if discard else {}
    try:
        with open(dst, "wb", buffering=WRITE_BLOCK) as out:
            for i, (number, start, end) in enumerate(ranges):
                fd = handles.get(number)
                if fd is None:
                    fd = handles[number] = os.open(files[number], os.O_RDONLY)
                while start < end:
                    block = os.pread(fd, min(end - start, WRITE_BLOCK), start)
                    if not block:
                        raise UserError(f"{files[number]}: a staging file was cut short; run the build again")
                    digest.update(block)
                    out.write(block)
                    start += len(block)
                if last_use.get(number) == i:
                    os.close(handles.pop(number))
                    os.unlink(files[number])
    finally:
        for fd in handles.values():
            os.close(fd)
    if discard:
        for number, path in enumerate(files):
            if number not in last_use:
                os.unlink(path)  # nothing of it kept
    return digest.hexdigest()


# --- the report --------------------------------------------------------------------------

def _sha256_files(paths: list[Path]) -> list[str]:
    """sha256 of each file, several at once (hashlib releases the GIL on large blocks)."""
    with ThreadPoolExecutor(max_workers=min(len(paths), default_jobs()) or 1) as pool:
        return list(pool.map(sha256_file, paths))


def _report(scan: Scan, options: BuildOptions, merged: Merged, unused: int, orphans: list,
            input_hashes: list[str]) -> dict:
    """The report.json dict (rendered by `report.py`); deterministic: no clock, no temp paths."""
    drops = Counter(merged.drops)
    if scan.counts["invalid"]:
        drops["invalid_record"] = scan.counts["invalid"]
    per_output: dict[str, dict] = {}
    warnings = []
    for split in rules.SPLITS:
        per_output[split] = {}
        for output in rules.OUTPUTS:
            personas = merged.personas[split, output]
            rows = sum(personas.values())
            shares = {p: {"rows": n, "share": round(n / rows, 4)}
                      for p, n in sorted(personas.items(), key=lambda kv: (-kv[1], kv[0]))}
            per_output[split][output] = {"rows": rows, "sha256": merged.hashes[split, output], "personas": shares}
            for p, n in personas.items():
                if p != rules.UNTAGGED and n * 2 > rows:
                    warnings.append(f"{split}/{output}: persona {p!r} is {n / rows:.0%} of the rows "
                                    f"({n} of {rows}); consider --max-persona-share")
    orphans = sorted(orphans, key=lambda o: o[0])  # log order: (file index, line)
    counts = scan.counts
    return {
        "format": REPORT_FORMAT,
        "inputs": [{"path": str(p), "sha256": h} for p, h in zip(scan.paths, input_hashes)],
        "options": asdict(options),
        "records": {"read": counts["records"], "invalid": counts["invalid"],
                    **{k: counts[k] for k in ("conversation", "feedback", "comparison")},
                    "superseded_conversations": counts["superseded_conversations"],
                    "superseded_comparisons": counts["superseded_comparisons"]},
        "invalid_examples": [f"{f}:{line}: {why}" for f, line, why in scan.problems[:EXAMPLES]],
        "rules": {rule: {"in": merged.signals[rule], **{o: merged.written[rule, o] for o in rules.OUTPUTS}}
                  for rule in rules.RULES},
        "unused_assistant_messages": unused,
        "drops": dict(sorted((+drops).items())),
        "conflicts": {"count": merged.n_conflicts,
                      "examples": [{"conversation_id": c, "message_id": m} for c, m in merged.conflicts]},
        "orphans": {"count": len(orphans), "by_reason": dict(sorted(Counter(o[2] for o in orphans).items())),
                    "examples": [{"file": str(scan.paths[fi]), "line": line, "conversation_id": rec.conversation_id,
                                  "message_id": rec.message_id, "reason": why}
                                 for (fi, line), rec, why in orphans[:EXAMPLES]]},
        "pii_redactions": {k: merged.pii[k] for k in PII_KINDS},
        "outputs": per_output,
        "warnings": warnings,
    }
