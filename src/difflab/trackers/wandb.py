"""Weights & Biases: one wandb run per difflab run, in logger.wandb.project, grouped by the sweep
folder in a sweep. WANDB_MODE=offline (or logger.wandb.mode=offline) keeps it on disk, under the
run folder's wandb/, for `wandb sync` later."""

from __future__ import annotations

import numpy as np
import wandb

from difflab.trackers import RunName, Tracker, final_numbers


class WandbTracker(Tracker):
    def __init__(self, settings, who: RunName):
        who.folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=settings.project, entity=settings.entity, mode=settings.mode,
                              group=settings.group or who.group, name=who.name, tags=list(settings.tags),
                              dir=str(who.folder), reinit="finish_previous")
        # steps as difflab counts them: curves logged after training (e.g. accuracy by t) may restart at 0
        self.run.define_metric("*", step_metric="step")

    def log_config(self, config: dict, hparams: dict) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_scalar(self, tag: str, value: float, step: int) -> None:
        self.run.log({tag: value, "step": step})

    def log_image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.run.log({tag: wandb.Image(image), "step": step})

    def log_text(self, tag: str, text: str) -> None:
        self.run.summary[tag] = text

    def log_final(self, metrics: dict, headline: dict, hparams: dict, step: int) -> None:
        self.run.summary.update(final_numbers(metrics))

    def close(self) -> None:
        self.run.finish()


def open_tracker(settings, who: RunName) -> Tracker:
    return WandbTracker(settings, who)
