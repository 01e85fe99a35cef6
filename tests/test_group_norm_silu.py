"""The fused CPU GroupNorm(+SiLU) kernel against torch's GroupNorm then SiLU: outputs and all
gradients, both layouts, float32 (1e-5 relative) and bfloat16 (no worse than torch's own bf16
layers), checkpoint names, and every fallback (kernels off, no compiler, other dtypes)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from difflab.models import group_norm_silu as gns
from difflab.models.group_norm_silu import GroupNormSiLU
from difflab.models.layers import ResBlock

FORMATS = [torch.contiguous_format, torch.channels_last]
SHAPES = [((2, 8, 5, 7), 4), ((4, 64, 16, 16), 32), ((3, 96, 1, 1), 32), ((1, 6, 9, 3), 3)]

needs_kernel = pytest.mark.skipif(gns.library() is None, reason="no C++ compiler here to build the fused kernel")


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
    monkeypatch.setattr(gns, "_tried", False)
    monkeypatch.setattr(gns, "_library", None)
    with caplog.at_level(logging.WARNING, logger="difflab"):
        m = layer(16, 4, True)
        x, grad = torch.randn(2, 16, 6, 6), torch.randn(2, 16, 6, 6)
        fused, ref = run(m, x, grad), run(m, x, grad, plain(m))
        run(m, x, grad)
    assert gns.library() is None
    assert sum("no C++ compiler" in r.message for r in caplog.records) == 1
    for a, b in zip(fused, ref):
        assert torch.equal(a, b)


@needs_kernel
def test_builds_into_the_cache_and_reuses_it(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(gns, "_tried", False)
    monkeypatch.setattr(gns, "_library", None)
    assert gns.library() is not None
    built = list((tmp_path / "kernels").glob("group_norm_silu-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(gns, "_tried", False)
    assert gns.library() is not None
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
