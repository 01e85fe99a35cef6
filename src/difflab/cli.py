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


def main() -> None:
    sys.argv = [sys.argv[0], *_rewrite_ckpt_shorthand(sys.argv[1:])]
    _hydra_main()
