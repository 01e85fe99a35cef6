"""Training stages: each builds its model and hands the loop a loss, a validation loss and a
sample-grid hook. A stage's checkpoint carries the resolved config that built it, so sampling
and later stages rebuild the exact network without the user repeating its settings
(difflab.trained)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from difflab.checkpoint import load_checkpoint
from difflab.config import conditioning_name
from difflab.data import (ImageData, augment_batch, caption_table, default_prompts, load_splits, text_vocabulary,
                          to_model_range)
from difflab.data.latents import cached_latents
from difflab.diffusion import NoiseProcess
from difflab.models import count_parameters
from difflab.train.loop import StepBatches, Trainer, TrainResult
from difflab.trained import DiffusionModel, LatentSpace, build_denoiser_net, build_process, init_network, model_meta

log = logging.getLogger("difflab.stages")

ValBatch = tuple[Tensor, Tensor, Tensor, Tensor]  # x0 (model space), y, noise levels, noise
VAL_SEED = 12345


def fixed_val_batch(val_data: ImageData, n: int, process: NoiseProcess, to_model_space: Callable[[Tensor], Tensor],
                    device: torch.device) -> Optional[ValBatch]:
    """The first n held-out images with fixed noise levels and noise, so validation values are
    comparable across a run and between the EMA copies of one: None without held-out data."""
    n = min(len(val_data), n)
    if n == 0:
        return None
    gen = torch.Generator().manual_seed(VAL_SEED)
    x0 = to_model_space(to_model_range(val_data.images[:n]).to(device))
    y = val_data.labels[:n].to(device)
    t = process.draw_levels(n, device, generator=gen)
    noise = torch.randn(x0.shape, generator=gen).to(device)
    return x0, y, t, noise


@torch.no_grad()
def held_out_losses(process: NoiseProcess, objective: DictConfig, net: nn.Module, batch: ValBatch,
                    conditional: bool, batch_size: int) -> list[Tensor]:
    """The diffusion loss of `net` on each image of a fixed validation batch, a tensor per batch_size images."""
    x0, y, t, noise = batch
    parts = []
    for i in range(0, len(x0), batch_size):
        yb = y[i:i + batch_size] if conditional else None
        parts.append(process.training_loss(lambda x, c: net(x, c, yb), x0[i:i + batch_size], objective.loss,
                                           t[i:i + batch_size], noise[i:i + batch_size]).float().cpu())
    return parts


def mean_loss(parts: list[Tensor]) -> float:
    return sum(float(p.sum()) for p in parts) / sum(len(p) for p in parts)


def held_out_loss(process: NoiseProcess, objective: DictConfig, net: nn.Module, batch: ValBatch,
                  conditional: bool, batch_size: int) -> float:
    """The diffusion loss of `net` on a fixed validation batch, averaged over its images."""
    return mean_loss(held_out_losses(process, objective, net, batch, conditional, batch_size))


def init_source(cfg: DictConfig) -> Optional[tuple[dict, str]]:
    """The checkpoint train.init_from names (its state, and how to name it), or None."""
    path = cfg.train.get("init_from")
    if not path:
        return None
    return load_checkpoint(path, "checkpoint to initialise from (train.init_from)"), f"train.init_from={path}"


class NoisyDataStage:
    """What every stage that learns on noised data shares: the data set as uint8 tensors on the
    device (a batch is one index_select), in pixel space or encoded into `latent` space, and
    the noise process of the run's objective."""

    name = ""
    batch_key = "train.batch_size"  # the setting of the stage's batch size
    checkpoint_extra: dict = {}  # more entries of its checkpoints (a pruned network's widths)

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
        self.train_latents = (cached_latents(latent, self.train_data.images, cfg.paths.cache_dir, device)
                              if latent and not (aug.hflip or aug.crop_padding) else None)

    def to_model_space(self, x: Tensor) -> Tensor:
        return x if self.latent is None else self.latent.encode(x)

    def batch(self, step: int, batches: StepBatches) -> tuple[Tensor, Tensor]:
        idx = batches.indices(step).to(self.device)
        if self.train_latents is not None:
            return self.train_latents[idx], self.labels[idx]
        x = augment_batch(to_model_range(self.images[idx]), self.cfg.dataset.augmentation)
        return self.to_model_space(x), self.labels[idx]

    def fixed_val_batch(self) -> Optional[ValBatch]:
        n = self.cfg.train.val_batches * self.cfg.train.batch_size
        return fixed_val_batch(self.val_data, n, self.process, self.to_model_space, self.device)

    def train(self, model: nn.Module, train_cfg: DictConfig, meta: dict, loss, val_fn,
              image_fn=None, eval_fn=None) -> tuple[Trainer, TrainResult]:
        """Fit `model` with the loop, resuming when train.resume says so."""
        extra = {"config": OmegaConf.to_container(self.cfg, resolve=True), "stage": self.name, "meta": meta,
                 "autoencoder": self.latent.state() if self.latent else None, **self.checkpoint_extra}
        trainer = Trainer(model, train_cfg, self.run_dir / "checkpoints", self.device, self.writer, extra,
                          distributed=True, seed=self.cfg.seed, stage=self.name)
        resumed = trainer.maybe_resume(self.cfg.train.resume)
        batches = trainer.step_batches(len(self.train_data), train_cfg.batch_size, self.batch_key)
        result = trainer.fit(loss, lambda s: self.batch(s, batches), train_cfg.batch_size, val_fn, image_fn, eval_fn,
                             self.cfg.eval.every)
        result.resumed_from = resumed
        return trainer, result


class DiffusionStage(NoisyDataStage):
    """Trains the denoising network on the data set, in pixel or latent space."""

    name = "diffusion"

    def __init__(self, cfg: DictConfig, run_dir: Path, device: torch.device, writer=None,
                 latent: Optional[LatentSpace] = None):
        super().__init__(cfg, run_dir, device, writer, latent)
        self.text = conditioning_name(cfg) == "text"
        self.num_classes = self.train_data.num_classes if cfg.objective.class_conditional and not self.text else 0
        conditioned = self.num_classes > 0 or self.text
        self.label_dropout = cfg.guidance.p_uncond if (cfg.guidance.name == "cfg" and conditioned) else 0.0
        vocabulary = text_vocabulary(cfg)
        self.net = build_denoiser_net(cfg, self.shape, self.num_classes, vocabulary)
        self.text_meta: dict = {}
        if self.text:  # y is a caption's key (its class, or which caption): the loss draws the caption's tokens
            self.captions = caption_table(cfg.dataset, self.train_data, self.net.tokenize).to(device)
            self.labels = self.captions.keys
            self.text_meta = {"conditioning": "text", **default_prompts(cfg.dataset, self.train_data),
                              **({"vocabulary": vocabulary} if vocabulary else {})}
        self.init = init_source(cfg)
        if self.init:
            state, source = self.init
            init_network(self.net, state, "unet", source)
            log.info("the diffusion network starts from the EMA weights of %s", source)
        self.num_params = count_parameters(self.net)
        log.info("%s network: %.2fM parameters, data %s, %d classes, %s", cfg.unet.name, self.num_params / 1e6,
                 "x".join(map(str, self.shape)), self.num_classes, self.process.summary())

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x0, y = batch
        if self.text:
            y = self.captions.draw(y)
        if self.num_classes == 0 and not self.text:
            y = None
        elif self.label_dropout > 0:  # the null condition: the null class, or the empty prompt
            drop = torch.rand(len(y), device=y.device) < self.label_dropout
            null = self.net.null_condition().expand_as(y) if self.text else torch.full_like(y, self.num_classes)
            y = torch.where(drop.view(-1, *[1] * (y.dim() - 1)), null, y)
        return self.process.training_loss(lambda x, c: model(x, c, y), x0, self.cfg.objective.loss).mean()

    def make_val_fn(self):
        """Loss of the EMA model on the fixed held-out batch."""
        fixed = self.fixed_val_batch()
        if fixed is None:
            return None
        if self.text:  # the held-out images' captions, drawn once
            x0, _, t, noise = fixed
            table = caption_table(self.cfg.dataset, self.val_data, self.net.tokenize).to(self.device)
            fixed = x0, table.draw(table.keys[:len(x0)], torch.Generator().manual_seed(VAL_SEED)), t, noise
        return lambda net: held_out_loss(self.process, self.cfg.objective, net, fixed,
                                         self.num_classes > 0 or self.text, self.cfg.train.batch_size)

    def fit(self, image_fn=None, eval_fn=None) -> tuple[Trainer, TrainResult]:
        meta = model_meta(self.shape, self.num_classes, self.label_dropout, **self.text_meta)
        return self.train(self.net, self.cfg.train, meta, self.loss, self.make_val_fn(), image_fn, eval_fn)

    def model(self, net: nn.Module) -> DiffusionModel:
        return DiffusionModel(net.eval(), self.process, self.cfg, self.shape, self.num_classes, self.label_dropout > 0,
                              self.latent, model_meta(self.shape, self.num_classes, self.label_dropout, **self.text_meta))
