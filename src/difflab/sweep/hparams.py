"""TensorBoard's HParams view for a run: its settings and final metrics, written into the run's
own tb/ folder (SummaryWriter.add_hparams would make a stray extra run in a sub-folder)."""

from __future__ import annotations

from pathlib import Path

from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams


def _value(text: str) -> float | str | bool:
    """Override values arrive as text; numbers and booleans become filterable numbers."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return float(text)
    except ValueError:
        return text


def overrides_to_hparams(overrides: list[str]) -> dict:
    """`key=value` command-line overrides (not hydra.*) as an hparams dict."""
    pairs = (o.lstrip("+~").split("=", 1) for o in overrides if "=" in o)
    return {k: _value(v) for k, v in pairs if not k.startswith("hydra")}


def write_hparams(tb_dir: str | Path, params: dict, metrics: dict) -> None:
    metrics = {f"final/{k}": float(v) for k, v in metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    with SummaryWriter(str(tb_dir)) as writer:
        for summary in hparams(params or {"run": "default"}, metrics):
            writer.file_writer.add_summary(summary)
        for tag, value in metrics.items():  # the HParams table reads these scalars
            writer.add_scalar(tag, value)
