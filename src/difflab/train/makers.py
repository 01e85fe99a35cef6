"""The trainings the plan obtains when the artifact cache has no model: each trains its stage in
a folder and returns (checkpoint, record) for the cache, the record holding the stage's metrics.
(The autoencoder's is train_autoencoder in train/reconstruction.py.)"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

import torch
from omegaconf import DictConfig

from difflab.data import class_names
from difflab.diffusion.process import parse_band
from difflab.pictures import class_grid, class_rows, save_accuracy_curve, save_loss_curve
from difflab.record import write_loss_csv
from difflab.sampling import sample_images
from difflab.trackers import stage_trackers
from difflab.train.classifier_stages import ClassifierStage, JointStage, accuracy_by_band
from difflab.train.stages import DiffusionStage
from difflab.trained import DiffusionModel, LatentSpace

log = logging.getLogger("difflab")

REAL_SHOWN = 200  # training images the real-data grid picks its rows from


def finish_training(trainer, result, stage_dir: Path) -> None:
    """The files every training stage leaves: last.pt, the loss curve and its CSV."""
    trainer.save("last.pt")
    save_loss_curve(result.loss_history, stage_dir / "loss_curve.png", trainer.val_history)
    write_loss_csv(stage_dir / "losses.csv", result.loss_history, trainer.val_history)


def report_accuracy(by_band: dict[str, float], stage_dir: Path, writer) -> dict[str, float]:
    """Classifier accuracy per band of t to TensorBoard and a PNG; returned for metrics.json."""
    bands = [(band, acc) for band, acc in by_band.items() if band != "t=0"]  # the clean accuracy is logged on its own
    for i, (band, acc) in enumerate(bands):  # the x axis: DDPM's step t, else the band's number
        writer.add_scalar("classifier/accuracy_by_t", acc, i if "=" in band else int(parse_band(band)[1]))
    if "t=0" in by_band:
        writer.add_scalar("classifier/accuracy_clean", by_band["t=0"], 0)
    save_accuracy_curve(by_band, stage_dir / "classifier_accuracy.png")
    log.info("classifier accuracy by t: %s", ", ".join(f"{b}: {a:.3f}" for b, a in by_band.items()))
    return by_band


def _training_metrics(result, stage, stage_dir: Path) -> dict:
    return {
        "final_loss": result.final_loss,
        "best_val_loss": result.best_val_loss,
        "steps": result.step,
        "train_images_per_s": result.images_per_s,
        "train_wall_time_s": result.wall_time_s,
        "num_params": stage.num_params,
        "checkpoint": str(stage_dir / "checkpoints" / "last.pt"),
        "resumed_from": result.resumed_from,
    }


def train_diffusion(cfg: DictConfig, stage_dir: Path, device: torch.device, writer,
                    latent: Optional[LatentSpace] = None,
                    measure: Optional[Callable[[DiffusionModel, int], Optional[float]]] = None) -> tuple[Path, dict]:
    """Train the diffusion model (mode=joint: with the classifier beside it) in stage_dir; `measure`
    (eval.every): the evaluation during training, returning the score best.pt is chosen by."""
    stage = (JointStage if cfg.mode.name == "joint" else DiffusionStage)(cfg, stage_dir, device, writer, latent)
    for name, value in stage.process.facts().items():
        writer.add_text(f"schedule/{name}", f"{value:.6g}")
    pick = torch.randperm(len(stage.train_data), generator=torch.Generator().manual_seed(0))[:REAL_SHOWN]
    shown = stage.train_data.subset(pick)
    writer.add_image("data/real", class_grid(shown.images, shown.labels if shown.num_classes else None,
                                             names=class_names(cfg.dataset)).image, 0)

    def grid_to_tensorboard(net, step: int) -> None:
        if step == cfg.train.max_steps and cfg.sample.num_images:
            return  # the samples drawn after training go under the same tag at this step
        classes = len(stage.text_meta.get("class_prompts") or []) or stage.num_classes  # a text model's by its prompts
        result = sample_images(stage.model(net), cfg, 4 * max(1, classes), "balanced", device)
        writer.add_image("samples/grid", class_rows(result.images, result.labels, per_row=4), step)

    eval_fn = None if measure is None else (lambda net, step: measure(stage.model(net), step))
    trainer, result = stage.fit(grid_to_tensorboard, eval_fn)
    checkpoint = stage_dir / "checkpoints" / "last.pt"
    if not trainer.writes:  # another torchrun rank: it lent its gradients, rank 0 writes and measures
        return checkpoint, {}
    finish_training(trainer, result, stage_dir)
    metrics = {
        **_training_metrics(result, stage, stage_dir),
        "early_stopped": result.early_stopped,
        "precision": str(trainer.amp_dtype or torch.float32).removeprefix("torch."),
        "objective": stage.process.name,
        **stage.process.facts(),
    }
    if isinstance(stage, JointStage):
        metrics["classifier_accuracy_by_t"] = report_accuracy(
            accuracy_by_band(stage, trainer.ema.model.classifier, cfg.classifier.accuracy_bands), stage_dir, writer)
    return checkpoint, {"metrics": metrics, "run_dir": str(stage_dir)}


def train_classifier(cfg: DictConfig, stage_dir: Path, device: torch.device,
                     latent: Optional[LatentSpace] = None) -> tuple[Path, dict]:
    """Train the noise-aware classifier of classifier guidance in stage_dir."""
    writer = stage_trackers(cfg, stage_dir)
    try:
        stage = ClassifierStage(cfg, stage_dir, device, writer, latent)
        trainer, result = stage.fit()
        checkpoint = stage_dir / "checkpoints" / "last.pt"
        if not trainer.writes:  # another torchrun rank: rank 0 writes and measures
            return checkpoint, {}
        finish_training(trainer, result, stage_dir)
        by_band = report_accuracy(accuracy_by_band(stage, trainer.ema.model, cfg.classifier.accuracy_bands),
                                  stage_dir, writer)
    finally:
        writer.close()
    metrics = {**_training_metrics(result, stage, stage_dir), "classifier_accuracy_by_t": by_band,
               "classifier_accuracy_clean": by_band.get("t=0")}
    return checkpoint, {"metrics": metrics, "run_dir": str(stage_dir)}
