"""EDM (Karras et al. 2022): the variance-exploding process x = x0 + sigma eps (alpha = 1, the
level is sigma itself) with its preconditioning, D(x; sigma) = c_skip x + c_out F(c_in x; c_noise),
log-normal training sigmas and the loss weight (sigma^2 + sd^2) / (sigma sd)^2 on ||D - x0||^2.

That weighted loss equals the unweighted one on F against (x0 - c_skip x) / c_out (the weight
times c_out^2 is 1), which is how it is computed: the network's own output is what is regressed.
c_noise = ln(sigma) / 4 as in the paper, times 1000 so that the UNet's sinusoidal embedding
(made for timesteps 0..999) sees a spread like DDPM's.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from difflab.diffusion.process import NoiseProcess, per_example

NOISE_EMBED_SCALE = 1000.0


class EDMProcess(NoiseProcess):
    name = "edm"
    level_name = "sigma"

    def __init__(self, sigma_data: float = 0.5, p_mean: float = -1.2, p_std: float = 1.2,
                 sigma_min: float = 0.002, sigma_max: float = 80.0):
        self.sigma_data, self.p_mean, self.p_std = sigma_data, p_mean, p_std
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def alpha_sigma(self, level: Tensor) -> tuple[Tensor, Tensor]:
        sigma = level.double().cpu()
        return torch.ones_like(sigma), sigma

    def level_of_ve(self, ve_sigma: Tensor) -> Tensor:
        return ve_sigma.double().clamp(self.sigma_min, self.sigma_max)

    def index_level(self, index: Tensor) -> Tensor:
        """Uniform in log sigma from sigma_min (index 0) to sigma_max (the last index): uniform in
        sigma would put nine in ten levels above sigma = 8, where the image is long gone."""
        u = index.double() / (self.index_count - 1)
        return (math.log(self.sigma_min) + u * (math.log(self.sigma_max) - math.log(self.sigma_min))).exp()

    @property
    def ve_range(self) -> tuple[float, float]:
        return self.sigma_min, self.sigma_max

    def _draw(self, n: int, device: torch.device | str, generator: Optional[torch.Generator]) -> Tensor:
        return (self.p_mean + self.p_std * torch.randn(n, generator=generator, device=device)).exp()

    def preconditioning(self, sigma: Tensor, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """c_skip, c_out, c_in at each sigma, shaped against `like`."""
        s, sd = per_example(sigma, like), self.sigma_data
        norm = (s**2 + sd**2).sqrt()
        return sd**2 / norm**2, s * sd / norm, 1 / norm

    def net_inputs(self, x_t: Tensor, level: Tensor) -> tuple[Tensor, Tensor]:
        _, _, c_in = self.preconditioning(level, x_t)
        return c_in * x_t, NOISE_EMBED_SCALE * level.float().log() / 4

    def to_x0_eps(self, out: Tensor, x_t: Tensor, level: Tensor) -> tuple[Tensor, Tensor]:
        c_skip, c_out, _ = self.preconditioning(level, x_t)
        x0 = c_skip * x_t + c_out * out
        return x0, (x_t - x0) / per_example(level, x_t)

    def target(self, x0: Tensor, noise: Tensor, level: Tensor) -> Tensor:
        c_skip, c_out, _ = self.preconditioning(level, x0)
        return (x0 - c_skip * (x0 + per_example(level, x0) * noise)) / c_out

    def summary(self) -> str:
        return f"EDM, sigma {self.sigma_min:g}..{self.sigma_max:g}, sigma_data {self.sigma_data:g}"
