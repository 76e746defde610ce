"""Throughput and memory of `edgetune sft` against `mlx_lm.lora`, side by side (not a test).

Both tools train the same LoRA (rank 8, alpha 16 = mlx-lm scale 2.0, all 7
linear layers of every block, dropout 0) on the same float32 model folder and
the same chat examples, one after the other, each in its own subprocess:

    python scripts/bench_sft.py                              # preset small, 64 examples (~5-10 min)
    python scripts/bench_sft.py --preset qwen2.5-0.5b --examples 6 --batch-size 1 --max-seq-len 512
    python scripts/bench_sft.py --steps 20 --repeat 2 --json out.json --keep

The data: chat examples whose prompt and completion lengths are each drawn
log-normal (median 100 tokens) within 20..1,000 tokens, random words from the
model's tokenizer, like feedback logs (short questions, occasional pasted
logs). Examples longer than --max-seq-len are dropped (and redrawn) before
either tool sees them, so neither truncates.

Equal work: one epoch over the same N examples (N a multiple of the batch
size). `--batch-size B` is B rows per step for both; edgetune (default,
length-grouped batches) puts one example per row like mlx-lm, but groups
similar lengths; with `--packing` edgetune packs several
examples into each row of --max-seq-len positions, mlx-lm puts one example in
each row (padded to the longest in the batch, rounded up to 32), so edgetune
takes fewer steps for the same examples.

What is measured, the same way for both:

- tokens/s = non-padding tokens / training seconds over every step but the
  first (the first step compiles the graph; later shape changes recompile in
  both tools and are counted). Non-padding tokens of an example = its token
  count minus one (the positions that predict a real next token), as each tool
  tokenises it (mlx-lm keeps the newline the chat template writes after the
  end-of-turn token; edgetune stops at the end-of-turn token).
- edgetune: from its metrics.jsonl (`tokens` / `tok_s` per step, i.e. each
  step's wall time from building the batch to the updated weights).
- mlx-lm: run through its own CLI entry point (`mlx_lm.lora.main()`), with one
  addition: its reporting hook (`get_reporting_callbacks`) returns a callback
  that writes each report to a JSONL file. With `steps_per_report: 1` each
  report holds one iteration's training time and supervised-token count. mlx-lm
  reports supervised tokens, not the tokens it processed, so this script
  rebuilds mlx-lm's batches with mlx-lm's own dataset and batch iterator (same
  seed, same order) and checks every iteration's supervised count against the
  report before using the batch's non-padding count.
- MLX peak memory (`mx.get_peak_memory()`, as each tool reports it; excludes
  MLX's buffer cache) and the process's max RSS (`wait4` rusage, per process).
- Before each run: the 1-minute load average and a float32 matmul GFLOP/s
  probe, printed beside the result. On a shared machine the two runs can see
  different loads; `--repeat N` alternates the order and keeps each tool's
  fastest run.

mlx-lm gets OpenBLAS through LD_PRELOAD (edgetune loads it itself); without it
the `mlx[cpu]` wheel's reference BLAS makes mlx-lm ~20x slower. mlx-lm runs as
shipped, including its length sort that sorts nothing (ml-explore/mlx-lm#596),
which leaves batches with random lengths and so much padding. Differences kept
on purpose: edgetune clips the gradient norm at 1.0 (its default; extra work
for edgetune), both use AdamW with weight decay 0 and a constant learning rate.

Goal (issue 3): edgetune >= 2x mlx_lm.lora's non-padding tokens/s at <= its peak
memory, on a qwen2.5-0.5b-shaped model and a small one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from edgetune.errors import UserError

# Lengths of a prompt and of a completion, in tokens: log-normal around a
# median of 100 (sigma 1.0 puts ~10% above 360 and ~1% above 1,000), redrawn
# outside [20, 1000]. Feedback logs are mostly short turns with a long tail.
LENGTH_MEDIAN = 100
LENGTH_SIGMA = 1.0
LENGTH_RANGE = (20, 1000)

LORA_RANK = 8
LORA_ALPHA = 16.0  # mlx-lm's scale = alpha / rank = 2.0
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MLX_LM_KEYS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]

CHILD_MODE = "_mlx_lm_child"  # argv[1] that makes this script the mlx-lm launcher


# --- the data -------------------------------------------------------------------------------------

def word_pool(tokenizer) -> list[str]:
    """Whole words of the tokenizer's vocabulary (byte-level BPE `Ġword` tokens): each one is
    about one token when joined with spaces, so a text of k words is about k tokens."""
    words = sorted(t[1:] for t in tokenizer.get_vocab() if t.startswith("Ġ") and t[1:].isalpha())
    if len(words) < 50:
        raise UserError("the model's tokenizer has fewer than 50 whole-word tokens; "
                        "this benchmark expects a byte-level BPE vocabulary")
    return words


def draw_length(rng: np.random.Generator) -> int:
    """One prompt or completion length in tokens (see LENGTH_MEDIAN)."""
    lo, hi = LENGTH_RANGE
    while True:
        n = int(round(rng.lognormal(np.log(LENGTH_MEDIAN), LENGTH_SIGMA)))
        if lo <= n <= hi:
            return n


def make_examples(tokenizer, n: int, max_seq_len: int, seed: int) -> tuple[list[dict], dict]:
    """`n` chat rows ({"messages": [user, assistant]}) that fit `max_seq_len` tokens.

    Lengths are measured with the chat template as mlx-lm applies it (whole
    conversation, trailing newline included: the longer of the two tools'
    tokenisations). Over-long draws are dropped and counted. Deterministic in
    `seed`. Raises UserError when max_seq_len is too small to keep enough rows.
    """
    rng = np.random.default_rng(seed)
    words = word_pool(tokenizer)
    rows, prompt_lens, completion_lens, total_lens = [], [], [], []
    dropped = 0
    while len(rows) < n:
        if dropped > 10 * n + 100:
            raise UserError(f"--max-seq-len {max_seq_len}: too short for this length mix "
                            f"({dropped} examples dropped for {len(rows)} kept); raise it to 1024 or more")
        user = " ".join(rng.choice(words, draw_length(rng)))
        assistant = " ".join(rng.choice(words, draw_length(rng)))
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        total = len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))
        if total > max_seq_len:
            dropped += 1
            continue
        prompt = len(tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=True,
                                                   return_dict=False))
        rows.append({"messages": messages})
        prompt_lens.append(prompt)
        completion_lens.append(total - prompt)
        total_lens.append(total)
    stats = {
        "examples": n, "dropped_over_max_seq_len": dropped, "tokens": sum(total_lens),
        "prompt_tokens_median": statistics.median(prompt_lens), "prompt_tokens_max": max(prompt_lens),
        "completion_tokens_median": statistics.median(completion_lens),
        "completion_tokens_max": max(completion_lens),
        "example_tokens_mean": round(statistics.mean(total_lens), 1), "example_tokens_max": max(total_lens),
    }
    return rows, stats


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


# --- the model ------------------------------------------------------------------------------------

def build_model(folder: Path, preset: str, arch: str | None, seed: int) -> dict:
    """Random-weight model folder in float32; returns its shape facts.

    Real-shaped presets are written in bfloat16; mlx-lm trains in the stored
    dtype (and bf16 matmul is slow on MLX's CPU backend) while edgetune casts to
    float32 on the CPU, so the folder is converted once and both load float32.
    """
    from edgetune.model.tiny import build_tiny_model
    from edgetune.runtime import mlx_core

    mx = mlx_core()
    build_tiny_model(folder, arch=arch, preset=preset, seed=seed, pretrain=False)
    weights_file = folder / "model.safetensors"
    weights = mx.load(str(weights_file))
    if any(v.dtype != mx.float32 for v in weights.values()):
        weights = {k: v.astype(mx.float32) for k, v in weights.items()}
        tmp = folder / "model.f32.safetensors"
        mx.save_safetensors(str(tmp), weights, metadata={"format": "pt"})
        os.replace(tmp, weights_file)
        config = json.loads((folder / "config.json").read_text())
        config["torch_dtype"] = "float32"
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    config = json.loads((folder / "config.json").read_text())
    n_params = sum(v.size for v in weights.values())
    del weights
    return {"preset": preset, "model_type": config["model_type"], "parameters": int(n_params),
            "layers": config["num_hidden_layers"], "hidden_size": config["hidden_size"],
            "vocab_size": config["vocab_size"], "dtype": "float32"}


# --- subprocesses ---------------------------------------------------------------------------------

def run_child(cmd: list[str], env: dict, log: Path) -> dict:
    """Run `cmd` with stdout+stderr to `log`; returns wall seconds and this process's max RSS.

    `os.wait4` gives the rusage of exactly this child (RUSAGE_CHILDREN would
    be the largest of all children so far). Raises RuntimeError with the
    log's tail when the command fails.
    """
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}); log {log}:\n{tail}")
    return {"wall_s": wall, "max_rss_gb": usage.ru_maxrss * 1024 / 1e9}  # ru_maxrss is KiB on Linux


def run_edgetune(work: Path, tag: str, model: Path, train_file: Path, args) -> dict:
    """`edgetune sft` for one epoch; the rate over steps 2.. from its metrics.jsonl.

    Raises RuntimeError if the epoch did not cover every example exactly once.
    """
    exe = shutil.which("edgetune")
    if exe is None:
        raise UserError("the `edgetune` command is not on PATH; install the package (pip install -e .)")
    out = work / f"edgetune_run{tag}"
    recipe = {
        "model": str(model), "output": str(out),
        "data": {"train": [str(train_file)], "format": "messages"},
        "sft": {
            "epochs": 1, "batch_size": args.batch_size, "max_seq_len": args.max_seq_len,
            "learning_rate": args.learning_rate, "lr_schedule": "constant", "weight_decay": 0.0,
            "truncation": "drop", "packing": args.packing, "seed": args.seed, "save_every": 0,
            "lora": {"rank": LORA_RANK, "alpha": LORA_ALPHA, "dropout": 0.0, "targets": list(TARGETS),
                     "layers": "all"},
        },
    }
    recipe_file = work / f"edgetune_recipe{tag}.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # edgetune loads OpenBLAS itself
    log = work / f"edgetune{tag}.log"
    proc = run_child([exe, "sft", str(recipe_file), "--force"], env, log)

    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r.get("loss") is not None and "tok_s" in r]
    summary = json.loads((out / "summary.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    data = manifest["data_stats"]["train"]
    # One epoch must have covered every example exactly once: tokens - 1 per example.
    expected = data["tokens"] - data["kept"]
    if sum(r["tokens"] for r in steps) != expected or data["kept"] != args.examples:
        raise RuntimeError(f"edgetune processed {sum(r['tokens'] for r in steps)} positions of "
                           f"{data['kept']} examples; expected {expected} of {args.examples} ({out})")
    window = steps[1:]
    if not window:
        raise UserError(f"edgetune packed all {args.examples} examples into one step, which is excluded as "
                        "warm-up; raise --examples (or lower --batch-size)")
    text = log.read_text(errors="replace")
    return {
        "tool": "edgetune",
        "examples": data["kept"],
        "steps": len(steps),
        "window_steps": len(window),
        "tokens": sum(r["tokens"] for r in window),
        "train_s": sum(r["tokens"] / r["tok_s"] for r in window),
        "mlx_peak_gb": summary["peak_memory_gb"],
        "first_loss": steps[0]["loss"], "final_loss": steps[-1]["loss"],
        "trainable_parameters": manifest["trainable_parameters"],
        "padding": _after(text, "padding "),
        "blas": _after(text, "BLAS: "),
        **proc,
    }


def _after(text: str, marker: str) -> str | None:
    """The rest of the first log line containing `marker`, from the marker on."""
    for line in text.splitlines():
        if marker in line:
            return line.split(marker, 1)[1].strip()
    return None


def mlx_lm_batches(model: Path, data_dir: Path, batch_size: int, max_seq_len: int, seed: int) -> list[dict]:
    """mlx-lm's training batches in the order its trainer draws them, with their token counts.

    Uses mlx-lm's own `load_dataset` and `iterate_batches`. The order depends
    on numpy's global RNG, which `mlx_lm.lora.run` seeds with `seed` just
    before loading; the caller checks the result against what mlx-lm reported.
    """
    import types

    from edgetune.runtime import setup_fast_blas

    setup_fast_blas()
    from mlx_lm.tuner.datasets import CacheDataset, load_dataset
    from mlx_lm.tuner.trainer import iterate_batches
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(model)
    # train=False only silences load_dataset's "no validation set" warning; it loads all splits.
    config = types.SimpleNamespace(data=str(data_dir), train=False, test=False, mask_prompt=True)
    train_set, _, _ = load_dataset(config, tokenizer)
    np.random.seed(seed)
    out = []
    for batch, lengths in iterate_batches(CacheDataset(train_set), batch_size, max_seq_len, loop=False):
        lengths = np.array(lengths)
        offset, length = lengths[:, 0:1], lengths[:, 1:]
        steps = np.arange(1, batch.shape[1])[None, :]  # as in mlx_lm.tuner.trainer.default_loss
        supervised = int(((steps >= offset) & (steps <= length)).sum())
        out.append({"supervised": supervised, "tokens": int((length - 1).sum()),
                    "area": int(batch.shape[0] * (batch.shape[1] - 1))})
    return out


def run_mlx_lm(work: Path, tag: str, model: Path, data_dir: Path, batches: list[dict], args) -> dict:
    """`mlx_lm.lora` for one epoch (examples / batch size iterations), OpenBLAS preloaded.

    `batches`: from `mlx_lm_batches`. Raises RuntimeError when mlx-lm's reports
    disagree with them (then the non-padding counts would be wrong).
    """
    from edgetune.runtime import find_openblas

    iters = args.examples // args.batch_size
    config = {
        "lora_parameters": {"rank": LORA_RANK, "scale": LORA_ALPHA / LORA_RANK, "dropout": 0.0,
                            "keys": MLX_LM_KEYS},
        "optimizer": "adamw",
        "optimizer_config": {"adamw": {"weight_decay": 0.0}},
    }
    config_file = work / f"mlx_lm_config{tag}.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    reports = work / f"mlx_lm_reports{tag}.jsonl"
    lora_args = [
        "--model", str(model), "--train", "--data", str(data_dir), "--fine-tune-type", "lora",
        "--iters", str(iters), "--batch-size", str(args.batch_size), "--max-seq-length", str(args.max_seq_len),
        "--num-layers", "-1", "--mask-prompt", "--learning-rate", str(args.learning_rate),
        "--steps-per-report", "1", "--steps-per-eval", str(iters + 1), "--val-batches", "1",
        "--save-every", str(iters + 1), "--adapter-path", str(work / f"mlx_lm_adapters{tag}"),
        "--seed", str(args.seed), "-c", str(config_file),
    ]
    env = dict(os.environ)
    blas = find_openblas()
    if blas is not None:
        env["LD_PRELOAD"] = ":".join(p for p in (blas, env.get("LD_PRELOAD")) if p)
    log = work / f"mlx_lm{tag}.log"
    proc = run_child([sys.executable, os.path.abspath(__file__), CHILD_MODE, str(reports), *lora_args], env, log)

    records = [json.loads(line) for line in reports.read_text().splitlines()]
    blas_seen = next((r["blas"] for r in records if "blas" in r), None)
    its = [r for r in records if "iteration" in r]
    if len(its) != iters or len(batches) != iters:
        raise RuntimeError(f"mlx-lm reported {len(its)} iterations, rebuilt {len(batches)} batches; "
                           f"expected {iters} (log {log})")
    trained = [r["trained_tokens"] for r in its]
    reported = [int(round(b - a)) for a, b in zip([0] + trained[:-1], trained)]
    rebuilt = [b["supervised"] for b in batches]
    if reported != rebuilt:
        first = next(i for i, (a, b) in enumerate(zip(reported, rebuilt)) if a != b)
        raise RuntimeError(f"mlx-lm's batch order could not be rebuilt: iteration {first + 1} reported "
                           f"{reported[first]} supervised tokens, the rebuilt batch has {rebuilt[first]}")
    window = range(1, iters)
    text = log.read_text(errors="replace")
    return {
        "tool": "mlx_lm.lora",
        "examples": iters * args.batch_size,
        "steps": iters,
        "window_steps": len(window),
        "tokens": sum(batches[i]["tokens"] for i in window),
        "train_s": sum(1.0 / its[i]["iterations_per_second"] for i in window),
        "mlx_peak_gb": max(r["peak_memory"] for r in its),
        "first_loss": its[0]["train_loss"], "final_loss": its[-1]["train_loss"],
        "trainable_parameters": _after(text, "Trainable parameters: "),
        "padding": f"{1 - sum(b['tokens'] for b in batches) / sum(b['area'] for b in batches):.1%}",
        "blas": blas_seen,
        # What mlx-lm itself would print for the same window: supervised tokens / s.
        "reported_tok_s": sum(reported[i] for i in window) / sum(1.0 / its[i]["iterations_per_second"] for i in window),
        **proc,
    }


def mlx_lm_child(reports: str, lora_args: list[str]) -> None:
    """Run `mlx_lm.lora` as its CLI does, with each training report also written to `reports`.

    Only the reporting hook is replaced (mlx-lm passes the callback its own
    numbers: iteration, loss, iterations/s, tokens/s, trained tokens, peak
    memory); training is mlx-lm's own code path. The first line records which
    BLAS the process mapped, to show the LD_PRELOAD took effect.
    """
    import mlx_lm.lora as lora  # imports mlx.core, so MLX's BLAS is mapped by now
    from mlx_lm.tuner.callbacks import TrainingCallback

    with open("/proc/self/maps") as f:
        paths = {line.split()[-1] for line in f if "/" in line}
    # numpy ships its own (symbol-prefixed) OpenBLAS; only a system libopenblas serves MLX.
    blas = sorted(p for p in paths if "libopenblas" in p and "numpy" not in p)

    class Reports(TrainingCallback):
        def __init__(self):
            self.f = open(reports, "w")
            self.f.write(json.dumps({"blas": f"OpenBLAS mapped: {', '.join(blas)}" if blas
                                     else "no OpenBLAS mapped: the BLAS bundled with mlx[cpu]"}) + "\n")

        def on_train_loss_report(self, info: dict) -> None:
            self.f.write(json.dumps({k: (v.item() if hasattr(v, "item") else v) for k, v in info.items()}) + "\n")
            self.f.flush()

    callback = Reports()
    lora.get_reporting_callbacks = lambda *a, **k: callback
    sys.argv = ["mlx_lm.lora", *lora_args]
    lora.main()


def machine_probe() -> dict:
    """What the machine can do right now: 1-minute load average and float32 matmul GFLOP/s.

    The two tools run minutes apart, on a machine other work may share; each
    result carries this so a skewed comparison can be told from a real one.
    """
    from edgetune.runtime import mlx_core

    mx = mlx_core()
    a = mx.random.normal((1024, 1024), key=mx.random.key(0))
    mx.eval(a @ a)  # first call pays thread start-up
    started = time.perf_counter()
    for _ in range(8):
        mx.eval(a @ a)
    seconds = time.perf_counter() - started
    return {"load_avg_1m": round(os.getloadavg()[0], 2), "matmul_gflops": round(8 * 2 * 1024**3 / seconds / 1e9, 1)}


# --- the report -----------------------------------------------------------------------------------

def rate(r: dict) -> float:
    return r["tokens"] / r["train_s"] if r["train_s"] > 0 else float("nan")


def table(results: list[dict]) -> str:
    head = ("tool", "examples", "steps", "tokens*", "train s*", "tok/s*", "MLX peak GB", "max RSS GB", "wall s",
            "padding", "GFLOP/s, load")
    rows = [head]
    for r in results:
        rows.append((r["tool"], str(r["examples"]), str(r["steps"]), f"{r['tokens']:,}", f"{r['train_s']:.1f}",
                     f"{rate(r):,.0f}", f"{r['mlx_peak_gb']:.2f}", f"{r['max_rss_gb']:.2f}", f"{r['wall_s']:.0f}",
                     str(r["padding"]), f"{r['machine']['matmul_gflops']:.0f}, {r['machine']['load_avg_1m']:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="model shape from edgetune.model.tiny (small, qwen2.5-0.5b, ...)")
    p.add_argument("--arch", default=None, help="qwen2 or llama (default: the preset's own)")
    p.add_argument("--examples", type=int, default=64, help="training examples, one epoch (rounded down to a "
                                                             "multiple of --batch-size)")
    p.add_argument("--steps", type=int, default=None,
                   help="instead of --examples: mlx-lm iterations; examples = steps x batch size")
    p.add_argument("--batch-size", type=int, default=4, help="rows per step for both tools")
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--packing", action="store_true",
                   help="edgetune packs several examples per row (default: its length-grouped batches)")
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=1,
                   help="run each tool N times, alternating which goes first; report each tool's fastest run")
    p.add_argument("--json", dest="json_out", default=None, help="write the numbers to this JSON file")
    p.add_argument("--keep", action="store_true", help="keep the work folder (model, data, logs, runs)")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("--batch-size must be at least 1")
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    if args.steps is not None:
        if args.steps < 2:
            p.error("--steps must be at least 2 (the first step is excluded as warm-up)")
        args.examples = args.steps * args.batch_size
    args.examples -= args.examples % args.batch_size
    if args.examples < 2 * args.batch_size:
        p.error(f"--examples must be at least 2 x --batch-size ({2 * args.batch_size}): "
                "the first step is excluded as warm-up")
    return args


def main(argv: list[str]) -> int:
    if argv[:1] == [CHILD_MODE]:
        mlx_lm_child(argv[1], argv[2:])
        return 0
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench_sft."))
    try:
        t0 = time.perf_counter()
        model = work / "model"
        shape = build_model(model, args.preset, args.arch, args.seed)
        from transformers import AutoTokenizer

        rows, data_stats = make_examples(AutoTokenizer.from_pretrained(model), args.examples, args.max_seq_len,
                                         args.seed)
        data_dir = work / "data"
        data_dir.mkdir()
        write_jsonl(data_dir / "train.jsonl", rows)  # mlx-lm reads {dir}/train.jsonl; no valid split: no eval
        print(f"model: {shape['preset']} ({shape['model_type']}, {shape['parameters'] / 1e6:.1f}M parameters, "
              f"float32), built in {time.perf_counter() - t0:.0f} s", flush=True)
        print(f"data: {json.dumps(data_stats)}", flush=True)

        batches = mlx_lm_batches(model, data_dir, args.batch_size, args.max_seq_len, args.seed)
        runs: dict[str, list[dict]] = {"edgetune": [], "mlx_lm.lora": []}
        for i in range(args.repeat):
            tag = f"_{i + 1}" if args.repeat > 1 else ""
            order = ["edgetune", "mlx_lm.lora"][:: 1 if i % 2 == 0 else -1]  # alternate to cancel load drift
            for tool in order:
                machine = machine_probe()
                print(f"running {tool} ({i + 1}/{args.repeat}; machine: {machine['matmul_gflops']} GFLOP/s "
                      f"matmul, load {machine['load_avg_1m']}) ...", flush=True)
                if tool == "edgetune":
                    result = run_edgetune(work, tag, model, data_dir / "train.jsonl", args)
                else:
                    result = run_mlx_lm(work, tag, model, data_dir, batches, args)
                result["machine"] = machine
                runs[tool].append(result)
                print(f"  {rate(result):,.0f} non-padding tok/s, MLX peak {result['mlx_peak_gb']:.2f} GB", flush=True)
    except UserError:
        shutil.rmtree(work, ignore_errors=True)  # a bad option: nothing worth inspecting
        raise
    except BaseException:
        print(f"work folder kept for inspection: {work}", file=sys.stderr)
        raise
    ours, theirs = (max(runs[t], key=rate) for t in ("edgetune", "mlx_lm.lora"))
    results = [ours, theirs]
    speedup = rate(ours) / rate(theirs)
    peak_ratio = ours["mlx_peak_gb"] / theirs["mlx_peak_gb"]
    rss_ratio = ours["max_rss_gb"] / theirs["max_rss_gb"]
    print()
    print(f"{shape['preset']} model, batch {args.batch_size} x {args.max_seq_len}, LoRA r{LORA_RANK} "
          f"alpha {LORA_ALPHA:g} on {len(TARGETS)} linear layers x {shape['layers']} blocks, float32, "
          f"{args.examples} examples (one epoch)")
    print(table(results))
    print("* over every step but the first (compile warm-up); tokens = non-padding tokens processed"
          + (f"; fastest of {args.repeat} runs each" if args.repeat > 1 else ""))
    print(f"edgetune / mlx_lm: tokens/s {speedup:.2f}x, MLX peak memory {peak_ratio:.2f}x, max RSS {rss_ratio:.2f}x")
    goal = speedup >= 2.0 and peak_ratio <= 1.0
    print(f"goal (>= 2x tokens/s at <= peak memory): {'met' if goal else 'not met'}")
    print(f"trainable parameters: edgetune {ours['trainable_parameters']:,}, "
          f"mlx_lm {theirs['trainable_parameters']}")
    print(f"BLAS: edgetune {ours['blas']}; mlx_lm {theirs['blas']}")
    print(f"loss first -> last: edgetune {ours['first_loss']:.3f} -> {ours['final_loss']:.3f}, "
          f"mlx_lm {theirs['first_loss']:.3f} -> {theirs['final_loss']:.3f}")
    if args.json_out:
        from edgetune.fileio import write_json

        for r in runs["edgetune"] + runs["mlx_lm.lora"]:
            r["tok_s"] = rate(r)
        write_json(args.json_out, {
            "settings": {k: v for k, v in vars(args).items() if k != "json_out"},
            "model": shape, "data": data_stats, "results": results, "all_runs": runs,
            "ratios": {"tok_s": speedup, "mlx_peak": peak_ratio, "max_rss": rss_ratio}, "goal_met": goal,
        })
    if args.keep:
        print(f"work folder kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
