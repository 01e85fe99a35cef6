"""Files difflab writes and reads back: one atomic writer for all of them, and the one way a
checkpoint is loaded (weights_only, so a checkpoint cannot run code).

Atomic means: written to a temp file in the target's folder, fsynced, renamed over the target,
then the folder fsynced, so a run killed at any point leaves either the old file or the new one,
never half of either, and a power cut after the rename keeps the new one."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

import torch

from difflab.errors import UserError

CHECKPOINT_FORMAT = 1  # the layout of a training checkpoint; one without the key is format 1

# Files get the permissions a plain open() would give them (mkstemp's are private to the owner),
# so a cache or run folder shared with a group stays readable by it.
_UMASK = os.umask(0)
os.umask(_UMASK)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Call `write(f)` on a binary temp file beside `path`, then make it `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save, atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def atomic_copy(source: str | os.PathLike, path: str | os.PathLike) -> None:
    def copy(f: IO[bytes]) -> None:
        with open(source, "rb") as src:
            shutil.copyfileobj(src, f, 1 << 20)

    atomic_write(path, copy)


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
    if state.get("format", 1) > CHECKPOINT_FORMAT:
        raise UserError(f"The {what} {path} has checkpoint format {state['format']}, newer than the {CHECKPOINT_FORMAT} "
                        "this difflab reads: upgrade difflab to use it.")
    return state
