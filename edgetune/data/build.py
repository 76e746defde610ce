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
import gc
import heapq
import json
import multiprocessing
import os
import sys
import tempfile
from array import array
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from hashlib import blake2b
from pathlib import Path
from typing import Callable

from edgetune.data import rules
from edgetune.data.records import FeedbackRecord
from edgetune.data.stage import (NO_PII, PII_KINDS, POSITION_BITS, Chunk, ChunkResult, parse_tally, read_staged,
                                 restage_conversations, stage_chunk, staging_index, staging_rows)
from edgetune.errors import InputError, UserError
from edgetune.fileio import atomic_dir, sha256_file, write_json

FORMATS = ("v1", "langfuse", "langsmith", "openai")
REPORT_FORMAT = "edgetune.data-report/v1"
EXAMPLES = 50  # conflicts/orphans/invalid records named in report.json; all are counted
CHUNK_BYTES = 16 << 20  # smallest byte range worth a worker's start-up
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


def _run(fn: Callable, calls: list[tuple], jobs: int) -> list:
    """`[fn(*args) for args in calls]`, in worker processes when `jobs` > 1."""
    if jobs <= 1 or len(calls) <= 1:
        return [fn(*args) for args in calls]
    # fork: workers start in milliseconds and inherit the imports; macOS only supports spawn safely.
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    # Forked workers share the parent's pages (the id index: hundreds of MB on big logs) until
    # they write to them; a garbage collection in a worker would visit, and so copy, every
    # inherited object. Frozen objects are never visited.
    gc.freeze()
    try:
        with ProcessPoolExecutor(max_workers=min(jobs, len(calls)), mp_context=context) as pool:
            return list(pool.map(fn, *zip(*calls)))
    finally:
        gc.unfreeze()


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


def _combine(paths: list[Path], chunks: list[Chunk], results: list[ChunkResult]) -> Scan:
    """Merge the chunks' findings in log order: absolute line numbers, latest versions."""
    scan = Scan(paths, chunks)
    lines_before: Counter = Counter()  # file index -> lines in its earlier chunks
    for chunk, res in zip(chunks, results):
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


def scan_logs(paths: list[Path], fmt: str = "v1", jobs: int | None = None) -> Scan:
    """Check every record of `paths` without building (for `edgetune data validate`)."""
    jobs = _resolve_jobs(paths, jobs)
    chunks = plan_chunks(paths, fmt, jobs)
    options = BuildOptions(format=fmt)
    return _combine(paths, chunks, _run(stage_chunk, [(c, options, None) for c in chunks], jobs))


# --- the build -------------------------------------------------------------------------

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
            ThreadPoolExecutor(max_workers=1) as background:
        # Input hashes (provenance) are a full extra read: done by a thread while the workers
        # parse (hashlib releases the GIL), not after them.
        input_hashes = background.submit(_sha256_files, paths)
        progress(f"reading {len(paths)} file(s) in {len(chunks)} chunk(s) with {min(jobs, len(chunks))} worker(s)")
        scan = _combine(paths, chunks, _run(stage_chunk, [(c, options, staging) for c in chunks], jobs))
        if scan.problems and not options.skip_invalid:
            raise InputError(scan.problems)

        requests, orphans = _plan_restaging(scan)
        progress(f"joining split-out feedback to {sum(len(r) for r in requests.values())} conversation(s)")
        calls = [(c, requests[c.index], options, staging) for c in chunks if c.index in requests]
        restaged = _run(restage_conversations, calls, jobs)
        recurated = {pos for reqs in requests.values() for pos, _ in reqs}
        unused = sum(u for pos, u in scan.conversations.values() if pos not in recurated)
        for lost, recurated_unused in restaged:
            orphans += lost
            unused += sum(recurated_unused.values())
        # First-pass rows that do not count: replaced versions, and conversations curated again.
        set_aside = scan.superseded | recurated

        with atomic_dir(out, replace=force) as folder:
            progress("writing outputs")
            merge = _Merge(options)
            for chunk in chunks:
                first = merge.source(staging, chunk, "a")
                records = [((pos, tally, rows, first) for pos, tally, rows in read_staged(first.index))]
                if chunk.index in requests:
                    again = merge.source(staging, chunk, "b")
                    records.append((pos, tally, rows, again) for pos, tally, rows in read_staged(again.index))
                for pos, tally, rows, source in heapq.merge(*records, key=lambda record: record[0]):
                    if source is first and pos in set_aside:
                        merge.skip(source, rows)
                    else:
                        merge.add(source, tally, rows)
            merge.write(folder)
            report = _report(scan, folder, options, merge, unused, orphans, input_hashes.result())
            write_json(folder / "report.json", report)
    return report


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

class _RowSource:
    """The staged rows of one chunk and phase, and how far the merge has read into each rows file."""

    def __init__(self, folder: str, chunk: Chunk, phase: str, number: int):
        self.index = staging_index(folder, chunk, phase)
        self.files = {(s, o): staging_rows(folder, chunk, phase, s, o) for s in rules.SPLITS for o in rules.OUTPUTS}
        self.number = number  # rank among all sources, so a range of rows is `(number, start, end)`
        self.offsets = dict.fromkeys(self.files, 0)


class _Merge:
    """Gathers the staged rows of the latest versions into the six outputs, in log order.

    Drops duplicates (rule 7: the same example after whitespace
    normalisation, first occurrence kept) and sums the report's counts.
    Rows are not read: the staged rows files already hold them as they will
    be written, so the merge only notes which byte ranges of them to keep,
    and `write` copies those ranges (in the kernel, where it can). With a
    persona cap, the train SFT rows are noted one by one, so that `write`
    can down-sample them once every row is known. The eval split keeps the
    log's own persona mix: it measures the model on the traffic it will serve.

    The merge is the one serial step after the workers: per row it only
    splits off the fields it needs, and counts rows by their remaining index
    fields ("rule, persona, PII"), decoded once per distinct value in `write`.
    """

    def __init__(self, options: BuildOptions):
        self.options = options
        self.capped = options.max_persona_share is not None
        self.sources: list[_RowSource] = []
        self.ranges: dict[tuple[str, str], list[list[int]]] = {  # (split, output) -> [[source, start, end]]
            (s, o): [] for s in rules.SPLITS for o in rules.OUTPUTS}
        self.seen: dict[str, set[bytes]] = {o: set() for o in rules.OUTPUTS}  # 16-byte dedup digests
        self.kept: dict[tuple[str, str, str], int] = {}  # (split, output, "rule\tpersona\tPII\n") -> rows
        self.signals: Counter = Counter()
        self.drops: Counter = Counter()
        self.conflicts: list[list[str]] = []
        self.n_conflicts = 0
        # Made by `write` from `kept`:
        self.pii: Counter = Counter()
        self.written: Counter = Counter()  # (rule, output) -> rows
        self.personas: dict[tuple[str, str], Counter] = defaultdict(Counter)  # (split, output) -> persona -> rows
        # For the persona cap, in log order, per train SFT row: its fields, sampling key, range.
        self.sft_rows: list[str] = []
        self.sft_keys = array("Q")
        self.sft_ranges = array("Q")  # source, start, end of each row

    def source(self, folder: str, chunk: Chunk, phase: str) -> _RowSource:
        """The staged rows of `chunk` and `phase`, to pass to `add` and `skip`."""
        source = _RowSource(folder, chunk, phase, len(self.sources))
        self.sources.append(source)
        return source

    def skip(self, source: _RowSource, rows: list[str]) -> None:
        """A staged record that does not count (a replaced version, or one curated again)."""
        offsets = source.offsets
        for line in rows:
            output, split, _, size, _ = line.split("\t", 4)
            offsets[split, output] += int(size)

    def add(self, source: _RowSource, tally: str, rows: list[str]) -> None:
        """One staged record: its tallies and its rows."""
        tally = parse_tally(tally)
        for rule, n in tally["signals"].items():
            self.signals[rule] += n
        for reason, n in tally["drops"].items():
            self.drops[reason] += n
        if tally["conflicts"]:
            self.n_conflicts += len(tally["conflicts"])
            self.conflicts += tally["conflicts"][:EXAMPLES - len(self.conflicts)]
        offsets, kept = source.offsets, self.kept
        for line in rows:
            output, split, key_hex, size, fields = line.split("\t", 4)
            start = offsets[split, output]
            end = offsets[split, output] = start + int(size)
            key = bytes.fromhex(key_hex)
            seen = self.seen[output]
            if key in seen:
                self.drops[f"duplicate_{output}"] += 1
                continue
            seen.add(key)
            if self.capped and output == "sft" and split == "train":
                self.sft_rows.append(fields)
                seeded = blake2b(key, digest_size=8, key=str(self.options.seed).encode()).digest()
                self.sft_keys.append(int.from_bytes(seeded, "big"))
                self.sft_ranges.extend((source.number, start, end))
                continue
            kept[split, output, fields] = kept.get((split, output, fields), 0) + 1
            ranges = self.ranges[split, output]
            last = ranges[-1] if ranges else None
            if last is not None and last[0] == source.number and last[2] == start:
                last[2] = end  # the row right after the last one kept: one range
            else:
                ranges.append([source.number, start, end])

    def write(self, folder: Path) -> None:
        """Write the six outputs into `folder`, applying the persona cap to the train SFT rows."""
        if self.capped:
            self._cap_train_sft()
        personas: dict[str, str] = {}  # staged JSON -> name
        for (split, output, fields), n in self.kept.items():
            rule, persona_json, pii = fields.rstrip("\n").split("\t")
            persona = personas.get(persona_json) or personas.setdefault(persona_json, json.loads(persona_json))
            self.written[rule, output] += n
            self.personas[split, output][persona] += n
            if pii != NO_PII:
                for kind, count in zip(PII_KINDS, map(int, pii.split(","))):
                    self.pii[kind] += n * count
        for (split, output), ranges in self.ranges.items():
            (folder / split).mkdir(exist_ok=True)
            _copy_ranges([source.files[split, output] for source in self.sources], ranges,
                         folder / split / f"{output}.jsonl")

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
        ranges = self.ranges["train", "sft"]
        for i, (persona, fields) in enumerate(zip(persona_of, rows)):
            if persona not in limit or (keys[i] <= limit[persona] and kept[persona] < keep[persona]):
                kept[persona] += 1
                self.kept["train", "sft", fields] = self.kept.get(("train", "sft", fields), 0) + 1
                ranges.append(self.sft_ranges[3 * i: 3 * i + 3].tolist())
            else:
                self.drops["persona_cap"] += 1


def _copy_ranges(files: list[Path], ranges: list[list[int]], dst: Path) -> None:
    """Write `dst` as the byte ranges `[file number, start, end]` of `files`, in order.

    The bytes are copied by the kernel (`os.copy_file_range`: no trip
    through Python, nor through user space on most file systems) where it
    can, else read and written in blocks.
    """
    copy_file_range = getattr(os, "copy_file_range", None)  # Linux only
    handles: dict[int, int] = {}
    with open(dst, "wb", buffering=0) as out:
        try:
            for number, start, end in ranges:
                src = handles.get(number)
                if src is None:
                    src = handles[number] = os.open(files[number], os.O_RDONLY)
                while start < end:
                    n = 0
                    if copy_file_range is not None:
                        try:
                            n = copy_file_range(src, out.fileno(), end - start, start)
                        except OSError:  # e.g. a file system that cannot: copy by hand from now on
                            copy_file_range = None
                    if not n:
                        n = out.write(os.pread(src, min(end - start, 1 << 20), start))
                    start += n
        finally:
            for fd in handles.values():
                os.close(fd)


# --- the report --------------------------------------------------------------------------

def _sha256_files(paths: list[Path]) -> list[str]:
    """sha256 of each file, several at once (hashlib releases the GIL on large blocks)."""
    with ThreadPoolExecutor(max_workers=min(len(paths), default_jobs()) or 1) as pool:
        return list(pool.map(sha256_file, paths))


def _report(scan: Scan, folder: Path, options: BuildOptions, merge: _Merge, unused: int, orphans: list,
            input_hashes: list[str]) -> dict:
    """The report.json dict (rendered by `report.py`); deterministic: no clock, no temp paths."""
    output_hashes = iter(_sha256_files([folder / s / f"{o}.jsonl" for s in rules.SPLITS for o in rules.OUTPUTS]))
    drops = Counter(merge.drops)
    if scan.counts["invalid"]:
        drops["invalid_record"] = scan.counts["invalid"]
    per_output: dict[str, dict] = {}
    warnings = []
    for split in rules.SPLITS:
        per_output[split] = {}
        for output in rules.OUTPUTS:
            personas = +merge.personas[split, output]  # unary + leaves out personas capped to zero rows
            rows = sum(personas.values())
            shares = {p: {"rows": n, "share": round(n / rows, 4)}
                      for p, n in sorted(personas.items(), key=lambda kv: (-kv[1], kv[0]))}
            per_output[split][output] = {"rows": rows, "sha256": next(output_hashes), "personas": shares}
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
        "rules": {rule: {"in": merge.signals[rule], **{o: merge.written[rule, o] for o in rules.OUTPUTS}}
                  for rule in rules.RULES},
        "unused_assistant_messages": unused,
        "drops": dict(sorted((+drops).items())),
        "conflicts": {"count": merge.n_conflicts,
                      "examples": [{"conversation_id": c, "message_id": m} for c, m in merge.conflicts]},
        "orphans": {"count": len(orphans), "by_reason": dict(sorted(Counter(o[2] for o in orphans).items())),
                    "examples": [{"file": str(scan.paths[fi]), "line": line, "conversation_id": rec.conversation_id,
                                  "message_id": rec.message_id, "reason": why}
                                 for (fi, line), rec, why in orphans[:EXAMPLES]]},
        "pii_redactions": {k: merge.pii[k] for k in PII_KINDS},
        "outputs": per_output,
        "warnings": warnings,
    }
