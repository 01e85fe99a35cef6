"""The reconstruction stage: trains a KL or VQ autoencoder (with the optional adversarial term)
in the shared Trainer, then measures it and computes the latent scale factor stored with it.

The Trainer optimises one module with one loss, so the autoencoder and the discriminator
travel together in `AutoencoderWithLoss` and the loss adds both players' terms. The generator's
adversarial term is computed with the discriminator's parameters frozen, and the
discriminator's hinge term on detached reconstructions, so one backward pass gives each player
only its own gradient (the two share AdamW's settings, as in taming-transformers).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torchvision.utils import make_grid

from difflab.config import autoencoder_batch_key, autoencoder_train_config
from difflab.data import ImageData, augment_batch, load_splits, to_model_range, to_uint8
from difflab.models import count_parameters
from difflab.models.autoencoder import Autoencoder, VQAutoencoder, build_autoencoder, codebook_stats
from difflab.models.discriminator import PatchDiscriminator, adaptive_weight, hinge_d_loss
from difflab.pictures import save_loss_curve, save_png
from difflab.trackers import stage_trackers
from difflab.train.loop import StepBatches, Trainer
from difflab.train.stages import init_source
from difflab.trained import init_network

log = logging.getLogger("difflab.stages")

SCALE_IMAGES = 2048  # training images whose latents give the scale factor 1/std(z)
EVAL_IMAGES = 1000  # held-out images the reconstruction metrics average over
SHOWN_PAIRS = 32  # original/reconstruction pairs in reconstructions/reconstructions.png


class AutoencoderWithLoss(nn.Module):
    def __init__(self, autoencoder: Autoencoder, discriminator: Optional[PatchDiscriminator]):
        super().__init__()
        self.autoencoder, self.discriminator = autoencoder, discriminator


@torch.no_grad()
def reconstruct(autoencoder: Autoencoder, x: Tensor, batch_size: int = 256) -> tuple[Tensor, Optional[Tensor]]:
    """decode(encode(x)) in batches (the posterior mean for KL, quantised for VQ), plus the VQ codes.
    Give it a model in eval mode: a VQ codebook in training mode would update on what it measures."""
    out, codes = [], []
    for xb in x.split(batch_size):
        z = autoencoder.encode(xb)
        out.append(autoencoder.decode(z).float())
        if isinstance(autoencoder, VQAutoencoder):
            codes.append(autoencoder.quantizer(z)[2])
    return torch.cat(out), torch.cat(codes) if codes else None


@torch.no_grad()
def latent_scale(autoencoder: Autoencoder, x: Tensor, batch_size: int = 256) -> float:
    """1/std(z) over training latents: the diffusion model then sees latents of unit variance."""
    z = torch.cat([autoencoder.encode(xb).float() for xb in x.split(batch_size)])
    return float(1.0 / z.std().clamp_min(1e-8))


def held_out_images(train: ImageData, val: ImageData) -> Tensor:
    """The validation images, or the training images when none are held out (dataset.val_size=0)."""
    return val.images if len(val) else train.images


def evaluate_autoencoder(autoencoder: Autoencoder, images_uint8: Tensor, out_dir: Path, device: torch.device,
                         writer=None, step: int = 0) -> dict:
    """MSE and PSNR on pixel values in [0, 1] (+ codebook usage and perplexity for VQ), and
    reconstructions/reconstructions.png: each original beside its reconstruction."""
    autoencoder.eval()
    x = to_model_range(images_uint8[:EVAL_IMAGES]).to(device)
    recon, codes = reconstruct(autoencoder, x)
    mse = float(F.mse_loss(recon.clamp(-1, 1), x)) / 4  # [-1, 1] -> [0, 1]
    metrics = {"reconstruction_mse": mse, "reconstruction_psnr": 10 * math.log10(1 / max(mse, 1e-12)),
               "reconstruction_images": len(x)}
    if codes is not None:
        metrics.update(codebook_stats(codes, autoencoder.quantizer.size))
    n = min(SHOWN_PAIRS, len(x))
    pairs = rearrange(torch.stack([to_uint8(x[:n]), to_uint8(recon[:n])]).cpu(), "two n c h w -> (n two) c h w")
    grid = make_grid(pairs, nrow=16, padding=2, pad_value=255)
    save_png(grid, out_dir / "reconstructions" / "reconstructions.png")
    if writer is not None:
        writer.add_image("reconstructions", grid, step)
        for k, v in metrics.items():
            if k != "reconstruction_images":  # a count, not a measurement
                writer.add_scalar(f"val/final/{k}", v, step)
    log.info("reconstruction of %d held-out images: %s", len(x),
             ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "reconstruction_images"))
    return metrics


class AutoencoderStage:
    """Trains cfg.autoencoder on the data set with autoencoder_train_config(cfg), in stage_dir."""

    name = "autoencoder"

    def __init__(self, cfg: DictConfig, stage_dir: Path, device: torch.device, writer=None):
        self.cfg, self.stage_dir, self.device, self.writer = cfg, stage_dir, device, writer
        self.train_cfg = autoencoder_train_config(cfg)
        self.train_data, self.val_data = load_splits(cfg.dataset, cfg.paths.cache_dir)
        self.image_shape = tuple(self.train_data.images.shape[1:])
        self.autoencoder = build_autoencoder(cfg.autoencoder, self.image_shape[0], self.image_shape[1])
        d = cfg.autoencoder.discriminator
        disc = PatchDiscriminator(self.image_shape[0], d.channels, d.num_layers) if d.enabled else None
        self.module = AutoencoderWithLoss(self.autoencoder, disc)
        init = init_source(cfg)
        if init:
            state, source = init
            init_network(self.autoencoder, state, "autoencoder", source)
            log.info("the autoencoder starts from the EMA weights of %s", source)
        self.num_params = count_parameters(self.autoencoder)
        log.info("autoencoder=%s: %.2fM parameters, images %s -> latents %s%s", cfg.autoencoder.name,
                 self.num_params / 1e6, "x".join(map(str, self.image_shape)),
                 "x".join(map(str, self.autoencoder.latent_shape)), ", with a PatchGAN discriminator" if disc else "")
        self.images = self.train_data.images.to(device)

    def batch(self, step: int, batches: StepBatches) -> tuple[Tensor, int]:
        idx = batches.indices(step).to(self.device)
        return augment_batch(to_model_range(self.images[idx]), self.cfg.dataset.augmentation), step

    def loss(self, model: AutoencoderWithLoss, batch: tuple[Tensor, int]) -> Tensor:
        x, step = batch
        out = model.autoencoder(x)
        nll = F.mse_loss(out.reconstruction.float(), x)
        loss = nll + out.regularizer
        d = self.cfg.autoencoder.discriminator
        if model.discriminator is None or step < d.start:
            return loss
        disc = model.discriminator
        disc.requires_grad_(False)  # the generator's term must not train the discriminator
        g_loss = -disc(out.reconstruction).float().mean()
        disc.requires_grad_(True)
        weight = adaptive_weight(nll, g_loss, model.autoencoder.decoder.last_layer, d.weight)
        d_loss = hinge_d_loss(disc(x).float(), disc(out.reconstruction.detach()).float())
        return loss + weight * g_loss + d_loss

    def make_val_fn(self):
        n = min(len(self.val_data), self.train_cfg.val_batches * self.train_cfg.batch_size)
        if n == 0:
            return None
        x = to_model_range(self.val_data.images[:n]).to(self.device)

        def val_fn(model: AutoencoderWithLoss) -> float:
            return float(F.mse_loss(reconstruct(model.autoencoder, x)[0], x))

        return val_fn

    def fit(self) -> tuple[Trainer, dict]:
        """Train, then store the latent scale in the checkpoint and measure the EMA autoencoder."""
        cfg, tcfg = self.cfg, self.train_cfg
        extra = {"config": OmegaConf.to_container(cfg, resolve=True), "stage": self.name,
                 "meta": {"image_shape": list(self.image_shape), "latent_shape": list(self.autoencoder.latent_shape)}}
        d = cfg.autoencoder.discriminator
        trainer = Trainer(self.module, tcfg, self.stage_dir / "checkpoints", self.device, self.writer, extra,
                          distributed=True, seed=cfg.seed, find_unused_parameters=d.enabled and d.start > 0,
                          stage="autoencoder")
        # train.resume=PATH inside a latent diffusion run names the diffusion checkpoint, not this one.
        own_resume = tcfg.resume if tcfg.resume == "auto" or cfg.mode.name == "reconstruction" else None
        resumed = trainer.maybe_resume(own_resume)
        batches = trainer.step_batches(len(self.train_data), tcfg.batch_size, autoencoder_batch_key(cfg))
        result = trainer.fit(self.loss, lambda s: self.batch(s, batches), tcfg.batch_size, self.make_val_fn())
        if not trainer.writes:  # another torchrun rank: rank 0 measures and writes the autoencoder
            return trainer, {}
        autoencoder = trainer.ema.model.autoencoder.eval()
        scale = latent_scale(autoencoder, to_model_range(self.train_data.images[:SCALE_IMAGES]).to(self.device))
        trainer.extra_state["latent_scale"] = scale
        trainer.save("last.pt")
        save_loss_curve(result.loss_history, self.stage_dir / "loss_curve.png", trainer.val_history)
        measured = evaluate_autoencoder(autoencoder, held_out_images(self.train_data, self.val_data), self.stage_dir,
                                        self.device, self.writer, result.step)
        metrics = {
            "final_loss": result.final_loss, "best_val_loss": result.best_val_loss, "steps": result.step,
            "train_images_per_s": result.images_per_s, "train_wall_time_s": result.wall_time_s,
            "num_params": self.num_params, "latent_shape": list(self.autoencoder.latent_shape),
            "latent_scale": scale, "resumed_from": resumed, "checkpoint": str(self.stage_dir / "checkpoints" / "last.pt"),
            **measured,
        }
        return trainer, metrics


def train_autoencoder(cfg: DictConfig, stage_dir: Path, device: torch.device) -> tuple[Path, dict]:
    """The artifact cache's train callback: (checkpoint, record) of a freshly trained autoencoder."""
    writer = stage_trackers(cfg, stage_dir)
    try:
        _, metrics = AutoencoderStage(cfg, stage_dir, device, writer).fit()
    finally:
        writer.close()
    return stage_dir / "checkpoints" / "last.pt", {"metrics": metrics, "run_dir": str(stage_dir)}
