"""Scale benchmark of `edgetune data build` (not a test: it takes a minute or two).

Writes a synthetic feedback log of N events (records) and builds it with the
real CLI in a subprocess, then prints events/s and the build's peak RSS
(`resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`, which is the largest RSS of
any waited-for child: the build process or one of its workers). It also
prints the CPU time of the build and its workers: on a machine shared with
other jobs the wall time measures them too, so compare CPU times there.

The log: conversations of 2-12 messages (85% of events), 30% of them with
inline feedback (ratings, correction chains, edits), split-out `feedback`
records (5%, a few orphaned), comparisons (10%, some ties), repeated
conversation ids (newer versions), exact duplicate exchanges, and PII in some
user messages. Text lengths: user messages ~20-400 characters, assistant
~80-1,500.

Targets (issue 2): >= 50,000 events/s and peak RSS < 1 GiB on a 2-core machine.

    python scripts/bench_data.py                 # 1,000,000 events
    python scripts/bench_data.py --events 100000 --keep /tmp/bench   # log kept and reused
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_SYLLABLES = ["ka", "lo", "mi", "ne", "ra", "to", "su", "pe", "di", "an", "or", "el", "ti", "us", "ba", "co"]
_COMMON = ("the a to of and in is it you that for on with as this be can your are we not if or at by "
           "from file data model error config server user request value time code list function").split()
_PII = ["reach me at jane.doe{n}@example.com", "call +1 415 555 {n:04d}", "my card is 4111 1111 1111 1111",
        "the server at 10.0.{a}.{b} is down", "phone (212) 555-{n:04d} after 5pm", "ip 2001:db8::{n:x} fails"]


def _vocabulary(rng: random.Random, size: int = 3000) -> list[str]:
    words = set(_COMMON)
    while len(words) < size:
        words.add("".join(rng.choices(_SYLLABLES, k=rng.randint(1, 4))))
    return sorted(words)


class LogWriter:
    """Deterministic synthetic events; `event()` returns one JSON line."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        words = _vocabulary(self.rng)
        # Texts are drawn from a pool of sentences: fast to generate, and the
        # exact repeats that real logs have (dedup) come from the pool reuse.
        self.sentences = [" ".join(self.rng.choices(words, k=self.rng.randint(4, 18))).capitalize() + "."
                          for _ in range(20000)]
        self.recent: list[tuple[str, list[str]]] = []  # (conversation id, assistant ids) for feedback lines
        self.n_conv = self.n_cmp = 0
        self.canned = [(self.text(1, 4), self.text(2, 8)) for _ in range(50)]  # FAQ-like repeats

    def text(self, lo: int, hi: int) -> str:
        return " ".join(self.rng.choices(self.sentences, k=self.rng.randint(lo, hi)))

    def user_text(self) -> str:
        t = self.text(1, 4)
        if self.rng.random() < 0.05:
            r = self.rng
            t += " " + r.choice(_PII).format(n=r.randrange(10000), a=r.randrange(256), b=r.randrange(1, 255))
        return t

    def event(self) -> str:
        r = self.rng.random()
        if r < 0.05 and self.recent:
            return json.dumps(self.feedback())
        if r < 0.15:
            return json.dumps(self.comparison())
        return json.dumps(self.conversation())

    def feedback(self) -> dict:
        rng = self.rng
        if rng.random() < 0.02:  # orphan: a conversation that is not in the log
            return {"type": "feedback", "conversation_id": f"gone-{rng.randrange(10**6)}", "message_id": "m1",
                    "rating": "up"}
        cid, assistant_ids = rng.choice(self.recent)
        rec = {"type": "feedback", "conversation_id": cid, "message_id": rng.choice(assistant_ids),
               "timestamp": "2026-10-02T09:15:00Z"}
        if rng.random() < 0.8:
            rec["rating"] = rng.choice(["up", "down", 1, -1, True])
        else:
            rec["edited_content"] = self.text(2, 6)
        return rec

    def comparison(self) -> dict:
        rng = self.rng
        self.n_cmp += 1
        ids = ("a", "b")
        return {"type": "comparison", "comparison_id": f"x-{self.n_cmp}", "persona": rng.choice(_PERSONAS),
                "prompt": [{"role": "user", "content": self.user_text()}],
                "responses": [{"id": i, "content": self.text(2, 10)} for i in ids],
                "preferred": rng.choice(["a", "b", "a", "b", "tie"])}

    def conversation(self) -> dict:
        rng = self.rng
        if self.recent and rng.random() < 0.02:  # a newer version of an earlier conversation
            cid = rng.choice(self.recent)[0]
        else:
            self.n_conv += 1
            cid = f"c-{self.n_conv}"
        messages = []
        if rng.random() < 0.3:
            messages.append({"id": "m0", "role": "system", "content": "You are a helpful assistant for our app."})
        n = rng.randint(2, 12)
        canned = rng.choice(self.canned) if rng.random() < 0.03 else None
        for i in range(1, n + 1):
            role = "user" if i % 2 else "assistant"
            if canned:
                content = canned[0] if role == "user" else canned[1]
            else:
                content = self.user_text() if role == "user" else self.text(2, 14)
            messages.append({"id": f"m{i}", "role": role, "content": content})
        assistant = [m for m in messages if m["role"] == "assistant"]
        if assistant and rng.random() < 0.3:
            for m in rng.sample(assistant, k=min(len(assistant), rng.randint(1, 2))):
                m["feedback"] = {"rating": rng.choice(["up", "up", "down"])}
            if len(assistant) >= 2 and rng.random() < 0.25:  # correction of the first answer
                assistant[0]["feedback"] = {"rating": "down"}
                assistant[1]["corrects"] = assistant[0]["id"]
            if rng.random() < 0.1:
                m = rng.choice(assistant)
                m.setdefault("feedback", {})["edited_content"] = self.text(2, 8)
        if assistant:
            self.recent.append((cid, [m["id"] for m in assistant]))
            if len(self.recent) > 1000:
                self.recent.pop(0)
        rec = {"type": "conversation", "conversation_id": cid, "timestamp": "2026-10-02T09:14:00Z",
               "metadata": {"app": "bench"}, "messages": messages}
        if rng.random() < 0.8:
            rec["persona"] = rng.choice(_PERSONAS)
        return rec


_PERSONAS = ["analyst", "novice", "developer", "support", "manager"]


def write_log(path: Path, events: int, seed: int = 0) -> int:
    writer = LogWriter(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(events):
            f.write(writer.event() + "\n")
    return path.stat().st_size


def decode_floor(log: Path, lines: int = 50_000) -> dict[str, float]:
    """Events/s of JSON decoding alone over the log's first lines, on one core, per decoder: the
    floor of any build, measured on the same machine and moment as the build."""
    with open(log, "rb") as f:
        sample = [line for _, line in zip(range(lines), f)]
    decoders = {"json.loads": lambda line: json.loads(line.decode("utf-8"))}
    try:
        import orjson

        decoders["orjson.loads"] = orjson.loads
    except ImportError:
        pass
    rates = {}
    for name, decode in decoders.items():
        start = time.process_time()
        for line in sample:
            decode(line)
        rates[name] = len(sample) / (time.process_time() - start)
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, help="passed to `edgetune data build --jobs`")
    ap.add_argument("--keep", type=Path, help="keep the log and outputs in this folder (the log is reused)")
    args = ap.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="edgetune-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    log, out = work / f"log-{args.events}-{args.seed}.jsonl", work / "out"
    try:
        if not log.exists():
            t0 = time.perf_counter()
            write_log(log, args.events, args.seed)
            # Flushed before the timing starts: otherwise the kernel writes this fresh log's GBs of
            # dirty pages back while the build runs, and throttles the build's own writes for them.
            os.sync()
            print(f"generated {args.events:,} events in {time.perf_counter() - t0:.1f} s")
        size = log.stat().st_size
        print(f"log: {log} ({size / 2**20:,.0f} MiB, {size / args.events:,.0f} bytes/event)")
        cmd = [sys.executable, "-c", "from edgetune.cli import main; main()", "data", "build", str(log),
               "--out", str(out), "--force"] + (["--jobs", str(args.jobs)] if args.jobs else [])
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        # The build's progress lines (stderr) are timed as they come: they mark its phases.
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stderr, marks = [], []
        for line in proc.stderr:
            stderr.append(line)
            if line.strip() and not line.startswith(" "):  # a phase starts (indented lines are its progress)
                marks.append((time.perf_counter() - t0, line.split()[0]))
        stdout = proc.stdout.read()
        proc.wait()
        seconds = time.perf_counter() - t0
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode:
            sys.exit(f"build failed ({proc.returncode}):\n{''.join(stderr)[-4000:]}")
        print(stdout)
        user, system = usage.ru_utime - before.ru_utime, usage.ru_stime - before.ru_stime
        cpu = user + system
        peak = usage.ru_maxrss / 1024  # KiB on Linux: the largest RSS of the build or one of its workers
        report = json.loads((out / "report.json").read_text())
        rows = sum(o["rows"] for split in report["outputs"].values() for o in split.values())
        floor = decode_floor(log)
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        print(f"events: {args.events:,}  build: {seconds:.1f} s wall, {cpu:.1f} s CPU (build and workers; "
              f"{user:.1f} s user, {system:.1f} s system)  "
              f"{args.events / seconds:,.0f} events/s  peak RSS: {peak:,.0f} MiB  rows written: {rows:,}")
        # On a machine shared with other jobs the wall time measures them too; the CPU time does
        # not (much). Events per CPU-second times the CPUs bounds what the build would do alone
        # (a bound: it assumes every step keeps every CPU busy, and the merge is one process).
        # The system time is mostly the kernel's page-cache work for the staging files and the
        # outputs: it varies with the machine's free memory more than with the build's code.
        print(f"CPU per event: {cpu / args.events * 1e6:.0f} us: at most {args.events / cpu * cpus:,.0f} events/s "
              f"on {cpus} otherwise idle CPUs; load average now: "
              f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
        ends = [t for t, _ in marks[1:]] + [seconds]
        print("phases (wall): start-up {:.1f} s, ".format(marks[0][0] if marks else 0.0)
              + ", ".join(f"{name} {end - t:.1f} s" for (t, name), end in zip(marks, ends)))
        print("for scale, decoding alone on one core: " + ", ".join(f"{name} {rate:,.0f} events/s"
                                                                    for name, rate in floor.items()))
        ok = args.events / seconds >= 50_000 and peak < 1024
        print("targets (>= 50,000 events/s, < 1 GiB):", "met" if ok else "NOT met")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
