"""The stages that train the noise-aware classifier of classifier guidance: alone
(mode=classifier) or beside the diffusion model (mode=joint, seed 000:
loss = diffusion_loss + classifier.weight * classifier_loss)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from difflab.config import classifier_train_config
from difflab.errors import UserError
from difflab.models import build_classifier, count_parameters
from difflab.train.loop import Trainer, TrainResult
from difflab.train.stages import DiffusionStage, NoisyDataStage, init_source
from difflab.trained import JointModule, LatentSpace, init_network, model_meta

log = logging.getLogger("difflab.stages")


def _require_classes(num_classes: int, what: str) -> None:
    if num_classes < 2:
        raise UserError(f"{what} needs a data set with at least 2 classes (this one has {num_classes}): "
                        "use a labelled data set (a folder needs one sub-folder per class).")


def _classifier_meta(shape: tuple, num_classes: int) -> dict:
    return {"shape": list(shape), "num_classes": num_classes}


class ClassifierStage(NoisyDataStage):
    """Trains p(y | x_t, t) on inputs noised by the run's objective at its training levels
    (latents when the run has an autoencoder)."""

    name = "classifier"
    batch_key = "classifier.batch_size"

    def __init__(self, cfg: DictConfig, run_dir: Path, device: torch.device, writer=None,
                 latent: Optional[LatentSpace] = None):
        super().__init__(cfg, run_dir, device, writer, latent)
        self.num_classes = self.train_data.num_classes
        _require_classes(self.num_classes, "mode=classifier")
        self.net = build_classifier(cfg.classifier, self.shape[0], self.shape[1], self.num_classes)
        init = init_source(cfg)
        if init:
            state, source = init
            init_network(self.net, state, "classifier", source)
            log.info("the classifier starts from the EMA weights of %s", source)
        self.num_params = count_parameters(self.net)
        log.info("noise-aware classifier: %.2fM parameters, data %s, %d classes", self.num_params / 1e6,
                 "x".join(map(str, self.shape)), self.num_classes)

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x0, y = batch
        return self.process.classifier_loss(model, x0, y)[0].mean()

    def make_val_fn(self):
        fixed = self.fixed_val_batch()
        if fixed is None:
            return None
        x0, y, t, noise = fixed

        @torch.no_grad()
        def val_fn(model: nn.Module) -> float:
            return float(self.process.classifier_loss(model, x0, y, t, noise)[0].mean())

        return val_fn

    def fit(self) -> tuple[Trainer, TrainResult]:
        meta = _classifier_meta(self.shape, self.num_classes)
        return self.train(self.net, classifier_train_config(self.cfg), meta, self.loss, self.make_val_fn())


class JointStage(DiffusionStage):
    """Diffusion and classifier trained together on the same batches."""

    name = "joint"

    def __init__(self, cfg: DictConfig, run_dir: Path, device: torch.device, writer=None,
                 latent: Optional[LatentSpace] = None):
        super().__init__(cfg, run_dir, device, writer, latent)
        _require_classes(self.train_data.num_classes, "mode=joint")
        classifier = build_classifier(cfg.classifier, self.shape[0], self.shape[1], self.train_data.num_classes)
        if self.init and self.init[0].get("stage") == "joint":  # a diffusion checkpoint has no classifier: it starts fresh
            state, source = self.init
            init_network(classifier, state, "classifier", source)
        self.joint = JointModule(self.net, classifier)
        self.num_params = count_parameters(self.joint)
        log.info("joint training: diffusion %.2fM + classifier %.2fM parameters, classifier.weight=%g",
                 count_parameters(self.net) / 1e6, count_parameters(classifier) / 1e6, cfg.classifier.weight)

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x0, y = batch
        classifier_loss = self.process.classifier_loss(model.classifier, x0, y)[0].mean()
        return super().loss(model.unet, batch) + self.cfg.classifier.weight * classifier_loss

    def make_val_fn(self):
        diffusion_val = super().make_val_fn()
        return None if diffusion_val is None else (lambda model: diffusion_val(model.unet))

    def fit(self, image_fn=None, eval_fn=None) -> tuple[Trainer, TrainResult]:
        meta = {**model_meta(self.shape, self.num_classes, self.label_dropout),
                "classifier_classes": self.train_data.num_classes}
        grid = None if image_fn is None else (lambda model, step: image_fn(model.unet, step))
        measure = None if eval_fn is None else (lambda model, step: eval_fn(model.unet, step))
        return self.train(self.joint, self.cfg.train, meta, self.loss, self.make_val_fn(), grid, measure)


@torch.no_grad()
def accuracy_by_band(stage: NoisyDataStage, classifier: nn.Module, bands: int) -> dict[str, float]:
    """Held-out accuracy of the classifier at the least noisy level ("t=0") and per band of noise
    levels (equal ranges of the objective's index grid: "lo-hi" steps for DDPM), with fixed
    noise: how well it reads the label as noise grows, which bounds what guidance can do."""
    fixed = stage.fixed_val_batch()
    if fixed is None:
        return {}
    x0, y, _, noise = fixed
    process = stage.process
    gen = torch.Generator().manual_seed(54321)
    clean = process.clean_levels(len(x0), x0.device)
    out = {"t=0": float(process.classifier_loss(classifier, x0, y, clean, noise)[1].float().mean())}
    for label, lo, hi in process.level_bands(bands):
        level = process.index_level(torch.randint(lo, hi + 1, (len(x0),), generator=gen)).to(x0.device)
        out[label] = float(process.classifier_loss(classifier, x0, y, level, noise)[1].float().mean())
    return out
