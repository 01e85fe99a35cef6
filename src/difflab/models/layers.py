"""Building blocks shared by the UNet and the noisy-image classifier (an encoder-half UNet).

Conventions, chosen for speed:
- Blocks receive the conditioning embedding already passed through SiLU: the networks apply it
  once per forward instead of once per ResBlock (same function as DDPM's per-block SiLU).
- Layers that start training as identities (the last conv of each ResBlock, the attention output
  projection) are zero-initialised, as in improved-diffusion, so a fresh residual branch adds
  nothing and early training is faster and more stable.
- Nothing assumes a memory format: feature maps may be NCHW or channels_last, and the attention
  reshapes are views when they are channels_last.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from difflab.errors import UserError


class ModelConfigError(UserError, ValueError):
    """An impossible network shape; a ValueError for callers, a UserError for run.py's message."""


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters so that the residual branch it ends starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def check_norm_groups(channel_counts: list[int], norm_groups: int) -> None:
    """GroupNorm needs every normalised channel count to split into `norm_groups` equal groups."""
    bad = sorted({c for c in channel_counts if c % norm_groups})
    if bad:
        raise ModelConfigError(
            f"unet.norm_groups={norm_groups} does not divide the channel counts {bad}; "
            f"set unet.norm_groups to a divisor of every channels * channel_mult (e.g. 8 or 16)"
        )


class TimestepEmbedding(nn.Module):
    """Sinusoidal features of the (float) timestep, then Linear -> SiLU -> Linear.

    The timestep is embedded as a float so respaced samplers can pass any t, and the frequencies
    are a non-persistent buffer: computed once, follow .to(device), stay out of checkpoints.
    """

    def __init__(self, channels: int, emb_dim: int, max_period: float = 10000.0):
        super().__init__()
        if channels % 2:
            raise ModelConfigError(f"unet.channels must be even for the sinusoidal timestep embedding, got {channels}")
        half = channels // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

    def forward(self, t: Tensor) -> Tensor:
        """t: (B,) int or float timesteps -> (B, emb_dim)."""
        # float32 even when the module was cast to half precision: t up to 1000 needs the mantissa.
        args = t.float()[:, None] * self.freqs.float()[None]
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3, + projected embedding, GroupNorm -> SiLU -> Dropout -> conv3x3.

    The embedding is added as a per-channel bias (DDPM's form; scale-shift would add parameters
    and miss the DDPM parameter count). A 1x1 conv maps the skip path when the width changes.
    With emb_dim=0 the block takes no embedding (the autoencoders, which know no timestep).
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int = 0, dropout: float = 0.0,
                 norm_groups: int = 32):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(norm_groups, in_channels),
            nn.SiLU(),
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
        )
        self.emb_proj = nn.Linear(emb_dim, out_channels) if emb_dim else None
        self.out_layers = nn.Sequential(
            nn.GroupNorm(norm_groups, out_channels),
            nn.SiLU(),
            # nn.Identity rather than Dropout(0): training-mode dropout with p=0 still costs a pass.
            nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, emb: Optional[Tensor] = None) -> Tensor:
        """x: (B, in, H, W); emb: (B, emb_dim), already SiLU-activated, or None when emb_dim=0
        -> (B, out, H, W)."""
        h = self.in_layers(x)
        if self.emb_proj is not None:
            h = h + rearrange(self.emb_proj(emb), "b c -> b c 1 1")
        return self.skip(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Residual multi-head self-attention over all positions of a feature map.

    heads = channels // head_channels (at least 1). q, k, v come from one linear layer on the
    normalised tokens and the attention itself runs in scaled_dot_product_attention.
    """

    def __init__(self, channels: int, head_channels: int = 64, norm_groups: int = 32):
        super().__init__()
        self.heads = max(1, channels // head_channels)
        if channels % self.heads:
            raise ModelConfigError(
                f"an attention block with {channels} channels cannot be split into {self.heads} heads "
                f"of unet.head_channels={head_channels}; set unet.head_channels to a divisor of {channels}"
            )
        self.norm = nn.GroupNorm(norm_groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj_out = zero_module(nn.Linear(channels, channels))

    def forward(self, x: Tensor) -> Tensor:
        height = x.shape[-2]
        tokens = rearrange(self.norm(x), "b c x y -> b (x y) c")  # a view when x is channels_last
        q, k, v = rearrange(self.qkv(tokens), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        out = rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)")
        return x + rearrange(self.proj_out(out), "b (x y) c -> b c x y", x=height)


class Downsample(nn.Module):
    """Halve the resolution with a strided 3x3 conv (learned, unlike pooling)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour then a 3x3 conv (no checkerboard artefacts)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class EmbedSequential(nn.Sequential):
    """A Sequential whose ResBlocks also receive the embedding, so a network is a flat list."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x
