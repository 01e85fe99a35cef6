"""The autoencoders and their losses: shapes per down-sampling factor, the KL and VQ terms
against their formulas, the straight-through gradient, the EMA codebook and dead-code restarts,
the PatchGAN's hinge loss and adaptive weight, and a tiny KL and VQ autoencoder learning."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from torch import nn

from difflab.cli import CONF_DIR
from difflab.models.autoencoder import (LOGVAR_RANGE, DiagonalGaussian, KLAutoencoder, VectorQuantizer,
                                        build_autoencoder, codebook_stats, vq_loss)
from difflab.models.discriminator import PatchDiscriminator, adaptive_weight, hinge_d_loss
from difflab.train.reconstruction import AutoencoderStage


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convolutions on a shared 2-core machine are much faster on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _ae_cfg(name: str, **overrides):
    cfg = OmegaConf.load(f"{CONF_DIR}/autoencoder/{name}.yaml")
    cfg.pop("defaults")
    cfg.channels = 8
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


@pytest.mark.parametrize("name", ["kl", "vq"])
@pytest.mark.parametrize("mults", [[1], [1, 2], [1, 2, 2], [1, 2, 2, 2]])
@pytest.mark.parametrize("size", [16, 28])
def test_shapes_for_each_downsampling_factor(name, mults, size):
    ae = build_autoencoder(_ae_cfg(name, channel_mults=mults, latent_channels=3), 1, size).eval()
    factor = 2 ** (len(mults) - 1)
    x = torch.randn(2, 1, size, size)
    z = ae.encode(x)
    assert ae.factor == factor
    assert z.shape == (2, *ae.latent_shape) == (2, 3, math.ceil(size / factor), math.ceil(size / factor))
    assert ae.decode(z).shape == x.shape
    assert ae(x).reconstruction.shape == x.shape


def test_seed_000_geometry():
    """32x32x3 -> 8x8x2 with 4x down-sampling, as in seed 000."""
    ae = build_autoencoder(_ae_cfg("kl"), 3, 32)
    assert ae.latent_shape == (2, 8, 8)


def test_kl_term_matches_its_formula_and_logvar_is_clamped():
    torch.manual_seed(0)
    moments = torch.randn(3, 4, 5, 5)
    q = DiagonalGaussian(moments)
    mean, logvar = moments.chunk(2, dim=1)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, torch.exp(0.5 * logvar)), torch.distributions.Normal(0.0, 1.0)
    ).sum(dim=(1, 2, 3))
    assert torch.allclose(q.kl(), expected, atol=1e-5)
    extreme = DiagonalGaussian(torch.cat([torch.zeros(1, 2, 2, 2), torch.tensor([-100.0, 100.0]).view(1, 2, 1, 1).expand(1, 2, 2, 2)], 1))
    assert extreme.logvar.min() == LOGVAR_RANGE[0] and extreme.logvar.max() == LOGVAR_RANGE[1]


def test_kl_autoencoder_loss_is_weighted_kl_per_pixel():
    torch.manual_seed(0)
    ae = KLAutoencoder(1, 16, 2, kl_weight=0.5, channels=8, channel_mults=[1, 2], num_res_blocks=1,
                       attention=False, norm_groups=8)
    x = torch.randn(4, 1, 16, 16)
    out = ae(x)
    assert torch.allclose(out.regularizer, 0.5 * ae.posterior(x).kl().mean() / (16 * 16))


def test_vq_losses_match_their_formulas():
    torch.manual_seed(0)
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    e = torch.randn(2, 3, 4, 4, requires_grad=True)
    beta, n = 0.25, z.numel()
    loss = vq_loss(z, e, beta, learn_codebook=True)
    assert torch.allclose(loss, (1 + beta) * F.mse_loss(z, e))
    loss.backward()
    assert torch.allclose(z.grad, 2 * beta * (z - e).detach() / n)  # commitment moves the encoder
    assert torch.allclose(e.grad, 2 * (e - z).detach() / n)  # the codebook term moves the codes
    z.grad = e.grad = None
    vq_loss(z, e, beta, learn_codebook=False).backward()  # EMA moves the codes instead
    assert e.grad is None and torch.allclose(z.grad, 2 * beta * (z - e).detach() / n)


def test_straight_through_gradient_and_nearest_codes():
    torch.manual_seed(0)
    q = VectorQuantizer(16, 3, 0.25, ema_decay=None, restart_dead=False)
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    z_q, _, indices = q(z)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 3)
    assert torch.equal(indices.flatten(), torch.cdist(flat, q.codebook.detach()).argmin(1))
    assert torch.allclose(z_q.detach().permute(0, 2, 3, 1).reshape(-1, 3), q.codebook.detach()[indices.flatten()], atol=1e-6)
    upstream = torch.randn_like(z)
    (z_q * upstream).sum().backward()
    assert torch.allclose(z.grad, upstream)  # the quantiser passes gradients through unchanged


def test_ema_codebook_follows_assigned_vectors_and_restarts_dead_codes():
    torch.manual_seed(0)
    q = VectorQuantizer(8, 2, 0.25, ema_decay=0.5, restart_dead=True).train()
    z = torch.randn(4, 2, 3, 3) * 5 + 10  # far from every initial code (all near 0)
    q(z)
    assert q.codebook.norm(dim=1).min() > 1  # unused codes were moved onto encoder outputs
    q_no_restart = VectorQuantizer(8, 2, 0.25, ema_decay=0.5, restart_dead=False).train()
    before = q_no_restart.codebook.clone()
    _, _, idx = q_no_restart(z)
    used = idx.unique()
    assert not torch.allclose(q_no_restart.codebook[used], before[used])  # used codes moved toward z


def test_codebook_usage_and_perplexity():
    assert codebook_stats(torch.arange(8).repeat(3), 8) == {"codebook_usage": 1.0, "codebook_perplexity": pytest.approx(8.0)}
    assert codebook_stats(torch.zeros(10, dtype=torch.long), 8) == {"codebook_usage": 0.125, "codebook_perplexity": 1.0}


def test_hinge_loss():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert torch.isclose(hinge_d_loss(real, fake), torch.tensor(0.5 * (0.25 + 0.5)))


def test_adaptive_weight_equals_its_formula_on_a_toy_network():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4))
    x = torch.randn(5, 4)
    out = net(x)
    nll = (out - x).pow(2).mean()
    g_loss = -(out * torch.randn(4)).mean()
    last = net[2].weight
    gn = torch.autograd.grad(nll, last, retain_graph=True)[0].norm()
    gg = torch.autograd.grad(g_loss, last, retain_graph=True)[0].norm()
    assert torch.isclose(adaptive_weight(nll, g_loss, last, 0.5), 0.5 * gn / (gg + 1e-4))
    # a generator term with no gradient at the last layer hits the clamp, not infinity
    flat = (out * 0).sum()
    assert adaptive_weight(100 * nll, flat, last, 2.0) == 2.0 * 1e4


def test_patch_discriminator_gives_a_logit_per_patch():
    assert PatchDiscriminator(1, 8, 2)(torch.randn(2, 1, 28, 28)).shape == (2, 1, 5, 5)
    assert PatchDiscriminator(3, 8, 3)(torch.randn(2, 3, 32, 32)).shape == (2, 1, 2, 2)


@pytest.fixture
def hydra_cfg(shapes_dir, tmp_path):
    from conftest import tiny_overrides

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        def make(*overrides: str):
            return compose(config_name="config", overrides=[*tiny_overrides(shapes_dir, tmp_path / "cache"), *overrides])

        yield make
    GlobalHydra.instance().clear()


@pytest.mark.parametrize("name, extra", [("kl", []), ("vq", ["autoencoder.discriminator.enabled=true",
                                                              "autoencoder.discriminator.start=20"])])
def test_tiny_autoencoder_reconstructs_better_after_training(hydra_cfg, tmp_path, name, extra):
    cfg = hydra_cfg(f"autoencoder={name}", "autoencoder.channels=16", "autoencoder.train.max_steps=40",
                    "autoencoder.train.batch_size=8", "autoencoder.train.lr=2e-3", "autoencoder.train.warmup_steps=5",
                    "train.val_every=40", "train.checkpoint_every=40", "train.ema.decay=0.9", *extra)
    stage = AutoencoderStage(cfg, tmp_path / name, torch.device("cpu"))
    val = stage.make_val_fn()
    at_start = val(stage.module.eval())
    _, metrics = stage.fit()
    assert metrics["steps"] == 40
    assert metrics["best_val_loss"] < 0.7 * at_start, (at_start, metrics["best_val_loss"])
    assert metrics["reconstruction_psnr"] > 10 * math.log10(4 / at_start)  # PSNR of the untrained net
    assert metrics["latent_scale"] > 0 and (tmp_path / name / "reconstructions" / "reconstructions.png").is_file()
    if name == "vq":
        assert 0 < metrics["codebook_usage"] <= 1 and metrics["codebook_perplexity"] >= 1
    saved = torch.load(tmp_path / name / "checkpoints" / "last.pt", weights_only=True)
    assert saved["latent_scale"] == metrics["latent_scale"] and saved["stage"] == "autoencoder"


@pytest.mark.parametrize("overrides, needle", [
    (["mode=reconstruction"], "mode=reconstruction trains an autoencoder, but autoencoder=none"),
    (["ckpt.autoencoder=/tmp/ae.pt"], "ckpt.autoencoder is given but autoencoder=none"),
    (["autoencoder=vq", "autoencoder.codebook_ema=1.0"], "autoencoder.codebook_ema=1.0 must be in [0, 1)"),
    (["autoencoder=kl", "autoencoder.train.max_steps=0"], "autoencoder.train.max_steps=0 must be positive"),
])
def test_autoencoder_settings_are_validated(hydra_cfg, overrides, needle):
    from difflab.config import validate
    from difflab.errors import UserError

    with pytest.raises(UserError, match=re.escape(needle)):
        validate(hydra_cfg(*overrides))
