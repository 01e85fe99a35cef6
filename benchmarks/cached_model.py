"""The trained diffusion model that `python run.py` with a benchmark's settings left in the artifact cache."""

from __future__ import annotations

import sys


def cached_model(cfg, device, other_code: bool = False):
    """(model, its checkpoint path); exits with the command that trains it when the cache has none.
    With other_code, a model made by an earlier version of the code with the same settings will do."""
    from difflab.artifacts import ArtifactCache, diffusion_settings
    from difflab.trained import load_diffusion_model

    entry = ArtifactCache(cfg.paths.cache_dir).find("diffusion", diffusion_settings(cfg), other_code=other_code)
    if entry is None:
        sys.exit(f"no trained model for these settings in {cfg.paths.cache_dir}/artifacts: run `python run.py` first")
    return load_diffusion_model(str(entry.path), device), str(entry.path)
