"""Schedules against their formulas, process identities, and samplers on analytic cases."""

import math

import pytest
import torch

from difflab.diffusion import GaussianDiffusion, GuidedDenoiser, make_betas, respaced_timesteps, run_sampler
from difflab.diffusion.schedules import cosine_betas, dns_betas, linear_betas


# ---- schedules --------------------------------------------------------------------------
def test_linear_matches_formula():
    b = linear_betas(1000)
    assert b[0].item() == pytest.approx(1e-4)
    assert b[-1].item() == pytest.approx(0.02)
    assert b[500].item() == pytest.approx(1e-4 + (0.02 - 1e-4) * 500 / 999)
    assert float(torch.cumprod(1 - b, 0)[-1]) == pytest.approx(4.04e-5, rel=0.02)
    # T=250 spans the same noise range: betas scaled by 1000/T
    assert linear_betas(250)[-1].item() == pytest.approx(0.08)


def test_cosine_matches_formula():
    T, s = 1000, 0.008
    f = lambda t: math.cos(((t / T) + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    b = cosine_betas(T)
    for i in (0, 1, 400, 998):
        assert b[i].item() == pytest.approx(min(1 - f(i + 1) / f(i), 0.999), rel=1e-12)
    assert b[-1].item() == pytest.approx(0.999)
    ab = torch.cumprod(1 - b, 0)
    assert float(ab[499]) == pytest.approx(f(500) / f(0), rel=1e-9)


def test_dns_matches_formula_and_reference_alpha_bar():
    T = 1000
    b = dns_betas(T)
    low, high = 1e-4, 0.02
    for i in (0, 10, 999):
        assert b[i].item() == pytest.approx(low + (high - low) * ((i + 5) / (T + 1 + 5)) ** 2)
    assert float(torch.cumprod(1 - b, 0)[-1]) == pytest.approx(1.1e-3, rel=0.1)
    variant = dns_betas(T, offset=None)  # off = T
    assert variant[0].item() == pytest.approx(low + (high - low) * (T / (2 * T + 1)) ** 2)


@pytest.mark.parametrize("name", ["linear", "cosine", "dns"])
def test_schedules_are_valid_and_monotone(name):
    b = make_betas(name, 1000)
    assert b.shape == (1000,) and b.dtype == torch.float64
    assert (b > 0).all() and (b < 1).all()
    ab = torch.cumprod(1 - b, 0)
    assert (ab[1:] < ab[:-1]).all()


def test_dns_rejects_out_of_range():
    with pytest.raises(ValueError, match="beta_end"):
        dns_betas(10, 1e-4, 0.02)  # 0.02 * 100 = 2 > 1


@pytest.mark.parametrize("name", ["linear", "cosine", "dns"])
def test_zero_terminal_snr(name):
    b = make_betas(name, 1000, zero_terminal_snr=True)
    ab = torch.cumprod(1 - b, 0)
    assert float(ab[-1]) == pytest.approx(0.0, abs=1e-12)
    assert float(ab[0]) == pytest.approx(float(torch.cumprod(1 - make_betas(name, 1000), 0)[0]), rel=1e-9)


# ---- process ----------------------------------------------------------------------------
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_prediction_conversions_roundtrip(prediction):
    p = GaussianDiffusion(make_betas("cosine", 100), prediction)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(100, 1, 4, 4, generator=g), torch.randn(100, 1, 4, 4, generator=g)
    t = torch.arange(100)  # every step, the last too
    x_t = p.q_sample(x0, t, noise)
    x0_hat, eps_hat = p.to_x0_eps(p.target(x0, noise, t), x_t, t)
    # exact but for x_t's float32 rounding, which recovering x0 divides by sqrt(alpha_bar) (2000x at cosine's
    # last step) and eps by sqrt(1 - alpha_bar)
    alpha = p.alphas_bar[t].sqrt().view(-1, 1, 1, 1)
    sigma = (1 - p.alphas_bar[t]).sqrt().view(-1, 1, 1, 1)
    assert float(((x0_hat - x0).abs() * alpha).max()) < 2e-6
    assert float(((eps_hat - noise).abs() * sigma).max()) < 2e-6


def test_q_sample_statistics_and_posterior_identity():
    p = GaussianDiffusion(make_betas("linear", 1000))
    t = torch.full((200_000,), 300)
    x0 = torch.full((200_000, 1), 0.7)
    x_t = p.q_sample(x0, t, torch.randn_like(x0))
    ab = float(p.alphas_bar[300])
    assert x_t.mean().item() == pytest.approx(math.sqrt(ab) * 0.7, abs=0.01)
    assert x_t.var().item() == pytest.approx(1 - ab, rel=0.02)
    # Posterior variance equals beta_t (1 - ab_{t-1}) / (1 - ab_t); the mean is a weighted average
    mean, var = p.posterior(torch.ones(1, 1), torch.zeros(1, 1), torch.tensor([300]))
    expect = float(p.betas[300] * (1 - p.alphas_bar[299]) / (1 - p.alphas_bar[300]))
    assert var.item() == pytest.approx(expect, rel=1e-6)
    assert mean.item() == pytest.approx(float(p.betas[300] * p.alphas_bar[299].sqrt() / (1 - p.alphas_bar[300])), rel=1e-6)


def test_min_snr_weights():
    p = GaussianDiffusion(make_betas("linear", 1000), "eps", min_snr_gamma=5.0)
    t = torch.tensor([0, 999])
    w = p.loss_weight(t)
    assert w[0].item() == pytest.approx(5.0 / float(p.snr[0]), rel=1e-5)  # high SNR: clipped
    assert w[1].item() == pytest.approx(1.0)  # low SNR: unweighted
    pv = GaussianDiffusion(make_betas("linear", 1000), "v", min_snr_gamma=5.0)
    assert pv.loss_weight(torch.tensor([999])).item() == pytest.approx(float(p.snr[999] / (p.snr[999] + 1)), rel=1e-5)


# ---- samplers ---------------------------------------------------------------------------
def _oracle_net(process, point):
    """The exact eps-prediction network for a data set holding a single point."""

    def net(x, t, y=None):
        ab = process.alphas_bar.to(x)[t].view(-1, *[1] * (x.dim() - 1))
        return (x - ab.sqrt() * point) / (1 - ab).sqrt()

    return net


@pytest.mark.parametrize("sampler,steps", [("ddpm", None), ("ddpm", 50), ("ddim", 50), ("ddim", 10), ("dpmpp_2m", 10)])
@pytest.mark.parametrize("schedule", ["linear", "cosine", "dns"])
def test_true_noise_recovers_single_point(sampler, steps, schedule):
    p = GaussianDiffusion(make_betas(schedule, 1000))
    point = torch.tensor([0.5, -0.25, 0.9]).view(1, 3, 1, 1)
    den = GuidedDenoiser(net=_oracle_net(p, point), process=p)
    out = run_sampler(sampler, den, p, torch.randn(16, 3, 1, 1, generator=torch.Generator().manual_seed(0)),
                      steps, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, point.expand_as(out), atol=1e-3, rtol=0)


def test_ddim_eta0_is_deterministic_and_eta1_is_not():
    p = GaussianDiffusion(make_betas("linear", 100))
    net = lambda x, t, y=None: 0.1 * x  # noqa: E731
    den = GuidedDenoiser(net=net, process=p)
    noise = torch.randn(4, 1, 3, 3)
    a = run_sampler("ddim", den, p, noise.clone(), 20, eta=0.0, generator=torch.Generator().manual_seed(1))
    b = run_sampler("ddim", den, p, noise.clone(), 20, eta=0.0, generator=torch.Generator().manual_seed(2))
    c = run_sampler("ddim", den, p, noise.clone(), 20, eta=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_respacing():
    assert respaced_timesteps(1000, None) == list(range(999, -1, -1))
    ts = respaced_timesteps(1000, 50)
    assert len(ts) == 50 and ts[0] == 999 and ts[-1] == 19 and ts == sorted(ts, reverse=True)
    assert respaced_timesteps(10, 3) == [9, 6, 2]
    with pytest.raises(ValueError, match="sampler.steps"):
        respaced_timesteps(100, 101)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_gaussian_data_distribution(schedule):
    """Data N(mu, s^2): the exact eps is known in closed form, so samplers can be checked
    against the true distribution, and DPM-Solver++ against DDIM with 1000 steps."""
    mu, s = 0.3, 0.5
    p = GaussianDiffusion(make_betas(schedule, 1000))

    def net(x, t, y=None):
        ab = p.alphas_bar.to(x)[t].view(-1, 1, 1, 1)
        return (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * s**2 + 1 - ab)

    den = GuidedDenoiser(net=net, process=p, clip_x0=False)
    noise = torch.randn(20000, 1, 1, 1, generator=torch.Generator().manual_seed(0))

    def std(name, steps):
        out = run_sampler(name, den, p, noise.clone(), steps, generator=torch.Generator().manual_seed(1))
        assert out.mean().item() == pytest.approx(mu, abs=0.015), (name, steps)
        return out.std().item()

    assert std("ddpm", None) == pytest.approx(s, abs=0.01)
    reference = std("ddim", None)
    assert reference == pytest.approx(s, abs=0.01)
    errors = [abs(std("dpmpp_2m", n) - reference) for n in (5, 10, 20, 50)]
    assert errors[-1] < errors[1] < errors[0]
    assert errors[2] < 0.025


def test_cfg_scale_one_equals_conditional():
    p = GaussianDiffusion(make_betas("linear", 100))
    net = lambda x, t, y: x * (y.view(-1, 1, 1, 1).float() + 1) * 0.01  # noqa: E731
    y = torch.tensor([0, 1, 2, 1])
    x = torch.randn(4, 1, 2, 2)
    t = torch.full((4,), 50)
    plain = GuidedDenoiser(net=net, process=p, y=y, null_class=3)(x, t)
    cfg1 = GuidedDenoiser(net=net, process=p, y=y, null_class=3, cfg_scale=1.0)(x, t)
    cfg3 = GuidedDenoiser(net=net, process=p, y=y, null_class=3, cfg_scale=3.0)(x, t)
    torch.testing.assert_close(plain[1], cfg1[1])
    eps_c, eps_u = net(x, t, y), net(x, t, torch.full_like(y, 3))
    x0_expected, _ = p.to_x0_eps(eps_u + 3 * (eps_c - eps_u), x, t)
    torch.testing.assert_close(cfg3[0], x0_expected.clamp(-1, 1))
