"""Classifier guidance against its formulas, and its effect measured on an analytic two-class
problem where the exact denoiser and the exact noisy-data classifier are known in closed form."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from difflab.diffusion import GaussianDiffusion, GuidedDenoiser, make_betas, run_sampler
from difflab.models import build_classifier


class LinearClassifier(torch.nn.Module):
    """logits_k = <w_k, x>: grad_x log softmax(...)[y] = w_y - sum_k p_k w_k in closed form."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = w  # (K, D)

    def forward(self, x, t):
        return x.flatten(1) @ self.w.T


def _toy():
    p = GaussianDiffusion(make_betas("linear", 100))
    w = torch.tensor([[1.0, -2.0, 0.5, 0.0], [-1.0, 0.5, 0.0, 2.0], [0.3, 0.3, -1.0, 1.0]])
    x = torch.randn(5, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 1, 0])
    t = torch.tensor([10, 40, 70, 99, 0])
    net = lambda x, t, y: 0.1 * x  # noqa: E731  an eps prediction
    return p, LinearClassifier(w), x, y, t, net


def test_guide_mean_is_scale_times_grad_log_p():
    p, clf, x, y, t, net = _toy()
    den = GuidedDenoiser(net=net, process=p, y=y, classifier=clf, classifier_scale=2.5, clip_x0=False)
    probs = torch.softmax(clf(x, t), 1)
    expected = 2.5 * (clf.w[y] - probs @ clf.w).view_as(x)
    torch.testing.assert_close(den.guide_mean(x, t), expected)


def test_noise_shift_for_ddim_and_ode_samplers():
    """eps' = eps - sqrt(1 - alpha_bar_t) * scale * grad, and x0_hat follows from eps'."""
    p, clf, x, y, t, net = _toy()
    den = GuidedDenoiser(net=net, process=p, y=y, classifier=clf, classifier_scale=2.0, clip_x0=False)
    x0, eps = den(x, t)
    s = p.sqrt_1m_ab[t].float().view(-1, 1, 1, 1)
    a = p.sqrt_ab[t].float().view(-1, 1, 1, 1)
    eps_expected = net(x, t, y) - s * den.guide_mean(x, t)
    torch.testing.assert_close(eps, eps_expected)
    torch.testing.assert_close(x0, (x - s * eps_expected) / a)
    # the mean-shifting samplers ask for the unshifted prediction
    x0_plain, eps_plain = den(x, t, shift_eps=False)
    torch.testing.assert_close(eps_plain, net(x, t, y))


def test_ddpm_shifts_the_mean_by_sigma_times_grad():
    """One guided DDPM step minus one unguided step with the same noise = Sigma_t * scale * grad."""
    p, clf, x, y, _, net = _toy()
    ts = [60, 30]
    t0 = torch.full((len(x),), 60)
    guided = GuidedDenoiser(net=net, process=p, y=y, classifier=clf, classifier_scale=3.0, clip_x0=False)
    plain = GuidedDenoiser(net=net, process=p, y=y, clip_x0=False)
    from difflab.diffusion.samplers import ddpm
    from difflab.diffusion.spacing import levels_grid

    out = {}
    for name, den in (("guided", guided), ("plain", plain)):
        steps = []
        ddpm(den, levels_grid(p, torch.tensor(ts)), x.clone(), generator=torch.Generator().manual_seed(3),
             on_step=lambda i, xt, x0: steps.append(xt.clone()))
        out[name] = steps[0]
    ab_t, ab_s = float(p.alphas_bar[60]), float(p.alphas_bar[30])
    var = (1 - ab_t / ab_s) * (1 - ab_s) / (1 - ab_t)
    torch.testing.assert_close(out["guided"] - out["plain"], var * guided.guide_mean(x, t0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m"])
def test_scale_zero_is_exactly_unguided(sampler):
    p, clf, _, y, _, net = _toy()
    noise = torch.randn(5, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    runs = []
    for den in (GuidedDenoiser(net=net, process=p, y=y, classifier=clf, classifier_scale=0.0),
                GuidedDenoiser(net=net, process=p, y=y)):
        runs.append(run_sampler(sampler, den, p, noise.clone(), 10, generator=torch.Generator().manual_seed(2)))
    assert torch.equal(runs[0], runs[1])


# ---- the analytic two-class problem -----------------------------------------------------
MU, S = 0.5, 0.6  # class 0 ~ N(-MU, S^2), class 1 ~ N(+MU, S^2), equal priors: they overlap


def _mixture(p: GaussianDiffusion):
    """The exact eps of the unconditional mixture, and the exact p(y | x_t, t)."""
    mus = torch.tensor([-MU, MU])

    def components(x, t):
        ab = p.alphas_bar.to(x)[t].view(-1, 1, 1, 1).float()
        var = ab * S**2 + 1 - ab
        log_lik = -0.5 * (x - ab.sqrt() * mus.view(1, 2, 1, 1)) ** 2 / var - 0.5 * torch.log(var)
        return ab, var, log_lik

    def net(x, t, y=None):
        ab, var, log_lik = components(x, t)
        w = torch.softmax(log_lik, dim=1)
        x0_k = mus.view(1, 2, 1, 1) + ab.sqrt() * S**2 / var * (x - ab.sqrt() * mus.view(1, 2, 1, 1))
        x0 = (w * x0_k).sum(1, keepdim=True)
        return (x - ab.sqrt() * x0) / (1 - ab).sqrt()

    def classifier(x, t):
        return components(x, t)[2].flatten(1)

    return net, classifier


@pytest.mark.parametrize("sampler,schedule,steps", [("ddpm", "linear", None), ("ddim", "cosine", 50),
                                                    ("dpmpp_2m", "dns", 50)])
def test_larger_scale_raises_the_share_of_the_requested_class(sampler, schedule, steps):
    """Scale 0 samples the mixture (half on each side); scale 1 samples p(x | y) exactly, so
    the share on the requested side is Phi(MU / S); larger scales sharpen it further. (DDPM's
    mean shift is a small-step approximation, so it runs all 1000 steps.)"""
    p = GaussianDiffusion(make_betas(schedule, 1000))
    net, classifier = _mixture(p)
    n = 4000
    y = torch.ones(n, dtype=torch.long)
    noise = torch.randn(n, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    shares = []
    for scale in (0.0, 1.0, 4.0):
        den = GuidedDenoiser(net=net, process=p, y=y, classifier=classifier, classifier_scale=scale, clip_x0=False)
        x = run_sampler(sampler, den, p, noise.clone(), steps, generator=torch.Generator().manual_seed(1))
        shares.append(float((x > 0).float().mean()))
    exact_conditional = 0.5 * (1 + math.erf(MU / S / math.sqrt(2)))
    assert shares[0] == pytest.approx(0.5, abs=0.04)
    assert shares[1] == pytest.approx(exact_conditional, abs=0.04)
    assert shares[2] > shares[1] + 0.05


def test_classifier_network_shapes_and_timestep_use():
    cfg = OmegaConf.create({"channels": 16, "channel_mults": [1, 2, 2], "num_res_blocks": 1,
                            "attention_resolutions": [4], "head_channels": 16, "dropout": 0.0, "norm_groups": 8})
    for size, channels in ((28, 1), (7, 4), (32, 3)):
        clf = build_classifier(cfg, channels, size, 10)
        for param in clf.parameters():  # zero-initialised residual branches would hide t at init
            torch.nn.init.normal_(param, std=0.05)
        x = torch.randn(3, channels, size, size)
        a, b = clf(x, torch.tensor([0, 0, 0])), clf(x, torch.tensor([500, 500, 500]))
        assert a.shape == (3, 10)
        assert not torch.allclose(a, b)  # the timestep reaches the logits
