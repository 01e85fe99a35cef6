"""GroupNorm (+ SiLU (+ dropout)) as one fused CPU kernel, with torch's own layers as the fallback.

`GroupNormSiLU` is an nn.GroupNorm (same parameters and checkpoint keys) that applies SiLU to its
output when `silu` is set, and then, in training, dropout with probability `dropout`. On CPU
float32/bfloat16 maps, NCHW or channels_last, forward and backward run in group_norm_silu.cpp:
one kernel instead of three, a channels_last path that torch lacks in practice (its
channels_last GroupNorm is 2-3x its NCHW one in float32, ~40x in bfloat16), which is what lets
the runs train channels_last, and a dropout mask hashed from two seeds drawn from torch's
generator (so torch.manual_seed reproduces it), recomputed by the backward rather than stored.
Everywhere else (CUDA, float16, torch.compile, no C++ compiler, DIFFLAB_FUSED_KERNELS=0) it is
F.group_norm, F.silu and F.dropout.

The kernel is built on first use (cpu_kernels.py); where it cannot be, one warning and the fallback.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.models.cpu_kernels import f32, floats, library, usable

DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def _layout(x: Tensor) -> Optional[bool]:
    """True for channels_last, False for NCHW, None for any other strides."""
    if x.is_contiguous():
        return False
    if x.is_contiguous(memory_format=torch.channels_last):
        return True
    return None


def _dropout_args(p: float) -> tuple[int, float, int, int]:
    """(cut, scale, seed1, seed2) of the kernel's dropout; p = 0 gives none."""
    if p == 0.0:
        return 0, 1.0, 0, 0
    seeds = torch.randint(0, 2**32, (2,), dtype=torch.int64).tolist()  # torch's generator: manual_seed applies
    return max(1, round(p * 2**24)), 1.0 / (1.0 - p), seeds[0], seeds[1]


class _FusedGroupNormSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, shift: Optional[Tensor], groups: int, eps: float,
                silu: bool, channels_last: bool, dropout: float) -> Tensor:
        b, c, h, w = x.shape
        gamma, beta = weight.detach().float().contiguous(), bias.detach().float().contiguous()
        shift32 = shift.detach().float().contiguous() if shift is not None else None
        mean, rstd = floats(b, groups), floats(b, groups)
        xsum = floats(b, c) if shift is not None else None
        y = torch.empty_like(x)  # keeps x's layout
        drop = _dropout_args(dropout)
        library().group_norm_silu_forward(DTYPES[x.dtype], x.data_ptr(), f32(shift32), f32(gamma), f32(beta),
                                          y.data_ptr(), f32(mean), f32(rstd), f32(xsum), b, c, h * w, groups, eps,
                                          channels_last, silu, *drop)
        ctx.save_for_backward(x, gamma, beta, mean, rstd, shift32, xsum)
        ctx.groups, ctx.silu, ctx.channels_last, ctx.drop = groups, silu, channels_last, drop
        ctx.param_dtype = weight.dtype
        ctx.shift_dtype = shift.dtype if shift is not None else None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout: Tensor):
        x, gamma, beta, mean, rstd, shift32, xsum = ctx.saved_tensors
        b, c, h, w = x.shape
        fmt = torch.channels_last if ctx.channels_last else torch.contiguous_format
        dout = dout.to(x.dtype).contiguous(memory_format=fmt)
        dx = torch.empty_like(x)
        dgamma_rows, dbeta_rows = floats(b, c), floats(b, c)
        dshift = floats(b, c) if shift32 is not None else None
        library().group_norm_silu_backward(DTYPES[x.dtype], x.data_ptr(), f32(shift32), f32(xsum), dout.data_ptr(),
                                           f32(gamma), f32(beta), f32(mean), f32(rstd), dx.data_ptr(),
                                           f32(dgamma_rows), f32(dbeta_rows), f32(dshift), b, c, h * w,
                                           ctx.groups, ctx.channels_last, ctx.silu, *ctx.drop)
        dw = dgamma_rows.sum(0).to(ctx.param_dtype) if ctx.needs_input_grad[1] else None
        db = dbeta_rows.sum(0).to(ctx.param_dtype) if ctx.needs_input_grad[2] else None
        ds = dshift.to(ctx.shift_dtype) if ctx.needs_input_grad[3] else None
        return dx, dw, db, ds, None, None, None, None, None


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
        layout = _layout(x) if x.dim() == 4 else None
        if layout is not None and x.dtype in DTYPES and usable(x):
            return _FusedGroupNormSiLU.apply(x, self.weight, self.bias, shift, self.num_groups, self.eps, self.silu,
                                             layout, p)
        if shift is not None:
            x = x + shift[:, :, None, None]
        y = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        y = F.silu(y) if self.silu else y
        return F.dropout(y, p) if p else y

    def extra_repr(self) -> str:
        return (super().extra_repr() + (", silu=True" if self.silu else "")
                + (f", dropout={self.dropout}" if self.dropout else ""))
