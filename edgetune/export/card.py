"""The model card (README.md) every export carries, and the quantization check it reports.

Provenance comes from the run folder when SOURCE is one: `manifest.json`
(resolved recipe, base model, data files with sha256) and `summary.json`
(losses, steps). The quantization check evaluates the run's eval split
(tokenised exactly as `edgetune sft` does) on the exported model and on the
reference — base + adapter as trained, unquantized and unfused — and puts the
two losses side by side. A rise above `max_loss_increase` nats per supervised
token is flagged as a warning in the card, in export.json and on the console.

Why an absolute threshold in nats: the loss is a mean log-likelihood, so
`exported - reference` is the log of the perplexity ratio; 0.05 nats means
perplexity up by 5.1% whatever the starting loss, where a relative threshold
would be meaningless near a loss of 0.
"""

from __future__ import annotations

import gc
import json
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

from edgetune.errors import UserError

DEFAULT_MAX_LOSS_INCREASE = 0.05  # nats per supervised token: perplexity x1.051
DEFAULT_MAX_SEQ_LEN = 2048
DEFAULT_BATCH_SIZE = 4


@dataclass
class EvalSpec:
    """Where the eval rows come from and how the run tokenised them."""

    data: object  # a recipe DataConfig, or a path (file or data build folder)
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN
    truncation: str = "left"
    batch_size: int = DEFAULT_BATCH_SIZE
    max_batches: int | None = None
    origin: str = ""  # for the card: where this spec came from
    trained_hashes: dict | None = None  # the run manifest's data_files (path -> sha256)


def eval_spec(manifest: dict | None, eval_data: str | None) -> EvalSpec | None:
    """`--eval-data` if given, else the run's own eval split with the run's tokenisation settings."""
    settings = {}
    if manifest is not None:
        stage = (manifest.get("recipe") or {}).get(manifest.get("stage", "sft")) or {}
        settings = {"max_seq_len": stage.get("max_seq_len", DEFAULT_MAX_SEQ_LEN),
                    "truncation": stage.get("truncation", "left"),
                    "batch_size": stage.get("batch_size", DEFAULT_BATCH_SIZE),
                    "max_batches": stage.get("eval_batches")}
    if eval_data is not None:
        return EvalSpec(eval_data, origin=f"--eval-data {eval_data}", **settings)
    if manifest is None or "data" not in (manifest.get("recipe") or {}):
        return None
    from edgetune.recipe import DataConfig

    data = DataConfig(**manifest["recipe"]["data"])
    return EvalSpec(data, origin="the run's eval split", trained_hashes=manifest.get("data_files"), **settings)


def _eval_batches(spec: EvalSpec, tokenizer, vocab_size: int) -> tuple[list, dict]:
    from edgetune.fileio import sha256_file
    from edgetune.sft import to_micro_batch
    from edgetune.sft_data import data_files, load_sft_rows, make_batches, tokenize_dataset

    rows = load_sft_rows(spec.data, "eval")
    examples, stats = tokenize_dataset(rows, tokenizer, spec.max_seq_len, spec.truncation, vocab_size)
    files = [str(p) for p in data_files(spec.data, "eval")]
    changed = [f for f in files if spec.trained_hashes and f in spec.trained_hashes
               and sha256_file(f) != spec.trained_hashes[f]]
    batches = [to_micro_batch(b) for b in make_batches(examples, spec.batch_size, spec.max_seq_len, False, 0, 0)]
    if spec.max_batches:
        batches = batches[: spec.max_batches]
    info = {"examples": len(examples), "supervised_tokens": stats.get("supervised_tokens", 0),
            "batches": len(batches), "files": files, "origin": spec.origin,
            "changed_since_training": changed}
    return batches, info


def quantization_check(reference: tuple[Path, Path | None], exported: Path, spec: EvalSpec | None,
                       max_increase: float, label: str, echo: Callable[[str], None]) -> dict:
    """Eval loss of `exported` next to the reference (base, adapter) loaded by mlx-lm.

    Returns a dict for export.json: losses, perplexities, the increase and
    whether it is within `max_increase`; or `{"skipped": reason}` when there is
    no eval data (the card then says so). Raises UserError for unreadable eval data.
    """
    if spec is None:
        return {"skipped": "no eval data: SOURCE is not a run folder with an eval split; pass --eval-data "
                           "FILE_OR_DATA_FOLDER to run the check"}
    from mlx_lm import load

    from edgetune.sft import evaluate_loss

    t0 = time.perf_counter()
    base, adapter = reference
    echo(f"checking: eval loss of the reference (base{' + adapter' if adapter else ''}) and of the export ({label})")
    model, tokenizer, config = load(str(base), adapter_path=str(adapter) if adapter else None, return_config=True)
    try:
        batches, info = _eval_batches(spec, tokenizer, config["vocab_size"])
    except UserError as e:  # e.g. a preference run's eval rows are pairs, not SFT rows: say so, export anyway
        echo(f"warning: quantization check skipped: {spec.origin}: {e}")
        return {"skipped": f"{spec.origin} could not be read as SFT rows ({str(e).splitlines()[0]})"}
    if not batches:
        return {"skipped": f"no eval data: {spec.origin} has no eval rows", **info}
    ref = evaluate_loss(model, batches)
    del model
    gc.collect()
    model, _ = load(str(exported))
    out = evaluate_loss(model, batches)
    del model
    gc.collect()
    increase = out["loss"] - ref["loss"]
    result = {"reference": ref, "exported": out, "increase": increase, "max_increase": max_increase,
              "ok": bool(increase <= max_increase), "elapsed_s": round(time.perf_counter() - t0, 2), **info}
    echo(f"  reference loss {ref['loss']:.4f} (ppl {ref['perplexity']:.3f}), export {out['loss']:.4f} "
         f"(ppl {out['perplexity']:.3f}): {increase:+.4f} nats")
    if not result["ok"]:
        echo(f"warning: quantization raised the eval loss by {increase:.4f} nats (> {max_increase}); "
             "try 8bit or a smaller --group-size")
    return result


def gguf_readback_folder(gguf_file: Path, fused_dir: Path, dest: Path) -> Path:
    """A model folder holding the GGUF file's weights, dequantized by the `gguf` package's reference
    code, for the quantization check: the loss then measures exactly the rounding in the file.

    Names and llama's q/k row order are mapped back with the GGUF writer's own functions. Written one
    tensor at a time in the fused model's dtypes, beside a copy of its config and tokenizer files.
    llama.cpp's kernels are not involved (they compute in their own precision).
    """
    import shutil

    import gguf
    import numpy as np

    from edgetune.export.fuse import Deferred, TensorGroup, write_groups
    from edgetune.export.gguf import gguf_name, llama_row_order, read_hyper
    from edgetune.runtime import mlx_core

    mx = mlx_core()
    hp = read_hyper(fused_dir)
    tensors = {t.name: t for t in gguf.GGUFReader(str(gguf_file)).tensors}
    fused = mx.load(str(fused_dir / "model.safetensors"))  # lazy: only shapes and dtypes are read here
    names = sorted(fused)

    def values(name: str):
        g = gguf_name(name)
        if g is None or g not in tensors:
            return fused[name]  # nothing in the file to compare with: keep the fused tensor
        t = tensors[g]
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(fused[name].shape)
        if hp.arch == "llama" and (".q_proj." in name or ".k_proj." in name) and w.ndim == 2:
            heads = hp.heads if ".q_proj." in name else hp.kv_heads
            src = np.empty_like(w)
            src[llama_row_order(w.shape[0], heads)] = w  # undo the writer's permutation
            w = src
        return mx.array(w).astype(fused[name].dtype)

    dest.mkdir()
    for file in fused_dir.iterdir():
        if file.is_file() and file.name != "model.safetensors":
            shutil.copy2(file, dest / file.name)
    # One tensor per group, made when written: each is dequantized, written and dropped in turn.
    groups = [TensorGroup(n, [(n, Deferred(fused[n].shape, fused[n].dtype, partial(values, n)))], "read back")
              for n in names]
    write_groups(dest / "model.safetensors", groups, {"format": "pt"})
    return dest


# --- rendering ----------------------------------------------------------------------------------

def folder_size(folder: Path, skip: tuple[str, ...] = ("README.md", "export.json")) -> tuple[int, dict]:
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name not in skip}
    return sum(files.values()), files


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


_LIBRARY = {"mlx": "mlx", "gguf": "gguf", "peft": "peft", "adapter": "mlx"}


def usage(fmt: str, folder: str, base: str, files: dict) -> list[str]:
    """How to run the export, per format (shell commands in a fenced block)."""
    if fmt == "mlx":
        return ["```bash", f'mlx_lm.generate --model {folder} --prompt "Hello"',
                f"mlx_lm.server --model {folder} --port 8080    # OpenAI-compatible API", "```",
                "LM Studio (Apple Silicon): copy this folder to `~/.lmstudio/models/<you>/<name>/`."]
    if fmt == "gguf":
        gguf = next((f for f in files if f.endswith(".gguf")), "model.gguf")
        return ["```bash", f'llama-cli -m {folder}/{gguf} -cnv', f"llama-server -m {folder}/{gguf}",
                f"ollama create my-model -f {folder}/Modelfile && ollama run my-model", "```"]
    if fmt == "peft":
        return ["```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM",
                f'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base}"), "{folder}")',
                "```", "```bash", f"vllm serve {base} --enable-lora --lora-modules my-adapter={folder}", "```"]
    return ["```bash", f'mlx_lm.generate --model {base} --adapter-path {folder} --prompt "Hello"', "```"]


def render_card(info: dict) -> str:
    """README.md text from the export summary (`export.json`'s content plus run provenance).

    `info` keys: format, description, folder, base_model, size_bytes, files,
    check, adapter (dict or None), manifest (or None), summary (or None),
    warnings, edgetune, created.
    """
    fmt, base = info["format"], info["base_model"]
    manifest, summary, check = info.get("manifest"), info.get("summary"), info.get("check")
    lines = ["---", f"library_name: {_LIBRARY[fmt]}", f"base_model: {json.dumps(base)}",
             "tags: [" + ", ".join(["edgetune"] + (["lora"] if info.get("adapter") else [])
                                   + (["mlx"] if fmt in ("mlx", "adapter") else [])) + "]", "---", "",
             f"# {Path(info['folder']).name}", "",
             f"{info['description']}, exported by edgetune {info['edgetune']} on {info['created']}.", "",
             f"- **Base model:** `{base}`",
             f"- **Quantization:** {info.get('quantization') or 'none'}",
             f"- **Size on disk:** {human_bytes(info['size_bytes'])} ({info['size_bytes']:,} bytes: "
             + ", ".join(f"{k} {human_bytes(v)}" for k, v in info["files"].items()) + ")"]
    adapter = info.get("adapter")
    if adapter:
        lines.append(f"- **Adapter:** `{adapter['path']}` (LoRA rank {adapter['rank']}, alpha {adapter['alpha']:g}, "
                     f"scale {adapter['scale']:g}; {', '.join(adapter['keys'])} in {len(adapter['layers'])} layers)")
    for warning in info.get("warnings", []):
        lines += ["", f"> **Warning:** {warning}"]
    lines += ["", "## Use it", "", *usage(fmt, info["folder"], base, info["files"]), "", "## Quantization check", ""]
    lines += _check_lines(check, info.get("quantization"))
    lines += ["", "## Provenance", ""]
    if manifest is None:
        lines.append(f"Exported from `{info['source']}` ({info['source_kind']}); no run folder, so no training "
                     "record.")
    else:
        lines += _provenance_lines(manifest, summary)
    return "\n".join(lines) + "\n"


def _check_lines(check: dict | None, quantization: str | None) -> list[str]:
    if check is None:
        return ["Not applicable: this export holds the adapter's tensors unchanged (at most transposed and renamed), "
                "so it computes exactly what the trained adapter does."]
    if "skipped" in check:
        return [f"Not run: {check['skipped']}."]
    ref, out = check["reference"], check["exported"]
    verdict = ("within" if check["ok"] else "**above**") + f" the limit of {check['max_increase']} nats"
    lines = ["| model | eval loss (nats/token) | perplexity |", "|---|---|---|",
             f"| reference: base + adapter, unquantized | {ref['loss']:.4f} | {ref['perplexity']:.3f} |",
             f"| this export ({quantization or 'unquantized'}) | {out['loss']:.4f} | {out['perplexity']:.3f} |", "",
             f"Loss change {check['increase']:+.4f} nats (perplexity x{math.exp(check['increase']):.3f}): {verdict}. "
             f"Measured on {check['examples']} examples ({check['supervised_tokens']:,} supervised tokens, "
             f"{check['batches']} batch{'es' if check['batches'] != 1 else ''}) from {check['origin']}: " + ", ".join(f"`{f}`" for f in check["files"]) + "."]
    if check.get("note"):
        lines.append(check["note"])
    if check.get("changed_since_training"):
        lines.append(f"Note: {', '.join(check['changed_since_training'])} changed since training (sha256 differs).")
    return lines


def _provenance_lines(manifest: dict, summary: dict | None) -> list[str]:
    import yaml

    recipe = manifest.get("recipe", {})
    stage = manifest.get("stage", "?")
    lines = [f"- **Training stage:** `edgetune {stage}`, {manifest.get('steps', '?')} steps, "
             f"{manifest.get('trainable_parameters', 0):,} trainable parameters",
             f"- **Base model as trained:** `{recipe.get('model')}` (loaded from `{manifest.get('model_path')}`; "
             f"{manifest.get('dtype', '')})"]
    if recipe.get("quantize"):
        lines.append(f"- **Trained with QLoRA:** base quantized to {recipe['quantize']} at load; the adapter is "
                     "merged into the unquantized base weights here")
    if summary:
        ev = summary.get("final_eval") or {}
        if summary.get("final_loss") is not None:
            lines.append(f"- **Train loss:** {summary['first_loss']:.4f} -> {summary['final_loss']:.4f}")
        if ev:
            # SFT evals carry a perplexity; preference stages report their own metrics (accuracy, margin).
            extra = ", ".join(f"{k} {v:.4f}" for k, v in ev.items() if k != "loss" and isinstance(v, (int, float)))
            lines.append(f"- **Eval loss at the end of training:** {ev['loss']:.4f}" + (f" ({extra})" if extra else ""))
        if summary.get("elapsed_s") is not None:
            lines.append(f"- **Training time:** {summary['elapsed_s']:.1f} s")
    env = manifest.get("environment") or {}
    if env:
        lines.append(f"- **Trained with:** edgetune {env.get('edgetune')}, mlx {env.get('mlx')}, "
                     f"mlx-lm {env.get('mlx_lm')} on {env.get('device')}")
    lines += ["", "### Data", "", "| file | sha256 |", "|---|---|"]
    lines += [f"| `{path}` | `{digest}` |" for path, digest in (manifest.get("data_files") or {}).items()]
    lines += ["", "### Recipe (resolved)", "", "```yaml",
              yaml.safe_dump(recipe, sort_keys=False, default_flow_style=False).rstrip(), "```"]
    return lines


def read_run_records(run: Path | None) -> tuple[dict | None, dict | None]:
    """(manifest.json, summary.json) of a run folder, None where absent."""
    if run is None:
        return None, None
    out = []
    for name in ("manifest.json", "summary.json"):
        path = run / name
        try:
            out.append(json.loads(path.read_text()) if path.is_file() else None)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e.msg}); is the run folder damaged?") from None
    return out[0], out[1]
