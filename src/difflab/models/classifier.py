"""The noise-aware classifier p(y | x_t, t) of classifier guidance (Dhariwal & Nichol 2021).

It is the encoder half of the UNet (same blocks, same timestep embedding) followed by
GroupNorm -> SiLU -> global average pool -> linear, so it reads noisy inputs at any t the
way the denoiser does. In latent diffusion it sees the (scaled) latents; a vector latent
(D x 1 x 1, nothing to convolve over) gets the MLP denoiser's trunk instead.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from difflab.models.layers import TimestepEmbedding, check_norm_groups, norm_silu
from difflab.models.mlp import MLPClassifier
from difflab.models.unet import build_down_path, network_shape


class NoisyClassifier(nn.Module):
    def __init__(self, in_channels: int, image_size: int, num_classes: int, channels: int,
                 channel_mults: Sequence[int], num_res_blocks: int, attention_resolutions: Sequence[int],
                 head_channels: int = 64, dropout: float = 0.0, norm_groups: int = 32):
        super().__init__()
        check_norm_groups([channels * m for m in channel_mults] + [channels], norm_groups)
        # A stride-2 conv maps n to ceil(n / 2), so odd sizes (7x7 latents) need no padding here.
        sizes = [math.ceil(image_size / 2**level) for level in range(len(channel_mults))]
        emb_dim = 4 * channels
        self.num_classes = num_classes
        self.time_embed = TimestepEmbedding(channels, emb_dim)
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.down, skip_channels = build_down_path(channels, channel_mults, num_res_blocks, attention_resolutions,
                                                   sizes, emb_dim, dropout, norm_groups, head_channels)
        ch = skip_channels[-1]
        self.head = nn.Sequential(*norm_silu(norm_groups, ch), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Linear(ch, num_classes))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """x: (B, C, H, W) noisy input at timesteps t: (B,) -> logits (B, num_classes)."""
        emb = F.silu(self.time_embed(t))
        h = self.conv_in(x)
        for block in self.down:
            h = block(h, emb)
        return self.head(h)


def build_classifier(cfg, in_channels: int, image_size: int, num_classes: int) -> NoisyClassifier | MLPClassifier:
    """A NoisyClassifier from the `classifier` config block (ClassifierConfig); for a vector latent
    (image_size 1) an MLPClassifier of classifier.channels width and classifier.num_res_blocks blocks."""
    if image_size == 1:
        return MLPClassifier((in_channels, 1, 1), num_classes, cfg.channels, cfg.num_res_blocks, cfg.dropout)
    return NoisyClassifier(in_channels=in_channels, image_size=image_size, num_classes=num_classes,
                           **network_shape(cfg))
