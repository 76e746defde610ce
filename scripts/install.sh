#!/usr/bin/env bash
# One-step set-up on a fresh machine: fast BLAS for MLX on Linux, then edgetune
# with its test tools. Safe to run again (each step is a no-op when done).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ "$(uname -s)" = "Linux" ]; then
  # mlx[cpu] ships a reference BLAS (~5 GFLOP/s); edgetune loads Debian's OpenBLAS
  # (~30x faster) automatically when it is installed.
  if ! ls /usr/lib/*/openblas-pthread/libopenblas.so.0 >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
      apt-get update -qq >/dev/null
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread >/dev/null
    else
      echo "note: install OpenBLAS (sudo apt-get install libopenblas0-pthread) for much faster training on this CPU" >&2
    fi
  fi
  # The CPU build of torch (only the test extra needs it: transformers parity tests).
  # Pinned so pip takes the CPU wheel this machine kind keeps on disk instead of a multi-GB CUDA build.
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[test]"
