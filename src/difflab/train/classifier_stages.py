"""The stages that train the noise-aware classifier of classifier guidance: alone
(mode=classifier) or beside the diffusion model (mode=joint, seed 000:
loss = diffusion_loss + classifier.weight * classifier_loss)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from difflab.errors import UserError
from difflab.latent import LatentSpace
from difflab.models import NoisyClassifier, build_classifier, count_parameters
from difflab.train.checkpoint import load_checkpoint
from difflab.train.loop import Trainer, TrainResult
from difflab.train.stages import DiffusionStage, NoisyDataStage, _model_meta

log = logging.getLogger("difflab.stages")


def classifier_train_cfg(cfg: DictConfig) -> DictConfig:
    """The train block with the classifier's own steps, batch size and learning rate."""
    c = cfg.classifier
    return OmegaConf.merge(cfg.train, {"max_steps": c.max_steps, "batch_size": c.batch_size, "lr": c.lr})


def _require_classes(num_classes: int, what: str) -> None:
    if num_classes < 2:
        raise UserError(f"{what} needs a data set with at least 2 classes (this one has {num_classes}): "
                        "use a labelled data set (a folder needs one sub-folder per class).")


def _classifier_meta(shape: tuple, num_classes: int) -> dict:
    return {"shape": list(shape), "num_classes": num_classes}


class ClassifierStage(NoisyDataStage):
    """Trains p(y | x_t, t) on inputs noised by the run's schedule at uniformly drawn t (latents
    when the run has an autoencoder)."""

    name = "classifier"
    batch_key = "classifier.batch_size"

    def __init__(self, cfg: DictConfig, run_dir: Path, device: torch.device, writer=None,
                 latent: Optional[LatentSpace] = None):
        super().__init__(cfg, run_dir, device, writer, latent)
        self.num_classes = self.train_data.num_classes
        _require_classes(self.num_classes, "mode=classifier")
        self.net = build_classifier(cfg.classifier, self.shape[0], self.shape[1], self.num_classes)
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
        return self.train(self.net, classifier_train_cfg(self.cfg), meta, self.loss, self.make_val_fn())


class JointModule(nn.Module):
    """The diffusion network and the classifier as one module, so one optimizer, one EMA and one
    checkpoint hold both (state-dict keys `unet.*` and `classifier.*`)."""

    def __init__(self, unet: nn.Module, classifier: nn.Module):
        super().__init__()
        self.unet, self.classifier = unet, classifier


class JointStage(DiffusionStage):
    """Diffusion and classifier trained together on the same batches."""

    name = "joint"

    def __init__(self, cfg: DictConfig, run_dir: Path, device: torch.device, writer=None,
                 latent: Optional[LatentSpace] = None):
        super().__init__(cfg, run_dir, device, writer, latent)
        _require_classes(self.train_data.num_classes, "mode=joint")
        classifier = build_classifier(cfg.classifier, self.shape[0], self.shape[1], self.train_data.num_classes)
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

    def fit(self, image_fn=None) -> tuple[Trainer, TrainResult]:
        meta = {**_model_meta(self.shape, self.num_classes, self.label_dropout),
                "classifier_classes": self.train_data.num_classes}
        grid = None if image_fn is None else (lambda model, step: image_fn(model.unet, step))
        return self.train(self.joint, self.cfg.train, meta, self.loss, self.make_val_fn(), grid)


@torch.no_grad()
def accuracy_by_band(stage: NoisyDataStage, classifier: nn.Module, bands: int) -> dict[str, float]:
    """Held-out accuracy of the classifier on clean inputs ("t=0") and per band of t ("lo-hi",
    equal-width bands over 0..T-1), with fixed noise: how well it reads the label as noise grows,
    which bounds what guidance can do."""
    fixed = stage.fixed_val_batch()
    if fixed is None:
        return {}
    x0, y, _, noise = fixed
    T, width = stage.process.T, len(str(stage.process.T - 1))
    gen = torch.Generator().manual_seed(54321)
    out = {"t=0": float(stage.process.classifier_loss(classifier, x0, y, torch.zeros_like(y), noise)[1].float().mean())}
    for b in range(bands):
        lo, hi = b * T // bands, (b + 1) * T // bands - 1
        t = torch.randint(lo, hi + 1, (len(x0),), generator=gen).to(x0.device)
        correct = stage.process.classifier_loss(classifier, x0, y, t, noise)[1]
        out[f"{lo:0{width}d}-{hi:0{width}d}"] = float(correct.float().mean())
    return out


def load_classifier(path: str, device: torch.device) -> tuple[NoisyClassifier, DictConfig, dict]:
    """The EMA classifier of a classifier or joint checkpoint, its training config and shape meta."""
    state = load_checkpoint(path, "classifier checkpoint (ckpt.classifier)")
    stage = state.get("stage")
    if stage not in ("classifier", "joint"):
        raise UserError(f"The checkpoint {path} holds a {stage!r} model, not a classifier: pass the "
                        "checkpoints/last.pt of a mode=classifier or mode=joint run.")
    cfg, meta = OmegaConf.create(state["config"]), state["meta"]
    weights = state["ema"]["model"]
    if stage == "joint":
        weights = {k.removeprefix("classifier."): v for k, v in weights.items() if k.startswith("classifier.")}
    num_classes = meta.get("classifier_classes", meta["num_classes"])
    net = build_classifier(cfg.classifier, meta["shape"][0], meta["shape"][1], num_classes)
    net.load_state_dict(weights)
    return net.to(device).eval().requires_grad_(False), cfg, meta
