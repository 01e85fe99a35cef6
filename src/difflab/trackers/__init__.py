"""Where a run's numbers and pictures go: the trackers of the `logger` config group (TensorBoard,
wandb, mlflow, csv), several at once, behind one small interface.

A run opens them once (`open_trackers`) and hands the result wherever a TensorBoard writer went:
`Trackers` answers SummaryWriter's add_scalar / add_image / add_text, so the training loop, the
sampling and the evaluation log to every tracker without knowing which there are.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

import difflab.distributed as dist
from difflab.errors import UserError


@dataclass(frozen=True)
class RunName:
    """Who a tracker run is: its folder, its name (made of the settings that differ between a
    sweep's jobs), and the sweep folder that groups it with its siblings (None for a single run)."""

    folder: Path
    name: str
    sweep_dir: Optional[Path] = None

    @property
    def group(self) -> Optional[str]:
        """The sweep's name: its folder below multirun/ (date/time), shared by all its jobs."""
        return None if self.sweep_dir is None else "/".join(self.sweep_dir.parts[-2:])


class Tracker:
    """One destination. Images arrive as uint8 C,H,W tensors; `config` is the resolved config."""

    def log_config(self, config: dict, hparams: dict) -> None: ...

    def log_scalar(self, tag: str, value: float, step: int) -> None: ...

    def log_image(self, tag: str, image: np.ndarray, step: int) -> None: ...  # uint8 H,W,C

    def log_text(self, tag: str, text: str) -> None: ...

    def log_final(self, metrics: dict, headline: dict, hparams: dict, step: int) -> None:
        """metrics: the run's final numbers; headline: {tag: value} of the curves whose last values are
        the run's result (the HParams metrics); hparams: the settings that tell the run from others."""

    def close(self) -> None: ...


# name -> (module in this package, the package it needs, the extra that installs it)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard", None), "wandb": ("wandb", "wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow", "mlflow"), "csv": ("csv", None, None)}


def tracker_names(cfg: DictConfig) -> list[str]:
    """The trackers the config selects: the options of the logger group (logger=[tensorboard,csv])."""
    chosen = cfg.get("logger") or {}
    return [name for name in chosen if chosen[name] is not None]


def check_trackers(cfg: DictConfig) -> None:
    """Every selected tracker exists and its package is installed; one sentence otherwise."""
    for name in tracker_names(cfg):
        if name not in TRACKERS:
            raise UserError(f"logger.{name} is not a tracker: choose some of {', '.join(TRACKERS)}, e.g. "
                            "logger=[tensorboard,csv].")
        _, package, extra = TRACKERS[name]
        if package and importlib.util.find_spec(package) is None:
            raise UserError(f"logger={name} needs the {package} package, which is not installed: "
                            f"pip install 'difflab[{extra or package}]', or choose another logger.")


def flat_settings(config: dict, prefix: str = "") -> dict:
    """A nested config as {'train.lr': 0.002, ...}: what mlflow params and HParams columns hold."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_settings(value, f"{name}."))
        else:
            out[name] = value
    return out


# The run's results a sweep is compared by (TensorBoard's HParams metrics), besides the
# final evaluation (val/final/<metric>): the tag of the curve each one ends.
HEADLINE_TAGS = {"final_loss": "train/loss", "best_val_loss": "val/best_loss"}
HEADLINE = ("sample_class_accuracy_t0", "reconstruction_mse", "reconstruction_psnr")


def final_numbers(metrics: dict) -> dict[str, float]:
    """The run's top-level numeric results (not nested blocks, not booleans)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class Trackers:
    """Every tracker of a run, answering SummaryWriter's calls (and the run's own: the config and
    the final metrics). Empty on torchrun ranks other than 0, which write nothing."""

    def __init__(self, trackers: list[Tracker], hparams: Optional[dict] = None, owned: bool = True):
        self.trackers, self.hparams, self.owned = trackers, hparams or {}, owned
        self.tags: set[str] = set()  # the scalar curves logged so far: the HParams view reads their last values

    def borrowed(self) -> Trackers:
        """The same trackers for a part of the run (a stage trained in the run's own folder), which
        closing leaves open for the rest of the run."""
        view = Trackers(self.trackers, self.hparams, owned=False)
        view.tags = self.tags
        return view

    def add_scalar(self, tag: str, value: float, step: int = 0) -> None:
        self.tags.add(tag)
        for t in self.trackers:
            t.log_scalar(tag, float(value), int(step))

    def add_image(self, tag: str, image: Tensor | np.ndarray, step: int = 0) -> None:
        array = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
        if array.dtype != np.uint8:  # a float image in [0, 1]
            array = (array.clip(0, 1) * 255).round().astype(np.uint8)
        array = np.ascontiguousarray(array.transpose(1, 2, 0))
        for t in self.trackers:
            t.log_image(tag, array, int(step))

    def add_text(self, tag: str, text: str, step: int = 0) -> None:
        for t in self.trackers:
            t.log_text(tag, text)

    def log_config(self, config: dict, hparams: dict) -> None:
        for t in self.trackers:
            t.log_config(config, hparams)

    def log_final(self, metrics: dict, hparams: dict, step: int) -> None:
        """The run's result: its headline numbers end their curves (logged at `step` where no curve
        has them yet), and each tracker records them as its final metrics."""
        headline = {}
        for key, value in final_numbers(metrics).items():
            tag = HEADLINE_TAGS.get(key, f"val/final/{key}")
            if key in HEADLINE_TAGS or key in HEADLINE or tag in self.tags:
                headline[tag] = value
                if tag not in self.tags:
                    self.add_scalar(tag, value, step)
        for t in self.trackers:
            t.log_final(metrics, headline, hparams, step)

    def close(self) -> None:
        if not self.owned:
            return
        for t in self.trackers:
            t.close()
        self.trackers = []


def open_trackers(cfg: DictConfig, who: RunName, hparams: Optional[dict] = None) -> Trackers:
    """The trackers cfg.logger selects, started for the run `who` with its resolved config (none
    on a torchrun rank other than 0)."""
    if not dist.is_main():
        return Trackers([])
    check_trackers(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    trackers = []
    for name in tracker_names(cfg):
        module = importlib.import_module(f"difflab.trackers.{TRACKERS[name][0]}")
        trackers.append(module.open_tracker(cfg.logger[name], who))
    hub = Trackers(trackers, hparams)
    hub.log_config(config, hub.hparams)
    return hub


OPEN_RUNS: dict[Path, Trackers] = {}  # the trackers of each run in progress, by its folder (the runner's)


def stage_trackers(cfg: DictConfig, folder: Path) -> Trackers:
    """The trackers of a stage trained in `folder`: the run's own when it is the run's folder
    (mode=reconstruction, mode=classifier), else, for a prerequisite trained in a sub-folder
    (autoencoder/, classifier/), a tracker run of its own named by that folder."""
    if folder in OPEN_RUNS:
        return OPEN_RUNS[folder].borrowed()
    return open_trackers(cfg, RunName(folder, folder.name))
