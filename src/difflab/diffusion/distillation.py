"""The math of few-step students over any objective's (alpha, sigma) (reference/methods.md,
"Distillation"): the deterministic DDIM step the teacher takes, progressive distillation's target
(Salimans & Ho 2022, Algorithm 2) and consistency distillation's parameterisation and target
(Song et al. 2023), written in the VE variables x / alpha and sigma / alpha so that DDPM, EDM and
flow students alike satisfy the boundary condition f(x, sigma_min) = x.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from difflab.diffusion.process import NoiseProcess, per_example

X0Fn = Callable[[Tensor, Tensor], Tensor]  # (x_t, levels) -> x0 estimate
SIGMA_DATA = 0.5  # the data's std the consistency boundary coefficients assume (as EDM's)
TIME_SCALE = 10.0  # c_skip falls off 10x faster in sigma than CD's, as in LCM, so f is the teacher's x0 almost at once


def ddim_step(x0: Tensor, x: Tensor, alpha_t: Tensor, sigma_t: Tensor, alpha_s: Tensor, sigma_s: Tensor) -> Tensor:
    """DDIM's deterministic step (eta = 0) from x at (alpha_t, sigma_t) to (alpha_s, sigma_s) given x0_hat;
    per-example coefficients of shape (B,)."""
    eps = (x - per_example(alpha_t, x) * x0) / per_example(sigma_t, x).clamp(min=1e-12)
    return per_example(alpha_s, x) * x0 + per_example(sigma_s, x) * eps


def progressive_target(z_t: Tensor, z_s: Tensor, alpha_t: Tensor, sigma_t: Tensor, alpha_s: Tensor,
                       sigma_s: Tensor) -> Tensor:
    """The x0 whose single DDIM step from z_t at (alpha_t, sigma_t) lands on z_s at (alpha_s, sigma_s):
    x = (z_s - (sigma_s / sigma_t) z_t) / (alpha_s - (sigma_s / sigma_t) alpha_t)."""
    ratio = per_example(sigma_s / sigma_t, z_t)
    return (z_s - ratio * z_t) / (per_example(alpha_s, z_t) - ratio * per_example(alpha_t, z_t))


def truncated_snr_weight(alpha: Tensor, sigma: Tensor) -> Tensor:
    """max(SNR, 1): progressive distillation's weight on the x0 loss."""
    return torch.clamp((alpha / sigma.clamp(min=1e-12)) ** 2, min=1.0)


def consistency_coefficients(ve_sigma: Tensor, ve_min: float) -> tuple[Tensor, Tensor]:
    """(c_skip, c_out) of f(x, s) = c_skip x_ve + c_out x0_hat at VE sigma s: c_skip = sd^2 / (u^2 + sd^2),
    c_out = u / sqrt(u^2 + sd^2) with u = TIME_SCALE (s - s_min), so f(x, s_min) = x_ve and f -> x0_hat as s grows
    (an infinite s, pure noise, gives c_skip = 0, c_out = 1)."""
    u = TIME_SCALE * (ve_sigma.double() - ve_min).clamp(min=0)
    finite = torch.isfinite(u)
    u = torch.where(finite, u, torch.zeros_like(u))
    c_skip = torch.where(finite, SIGMA_DATA**2 / (u**2 + SIGMA_DATA**2), torch.zeros_like(u))
    c_out = torch.where(finite, u / torch.sqrt(u**2 + SIGMA_DATA**2), torch.ones_like(u))
    return c_skip, c_out


def consistency_x0(x0_hat: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, ve_min: float) -> Tensor:
    """f(x_t, level): the consistency function built on a denoiser's x0_hat at (alpha, sigma) per example."""
    c_skip, c_out = consistency_coefficients(sigma / alpha, ve_min)
    x_ve = x_t / per_example(alpha, x_t).clamp(min=1e-12)
    skip = torch.where(per_example(c_skip, x_t) > 0, per_example(c_skip, x_t) * x_ve, torch.zeros_like(x_t))
    return skip + per_example(c_out, x_t) * x0_hat


class ConsistencyProcess(NoiseProcess):
    """A process whose network output means the consistency function f: the base objective's x0 estimate,
    skipped towards x_ve by the boundary coefficients. Everything else is the base process's."""

    def __init__(self, base: NoiseProcess, ve_min: float):
        self.base, self.ve_min = base, ve_min
        self.name, self.index_count, self.level_name = base.name, base.index_count, base.level_name

    def alpha_sigma(self, level: Tensor) -> tuple[Tensor, Tensor]:
        return self.base.alpha_sigma(level)

    def level_of_ve(self, ve_sigma: Tensor) -> Tensor:
        return self.base.level_of_ve(ve_sigma)

    def index_level(self, index: Tensor) -> Tensor:
        return self.base.index_level(index)

    @property
    def ve_range(self) -> tuple[float, float]:
        return self.base.ve_range

    def _draw(self, n: int, device, generator: Optional[torch.Generator]) -> Tensor:
        return self.base._draw(n, device, generator)

    def net_inputs(self, x_t: Tensor, level: Tensor) -> tuple[Tensor, Tensor]:
        return self.base.net_inputs(x_t, level)

    def target(self, x0: Tensor, noise: Tensor, level: Tensor) -> Tensor:
        return self.base.target(x0, noise, level)

    def to_x0_eps(self, out: Tensor, x_t: Tensor, level: Tensor) -> tuple[Tensor, Tensor]:
        x0_hat, _ = self.base.to_x0_eps(out, x_t, level)
        alpha, sigma = self.alpha_sigma(level)
        x0 = consistency_x0(x0_hat, x_t, alpha.to(x_t.device), sigma.to(x_t.device), self.ve_min)
        return x0, self.eps_from_x0(x0, x_t, level)

    def summary(self) -> str:
        return f"{self.base.summary()} (consistency student)"


def smallest_ve(process: NoiseProcess) -> float:
    """The VE sigma of the least noisy level of the process's index grid: where f(x) = x."""
    alpha, sigma = process.alpha_sigma(process.index_level(torch.zeros(1, dtype=torch.long)))
    return float(sigma[0] / alpha[0])


def consistency_target(ema_x0: X0Fn, teacher_x0: X0Fn, x_next: Tensor, level_next: Tensor, level_n: Tensor,
                       next_coeffs: tuple[Tensor, Tensor], n_coeffs: tuple[Tensor, Tensor]) -> Tensor:
    """CD's target f_ema(x_hat_n, t_n), x_hat_n the teacher's DDIM step from x_next at t_{n+1} (alpha, sigma
    `next_coeffs`) to t_n (`n_coeffs`); where t_n is clean data (sigma 0) f is the identity, so x_hat_n itself."""
    x_hat = ddim_step(teacher_x0(x_next, level_next), x_next, *next_coeffs, *n_coeffs)
    at_clean = per_example((n_coeffs[1] == 0).double(), x_hat) > 0
    return torch.where(at_clean, x_hat, ema_x0(x_hat, level_n))


def halvings(start: int, end: int) -> int:
    """How many rounds halve `start` steps down to `end` (a ValueError unless start = end * 2^k, k >= 1)."""
    rounds = math.log2(start / end) if start > 0 and end > 0 else -1
    if rounds < 1 or rounds != int(rounds):
        raise ValueError(f"{start} steps do not halve down to {end}")
    return int(rounds)
