"""Reverse-process samplers over (alpha, sigma), so each works with every objective. Each is one
short loop that reads like its paper's algorithm.

A sampler walks a Grid (spacing.py): the levels, noisiest first, with their (alpha, sigma), and
clean data after the last. It sees the model only through a `Denoiser`, which returns
(x0_hat, eps_hat) with guidance and clipping already applied, and through `denoiser.guide_mean`,
the classifier-guidance shift of the ancestral mean. lambda = ln(alpha / sigma) throughout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch
from torch import Tensor

from difflab.diffusion.process import NoiseProcess, log_snr
from difflab.diffusion.spacing import Grid, sampling_grid

# (step index i, x_t at the level step i reached, x0_hat) -> None, or the x_t to go on from (inpainting's
# re-noised known region); called after every step.
OnStep = Callable[[int, Tensor, Tensor], Optional[Tensor]]


class Denoiser(Protocol):
    def __call__(self, x: Tensor, level: Tensor, *, shift_eps: bool = True) -> tuple[Tensor, Tensor]: ...

    def guide_mean(self, x: Tensor, level: Tensor) -> Optional[Tensor]: ...


@dataclass(frozen=True)
class Churn:
    """EDM's stochastic churn (Algorithm 2): S_churn = 0 is the deterministic Heun sampler."""

    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0


def _noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _after_step(on_step: OnStep | None, i: int, x: Tensor, x0: Tensor) -> Tensor:
    """x after step i, as the step hook leaves it."""
    out = on_step(i, x, x0) if on_step else None
    return x if out is None else out


def _posterior(a_t: float, s_t: float, a_s: float, s_s: float) -> tuple[float, float, float]:
    """q(x_s | x_t, x0) = N(ct x_t + c0 x0, var) for any (alpha, sigma) (Kingma et al. 2021, VDM)."""
    if s_s == 0.0:
        return 0.0, 1.0, 0.0
    a_ts = a_t / a_s
    s2_ts = s_t**2 - a_ts**2 * s_s**2  # the variance the step from s to t adds
    return a_ts * s_s**2 / s_t**2, a_s * s2_ts / s_t**2, s2_ts * s_s**2 / s_t**2


def ddpm(denoiser: Denoiser, grid: Grid, x: Tensor, generator: torch.Generator | None = None,
         on_step: OnStep | None = None, **_) -> Tensor:
    """Ancestral sampling from q(x_s | x_t, x0_hat) (Ho et al. 2020, Alg. 2; any spacing)."""
    for i in range(len(grid)):
        level = grid.level(i, x)
        x0, _ = denoiser(x, level, shift_eps=False)
        ct, c0, var = _posterior(grid.alphas[i], grid.sigmas[i], grid.alphas[i + 1], grid.sigmas[i + 1])
        mean = ct * x + c0 * x0
        shift = denoiser.guide_mean(x, level)
        if shift is not None:
            mean = mean + var * shift  # classifier guidance: mu + Sigma * grad log p(y | x_t)
        x = mean + math.sqrt(var) * _noise(x, generator) if var > 0 else mean
        x = _after_step(on_step, i, x, x0)
    return x


def ddim(denoiser: Denoiser, grid: Grid, x: Tensor, eta: float = 0.0, generator: torch.Generator | None = None,
         on_step: OnStep | None = None, **_) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12); eta = 0 is deterministic (the Euler step of the
    probability-flow ODE in x / alpha and sigma / alpha), eta = 1 matches DDPM."""
    for i in range(len(grid)):
        x0, eps = denoiser(x, grid.level(i, x))
        a_s, s_s = grid.alphas[i + 1], grid.sigmas[i + 1]
        c = eta * math.sqrt(_posterior(grid.alphas[i], grid.sigmas[i], a_s, s_s)[2])
        x = a_s * x0 + math.sqrt(max(s_s**2 - c**2, 0.0)) * eps
        if c > 0:
            x = x + c * _noise(x, generator)
        x = _after_step(on_step, i, x, x0)
    return x


def heun(denoiser: Denoiser, grid: Grid, x: Tensor, process: NoiseProcess, churn: Churn = Churn(),
         generator: torch.Generator | None = None, on_step: OnStep | None = None, **_) -> Tensor:
    """EDM's Algorithm 2 in the VE variables x / alpha and sigma / alpha, where the ODE is
    dx/dsigma = eps: an Euler step corrected by the slope at its end (none into clean data).
    From pure noise (alpha = 0, an infinite VE sigma) the step is the Euler step's limit."""
    n = len(grid)
    for i in range(n):
        a_t, s_t, a_s, s_s = grid.alphas[i], grid.sigmas[i], grid.alphas[i + 1], grid.sigmas[i + 1]
        level = grid.level(i, x)
        if a_t == 0.0:
            x0, eps = denoiser(x, level)
            x = a_s * x0 + s_s * eps
        else:
            ve_t, x_ve = s_t / a_t, x / a_t
            gamma = min(churn.s_churn / n, math.sqrt(2) - 1) if churn.s_tmin <= ve_t <= churn.s_tmax else 0.0
            if gamma > 0:  # raise the noise to ve_hat = ve_t (1 + gamma), at a level the process has
                level_hat = process.level_of_ve(torch.tensor([ve_t * (1 + gamma)]))
                a_hat, s_hat = (float(v[0]) for v in process.alpha_sigma(level_hat))
                x_ve = x_ve + math.sqrt(max((s_hat / a_hat) ** 2 - ve_t**2, 0.0)) * churn.s_noise * _noise(x, generator)
                ve_t, a_t = s_hat / a_hat, a_hat
                level = torch.full_like(level, float(level_hat[0]), dtype=torch.float32)
            x0, eps = denoiser(a_t * x_ve, level)
            ve_s = s_s / a_s
            x_next = x0 + ve_s * eps  # x_ve + (ve_s - ve_t) eps
            if s_s > 0:
                _, eps_next = denoiser(a_s * x_next, grid.level(i + 1, x))
                x_next = x_ve + (ve_s - ve_t) * (eps + eps_next) / 2
            x = a_s * x_next
        x = _after_step(on_step, i, x, x0)
    return x


def dpmpp_2m(denoiser: Denoiser, grid: Grid, x: Tensor, on_step: OnStep | None = None, **_) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) in data prediction. The first step is first
    order (no earlier estimate yet), and so is the final one into clean data, where the update
    is x0_hat itself: diffusers' DPMSolverMultistepScheduler at every step count."""
    x0_prev, h_prev = None, math.inf
    for i in range(len(grid)):
        x0, _ = denoiser(x, grid.level(i, x))
        a_t, s_t, a_s, s_s = grid.alphas[i], grid.sigmas[i], grid.alphas[i + 1], grid.sigmas[i + 1]
        if s_s == 0.0:
            x = x0
        else:
            h = log_snr(a_s, s_s) - log_snr(a_t, s_t)
            d = x0 if x0_prev is None or math.isinf(h_prev) else x0 + (x0 - x0_prev) * (h / (2 * h_prev))
            x = (s_s / s_t) * x - a_s * math.expm1(-h) * d
            x0_prev, h_prev = x0, h
        x = _after_step(on_step, i, x, x0)
    return x


def _unipc_corrector_weights(r: float, h: float) -> tuple[float, float]:
    """UniC-2's (rho_1, rho_2) for B(h) = e^(-h) - 1 (bh2): R rho = b with R = [[1, 1], [r, 1]],
    b_k = k! phi_(k+1)(-h) h / B(h) (Zhao et al. 2023, Alg. 3; diffusers' multistep_uni_c_bh_update)."""
    hh = -h
    b_h = math.expm1(hh)
    phi = b_h / hh - 1  # h phi_2(h) scaled, then phi_3
    b1 = phi / b_h
    phi = phi / hh - 0.5
    b2 = 2 * phi / b_h
    rho1 = (b1 - b2) / (1 - r)
    return rho1, b1 - rho1


def unipc(denoiser: Denoiser, grid: Grid, x: Tensor, on_step: OnStep | None = None, **_) -> Tensor:
    """UniPC-2 with B(h) = e^(-h) - 1 (Zhao et al. 2023, "bh2"), in data prediction, as
    diffusers' UniPCMultistepScheduler: each new estimate first corrects the step that led to it
    (UniC, of that step's order), then the predictor (UniP, which at order 2 is DPM-Solver++(2M))
    takes the next step; first order at the start and into clean data, so NFE = steps."""
    lams = [log_snr(a, s) for a, s in zip(grid.alphas, grid.sigmas)]
    history: list[Tensor] = []  # the x0 estimates at the levels so far, last two
    x_before, order = x, 1
    for i in range(len(grid)):
        x0, _ = denoiser(x, grid.level(i, x))
        if history:  # UniC: redo the step x_before (level i-1) -> x (level i) with x0 at both ends
            h = lams[i] - lams[i - 1]
            m0 = history[-1]
            x = (grid.sigmas[i] / grid.sigmas[i - 1]) * x_before - grid.alphas[i] * math.expm1(-h) * m0
            if order == 2 and all(map(math.isfinite, lams[i - 2:i + 1])):
                r = (lams[i - 2] - lams[i - 1]) / h
                rho1, rho2 = _unipc_corrector_weights(r, h)
                x = x - grid.alphas[i] * math.expm1(-h) * (rho1 * (history[-2] - m0) / r + rho2 * (x0 - m0))
            else:
                x = x - grid.alphas[i] * math.expm1(-h) * 0.5 * (x0 - m0)
        history = [*history[-1:], x0]
        order = min(2, len(grid) - i, len(history))
        if order == 2 and not all(map(math.isfinite, lams[i - 1:i + 1])):
            order = 1
        x_before = x
        h = lams[i + 1] - lams[i]
        x = (grid.sigmas[i + 1] / grid.sigmas[i]) * x - grid.alphas[i + 1] * math.expm1(-h) * x0
        if order == 2:  # UniP-2: rho = 1/2 on D1 = (m_prev - m) / r
            r = (lams[i - 1] - lams[i]) / h
            x = x - grid.alphas[i + 1] * math.expm1(-h) * 0.5 * (history[0] - x0) / r
        x = _after_step(on_step, i, x, x0)
    return x


def consistency(denoiser: Denoiser, grid: Grid, x: Tensor, generator: torch.Generator | None = None,
                on_step: OnStep | None = None, **_) -> Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1): the consistency function's x0 at
    each level, noised afresh to the next; one step is a single evaluation from pure noise."""
    for i in range(len(grid)):
        x0, _ = denoiser(x, grid.level(i, x))
        a_s, s_s = grid.alphas[i + 1], grid.sigmas[i + 1]
        x = a_s * x0 + s_s * _noise(x, generator) if s_s > 0 else x0
        x = _after_step(on_step, i, x, x0)
    return x


# The registry of sampler.name: a new sampler is its function here plus its conf/sampler/ YAML.
# euler is ddim: DDIM's deterministic step is Euler's in x / alpha and sigma / alpha.
SAMPLERS = {"ddpm": ddpm, "ddim": ddim, "euler": ddim, "heun": heun, "dpmpp_2m": dpmpp_2m, "unipc": unipc,
            "consistency": consistency}


def nfe(name: str, steps: int) -> int:
    """Network evaluations per sample (with CFG, each is one batched pass of 2B)."""
    return 2 * steps - 1 if name == "heun" else steps


def run_sampler(name: str, denoiser: Denoiser, process: NoiseProcess, noise: Tensor, steps: int | None,
                eta: float = 0.0, generator: torch.Generator | None = None, on_step: OnStep | None = None,
                spacing: Optional[str] = None, rho: float = 7.0, churn: Churn = Churn(), start: int = 0,
                x_t: Optional[Tensor] = None) -> Tensor:
    """Sample from standard normal `noise`, scaled to the first level's marginal for unit-variance
    data (sqrt(alpha^2 + sigma^2): 1 for DDPM and flow, about sigma_max for EDM); or, from step
    `start` of the grid on, from `x_t` at that step's level (SDEdit's noised input). Gradients stay
    off except where the denoiser enables them (classifier guidance differentiates the classifier)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}: choose one of {', '.join(SAMPLERS)}.")
    grid = sampling_grid(process, steps, spacing, rho).from_step(start)
    x = noise * math.hypot(grid.alphas[0], grid.sigmas[0]) if x_t is None else x_t
    # inference_mode skips autograd's version counters and views bookkeeping; classifier guidance
    # differentiates the classifier, which tensors made under inference_mode cannot enter.
    guided = getattr(denoiser, "classifier", None) is not None
    with torch.no_grad() if guided else torch.inference_mode():
        return SAMPLERS[name](denoiser, grid, x, eta=eta, generator=generator, on_step=on_step, process=process,
                              churn=churn)
