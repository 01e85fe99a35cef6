"""MLflow: one mlflow run per difflab run. By default a local store (sqlite, with the artifacts
beside it) in the run folder, or in a sweep's folder, where one experiment named by the sweep holds
a parent run with each job as a child; logger.mlflow.tracking_uri names another store."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import numpy as np
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from difflab.trackers import RunName, Tracker, final_numbers, flat_settings

PARENT_ID_FILE = "mlflow_parent_run"  # in the sweep folder: the parent run's id, written by the first job
MAX_PARAM = 500  # characters of a param value mlflow keeps


def _metric_key(tag: str) -> str:
    """mlflow allows letters, digits and _-. /: anything else becomes _."""
    return re.sub(r"[^\w\-. /]", "_", tag)


def _now_ms() -> int:
    return int(time.time() * 1000)


class MlflowTracker(Tracker):
    def __init__(self, settings, who: RunName):
        root = who.sweep_dir or who.folder
        root.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(settings.tracking_uri or f"sqlite:///{root.resolve() / 'mlflow.db'}")
        name = settings.experiment or who.group or "difflab"
        artifacts = None if settings.tracking_uri else str((root / "mlartifacts").resolve())
        tags = {"difflab.folder": str(who.folder.resolve())}
        with _sweep_lock(who.sweep_dir):  # the jobs of a sweep create its experiment and parent run once
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name, artifacts)
            if who.sweep_dir is not None:
                tags["mlflow.parentRunId"] = self._parent(experiment_id, who)
        self.run_id = self.client.create_run(experiment_id, run_name=who.name, tags=tags).info.run_id

    def _parent(self, experiment_id: str, who: RunName) -> str:
        saved = who.sweep_dir / PARENT_ID_FILE
        if saved.is_file():
            return saved.read_text().strip()
        tags = {"difflab.sweep": str(who.sweep_dir)}
        run_id = self.client.create_run(experiment_id, run_name=who.group, tags=tags).info.run_id
        saved.write_text(run_id)
        return run_id

    def log_config(self, config: dict, hparams: dict) -> None:
        self.client.log_dict(self.run_id, config, "config.yaml")
        params = [Param(k, str(v)[:MAX_PARAM]) for k, v in flat_settings(config).items()]
        for i in range(0, len(params), 100):  # mlflow takes at most 100 params a call
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log_scalar(self, tag: str, value: float, step: int) -> None:
        self.client.log_batch(self.run_id, metrics=[Metric(_metric_key(tag), value, _now_ms(), step)])

    def log_image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.client.log_image(self.run_id, image, f"{tag}/step_{step:08d}.png")

    def log_text(self, tag: str, text: str) -> None:
        self.client.log_text(self.run_id, text, f"{tag}.txt")

    def log_final(self, metrics: dict, headline: dict, hparams: dict, step: int) -> None:
        finals = [Metric(_metric_key(f"final/{k}"), v, _now_ms(), step) for k, v in final_numbers(metrics).items()]
        for i in range(0, len(finals), 1000):
            self.client.log_batch(self.run_id, metrics=finals[i:i + 1000])
        if "provenance" in metrics:
            self.client.log_dict(self.run_id, metrics["provenance"], "provenance.json")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class _sweep_lock:
    """A lock file in the sweep folder, so that parallel jobs (joblib, SLURM) make one parent run."""

    def __init__(self, sweep_dir: Path | None):
        self.path = None if sweep_dir is None else sweep_dir / f".{PARENT_ID_FILE}.lock"

    def __enter__(self):
        while self.path is not None:
            try:
                os.close(os.open(self.path, os.O_CREAT | os.O_EXCL))
                return self
            except FileExistsError:
                if time.time() - self.path.stat().st_mtime > 120:  # left by a job killed while holding it
                    self.path.unlink(missing_ok=True)
                time.sleep(0.2)
        return self

    def __exit__(self, *exc):
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def open_tracker(settings, who: RunName) -> Tracker:
    return MlflowTracker(settings, who)
