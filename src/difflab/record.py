"""The run record a researcher reads afterwards: metrics.json (merged by every stage of a run)
and losses.csv (the curves a sweep comparison overlays without reading TensorBoard)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from difflab.checkpoint import atomic_write_json, atomic_write_text

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


def write_metrics(run_dir: Path, metrics: dict) -> None:
    """Merge into metrics.json atomically, so stages of one run add to one file."""
    atomic_write_json(run_dir / "metrics.json", {**read_metrics(run_dir), **metrics})


def write_loss_csv(path: Path, train: list, val: list) -> None:
    """step,split,loss rows."""
    rows = [f"{s},train,{v:.6g}" for s, v in train] + [f"{s},val,{v:.6g}" for s, v in val]
    atomic_write_text(path, "step,split,loss\n" + "\n".join(rows) + "\n")
