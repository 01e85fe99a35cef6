"""The autoencoders of latent diffusion: a KL-regularised VAE (seeds 000, 004) and a VQ-VAE
(seed 002), sharing one convolutional encoder/decoder built from the UNet's blocks.

The encoder halves the resolution between levels (down-sampling 2^(len(channel_mults) - 1)) and
ends in a ResBlock-Attention-ResBlock middle at the latent resolution; the decoder mirrors it.
Sizes the down-samplings cannot halve (28 at 8x) are zero-padded on the bottom/right and the
decoder's output cropped back, as in the UNet.

`encode` gives what the diffusion model learns (the KL posterior's mean; the VQ's
pre-quantisation vectors) and `decode` maps such a latent back to an image (the VQ quantises
first), so a diffusion model never needs to know which autoencoder it works in.

A KL-VAE's latent may also be one flat vector (`latent=vector`): linear layers map the
encoder's last feature map to the posterior's moments and the vector back to the decoder's
first map. It travels as a D x 1 x 1 latent, so it is cached, scaled and diffused like a map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from difflab.models.layers import (AttentionBlock, Downsample, ModelConfigError, ResBlock, Upsample, check_norm_groups,
                                   norm_silu)
from difflab.models.unet import padded_size

LOGVAR_RANGE = (-30.0, 20.0)  # as in latent-diffusion: exp() stays finite in fp32


def _middle(channels: int, attention: bool, norm_groups: int) -> list[nn.Module]:
    attn = [AttentionBlock(channels, channels, norm_groups)] if attention else []
    return [ResBlock(channels, channels, norm_groups=norm_groups), *attn, ResBlock(channels, channels, norm_groups=norm_groups)]


def _out(channels: int, out_channels: int, norm_groups: int) -> list[nn.Module]:
    return [*norm_silu(norm_groups, channels), nn.Conv2d(channels, out_channels, 3, padding=1)]


class Encoder(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, channels: int, channel_mults: Sequence[int],
                 num_res_blocks: int, attention: bool, norm_groups: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 3, padding=1)]
        ch = channels
        for level, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                layers.append(ResBlock(ch, channels * mult, norm_groups=norm_groups))
                ch = channels * mult
            if level < len(channel_mults) - 1:
                layers.append(Downsample(ch))
        self.layers = nn.Sequential(*layers, *_middle(ch, attention, norm_groups), *_out(ch, out_channels, norm_groups))

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class Decoder(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, channels: int, channel_mults: Sequence[int],
                 num_res_blocks: int, attention: bool, norm_groups: int):
        super().__init__()
        ch = channels * channel_mults[-1]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ch, 3, padding=1), *_middle(ch, attention, norm_groups)]
        for level, mult in reversed(list(enumerate(channel_mults))):
            for _ in range(num_res_blocks + 1):
                layers.append(ResBlock(ch, channels * mult, norm_groups=norm_groups))
                ch = channels * mult
            if level > 0:
                layers.append(Upsample(ch))
        self.layers = nn.Sequential(*layers, *_out(ch, out_channels, norm_groups))

    @property
    def last_layer(self) -> nn.Parameter:
        """The weight the adversarial term's adaptive weight compares gradient norms at."""
        return self.layers[-1].weight

    def forward(self, z: Tensor) -> Tensor:
        return self.layers(z)


@dataclass
class AutoencoderOutput:
    reconstruction: Tensor
    regularizer: Tensor  # the weighted KL term or the VQ loss, a scalar added to the reconstruction loss
    indices: Tensor | None = None  # VQ codebook indices, B x h x w


class Autoencoder(nn.Module):
    """Shared shape handling; subclasses define the latent (`encode`, `decode`, `forward`)."""

    def __init__(self, image_channels: int, image_size: int, encoder_out: int, latent_channels: int,
                 channels: int, channel_mults: Sequence[int], num_res_blocks: int, attention: bool,
                 norm_groups: int):
        super().__init__()
        if not channel_mults:
            raise ModelConfigError("autoencoder.channel_mults is empty: give one multiplier per level, e.g. [1, 2, 2] for 4x down-sampling")
        check_norm_groups([channels * m for m in channel_mults] + [channels], norm_groups)
        self.factor = 2 ** (len(channel_mults) - 1)
        self.image_size, self.latent_channels = image_size, latent_channels
        self.pad = padded_size(image_size, len(channel_mults)) - image_size
        arch = (channels, channel_mults, num_res_blocks, attention, norm_groups)
        self.encoder = Encoder(image_channels, encoder_out, *arch)
        self.decoder = Decoder(latent_channels, image_channels, *arch)

    @property
    def map_shape(self) -> tuple[int, int, int]:
        """The feature map between the encoder and the decoder."""
        side = (self.image_size + self.pad) // self.factor
        return self.latent_channels, side, side

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.map_shape

    def _encoder_features(self, x: Tensor) -> Tensor:
        return self.encoder(F.pad(x, (0, self.pad, 0, self.pad)) if self.pad else x)

    def _decode_pixels(self, z: Tensor) -> Tensor:
        return self.decoder(z)[..., :self.image_size, :self.image_size]


class DiagonalGaussian:
    """The KL-VAE posterior N(mean, exp(logvar)), logvar clamped to LOGVAR_RANGE."""

    def __init__(self, moments: Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(*LOGVAR_RANGE)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self) -> Tensor:
        return self.mean + self.std * torch.randn_like(self.mean)

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per image: 0.5 * sum(mean^2 + var - 1 - logvar) over C, H, W."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class KLAutoencoder(Autoencoder):
    """Loss = MSE + kl_weight * KL, with both terms per image summed as in latent-diffusion and
    divided by the pixel count, so kl_weight means what it means there (1e-6..1e-5) while the
    logged loss reads as an MSE."""

    def __init__(self, image_channels: int, image_size: int, latent_channels: int, kl_weight: float, **arch):
        super().__init__(image_channels, image_size, 2 * latent_channels, latent_channels, **arch)
        self.kl_weight = kl_weight
        self.pixels = image_channels * image_size * image_size

    def posterior(self, x: Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self._encoder_features(x))

    def encode(self, x: Tensor) -> Tensor:
        return self.posterior(x).mean

    def decode(self, z: Tensor) -> Tensor:
        return self._decode_pixels(z)

    def forward(self, x: Tensor) -> AutoencoderOutput:
        q = self.posterior(x)
        return AutoencoderOutput(self.decode(q.sample()), self.kl_weight * q.kl().mean() / self.pixels)


class VectorKLAutoencoder(KLAutoencoder):
    """A KL-VAE with a latent_dim-vector latent; latent_channels are the channels of the feature
    map the vector is read from and decoded to."""

    def __init__(self, image_channels: int, image_size: int, latent_channels: int, latent_dim: int, kl_weight: float,
                 **arch):
        super().__init__(image_channels, image_size, latent_channels, kl_weight, **arch)
        self.latent_dim = latent_dim
        features = math.prod(self.map_shape)
        self.to_moments = nn.Linear(2 * features, 2 * latent_dim)
        self.from_latent = nn.Linear(latent_dim, features)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.latent_dim, 1, 1

    def posterior(self, x: Tensor) -> DiagonalGaussian:
        moments = self.to_moments(rearrange(self._encoder_features(x), "b c h w -> b (c h w)"))
        return DiagonalGaussian(rearrange(moments, "b d -> b d 1 1"))

    def decode(self, z: Tensor) -> Tensor:
        c, h, w = self.map_shape
        return self._decode_pixels(rearrange(self.from_latent(rearrange(z, "b d 1 1 -> b d")),
                                             "b (c h w) -> b c h w", c=c, h=h, w=w))


def vq_loss(z: Tensor, z_q: Tensor, commitment: float, learn_codebook: bool) -> Tensor:
    """VQ-VAE's `||sg[z] - e||^2 + beta ||z - sg[e]||^2` (means): the first term moves the codebook
    (left out when EMA updates move it instead), the second commits the encoder to its code.
    (reference/diffusion.md's form puts beta on the codebook term, taming's `legacy` swap.)"""
    commit = commitment * F.mse_loss(z, z_q.detach())
    return commit + F.mse_loss(z_q, z.detach()) if learn_codebook else commit


class VectorQuantizer(nn.Module):
    """Nearest-codebook-vector quantisation with the straight-through estimator.

    With `ema_decay` the codebook follows the running mean of the vectors assigned to each code
    (VQ-VAE-2), which keeps most codes in use; with `restart_dead`, codes unused for long (EMA
    count below one vector) are moved onto random encoder outputs of the batch.
    """

    def __init__(self, size: int, dim: int, commitment: float, ema_decay: float | None, restart_dead: bool,
                 eps: float = 1e-5):
        super().__init__()
        self.size, self.dim, self.commitment = size, dim, commitment
        self.ema_decay, self.restart_dead, self.eps = ema_decay, restart_dead, eps
        init = torch.empty(size, dim).uniform_(-1.0 / size, 1.0 / size)
        if ema_decay is None:
            self.codebook = nn.Parameter(init)
        else:
            self.register_buffer("codebook", init)
            self.register_buffer("cluster_size", torch.ones(size))
            self.register_buffer("cluster_sum", init.clone())

    def nearest(self, flat: Tensor) -> Tensor:
        """Index of the closest code for each row of flat (N x dim)."""
        book = self.codebook.float()
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ book.t() + book.pow(2).sum(1)[None]
        return dist.argmin(dim=1)

    @torch.no_grad()
    def _ema_update(self, flat: Tensor, indices: Tensor) -> None:
        one_hot = F.one_hot(indices, self.size).type(flat.dtype)
        self.cluster_size.lerp_(one_hot.sum(0), 1 - self.ema_decay)
        self.cluster_sum.lerp_(one_hot.t() @ flat, 1 - self.ema_decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.size * self.eps) * n  # Laplace smoothing
        self.codebook.copy_(self.cluster_sum / smoothed[:, None])
        if self.restart_dead:
            dead = self.cluster_size < 1.0
            if dead.any():
                picks = flat[torch.randint(0, len(flat), (int(dead.sum()),), device=flat.device)]
                self.codebook[dead] = picks
                self.cluster_sum[dead] = picks
                self.cluster_size[dead] = 1.0

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """z: B x dim x h x w -> (straight-through z_q, VQ loss, indices B x h x w)."""
        b, _, h, w = z.shape
        flat = rearrange(z.float(), "b c h w -> (b h w) c")
        with torch.autocast(z.device.type, enabled=False):  # distances and EMA sums in fp32
            indices = self.nearest(flat)
            if self.training and self.ema_decay is not None:
                self._ema_update(flat.detach(), indices)
        z_q = rearrange(self.codebook[indices], "(b h w) c -> b c h w", b=b, h=h, w=w).to(z.dtype)
        loss = vq_loss(z, z_q, self.commitment, learn_codebook=self.ema_decay is None)
        z_q = z + (z_q - z).detach()  # forward: the code; backward: the identity to the encoder
        return z_q, loss, rearrange(indices, "(b h w) -> b h w", b=b, h=h, w=w)


class VQAutoencoder(Autoencoder):
    """latent_channels is the codebook vectors' dimension; diffusion runs on the
    pre-quantisation vectors and `decode` quantises them."""

    def __init__(self, image_channels: int, image_size: int, latent_channels: int, codebook_size: int,
                 commitment: float, codebook_ema: float | None, restart_dead: bool, **arch):
        super().__init__(image_channels, image_size, latent_channels, latent_channels, **arch)
        self.quantizer = VectorQuantizer(codebook_size, latent_channels, commitment, codebook_ema, restart_dead)

    def encode(self, x: Tensor) -> Tensor:
        return self._encoder_features(x)

    def decode(self, z: Tensor) -> Tensor:
        return self._decode_pixels(self.quantizer(z)[0])

    def forward(self, x: Tensor) -> AutoencoderOutput:
        z_q, loss, indices = self.quantizer(self.encode(x))
        return AutoencoderOutput(self._decode_pixels(z_q), loss, indices)


def codebook_stats(indices: Tensor, size: int) -> dict:
    """Fraction of codes used and the perplexity exp(H(p)) of their frequencies (size = all used evenly)."""
    counts = torch.bincount(indices.flatten(), minlength=size).float()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"codebook_usage": float((counts > 0).float().mean()), "codebook_perplexity": float(entropy.exp())}


def build_autoencoder(cfg, image_channels: int, image_size: int) -> Autoencoder:
    """A KL (spatial or vector latent) or VQ autoencoder from an `autoencoder` config group node."""
    arch = dict(channels=cfg.channels, channel_mults=list(cfg.channel_mults), num_res_blocks=cfg.num_res_blocks,
                attention=cfg.attention, norm_groups=cfg.norm_groups)
    vector = cfg.get("latent", "spatial") == "vector"  # checkpoints from before vector latents have no `latent`
    if vector and cfg.name != "kl":
        raise ModelConfigError(f"autoencoder.latent=vector is a KL-VAE's latent, not autoencoder={cfg.name}'s: "
                               "use autoencoder=kl")
    if vector:
        return VectorKLAutoencoder(image_channels, image_size, cfg.latent_channels, cfg.latent_dim, cfg.kl_weight, **arch)
    if cfg.name == "kl":
        return KLAutoencoder(image_channels, image_size, cfg.latent_channels, cfg.kl_weight, **arch)
    if cfg.name == "vq":
        return VQAutoencoder(image_channels, image_size, cfg.latent_channels, cfg.codebook_size, cfg.commitment,
                             cfg.codebook_ema if cfg.codebook_ema > 0 else None, cfg.restart_dead_codes, **arch)
    raise ModelConfigError(f"autoencoder={cfg.name} has no network: use autoencoder=kl or autoencoder=vq")
