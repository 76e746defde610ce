"""Checkpoints that survive a crash and resume exactly.

A checkpoint is a folder `checkpoints/step-NNNNNNN/` holding the adapter
weights, the optimizer state (which carries the step count the LR schedule
reads), the data cursor (the data order and the dropout RNG are pure functions
of seed and cursor, so they need no state of their own) and a `MANIFEST.json` of sha256
checksums. It is written into a hidden temp folder and renamed into place, so
a folder with the final name is complete unless something later damaged it;
`latest_valid` re-checks the checksums and skips (with a warning) any folder
that fails.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgetune.fileio import atomic_dir, sha256_file, write_json

PREFIX = "step-"


@dataclass
class TrainerState:
    """Everything besides tensors that resuming needs."""

    step: int  # optimizer steps done
    cursor: int  # micro-batches consumed (the data order is a pure function of seed and epoch)
    best_eval_loss: float | None = None
    nonfinite_in_row: int = 0

    def to_json(self) -> dict:
        return dict(self.__dict__)


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:07d}"


def save_checkpoint(root: Path, state: TrainerState, adapter_files: Callable[[Path], None],
                    optimizer_files: Callable[[Path], None]) -> Path:
    """Write one checkpoint atomically; `adapter_files(folder)` and `optimizer_files(folder)`
    write the adapter and the optimizer state (in the backend's own format) into it."""
    final = Path(root) / checkpoint_name(state.step)
    with atomic_dir(final, replace=True) as tmp:
        adapter_files(tmp)
        optimizer_files(tmp)
        write_json(tmp / "trainer_state.json", state.to_json())
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        write_json(tmp / "MANIFEST.json", {"files": {n: sha256_file(tmp / n) for n in files}})
    return final


def verify(folder: Path) -> str | None:
    """None if the checkpoint is complete and intact, else what is wrong."""
    try:
        manifest = json.loads((folder / "MANIFEST.json").read_text())
    except FileNotFoundError:
        return "no MANIFEST.json"
    except (json.JSONDecodeError, OSError) as e:
        return f"unreadable MANIFEST.json ({e})"
    for name, digest in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256_file(path) != digest:
            return f"{name} does not match its checksum (truncated or damaged)"
    return None


def list_checkpoints(root: Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)), reverse=True)


def latest_valid(root: Path, warn: Callable[[str], None]) -> Path | None:
    """The newest checkpoint whose files match their checksums; damaged ones are reported."""
    for folder in list_checkpoints(root):
        problem = verify(folder)
        if problem is None:
            return folder
        warn(f"skipping damaged checkpoint {folder}: {problem}")
    return None


def load_state(folder: Path) -> TrainerState:
    return TrainerState(**json.loads((folder / "trainer_state.json").read_text()))


def prune(root: Path, keep_last: int, keep: set[str] = frozenset()) -> None:
    """Keep the newest `keep_last` checkpoints and any named in `keep` (e.g. the best)."""
    for i, folder in enumerate(list_checkpoints(root)):
        if i >= keep_last and folder.name not in keep:
            shutil.rmtree(folder, ignore_errors=True)
    # Leftover temp folders from a crash mid-write are garbage by construction.
    for p in Path(root).glob(f".{PREFIX}*"):
        if p.is_dir() and p.name.endswith(".tmp"):
            shutil.rmtree(p, ignore_errors=True)
        elif ".old-" in p.name and not _pid_alive(p.name.rsplit("-", 1)[-1]):
            shutil.rmtree(p, ignore_errors=True)


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except (ValueError, ProcessLookupError, PermissionError):
        return False
