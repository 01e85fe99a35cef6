"""The CPU kernels as typed torch operators (torch.ops.difflab.*): each refuses, with a ValueError
naming the tensor, what the C code would misread (dtype, device, shape, layout) before any pointer
reaches it; torch.compile traces them into its graph and gives eager's results; and the dropout
mask is the same hash on the kernel and on the torch fallback, so a seed drops the same elements
with or without a C++ compiler, in either layout."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from difflab.models import cpu_kernels
from difflab.models.group_norm_silu import NO_SEEDS, GroupNormSiLU, dropout_mask
from difflab.models.layers import AttentionBlock, ResBlock

needs_kernel = pytest.mark.skipif(cpu_kernels.library() is None, reason="no C++ compiler here to build the kernels")
ops = torch.ops.difflab
FORMATS = [torch.contiguous_format, torch.channels_last]


def norm_args(**changes) -> dict:
    """Valid arguments of group_norm_silu_fwd (a (2, 8, 3, 5) map in 4 groups), with `changes`."""
    args = dict(x=torch.randn(2, 8, 3, 5), weight=torch.ones(8), bias=torch.zeros(8), shift=torch.zeros(2, 8),
                groups=4, eps=1e-5, silu=True, dropout=0.0, seeds=NO_SEEDS)
    return {**args, **changes}


BAD_FORWARD = [  # (what changes, the message's gist)
    (dict(x=torch.randn(2, 8, 3, 5, dtype=torch.float64)), r"x must be torch.float32 or torch.bfloat16, got torch.float64"),
    (dict(x=torch.randn(2, 8, 15)), r"x must be a 4-d .* got shape \(2, 8, 15\)"),
    (dict(x=torch.randn(2, 8, 3, 10)[..., ::2]), r"x must be contiguous or channels_last-contiguous"),
    (dict(weight=torch.ones(9)), r"weight must have shape \(8,\), got \(9,\)"),
    (dict(bias=torch.zeros(8, dtype=torch.bfloat16)), r"bias must be torch.float32, got torch.bfloat16"),
    (dict(weight=torch.ones(16)[::2]), r"weight must be contiguous, got strides \(2,\)"),
    (dict(shift=torch.zeros(3, 8)), r"shift must have shape \(2, 8\), got \(3, 8\)"),
    (dict(groups=3), r"groups must divide x's 8 channels, got 3"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
    (dict(seeds=torch.zeros(2, dtype=torch.int32)), r"seeds must be torch.int64, got torch.int32"),
]


@pytest.mark.parametrize("changes,message", BAD_FORWARD)
def test_group_norm_forward_refuses_what_the_kernel_would_misread(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ops.group_norm_silu_fwd(**norm_args(**changes))


@needs_kernel
def test_group_norm_backward_checks_the_gradient_and_statistics_against_x() -> None:
    args = norm_args(x=torch.randn(2, 8, 3, 5).contiguous(memory_format=torch.channels_last))
    y, mean, rstd, xsum = ops.group_norm_silu_fwd(**args)
    saved = dict(x=args["x"], weight=args["weight"], bias=args["bias"], shift=args["shift"], mean=mean, rstd=rstd,
                 xsum=xsum, groups=4, silu=True, dropout=0.0, seeds=NO_SEEDS)
    assert all(t.shape == s.shape for t, s in zip(ops.group_norm_silu_bwd(dy=torch.randn_like(y), **saved),
                                                  (y, args["weight"], args["bias"], args["shift"])))
    with pytest.raises(ValueError, match="dy must be channels_last-contiguous"):
        ops.group_norm_silu_bwd(dy=torch.randn(2, 8, 3, 5), **saved)  # NCHW gradient for a channels_last x
    with pytest.raises(ValueError, match=r"dy must be torch.float32, got torch.bfloat16"):
        ops.group_norm_silu_bwd(dy=torch.randn_like(y).bfloat16(), **saved)
    with pytest.raises(ValueError, match=r"rstd must have shape \(2, 4\), got \(2, 8\)"):
        ops.group_norm_silu_bwd(dy=torch.randn_like(y), **{**saved, "rstd": xsum})


BAD_ATTENTION = [
    (torch.randn(2, 10, 48, dtype=torch.float64), 2, r"qkv must be torch.float32, got torch.float64"),
    (torch.randn(2, 10, 50), 2, r"3 x 2 heads x head width"),
    (torch.randn(2, 10, 96)[..., ::2], 2, r"qkv must be contiguous, got strides \(960, 96, 2\)"),
    (torch.randn(2, 10, 48, device="meta"), 2, r"qkv must be a CPU tensor, got one on meta"),
]


@pytest.mark.parametrize("qkv,heads,message", BAD_ATTENTION)
def test_attention_forward_refuses_what_the_kernel_would_misread(qkv: torch.Tensor, heads: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ops.attention_fwd(qkv, heads)


@needs_kernel
def test_attention_backward_checks_its_tensors_against_qkv() -> None:
    qkv = torch.randn(2, 10, 48)
    out, lse = ops.attention_fwd(qkv, 2)
    assert ops.attention_bwd(torch.randn_like(out), qkv, out, lse, 2).shape == qkv.shape
    with pytest.raises(ValueError, match=r"dout must have shape \(2, 10, 16\), got \(2, 10, 17\)"):
        ops.attention_bwd(torch.randn(2, 10, 17), qkv, out, lse, 2)
    with pytest.raises(ValueError, match=r"lse must have shape \(2, 2, 10\), got \(2, 10, 2\)"):
        ops.attention_bwd(torch.randn_like(out), qkv, out, lse.transpose(1, 2).contiguous(), 2)


def test_operators_refuse_without_the_kernels(monkeypatch) -> None:
    monkeypatch.setattr(cpu_kernels, "_tried", True)
    monkeypatch.setattr(cpu_kernels, "_library", None)
    with pytest.raises(RuntimeError, match="fused CPU kernels are not available"):
        ops.attention_fwd(torch.randn(2, 10, 48), 2)


class Blocks(nn.Module):
    """A ResBlock (both norms, a shift, dropout) and an attention block: every operator."""

    def __init__(self, dropout: float):
        super().__init__()
        self.res = ResBlock(32, 32, emb_dim=8, dropout=dropout, norm_groups=8)
        self.attn = AttentionBlock(32, head_channels=16, norm_groups=8)
        for p in self.parameters():  # the zero-initialised layers would hide the attention
            nn.init.normal_(p, std=0.1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.attn(self.res(x, emb))


def outputs_and_grads(model: nn.Module, params: list[nn.Parameter], x: torch.Tensor, emb: torch.Tensor):
    torch.manual_seed(5)
    x = x.detach().clone().requires_grad_()
    out = model(x, emb)
    return [out.detach(), *torch.autograd.grad(out.square().sum(), [x, *params])]


@needs_kernel
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_compiled_blocks_call_the_kernels_and_give_eager_results(dropout: float) -> None:
    """fullgraph: no graph break around the operators. With inductor's fallback_random the
    compiled graph draws the dropout seeds from torch's generator as eager does, so even the
    masks agree."""
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx

    torch.manual_seed(0)
    model = Blocks(dropout).train()
    params = list(model.parameters())
    x = torch.randn(2, 32, 6, 6).contiguous(memory_format=torch.channels_last)
    emb = torch.randn(2, 8)
    graphs = []

    def inductor(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=inductor, fullgraph=True)
    with inductor_config.patch(fallback_random=True):
        got = outputs_and_grads(compiled, params, x, emb)
    expected = outputs_and_grads(model, params, x, emb)
    traced = {str(node.target) for gm in graphs for sub in gm.modules() if isinstance(sub, torch.fx.GraphModule)
              for node in sub.graph.nodes}  # the autograd.Functions' bodies are subgraphs
    assert {"difflab.group_norm_silu_fwd.default", "difflab.attention_fwd.default"} <= traced
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def lowbias32(v: int) -> int:
    """group_norm_silu.cpp's mix() in Python integers, the reference for the torch version."""
    for shift, mul in ((16, 0x7FEB352D), (15, 0x846CA68B)):
        v = ((v ^ (v >> shift)) * mul) & 0xFFFFFFFF
    return v ^ (v >> 16)


def test_fallback_mask_is_the_kernels_hash_exactly() -> None:
    seeds = torch.tensor([0xFFFFFFFF, 0x9E3779B9])  # the largest seed: every sum wraps
    p = 0.3
    mask = dropout_mask(torch.Size((3, 5, 7, 11)), p, seeds).flatten()
    cut = round(p * 2**24)
    for i in [0, 1, 2, 500, 1000, mask.numel() - 1]:
        keep = lowbias32(lowbias32((i + 0xFFFFFFFF) & 0xFFFFFFFF) ^ 0x9E3779B9) >> 8 >= cut
        assert mask[i].item() == (torch.tensor(1 / (1 - p), dtype=torch.float32).item() if keep else 0.0)


def layer_outputs_and_grads(m: GroupNormSiLU, x: torch.Tensor, shift: torch.Tensor) -> list[torch.Tensor]:
    torch.manual_seed(11)
    x, shift = x.detach().clone().requires_grad_(), shift.detach().clone().requires_grad_()
    out = m(x, shift)
    grads = torch.autograd.grad(out, [x, shift, m.weight, m.bias], torch.linspace(-1, 1, out.numel()).view(out.shape))
    return [out.detach(), *grads]


@needs_kernel
@pytest.mark.parametrize("memory_format", FORMATS)
def test_same_seed_drops_the_same_elements_with_the_kernel_and_the_fallback(monkeypatch, memory_format) -> None:
    torch.manual_seed(0)
    m = GroupNormSiLU(8, 32, dropout=0.1).train()
    nn.init.normal_(m.weight, 1.0, 0.3)
    nn.init.normal_(m.bias, 0.0, 0.3)
    x = torch.randn(4, 32, 9, 7).contiguous(memory_format=memory_format)
    shift = torch.randn(4, 32)
    kernel = layer_outputs_and_grads(m, x, shift)
    monkeypatch.setenv("DIFFLAB_FUSED_KERNELS", "0")
    fallback = layer_outputs_and_grads(m, x, shift)
    assert torch.equal(kernel[0] == 0, fallback[0] == 0)
    assert 0.08 < (kernel[0] == 0).float().mean().item() < 0.12
    for name, a, b in zip(("output", "dx", "dshift", "dweight", "dbias"), kernel, fallback):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), name


@needs_kernel
def test_the_kernels_mask_does_not_depend_on_the_layout() -> None:
    m = GroupNormSiLU(8, 32, dropout=0.5).train()
    x = torch.randn(3, 32, 5, 6)
    masks = []
    for memory_format in FORMATS:
        torch.manual_seed(4)
        masks.append(m(x.contiguous(memory_format=memory_format)) == 0)
    assert torch.equal(*masks)
