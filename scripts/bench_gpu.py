"""edgetune's torch backend vs TRL on one CUDA GPU: SFT tokens/s, DPO pairs/s, peak memory — one run.

Same random-init qwen2.5-0.5b-shaped model (`edgetune model tiny --preset qwen2.5-0.5b`, bf16;
throughput does not depend on the weights), same rows, same LoRA (r16, alpha 32, all linear
layers of every block), bf16, batch 8, max length 1024, AdamW, lr 1e-5. Each side runs in its own
process so that peak memory (torch.cuda.max_memory_allocated) is its own.

The data is a *length mix*, as real chat feedback is: prompts and answers of 16-600 words each,
log-uniform (most turns short, a few long), so rows are ~40-1024 tokens, ~300 on average. Each tool handles it its own default way — TRL pads every batch to
its longest row; edgetune packs SFT rows, and DPO pairs, padding-free into 8 rows of 1024 positions
(`packing: true`: a step then holds as many whole pairs as fit, ~7 here, where TRL's holds 8).
Throughput counts real (non-padding) tokens / pairs only.

- TRL SFTTrainer (prompt/completion conversational rows: loss on the completion, TRL's default)
  and DPOTrainer (its default: reference log-probs from the same PEFT model with the adapter off,
  every step). Timed after 3 warm-up steps, as ../shared/anchors/gpu_anchor_bench.py does.
- edgetune `run_sft` / `run_preference(..., "dpo")` with `backend: torch`, timed by the same rule
  (the steps after the first 3: torch.compile traces in those, once per run); the whole-run figure
  is reported too. DPO is charged its full reference pass (one forward of every pair, compile
  included), prorated to the pairs timed (the reference pass is eager, so "compile included" is
  nothing now). Part-name suffixes give variants of the same run: `_ckpt` sets
  `grad_checkpoint: true` (less memory, one more forward), `_nocg` turns CUDA graphs off (torch.compile
  mode default), `_keepall` sets the activation budget to 1 (no recompute), `_nopack` trains DPO on
  batches of 8 similar-length pairs, one sequence per row (dynamic shapes, no CUDA graphs),
  `_buckets` pads those rows to multiples of 256 positions (static shapes, CUDA graphs; an experiment),
  `_eagerhead` computes the output head's softmax in eager float32 passes instead of the
  default compiled expression (EDGETUNE_TORCH_FUSED_HEAD=0), and `_accum2` takes each step in two micro-batches
  of half the rows (`grad_accumulation: 2`), with CUDA graphs as for one micro-batch
  (`_accum2_nocg`: without them). Each variant's closing line compares it with the default part of its kind.
- Each edgetune part also reports what explains its speed: every micro-batch's [B, T], torch.compile's
  counters, its first losses (variants must agree) and a torch.profiler table of 3 more steps run
  after the timed ones.

Usage: python scripts/bench_gpu.py [--tiny] [--steps 20] [--out result.json]
(--tiny: a small model and short rows, to check the script on a CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BATCH, MAX_LEN, RANK, WARM, PROFILED = 8, 1024, 16, 3, 3
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WORDS = ("the a model reply short long user answer data edge tune fast memory pair chosen rejected feedback "
         "device laptop serve export quantize adapter prompt context turn correction thumbs").split()


def text(rng: random.Random, lo: int, hi: int) -> str:
    """lo..hi words, log-uniform: most turns are short, a few are long (as chat feedback is)."""
    k = int(math.exp(rng.uniform(math.log(lo), math.log(hi + 1))))
    return " ".join(rng.choices(WORDS, k=k))


def make_rows(n: int, tiny: bool, seed: int) -> tuple[list, list]:
    rng = random.Random(seed)
    hi = 40 if tiny else 600
    sft = [{"prompt": [{"role": "user", "content": text(rng, 16, hi)}],
            "completion": [{"role": "assistant", "content": text(rng, 16, hi)}]} for _ in range(n)]
    # DPO: a prompt and two answers (of different lengths, as corrections are).
    dhi = 20 if tiny else 400
    dpo = [{"prompt": [{"role": "user", "content": text(rng, 16, dhi)}],
            "chosen": [{"role": "assistant", "content": text(rng, 16, dhi)}],
            "rejected": [{"role": "assistant", "content": text(rng, 16, dhi)}]} for _ in range(n)]
    return sft, dpo


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def peak_gb() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if cuda() else float("nan")


# --- TRL ---------------------------------------------------------------------------------------

def run_trl(kind: str, args, work: Path) -> dict:
    import datasets.fingerprint
    import torch
    import transformers
    from datasets import Dataset

    # As the anchor does: datasets' fingerprinting pickles whole objects (slow, and fails on some
    # pyarrow types); a random fingerprint only turns its cache off.
    datasets.fingerprint.Hasher.hash = classmethod(lambda cls, value: os.urandom(8).hex())
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = "cuda" if cuda() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    tok = AutoTokenizer.from_pretrained(args.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa").to(dev)
    model.config.use_cache = False
    lora = LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    rows = [json.loads(x) for x in (work / f"{kind}.jsonl").read_text().splitlines()]
    common = dict(output_dir=str(work / f"trl-{kind}"), per_device_train_batch_size=args.batch,
                  max_steps=args.steps + WARM, logging_steps=10**6, save_strategy="no", report_to=[],
                  bf16=(dev == "cuda"), learning_rate=1e-5, gradient_checkpointing=False,
                  dataloader_num_workers=0, max_length=args.max_len, seed=0)
    timer = {}

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if state.global_step == WARM:
                if dev == "cuda":
                    torch.cuda.synchronize()
                timer["t"] = time.perf_counter()

    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if kind == "sft":
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(model=model, args=SFTConfig(packing=False, **common), train_dataset=Dataset.from_list(rows),
                             processing_class=tok, peft_config=lora)
        lengths = [len(r["input_ids"]) for r in trainer.train_dataset]
    else:
        from trl import DPOConfig, DPOTrainer

        trainer = DPOTrainer(model=model, args=DPOConfig(**common), train_dataset=Dataset.from_list(rows),
                             processing_class=tok, peft_config=lora)
        sample = trainer.train_dataset[0]
        pkey = "prompt_ids" if "prompt_ids" in sample else "prompt_input_ids"
        ckey = "chosen_ids" if "chosen_ids" in sample else "chosen_input_ids"
        rkey = "rejected_ids" if "rejected_ids" in sample else "rejected_input_ids"
        lengths = [len(r[pkey]) * 2 + len(r[ckey]) + len(r[rkey]) for r in trainer.train_dataset]
    trainer.add_callback(Clock())
    trainer.train()
    if dev == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - timer["t"]
    mean_tokens = sum(lengths) / len(lengths)
    items = args.batch * args.steps
    out = {"side": f"trl_{kind}", "timed_steps": args.steps, "seconds": dt, "peak_gib": peak_gb(),
           "mean_tokens_per_row": mean_tokens, "trl": __import__("trl").__version__}
    if kind == "sft":
        out["tok_s"] = items * mean_tokens / dt
    else:
        out["pairs_s"] = items / dt
    return out


# --- edgetune ----------------------------------------------------------------------------------

def edgetune_recipe(kind: str, args, work: Path, steps: int, tag: str, checkpointing: bool = False) -> Path:
    """The recipe of one edgetune run; its data file holds exactly the rows it trains on (so the
    DPO reference pass scores no pair that is not trained)."""
    section = {"lora": {"rank": RANK, "alpha": 2 * RANK, "dropout": 0.0}, "steps": steps,
               "batch_size": args.batch, "learning_rate": 1e-5, "max_seq_len": args.max_len,
               "save_every": 0, "log_every": 5}
    # Both pack (padding-free, one static [batch, max_len] shape); `_nopack` DPO parts take
    # batch_size similar-length pairs per step instead, as TRL does.
    section["packing"] = kind == "sft" or "_nopack" not in args.part
    if checkpointing:
        section["grad_checkpoint"] = True
    if "_accum2" in args.part:  # the same positions per step, in two micro-batches
        section["batch_size"], section["grad_accumulation"] = args.batch // 2, 2
    recipe = {"model": str(args.model), "backend": "torch", "output": str(work / f"edgetune-{kind}-{tag}"),
              "data": {"train": [str(work / f"{kind}-edgetune-{tag}.jsonl")]}, kind: section}
    path = work / f"edgetune-{kind}-{tag}.yaml"
    path.write_text(json.dumps(recipe))
    return path


class Diagnostics:
    """What explains a run's speed, gathered in its process: each micro-batch's [B, T] (in order),
    torch.compile's counters, and a torch.profiler table of the last PROFILED steps (run after the
    timed window, so profiling costs the timing nothing)."""

    def __init__(self, first_profiled_step: int):
        from edgetune.backends.torch_backend import TorchBackend

        self.shapes, self.table, self.step, self.attention = [], None, 0, None
        self.reference = []  # [rows, T, ms] per reference-pass call (synchronised: a few us each)
        self.first = first_profiled_step
        self.profiler = None
        diag = self
        make_update, micro_batch = TorchBackend.make_update, TorchBackend.micro_batch

        def patched_micro_batch(backend, batch, packing=False):
            mb = micro_batch(backend, batch, packing)
            diag.attention = backend.attn
            diag.shapes.append(list(mb.arrays[0].shape))
            return mb

        def patched_make_update(backend, *a, **kw):
            update = make_update(backend, *a, **kw)

            def wrapped(*ua, **ukw):
                out = update(*ua, **ukw)
                diag.after_step()
                return out

            return wrapped

        sequence_logprobs = TorchBackend.sequence_logprobs

        def patched_sequence_logprobs(backend, model, tokens, *rest):
            import torch

            if torch.is_grad_enabled() or not cuda():
                return sequence_logprobs(backend, model, tokens, *rest)
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = sequence_logprobs(backend, model, tokens, *rest)
            torch.cuda.synchronize()
            diag.reference.append([*tokens.shape, round((time.perf_counter() - t) * 1000, 1)])
            return out

        TorchBackend.micro_batch, TorchBackend.make_update = patched_micro_batch, patched_make_update
        TorchBackend.sequence_logprobs = patched_sequence_logprobs

    def after_step(self) -> None:
        import torch

        self.step += 1
        if not cuda():
            return
        if self.step == self.first - 1:
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                               torch.profiler.ProfilerActivity.CUDA])
            self.profiler.__enter__()
        elif self.profiler is not None and self.step >= self.first - 1 + PROFILED:
            torch.cuda.synchronize()
            self.profiler.__exit__(None, None, None)
            averages = self.profiler.key_averages()
            self.table = {"by_cuda_time": averages.table(sort_by="cuda_time_total", row_limit=40,
                                                         max_name_column_width=70),
                          "by_self_cpu_time": averages.table(sort_by="self_cpu_time_total", row_limit=30,
                                                             max_name_column_width=70)}
            self.profiler = None

    def report(self) -> dict:
        import torch._dynamo.utils as du

        counters = {k: dict(v) for k, v in du.counters.items() if k in ("stats", "recompiles", "graph_break")}
        return {"micro_batch_shapes": self.shapes, "reference_calls": self.reference, "dynamo": counters,
                "profile": self.table}


def run_edgetune(kind: str, args, work: Path, checkpointing: bool = False) -> dict:
    """One edgetune run; timed like TRL: the steps after the first WARM (torch.compile traces in
    those, once per process; a real run pays that once). For DPO the reference pass (which also
    compiles its no-grad graph) is charged in full, prorated to the pairs timed. PROFILED more steps
    run after the timed ones under torch.profiler (see `Diagnostics`)."""
    from edgetune.recipe import load_recipe

    tag = "measured"
    diag = Diagnostics(first_profiled_step=args.steps + WARM + 1)
    recipe_path = edgetune_recipe(kind, args, work, args.steps + WARM + PROFILED, tag, checkpointing)
    recipe = load_recipe(recipe_path)
    echo = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    if kind == "sft":
        from edgetune.sft import run_sft

        s = run_sft(recipe, force=True, echo=echo)
    else:
        from edgetune.preference import run_preference

        s = run_preference(recipe, "dpo", force=True, echo=echo)
    wall = time.perf_counter() - t0
    records = [json.loads(x) for x in (work / f"edgetune-{kind}-{tag}" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("tok_s")]
    timed = steps[WARM: WARM + args.steps]
    seconds = sum(r["tokens"] / r["tok_s"] for r in timed)
    out = {"side": args.part, "timed_steps": len(timed),
           "seconds": seconds, "step_tok_s": [round(r["tok_s"]) for r in steps], "wall_s": wall,
           "train_s": s["elapsed_s"], "peak_gib": peak_gb()}
    if kind == "sft":
        out["tokens"] = sum(r["tokens"] for r in timed)
        out["tok_s"] = out["tokens"] / seconds
        out["tok_s_whole_run"] = s["tokens"] / s["elapsed_s"]
    else:
        # Packed steps hold as many pairs as fit in batch x max_len positions, so count them.
        pairs = sum(r["items"] for r in timed)
        # The reference pass scored each pair of the file once: charge the pairs timed their share.
        in_file = len((work / f"dpo-edgetune-{tag}.jsonl").read_text().splitlines())
        ref = s["reference_s"] * pairs / in_file
        out.update({"pairs": pairs, "pairs_per_step": pairs / len(timed), "reference_s_total": s["reference_s"],
                    "reference_s_charged": ref, "pairs_s": pairs / (seconds + ref),
                    "pairs_s_loop_only": pairs / seconds,
                    "pairs_s_whole_run": s["items_trained"] / (s["elapsed_s"] + s["reference_s"])})
    out["attention"] = diag.attention
    out["first_losses"] = [round(r["loss"], 4) for r in steps[:6]]  # variants of one run must agree
    out.update(diag.report())
    return out


# --- driver ------------------------------------------------------------------------------------

def matmul_tflops() -> float | None:
    if not cuda():
        return None
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * 10 / (time.perf_counter() - t) / 1e12


def flops_per_token(model: Path) -> float:
    """Training FLOPs per token as the anchor counts them: 4 x (non-embedding params + head)."""
    c = json.loads((model / "config.json").read_text())
    d, f, L, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = d // c["num_attention_heads"] * c["num_key_value_heads"]
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * f
    return 4 * (L * per_layer + d * v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="small model and rows: check the script on a CPU")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--parts", default="trl_sft,edgetune_sft,trl_dpo,edgetune_dpo,edgetune_sft_ckpt",
                    help="edgetune parts: _ckpt for grad_checkpoint: true, _nocg for no CUDA graphs (compile mode "
                         "default), _keepall for activation budget 1 (no recompute), _nopack for DPO on "
                         "plain rows (8 pairs per step), _buckets for EDGETUNE_TORCH_PLAIN_BUCKETS=1 (with "
                         "_nopack: plain rows in static length buckets, CUDA graphs), _eagerhead for "
                         "EDGETUNE_TORCH_FUSED_HEAD=0 (the head's softmax in eager passes), _accum2 for 2 micro-batches a "
                         "step with CUDA graphs")
    ap.add_argument("--work", type=Path)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--part", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.batch = 2 if args.tiny else BATCH
    args.max_len = 256 if args.tiny else MAX_LEN

    if args.part:
        kind = args.part.split("_")[1]
        if args.part.startswith("trl"):
            result = run_trl(kind, args, args.work)
        else:
            result = run_edgetune(kind, args, args.work, checkpointing="_ckpt" in args.part)
        print("RESULT " + json.dumps(result), flush=True)
        return

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    report = {"device": None, "steps": args.steps, "batch": args.batch, "max_len": args.max_len, "rank": RANK}
    if cuda():
        import torch

        report["device"] = torch.cuda.get_device_name(0)
        report["bf16_matmul_tflops"] = matmul_tflops()

    if args.model is None:
        from edgetune.model.tiny import build_tiny_model

        args.model = work / "model"
        t = time.perf_counter()
        if not args.model.exists():
            build_tiny_model(args.model, preset="tiny" if args.tiny else "qwen2.5-0.5b", pretrain=False)
        report["model_build_s"] = time.perf_counter() - t
    report["flops_per_token"] = flops_per_token(args.model)
    n = (args.steps + WARM + 2) * args.batch * 2
    sft, dpo = make_rows(n, args.tiny, 0)
    (work / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    (work / "dpo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dpo))
    # edgetune reads the same rows: SFT as messages (loss on the answer), DPO as prompt/chosen/rejected.
    sft_rows = [json.dumps({"messages": r["prompt"] + r["completion"]}) + "\n" for r in sft]
    dpo_rows = [json.dumps(r) + "\n" for r in dpo]
    # The DPO file holds exactly the pairs trained (one epoch, so the reference pass scores nothing
    # extra); the SFT file is the rows TRL gets.
    (work / "sft-edgetune-measured.jsonl").write_text("".join(sft_rows))
    (work / "dpo-edgetune-measured.jsonl").write_text("".join(dpo_rows[: (args.steps + WARM) * args.batch]))

    results = {}
    for part in args.parts.split(","):
        t = time.perf_counter()
        cmd = [sys.executable, __file__, "--part", part, "--work", str(work), "--model", str(args.model),
               "--steps", str(args.steps)] + (["--tiny"] if args.tiny else [])
        env = dict(os.environ)
        if "_nocg" in part:  # no CUDA graphs (torch.compile's default mode) for static packed rows
            env["EDGETUNE_TORCH_COMPILE_MODE"] = "default"
        if "_buckets" in part:  # plain rows padded to multiples of 256: static shapes, CUDA graphs
            env["EDGETUNE_TORCH_PLAIN_BUCKETS"] = "1"
        if "_keepall" in part:  # the compiler keeps every activation (no recompute)
            env["EDGETUNE_TORCH_ACTIVATION_BUDGET"] = "1"
        if "_eagerhead" in part:  # the head's softmax in eager float32 passes, not compiled
            env["EDGETUNE_TORCH_FUSED_HEAD"] = "0"
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            results[part] = {"error": proc.stderr[-2500:]}
            print(f"{part} failed (exit {proc.returncode}):\n{proc.stderr[-2500:]}", flush=True)
        else:
            results[part] = json.loads(line[len("RESULT "):])
            results[part]["process_s"] = time.perf_counter() - t
            print(part, json.dumps(results[part]), flush=True)
        report["results"] = results
        if args.out:
            args.out.write_text(json.dumps(report, indent=2))

    def ratio(a, b, key):
        ra, rb = results.get(a, {}), results.get(b, {})
        return ra[key] / rb[key] if key in ra and key in rb and rb[key] else None

    report["sft_tok_s_ratio"] = ratio("edgetune_sft", "trl_sft", "tok_s")
    report["sft_peak_ratio"] = ratio("edgetune_sft", "trl_sft", "peak_gib")
    report["dpo_pairs_s_ratio"] = ratio("edgetune_dpo", "trl_dpo", "pairs_s")
    report["dpo_peak_ratio"] = ratio("edgetune_dpo", "trl_dpo", "peak_gib")
    report["sft_ckpt_tok_s_ratio"] = ratio("edgetune_sft_ckpt", "trl_sft", "tok_s")
    report["sft_ckpt_peak_ratio"] = ratio("edgetune_sft_ckpt", "trl_sft", "peak_gib")
    if report.get("bf16_matmul_tflops"):
        for part in results:
            if "_sft" in part and "tok_s" in results[part]:
                results[part]["mfu"] = results[part]["tok_s"] * report["flops_per_token"] / (
                    report["bf16_matmul_tflops"] * 1e12)
    print("FINAL " + json.dumps({k: v for k, v in report.items() if k != "results"}), flush=True)
    if report["sft_tok_s_ratio"]:
        print(f"SFT: edgetune / TRL = {report['sft_tok_s_ratio']:.2f}x tokens/s at {report['sft_peak_ratio']:.2f}x "
              f"peak memory (goal >= 2.5x at <= 0.5x)")
    if report["sft_ckpt_tok_s_ratio"]:
        print(f"SFT, grad_checkpoint: edgetune / TRL = {report['sft_ckpt_tok_s_ratio']:.2f}x tokens/s at "
              f"{report['sft_ckpt_peak_ratio']:.2f}x peak memory")
    if report["dpo_pairs_s_ratio"]:
        print(f"DPO: edgetune / TRL = {report['dpo_pairs_s_ratio']:.2f}x pairs/s at {report['dpo_peak_ratio']:.2f}x "
              f"peak memory (goal >= 2x)")
    for part in results:  # each variant against the default run of its kind
        base = "edgetune_sft" if "_sft" in part else "edgetune_dpo"
        key = "tok_s" if "_sft" in part else "pairs_s"
        if part.startswith("edgetune_") and part != base and ratio(part, base, key):
            mfu = results[part].get("mfu")
            print(f"{part} / {base}: {ratio(part, base, key):.3f}x {key}, {ratio(part, base, 'peak_gib'):.2f}x peak "
                  f"memory" + (f", MFU {mfu:.1%}" if mfu else ""))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
