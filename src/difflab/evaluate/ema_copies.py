"""Every EMA copy of a training run (train.ema.decays) scored and sampled, so one training run
answers an EMA-decay sweep: metrics.json gets {"ema": {decay: {...}}} and each extra copy's
images go to samples/ema_<decay>/."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from difflab.sampling import sample_images, write_samples
from difflab.train.checkpoint import load_checkpoint
from difflab.train.stages import DiffusionModel, DiffusionStage

log = logging.getLogger("difflab.ema")


def samples_folder(decay: float, main: float) -> str:
    """Where a copy's samples are, relative to the run folder (the main copy's are the run's own)."""
    return "samples" if decay == main else f"samples/ema_{decay}"


def evaluate_ema_copies(cfg: DictConfig, run_dir: Path, checkpoint: Path, model: DiffusionModel,
                        device: torch.device) -> dict:
    """Validation loss of every copy on the run's fixed held-out batch, and samples of the extra
    copies (the main copy was sampled already). `model.net` holds the main weights again after."""
    state = load_checkpoint(checkpoint, "checkpoint with the EMA copies")
    main = float(cfg.train.ema.decay)
    weights = {float(d): copy["model"] for d, copy in state.get("ema_copies", {}).items()}
    weights[main] = state["ema"]["model"]  # last, so the model ends as it came
    val_fn = DiffusionStage(cfg, run_dir, device).make_val_fn()
    results = {}
    for decay, state_dict in weights.items():
        model.net.load_state_dict(state_dict)
        entry = {"samples": samples_folder(decay, main)}
        if val_fn is not None:
            entry["val_loss"] = val_fn(model.net)
        if decay != main and cfg.sample.num_images > 0:
            images = sample_images(model, cfg, cfg.sample.num_images, cfg.sample.labels, device)
            entry.update(write_samples(images, run_dir / entry["samples"]))
        log.info("EMA decay %s: validation loss %s", decay, entry.get("val_loss"))
        results[str(decay)] = entry
    return dict(sorted(results.items(), key=lambda item: float(item[0])))
