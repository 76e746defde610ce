"""The one training loop shared by SFT, DPO, KTO and ORPO.

Algorithms pass in what differs: a loss function `loss_fn(model, *arrays) ->
(loss_sum, n_units)` or `(loss_sum, n_units, aux)` (aux: a dict of *summed* scalar
metrics such as preference accuracy, averaged per unit and reported beside the
loss) and `micro_batch(cursor) -> arrays`. This module owns
what must not differ: token-normalised gradient accumulation, the non-finite
guard, checkpoints, exact resume, evaluation cadence and progress. It never
touches a tensor library: the tensor work (compiled steps, the optimizer
update, memory readings) goes through the `edgetune.backends.Backend` passed
in, so the same loop trains on MLX and on PyTorch. Callbacks only report; they
never change training.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edgetune import checkpoint as ckpt
from edgetune.errors import UserError
from edgetune.fileio import atomic_dir


@dataclass
class LoopSettings:
    steps: int
    grad_accumulation: int = 1
    max_grad_norm: float | None = 1.0
    save_every: int = 100
    eval_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 3
    max_nonfinite_steps: int = 5
    log_every: int = 10
    compile: bool = True  # off only in tests that compare against the eager step
    seed: int = 0  # dropout randomness is re-seeded per micro-batch from (seed, cursor)


@dataclass
class MicroBatch:
    """What the loop needs from an algorithm's batch."""

    arrays: tuple  # backend arrays passed to loss_fn after the model
    n_tokens: int  # non-padding tokens, for tokens/s
    example_ids: list[str] = field(default_factory=list)
    compile_key: str = ""  # batches with different static structure compile separately


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def micro_seed(seed: int, cursor: int) -> int:
    return (seed * 1_000_003 + cursor) % (2**63)


def train(
    backend,
    model,
    optimizer,
    loss_fn: Callable,
    micro_batch: Callable[[int], MicroBatch],
    settings: LoopSettings,
    checkpoint_dir: Path,
    save_adapter: Callable[[Path], None],
    state: ckpt.TrainerState,
    evaluate: Callable[[], dict] | None = None,
    report: Callable[[dict], None] = lambda record: None,
    echo: Callable[[str], None] = print,
) -> ckpt.TrainerState:
    """Run optimizer steps `state.step+1 .. settings.steps` on `backend` (see `edgetune.backends`).

    `state` (and the optimizer/RNG/adapter, restored by the caller) say where
    to start, so a resumed run continues exactly where the checkpoint left it.
    `report(record)` receives one dict per step and per evaluation
    (written to metrics.jsonl by the caller). Raises UserError after
    `max_nonfinite_steps` consecutive non-finite steps.
    """
    with backend.training_context(model) as note:
        if note:
            echo(note)
        return _loop(backend, model, optimizer, loss_fn, micro_batch, settings, checkpoint_dir, save_adapter,
                     state, evaluate, report, echo)


def _loop(backend, model, optimizer, loss_fn, micro_batch, settings, checkpoint_dir, save_adapter, state,
          evaluate, report, echo) -> ckpt.TrainerState:
    grad_step = backend.make_grad_step(model, loss_fn, settings.compile)
    # `update(grads, n, norm)` normalises by the supervised-token count of the whole accumulated
    # batch, clips and takes one optimizer step.
    update = backend.make_update(model, optimizer, settings.max_grad_norm, settings.compile)

    started = time.perf_counter()
    tokens_seen = 0
    first_step = state.step
    for step in range(state.step + 1, settings.steps + 1):
        step_started = time.perf_counter()
        cursors = [state.cursor + i for i in range(settings.grad_accumulation)]
        state.cursor += settings.grad_accumulation
        batches = [micro_batch(c) for c in cursors]
        # The RNG (dropout) is a pure function of (seed, cursor), so a resumed run
        # draws exactly what the uninterrupted run drew: no RNG state to save.
        aux_sum: dict = {}
        loss_sum, ntoks_total, grads_sum, grads_norm = backend.accumulate(
            grad_step, batches, [micro_seed(settings.seed, c) for c in cursors], aux_sum)
        n_tokens = sum(b.n_tokens for b in batches)
        ids = [i for b in batches for i in b.example_ids]
        step_loss = loss_sum / max(ntoks_total, 1.0)
        norm = grads_norm / max(ntoks_total, 1.0)
        if not (math.isfinite(step_loss) and math.isfinite(norm)):
            # Skip the update: one bad batch must not poison the adapter.
            state.nonfinite_in_row += 1
            echo(f"warning: step {step}: non-finite loss or gradient; update skipped "
                 f"(examples: {', '.join(ids[:8])}{' ...' if len(ids) > 8 else ''})")
            report({"step": step, "skipped": True, "loss": None, "examples": ids})
            if state.nonfinite_in_row >= settings.max_nonfinite_steps:
                raise UserError(
                    f"training stopped: {state.nonfinite_in_row} non-finite steps in a row (last at step {step}); "
                    "lower the learning rate, check the data named above, or raise max_nonfinite_steps"
                )
            state.step = step
            continue
        state.nonfinite_in_row = 0
        if ntoks_total:
            update(grads_sum, ntoks_total, grads_norm)
        state.step = step
        now = time.perf_counter()
        tokens_seen += n_tokens
        rate = tokens_seen / max(now - started, 1e-9)
        lr = backend.learning_rate(optimizer)
        record = {"step": step, "loss": step_loss, "lr": lr, "grad_norm": norm, "tokens": n_tokens,
                  "supervised_tokens": int(ntoks_total), "items": len(ids),
                  "tok_s": n_tokens / max(now - step_started, 1e-9), "peak_memory_gb": backend.peak_memory_gb()}
        aux = {k: float(v) / max(ntoks_total, 1.0) for k, v in aux_sum.items()}
        record.update(aux)
        report(record)
        if step % settings.log_every == 0 or step == settings.steps or step == first_step + 1:
            eta = (settings.steps - step) * (now - started) / max(step - first_step, 1)
            shown = "".join(f" | {k} {v:.3f}" for k, v in aux.items())
            echo(f"step {step}/{settings.steps} | loss {step_loss:.4f}{shown} | lr {lr:.2e} | "
                 f"{rate:,.0f} tok/s | peak {record['peak_memory_gb']:.2f} GB | ETA {_fmt_eta(eta)}")

        is_best = False
        if evaluate and ((settings.eval_every and step % settings.eval_every == 0) or step == settings.steps):
            metrics = evaluate()
            report({"step": step, "eval": metrics})
            echo(f"eval at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            if state.best_eval_loss is None or metrics["loss"] < state.best_eval_loss:
                state.best_eval_loss, is_best = metrics["loss"], True
        if is_best or (settings.save_every and step % settings.save_every == 0) or step == settings.steps:
            _save(backend, checkpoint_dir, state, save_adapter, optimizer, best=is_best)
            ckpt.prune(checkpoint_dir, settings.keep_checkpoints)
    return state


def _save(backend, root: Path, state: ckpt.TrainerState, save_adapter, optimizer, best: bool = False) -> None:
    path = ckpt.save_checkpoint(root, state, save_adapter, lambda folder: backend.save_optimizer(optimizer, folder))
    if best:
        # `best/` is a copy, so pruning old step folders never removes the best weights.
        with atomic_dir(Path(root) / "best", replace=True) as tmp:
            for f in path.iterdir():
                shutil.copy2(f, tmp / f.name)


def restore(backend, folder: Path, model, optimizer) -> ckpt.TrainerState:
    """Load a checkpoint's adapter and optimizer state into model/optimizer; returns its TrainerState."""
    state = ckpt.load_state(folder)
    backend.load_adapter(model, folder)
    backend.load_optimizer(model, optimizer, folder)
    return state
