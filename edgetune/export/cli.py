"""`edgetune export SOURCE --format mlx|gguf|peft|adapter --out DIR`: one visible flow.

SOURCE is recognised by what it holds:

- a run folder: `manifest.json` + `adapter/` (the base is the run's model; the
  card gets the run's recipe, data hashes and losses);
- an adapter folder: `adapter_config.json` with `adapters.safetensors` (mlx-lm)
  or `adapter_model.safetensors`/`peft_type` (PEFT). The base is `--base`, else
  what the adapter records (`base_model`, `base_model_name_or_path`), else the
  run it sits in (`RUN/adapter`, `RUN/checkpoints/best`);
- a model folder: `config.json` (export = convert/quantize, no adapter).

Formats: `mlx` (merged, 4bit|8bit|none), `gguf` (merged, f16|q8_0|q4_0, with
an Ollama Modelfile), `peft` (the adapter for transformers/vLLM), `adapter`
(the adapter for mlx-lm; from PEFT this is the import direction).

The output folder is built in a temporary sibling and renamed into place, so
it either appears whole or not at all; an existing one is replaced only with
`--force`. Every export holds a README.md model card and export.json.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import click

from edgetune.errors import UserError

FORMATS = ("mlx", "gguf", "peft", "adapter")
DEFAULT_QUANTIZE = {"mlx": "4bit", "gguf": "q8_0"}


@dataclass
class Source:
    kind: str  # "run", "mlx-adapter", "peft-adapter", "model"
    path: Path
    adapter_dir: Path | None  # where the adapter's files are
    run: Path | None  # the run folder for provenance, if SOURCE is or sits in one


def _enclosing_run(folder: Path) -> Path | None:
    """RUN for RUN/adapter and RUN/checkpoints/NAME."""
    for parent in (folder.parent, folder.parent.parent):
        if (parent / "manifest.json").is_file():
            return parent
    return None


def detect_source(path: str | Path) -> Source:
    """What SOURCE is; raises UserError saying what each kind must hold."""
    from edgetune.export.peft import is_peft_adapter

    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise UserError(f"{path}: no such file or folder")
    expected = ("expected a run folder (manifest.json + adapter/), an adapter folder (adapter_config.json + "
                "adapters.safetensors or adapter_model.safetensors) or a model folder (config.json + *.safetensors)")
    if not p.is_dir():
        raise UserError(f"{path}: a file, not a folder; {expected}")
    if (p / "manifest.json").is_file():
        if not (p / "adapter" / "adapter_config.json").is_file():
            raise UserError(f"{path}: a run folder without adapter/ (training has not finished); export a checkpoint "
                            f"instead, e.g. {p / 'checkpoints' / 'best'}")
        return Source("run", p, p / "adapter", p)
    if (p / "adapter_config.json").is_file():
        if is_peft_adapter(p):
            return Source("peft-adapter", p, p, _enclosing_run(p))
        if not (p / "adapters.safetensors").is_file():
            raise UserError(f"{path}: adapter_config.json without adapters.safetensors (mlx-lm) or "
                            "adapter_model.safetensors (PEFT)")
        return Source("mlx-adapter", p, p, _enclosing_run(p))
    if (p / "config.json").is_file():
        return Source("model", p, None, None)
    raise UserError(f"{path}: not something edgetune can export; {expected}")


def resolve_base(source: Source, base_opt: str | None, manifest: dict | None,
                 echo: Callable[[str], None]) -> tuple[str, Path]:
    """(name to record, local folder) of the base model; raises UserError when it cannot be known."""
    from edgetune.models import resolve_model_path

    if source.kind == "model":
        if base_opt:
            raise UserError(f"--base: SOURCE {source.path} is a model folder; --base applies to adapters only")
        return str(source.path), source.path
    recorded, where = None, None
    if source.adapter_dir is not None and source.kind != "run":
        cfg = json.loads((source.adapter_dir / "adapter_config.json").read_text())
        recorded = cfg.get("base_model") or cfg.get("base_model_name_or_path")
        where = source.adapter_dir / "adapter_config.json"
    if not recorded and manifest is not None:
        recorded = (manifest.get("recipe") or {}).get("model") or manifest.get("model_path")
        where = source.run / "manifest.json"
    if base_opt:
        if recorded and recorded != base_opt:
            echo(f"note: --base {base_opt} replaces the base recorded in {where} ({recorded})")
        name = base_opt
    elif recorded:
        name = recorded
    else:
        raise UserError(f"{source.path}: the adapter does not record its base model; pass --base MODEL "
                        "(the folder or hub id it was trained on)")
    # A run records where the model was loaded from; prefer it when the name is a hub id.
    if not base_opt and manifest is not None and name == (manifest.get("recipe") or {}).get("model"):
        local = Path(manifest.get("model_path", ""))
        if (local / "config.json").is_file():
            return name, local
    path = resolve_model_path(name)
    return (str(path) if Path(name).expanduser().exists() else name), path


def _check_out(out: Path, source: Source, base_path: Path) -> None:
    """`out` may sit inside the run (RUN/export/mlx) but must not be, or hold, SOURCE or the base:
    with --force the old `out` is deleted."""
    for other, what in ((source.path, "SOURCE"), (base_path.resolve(), "the base model")):
        if out == other or out in other.parents:
            raise UserError(f"--out {out}: would replace {what} ({other}); choose a separate folder")


def _parse_quantize(fmt: str, quantize: str | None, group_size: int):
    """The format's quantization (mlx: Quantization|None, gguf: its name) and a description."""
    if fmt in ("peft", "adapter"):
        if quantize not in (None, "none"):
            raise UserError(f"--quantize {quantize}: --format {fmt} writes the adapter's tensors as they are; "
                            "quantize a merged model with --format mlx or gguf")
        return None, None
    quantize = quantize or DEFAULT_QUANTIZE[fmt]
    if fmt == "mlx":
        from edgetune.export.fuse import parse_mlx_quantize

        quant = parse_mlx_quantize(quantize, group_size)
        return quant, quant.describe() if quant else None
    from edgetune.export.gguf import parse_quant

    parse_quant(quantize)
    return quantize.lower(), f"GGUF {quantize.lower()}"


def _adapter_info(adapter) -> dict | None:
    if adapter is None:
        return None
    return {"path": str(adapter.path), "rank": adapter.rank, "alpha": adapter.alpha, "scale": adapter.scale,
            "dropout": adapter.dropout, "keys": adapter.in_block_keys(), "layers": adapter.layers()}


def _peak_rss_mb() -> float:
    """This process's peak resident memory. On Linux from /proc (VmHWM): getrusage's ru_maxrss also
    counts the parent's memory at fork, so a small export started from a big process reads as big."""
    try:
        with open("/proc/self/status") as f:
            return round(int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) / 1024, 1)
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return round(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024, 1)  # bytes on macOS


DESCRIPTIONS = {
    "mlx": "An MLX model folder (base + LoRA adapter merged) for mlx-lm, mlx_lm.server and LM Studio",
    "gguf": "A GGUF file (base + LoRA adapter merged) for llama.cpp and Ollama",
    "peft": "A LoRA adapter in Hugging Face PEFT format for transformers and vLLM",
    "adapter": "A LoRA adapter in mlx-lm format (mlx_lm.generate --adapter-path)",
}


def run_export(source_path: str | Path, fmt: str, out: str | Path, quantize: str | None = None,
               group_size: int = 64, base: str | None = None, force: bool = False, eval_data: str | None = None,
               max_loss_increase: float | None = None, check: bool = True,
               echo: Callable[[str], None] = print) -> dict:
    """Export SOURCE as `fmt` into the folder `out`; returns export.json's content.

    Raises UserError for an unknown SOURCE kind, a format that does not apply
    to it, an adapter that does not fit its base (naming the keys), an
    existing `out` without `force`, and unreadable inputs.
    """
    from edgetune import __version__
    from edgetune.export import card as cards
    from edgetune.export.fuse import check_adapter_fits, open_base, read_mlx_adapter
    from edgetune.export.peft import read_peft_adapter
    from edgetune.fileio import atomic_dir, write_json

    t0 = time.perf_counter()
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    max_loss_increase = cards.DEFAULT_MAX_LOSS_INCREASE if max_loss_increase is None else max_loss_increase
    source = detect_source(source_path)
    if source.kind == "model" and fmt in ("peft", "adapter"):
        raise UserError(f"{source.path}: a model folder has no adapter to export as {fmt}; use --format mlx or gguf")
    if source.kind == "peft-adapter" and fmt == "peft":
        raise UserError(f"{source.path}: already a PEFT adapter; --format adapter converts it to mlx-lm, "
                        "--format mlx or gguf merges it into the base")
    quant, quant_text = _parse_quantize(fmt, quantize, group_size)
    manifest, summary = cards.read_run_records(source.run)
    base_name, base_path = resolve_base(source, base, manifest, echo)
    out = Path(out).expanduser().resolve()
    _check_out(out, source, base_path)
    echo(f"export: {source.kind} {source.path} -> {fmt}{' ' + quant_text if quant_text else ''} at {out}")

    warnings: list[str] = []
    with atomic_dir(out, replace=force) as tmp, tempfile.TemporaryDirectory(prefix="edgetune-export-") as scratch:
        scratch = Path(scratch)
        adapter = None
        if source.kind in ("run", "mlx-adapter"):
            adapter = read_mlx_adapter(source.adapter_dir)
        elif source.kind == "peft-adapter":
            adapter = read_peft_adapter(source.adapter_dir)
        model = open_base(base_path)
        if adapter is not None:
            check_adapter_fits(adapter, model, base_name)
        n_layers = model.num_layers
        details: dict = {}
        reference_adapter = source.adapter_dir if source.kind != "peft-adapter" else None
        if source.kind == "peft-adapter" and fmt in ("mlx", "gguf") and check:
            # The check's reference runs base + adapter in mlx-lm, which needs mlx-lm's format.
            from edgetune.export.peft import write_mlx_adapter

            reference_adapter = scratch / "adapter"
            reference_adapter.mkdir()
            write_mlx_adapter(adapter, reference_adapter, n_layers, base_name)

        # The check needs eval data; without it, nothing is evaluated (the card says why).
        spec = cards.eval_spec(manifest, eval_data) if check and fmt in ("mlx", "gguf") else None
        exported_for_check = None
        if fmt == "mlx":
            from edgetune.export.mlx_export import write_mlx_folder

            details = write_mlx_folder(model, adapter, quant, tmp, echo)
            exported_for_check = tmp
        elif fmt == "gguf":
            details = _write_gguf(model, adapter, quant, tmp, scratch, echo)
            warnings += details.get("warnings", [])
            if spec is not None:
                echo("reading the GGUF weights back for the check")
                exported_for_check = cards.gguf_readback_folder(tmp / details["file"], scratch / "fused",
                                                                scratch / "gguf-readback")
            shutil.rmtree(scratch / "fused")  # an unquantized copy of the model: drop it early
        elif fmt == "peft":
            from edgetune.export.peft import write_peft_adapter

            details = {"adapter_config": write_peft_adapter(adapter, tmp, n_layers, base_name)}
        else:
            from edgetune.export.peft import write_mlx_adapter

            origin = {"format": "peft" if source.kind == "peft-adapter" else "mlx", "path": str(source.adapter_dir)}
            details = {"adapter_config": write_mlx_adapter(adapter, tmp, n_layers, base_name, origin)}
        del model  # the base's tensors are not needed for the check

        result_check = None
        if fmt in ("mlx", "gguf"):
            if not check:
                result_check = {"skipped": "--no-check was given"}
            else:
                label = quant_text or "unquantized"
                if fmt == "gguf":
                    label += ", weights read back from the file"
                result_check = cards.quantization_check((base_path, reference_adapter), exported_for_check, spec,
                                                        max_loss_increase, label, echo)
                if fmt == "gguf" and "skipped" not in result_check:
                    result_check["note"] = ("The GGUF file's weights were read back, dequantized with the gguf "
                                            "package's reference code and evaluated in MLX: this measures the "
                                            "rounding in the file, not llama.cpp's kernels.")
            if result_check.get("ok") is False:
                warnings.append(f"quantization raised the eval loss by {result_check['increase']:.4f} nats, more "
                                f"than --max-loss-increase {max_loss_increase}; consider a larger type (8bit, "
                                "q8_0) or a smaller group size")

        size, files = cards.folder_size(tmp)
        info = {
            "edgetune": __version__, "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "format": fmt, "quantization": quant_text, "folder": str(out), "description": DESCRIPTIONS[fmt],
            "source": str(source.path), "source_kind": source.kind, "run": str(source.run) if source.run else None,
            "base_model": base_name, "base_path": str(base_path), "adapter": _adapter_info(adapter),
            "size_bytes": size, "files": files, "check": result_check, "warnings": warnings, "details": details,
        }
        (tmp / "README.md").write_text(cards.render_card({**info, "manifest": manifest, "summary": summary}),
                                       encoding="utf-8")
        info["elapsed_s"] = round(time.perf_counter() - t0, 2)
        info["peak_rss_mb"] = _peak_rss_mb()
        write_json(tmp / "export.json", info)
        _shareable(tmp)
    echo(summary_text(info))
    return info


def _shareable(folder: Path) -> None:
    """Give every file the umask's usual mode: atomic writes create 0600 temp files (and copies keep the
    source's mode), but an export is meant to be copied into LM Studio, served or shared."""
    mask = os.umask(0)
    os.umask(mask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~mask)


def _write_gguf(model, adapter, quant: str, tmp: Path, scratch: Path, echo) -> dict:
    """Merge into an unquantized Hugging Face folder `scratch/fused`, then write GGUF + Modelfile into `tmp`."""
    try:
        from edgetune.export.gguf import write_gguf
        from edgetune.export.modelfile import write_modelfile
    except ImportError as e:  # the GGUF writer ships separately from the rest of export/
        raise UserError(f"--format gguf is not available in this install ({e}); use --format mlx") from None
    from edgetune.export.mlx_export import write_mlx_folder

    fused = scratch / "fused"  # left for the caller's check, which reads the GGUF back beside it
    fused.mkdir()
    write_mlx_folder(model, adapter, None, fused, echo)
    name = f"model-{quant}.gguf"
    result = write_gguf(fused, tmp / name, quant, echo=echo)
    write_modelfile(tmp, name, fused, echo=echo)
    return {**result, "path": str(Path(result["path"]).name), "file": name}


def summary_text(info: dict) -> str:
    from edgetune.export.card import human_bytes

    check = info.get("check")
    if check is None:
        verdict = "not applicable (adapter tensors unchanged)"
    elif "skipped" in check:
        verdict = "not run: " + check["skipped"]
    else:
        verdict = (f"eval loss {check['reference']['loss']:.4f} -> {check['exported']['loss']:.4f} "
                   f"({check['increase']:+.4f} nats, limit {check['max_increase']}) "
                   + ("OK" if check["ok"] else "WARNING: above the limit"))
    lines = ["", f"export finished: {info['format']}"
             + (f", {info['quantization']}" if info.get("quantization") else "") + f" in {info['elapsed_s']:.1f} s",
             f"  folder       {info['folder']} ({human_bytes(info['size_bytes'])})",
             f"  check        {verdict}",
             f"  peak RSS     {info['peak_rss_mb']:.0f} MB",
             f"  model card   {Path(info['folder']) / 'README.md'}"]
    return "\n".join(lines)


@click.command()
@click.argument("source", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(FORMATS), required=True,
              help="mlx: merged MLX folder (mlx-lm, LM Studio); gguf: merged GGUF (llama.cpp, Ollama); "
                   "peft: adapter for transformers/vLLM; adapter: adapter for mlx-lm (imports a PEFT adapter).")
@click.option("--quantize", default=None,
              help="mlx: 4bit (default), 8bit or none; gguf: q8_0 (default), q4_0 or f16.")
@click.option("--group-size", type=int, default=64, show_default=True,
              help="MLX quantization group size (32, 64 or 128): smaller is more accurate and larger.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder (must not exist).")
@click.option("--base", default=None, help="Base model folder or hub id, for an adapter that does not record it.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--eval-data", default=None, type=click.Path(exists=True),
              help="Eval rows for the quantization check (a JSONL file or a data build folder); "
                   "default: the run's eval split.")
@click.option("--max-loss-increase", type=float, default=0.05, show_default=True,
              help="Warn when quantization raises the eval loss by more than this many nats per token "
                   "(0.05 = perplexity up 5.1%).")
@click.option("--no-check", is_flag=True, help="Skip the quantization check (it evaluates the eval split twice).")
def export(source: str, fmt: str, quantize: str | None, group_size: int, out: str, base: str | None, force: bool,
           eval_data: str | None, max_loss_increase: float, no_check: bool) -> None:
    """Export SOURCE (a run folder, an adapter folder or a model folder) for on-device serving."""

    def echo(msg: str) -> None:
        click.echo(msg, err=True)

    run_export(source, fmt, out, quantize=quantize, group_size=group_size, base=base, force=force,
               eval_data=eval_data, max_loss_increase=max_loss_increase, check=not no_check, echo=echo)
