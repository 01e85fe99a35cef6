"""Training stages: each builds its model and hands the loop a loss, a validation loss and a
sample-grid hook. A stage's checkpoint carries the resolved config that built it, so sampling
and later stages rebuild the exact network without the user repeating its settings."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from difflab.data import augment_batch, load_splits, to_model_range
from difflab.diffusion import GaussianDiffusion, GuidedDenoiser, make_betas
from difflab.errors import UserError
from difflab.latent import LatentSpace
from difflab.models import build_unet, count_parameters
from difflab.train.checkpoint import load_checkpoint
from difflab.train.loop import StepBatches, Trainer, TrainResult

log = logging.getLogger("difflab.stages")


def build_process(cfg: DictConfig) -> GaussianDiffusion:
    s = cfg.schedule
    betas = make_betas(s.name, s.T, s.beta_start, s.beta_end, s.cosine_s, s.dns_offset, s.zero_terminal_snr)
    return GaussianDiffusion(betas, cfg.objective.prediction)


@dataclass
class DiffusionModel:
    """A trained (EMA) network with everything needed to sample from it."""

    net: nn.Module
    process: GaussianDiffusion
    cfg: DictConfig  # the config the network was trained with
    shape: tuple[int, int, int]  # C, H, W of what the network denoises
    num_classes: int  # 0 = unconditional
    trained_with_label_dropout: bool
    latent: Optional[LatentSpace] = None  # None = pixel space

    def denoiser(self, y: Optional[Tensor], guidance: DictConfig, clip_x0: bool,
                 classifier: Optional[nn.Module] = None) -> GuidedDenoiser:
        """`classifier` is required for guidance=classifier (see runner's classifier lookup)."""
        return GuidedDenoiser(
            net=self.net, process=self.process, y=y, null_class=self.num_classes,
            cfg_scale=guidance.scale if guidance.name == "cfg" else 1.0,
            classifier=classifier, classifier_scale=guidance.scale if guidance.name == "classifier" else 0.0,
            clip_x0=clip_x0 and self.latent is None,  # latents have no [-1, 1] range
        )

    def decode(self, x: Tensor) -> Tensor:
        """What the network denoises -> images in [-1, 1]."""
        return x if self.latent is None else self.latent.decode(x)


def _model_meta(shape: tuple[int, int, int], num_classes: int, label_dropout: float) -> dict:
    return {"shape": list(shape), "num_classes": num_classes, "label_dropout": label_dropout}


def _build_net(cfg: DictConfig, shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    return build_unet(cfg.unet, in_channels=shape[0], image_size=shape[1], num_classes=num_classes)


class NoisyDataStage:
    """What every stage that learns on noised data shares: the data set as uint8 tensors on the
    device (a batch is one index_select), in pixel space or encoded into `latent` space, and
    the run's Gaussian process."""

    name = ""
    batch_key = "train.batch_size"  # the setting of the stage's batch size

    def __init__(self, cfg: DictConfig, run_dir: Path, device: torch.device, writer=None,
                 latent: Optional[LatentSpace] = None):
        self.cfg, self.run_dir, self.device, self.writer = cfg, run_dir, device, writer
        self.latent = latent
        self.train_data, self.val_data = load_splits(cfg.dataset, cfg.paths.cache_dir)
        self.shape = latent.shape if latent else tuple(self.train_data.images.shape[1:])
        self.process = build_process(cfg)
        self.images = self.train_data.images.to(device)
        self.labels = self.train_data.labels.to(device)
        # Un-augmented images always give the same latents: encode them once, not every step.
        aug = cfg.dataset.augmentation
        self.train_latents = (latent.encode_dataset(self.train_data.images, cfg, device)
                              if latent and not (aug.hflip or aug.crop_padding) else None)

    def to_model_space(self, x: Tensor) -> Tensor:
        return x if self.latent is None else self.latent.encode(x)

    def batch(self, step: int, batches: StepBatches) -> tuple[Tensor, Tensor]:
        idx = batches.indices(step).to(self.device)
        if self.train_latents is not None:
            return self.train_latents[idx], self.labels[idx]
        x = augment_batch(to_model_range(self.images[idx]), self.cfg.dataset.augmentation)
        return self.to_model_space(x), self.labels[idx]

    def fixed_val_batch(self) -> Optional[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """Held-out images with fixed timesteps and noise, so validation values are comparable
        across the run: (x0, y, t, noise), or None without held-out data."""
        n = min(len(self.val_data), self.cfg.train.val_batches * self.cfg.train.batch_size)
        if n == 0:
            return None
        gen = torch.Generator().manual_seed(12345)
        x0 = self.to_model_space(to_model_range(self.val_data.images[:n]).to(self.device))
        y = self.val_data.labels[:n].to(self.device)
        t = torch.randint(0, self.process.T, (n,), generator=gen).to(self.device)
        noise = torch.randn(x0.shape, generator=gen).to(self.device)
        return x0, y, t, noise

    def train(self, model: nn.Module, train_cfg: DictConfig, meta: dict, loss, val_fn,
              image_fn=None) -> tuple[Trainer, TrainResult]:
        """Fit `model` with the loop, resuming when train.resume says so."""
        extra = {"config": OmegaConf.to_container(self.cfg, resolve=True), "stage": self.name, "meta": meta,
                 "autoencoder": self.latent.state() if self.latent else None}
        trainer = Trainer(model, train_cfg, self.run_dir / "checkpoints", self.device, self.writer, extra,
                          distributed=True, seed=self.cfg.seed)
        resumed = trainer.maybe_resume(self.cfg.train.resume)
        batches = trainer.step_batches(len(self.train_data), train_cfg.batch_size, self.batch_key)
        result = trainer.fit(loss, lambda s: self.batch(s, batches), train_cfg.batch_size, val_fn, image_fn)
        result.resumed_from = resumed
        return trainer, result


class DiffusionStage(NoisyDataStage):
    """Trains the denoising network on the data set, in pixel or latent space."""

    name = "diffusion"

    def __init__(self, cfg: DictConfig, run_dir: Path, device: torch.device, writer=None,
                 latent: Optional[LatentSpace] = None):
        super().__init__(cfg, run_dir, device, writer, latent)
        self.num_classes = self.train_data.num_classes if cfg.objective.class_conditional else 0
        self.label_dropout = cfg.guidance.p_uncond if (cfg.guidance.name == "cfg" and self.num_classes) else 0.0
        self.net = _build_net(cfg, self.shape, self.num_classes)
        self.num_params = count_parameters(self.net)
        log.info("%s network: %.2fM parameters, data %s, %d classes, alpha_bar_T=%.3g",
                 cfg.unet.name, self.num_params / 1e6, "x".join(map(str, self.shape)), self.num_classes,
                 self.process.alpha_bar_T)

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x0, y = batch
        if self.num_classes == 0:
            y = None
        elif self.label_dropout > 0:
            drop = torch.rand(y.shape, device=y.device) < self.label_dropout
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        obj = self.cfg.objective
        return self.process.training_loss(lambda x, t: model(x, t, y), x0, obj.loss, obj.min_snr_gamma).mean()

    def make_val_fn(self):
        """Loss of the EMA model on the fixed held-out batch."""
        fixed = self.fixed_val_batch()
        if fixed is None:
            return None
        x0, y, t, noise = fixed
        y = y if self.num_classes else None
        bs, obj = self.cfg.train.batch_size, self.cfg.objective

        @torch.no_grad()
        def val_fn(model: nn.Module) -> float:
            total = 0.0
            for i in range(0, len(x0), bs):
                yb = None if y is None else y[i:i + bs]
                per = self.process.training_loss(lambda x, tt: model(x, tt, yb), x0[i:i + bs], obj.loss,
                                                 obj.min_snr_gamma, t[i:i + bs], noise[i:i + bs])
                total += float(per.sum())
            return total / len(x0)

        return val_fn

    def fit(self, image_fn=None) -> tuple[Trainer, TrainResult]:
        meta = _model_meta(self.shape, self.num_classes, self.label_dropout)
        return self.train(self.net, self.cfg.train, meta, self.loss, self.make_val_fn(), image_fn)

    def model(self, net: nn.Module) -> DiffusionModel:
        return DiffusionModel(net.eval(), self.process, self.cfg, self.shape, self.num_classes, self.label_dropout > 0,
                              self.latent)


def load_diffusion_model(path: str, device: torch.device) -> DiffusionModel:
    """Rebuild the EMA network of a diffusion checkpoint with the config it was trained with."""
    state = load_checkpoint(path, "model checkpoint (ckpt)")
    if state.get("stage") not in ("diffusion", "joint"):
        raise UserError(f"The checkpoint {path} holds a {state.get('stage')!r} model, not a diffusion model: pass a diffusion run's checkpoints/last.pt.")
    cfg = OmegaConf.create(state["config"])
    meta = state["meta"]
    shape = tuple(meta["shape"])
    net = _build_net(cfg, shape, meta["num_classes"])
    weights = state["ema"]["model"]
    if state["stage"] == "joint":  # the UNet half of a JointModule
        weights = {k.removeprefix("unet."): v for k, v in weights.items() if k.startswith("unet.")}
    net.load_state_dict(weights)
    latent = LatentSpace.from_state(state["autoencoder"], device) if state.get("autoencoder") else None
    return DiffusionModel(net.to(device).eval(), build_process(cfg), cfg, shape, meta["num_classes"],
                          meta["label_dropout"] > 0, latent)
