"""Atomic checkpoint files: written to a temp file, fsynced, then renamed over the target, so
a run killed mid-write leaves the previous checkpoint intact. Loaded with weights_only=True."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from difflab.errors import UserError


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | os.PathLike, what: str = "checkpoint") -> dict:
    """Load a checkpoint dict, turning a missing or unreadable file into a one-sentence error."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"The {what} {path} does not exist: point to a .pt file inside a run's checkpoints/ folder.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise UserError(f"The {what} {path} could not be read ({type(e).__name__}): it is corrupt or not a difflab checkpoint; use another one.") from None
    if not isinstance(state, dict) or "config" not in state:
        raise UserError(f"The {what} {path} is not a difflab checkpoint: use a .pt file written by a difflab run.")
    return state
