"""The Hydra callback that ends every multirun with a comparison of its jobs
(registered under hydra.callbacks in conf/config.yaml)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from difflab.sweep.compare import write_comparison

log = logging.getLogger("difflab")


class CompareJobs(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        paths = write_comparison([sweep_dir])
        log.info("compared the sweep's jobs: %s", ", ".join(str(p) for p in paths))
