"""The noise-prediction UNet of DDPM (Ho et al. 2020), laid out as in improved-diffusion.

conv_in; per level num_res_blocks ResBlocks (+ attention at the configured feature-map sizes)
and a strided-conv Downsample between levels; a ResBlock-Attention-ResBlock middle; an up path
of num_res_blocks + 1 ResBlocks per level, each eating one skip connection, with nearest+conv
Upsample; GroupNorm -> SiLU -> conv_out. With the DDPM CIFAR-10 settings (conf/unet/ddpm_cifar)
it has the paper's 35.7M parameters.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.models.layers import (AttentionBlock, CrossAttentionBlock, Downsample, EmbedSequential, ModelConfigError,
                                   ResBlock, TimestepEmbedding, Upsample, check_norm_groups, norm_silu, zero_module)


def padded_size(image_size: int, num_levels: int) -> int:
    """The smallest size >= image_size that every Downsample can halve and the up path retrace."""
    factor = 2 ** (num_levels - 1)
    return math.ceil(image_size / factor) * factor


def res_stage(c_in: int, c_out: int, attend: bool, emb_dim: int, dropout: float, norm_groups: int,
              head_channels: int, context_dim: int = 0) -> list[nn.Module]:
    """A ResBlock, followed by self-attention when this feature-map size has it, and by
    cross-attention over the context when context_dim is set for it."""
    layers: list[nn.Module] = [ResBlock(c_in, c_out, emb_dim, dropout, norm_groups)]
    if attend:
        layers.append(AttentionBlock(c_out, head_channels, norm_groups))
    if context_dim:
        layers.append(CrossAttentionBlock(c_out, context_dim, head_channels, norm_groups))
    return layers


def build_down_path(channels: int, channel_mults: Sequence[int], num_res_blocks: int,
                    attention_resolutions: Sequence[int], sizes: Sequence[int], emb_dim: int, dropout: float,
                    norm_groups: int, head_channels: int, cross_attention_resolutions: Sequence[int] = (),
                    context_dim: int = 0) -> tuple[nn.ModuleList, list[int]]:
    """The encoder half shared by the UNet and the noise-aware classifier: per level
    num_res_blocks ResBlocks (+ attention) and a Downsample between levels. Returns the blocks
    and the channel count after conv_in and after each block (the UNet's skip connections)."""
    ch = channels
    skip_channels = [ch]
    down = nn.ModuleList()
    for level, mult in enumerate(channel_mults):
        for _ in range(num_res_blocks):
            cross = context_dim if sizes[level] in cross_attention_resolutions else 0
            down.append(EmbedSequential(*res_stage(ch, channels * mult, sizes[level] in attention_resolutions,
                                                   emb_dim, dropout, norm_groups, head_channels, cross)))
            ch = channels * mult
            skip_channels.append(ch)
        if level < len(channel_mults) - 1:
            down.append(EmbedSequential(Downsample(ch)))
            skip_channels.append(ch)
    return down, skip_channels


class UNet(nn.Module):
    """Predicts noise (or x0 / v) from a noisy image, its timestep and an optional class label.

    Class labels are embedded into the time embedding; index `num_classes` is the null class of
    classifier-free guidance and y=None means all-null. With num_classes == 0 the network has no
    class embedding at all. With context_dim (the context tokens' width), the middle and the blocks
    at cross_attention_resolutions attend to a context sequence: a prompt's or a class's tokens,
    given to forward with their padding mask.
    """

    def __init__(self, in_channels: int, image_size: int, channels: int, channel_mults: Sequence[int],
                 num_res_blocks: int, attention_resolutions: Sequence[int], head_channels: int = 64,
                 dropout: float = 0.0, norm_groups: int = 32, num_classes: int = 0,
                 out_channels: int | None = None, cross_attention_resolutions: Sequence[int] = (),
                 context_dim: int = 0):
        super().__init__()
        # Sizes the down-samplings cannot halve (28 with three of them) are zero-padded on the
        # bottom/right and the output cropped back, so any network runs on any data set.
        self.image_size = image_size
        self.pad = padded_size(image_size, len(channel_mults)) - image_size
        image_size += self.pad
        check_norm_groups([channels * m for m in channel_mults] + [channels], norm_groups)
        sizes = [image_size // 2**level for level in range(len(channel_mults))]
        for key, resolutions in (("attention_resolutions", attention_resolutions),
                                 ("cross_attention_resolutions", cross_attention_resolutions)):
            unused = sorted(set(resolutions) - set(sizes))
            if unused:
                warnings.warn(f"unet.{key} {unused} match no feature-map size of this UNet "
                              f"({sizes}), so they add no attention", stacklevel=2)
        if cross_attention_resolutions and context_dim <= 0:
            raise ModelConfigError("unet.cross_attention_resolutions need the context tokens' width: set unet.context_dim "
                                   "to a positive number, e.g. 64")
        self.context_dim = context_dim
        self.num_classes = num_classes
        emb_dim = 4 * channels

        self.time_embed = TimestepEmbedding(channels, emb_dim)
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)

        self.down, skip_channels = build_down_path(channels, channel_mults, num_res_blocks, attention_resolutions,
                                                   sizes, emb_dim, dropout, norm_groups, head_channels,
                                                   cross_attention_resolutions, self.context_dim)
        ch = skip_channels[-1]

        # With cross-attention the middle attends to the context too (latent diffusion's middle transformer).
        middle_cross = [CrossAttentionBlock(ch, self.context_dim, head_channels, norm_groups)] if self.context_dim else []
        self.middle = EmbedSequential(
            ResBlock(ch, ch, emb_dim, dropout, norm_groups),
            AttentionBlock(ch, head_channels, norm_groups),
            *middle_cross,
            ResBlock(ch, ch, emb_dim, dropout, norm_groups),
        )

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            for i in range(num_res_blocks + 1):
                cross = self.context_dim if sizes[level] in cross_attention_resolutions else 0
                layers = res_stage(ch + skip_channels.pop(), channels * mult, sizes[level] in attention_resolutions,
                                   emb_dim, dropout, norm_groups, head_channels, cross)
                ch = channels * mult
                if level > 0 and i == num_res_blocks:
                    layers.append(Upsample(ch))
                self.up.append(EmbedSequential(*layers))

        self.out = nn.Sequential(
            *norm_silu(norm_groups, ch),
            zero_module(nn.Conv2d(ch, out_channels or in_channels, 3, padding=1)),
        )

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, context: Tensor | None = None,
                mask: Tensor | None = None) -> Tensor:
        """x: (B, C, H, W); t: (B,) int or float timesteps in the schedule's 0..T-1;
        y: (B,) int64 labels in [0, num_classes] (num_classes = null) or None = all-null;
        context: (B, L, context_dim) tokens the cross-attention reads, mask: (B, L) True where real."""
        if (context is None) != (self.context_dim == 0):
            raise ValueError("this UNet " + ("has cross-attention, so it needs a context" if self.context_dim else
                                             "has no cross-attention, so context must be None"))
        emb = self.time_embed(t)
        if self.class_embed is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            emb = emb + self.class_embed(y)
        elif y is not None:
            raise ValueError("this UNet was built with num_classes=0 (unconditional), so y must be None")
        emb = F.silu(emb)  # once here instead of in every ResBlock

        if self.pad:
            x = F.pad(x, (0, self.pad, 0, self.pad))
        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            h = block(h, emb, context, mask)
            skips.append(h)
        h = self.middle(h, emb, context, mask)
        for block in self.up:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context, mask)
        h = self.out(h)
        return h[..., : self.image_size, : self.image_size] if self.pad else h


def network_shape(cfg) -> dict:
    """The keyword arguments a `unet` or `classifier` config node gives its network."""
    return {"channels": cfg.channels, "channel_mults": list(cfg.channel_mults), "num_res_blocks": cfg.num_res_blocks,
            "attention_resolutions": list(cfg.attention_resolutions), "head_channels": cfg.head_channels,
            "dropout": cfg.dropout, "norm_groups": cfg.norm_groups}


def build_unet(cfg, in_channels: int, image_size: int, num_classes: int,
               cross_attention_resolutions: Optional[Sequence[int]] = None) -> UNet:
    """A UNet from a `unet` config group node (UNetConfig fields; `name` is ignored); with
    cross_attention_resolutions (a list, maybe empty: the middle only), cross-attention over
    unet.context_dim wide tokens."""
    cross = cross_attention_resolutions is not None
    return UNet(in_channels=in_channels, image_size=image_size, num_classes=num_classes, **network_shape(cfg),
                cross_attention_resolutions=list(cross_attention_resolutions or []),
                context_dim=cfg.context_dim if cross else 0)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters (what papers report as model size)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
