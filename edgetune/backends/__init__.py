"""Training backends: one small interface, two implementations (MLX, PyTorch).

Everything above this line — the training loop (`trainer.train`), the SFT and
preference stages, data, recipes, checkpoints' layout, metrics and reports — is
backend-neutral and calls only what `Backend` declares. What differs lives in
`mlx_backend.py` (the primary backend: mlx-lm models, Apple Silicon and Linux
CPU) and `torch_backend.py` (transformers + PEFT, for NVIDIA boxes; installed
with `pip install "edgetune[torch]"` and imported only when chosen, so MLX users
never need torch). Each backend keeps its losses once, as small pure functions
(`edgetune.losses` for MLX, `torch_losses.py` for torch), tested against the same
hand-worked numbers.

Adapters are always saved in mlx-lm's format (`adapters.safetensors` +
`adapter_config.json`), whichever backend trained them, so `edgetune export`,
`mlx_lm.generate --adapter-path` and either backend's `init_from`/resume read
them unchanged.
"""

from __future__ import annotations

import importlib.util
import platform
import sys
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Callable, Protocol

from edgetune.errors import UserError

BACKENDS = ("mlx", "torch")


class Backend(Protocol):
    """What the training loops need from a tensor library. Arrays are the backend's own."""

    name: str
    pad_multiple: int  # batches are padded to a multiple of this many positions
    static_packed_rows: bool  # packed SFT rows always span max_seq_len (one compiled shape)

    # --- model -------------------------------------------------------------------------------------
    def load(self, recipe, echo: Callable[[str], None]):
        """The recipe's base model and tokenizer as `models.LoadedModel`, cast for this device."""

    def attach_lora(self, model, spec, seed: int) -> dict:
        """Freeze the base, add LoRA layers; returns the mlx-lm adapter config."""

    def load_adapter(self, model, folder: Path) -> None:
        """Load an mlx-lm-format adapter into a model with matching LoRA layers."""

    def save_adapter(self, model, adapter_cfg: dict, folder: Path) -> None:
        """Write the adapter in mlx-lm's format (atomically per file)."""

    def trainable_count(self, model) -> int: ...

    def enable_grad_checkpoint(self, model) -> None: ...

    def set_training(self, model, training: bool) -> None:
        """Dropout on (training) or off (evaluation, reference pass)."""

    # --- batches and forward -----------------------------------------------------------------------
    def array(self, value) -> Any:
        """A numpy array as this backend's array, on its device."""

    def to_host(self, value) -> Any:
        """This backend's array as numpy (float32 for floats)."""

    def micro_batch(self, batch, packing: bool = False):
        """`sft_data.Batch` -> `trainer.MicroBatch` whose arrays `target_logprobs` takes
        (`packing`: the recipe packs rows; a backend with static packed rows then lays every batch
        out as packed, even one whose rows hold one example each)."""

    reference_batch_factor: int  # the reference pass scores this many training batches' positions per call

    def target_logprobs(self, model, tokens, select, targets, segment_ids=None):
        """log p(target) at the flat positions `select` of the [B, T] batch -> [S] (float32)."""

    def packed_layout(self, segment_ids) -> Any:
        """The [B, T] segment ids of packed rows as the layout `target_logprobs` takes (MLX: the
        segment ids; torch: positions restarting at each example)."""

    def sequence_logprobs(self, model, tokens, select, targets, weights, layout=None, members=None):
        """Summed completion log-probs and completion token counts per sequence: per row [R] for
        plain rows; per sequence [N] of packed rows (`layout`, and `members` [N, S] marking the
        selected positions of each sequence)."""

    losses: Any  # a module-like namespace: sft_loss_from_logprobs, dpo_loss, kto_loss, orpo_loss

    def no_grad(self) -> AbstractContextManager: ...

    # --- optimisation ------------------------------------------------------------------------------
    def make_optimizer(self, model, cfg, steps: int):
        """AdamW (decoupled weight decay, no bias correction — mlx's semantics on both backends) with
        the recipe's warm-up + schedule."""

    def make_grad_step(self, model, loss_fn: Callable, compile: bool) -> Callable:
        """`grad_step(*arrays) -> (loss_sum, n_units, aux sums, grads)` for one micro-batch."""

    def accumulate(self, grad_step: Callable, batches: list, seeds: list[int] | None, aux_sum: dict | None):
        """(loss_sum, n_units, grads, grad_norm) summed over micro-batches, `grad_norm` the global L2
        norm of the summed (not yet normalised) gradients, read with the loss (on a GPU each read
        of a device value is a sync); aux sums added into `aux_sum`."""

    def make_update(self, model, optimizer, max_grad_norm: float | None, compile: bool) -> Callable:
        """`update(grads, n_units, grad_norm)`: normalise by `n_units`, clip by mlx's rule (scale by
        min(max / (norm of the normalised gradients + 1e-6), 1)), one optimizer step. `grad_norm`
        (`accumulate`'s) lets a backend clip without measuring the norm again: grad_norm / n_units."""

    def learning_rate(self, optimizer) -> float: ...

    def save_optimizer(self, optimizer, folder: Path) -> None: ...

    def load_optimizer(self, model, optimizer, folder: Path) -> None: ...

    def peak_memory_gb(self) -> float: ...

    def training_context(self, model) -> AbstractContextManager:
        """Entered around the training loop; yields a note to print, or None."""

    def describe(self) -> dict:
        """Versions, device and dtype, for manifests and `edgetune doctor`."""


def _torch_missing() -> list[str]:
    """The torch backend's packages that are not installed (none: it can run)."""
    return [m for m in ("torch", "transformers", "peft") if importlib.util.find_spec(m) is None]


def get_backend(name: str) -> Backend:
    """The backend object for `name` ("mlx" or "torch"). Raises UserError when it is not installed."""
    if name == "mlx":
        from edgetune.backends.mlx_backend import MLXBackend

        return MLXBackend()
    if name == "torch":
        missing = _torch_missing()
        if missing:
            raise UserError(f"backend: torch needs {', '.join(missing)}: pip install \"edgetune[torch]\" "
                            "(or set backend: mlx)")
        from edgetune.backends.torch_backend import TorchBackend

        return TorchBackend()
    raise UserError(f"backend: {name!r} is not one of mlx, torch, auto")


def is_apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def torch_status() -> dict:
    """Whether the torch backend can run here, and on which device (imports torch only if present)."""
    missing = _torch_missing()
    if missing:
        return {"available": False, "why": f"not installed: {', '.join(missing)} (pip install \"edgetune[torch]\")"}
    import torch

    cuda = torch.cuda.is_available()
    return {"available": True, "cuda": cuda, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
            "version": torch.__version__}


def mlx_status() -> dict:
    if importlib.util.find_spec("mlx") is None:
        return {"available": False, "why": "not installed (pip install mlx, or mlx[cpu] on Linux)"}
    from edgetune.runtime import mlx_core

    mx = mlx_core()
    metal = bool(getattr(mx, "metal", None) and mx.metal.is_available())
    return {"available": True, "device": "gpu (Metal)" if metal else "cpu", "version": mx.__version__}


# Measured with scripts/bench_backends.py on a 2-core AMD EPYC (Linux, no GPU), same recipe and data
# (29M-parameter `small` model, packed 4 x 512 rows), fastest of 3 alternating rounds: torch 503
# tokens/s, MLX (OpenBLAS + edgetune's CPU kernels) 392, same final loss. See `choose_backend`.
LINUX_CPU_FASTER = "torch"


def choose_backend(requested: str) -> tuple[str, str]:
    """(backend name, why) for the recipe's `backend:` value; `auto` decides by machine:
    MLX on Apple Silicon, torch where CUDA is present, else the backend measured faster on a
    Linux CPU among those installed."""
    if requested in BACKENDS:
        return requested, f"backend: {requested} (from the recipe)"
    if requested != "auto":
        raise UserError(f"backend: {requested!r} is not one of mlx, torch, auto")
    if is_apple_silicon() and importlib.util.find_spec("mlx") is not None:
        return "mlx", "auto: Apple Silicon, MLX uses the GPU through Metal and unified memory"
    t = torch_status()
    if t["available"] and t.get("cuda"):
        return "torch", f"auto: CUDA device {t['device']} (torch backend)"
    m_ok = importlib.util.find_spec("mlx") is not None
    if m_ok and t["available"]:
        return LINUX_CPU_FASTER, (f"auto: no GPU; both backends installed, {LINUX_CPU_FASTER} measured faster on a CPU "
                                  "(scripts/bench_backends.py)")
    if m_ok:
        return "mlx", "auto: no GPU; MLX (CPU) is the backend installed"
    if t["available"]:
        return "torch", "auto: no GPU; torch (CPU) is the backend installed"
    raise UserError("no training backend is installed: pip install edgetune (MLX) or \"edgetune[torch]\"")
