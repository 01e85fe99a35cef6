"""The speed-ups of issue 7 change how the networks compute, never what: each optimised layer
against the plain formulation it replaces (fp32 within 1e-5 relative), whole UNets with every
layer swapped back, and a fixed tiny training run whose validation loss must not get worse."""

from __future__ import annotations

import copy
import types

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from difflab.config import TrainConfig
from difflab.models import build_unet
from difflab.models.group_norm_silu import GroupNormSiLU
from difflab.models.layers import AttentionBlock, PointwiseConv, Upsample


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def reference_upsample(self: Upsample, x: torch.Tensor) -> torch.Tensor:
    return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def reference_group_norm_silu(self: GroupNormSiLU, x: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
    if shift is not None:
        x = x + shift[:, :, None, None]
    y = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
    y = F.silu(y) if self.silu else y
    return F.dropout(y, self.dropout, self.training) if self.dropout else y


def reference_attention_block(self: AttentionBlock, x: torch.Tensor) -> torch.Tensor:
    b, c, height, width = x.shape
    tokens = self.qkv(self.norm(x).flatten(2).transpose(1, 2))
    q, k, v = tokens.view(b, height * width, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, height * width, c)
    return x + self.proj_out(out).transpose(1, 2).reshape(b, c, height, width)


def with_reference_layers(net: nn.Module) -> nn.Module:
    """A copy of `net` (same weights) computing every optimised layer the plain way."""
    ref = copy.deepcopy(net)
    for m in ref.modules():
        if isinstance(m, Upsample):
            m.forward = types.MethodType(reference_upsample, m)
        elif isinstance(m, PointwiseConv):
            m.forward = types.MethodType(nn.Conv2d.forward, m)
        elif isinstance(m, GroupNormSiLU):
            m.forward = types.MethodType(reference_group_norm_silu, m)
        elif isinstance(m, AttentionBlock):
            m.forward = types.MethodType(reference_attention_block, m)
    return ref


FORMATS = [torch.contiguous_format, torch.channels_last]


@pytest.mark.parametrize("memory_format", FORMATS)
@pytest.mark.parametrize("channels,height,width", [(8, 5, 7), (64, 8, 8), (3, 1, 1)])
def test_upsample_is_nearest_then_conv3x3(memory_format, channels: int, height: int, width: int) -> None:
    torch.manual_seed(0)
    up = Upsample(channels)
    nn.init.normal_(up.conv.weight)
    nn.init.normal_(up.conv.bias)
    x = torch.randn(2, channels, height, width).contiguous(memory_format=memory_format).requires_grad_()
    out, ref = up(x), reference_upsample(up, x)
    assert out.shape == ref.shape == (2, channels, 2 * height, 2 * width)
    assert rel_err(out, ref) < 1e-5
    if height * width > 1:  # a 1x1 map is both layouts at once
        assert out.is_contiguous(memory_format=memory_format)
    for grad_format in FORMATS:  # the gradient arriving in either layout
        g = torch.randn_like(ref).contiguous(memory_format=grad_format)
        grads = torch.autograd.grad(out, [x, up.conv.weight, up.conv.bias], g, retain_graph=True)
        ref_grads = torch.autograd.grad(ref, [x, up.conv.weight, up.conv.bias], g, retain_graph=True)
        for a, b in zip(grads, ref_grads):
            assert rel_err(a, b) < 1e-5


def test_upsample_checkpoint_keys_unchanged() -> None:
    """Checkpoints written before the rewrite load into it: only conv.weight/bias are saved."""
    assert set(Upsample(4).state_dict()) == {"conv.weight", "conv.bias"}


@pytest.mark.parametrize("memory_format", FORMATS)
def test_pointwise_conv_is_a_1x1_convolution(memory_format) -> None:
    torch.manual_seed(0)
    conv = PointwiseConv(12, 20)
    x = torch.randn(3, 12, 6, 5).contiguous(memory_format=memory_format).requires_grad_()
    out, ref = conv(x), nn.Conv2d.forward(conv, x)
    assert rel_err(out, ref) < 1e-5
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, [x, conv.weight, conv.bias], g),
                    torch.autograd.grad(ref, [x, conv.weight, conv.bias], g)):
        assert rel_err(a, b) < 1e-5
    assert conv.weight.shape == (20, 12, 1, 1)  # nn.Conv2d's parameter, so old checkpoints load
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = conv(x.detach().bfloat16())
    assert low.dtype == torch.bfloat16 and rel_err(low.float(), ref.detach()) < 3e-2


NETWORKS = {
    # small: attention, 1x1 skips, upsampling to an odd-sized (padded) map; dropout added to cover it
    "small": ("small", (1, 28, 28), 10, {"dropout": 0.1}),
    "ddpm_cifar": ("ddpm_cifar", (3, 32, 32), 0, {}),
}


@pytest.mark.parametrize("memory_format", FORMATS)
@pytest.mark.parametrize("name", list(NETWORKS))
def test_unet_outputs_match_the_plain_formulation(name: str, memory_format) -> None:
    unet, shape, classes, extra = NETWORKS[name]
    cfg = OmegaConf.merge(OmegaConf.load(f"conf/unet/{unet}.yaml"), extra)
    torch.manual_seed(0)
    net = build_unet(cfg, shape[0], shape[1], classes)
    for p in net.parameters():  # zero-initialised layers would hide differences
        nn.init.normal_(p, std=0.05)
    ref = with_reference_layers(net)
    net, ref = net.to(memory_format=memory_format).eval(), ref.eval()
    x, t = torch.randn(2, *shape), torch.tensor([3, 700])
    y = torch.tensor([1, 7]) if classes else None
    with torch.no_grad():
        out = net(x.contiguous(memory_format=memory_format), t, y)
        expected = ref(x, t, y)
    assert rel_err(out, expected) < 1e-5


def test_tiny_training_is_not_worse_than_with_plain_layers(tmp_path) -> None:
    """The same fixed run (seed, data, steps) trained with the optimised and with the plain layers:
    the validation loss of the optimised network must not be worse (dropout masks differ, so
    within a small tolerance)."""
    from difflab.diffusion import GaussianDiffusion, make_betas
    from difflab.train.loop import Trainer

    cfg = OmegaConf.merge(OmegaConf.load("conf/unet/tiny.yaml"),
                          {"attention_resolutions": [8], "dropout": 0.1, "head_channels": 16})
    train_cfg = OmegaConf.structured(TrainConfig(max_steps=120, lr=3e-3, warmup_steps=5, precision="fp32",
                                                 log_every=40, val_every=1000, image_every=0, checkpoint_every=1000,
                                                 keep_checkpoints=1, progress=False))
    train_cfg.ema.decay = 0.9
    process = GaussianDiffusion(make_betas("linear", 200), "eps")
    gen = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    centres = torch.rand(64, 2, generator=gen) * 6 + 5
    data = ((yy - centres[:, :1, None]).abs().maximum((xx - centres[:, 1:, None]).abs()) < 4).float() * 2 - 1
    data = data[:, None]  # 64 squares at random places, in [-1, 1]
    val_t = torch.randint(0, 200, (64,), generator=gen)
    val_noise = torch.randn(64, 1, 16, 16, generator=gen)

    def fit(net: nn.Module, name: str) -> float:
        torch.manual_seed(1)
        trainer = Trainer(net, train_cfg, tmp_path / name, torch.device("cpu"))
        loss = lambda model, batch: process.training_loss(lambda x, t: model(x, t), batch).mean()  # noqa: E731
        trainer.fit(loss, lambda step: data[(step * 16) % 64:(step * 16) % 64 + 16], 16)
        with torch.no_grad():
            return float(process.training_loss(lambda x, t: trainer.ema.model(x, t), data, level=val_t, noise=val_noise).mean())

    torch.manual_seed(0)
    net = build_unet(cfg, 1, 16, 0)
    ref = with_reference_layers(net)
    fast_loss, plain_loss = fit(net, "fast"), fit(ref, "plain")
    assert fast_loss < 0.5  # it learned something: an untrained net scores ~1
    assert fast_loss <= plain_loss * 1.1
