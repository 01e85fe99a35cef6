"""The sweep's metric: the number that says which job won (sweep.metric), whether lower or higher
is better at it, and the value a run returns to Hydra's sweeper (the optuna objective).

`auto` takes the evaluation metric when the runs measured one, since a sweep over sampling
settings (guidance scale, sampler, steps) shares one trained model and so one training loss;
without an evaluation, the held-out loss, then the training loss.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

from difflab.metric_names import metric_direction

AUTO = "auto"
# `auto`'s preference, first present wins: all are lower-is-better, so an `auto` study minimises.
AUTO_ORDER = ("fd_inception", "fd_classifier", "fd_classifier_class_mean", "kid_inception", "kid_classifier",
              "val_loss", "best_val_loss", "final_loss")
def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def choose_metric(asked: str, recorded: Iterable[dict]) -> Optional[str]:
    """The metric `sweep.metric=asked` means for runs that recorded these metrics: the one asked
    for, or for `auto` the first of AUTO_ORDER that every run has (else that any run has)."""
    if asked != AUTO:
        return asked
    recorded = [m for m in recorded]
    for test in (all, any):
        for key in AUTO_ORDER:
            if recorded and test(is_number(m.get(key)) for m in recorded):
                return key
    return None


def objective(metrics: dict, asked: str) -> Optional[float]:
    """The value a run hands its sweeper: the sweep metric, None when the run has not got it."""
    key = choose_metric(asked, [metrics])
    value = metrics.get(key) if key else None
    return float(value) if is_number(value) else None


def optuna_direction(asked: str) -> str:
    """${sweep_direction:${sweep.metric}} in conf/hydra/sweeper/optuna.yaml."""
    return "maximize" if metric_direction(asked) == "higher" else "minimize"

