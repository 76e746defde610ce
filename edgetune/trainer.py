"""The one training loop shared by SFT, DPO, KTO and ORPO.

Algorithms pass in what differs: a loss function `loss_fn(model, *arrays) ->
(loss_sum, n_units)` or `(loss_sum, n_units, aux)` (aux: a dict of *summed* scalar
metrics such as preference accuracy, averaged per unit and reported beside the
loss) and `micro_batch(cursor) -> arrays`. This module owns
what must not differ: compiled steps, token-normalised gradient accumulation,
the non-finite guard, checkpoints, exact resume, evaluation cadence and
progress. Callbacks only report; they never change training.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

from edgetune import checkpoint as ckpt
from edgetune.errors import UserError
from edgetune.fileio import atomic_dir
from edgetune.kernels import KERNELS_NOTE, training_kernels
from edgetune.runtime import mlx_core

mx = mlx_core()
import mlx.nn as nn  # noqa: E402  (after the fast-BLAS set-up above)
import mlx.optimizers as optim  # noqa: E402
from mlx.utils import tree_flatten, tree_map, tree_unflatten  # noqa: E402


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

    arrays: tuple  # mx arrays passed to loss_fn after the model
    n_tokens: int  # non-padding tokens, for tokens/s
    example_ids: list[str] = field(default_factory=list)
    compile_key: str = ""  # batches with different static structure compile separately


def make_schedule(kind: str, lr: float, steps: int, warmup: int, min_lr_ratio: float = 0.0):
    """Warm-up then constant / cosine / linear decay, as a function of the optimizer step."""
    decay_steps = max(steps - warmup, 1)
    end = lr * min_lr_ratio
    if kind == "constant":
        main = lambda step: mx.array(lr, mx.float32)  # noqa: E731
    elif kind == "cosine":
        main = optim.cosine_decay(lr, decay_steps, end)
    elif kind == "linear":
        main = optim.linear_schedule(lr, end, decay_steps)
    else:
        raise UserError(f"lr_schedule: {kind!r} is not one of constant, cosine, linear")
    if warmup <= 0:
        return main
    return optim.join_schedules([optim.linear_schedule(0.0, lr, warmup), main], [warmup])


def peak_memory_gb() -> float:
    return mx.get_peak_memory() / 1e9


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def make_grad_step(model, loss_fn: Callable, compile: bool = True) -> Callable:
    """`grad_step(*arrays) -> (loss_sum, n_tokens, aux, grads)` for one micro-batch."""
    loss_and_grad = nn.value_and_grad(model, loss_fn)

    def grad_step(*arrays):
        (loss, ntoks, *rest), grads = loss_and_grad(model, *arrays)
        return loss, ntoks, (rest[0] if rest else {}), grads

    if not compile:
        return grad_step
    # Declaring the model/RNG state as compile inputs and outputs is what makes the
    # compiled step see updated LoRA weights (otherwise they are baked in as constants).
    state = [model.state, mx.random.state]
    return partial(mx.compile, inputs=state, outputs=state)(grad_step)


def accumulate(grad_step: Callable, batches: list[MicroBatch], seeds: list[int] | None = None,
               aux_sum: dict | None = None):
    """Summed loss, token count and gradients over micro-batches (not yet normalised).

    The loss function's summed aux metrics are added into `aux_sum` when given
    (kept out of the return value so that callers that need none see three values).

    Because losses are sums, batch 4 x accumulation 1 and batch 1 x
    accumulation 4 give the same totals (tests/test_trainer.py).
    """
    grads_sum, loss_sum, ntoks_sum = None, 0.0, 0.0
    aux_sum = {} if aux_sum is None else aux_sum
    for i, batch in enumerate(batches):
        if seeds is not None:
            mx.random.seed(seeds[i])
        loss, ntoks, aux, grads = grad_step(*batch.arrays)
        grads_sum = grads if grads_sum is None else tree_map(mx.add, grads_sum, grads)
        loss_sum, ntoks_sum = loss_sum + loss, ntoks_sum + ntoks
        aux_sum.update({k: aux_sum.get(k, 0.0) + v for k, v in aux.items()})
        mx.eval(loss_sum, ntoks_sum, grads_sum, aux_sum)  # bounded graph per micro-batch
    return loss_sum, ntoks_sum, grads_sum


def micro_seed(seed: int, cursor: int) -> int:
    return (seed * 1_000_003 + cursor) % (2**63)


def global_norm(grads) -> "mx.array":
    return mx.sqrt(sum(mx.sum(mx.square(g)) for _, g in tree_flatten(grads)))


def train(
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
    """Run optimizer steps `state.step+1 .. settings.steps`.

    `state` (and the optimizer/RNG/adapter, restored by the caller) say where
    to start, so a resumed run continues exactly where the checkpoint left it.
    `report(record)` receives one dict per step and per evaluation
    (written to metrics.jsonl by the caller). Raises UserError after
    `max_nonfinite_steps` consecutive non-finite steps.
    """
    with training_kernels(model) as fast:
        if fast:
            echo(KERNELS_NOTE)
        return _loop(model, optimizer, loss_fn, micro_batch, settings, checkpoint_dir, save_adapter, state,
                     evaluate, report, echo)


def _loop(model, optimizer, loss_fn, micro_batch, settings, checkpoint_dir, save_adapter, state,
          evaluate, report, echo) -> ckpt.TrainerState:
    grad_step = make_grad_step(model, loss_fn, settings.compile)
    full_state = [model.state, optimizer.state, mx.random.state]

    def apply_update(grads, ntoks):
        # Normalise by the supervised-token count of the whole accumulated batch.
        grads = tree_map(lambda g: g / ntoks, grads)
        if settings.max_grad_norm:
            grads, _ = optim.clip_grad_norm(grads, settings.max_grad_norm)
        optimizer.update(model, grads)

    if settings.compile:
        apply_update = partial(mx.compile, inputs=full_state, outputs=full_state)(apply_update)

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
        loss_sum, ntoks_sum, grads_sum = accumulate(grad_step, batches, [micro_seed(settings.seed, c) for c in cursors],
                                                    aux_sum)
        n_tokens = sum(b.n_tokens for b in batches)
        ids = [i for b in batches for i in b.example_ids]
        ntoks_total = float(ntoks_sum)
        step_loss = float(loss_sum) / max(ntoks_total, 1.0)
        norm = float(global_norm(grads_sum)) / max(ntoks_total, 1.0)
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
            apply_update(grads_sum, mx.array(ntoks_total, mx.float32))
            mx.eval(model.trainable_parameters(), optimizer.state)
        state.step = step
        now = time.perf_counter()
        tokens_seen += n_tokens
        rate = tokens_seen / max(now - started, 1e-9)
        lr = float(optimizer.learning_rate)
        record = {"step": step, "loss": step_loss, "lr": lr, "grad_norm": norm, "tokens": n_tokens,
                  "supervised_tokens": int(ntoks_total), "tok_s": n_tokens / max(now - step_started, 1e-9),
                  "peak_memory_gb": peak_memory_gb()}
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
            _save(checkpoint_dir, state, save_adapter, optimizer, best=is_best)
            ckpt.prune(checkpoint_dir, settings.keep_checkpoints)
    return state


def _save(root: Path, state: ckpt.TrainerState, save_adapter, optimizer, best: bool = False) -> None:
    opt_state = dict(tree_flatten(optimizer.state))
    path = ckpt.save_checkpoint(root, state, save_adapter, opt_state)
    if best:
        # `best/` is a copy, so pruning old step folders never removes the best weights.
        with atomic_dir(Path(root) / "best", replace=True) as tmp:
            for f in path.iterdir():
                shutil.copy2(f, tmp / f.name)


def restore(folder: Path, model, optimizer, load_adapter: Callable[[Path], None]) -> ckpt.TrainerState:
    """Load a checkpoint into model/optimizer/RNG; returns its TrainerState."""
    state, opt_state = ckpt.load_checkpoint(folder)
    load_adapter(folder)
    optimizer.init(model.trainable_parameters())
    if opt_state:
        optimizer.state = tree_unflatten(list(opt_state.items()))
        optimizer.init(model.trainable_parameters())  # marks it initialised, keeps loaded values
    mx.eval(model.parameters(), optimizer.state)
    return state
