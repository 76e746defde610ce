"""Throughput of `edgetune eval`: items/s for one candidate on a real-shaped model (not a test).

    python scripts/bench_eval.py                                  # qwen2.5-0.5b shape, ~3 min on 2 cores
    python scripts/bench_eval.py --preset small --suite-items 150 --generations 8

The items: the eval split of the sample feedback log shipped with edgetune
(`edgetune data build`: SFT rows, DPO pairs, thumbs-down rows, with personas),
the first --suite-items of the built-in general suite (taken round-robin over its
four categories, so every scoring type is in), and --generations greedy sample
generations. One candidate (the base), so the numbers are per model evaluated.

Printed, and written with --json: items, scored rows and tokens, generated
prompts; seconds and items/s for scoring (log-likelihood, length-grouped
batches) and for generation (greedy, length-grouped batches) apart, since they
differ by orders of magnitude; the load time; MLX peak memory and max RSS; the
1-minute load average and a float32 matmul GFLOP/s probe before and after the
run (bench_sft's `machine_probe`: the machine may be shared, and on a CPU every
number here scales with what the matmul gets).

What bounds it on a CPU: scoring a token costs a forward pass, ~2 FLOP per
parameter (1 GFLOP at the 0.5B shape), so scored tokens/s is at most the matmul
GFLOP/s; a greedy decode step reads every weight once per batch.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="qwen2.5-0.5b", help="model shape from edgetune.model.tiny")
    p.add_argument("--suite-items", type=int, default=40, help="built-in suite items to include (max 150)")
    p.add_argument("--generations", type=int, default=4, help="sample generations on eval prompts")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens per sample generation")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--model", help="an existing model folder (skips building the preset)")
    p.add_argument("--json", help="write the result here")
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_sft import machine_probe  # the same probe as the SFT benchmark

    from edgetune.runtime import mlx_core

    mx = mlx_core()
    from edgetune.data.build import build
    from edgetune.demo import sample_log
    from edgetune.eval.run_eval import Candidate, EvalSettings, run_eval
    from edgetune.eval.suites import builtin_suite_path
    from edgetune.model.tiny import build_tiny_model
    from edgetune.recipe import DataConfig

    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        tmp = Path(tmp)
        model = Path(args.model) if args.model else None
        if model is None:
            t0 = time.perf_counter()
            model = build_tiny_model(tmp / "model", preset=args.preset, seed=0, pretrain=False)
            print(f"built {args.preset} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        build([sample_log()], tmp / "data", progress=lambda _: None)
        suite = tmp / "suite.jsonl"
        suite.write_text(round_robin(builtin_suite_path(), args.suite_items))
        settings = EvalSettings([Candidate("base", "base", str(model))], DataConfig(dir=str(tmp / "data")),
                                [str(suite)], False, args.generations, args.max_new_tokens, 2048,
                                args.batch_size, None, None, plots=False)
        before = machine_probe()
        info = run_eval(settings, tmp / "out", echo=lambda m: print(m, file=sys.stderr))
        after = machine_probe()
        plan_counts = json.loads((tmp / "out" / "eval.json").read_text())["data"]["tokenized"]

    t = info["results"]["base"]["timing"]
    task = info["results"]["base"]["task"]
    generated = args.generations + sum(1 for line in round_robin(builtin_suite_path(), args.suite_items).splitlines()
                                       if json.loads(line)["type"] in ("exact", "contains"))
    result = {
        "preset": args.preset if not args.model else str(model), "machine": machine(), "probe_before": before, "probe_after": after,
        "items": t["items"], "sft_rows": task["eval_rows"], "pairs": task["pairs"], "suite_items": args.suite_items,
        "generated_prompts": generated, "tokenized": plan_counts,
        "load_s": t["load_s"], "score_s": t["score_s"], "generate_s": t["generate_s"],
        "items_per_s": t["items_per_s"], "scored_positions_per_s": t["scored_positions_per_s"],
        "completion_tokens_per_s": t["completion_tokens_per_s"],
        "scored_items_per_s": (t["items"] - generated) / t["score_s"] if t["score_s"] else None,
        "generated_prompts_per_s": generated / t["generate_s"] if t["generate_s"] else None,
        "mlx_peak_memory_gb": mx.get_peak_memory() / 1e9,
        "max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


def round_robin(path: Path, n: int) -> str:
    """The first n items of a suite taken in turn from each category, as JSONL."""
    by_cat: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        by_cat.setdefault(json.loads(line).get("category"), []).append(line)
    out, queues = [], list(by_cat.values())
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return "".join(line + "\n" for line in out)


def machine() -> str:
    import platform

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs ({cpu})"


if __name__ == "__main__":
    main()
