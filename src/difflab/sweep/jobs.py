"""A run's outcome recorded in its own metrics.json ("status": started | completed | failed, and
"error"), so a sweep's comparison can tell what happened to every job.

In a multirun a failed job is recorded and the sweep goes on with the next one; re-running the
sweep with train.resume=auto skips the jobs already completed (the others resume from their own
checkpoints). A single run still stops with its error.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import difflab.distributed as dist
from difflab.errors import UserError
from difflab.record import read_metrics, write_metrics
from difflab.sweep.metric import objective as sweep_objective

log = logging.getLogger("difflab")

STARTED, COMPLETED, FAILED, INTERRUPTED = "started", "completed", "failed", "interrupted"


def launcher_threads(launcher: DictConfig) -> Optional[int]:
    """Torch threads for a job that shares its machine: submitit/SLURM give it cpus_per_task.
    (joblib's loky workers already limit themselves to cores // n_jobs threads.)"""
    cpus = launcher.get("cpus_per_task")
    return int(cpus) if cpus else None


def run_recorded(run: Callable[[DictConfig], Optional[float]], cfg: DictConfig) -> Optional[float]:
    """`run(cfg)` with its outcome written to the run folder's metrics.json (by rank 0 alone
    under torchrun)."""
    if not dist.is_main():
        return run(cfg)
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    previous = read_metrics(run_dir)
    if in_sweep and cfg.train.resume and previous.get("status") == COMPLETED:
        log.info("%s completed in an earlier run of this sweep: skipped (train.resume=%s)", run_dir, cfg.train.resume)
        return sweep_objective(previous, cfg.sweep.metric)
    (run_dir / "metrics.json").unlink(missing_ok=True)  # an earlier attempt's record is replaced
    write_metrics(run_dir, {"status": STARTED})
    threads = launcher_threads(hydra_cfg.launcher) if in_sweep and cfg.train.threads is None else None
    if threads:
        torch.set_num_threads(threads)
    try:
        objective = run(cfg)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: recorded, and a sweep stops here
        write_metrics(run_dir, {"status": INTERRUPTED, "error": str(e) or "interrupted"})
        raise
    except Exception as e:
        error = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        write_metrics(run_dir, {"status": FAILED, "error": error})
        if not in_sweep:
            raise
        log.error("job failed, the sweep goes on: %s", error, exc_info=not isinstance(e, UserError))
        return None
    write_metrics(run_dir, {"status": COMPLETED})
    return objective
