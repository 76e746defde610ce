"""Supervised fine-tuning with LoRA: `edgetune sft RECIPE` (MLX, or torch via `backend:`).

Reads rows (an `edgetune data build` folder or common chat formats), tokenises
them with the model's chat template (loss on completion tokens only, end of
turn included), packs them into rows without cross-attention, and runs the
shared training loop with a loss that computes the output head only at
supervised positions — prompt positions never pay for the vocabulary matmul.
`run_sft` is backend-neutral (`edgetune.backends`); the MLX forward helpers
below (`target_logprobs`, `to_micro_batch`, ...) are what the MLX backend,
evaluation and export use.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edgetune.errors import UserError
from edgetune.fileio import sha256_file, write_json
from edgetune.losses import sft_loss_from_logprobs, token_logprobs
from edgetune.lora import LoraSpec
from edgetune.packing import check_packing_supported, packing_caches
from edgetune.runtime import mlx_core
from edgetune.stage import prepare_run_folder, run_manifest, start_or_resume
from edgetune.trainer import LoopSettings, MicroBatch, train

mx = mlx_core()

# Selected-position counts are rounded up to this, so the compiled step sees
# few distinct shapes (each new shape costs a trace).
SELECT_BUCKET = 64


def hidden_states(model, tokens, segment_ids=None):
    """Final-norm hidden states [B, T, D]; block-diagonal attention when `segment_ids` is given."""
    cache = packing_caches(model, segment_ids) if segment_ids is not None else None
    return model.model(tokens, cache)


def output_logits(model, h):
    """Apply the output head (untied `lm_head` or tied embeddings) to hidden states."""
    if hasattr(model, "lm_head"):
        return model.lm_head(h)
    return model.model.embed_tokens.as_linear(h)


def target_logprobs(model, tokens, select, targets, segment_ids=None):
    """log p(target) at the flat positions `select` [S] of the [B, T] batch -> [S].

    Prompt positions never pay for the vocabulary matmul.
    """
    h = hidden_states(model, tokens, segment_ids)
    h = h.reshape(-1, h.shape[-1])[select]
    return token_logprobs(output_logits(model, h), targets)


def sft_loss_fn(model, tokens, select, targets, weights, segment_ids=None):
    """(loss_sum, n_supervised) for one micro-batch on MLX; see `losses.sft_loss`."""
    return sft_loss_from_logprobs(target_logprobs(model, tokens, select, targets, segment_ids), weights)


def make_sft_loss_fn(backend):
    """`sft_loss_fn` for any backend: the head at supervised positions, then the summed cross-entropy."""
    if backend.name == "mlx":
        return sft_loss_fn

    def loss_fn(model, tokens, select, targets, weights, segment_ids=None):
        logps = backend.target_logprobs(model, tokens, select, targets, segment_ids)
        return backend.losses.sft_loss_from_logprobs(logps, weights)

    return loss_fn


def host_arrays(batch) -> tuple[tuple, bool]:
    """numpy Batch (from sft_data) -> ((tokens, select, targets, weights), packed) as numpy arrays.

    `select` holds the flat supervised positions, padded with weight-0 entries up to a multiple of
    SELECT_BUCKET; `packed` says whether some row holds more than one example (then attention
    must follow `batch.segment_ids`). Shared by both backends, so they see the same batch.
    """
    mask = batch.loss_mask.reshape(-1)
    flat = np.nonzero(mask > 0)[0]
    n = max(len(flat), 1)
    size = -(-n // SELECT_BUCKET) * SELECT_BUCKET
    select = np.zeros(size, np.int32)
    select[: len(flat)] = flat
    weights = np.zeros(size, np.float32)
    weights[: len(flat)] = mask[flat]
    targets = batch.targets.reshape(-1)[select].astype(np.int32)
    packed = bool((batch.segment_ids.max(axis=1) > 1).any())
    return (batch.tokens, select, targets, weights), packed


def to_micro_batch(batch) -> MicroBatch:
    """numpy Batch (from sft_data) -> the MLX arrays `sft_loss_fn` takes."""
    host, packed = host_arrays(batch)
    arrays = tuple(mx.array(a) for a in host)
    if packed:
        arrays += (mx.array(batch.segment_ids),)
    return MicroBatch(arrays, int((batch.segment_ids > 0).sum()), list(batch.example_ids),
                      "packed" if packed else "plain")


@dataclass
class PreparedData:
    train: list
    eval: list
    stats: dict
    files: dict  # path -> sha256


def prepare_data(recipe, tokenizer, vocab_size: int, echo) -> PreparedData:
    from edgetune.sft_data import load_sft_rows, tokenize_dataset

    cfg = recipe.sft
    splits, stats, files = {}, {}, {}
    for split in ("train", "eval"):
        rows = load_sft_rows(recipe.data, split)
        examples, split_stats = tokenize_dataset(rows, tokenizer, cfg.max_seq_len, cfg.truncation, vocab_size)
        splits[split], stats[split] = examples, split_stats
    if not splits["train"]:
        raise UserError(f"data: no SFT training rows left in {recipe.data} (after truncation/drops: {stats['train']})")
    for p in _data_files(recipe.data):
        files[str(p)] = sha256_file(p)
    t = stats["train"]
    echo(f"data: {len(splits['train'])} train / {len(splits['eval'])} eval examples, "
         f"{t.get('tokens', 0):,} tokens ({t.get('supervised_tokens', 0):,} supervised); "
         f"truncated {t.get('truncated', 0)}, dropped {t.get('dropped_too_long', 0) + t.get('dropped_completion_too_long', 0)}")
    return PreparedData(splits["train"], splits["eval"], stats, files)


def _data_files(data) -> list[Path]:
    from edgetune.sft_data import data_files

    return data_files(data)


def run_sft(recipe, resume: bool = False, force: bool = False, echo: Callable[[str], None] = print) -> dict:
    """Train per `recipe`; returns the summary dict (also written to summary.json)."""
    from edgetune.backends import choose_backend, get_backend
    from edgetune.plan import apply_memory_limits, previous_section, resolve_auto
    from edgetune.recipe import require_data, with_backend
    from edgetune.sft_data import make_batches, pad_rows, padding_fraction

    require_data(recipe, "sft")
    backend_name, backend_why = choose_backend(recipe.backend)
    recipe = with_backend(recipe, backend_name)
    # Plan memory from config.json alone and fill in `auto` values: a run that cannot fit is
    # refused here, before the model loads (a Metal out-of-memory would abort the process).
    recipe, plan = resolve_auto(recipe, "sft", echo=echo, previous=previous_section(
        Path(recipe.output) / "manifest.json", "sft") if resume else None)
    apply_memory_limits(plan, echo)
    cfg = recipe.sft
    out = Path(recipe.output)
    checkpoints = out / "checkpoints"
    prepare_run_folder(out, resume, force)

    backend = get_backend(backend_name)
    echo(f"backend: {backend_name} ({backend_why})")
    loaded = backend.load(recipe, echo)
    model, tokenizer = loaded.model, loaded.tokenizer
    if cfg.packing:
        check_packing_supported(loaded.config.get("model_type", "?"))
    data = prepare_data(recipe, tokenizer, loaded.config["vocab_size"], echo)

    spec = LoraSpec(cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, tuple(cfg.lora.targets),
                    None if cfg.lora.layers in (None, "all") else int(cfg.lora.layers))
    adapter_cfg = backend.attach_lora(model, spec, cfg.seed)
    # Recorded so `edgetune export ADAPTER` finds the base of an adapter copied out of its run.
    adapter_cfg["base_model"] = recipe.model
    if cfg.grad_checkpoint:
        backend.enable_grad_checkpoint(model)
    echo(f"LoRA: rank {spec.rank}, alpha {spec.alpha}, {len(adapter_cfg['lora_parameters']['keys'])} targets "
         f"x {adapter_cfg['num_layers']} layers = {backend.trainable_count(model):,} trainable parameters")

    pad_multiple = cfg.max_seq_len if (cfg.packing and backend.static_packed_rows) else backend.pad_multiple
    epoch_batches: dict[int, list] = {}

    def batches_of(epoch: int) -> list:
        if epoch not in epoch_batches:
            epoch_batches.clear()  # one epoch in memory at a time
            epoch_batches[epoch] = make_batches(data.train, cfg.batch_size, cfg.max_seq_len, cfg.packing, cfg.seed,
                                                epoch, pad_multiple)
        return epoch_batches[epoch]

    per_epoch = len(batches_of(0))
    echo(f"batches: {per_epoch} per epoch, padding {padding_fraction(batches_of(0)):.1%}")
    steps = cfg.steps or max(1, -(-int(cfg.epochs * per_epoch) // cfg.grad_accumulation))

    def micro_batch(cursor: int) -> MicroBatch:
        batch = batches_of(cursor // per_epoch)[cursor % per_epoch]
        if backend.static_packed_rows:
            batch = pad_rows(batch, cfg.batch_size)
        return backend.micro_batch(batch, cfg.packing)

    optimizer = backend.make_optimizer(model, cfg, steps)

    manifest = run_manifest("sft", recipe, loaded, data, plan, steps, per_epoch, backend, model,
                            backend_why=backend_why)
    state, metrics = start_or_resume(out, manifest, "sft", resume, backend, model, optimizer, echo)

    eval_batches = [backend.micro_batch(b) for b in make_batches(data.eval, cfg.batch_size, cfg.max_seq_len,
                                                                  cfg.packing, cfg.seed, 0, pad_multiple)
                    ] if data.eval else []
    if cfg.eval_batches:
        eval_batches = eval_batches[: cfg.eval_batches]
    loss_fn = make_sft_loss_fn(backend)

    def evaluate() -> dict:
        return evaluate_loss(model, eval_batches, backend, loss_fn)

    def save(folder: Path) -> None:
        backend.save_adapter(model, adapter_cfg, folder)

    settings = LoopSettings(steps, cfg.grad_accumulation, cfg.max_grad_norm, cfg.save_every, cfg.eval_every,
                            cfg.keep_checkpoints, cfg.max_nonfinite_steps, cfg.log_every, seed=cfg.seed)
    t0 = time.perf_counter()
    backend.set_training(model, True)
    state = train(backend, model, optimizer, loss_fn, micro_batch, settings, checkpoints, save, state,
                  evaluate if eval_batches else None, metrics.write, echo)
    elapsed = time.perf_counter() - t0
    backend.set_training(model, False)

    # The final adapter: the last step's weights (the best-by-eval copy stays in checkpoints/best).
    backend.save_adapter(model, adapter_cfg, out / "adapter")
    summary = metrics.summary()
    summary.update({"steps": steps, "elapsed_s": elapsed, "adapter": str(out / "adapter"),
                    "best_checkpoint": str(checkpoints / "best") if (checkpoints / "best").exists() else None,
                    "peak_memory_gb": backend.peak_memory_gb(), "backend": backend_name})
    write_json(out / "summary.json", summary)
    echo(summary_text(recipe, summary))
    return summary


def evaluate_loss(model, batches: list[MicroBatch], backend=None, loss_fn=None) -> dict:
    """Mean supervised-token loss and perplexity over pre-built eval batches (MLX unless `backend`)."""
    if backend is None:
        from edgetune.backends import get_backend

        backend = get_backend("mlx")
    loss_fn = loss_fn or make_sft_loss_fn(backend)
    total, count = 0.0, 0.0
    with backend.no_grad():
        for b in batches:
            loss, n = loss_fn(model, *b.arrays)
            total, count = total + float(loss), count + float(n)
    loss = total / max(count, 1.0)
    return {"loss": loss, "perplexity": float(np.exp(min(loss, 50.0)))}


def summary_text(recipe, s: dict) -> str:
    ev = s.get("final_eval") or {}
    lines = [
        "",
        "SFT finished",
        f"  steps            {s['steps']} in {s['elapsed_s']:.1f} s",
        f"  train loss       {s['first_loss']:.4f} -> {s['final_loss']:.4f}" if s.get("final_loss") is not None else "",
        f"  eval loss        {ev['loss']:.4f} (perplexity {ev['perplexity']:.2f})" if ev else "  eval loss        (no eval split)",
        f"  peak memory      {s['peak_memory_gb']:.2f} GB ({s.get('backend', 'mlx')})",
        f"  adapter          {s['adapter']}",
        f"  try it           mlx_lm.generate --model {recipe.model} --adapter-path {s['adapter']} --prompt \"...\"",
    ]
    return "\n".join(line for line in lines if line)
