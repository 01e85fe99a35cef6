"""The UNet: shapes, the DDPM parameter count, conditioning, attention placement, gradients, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from difflab.config import register_configs
from difflab.models import UNet, build_unet, count_parameters
from difflab.models.layers import AttentionBlock

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def unet_cfg(name: str, *overrides: str) -> DictConfig:
    """conf/unet/<name>.yaml composed by Hydra against its schema, as a run would see it."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=f"unet/{name}", overrides=[f"unet.{o}" for o in overrides]).unet


def perturb(model: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Undo the zero-init so every branch (and the class embedding) affects the output."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model


def tiny(**kwargs) -> UNet:
    args = dict(in_channels=1, image_size=16, channels=16, channel_mults=[1, 2], num_res_blocks=1,
                attention_resolutions=[], head_channels=16, norm_groups=8)
    return UNet(**{**args, **kwargs})


@pytest.mark.parametrize("name", ["tiny", "small"])
@pytest.mark.parametrize("size", [28, 32])
@pytest.mark.parametrize("channels", [1, 3])
def test_output_shape_matches_input(name: str, size: int, channels: int) -> None:
    overrides = ["attention_resolutions=[8]"] if name == "small" and size == 32 else []
    model = build_unet(unet_cfg(name, *overrides), in_channels=channels, image_size=size, num_classes=10)
    x = torch.randn(2, channels, size, size)
    assert model(x, torch.tensor([0, 999]), torch.tensor([3, 10])).shape == x.shape


def test_latent_shape() -> None:
    model = tiny(in_channels=4, image_size=8, attention_resolutions=[4])
    x = torch.randn(3, 4, 8, 8)
    assert model(x, torch.tensor([1, 500, 999])).shape == x.shape


def test_out_channels() -> None:
    model = tiny(in_channels=3, out_channels=6)
    assert model(torch.randn(1, 3, 16, 16), torch.tensor([5])).shape == (1, 6, 16, 16)


def test_ddpm_cifar_has_paper_parameter_count() -> None:
    model = build_unet(unet_cfg("ddpm_cifar"), in_channels=3, image_size=32, num_classes=0)
    assert abs(count_parameters(model) / 35.7e6 - 1) < 0.01


def test_class_conditioning() -> None:
    torch.manual_seed(0)
    model = perturb(tiny(num_classes=10)).eval()
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 700])
    out_a = model(x, t, torch.tensor([0, 0]))
    out_b = model(x, t, torch.tensor([1, 1]))
    assert not torch.allclose(out_a, out_b)
    assert torch.equal(model(x, t), model(x, t, torch.full((2,), 10)))


def test_unconditional_rejects_labels() -> None:
    model = tiny(num_classes=0)
    assert model.class_embed is None
    with pytest.raises(ValueError, match="num_classes=0"):
        model(torch.randn(1, 1, 16, 16), torch.tensor([1]), torch.tensor([0]))


def test_attention_only_at_configured_resolutions() -> None:
    model = tiny(image_size=32, channel_mults=[1, 2, 2], num_res_blocks=2, attention_resolutions=[16])
    seen: list[int] = []
    for m in model.modules():
        if isinstance(m, AttentionBlock):
            m.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[-1]))
    model(torch.randn(1, 1, 32, 32), torch.tensor([3]))
    # 2 in the down path and 3 in the up path at 16x16, plus the middle block's at 8x8.
    assert sorted(seen) == [8] + [16] * 5


def test_unmatched_attention_resolution_warns() -> None:
    with pytest.warns(UserWarning, match=r"\[7\] match no feature-map size"):
        tiny(image_size=32, attention_resolutions=[7])


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    model = perturb(tiny(num_classes=10, attention_resolutions=[8], dropout=0.1))
    x, t, y = torch.randn(4, 1, 16, 16), torch.randint(0, 1000, (4,)), torch.tensor([0, 1, 2, 10])
    (model(x, t, y) - x).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_zero_init_trains_through() -> None:
    """From the zero-init, SGD opens the residual branches layer by layer: conv_out, then each
    ResBlock's last conv, then everything before them, including the embeddings."""
    torch.manual_seed(0)
    model = tiny(num_classes=10)
    assert model(torch.randn(1, 1, 16, 16), torch.tensor([1])).abs().sum() == 0
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, t, y = torch.randn(4, 1, 16, 16), torch.randint(0, 1000, (4,)), torch.tensor([0, 1, 2, 10])
    for _ in range(3):
        opt.zero_grad()
        (model(x, t, y) - x).pow(2).mean().backward()
        opt.step()
    for p in (model.conv_in.weight, model.time_embed.mlp[0].weight, model.class_embed.weight):
        assert p.grad.abs().sum() > 0


def test_sizes_the_downsamplings_cannot_halve_are_padded() -> None:
    """28x28 MNIST through the 3 down-samplings of ddpm_cifar: padded to 32 inside, 28 out,
    with attention at the padded 16x16 level."""
    model = tiny(image_size=28, channel_mults=[1, 2, 2, 2], attention_resolutions=[16])
    assert model.pad == 4
    assert any(isinstance(m, AttentionBlock) for m in model.down.modules())
    x = torch.randn(2, 1, 28, 28)
    assert model(x, torch.tensor([3, 500])).shape == x.shape


def test_bad_norm_groups() -> None:
    with pytest.raises(ValueError, match=r"norm_groups=32 does not divide the channel counts \[16\]"):
        tiny(norm_groups=32)


def test_deterministic_under_seed() -> None:
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([4, 40])
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        outs.append(perturb(tiny(num_classes=3))(x, t, torch.tensor([0, 2])))
    assert torch.equal(*outs)


def test_float_timesteps() -> None:
    torch.manual_seed(0)
    model = perturb(tiny()).eval()
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(model(x, torch.tensor([3, 500])), model(x, torch.tensor([3.0, 500.0])))
    out = model(x, torch.tensor([2.5, 999.0]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, model(x, torch.tensor([2.0, 999.0])))


@pytest.mark.parametrize("channels_last", [False, True])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(channels_last: bool) -> None:
    """Blocks recomputed in the backward (dropout and attention included: the recomputation
    draws the same masks) give the stored activations' loss and gradients, bit for bit."""
    from difflab.models.layers import set_gradient_checkpointing

    torch.manual_seed(0)
    net = perturb(tiny(attention_resolutions=[8], dropout=0.3, num_classes=3)).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    x = torch.randn(4, 1, 16, 16).contiguous(memory_format=fmt)
    t, y = torch.tensor([0, 10, 100, 999]), torch.tensor([0, 1, 2, 3])

    def loss_and_grads(checkpoint: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        assert set_gradient_checkpointing(net, checkpoint) == len(net.down) + 1 + len(net.up)
        net.zero_grad()
        torch.manual_seed(1)
        loss = net(x, t, y).square().mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in net.parameters()]

    plain_loss, plain_grads = loss_and_grads(False)
    loss, grads = loss_and_grads(True)
    assert torch.equal(loss, plain_loss)
    assert all(torch.equal(g, h) for g, h in zip(grads, plain_grads))
    with torch.no_grad():  # nothing to recompute without a backward: the plain path
        torch.manual_seed(1)
        assert torch.equal(net(x, t, y).square().mean(), plain_loss)
