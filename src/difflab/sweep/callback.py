"""The Hydra callback that ends every multirun with a comparison of its jobs, and with exit
status 1 when one of them did not complete (registered under hydra.callbacks in conf/config.yaml)."""

from __future__ import annotations

import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from difflab.sweep.compare import JobResult, write_comparison

log = logging.getLogger("difflab")


def unfinished_jobs(results: list[JobResult]) -> tuple[Counter, int]:
    """The jobs that did not complete, counted by status, and the number of jobs: counted by run
    folder, since a job with several EMA copies has one row per copy."""
    statuses = {r.run_dir: r.status for r in results}
    return Counter(s for s in statuses.values() if s != "completed"), len(statuses)


class CompareJobs(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Writes the comparison, then exits with status 1 when a job did not complete: a failed
        job is recorded and the sweep goes on (sweep/jobs.py), so this is where a script running
        the sweep learns of it. Hydra lets SystemExit through a callback, and calls this one, the
        first of hydra.callbacks, last."""
        sweep_dir = Path(config.hydra.sweep.dir)
        results, paths = write_comparison([sweep_dir])
        log.info("compared the sweep's jobs: %s", ", ".join(str(p) for p in paths))
        unfinished, jobs = unfinished_jobs(results)
        if unfinished:
            counts = ", ".join(f"{n} {status}" for status, n in unfinished.items())
            print(f"error: {unfinished.total()} of {jobs} jobs did not complete ({counts}); {paths[0]} has their "
                  f"errors: once fixed, the same command plus hydra.sweep.dir={sweep_dir} train.resume=auto runs "
                  "only those again.", file=sys.stderr)
            sys.exit(1)
