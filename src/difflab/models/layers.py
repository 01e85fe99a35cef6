"""Building blocks shared by the UNet and the noisy-image classifier (an encoder-half UNet).

Conventions, chosen for speed:
- Blocks receive the conditioning embedding already passed through SiLU: the networks apply it
  once per forward instead of once per ResBlock (same function as DDPM's per-block SiLU).
- Layers that start training as identities (the last conv of each ResBlock, the attention output
  projection) are zero-initialised, as in improved-diffusion, so a fresh residual branch adds
  nothing and early training is faster and more stable.
- Nothing assumes a memory format: feature maps may be NCHW or channels_last, and the attention
  reshapes are views when they are channels_last.
- Work is not wasted (issue 7, measured in benchmarks/, each rewrite tested against the plain
  formulation in tests/test_fast_layers.py): Upsample computes its nearest+conv3x3 as four 2x2
  convolutions at the low resolution (the same function, ~half the FLOPs); 1x1 skips run as
  batched matmuls in bf16;
  attention's projections are 1x1 convolutions on channels_last maps, and on the CPU attention
  itself is a kernel (attention.py) reading the heads in place, in fp32 even under bf16 autocast;
  GroupNorm -> SiLU (-> dropout) is one fused kernel on the CPU (group_norm_silu.py), in either
  layout, its dropout mask hashed in the kernel instead of drawn by torch's serial generator.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import rearrange
from torch import Tensor, nn

from difflab.errors import UserError
from difflab.models.attention import attention, attention_weights, cross_attention
from difflab.models.group_norm_silu import GroupNormSiLU


class ModelConfigError(UserError, ValueError):
    """An impossible network shape; a ValueError for callers, a UserError for run.py's message."""


def norm_silu(norm_groups: int, channels: int, dropout: float = 0.0) -> list[nn.Module]:
    """GroupNorm -> SiLU (-> dropout in training) as one fused layer. The Identity holds the place
    the separate SiLU had in the Sequentials, so parameter names, and with them checkpoints, are
    unchanged."""
    return [GroupNormSiLU(norm_groups, channels, dropout=dropout), nn.Identity()]


def is_channels_last(x: Tensor) -> bool:
    """A 4-d map stored channels_last (and not also plain contiguous, as 1x1 maps are)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


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


class PointwiseConv(nn.Conv2d):
    """A 1x1 convolution (same parameters and checkpoints as nn.Conv2d(c_in, c_out, 1)). On NCHW
    maps in bf16/fp16 it runs as a batched matrix product, which skips oneDNN's reorders to and
    from its blocked layout; channels_last maps need no reorder, and in fp32 the matrix product
    would go to the BLAS, slower than oneDNN on this CPU (benchmarks/results/), so both keep the
    convolution."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 or not x.is_contiguous():
            return super().forward(x)
        b, c, h, w = x.shape
        weight = self.weight.flatten(1)
        weight, bias = weight.to(x.dtype), self.bias.to(x.dtype)  # autocast casts only one operand of baddbmm
        out = torch.baddbmm(bias[None, :, None], weight.expand(b, *weight.shape), x.flatten(2))
        return out.view(b, -1, h, w)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3, + projected embedding, GroupNorm -> SiLU -> Dropout -> conv3x3.

    The embedding is added as a per-channel bias (DDPM's form; scale-shift would add parameters
    and miss the DDPM parameter count). A 1x1 conv maps the skip path when the width changes.
    With emb_dim=0 the block takes no embedding (the autoencoders, which know no timestep).
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int = 0, dropout: float = 0.0,
                 norm_groups: int = 32):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ModelConfigError(f"unet.dropout must be in [0, 1), got {dropout}")
        self.in_layers = nn.Sequential(
            *norm_silu(norm_groups, in_channels),
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
        )
        self.emb_proj = nn.Linear(emb_dim, out_channels) if emb_dim else None
        self.out_layers = nn.Sequential(
            *norm_silu(norm_groups, out_channels, dropout),
            nn.Identity(),  # where the separate dropout layer was (checkpoint names unchanged)
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip = PointwiseConv(in_channels, out_channels) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, emb: Optional[Tensor] = None) -> Tensor:
        """x: (B, in, H, W); emb: (B, emb_dim), already SiLU-activated, or None when emb_dim=0
        -> (B, out, H, W)."""
        h = self.in_layers(x)
        shift = self.emb_proj(emb) if self.emb_proj is not None else None
        # the embedding goes in as the norm's per-channel shift: no add over the map of its own
        norm, *rest = self.out_layers  # (slicing the Sequential would build a new one per call)
        h = norm(h, shift)
        for layer in rest:
            h = layer(h)
        return self.skip(x) + h


def attention_heads(channels: int, head_channels: int, what: str) -> int:
    """channels // head_channels heads (at least 1), refused when they do not divide the channels."""
    heads = max(1, channels // head_channels)
    if channels % heads:
        raise ModelConfigError(f"{what} with {channels} channels cannot be split into {heads} heads of "
                               f"unet.head_channels={head_channels}; set unet.head_channels to a divisor of {channels}")
    return heads


class AttentionBlock(nn.Module):
    """Residual multi-head self-attention over all positions of a feature map.

    heads = channels // head_channels (at least 1). q, k, v come from one linear layer on the
    normalised tokens and the attention itself runs in models/attention.py.
    """

    def __init__(self, channels: int, head_channels: int = 64, norm_groups: int = 32):
        super().__init__()
        self.heads = attention_heads(channels, head_channels, "an attention block")
        self.norm = GroupNormSiLU(norm_groups, channels, silu=False)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj_out = zero_module(nn.Linear(channels, channels))

    def forward(self, x: Tensor) -> Tensor:
        b, _, height, width = x.shape
        c = self.proj_out.in_features  # the heads' width: the map's too, unless a pruning narrowed the map alone
        channels_last = is_channels_last(x)
        if channels_last:
            # The projections as 1x1 convolutions of the map (oneDNN), which on channels_last
            # is already the token matrix: no copies, and faster than the BLAS's fp32 GEMM here.
            qkv = F.conv2d(self.norm(x), self.qkv.weight[:, :, None, None], self.qkv.bias)
            tokens = qkv.permute(0, 2, 3, 1).reshape(b, height * width, 3 * c)
        else:
            tokens = self.qkv(rearrange(self.norm(x), "b c x y -> b (x y) c"))
        out = attention(tokens, self.heads)
        if channels_last:
            out = out.reshape(b, height, width, c).permute(0, 3, 1, 2)
            return x + F.conv2d(out, self.proj_out.weight[:, :, None, None], self.proj_out.bias)
        return x + rearrange(self.proj_out(out), "b (x y) c -> b c x y", x=height)


class CrossAttentionBlock(nn.Module):
    """Residual multi-head attention of a feature map's positions over a context sequence (a
    prompt's or a class's tokens), as in latent diffusion's transformer blocks: queries from the
    normalised map, keys and values from the context, padding positions masked out. The output
    projection starts at zero, so a fresh block leaves the network as it was."""

    def __init__(self, channels: int, context_dim: int, head_channels: int = 64, norm_groups: int = 32):
        super().__init__()
        self.heads = attention_heads(channels, head_channels, "a cross-attention block")
        self.norm = GroupNormSiLU(norm_groups, channels, silu=False)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(context_dim, 2 * channels)
        self.proj_out = zero_module(nn.Linear(channels, channels))

    def _queries(self, x: Tensor) -> Tensor:
        return self.q(rearrange(self.norm(x), "b c x y -> b (x y) c"))

    def forward(self, x: Tensor, context: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """x: (B, C, H, W); context: (B, L, context_dim); mask: (B, L) True where a token is real."""
        out = cross_attention(self._queries(x), self.kv(context.to(self.kv.weight.dtype)), self.heads, mask)
        return x + rearrange(self.proj_out(out), "b (x y) c -> b c x y", x=x.shape[2])

    def attention_maps(self, x: Tensor, context: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """(B, heads, H*W, L): how much each position attends to each context token."""
        return attention_weights(self._queries(x), self.kv(context.to(self.kv.weight.dtype)), self.heads, mask)


class Downsample(nn.Module):
    """Halve the resolution with a strided 3x3 conv (learned, unlike pooling)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


# Which rows of a 3x3 kernel land on the low-resolution rows (i-1, i) for even output rows and
# (i, i+1) for odd ones, when the kernel runs over a nearest-neighbour 2x upsampling.
_PHASE_TAPS = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]],
                            [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour then a 3x3 conv (no checkerboard artefacts).

    Computed without materialising the upsampled map: each of the four output phases
    (even/odd row x even/odd column) is a 2x2 convolution of the low-resolution input whose
    taps are sums of the 3x3 weights. Same function and parameters (`conv.weight/bias`, so
    checkpoints are unchanged), 16/36 of the multiply-adds and a quarter of the input traffic.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.register_buffer("taps", _PHASE_TAPS.clone(), persistent=False)

    def phase_weights(self) -> Tensor:
        """The four 2x2 phase kernels, indexed [row phase, column phase]: (2, 2, C_out, C_in, 2, 2)."""
        taps = self.taps.to(self.conv.weight.dtype)
        return torch.einsum("aik,bjl,ockl->abocij", taps, taps, self.conv.weight)

    def forward(self, x: Tensor) -> Tensor:
        weights, bias = self.phase_weights(), self.conv.bias
        # Phase (a, b) reads rows i-1,i (a=0) or i,i+1 (a=1), columns likewise: the input padded
        # on that side only, so each conv yields exactly h x w outputs. Four exact convs beat one
        # conv of all phases over the (h+1)x(w+1) window, whose backward zeroed and summed
        # full-size gradients (ddpm_cifar's 16->32 upsample, fwd+bwd: 134 ms against 200).
        phases = [F.conv2d(F.pad(x, (1 - b, b, 1 - a, a)), weights[a, b], bias) for a in range(2) for b in range(2)]
        return _Interleave.apply(*phases)


class _Interleave(torch.autograd.Function):
    """out[..., 2i+a, 2j+b] = phase_ab[..., i, j]: four maps woven into one of twice the size.

    An autograd.Function because the same strided writes through autograd (`out[...] = p`)
    clone the whole output's gradient once per write in the backward.
    """

    @staticmethod
    def forward(ctx, *phases: Tensor) -> Tensor:  # type: ignore[override]
        p = phases[0]
        b, c, h, w = p.shape
        fmt = torch.channels_last if is_channels_last(p) else torch.contiguous_format
        out = torch.empty(b, c, 2 * h, 2 * w, dtype=p.dtype, device=p.device, memory_format=fmt)
        grid = out.view(b, c, h, 2, w, 2)  # (row, row phase, column, column phase)
        for k, phase in enumerate(phases):
            grid[:, :, :, k // 2, :, k % 2] = phase
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        grid = grad.unflatten(2, (-1, 2)).unflatten(4, (-1, 2))  # a view for any strides
        return tuple(grid[:, :, :, k // 2, :, k % 2] for k in range(4))


class EmbedSequential(nn.Sequential):
    """A Sequential whose ResBlocks also receive the embedding, and its cross-attention blocks the
    context (tokens and padding mask), so a network is a flat list.

    With `checkpoint` set (train.gradient_checkpointing), training keeps only the block's input
    and recomputes its activations in the backward: less memory for one more forward. torch's
    checkpoint restores the RNG state for the recomputation, so dropout draws the same masks."""

    checkpoint = False

    def forward(self, x: Tensor, emb: Tensor, context: Optional[Tensor] = None,  # type: ignore[override]
                mask: Optional[Tensor] = None) -> Tensor:
        if self.checkpoint and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._layers, x, emb, context, mask, use_reentrant=False)
        return self._layers(x, emb, context, mask)

    def _layers(self, x: Tensor, emb: Tensor, context: Optional[Tensor] = None, mask: Optional[Tensor] = None) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, CrossAttentionBlock):
                x = layer(x, context, mask)
            else:
                x = layer(x)
        return x


def set_gradient_checkpointing(model: nn.Module, enabled: bool = True) -> int:
    """Checkpoint (or not) every block of the UNets and classifiers inside `model`; returns how
    many blocks there are (0 for a network without any, such as the autoencoder)."""
    blocks = [m for m in model.modules() if isinstance(m, EmbedSequential)]
    for block in blocks:
        block.checkpoint = enabled
    return len(blocks)
