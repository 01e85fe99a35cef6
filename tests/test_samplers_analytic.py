"""DPM-Solver++(2M) on Gaussian data, where the exact noise prediction is known in closed form:
it converges to the data distribution as steps grow, 20 steps land on the same samples as DDIM
with 1000 steps (both solve the same probability-flow ODE from the same noise), and guidance
acts through it as the formulas say."""

import pytest
import torch

from difflab.diffusion import GaussianDiffusion, GuidedDenoiser, make_betas, run_sampler

MU = torch.tensor([0.3, -0.5, 0.0, 0.8]).view(1, 4, 1, 1)  # one Gaussian per channel
SD = torch.tensor([0.5, 0.3, 0.7, 0.4]).view(1, 4, 1, 1)


def exact_eps(process: GaussianDiffusion, mu: torch.Tensor, sd: torch.Tensor):
    """E[eps | x_t] for data N(mu, sd^2): x_t ~ N(sqrt(ab) mu, ab sd^2 + 1 - ab)."""

    def net(x, t, y=None):
        ab = process.alphas_bar.to(x)[t].view(-1, 1, 1, 1)
        m = mu if y is None else mu[y.clamp(max=len(mu) - 1)]
        return (1 - ab).sqrt() * (x - ab.sqrt() * m) / (ab * sd**2 + 1 - ab)

    return net


NOISE = torch.randn(20000, 4, 1, 1, generator=torch.Generator().manual_seed(0))


def _sample(process, net, name, steps, n=20000, **denoiser_kw):
    den = GuidedDenoiser(net=net, process=process, clip_x0=False, **denoiser_kw)
    return run_sampler(name, den, process, NOISE[:n].clone(), steps, generator=torch.Generator().manual_seed(1))


def _ode_solution(process: GaussianDiffusion) -> torch.Tensor:
    """Where the probability-flow ODE takes each x_T for Gaussian data: the same standard score,
    x0 = mu + sd * (x_T - sqrt(ab_T) mu) / sqrt(var_T)."""
    ab = process.alpha_bar_T
    return MU + SD * (NOISE - ab**0.5 * MU) / (ab * SD**2 + 1 - ab).sqrt()


def _moment_error(x: torch.Tensor, mu: torch.Tensor, sd: torch.Tensor) -> float:
    return float((x.mean(0) - mu[0]).abs().max() + (x.std(0) - sd[0]).abs().max())


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_dpmpp_2m_converges_to_the_data_distribution(schedule):
    p = GaussianDiffusion(make_betas(schedule, 1000))
    net = exact_eps(p, MU, SD)
    reference = _sample(p, net, "ddim", 1000)
    assert float((reference - _ode_solution(p)).abs().mean()) < 0.003  # DDIM-1000 solves the ODE
    assert _moment_error(reference, MU, SD) < 0.02
    # mean distance of each sample from its DDIM-1000 twin (same x_T)
    errors = {n: float((_sample(p, net, "dpmpp_2m", n) - reference).abs().mean()) for n in (5, 10, 20, 50)}
    assert errors[50] < errors[20] < errors[10] < errors[5], errors
    assert errors[20] < 0.025 and errors[50] < 0.003, errors
    assert _moment_error(_sample(p, net, "dpmpp_2m", 20), MU, SD) < 0.05


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_dpmpp_2m_beats_ddim_at_equal_steps(schedule):
    p = GaussianDiffusion(make_betas(schedule, 1000))
    net = exact_eps(p, MU, SD)
    exact = _ode_solution(p)[:2000]
    for steps in (20, 50):
        dpm = float((_sample(p, net, "dpmpp_2m", steps, n=2000) - exact).abs().mean())
        ddim = float((_sample(p, net, "ddim", steps, n=2000) - exact).abs().mean())
        assert dpm < ddim / 2.5, (steps, dpm, ddim)


@pytest.mark.parametrize("steps", [20, 50])
def test_classifier_free_guidance_through_dpmpp_2m(steps):
    """Equal-variance Gaussians: eps is linear in the mean, so eps_u + w (eps_c - eps_u) is the
    exact eps of N(mu_u + w (mu_c - mu_u), sd^2), and that is what the sampler must return."""
    p = GaussianDiffusion(make_betas("linear", 1000))
    mus = torch.stack([MU[0], -MU[0], torch.zeros_like(MU[0])])  # classes 0, 1 and the null class 2
    net = exact_eps(p, mus, SD)
    y = torch.ones(4000, dtype=torch.long)
    w = 2.5
    out = _sample(p, net, "dpmpp_2m", steps, n=4000, y=y, null_class=2, cfg_scale=w)
    assert _moment_error(out, (w * -MU), SD) < 0.06


def test_classifier_guidance_through_dpmpp_2m():
    """A classifier whose log p(y=0 | x_t) is linear in x_t (the other logit pinned far above, so
    log_softmax[0] = logit - const) with slope sqrt(ab) m / var_t: the guided eps is the exact eps
    of N(mu + scale * m, sd^2), and that is what the sampler must return."""
    p = GaussianDiffusion(make_betas("linear", 1000))
    m, scale = torch.tensor([0.2, -0.1, 0.3, 0.05]).view(1, 4, 1, 1), 1.5

    def classifier(x, t):
        ab = p.alphas_bar.to(x)[t].view(-1, 1, 1, 1)
        logit = (ab.sqrt() * m * x / (ab * SD**2 + 1 - ab)).sum((1, 2, 3))
        return torch.stack([logit, torch.full_like(logit, 1e4)], 1)

    y = torch.zeros(4000, dtype=torch.long)
    out = _sample(p, exact_eps(p, MU, SD), "dpmpp_2m", 20, n=4000, y=y, classifier=classifier,
                  classifier_scale=scale)
    assert _moment_error(out, MU + scale * m, SD) < 0.06
