"""What a metric's name says: whether lower or higher is better at it. The config checks
sweep.metric with it before a run starts; the sweep report and the optuna study rank by it."""

from __future__ import annotations

from typing import Optional

SPREAD_SUFFIXES = ("_se", "_std")  # spreads of a metric (kid_std, ...), not metrics to rank
LOWER_IS_BETTER = ("fd", "fid", "kid", "class_share", "val_loss", "best_val_loss", "final_loss", "loss", "rec_", "mse",
                   "lpips")
HIGHER_IS_BETTER = ("class_accuracy", "precision", "recall", "inception_score", "psnr", "ssim")


def metric_direction(key: str) -> Optional[str]:
    """"lower" or "higher", whichever is better for the metric `key` (real_* ones included), by
    its name, so a new extractor's fd_<name> is ranked without a list to update; None for
    anything else, a metric's spread (K_se, K_std) included."""
    name = key.removeprefix("real_")
    if name.endswith(SPREAD_SUFFIXES):
        return None
    if name.startswith(LOWER_IS_BETTER) or "_fd" in name:
        return "lower"
    return "higher" if name.startswith(HIGHER_IS_BETTER) else None
