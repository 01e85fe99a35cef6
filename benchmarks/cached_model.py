"""The run config and the trained diffusion model a benchmark measures: `python run.py`'s, with the benchmark's
settings, the model taken from the artifact cache."""

from __future__ import annotations

import sys


def run_config(*overrides: str):
    """The config `python run.py OVERRIDES` runs with, guidance=auto decided as the plan decides it."""
    from hydra import compose, initialize_config_dir

    from difflab.cli import CONF_DIR
    from difflab.plan import with_guidance

    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        return with_guidance(compose(config_name="config", overrides=list(overrides)))


def cached_model(cfg, device):
    """(model, its checkpoint path); exits with the command that trains it when the cache has none. A model made
    with the same settings by another version of the code will do: these benchmarks measure what is done with a
    trained model, and retraining it after every change would make their rows incomparable."""
    from difflab.artifacts import ArtifactCache, diffusion_settings
    from difflab.trained import load_diffusion_model

    entry = ArtifactCache(cfg.paths.cache_dir).find("diffusion", diffusion_settings(cfg), other_code=True)
    if entry is None:
        sys.exit(f"no trained model for these settings in {cfg.paths.cache_dir}/artifacts: run `python run.py` first")
    return load_diffusion_model(str(entry.path), device), str(entry.path)
