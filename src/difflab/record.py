"""The run record a researcher reads afterwards: metrics.json (merged by every stage of a run)
and losses.csv (the curves a sweep comparison overlays without reading TensorBoard)."""

from __future__ import annotations

import json
from pathlib import Path

from difflab.checkpoint import atomic_write_json, atomic_write_text


def read_metrics(run_dir: Path) -> dict:
    path = run_dir / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def write_metrics(run_dir: Path, metrics: dict) -> None:
    """Merge into metrics.json atomically, so stages of one run add to one file."""
    atomic_write_json(run_dir / "metrics.json", {**read_metrics(run_dir), **metrics})


def write_loss_csv(path: Path, train: list, val: list) -> None:
    """step,split,loss rows."""
    rows = [f"{s},train,{v:.6g}" for s, v in train] + [f"{s},val,{v:.6g}" for s, v in val]
    atomic_write_text(path, "step,split,loss\n" + "\n".join(rows) + "\n")
