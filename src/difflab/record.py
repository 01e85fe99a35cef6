"""The run record a researcher reads afterwards: metrics.json (merged by every stage of a run,
with the provenance of what made it) and losses.csv (the curves a sweep comparison overlays
without reading TensorBoard)."""

from __future__ import annotations

import json
import logging
import platform
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

from difflab.artifacts import code_fingerprint
from difflab.checkpoint import atomic_write_json, atomic_write_text
from difflab.version import __version__

log = logging.getLogger("difflab")


def read_metrics(run_dir: Path) -> dict:
    """The run's metrics.json; {} when there is none, or when it is damaged (then replaced by the
    next write, with a warning)."""
    path = run_dir / "metrics.json"
    if not path.is_file():
        return {}
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        log.warning("%s is unreadable (%s): it is replaced by this run's record", path, e)
        return {}
    if not isinstance(metrics, dict):
        log.warning("%s holds a %s, not a run record: it is replaced by this run's record", path, type(metrics).__name__)
        return {}
    return metrics


def run_checkpoint(run_dir: Path) -> Optional[Path]:
    """The checkpoint of the model a run folder holds or names: its own checkpoints/last.pt, else the one its
    metrics.json records (a model the run took from the artifact cache, or the one a mode=sample run read)."""
    own = run_dir / "checkpoints" / "last.pt"
    if own.is_file():
        return own
    named = read_metrics(run_dir).get("checkpoint")
    return Path(named) if isinstance(named, str) else None


def write_metrics(run_dir: Path, metrics: dict) -> None:
    """Merge into metrics.json atomically, so stages of one run add to one file."""
    atomic_write_json(run_dir / "metrics.json", {**read_metrics(run_dir), **metrics})


def provenance(device: str) -> dict:
    """What made the run's numbers: difflab's version and code fingerprint, its git commit when
    it runs from a checkout (and whether that had uncommitted changes), the library versions,
    the device and the command line."""
    return {"difflab": __version__, "code_fingerprint": code_fingerprint(), **_git_state(),
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": device,
            "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or
            platform.machine(), "command": " ".join(sys.argv)}


def _git_state() -> dict:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

    try:
        return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain", "--", "."))}
    except (OSError, subprocess.SubprocessError):  # no git, or not a checkout (an installed wheel)
        return {}


def write_loss_csv(path: Path, train: list, val: list) -> None:
    """step,split,loss rows."""
    rows = [f"{s},train,{v:.6g}" for s, v in train] + [f"{s},val,{v:.6g}" for s, v in val]
    atomic_write_text(path, "step,split,loss\n" + "\n".join(rows) + "\n")
