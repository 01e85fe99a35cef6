"""GroupNorm (+ SiLU (+ dropout)) as one fused CPU kernel, with torch's own layers as the fallback.

`GroupNormSiLU` is an nn.GroupNorm (same parameters and checkpoint keys) that applies SiLU to its
output when `silu` is set, and then, in training, dropout with probability `dropout`. On CPU
float32/bfloat16 maps, NCHW or channels_last, forward and backward run in group_norm_silu.cpp:
one kernel instead of three, a channels_last path that torch lacks in practice (its
channels_last GroupNorm is 2-3x its NCHW one in float32, ~40x in bfloat16), which is what lets
the runs train channels_last. Everywhere else (CUDA, float16, float64, other strides, no C++
compiler, DIFFLAB_FUSED_KERNELS=0) it is F.group_norm and F.silu.

The kernel is reached through the typed operators difflab::group_norm_silu_fwd and
difflab::group_norm_silu_bwd, which check every tensor before the C code sees a pointer and have
fake implementations, so torch.compile traces them (and calls the kernel from the compiled graph).

The dropout mask is a counter-based hash of two seeds drawn from torch's generator and each
element's NCHW index: the kernel draws it in its loops (16 lanes at a time, where torch's CPU
generator draws one number after another) and recomputes it in the backward instead of storing
it, and on the CPU the fallback computes the same hash with int64 torch ops, so torch.manual_seed
gives the same mask whether or not the kernel runs, in either layout. On other devices the
fallback is F.dropout.

The kernel is built on first use (cpu_kernels.py); where it cannot be, one warning and the fallback.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.models.cpu_kernels import cpu_operator, expect, floats, kernels, usable

DTYPES = {torch.float32: 0, torch.bfloat16: 1}
NO_SEEDS = torch.zeros(2, dtype=torch.int64)  # what a call without dropout passes for its seeds
M32 = 0xFFFFFFFF


def _layout(x: Tensor) -> Optional[torch.memory_format]:
    """How the kernel reads a 4-d map: NCHW when x is NCHW-contiguous (a map can be both, and then
    both readings agree), else channels_last when it is that; None for any other strides."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return None


def _pointer(shift: Optional[Tensor]) -> Optional[int]:
    """The optional shift's data for the kernel, None as NULL."""
    return shift.data_ptr() if shift is not None else None


def _draw_seeds(p: float) -> Tensor:
    """The dropout mask's two 32-bit seeds, from torch's generator (so torch.manual_seed applies);
    no draw without dropout, so that the generator's stream does not depend on the layer."""
    return torch.randint(0, 2**32, (2,), dtype=torch.int64) if p else NO_SEEDS


def _dropout_args(p: float, seeds: Tensor) -> tuple[int, float, int, int]:
    """(cut, scale, seed1, seed2) of the kernel's dropout: an element is kept when the hash's top
    24 bits are >= cut = round(p * 2^24); cut 0 is no dropout."""
    if p == 0.0:
        return 0, 1.0, 0, 0
    seed1, seed2 = seeds.tolist()
    return max(1, round(p * 2**24)), 1.0 / (1.0 - p), seed1, seed2


def _mix_(h: Tensor) -> Tensor:
    """group_norm_silu.cpp's mix() (Wellons' lowbias32), in place on an int64 tensor of uint32
    values, exact: the second multiplier is taken as its negative residue mod 2^32, so that
    neither product leaves the int64 range."""
    h.bitwise_xor_(h >> 16).mul_(0x7FEB352D).bitwise_and_(M32)
    h.bitwise_xor_(h >> 15).mul_(0x846CA68B - 2**32).bitwise_and_(M32)
    return h.bitwise_xor_(h >> 16)


def dropout_mask(shape: torch.Size, p: float, seeds: Tensor) -> Tensor:
    """The kernel's dropout multiplier of each element of a map of `shape` (NCHW index order):
    1/(1-p) in float32 where kept, 0 where dropped."""
    cut, scale, seed1, seed2 = _dropout_args(p, seeds)
    h = torch.arange(seed1, seed1 + shape.numel(), dtype=torch.int64).bitwise_and_(M32)
    keep = _mix_(_mix_(h).bitwise_xor_(seed2)).bitwise_right_shift_(8) >= cut
    return keep.view(shape).float() * scale


def _dropout(y: Tensor, p: float) -> Tensor:
    """The fallback's dropout: the kernel's mask on the CPU, F.dropout (torch's own mask) elsewhere."""
    if not y.is_cpu:
        return F.dropout(y, p)
    return (y * dropout_mask(y.shape, p, _draw_seeds(p))).to(y.dtype)


def _check_forward(x: Tensor, weight: Tensor, bias: Tensor, shift: Optional[Tensor], groups: int, dropout: float,
                   seeds: Tensor) -> None:
    """What the kernel assumes of its forward's arguments; ValueError on anything else."""
    if x.dim() != 4:
        raise ValueError(f"x must be a 4-d (batch, channels, height, width) map, got shape {tuple(x.shape)}")
    b, c = x.shape[:2]
    layout = _layout(x)
    if layout is None:
        raise ValueError(f"x must be contiguous or channels_last-contiguous, got strides {x.stride()}")
    expect("x", x, x.shape, DTYPES, layout)
    if groups <= 0 or c % groups:
        raise ValueError(f"groups must divide x's {c} channels, got {groups}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    expect("weight", weight, (c,))
    expect("bias", bias, (c,))
    if shift is not None:
        expect("shift", shift, (b, c))
    expect("seeds", seeds, (2,), (torch.int64,))


def _forward_outputs(x: Tensor, groups: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """y (x's dtype and layout), mean and rstd (B, G), x's per-channel sums (B, C)."""
    b, c = x.shape[:2]
    return torch.empty_like(x), floats(b, groups), floats(b, groups), floats(b, c)


def _forward_fake(x: Tensor, weight: Tensor, bias: Tensor, shift: Optional[Tensor], groups: int, eps: float,
                  silu: bool, dropout: float, seeds: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_forward(x, weight, bias, shift, groups, dropout, seeds)
    return _forward_outputs(x, groups)


@cpu_operator(fake=_forward_fake)
def group_norm_silu_fwd(x: Tensor, weight: Tensor, bias: Tensor, shift: Optional[Tensor], groups: int, eps: float,
                        silu: bool, dropout: float, seeds: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, rstd, xsum): y = dropout(silu(group_norm(x + shift[:, :, None, None]))) with SiLU
    only if `silu` and the dropout's mask hashed from `seeds`; the rest is what the backward needs.
    x (B, C, H, W) float32 or bfloat16, NCHW or channels_last; weight, bias (C,), shift (B, C) or
    None and the outputs other than y are float32."""
    _check_forward(x, weight, bias, shift, groups, dropout, seeds)
    b, c, h, w = x.shape
    y, mean, rstd, xsum = _forward_outputs(x, groups)
    kernels().group_norm_silu_forward(DTYPES[x.dtype], x.data_ptr(), _pointer(shift), weight.data_ptr(),
                                      bias.data_ptr(), y.data_ptr(), mean.data_ptr(), rstd.data_ptr(), xsum.data_ptr(),
                                      b, c, h * w, groups, eps, _layout(x) == torch.channels_last, silu,
                                      *_dropout_args(dropout, seeds))
    return y, mean, rstd, xsum


def _check_backward(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor, shift: Optional[Tensor], mean: Tensor,
                    rstd: Tensor, xsum: Tensor, groups: int, dropout: float, seeds: Tensor) -> None:
    """The forward's checks, and the incoming gradient and saved statistics against x."""
    _check_forward(x, weight, bias, shift, groups, dropout, seeds)
    b, c = x.shape[:2]
    expect("dy", dy, x.shape, (x.dtype,), _layout(x))
    expect("mean", mean, (b, groups))
    expect("rstd", rstd, (b, groups))
    expect("xsum", xsum, (b, c))


def _backward_fake(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor, shift: Optional[Tensor], mean: Tensor,
                   rstd: Tensor, xsum: Tensor, groups: int, silu: bool, dropout: float,
                   seeds: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_backward(dy, x, weight, bias, shift, mean, rstd, xsum, groups, dropout, seeds)
    b, c = x.shape[:2]
    return torch.empty_like(x), floats(c), floats(c), floats(b, c)


@cpu_operator(fake=_backward_fake)
def group_norm_silu_bwd(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor, shift: Optional[Tensor], mean: Tensor,
                        rstd: Tensor, xsum: Tensor, groups: int, silu: bool, dropout: float,
                        seeds: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias, dshift) from dy, the gradient of group_norm_silu_fwd's y, given the
    forward's inputs and statistics (the same seeds redraw the same mask). dshift is the gradient
    of a shift of zeros when shift is None."""
    _check_backward(dy, x, weight, bias, shift, mean, rstd, xsum, groups, dropout, seeds)
    b, c, h, w = x.shape
    dx, dweight_rows, dbias_rows, dshift = torch.empty_like(x), floats(b, c), floats(b, c), floats(b, c)
    kernels().group_norm_silu_backward(DTYPES[x.dtype], x.data_ptr(), _pointer(shift), xsum.data_ptr(), dy.data_ptr(),
                                       weight.data_ptr(), bias.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
                                       dx.data_ptr(), dweight_rows.data_ptr(), dbias_rows.data_ptr(), dshift.data_ptr(),
                                       b, c, h * w, groups, _layout(x) == torch.channels_last, silu,
                                       *_dropout_args(dropout, seeds))
    return dx, dweight_rows.sum(0), dbias_rows.sum(0), dshift


class _FusedGroupNormSiLU(torch.autograd.Function):
    """The operators' autograd: the forward saves what the backward operator takes."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, shift: Optional[Tensor], groups: int, eps: float,
                silu: bool, dropout: float, seeds: Tensor) -> Tensor:  # type: ignore[override]
        y, mean, rstd, xsum = group_norm_silu_fwd(x, weight, bias, shift, groups, eps, silu, dropout, seeds)
        ctx.save_for_backward(x, weight, bias, shift, mean, rstd, xsum, seeds)
        ctx.groups, ctx.silu, ctx.dropout = groups, silu, dropout
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: Tensor) -> tuple[Optional[Tensor], ...]:  # type: ignore[override]
        x, weight, bias, shift, mean, rstd, xsum, seeds = ctx.saved_tensors
        dy = dy.to(x.dtype).contiguous(memory_format=_layout(x))
        dx, dweight, dbias, dshift = group_norm_silu_bwd(dy, x, weight, bias, shift, mean, rstd, xsum, ctx.groups,
                                                         ctx.silu, ctx.dropout, seeds)
        return dx, dweight, dbias, dshift if shift is not None else None, None, None, None, None, None


class GroupNormSiLU(nn.GroupNorm):
    """nn.GroupNorm followed by SiLU when `silu` (else plain GroupNorm), then, in training, dropout
    with probability `dropout` (which needs the SiLU: the networks' order), fused on the CPU.
    forward(x, shift) normalises x + shift[:, :, None, None]: a ResBlock's embedding, added
    without a pass over the map of its own."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, silu: bool = True,
                 dropout: float = 0.0):
        super().__init__(num_groups, num_channels, eps)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if dropout and not silu:
            raise ValueError("GroupNormSiLU applies dropout after its SiLU; it needs silu=True")
        self.silu, self.dropout = silu, dropout

    def forward(self, x: Tensor, shift: Optional[Tensor] = None) -> Tensor:
        p = self.dropout if self.training else 0.0
        if x.dim() == 4 and x.dtype in DTYPES and _layout(x) is not None and usable(x):
            shift = shift.float().contiguous() if shift is not None else None
            return _FusedGroupNormSiLU.apply(x, self.weight.float(), self.bias.float(), shift, self.num_groups,
                                             self.eps, self.silu, p, _draw_seeds(p))
        if shift is not None:
            x = x + shift[:, :, None, None]
        y = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        y = F.silu(y) if self.silu else y
        return _dropout(y, p) if p else y

    def extra_repr(self) -> str:
        return (super().extra_repr() + (", silu=True" if self.silu else "")
                + (f", dropout={self.dropout}" if self.dropout else ""))
