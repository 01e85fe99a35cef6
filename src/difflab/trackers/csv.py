"""csv: every scalar as a `step,tag,value` row of scalars.csv in the run folder, and the final
metrics in final_metrics.csv (`metric,value`); readable with no tracker installed."""

from __future__ import annotations

import csv
import io

from difflab.checkpoint import atomic_write_text
from difflab.trackers import RunName, Tracker, final_numbers


class CSVTracker(Tracker):
    def __init__(self, who: RunName):
        self.folder = who.folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.file = open(self.folder / "scalars.csv", "w", newline="")
        self.rows = csv.writer(self.file)
        self.rows.writerow(["step", "tag", "value"])

    def log_scalar(self, tag: str, value: float, step: int) -> None:
        self.rows.writerow([step, tag, f"{value:.8g}"])
        self.file.flush()  # a curve to read while the run goes on

    def log_final(self, metrics: dict, headline: dict, hparams: dict, step: int) -> None:
        text = io.StringIO()
        rows = csv.writer(text)
        rows.writerow(["metric", "value"])
        rows.writerows([k, f"{v:.8g}"] for k, v in final_numbers(metrics).items())
        atomic_write_text(self.folder / "final_metrics.csv", text.getvalue())

    def close(self) -> None:
        self.file.close()


def open_tracker(settings, who: RunName) -> Tracker:
    return CSVTracker(who)
