"""Multi-head self-attention over packed q/k/v tokens: a CPU kernel, with torch's SDPA as the fallback.

`attention(qkv, heads)` takes the projection's (B, L, 3*C) tokens, laid out (three, head,
channel) along the last axis, and returns the (B, L, C) mix of the heads' outputs. On the CPU it
runs attention.cpp: the q/k/v head views are read in place, the output and the gradient are
written in the layouts around it (no head-splitting copies), and its register-tiled products run
~2x torch's scaled_dot_product_attention at diffusion sizes (fwd+bwd of 32x4 heads of 256x64:
23 ms against 48). It computes in float32 whatever the autocast dtype: faster there, and the
softmax is more exact. Elsewhere (CUDA, float64, torch.compile, no kernel,
DIFFLAB_FUSED_KERNELS=0) it is scaled_dot_product_attention, in float32 on the CPU too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from difflab.models.cpu_kernels import f32, floats, library, usable


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv: Tensor, heads: int) -> Tensor:  # type: ignore[override]
        b, n, c3 = qkv.shape
        d = c3 // 3 // heads
        ctx.shape = (b, n, heads, d, d ** -0.5)  # the kernels' B, L, H, D, scale
        out, lse = floats(b, n, c3 // 3), floats(b, heads, n)
        library().attention_forward(f32(qkv), f32(out), f32(lse), *ctx.shape)
        ctx.save_for_backward(qkv, out, lse)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        qkv, out, lse = ctx.saved_tensors
        dout = dout.float().contiguous()
        dqkv = torch.empty_like(qkv)
        library().attention_backward(f32(qkv), f32(out), f32(dout), f32(lse), f32(dqkv), *ctx.shape)
        return dqkv, None


def attention(qkv: Tensor, heads: int) -> Tensor:
    """softmax(q k^T / sqrt(d)) v per head, for qkv (B, L, 3*C) as "b n (three h d)"; (B, L, C) out."""
    if qkv.dim() != 3 or qkv.shape[-1] % (3 * heads):
        raise ValueError(f"attention takes (batch, tokens, 3 x {heads} heads x head width) tokens, got {tuple(qkv.shape)}")
    if qkv.device.type == "cpu" and qkv.dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", enabled=False):  # float32 on the CPU: faster there, a more exact softmax
            return attention(qkv.float(), heads).to(qkv.dtype)
    if qkv.dtype == torch.float32 and usable(qkv):
        return _Attention.apply(qkv.contiguous(), heads)
    q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=heads)
    return rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)")
