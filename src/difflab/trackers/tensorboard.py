"""TensorBoard: the run's curves, pictures and config text in its tb/ folder (in a sweep, in
tb/<the job's settings>, so that TensorBoard names the run by them), and the HParams view."""

from __future__ import annotations

import json

import numpy as np
import yaml
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summaries

from difflab.trackers import RunName, Tracker


def markdown_code(text: str) -> str:
    """Text TensorBoard shows as it is (its text plugin renders markdown): an indented block."""
    return "\n".join("    " + line for line in text.splitlines())


def hparam_value(value):
    """HParams columns hold numbers, text and booleans; anything else as its text."""
    return value if isinstance(value, (bool, int, float, str)) else json.dumps(value)


class TensorBoardTracker(Tracker):
    def __init__(self, who: RunName):
        folder = who.folder / "tb"
        self.writer = SummaryWriter(str(folder / who.name if who.sweep_dir is not None else folder))

    def log_config(self, config: dict, hparams: dict) -> None:
        self.writer.add_text("config", markdown_code(yaml.safe_dump(config, sort_keys=False)))

    def log_scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, value, step)

    def log_image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.writer.add_image(tag, image, step, dataformats="HWC")

    def log_text(self, tag: str, text: str) -> None:
        self.writer.add_text(tag, text)

    def log_final(self, metrics: dict, headline: dict, hparams: dict, step: int) -> None:
        """The HParams view: one column per setting, one per headline metric (the last value of
        its curve, which the hub has logged), written into this run's own folder
        (SummaryWriter.add_hparams would make a stray extra run in a sub-folder)."""
        params = {k: hparam_value(v) for k, v in hparams.items()} or {"run": "default"}
        for summary in hparams_summaries(params, {tag: 0.0 for tag in headline}):
            self.writer.file_writer.add_summary(summary)
        if "provenance" in metrics:
            self.writer.add_text("provenance", markdown_code(json.dumps(metrics["provenance"], indent=2)))

    def close(self) -> None:
        self.writer.close()


def open_tracker(settings, who: RunName) -> Tracker:
    return TensorBoardTracker(who)
