"""edgetune's two backends on this machine: the same SFT recipe on MLX and on torch — tokens/s.

This is the measurement behind `backend: auto` on a Linux CPU (`backends.LINUX_CPU_FASTER`):
same model (`edgetune model tiny --preset small` unless --model), same rows, same LoRA and
batches; each backend in its own process, run alternately `--rounds` times; the fastest round of
each is reported with the machine's load.

Usage: python scripts/bench_backends.py [--model DIR] [--steps 8] [--rounds 2] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
WORDS = "the a model reply short long user answer data edge tune fast memory feedback device laptop".split()


def write_data(path: Path, n: int) -> None:
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(n):
            prompt = " ".join(rng.choices(WORDS, k=rng.randint(10, 120)))
            answer = " ".join(rng.choices(WORDS, k=rng.randint(10, 200)))
            f.write(json.dumps({"messages": [{"role": "user", "content": prompt},
                                             {"role": "assistant", "content": answer}]}) + "\n")


def run_one(backend: str, args) -> dict:
    from edgetune.recipe import load_recipe
    from edgetune.sft import run_sft

    out = args.work / f"run-{backend}"
    recipe = {"model": str(args.model), "backend": backend, "output": str(out),
              "data": {"train": [str(args.work / "train.jsonl")]},
              "sft": {"lora": {"rank": 8, "alpha": 16}, "steps": args.steps, "batch_size": 4, "max_seq_len": 512,
                      "packing": True, "learning_rate": 1e-4, "save_every": 0, "log_every": args.steps}}
    path = args.work / f"{backend}.yaml"
    path.write_text(json.dumps(recipe))
    s = run_sft(load_recipe(path), force=True, echo=lambda m: print(m, file=sys.stderr))
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if r.get("tok_s")][1:]  # the first step compiles (MLX) or warms up
    seconds = sum(r["tokens"] / r["tok_s"] for r in timed)
    return {"backend": backend, "tok_s": sum(r["tokens"] for r in timed) / seconds,
            "final_loss": s["final_loss"], "peak_memory_gb": s["peak_memory_gb"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--backend", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.backend:
        print("RESULT " + json.dumps(run_one(args.backend, args)))
        return
    args.work = args.work or Path(tempfile.mkdtemp(prefix="bench-backends-"))
    args.work.mkdir(parents=True, exist_ok=True)
    if args.model is None:
        from edgetune.model.tiny import build_tiny_model

        args.model = args.work / "model-small"
        if not args.model.exists():
            build_tiny_model(args.model, preset="small", pretrain=False)
    write_data(args.work / "train.jsonl", 200)
    best: dict = {}
    for round_ in range(args.rounds):
        for backend in ("mlx", "torch"):
            cmd = [sys.executable, __file__, "--backend", backend, "--model", str(args.model), "--steps",
                   str(args.steps), "--work", str(args.work)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(f"{backend} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            r = json.loads(line[7:])
            r["load"] = os.getloadavg()[0]
            print(f"round {round_ + 1} {backend:<6} {r['tok_s']:8.1f} tok/s  loss {r['final_loss']:.4f}  "
                  f"load {r['load']:.1f}", flush=True)
            if r["tok_s"] > best.get(backend, {}).get("tok_s", 0):
                best[backend] = r
    report = {"model": str(args.model), "steps": args.steps, "best": best}
    if len(best) == 2:
        report["mlx_over_torch"] = best["mlx"]["tok_s"] / best["torch"]["tok_s"]
        print(f"MLX / torch: {report['mlx_over_torch']:.2f}x tokens/s (fastest round of each)")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
