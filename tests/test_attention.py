"""The CPU attention kernel (models/attention.cpp) against torch's scaled_dot_product_attention:
outputs and gradients in float32 (1e-5 relative) over awkward shapes, bfloat16 autocast, extreme
logits, thread counts, and every fallback."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from difflab.models import cpu_kernels
from difflab.models.attention import attention
from difflab.models.layers import AttentionBlock

needs_kernel = pytest.mark.skipif(cpu_kernels.library() is None, reason="no C++ compiler here to build the kernel")

# (batch, tokens, heads, head channels): below and above the 64-query block and the 8-row
# register tile, head widths that are not a multiple of the 32-wide column panel, one token.
SHAPES = [(2, 49, 1, 32), (3, 37, 2, 24), (2, 256, 4, 64), (1, 1, 1, 8), (2, 130, 3, 40), (1, 200, 2, 16)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def sdpa(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c3 = qkv.shape
    q, k, v = qkv.view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c3 // 3)


def output_and_grad(fn, qkv: torch.Tensor, heads: int, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = qkv.detach().clone().requires_grad_()
    out = fn(x, heads)
    (dx,) = torch.autograd.grad(out, x, grad)
    return out.detach(), dx


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_sdpa_in_float32(shape) -> None:
    b, n, heads, d = shape
    torch.manual_seed(0)
    qkv, grad = torch.randn(b, n, 3 * heads * d), torch.randn(b, n, heads * d)
    out, dx = output_and_grad(attention, qkv, heads, grad)
    ref, ref_dx = output_and_grad(sdpa, qkv, heads, grad)
    assert out.shape == (b, n, heads * d) and dx.shape == qkv.shape
    assert rel_err(out, ref) < 1e-5
    assert rel_err(dx, ref_dx) < 1e-5


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES)
def test_saturated_softmax_is_as_exact_as_sdpa(shape) -> None:
    """Logits in the thousands: float32 itself loses digits here (both kernels ~1e-4 off the
    float64 result in the gradient), so the kernel must be finite and no worse than SDPA."""
    b, n, heads, d = shape
    torch.manual_seed(0)
    qkv, grad = torch.randn(b, n, 3 * heads * d) * 30, torch.randn(b, n, heads * d)
    exact = output_and_grad(sdpa, qkv.double(), heads, grad.double())
    ours = output_and_grad(attention, qkv, heads, grad)
    theirs = output_and_grad(sdpa, qkv, heads, grad)
    for a, b_, e in zip(ours, theirs, exact):
        assert torch.isfinite(a).all()
        assert rel_err(a, e) <= 1.5 * rel_err(b_, e) + 1e-6


@needs_kernel
def test_non_contiguous_tokens_and_gradient() -> None:
    torch.manual_seed(0)
    qkv = torch.randn(2, 40, 2 * 3 * 32)[:, :, ::2]  # strided last axis
    grad = torch.randn(2, 32, 40).transpose(1, 2)
    out, dx = output_and_grad(attention, qkv, 1, grad)
    ref, ref_dx = output_and_grad(sdpa, qkv.contiguous(), 1, grad)
    assert rel_err(out, ref) < 1e-5 and rel_err(dx, ref_dx) < 1e-5


@needs_kernel
def test_same_result_on_any_number_of_threads() -> None:
    torch.manual_seed(0)
    qkv, grad = torch.randn(3, 70, 3 * 2 * 16), torch.randn(3, 70, 2 * 16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = output_and_grad(attention, qkv, 2, grad)
        torch.set_num_threads(max(2, threads))
        many = output_and_grad(attention, qkv, 2, grad)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, many))


def test_runs_in_float32_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    qkv = torch.randn(2, 49, 3 * 4 * 16)
    exact = sdpa(qkv, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(qkv.bfloat16(), 4)
    assert out.dtype == torch.bfloat16
    assert rel_err(out.float(), exact) < 2e-2  # only the bf16 inputs and outputs round


def test_kernels_off_and_float64_use_sdpa(monkeypatch) -> None:
    torch.manual_seed(0)
    qkv, grad = torch.randn(2, 30, 3 * 2 * 8, dtype=torch.float64), torch.randn(2, 30, 16, dtype=torch.float64)
    out, dx = output_and_grad(attention, qkv, 2, grad)
    assert out.dtype == torch.float64
    assert all(torch.equal(a, b) for a, b in zip((out, dx), output_and_grad(sdpa, qkv, 2, grad)))
    monkeypatch.setenv("DIFFLAB_FUSED_KERNELS", "0")
    qkv, grad = qkv.float(), grad.float()
    assert all(torch.equal(a, b) for a, b in zip(output_and_grad(attention, qkv, 2, grad),
                                                 output_and_grad(sdpa, qkv, 2, grad)))


@needs_kernel
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_attention_block_trains_like_the_sdpa_block(monkeypatch, memory_format) -> None:
    """A whole block, forward and every parameter's gradient, with the kernel and with SDPA."""
    torch.manual_seed(0)
    block = AttentionBlock(64, head_channels=16, norm_groups=8)
    for p in block.parameters():  # proj_out starts at zero, which would hide the attention
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 64, 7, 9).contiguous(memory_format=memory_format)

    def run() -> list[torch.Tensor]:
        xx = x.detach().clone().requires_grad_()
        out = block(xx)
        grads = torch.autograd.grad(out.square().sum(), [xx, *block.parameters()])
        return [out.detach(), *grads]

    fused = run()
    monkeypatch.setenv("DIFFLAB_FUSED_KERNELS", "0")
    plain = run()
    for a, b in zip(fused, plain):
        assert rel_err(a, b) < 1e-5


@needs_kernel
def test_float64_default_dtype_does_not_reach_the_kernel_buffers() -> None:
    torch.manual_seed(0)
    qkv, grad = torch.randn(2, 20, 3 * 16), torch.randn(2, 20, 16)
    expected = output_and_grad(sdpa, qkv, 1, grad)
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        got = output_and_grad(attention, qkv, 1, grad)
    finally:
        torch.set_default_dtype(default)
    for a, b in zip(got, expected):
        assert a.dtype == torch.float32 and rel_err(a, b) < 1e-5


def test_tokens_that_do_not_split_into_heads_are_refused() -> None:
    with pytest.raises(ValueError, match="3 x 2 heads"):
        attention(torch.randn(2, 10, 3 * 2 * 8 + 1), 2)
    with pytest.raises(ValueError, match="tokens"):
        attention(torch.randn(2, 3, 4, 48), 2)
