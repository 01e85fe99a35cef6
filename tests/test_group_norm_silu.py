"""The fused CPU GroupNorm(+SiLU(+dropout)) kernel against torch's GroupNorm, SiLU and dropout:
outputs and all gradients, both layouts, float32 (1e-5 relative) and bfloat16 (no worse than
torch's own bf16 layers), the dropout's statistics and mask, checkpoint names, and every fallback
(kernels off, no compiler, other dtypes)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from difflab.models import cpu_kernels
from difflab.models.group_norm_silu import GroupNormSiLU
from difflab.models.layers import ModelConfigError, ResBlock

FORMATS = [torch.contiguous_format, torch.channels_last]
SHAPES = [((2, 8, 5, 7), 4), ((4, 64, 16, 16), 32), ((3, 96, 1, 1), 32), ((1, 6, 9, 3), 3)]

needs_kernel = pytest.mark.skipif(cpu_kernels.library() is None, reason="no C++ compiler here to build the fused kernel")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def layer(channels: int, groups: int, silu: bool) -> GroupNormSiLU:
    torch.manual_seed(0)
    m = GroupNormSiLU(groups, channels, silu=silu)
    torch.nn.init.normal_(m.weight, 1.0, 0.3)
    torch.nn.init.normal_(m.bias, 0.0, 0.3)
    return m


def run(m: GroupNormSiLU, x: torch.Tensor, grad: torch.Tensor, fn=None) -> list[torch.Tensor]:
    """Output, dx, dweight, dbias of one forward + backward, through `fn` (default: the layer)."""
    x = x.detach().clone().requires_grad_()
    m.zero_grad(set_to_none=True)
    out = (fn or m)(x)
    out.backward(grad)
    return [out, x.grad, m.weight.grad, m.bias.grad]


def plain(m: GroupNormSiLU):
    def fn(x: torch.Tensor) -> torch.Tensor:
        y = F.group_norm(x, m.num_groups, m.weight, m.bias, m.eps)
        return F.silu(y) if m.silu else y
    return fn


@needs_kernel
@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("memory_format", FORMATS)
@pytest.mark.parametrize("shape,groups", SHAPES)
def test_float32_matches_group_norm_then_silu(shape, groups: int, memory_format, silu: bool) -> None:
    m = layer(shape[1], groups, silu)
    torch.manual_seed(1)
    x = (torch.randn(shape) * 2 + 0.5).contiguous(memory_format=memory_format)
    grad = torch.randn(shape).contiguous(memory_format=memory_format)
    fused, ref = run(m, x, grad), run(m, x, grad, plain(m))
    for name, a, b in zip(("output", "dx", "dweight", "dbias"), fused, ref):
        assert rel_err(a, b) < 1e-5, name
    assert fused[0].is_contiguous(memory_format=memory_format)
    assert fused[1].is_contiguous(memory_format=memory_format)


@needs_kernel
@pytest.mark.parametrize("memory_format", FORMATS)
def test_bfloat16_is_as_accurate_as_torchs_bf16_layers(memory_format) -> None:
    shape, groups = (8, 64, 14, 14), 32
    m = layer(shape[1], groups, True)
    torch.manual_seed(1)
    x32 = torch.randn(shape) * 2 + 0.5
    x = x32.bfloat16().contiguous(memory_format=memory_format)
    grad = torch.randn(shape).bfloat16().contiguous(memory_format=memory_format)
    exact = run(m, x.float(), grad.float(), plain(m))  # float32 maths on the same bf16 inputs
    fused, torch_bf16 = run(m, x, grad), run(m, x.contiguous(), grad.contiguous(), plain(m))
    assert fused[0].dtype == torch.bfloat16
    for name, a, b, e in zip(("output", "dx", "dweight", "dbias"), fused, torch_bf16, exact):
        assert rel_err(a, e) <= max(2 * rel_err(b, e), 1e-5), name


@needs_kernel
def test_deterministic_across_thread_counts() -> None:
    m = layer(64, 32, True)
    x = torch.randn(6, 64, 9, 9).contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(x)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(m, x, grad)
        torch.set_num_threads(max(2, threads))
        many = run(m, x, grad)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


@needs_kernel
def test_float64_default_dtype_does_not_reach_the_kernel_buffers() -> None:
    m = layer(16, 4, True)
    x, grad = torch.randn(2, 16, 6, 6), torch.randn(2, 16, 6, 6)
    expected = run(m, x, grad, plain(m))
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        got = run(m, x, grad)
    finally:
        torch.set_default_dtype(default)
    for a, b in zip(got, expected):
        assert a.dtype == torch.float32 and rel_err(a, b) < 1e-5


def test_kernels_off_gives_the_plain_layers(monkeypatch) -> None:
    monkeypatch.setenv("DIFFLAB_FUSED_KERNELS", "0")
    m = layer(16, 4, True)
    x, grad = torch.randn(2, 16, 6, 6), torch.randn(2, 16, 6, 6)
    for a, b in zip(run(m, x, grad), run(m, x, grad, plain(m))):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_other_dtypes_and_strides_fall_back(dtype) -> None:
    m = layer(16, 4, True).to(dtype)
    x = torch.randn(2, 16, 6, 6, dtype=dtype)
    grad = torch.randn_like(x)
    for a, b in zip(run(m, x, grad), run(m, x, grad, plain(m))):
        assert torch.equal(a, b)
    strided = torch.randn(2, 16, 6, 12)[..., ::2]  # neither NCHW- nor channels_last-contiguous
    m32 = layer(16, 4, True)
    assert torch.allclose(m32(strided), plain(m32)(strided), atol=1e-6)


def test_no_compiler_warns_once_and_falls_back(monkeypatch, caplog, tmp_path) -> None:
    monkeypatch.setenv("CXX", "no-such-compiler-difflab")
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_kernels, "_tried", False)
    monkeypatch.setattr(cpu_kernels, "_library", None)
    with caplog.at_level(logging.WARNING, logger="difflab"):
        m = layer(16, 4, True)
        x, grad = torch.randn(2, 16, 6, 6), torch.randn(2, 16, 6, 6)
        fused, ref = run(m, x, grad), run(m, x, grad, plain(m))
        run(m, x, grad)
    assert cpu_kernels.library() is None
    assert sum("no C++ compiler" in r.message for r in caplog.records) == 1
    for a, b in zip(fused, ref):
        assert torch.equal(a, b)


@needs_kernel
def test_builds_into_the_cache_and_reuses_it(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_kernels, "_tried", False)
    monkeypatch.setattr(cpu_kernels, "_library", None)
    assert cpu_kernels.library() is not None
    built = list((tmp_path / "kernels").glob("difflab_kernels-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(cpu_kernels, "_tried", False)
    assert cpu_kernels.library() is not None
    assert built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt
    assert not [p for p in (tmp_path / "kernels").iterdir() if p != built[0]]  # no temporary left behind


def test_checkpoint_names_are_those_of_separate_norm_and_silu() -> None:
    block = ResBlock(32, 64, emb_dim=16, dropout=0.1, norm_groups=8)
    assert set(block.state_dict()) == {
        "in_layers.0.weight", "in_layers.0.bias", "in_layers.2.weight", "in_layers.2.bias",
        "emb_proj.weight", "emb_proj.bias",
        "out_layers.0.weight", "out_layers.0.bias", "out_layers.3.weight", "out_layers.3.bias",
        "skip.weight", "skip.bias",
    }


def dropout_layer(p: float) -> GroupNormSiLU:
    m = GroupNormSiLU(8, 32, dropout=p)
    torch.nn.init.normal_(m.weight, 1.0, 0.3)
    torch.nn.init.normal_(m.bias, 0.0, 0.3)
    return m.train()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("memory_format", FORMATS)
def test_dropout_keeps_1_minus_p_scaled_with_its_own_mask_in_backward(memory_format, dtype) -> None:
    m = dropout_layer(0.1)
    x = torch.randn(64, 32, 16, 16).to(dtype).contiguous(memory_format=memory_format).requires_grad_()
    grad = torch.randn(x.shape).to(dtype).contiguous(memory_format=memory_format)
    torch.manual_seed(3)
    out = m(x)
    m.eval()
    clean = m(x).detach()  # the same layer without dropout
    m.train()
    dropped = (out == 0) & (clean != 0)
    kept_share = 1 - dropped.float().mean().item()
    assert abs(kept_share - 0.9) < 0.005  # 524k draws: 3 sigma is 0.0013
    scale = out[~dropped].float() / clean[~dropped].float()
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert torch.allclose(scale, torch.full_like(scale, 1 / 0.9), rtol=tol)
    # backward: the reference is GroupNorm -> SiLU times the very mask the kernel drew
    mask = (~dropped).to(dtype) / 0.9
    (dx,) = torch.autograd.grad(out, x, grad)
    ref_x = x.detach().float().requires_grad_()
    ref = F.silu(F.group_norm(ref_x, 8, m.weight, m.bias, m.eps)) * mask.float()
    (ref_dx,) = torch.autograd.grad(ref, ref_x, grad.float())
    assert rel_err(dx, ref_dx) < (1e-5 if dtype == torch.float32 else 2e-2)


@needs_kernel
def test_dropout_masks_follow_torch_manual_seed_and_differ_per_call() -> None:
    m = dropout_layer(0.3)
    x = torch.randn(4, 32, 8, 8)
    torch.manual_seed(7)
    first, second = m(x), m(x)
    torch.manual_seed(7)
    again = m(x)
    assert torch.equal(first, again)
    assert not torch.equal((first == 0), (second == 0))
    no_dropout = GroupNormSiLU(8, 32)
    no_dropout.load_state_dict(m.state_dict())
    assert torch.equal(m.eval()(x), no_dropout(x))  # evaluation mode drops nothing


def test_dropout_falls_back_to_torch_and_rejects_bad_probability(monkeypatch) -> None:
    monkeypatch.setenv("DIFFLAB_FUSED_KERNELS", "0")
    m = dropout_layer(0.5)
    out = m(torch.ones(8, 32, 4, 4))
    assert 0.4 < (out == 0).float().mean().item() < 0.6
    with pytest.raises(ModelConfigError, match=r"unet.dropout must be in \[0, 1\)"):
        ResBlock(8, 8, dropout=1.0, norm_groups=4)
    with pytest.raises(ValueError, match="needs silu=True"):
        GroupNormSiLU(4, 8, silu=False, dropout=0.1)


@needs_kernel
@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("memory_format", FORMATS)
def test_shift_is_added_before_normalising(memory_format, dropout: float) -> None:
    """forward(x, shift) is GroupNorm(x + shift[:, :, None, None]) -> SiLU (-> dropout), with the
    gradients of x, shift, weight and bias; the dropout mask is read off the fused output."""
    m = dropout_layer(dropout) if dropout else layer(32, 8, True)
    torch.manual_seed(2)
    x = (torch.randn(4, 32, 6, 5) * 1.5 + 0.3).contiguous(memory_format=memory_format).requires_grad_()
    shift = (torch.randn(4, 32) * 2).requires_grad_()
    grad = torch.randn(x.shape).contiguous(memory_format=memory_format)
    out = m(x, shift)
    fused = [out, *torch.autograd.grad(out, (x, shift, m.weight, m.bias), grad)]
    x_ref, shift_ref = x.detach().clone().requires_grad_(), shift.detach().clone().requires_grad_()
    ref = F.silu(F.group_norm(x_ref + shift_ref[:, :, None, None], 8, m.weight, m.bias, m.eps))
    if dropout:
        ref = ref * ((out != 0) | (ref == 0)).float() / (1 - dropout)
    expected = [ref, *torch.autograd.grad(ref, (x_ref, shift_ref, m.weight, m.bias), grad)]
    for name, a, b in zip(("output", "dx", "dshift", "dweight", "dbias"), fused, expected):
        assert rel_err(a, b) < 1e-5, name


def test_shift_falls_back_to_an_add(monkeypatch) -> None:
    monkeypatch.setenv("DIFFLAB_FUSED_KERNELS", "0")
    m = layer(16, 4, True)
    x, shift = torch.randn(2, 16, 5, 5), torch.randn(2, 16)
    assert torch.equal(m(x, shift), plain(m)(x + shift[:, :, None, None]))
