"""`edgetune model ...`: build the models tests, demos and benchmarks run on."""

from __future__ import annotations

import json
import time

import click

from edgetune.model.tiny import ARCHS, PRESETS


@click.group()
def model() -> None:
    """Build local models (no model hub needed)."""


@model.command()
@click.argument("out_dir", metavar="DIR", type=click.Path(file_okay=True, dir_okay=True))
@click.option("--arch", type=click.Choice(ARCHS), default=None,
              help="Model family. Default: the preset's own (qwen2 for tiny and small).")
@click.option("--preset", type=click.Choice(list(PRESETS)), default="tiny", show_default=True,
              help="Shape: tiny (seconds to build), small (~29M), or a real model's shape with random weights.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the weights and the pre-training order.")
@click.option("--no-pretrain", is_flag=True, help="Skip the brief built-in pre-training pass (tiny only has one).")
@click.option("--force", is_flag=True, help="Replace DIR if it exists.")
def tiny(out_dir: str, arch: str | None, preset: str, seed: int, no_pretrain: bool, force: bool) -> None:
    """Write a Hugging Face model folder at DIR that mlx-lm and transformers load.

    The tokenizer is a byte-level BPE trained on a small built-in corpus; the
    chat template, special tokens and config follow the real family (Qwen2.5
    ChatML or Llama 3). The tiny preset gets a brief pre-training pass so that
    LoRA can teach it; the same seed gives the same files.
    """
    from edgetune.model.tiny import build_tiny_model

    def report(step: int, loss: float) -> None:
        if step == 1 or step % 25 == 0:
            click.echo(f"pre-training step {step}: loss {loss:.3f}", err=True)

    start = time.perf_counter()
    path = build_tiny_model(out_dir, arch=arch, preset=preset, seed=seed, pretrain=not no_pretrain,
                            force=force, on_step=report)
    built = json.loads((path / "edgetune_build.json").read_text())
    pre = built["pretrain"]
    trained = "not pre-trained"
    if pre:
        trained = f"pre-trained {pre['steps']} steps, loss {pre['loss_first']:.2f} -> {pre['loss_last']:.2f}"
    click.echo(f"wrote {path}: {built['arch']} {preset}, {built['params']:,} parameters, {trained}, "
               f"{time.perf_counter() - start:.1f}s")
