"""Residual MLPs for inputs without spatial structure: the denoiser of a vector latent
(`unet=mlp`, the simplified LDM that diffuses a KL-VAE's flat latent) and the noise-aware
classifier of such latents.

A vector latent travels through difflab as a D x 1 x 1 map, so every sampler, loss and cache
that handles C x H x W tensors handles it unchanged; these networks flatten their input and
give back its shape. Time and class enter as in the UNet: a sinusoidal timestep embedding plus
a learned class embedding (index num_classes = the null class of classifier-free guidance),
added to every residual block.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from difflab.models.layers import TimestepEmbedding, zero_module


def is_vector_shape(shape) -> bool:
    """Whether a C x H x W shape is a flat vector (C x 1 x 1), which only an MLP can read."""
    return tuple(shape[1:]) == (1, 1)


class ResidualMLPBlock(nn.Module):
    """LayerNorm -> SiLU -> Linear, + the embedding, -> SiLU -> dropout -> Linear, added to the input."""

    def __init__(self, width: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.emb = nn.Linear(emb_dim, width)
        self.fc2 = zero_module(nn.Linear(width, width))  # each block starts as the identity
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        a = self.fc1(F.silu(self.norm(h))) + self.emb(emb)
        return h + self.fc2(self.dropout(F.silu(a)))


class MLPTrunk(nn.Module):
    """Flattened input -> width -> residual blocks conditioned on the timestep embedding."""

    def __init__(self, in_features: int, width: int, num_blocks: int, dropout: float):
        super().__init__()
        emb_dim = 4 * width
        self.time_embed = TimestepEmbedding(width, emb_dim)
        self.proj_in = nn.Linear(in_features, width)
        self.blocks = nn.ModuleList(ResidualMLPBlock(width, emb_dim, dropout) for _ in range(num_blocks))
        self.norm_out = nn.LayerNorm(width)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.proj_in(rearrange(x, "b ... -> b (...)"))
        emb = F.silu(emb)
        for block in self.blocks:
            h = block(h, emb)
        return F.silu(self.norm_out(h))


class MLPDenoiser(nn.Module):
    """Predicts noise (or x0 / v) of a noisy vector from its timestep and an optional class label,
    with the UNet's call signature and class conventions (y=None means all-null)."""

    def __init__(self, shape: tuple[int, ...], width: int, num_blocks: int, dropout: float = 0.0,
                 num_classes: int = 0):
        super().__init__()
        self.shape, self.num_classes = tuple(shape), num_classes
        features = math.prod(shape)
        self.trunk = MLPTrunk(features, width, num_blocks, dropout)
        emb_dim = 4 * width
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None
        self.out = zero_module(nn.Linear(width, features))

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        emb = self.trunk.time_embed(t)
        if self.class_embed is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            emb = emb + self.class_embed(y)
        elif y is not None:
            raise ValueError("this MLP was built with num_classes=0 (unconditional), so y must be None")
        return self.out(self.trunk(x, emb)).reshape(x.shape)


class MLPClassifier(nn.Module):
    """The noise-aware classifier p(y | x_t, t) of a vector latent: the denoiser's trunk, then a linear head."""

    def __init__(self, shape: tuple[int, ...], num_classes: int, width: int, num_blocks: int, dropout: float = 0.0):
        super().__init__()
        self.num_classes = num_classes
        self.trunk = MLPTrunk(math.prod(shape), width, num_blocks, dropout)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.head(self.trunk(x, self.trunk.time_embed(t)))


def build_mlp(cfg, shape: tuple[int, ...], num_classes: int) -> MLPDenoiser:
    """An MLPDenoiser from a `unet` config node: unet.channels is its width, unet.num_res_blocks its blocks."""
    return MLPDenoiser(shape, cfg.channels, cfg.num_res_blocks, cfg.dropout, num_classes)
