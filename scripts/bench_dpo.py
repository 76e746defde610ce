"""edgetune DPO vs mlx-lm-lora's DPO (the two-model approach): pairs/s and peak memory.

Same pairs (token for token: both sides get edgetune's tokenisation), same model
shape (`edgetune model tiny --preset small` weights, float32 on CPU), same LoRA
(rank, alpha, all linear layers of every block), same batch size and steps.
Each side runs in its own process so peak memory is its own.

- edgetune: `run_preference(recipe, "dpo")`; its time includes the one-off
  reference pass (reported separately too).
- mlx-lm-lora: `mlx_lm_lora.trainer.dpo_trainer.train_dpo` with a second, frozen
  copy of the model as `ref_model`, scored every step.

mlx-lm-lora is installed with `pip install --no-deps --target DIR mlx-lm-lora`
(so it cannot upgrade mlx / mlx-lm / transformers) and found via --mlx-lm-lora-path.
On Linux its `train_dpo` reads `mx.device_info()["max_recommended_working_set_size"]`,
a Metal-only key; the bench supplies it (the machine's RAM) so the call runs on CPU.

The reference pass costs about one forward over the pairs, once per run, while the
two-model approach scores the reference at every step: `--epochs 1 2` reports one
pass over the pairs (the least favourable case for edgetune) and two (mlx-lm-lora draws
each step's batch at random, so for it an epoch is the same number of steps and pairs,
not each pair once; its cost per step does not depend on the epoch). Both sides of
one configuration run back to back; with `--repeats 2` the second round runs them in
the other order, so a change in the machine's load hits both. Each run reports the
1-minute load average before and after it (the box is shared).

Usage: python scripts/bench_dpo.py [--pairs 32 --batch-size 4 --epochs 1 2 --rank 8 --repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's edgetune, installed or not


def make_pairs(n: int) -> list[dict]:
    """Deterministic pairs with multi-turn prompts and completions of varied length."""
    import random

    rng = random.Random(0)
    words = "the a model reply short long user answer data edge tune fast memory pair chosen rejected".split()
    out = []
    for i in range(n):
        prompt = [{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(8, 30)))},
                  {"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(5, 20)))},
                  {"role": "user", "content": f"question {i}: " + " ".join(rng.choices(words, k=rng.randint(5, 20)))}]
        out.append({"prompt": prompt,
                    "chosen": [{"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(10, 60)))}],
                    "rejected": [{"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(10, 60)))}]})
    return out


def run_edgetune(args, work: Path) -> dict:
    from edgetune.preference import run_preference
    from edgetune.recipe import load_recipe
    from edgetune.runtime import mlx_core

    mx = mlx_core()
    recipe_path = work / "edgetune.yaml"
    recipe_path.write_text(json.dumps({
        "model": str(args.model), "output": str(work / "edgetune-run"), "data": {"train": [str(work / "pairs.jsonl")]},
        "dpo": {"lora": {"rank": args.rank, "alpha": 2 * args.rank}, "steps": args.steps,
                "batch_size": args.batch_size, "learning_rate": 1e-5, "max_seq_len": args.max_seq_len,
                "save_every": 0, "log_every": max(args.steps, 1)}}))
    mx.reset_peak_memory()
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    summary = run_preference(load_recipe(recipe_path), "dpo", force=True, echo=lambda m: print(m, file=sys.stderr))
    wall = time.perf_counter() - t0
    pairs = summary["items_trained"]
    # Timed from the reference pass to the last step: model loading is left out on both sides.
    return {"side": "edgetune", "pairs": pairs, "train_s": summary["elapsed_s"], "reference_s": summary["reference_s"],
            "pairs_per_s": pairs / (summary["elapsed_s"] + summary["reference_s"]),
            "pairs_per_s_loop_only": pairs / summary["elapsed_s"], "wall_s": wall,
            "peak_memory_gb": mx.get_peak_memory() / 1e9, "max_rss_gb": _max_rss_gb(),
            "load_before": load_before, "load_after": os.getloadavg()[0]}


def run_mlx_lm_lora(args, work: Path) -> dict:
    sys.path.insert(0, args.mlx_lm_lora_path)
    from edgetune.runtime import mlx_core

    mx = mlx_core()
    import mlx.optimizers as optim
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    info = mx.device_info
    if "max_recommended_working_set_size" not in info():  # Metal-only key; see the module docstring
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        mx.device_info = lambda: {**info(), "max_recommended_working_set_size": ram}
    from mlx_lm_lora.trainer.dpo_trainer import DPOTrainingArgs, train_dpo

    from edgetune.lora import LoraSpec, adapter_config

    mx.reset_peak_memory()
    t_load = time.perf_counter()
    model, tokenizer = load(str(args.model))
    ref_model, _ = load(str(args.model))
    for m in (model, ref_model):  # float32, as edgetune trains on CPU
        m.set_dtype(mx.float32)
    ref_model.freeze()
    ref_model.eval()
    cfg = adapter_config(model, LoraSpec(args.rank, 2.0 * args.rank))
    model.freeze()
    linear_to_lora_layers(model, cfg["num_layers"], cfg["lora_parameters"])
    dataset = [{"chosen": r["chosen"], "rejected": r["rejected"], "chosen_prompt_length": r["prompt_len"],
                "rejected_prompt_length": r["prompt_len"]}
               for r in map(json.loads, (work / "tokens.jsonl").read_text().splitlines())]
    targs = DPOTrainingArgs(batch_size=args.batch_size, iters=args.steps, max_seq_length=args.max_seq_len,
                            steps_per_report=max(args.steps, 1), steps_per_eval=10**9, steps_per_save=10**9,
                            adapter_file=str(work / "mlx-lm-lora-adapters.safetensors"))
    load_s = time.perf_counter() - t_load
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    train_dpo(model, ref_model, optim.AdamW(learning_rate=1e-5), dataset, None, targs)
    train_s = time.perf_counter() - t0
    pairs = args.steps * args.batch_size
    return {"side": "mlx-lm-lora", "pairs": pairs, "train_s": train_s, "load_s": load_s, "pairs_per_s": pairs / train_s,
            "peak_memory_gb": mx.get_peak_memory() / 1e9, "max_rss_gb": _max_rss_gb(),
            "load_before": load_before, "load_after": os.getloadavg()[0]}


def _max_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def prepare(args, work: Path) -> None:
    """Write the pairs and edgetune's tokenisation of them (both sides train on these tokens)."""
    from mlx_lm.utils import load_tokenizer

    from edgetune.pref_data import parse_preference_row, tokenize_pairs

    pairs = make_pairs(args.pairs)
    (work / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    rows = [parse_preference_row(p, "dpo", f"pair {i}") for i, p in enumerate(pairs)]
    tokenized, _ = tokenize_pairs(rows, load_tokenizer(args.model), args.max_seq_len, "left", 10**9)
    with open(work / "tokens.jsonl", "w") as f:
        for p in tokenized:
            f.write(json.dumps({"chosen": p.chosen.tokens.tolist(), "rejected": p.rejected.tokens.tolist(),
                                "prompt_len": p.chosen.prompt_len}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, help="model folder (default: build `--preset small` in the work folder)")
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, help="optimizer steps (instead of --epochs)")
    ap.add_argument("--epochs", type=int, nargs="+", default=[1],
                    help="passes over the pairs, one configuration each (steps = epochs * pairs / batch size)")
    ap.add_argument("--repeats", type=int, default=1, help="rounds; each round after the first swaps the order")
    ap.add_argument("--first", choices=["edgetune", "mlx-lm-lora"], default="edgetune", help="which side runs first")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--mlx-lm-lora-path", default="/tmp/mlxlora", help="the --target folder of its pip install")
    ap.add_argument("--work", type=Path)
    ap.add_argument("--out", type=Path, help="write the result JSON here")
    ap.add_argument("--side", choices=["edgetune", "mlx-lm-lora"], help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.side:
        result = (run_edgetune if args.side == "edgetune" else run_mlx_lm_lora)(args, args.work)
        print("RESULT " + json.dumps(result))
        return

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.model is None:
        from edgetune.model.tiny import build_tiny_model

        args.model = work / "model-small"
        if not args.model.exists():
            build_tiny_model(args.model, preset="small", seed=0, pretrain=False)
    if args.steps is None and args.pairs % args.batch_size:
        sys.exit("--pairs must be a multiple of --batch-size with --epochs (mlx-lm-lora drops a partial batch)")
    prepare(args, work)
    configs = [(None, args.steps)] if args.steps else [(e, e * args.pairs // args.batch_size) for e in args.epochs]
    report = {"model": str(args.model), "pairs": args.pairs, "batch_size": args.batch_size, "rank": args.rank,
              "max_seq_len": args.max_seq_len, "runs": []}
    for round_ in range(args.repeats):
        for epochs, steps in configs:
            sides = ("edgetune", "mlx-lm-lora") if (round_ + (args.first != "edgetune")) % 2 == 0 \
                else ("mlx-lm-lora", "edgetune")
            results = {side: run_side(args, work, side, steps) for side in sides}
            run = {"round": round_ + 1, "epochs": epochs, "steps": steps, "order": list(sides), **results}
            e, m = results["edgetune"], results["mlx-lm-lora"]
            if "error" not in e and "error" not in m:
                run["pairs_per_s_ratio"] = e["pairs_per_s"] / m["pairs_per_s"]
                run["peak_memory_ratio"] = e["peak_memory_gb"] / m["peak_memory_gb"]
                run["rss_ratio"] = e["max_rss_gb"] / m["max_rss_gb"]
            report["runs"].append(run)
            print_run(run)
            if args.out:
                args.out.write_text(json.dumps(report, indent=2))


def run_side(args, work: Path, side: str, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--work", str(work), "--model", str(args.model),
           "--pairs", str(args.pairs), "--batch-size", str(args.batch_size), "--steps", str(steps),
           "--rank", str(args.rank), "--max-seq-len", str(args.max_seq_len),
           "--mlx-lm-lora-path", args.mlx_lm_lora_path]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        print(f"{side} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
        return {"side": side, "error": proc.stderr[-1000:]}
    return json.loads(line[len("RESULT "):])


def print_run(run: dict) -> None:
    what = f"{run['epochs']} epoch(s), {run['steps']} steps" if run["epochs"] else f"{run['steps']} steps"
    print(f"round {run['round']}, {what}, order {' then '.join(run['order'])}:", flush=True)
    for side in ("edgetune", "mlx-lm-lora"):
        r = run[side]
        if "error" in r:
            print(f"  {side:<12} failed")
            continue
        extra = (f" (training loop {r['pairs_per_s_loop_only']:.4f} pairs/s; reference pass {r['reference_s']:.1f} s, "
                 f"loop {r['train_s']:.1f} s)" if side == "edgetune" else f" ({r['train_s']:.1f} s)")
        print(f"  {side:<12} {r['pairs_per_s']:.4f} pairs/s{extra}  peak {r['peak_memory_gb']:.2f} GB (MLX)  "
              f"max RSS {r['max_rss_gb']:.2f} GB  load {r['load_before']:.2f} -> {r['load_after']:.2f}")
    if "pairs_per_s_ratio" in run:
        print(f"  edgetune / mlx-lm-lora: {run['pairs_per_s_ratio']:.2f}x pairs/s at {run['peak_memory_ratio']:.2f}x "
              f"peak memory (MLX), {run['rss_ratio']:.2f}x max RSS (goal: >= 1.5x at <= 0.6x)", flush=True)


if __name__ == "__main__":
    main()
