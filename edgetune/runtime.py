"""Import MLX with a fast BLAS on Linux.

The Linux `mlx[cpu]` wheel bundles the reference BLAS: float32 matmul runs at
~3-6 GFLOP/s on a 2-core x86 machine, against ~120-190 GFLOP/s with OpenBLAS.
Loading OpenBLAS with RTLD_GLOBAL *before* MLX is first imported makes the
dynamic linker resolve MLX's `cblas_*` symbols to it (the same effect as
LD_PRELOAD, without re-executing the process).

Never done on macOS (MLX uses Accelerate and Metal there). Turned off with
EDGETUNE_FAST_BLAS=0. Every edgetune module that needs MLX imports it through
`mlx_core()` so the order is right; nothing happens at edgetune import time.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys

# Debian/Ubuntu paths first (the threaded build), then generic names.
_OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

_state: dict = {"blas": None, "why": "not set up yet", "threads": None}  # threads: before a cap


def find_openblas() -> str | None:
    for path in _OPENBLAS_CANDIDATES:
        if os.path.exists(path):
            return path
    hits = sorted(glob.glob("/usr/lib*/**/libopenblas*.so*", recursive=True))
    return hits[0] if hits else None


def setup_fast_blas() -> str:
    """Load OpenBLAS globally if this is Linux, allowed, and MLX is not loaded yet.

    Returns a one-line reason, also kept for run manifests (`blas_info()`).
    """
    if _state["why"] != "not set up yet":
        return _state["why"]  # type: ignore[return-value]
    if not sys.platform.startswith("linux"):
        why = "not Linux: MLX uses its platform BLAS"
    elif os.environ.get("EDGETUNE_FAST_BLAS", "1") == "0":
        why = "EDGETUNE_FAST_BLAS=0: using the BLAS bundled with mlx[cpu]"
    elif "libopenblas" in os.environ.get("LD_PRELOAD", ""):
        why = "OpenBLAS preloaded through LD_PRELOAD"
        _state["blas"] = "openblas (LD_PRELOAD)"
    elif "mlx.core" in sys.modules:
        why = "MLX was imported before edgetune could load OpenBLAS: using the bundled BLAS"
    else:
        path = find_openblas()
        if path is None:
            why = ("no OpenBLAS found: using the slow BLAS bundled with mlx[cpu] "
                   "(apt-get install libopenblas0-pthread for ~30x faster float32 matmul)")
        else:
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                _state["blas"] = path
                why = f"OpenBLAS loaded from {path}"
            except OSError as e:  # a broken install must not stop training
                why = f"could not load {path} ({e}): using the bundled BLAS"
    _state["why"] = why
    return why


def limit_openblas_threads(n: int) -> bool:
    """Cap the OpenBLAS loaded for MLX at `n` threads (True if it was loaded here).

    The torch backend runs its own OpenMP threads on the CPU; OpenBLAS's pthreads on top of them
    oversubscribe the cores (measured 2.6x slower torch steps on 2 cores), while torch's matmuls
    that resolve to OpenBLAS stay fast on one of its threads.
    """
    if not _state["blas"] or _state["blas"].startswith("openblas (LD_PRELOAD"):
        return False
    try:
        lib = ctypes.CDLL(_state["blas"])
        if _state["threads"] is None:
            _state["threads"] = lib.openblas_get_num_threads()
        lib.openblas_set_num_threads(n)
        return True
    except (OSError, AttributeError):
        return False


def restore_openblas_threads() -> None:
    """Undo `limit_openblas_threads`: MLX work after a torch stage in the same process (`edgetune
    run`: evaluation, or an MLX stage) gets all of OpenBLAS's threads back."""
    if _state["threads"] is None:
        return
    try:
        ctypes.CDLL(_state["blas"]).openblas_set_num_threads(_state["threads"])
    except (OSError, AttributeError):
        pass
    _state["threads"] = None


def blas_info() -> dict:
    return {"blas": _state["blas"], "why": _state["why"]}


def mlx_core():
    """Return `mlx.core`, set up with a fast BLAS where possible."""
    setup_fast_blas()
    import mlx.core as mx

    return mx
