"""Hydra entry point: composes the config, runs it, and turns a UserError into one line."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Optional

import hydra
from omegaconf import DictConfig

from difflab.config import register_configs
from difflab.errors import UserError
from difflab.sweep.named import register_named_sweeps

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")

register_configs()
register_named_sweeps()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> Optional[float]:
    from difflab.runner import run
    from difflab.sweep.jobs import run_recorded

    try:
        return run_recorded(run, cfg)  # in a multirun, a failed job is recorded and the sweep goes on
    except UserError as e:
        logging.getLogger("difflab").error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _rewrite_ckpt_shorthand(argv: list[str]) -> list[str]:
    """`ckpt=PATH` is short for `ckpt.model=PATH` (ckpt also holds .autoencoder, .classifier)."""
    return [re.sub(r"^ckpt=", "ckpt.model=", a) for a in argv]


def _distributed_overrides(argv: list[str]) -> list[str]:
    """Under torchrun: one run folder for all ranks, and only rank 0 writes Hydra's files
    (.hydra/, train.log); the others log warnings to the console only."""
    from difflab.train import distributed

    if any(a in ("-m", "--multirun") for a in argv):
        print("error: a sweep (-m) cannot run under torchrun: launch one torchrun per job instead "
              "(see README, Scaling out), or drop -m.", file=sys.stderr)
        sys.exit(2)
    distributed.start()
    extra = []
    if not any(a.startswith("hydra.run.dir=") for a in argv):
        extra.append(f"hydra.run.dir={distributed.run_dir_for_all_ranks()}")
    if not distributed.is_main():
        extra += ["hydra.output_subdir=null", "hydra.job_logging.handlers.file.filename=/dev/null",
                  "hydra.job_logging.root.level=WARNING"]
    return extra


def main() -> None:
    from difflab.train import distributed

    argv = _rewrite_ckpt_shorthand(sys.argv[1:])
    if distributed.launched():
        argv += _distributed_overrides(argv)
    sys.argv = [sys.argv[0], *argv]
    try:
        _hydra_main()
    finally:
        distributed.finish(wait=False)  # normally already left after training (runner)
