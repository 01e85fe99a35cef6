"""Multi-head self-attention over packed q/k/v tokens: a CPU kernel, with torch's SDPA as the fallback.

`attention(qkv, heads)` takes the projection's (B, L, 3*C) tokens, laid out (three, head,
channel) along the last axis, and returns the (B, L, C) mix of the heads' outputs. On the CPU it
runs attention.cpp: the q/k/v head views are read in place, the output and the gradient are
written in the layouts around it (no head-splitting copies), and its register-tiled products run
~2x torch's scaled_dot_product_attention at diffusion sizes (fwd+bwd of 32x4 heads of 256x64:
23 ms against 48). It computes in float32 whatever the autocast dtype: faster there, and the
softmax is more exact. Elsewhere (CUDA, float64, no kernel, DIFFLAB_FUSED_KERNELS=0) it is
scaled_dot_product_attention, in float32 on the CPU too.

The kernel is reached through the typed operators difflab::attention_fwd and
difflab::attention_bwd, which check every tensor before the C code sees a pointer and have fake
implementations, so torch.compile traces them (and calls the kernel from the compiled graph).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from difflab.models.cpu_kernels import cpu_operator, expect, floats, kernels, usable


def _split(qkv: Tensor, heads: int) -> tuple[int, int, int]:
    """(batch, tokens, head width) of (B, L, 3 * heads * width) tokens; ValueError for other shapes."""
    if heads <= 0 or qkv.dim() != 3 or qkv.shape[-1] % (3 * heads):
        raise ValueError(f"attention takes (batch, tokens, 3 x {heads} heads x head width) tokens, "
                         f"got {tuple(qkv.shape)}")
    b, n, c3 = qkv.shape
    return b, n, c3 // 3 // heads


def _check_forward(qkv: Tensor, heads: int) -> tuple[int, int, int]:
    """What the kernel assumes of the tokens (float32, CPU, contiguous); their (B, L, D)."""
    b, n, d = _split(qkv, heads)
    expect("qkv", qkv, qkv.shape)
    return b, n, d


def _forward_fake(qkv: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    b, n, d = _check_forward(qkv, heads)
    return floats(b, n, heads * d), floats(b, heads, n)


@cpu_operator(fake=_forward_fake)
def attention_fwd(qkv: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    """(out, lse): out (B, L, heads * D) the attention over qkv (B, L, 3 * heads * D), float32 and
    contiguous, and lse (B, heads, L) the rows' log-sum-exp, which the backward needs."""
    b, n, d = _check_forward(qkv, heads)
    out, lse = floats(b, n, heads * d), floats(b, heads, n)
    kernels().attention_forward(qkv.data_ptr(), out.data_ptr(), lse.data_ptr(), b, n, heads, d, d ** -0.5)
    return out, lse


def _check_backward(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, heads: int) -> tuple[int, int, int]:
    """The forward's checks, and the output, its gradient and the log-sum-exp against qkv."""
    b, n, d = _check_forward(qkv, heads)
    expect("out", out, (b, n, heads * d))
    expect("dout", dout, (b, n, heads * d))
    expect("lse", lse, (b, heads, n))
    return b, n, d


def _backward_fake(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, heads: int) -> Tensor:
    _check_backward(dout, qkv, out, lse, heads)
    return torch.empty_like(qkv)


@cpu_operator(fake=_backward_fake)
def attention_bwd(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, heads: int) -> Tensor:
    """dqkv, laid out as qkv, from dout, the gradient of attention_fwd's out, and its out and lse."""
    b, n, d = _check_backward(dout, qkv, out, lse, heads)
    dqkv = torch.empty_like(qkv)
    kernels().attention_backward(qkv.data_ptr(), out.data_ptr(), dout.data_ptr(), lse.data_ptr(), dqkv.data_ptr(), b, n,
                                 heads, d, d ** -0.5)
    return dqkv


class _Attention(torch.autograd.Function):
    """The operators' autograd: the forward saves what the backward operator takes."""

    @staticmethod
    def forward(ctx, qkv: Tensor, heads: int) -> Tensor:  # type: ignore[override]
        out, lse = attention_fwd(qkv, heads)
        ctx.save_for_backward(qkv, out, lse)
        ctx.heads = heads
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        qkv, out, lse = ctx.saved_tensors
        return attention_bwd(dout.float().contiguous(), qkv, out, lse, ctx.heads), None


def attention(qkv: Tensor, heads: int) -> Tensor:
    """softmax(q k^T / sqrt(d)) v per head, for qkv (B, L, 3*C) as "b n (three h d)"; (B, L, C) out."""
    _split(qkv, heads)
    if qkv.device.type == "cpu" and qkv.dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", enabled=False):  # float32 on the CPU: faster there, a more exact softmax
            return attention(qkv.float(), heads).to(qkv.dtype)
    if qkv.dtype == torch.float32 and usable(qkv):
        return _Attention.apply(qkv.contiguous(), heads)
    q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=heads)
    return rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)")


def cross_attention(q: Tensor, kv: Tensor, heads: int, mask: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(d)) v per head for queries q (B, N, C) over context tokens kv (B, L, 2*C)
    laid out "b l (two h d)", skipping the context positions where mask (B, L, bool) is False; (B, N, C) out.
    torch's SDPA: the context is a handful of tokens, too short for the self-attention kernel to pay."""
    if heads <= 0 or q.shape[-1] % heads or kv.shape[-1] != 2 * q.shape[-1]:
        raise ValueError(f"cross_attention takes (B, N, {heads} heads x width) queries and (B, L, 2 x that) "
                         f"keys/values, got {tuple(q.shape)} and {tuple(kv.shape)}")
    dtype = q.dtype
    if q.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        q, kv = q.float(), kv.float()  # float32 on the CPU, as the self-attention
    k, v = rearrange(kv, "b l (two h d) -> two b h l d", two=2, h=heads)
    q = rearrange(q, "b n (h d) -> b h n d", h=heads)
    attn_mask = None if mask is None else mask[:, None, None, :].to(torch.bool)
    with torch.autocast(q.device.type, enabled=False):
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=attn_mask)
    return rearrange(out, "b h n d -> b n (h d)").to(dtype)


def attention_weights(q: Tensor, kv: Tensor, heads: int, mask: Tensor | None = None) -> Tensor:
    """The (B, heads, N, L) attention probabilities cross_attention mixes the values with (for pictures and tests)."""
    k, _ = rearrange(kv, "b l (two h d) -> two b h l d", two=2, h=heads)
    q = rearrange(q, "b n (h d) -> b h n d", h=heads)
    scores = torch.einsum("bhnd,bhld->bhnl", q.float(), k.float()) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :].to(torch.bool), float("-inf"))
    return scores.softmax(-1)
