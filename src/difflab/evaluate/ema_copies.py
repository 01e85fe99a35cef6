"""Every EMA copy of a training run (train.ema.decays) scored and sampled, so one training run
answers an EMA-decay sweep: metrics.json gets {"ema": {decay: {...}}} (each copy's held-out loss
with its standard error, and the paired errors of its differences from the others, which the
comparison weighs) and each extra copy's images go to samples/ema_<decay>/. Works for every
model a diffusion run trains: pixel or latent, diffusion or joint (whose copies hold the
classifier beside the UNet).

A run trained with train.ema.posthoc=true is sampled at any EMA width train.ema.sigma_rel,
reconstructed from its snapshots when it is loaded (`use_ema_length`)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import Tensor

from difflab.checkpoint import load_checkpoint
from difflab.data import class_names, load_splits
from difflab.errors import UserError
from difflab.evaluate.uncertainty import mean_standard_error
from difflab.sampling import sample_images, write_samples
from difflab.train.ema import reconstruct
from difflab.train.stages import ValBatch, fixed_val_batch, held_out_losses, mean_loss
from difflab.trained import DiffusionModel, network_weights

log = logging.getLogger("difflab.ema")


def samples_folder(decay: float, main: float) -> str:
    """Where a copy's samples are, relative to the run folder (the main copy's are the run's own)."""
    return "samples" if decay == main else f"samples/ema_{decay}"


def validation_batch(model: DiffusionModel, cache_dir: str, device: torch.device):
    """The fixed held-out batch the model's training validated on, in the space it denoises."""
    train_cfg = model.cfg.train
    _, val = load_splits(model.cfg.dataset, cache_dir)
    return fixed_val_batch(val, train_cfg.val_batches * train_cfg.batch_size, model.process,
                           model.to_model_space, device)


def val_losses(model: DiffusionModel, val_batch: ValBatch) -> list[Tensor]:
    """The loss of the model's current weights on each image of the fixed held-out batch."""
    return held_out_losses(model.process, model.cfg.objective, model.net, val_batch, model.num_classes > 0,
                           model.cfg.train.batch_size)


def val_loss(model: DiffusionModel, val_batch: ValBatch) -> float:
    """The loss of the model's current weights on the fixed held-out batch."""
    return mean_loss(val_losses(model, val_batch))


def loss_errors(losses: dict[float, Tensor]) -> dict[float, dict]:
    """Each copy's val_loss_se, and val_loss_paired_se: the standard error of its loss minus each other copy's.
    The copies are scored on the same images, noise levels and noise, so their losses move together and
    the paired error of a difference is far below the two errors combined."""
    return {d: {"val_loss_se": mean_standard_error(per),
                "val_loss_paired_se": {str(o): mean_standard_error(per - other) for o, other in losses.items()
                                       if o != d}}
            for d, per in losses.items()}


def evaluate_ema_copies(cfg: DictConfig, run_dir: Path, checkpoint: Path, model: DiffusionModel,
                        device: torch.device, val_batch: ValBatch | None) -> dict:
    """Validation loss of every copy on `val_batch`, and samples of the extra copies (the main
    copy was sampled already). `model.net` holds the main weights again after."""
    state = load_checkpoint(checkpoint, "checkpoint with the EMA copies")
    main = float(model.cfg.train.ema.decay)
    copies = {float(d): copy for d, copy in state.get("ema_copies", {}).items()}
    copies[main] = state["ema"]  # last, so the model ends as it came
    results, losses = {}, {}
    for decay, copy in copies.items():
        model.net.load_state_dict(network_weights({"stage": state["stage"], "ema": copy}, "unet"))
        entry = {"samples": samples_folder(decay, main)}
        if val_batch is not None:
            parts = val_losses(model, val_batch)
            entry["val_loss"], losses[decay] = mean_loss(parts), torch.cat(parts)
        if decay != main and cfg.sample.num_images > 0:
            images = sample_images(model, cfg, cfg.sample.num_images, cfg.sample.labels, device)
            entry.update(write_samples(images, run_dir / entry["samples"], names=class_names(model.cfg.dataset)))
        log.info("EMA decay %s: validation loss %s", decay, entry.get("val_loss"))
        results[str(decay)] = entry
    for decay, errors in loss_errors(losses).items():
        results[str(decay)].update(errors)
    return dict(sorted(results.items(), key=lambda item: float(item[0])))


def use_ema_length(model: DiffusionModel, state: dict, checkpoint: str | Path, sigma_rel: float,
                   val_batch: ValBatch | None = None) -> dict:
    """Load into `model.net` the EMA of relative width `sigma_rel` reconstructed from the post-hoc snapshots of
    checkpoint `state` (read from `checkpoint`); returns what the run records about it (with its loss on `val_batch`,
    when given: the score an EMA-length sweep compares without an evaluation)."""
    posthoc = state.get("posthoc_ema")
    if not posthoc or not posthoc["snapshots"]:
        raise UserError(f"train.ema.sigma_rel={sigma_rel} needs a model trained with train.ema.posthoc=true, and "
                        f"{checkpoint} has no post-hoc EMA snapshots: add train.ema.posthoc=true (it trains anew).")
    weights = reconstruct(posthoc["snapshots"], sigma_rel)
    model.net.load_state_dict(network_weights({"stage": state["stage"], "ema": {"model": weights}}, "unet"))
    log.info("EMA of relative width %g reconstructed from %d post-hoc snapshots", sigma_rel, len(posthoc["snapshots"]))
    record = {"ema_sigma_rel": sigma_rel, "ema_snapshots": len(posthoc["snapshots"])}
    return {**record, "val_loss": val_loss(model, val_batch)} if val_batch is not None else record
