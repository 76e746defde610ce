"""The MLX backend: mlx-lm models, compiled steps, edgetune's CPU kernels.

The primary backend (Apple Silicon through Metal; Linux through the CPU build
with OpenBLAS). The forward pieces it shares with evaluation and export
(`sft.target_logprobs`, `sft.to_micro_batch`, `lora.*`, `models.*`) stay where
they were; this class puts them behind `backends.Backend`.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Callable

from edgetune import losses as mlx_losses
from edgetune.runtime import mlx_core

mx = mlx_core()
import mlx.nn as nn  # noqa: E402  (after the fast-BLAS set-up above)
import mlx.optimizers as optim  # noqa: E402
from mlx.utils import tree_flatten, tree_map, tree_unflatten  # noqa: E402

OPTIMIZER_FILE = "optimizer.safetensors"


def make_schedule(kind: str, lr: float, steps: int, warmup: int, min_lr_ratio: float = 0.0):
    """Warm-up then constant / cosine / linear decay, as a function of the optimizer step
    (mlx's schedules; `torch_backend.lr_at` computes the same numbers, tests/test_backends.py)."""
    from edgetune.errors import UserError

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


def accumulate(grad_step: Callable, batches: list, seeds: list[int] | None = None, aux_sum: dict | None = None):
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


def global_norm(grads) -> "mx.array":
    return mx.sqrt(sum(mx.sum(mx.square(g)) for _, g in tree_flatten(grads)))


class MLXBackend:
    name = "mlx"
    losses = mlx_losses
    pad_multiple = 8  # rows are padded to a multiple of this (sft_data.collate)
    static_packed_rows = False  # mx.compile traces each shape cheaply; no need to pad packed rows
    reference_batch_factor = 1  # (the MLX reference pass, `preference.compute_reference`, batches its own way)

    def __init__(self):
        from edgetune.runtime import restore_openblas_threads

        restore_openblas_threads()  # a torch stage before this one, in this process, capped them

    # --- model -----------------------------------------------------------------------------------
    def load(self, recipe, echo):
        from edgetune.models import load_recipe_model

        return load_recipe_model(recipe, echo)

    def attach_lora(self, model, spec, seed: int) -> dict:
        from edgetune.lora import attach_lora

        return attach_lora(model, spec, seed)

    def load_adapter(self, model, folder: Path) -> None:
        from edgetune.lora import load_adapter_weights

        load_adapter_weights(model, folder)

    def save_adapter(self, model, adapter_cfg: dict, folder: Path) -> None:
        from edgetune.lora import save_adapter

        save_adapter(model, adapter_cfg, folder)

    def trainable_count(self, model) -> int:
        from edgetune.lora import trainable_count

        return trainable_count(model)

    def enable_grad_checkpoint(self, model) -> None:
        from mlx_lm.tuner.trainer import grad_checkpoint

        grad_checkpoint(model.layers[0])

    def set_training(self, model, training: bool) -> None:
        model.train() if training else model.eval()

    # --- batches and forward -----------------------------------------------------------------------
    def array(self, value):
        return mx.array(value)

    def to_host(self, value):
        import numpy as np

        return np.array(value)

    def micro_batch(self, batch, packing: bool = False):
        from edgetune.sft import to_micro_batch

        return to_micro_batch(batch)

    def target_logprobs(self, model, tokens, select, targets, segment_ids=None):
        from edgetune.sft import target_logprobs

        return target_logprobs(model, tokens, select, targets, segment_ids)

    def packed_layout(self, segment_ids):
        return mx.array(segment_ids)

    def sequence_logprobs(self, model, tokens, select, targets, weights, segment_ids=None, members=None):
        from edgetune.preference import sequence_logprobs

        return sequence_logprobs(model, tokens, select, targets, weights, segment_ids, members)

    @contextmanager
    def no_grad(self):
        yield  # MLX computes gradients only inside value_and_grad

    # --- optimisation ------------------------------------------------------------------------------
    def make_optimizer(self, model, cfg, steps: int):
        schedule = make_schedule(cfg.lr_schedule, cfg.learning_rate, steps, cfg.warmup_steps, cfg.min_lr_ratio)
        optimizer = optim.AdamW(learning_rate=schedule, weight_decay=cfg.weight_decay)
        optimizer.init(model.trainable_parameters())
        return optimizer

    def make_grad_step(self, model, loss_fn, compile: bool):
        return make_grad_step(model, loss_fn, compile)

    def accumulate(self, grad_step, batches, seeds, aux_sum):
        loss, ntoks, grads = accumulate(grad_step, batches, seeds, aux_sum)
        return float(loss), float(ntoks), grads, float(global_norm(grads))

    def make_update(self, model, optimizer, max_grad_norm, compile: bool):
        def apply_update(grads, ntoks):
            # Normalise by the supervised-token count of the whole accumulated batch.
            grads = tree_map(lambda g: g / ntoks, grads)
            if max_grad_norm:
                grads, _ = optim.clip_grad_norm(grads, max_grad_norm)
            optimizer.update(model, grads)

        if compile:
            full_state = [model.state, optimizer.state, mx.random.state]
            apply_update = partial(mx.compile, inputs=full_state, outputs=full_state)(apply_update)

        def update(grads, ntoks: float, norm: float) -> None:
            # `norm` goes unused: the lazy, compiled update measures the normalised gradients in
            # the same graph, at no extra read (a GPU backend clips by `norm` to spare a sync).
            apply_update(grads, mx.array(ntoks, mx.float32))
            mx.eval(model.trainable_parameters(), optimizer.state)

        return update

    def learning_rate(self, optimizer) -> float:
        return float(optimizer.learning_rate)

    def save_optimizer(self, optimizer, folder: Path) -> None:
        state = dict(tree_flatten(optimizer.state))
        if state:
            mx.save_safetensors(str(Path(folder) / OPTIMIZER_FILE), state)

    def load_optimizer(self, model, optimizer, folder: Path) -> None:
        path = Path(folder) / OPTIMIZER_FILE
        optimizer.init(model.trainable_parameters())
        if path.exists():
            stored, meta = mx.load(str(path), return_metadata=True)
            if meta.get("backend", "mlx") != "mlx":
                from edgetune.errors import UserError

                raise UserError(f"{path}: written by the {meta['backend']} backend; resume this run with "
                                f"backend: {meta['backend']}, or start over with --force")
            optimizer.state = tree_unflatten(list(stored.items()))
            optimizer.init(model.trainable_parameters())  # marks it initialised, keeps loaded values
        mx.eval(model.parameters(), optimizer.state)

    def peak_memory_gb(self) -> float:
        return mx.get_peak_memory() / 1e9

    @contextmanager
    def training_context(self, model):
        from edgetune.kernels import KERNELS_NOTE, training_kernels

        with training_kernels(model) as fast:
            yield KERNELS_NOTE if fast else None

    def describe(self) -> dict:
        import mlx_lm

        from edgetune.runtime import blas_info

        return {"backend": "mlx", "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__,
                "device": str(mx.default_device()), "blas": blas_info()}
