"""Flow matching with the linear interpolant (rectified flow; Liu et al. 2022, Lipman et al. 2022;
SD3, Esser et al. 2024): x_t = (1 - t) x0 + t eps for t in [0, 1], the network predicts the
velocity v = eps - x0, so x0_hat = x_t - t v_hat and eps_hat = x_t + (1 - t) v_hat. Training t is
logit-normal (SD3: t = sigmoid(u), u ~ N(mean, std)) or uniform; the network is conditioned on
1000 t, the range its timestep embedding was made for.

t = 1 is pure noise (alpha = 0, an infinite VE sigma), where sampling on the index spacings
starts; the karras and logsnr spacings, which need a finite VE sigma, start at t = 1 - 1/1000.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from difflab.diffusion.process import NoiseProcess, per_example

T_SAMPLINGS = ("logit_normal", "uniform")


class FlowProcess(NoiseProcess):
    name = "flow"

    def __init__(self, t_sampling: str = "logit_normal", logit_mean: float = 0.0, logit_std: float = 1.0):
        if t_sampling not in T_SAMPLINGS:
            raise ValueError(f"unknown t_sampling {t_sampling!r}: choose one of {', '.join(T_SAMPLINGS)}.")
        self.t_sampling, self.logit_mean, self.logit_std = t_sampling, logit_mean, logit_std

    def alpha_sigma(self, level: Tensor) -> tuple[Tensor, Tensor]:
        t = level.double().cpu()
        return 1 - t, t

    def level_of_ve(self, ve_sigma: Tensor) -> Tensor:
        v = ve_sigma.double()
        return (v / (1 + v)).clamp(*self._t_range)

    def index_level(self, index: Tensor) -> Tensor:
        """t = (index + 1) / 1000: the trailing spacing's N steps are t = 1, 1 - 1/N, ..., 1/N."""
        return (index.double() + 1) / self.index_count

    @property
    def _t_range(self) -> tuple[float, float]:
        return 1 / self.index_count, 1 - 1 / self.index_count

    @property
    def ve_range(self) -> tuple[float, float]:
        lo, hi = self._t_range
        return lo / (1 - lo), hi / (1 - hi)

    def _draw(self, n: int, device: torch.device | str, generator: Optional[torch.Generator]) -> Tensor:
        if self.t_sampling == "uniform":
            return torch.rand(n, generator=generator, device=device)
        return torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(n, generator=generator, device=device))

    def net_inputs(self, x_t: Tensor, level: Tensor) -> tuple[Tensor, Tensor]:
        return x_t, 1000.0 * level.float()

    def to_x0_eps(self, out: Tensor, x_t: Tensor, level: Tensor) -> tuple[Tensor, Tensor]:
        t = per_example(level, x_t)
        return x_t - t * out, x_t + (1 - t) * out

    def target(self, x0: Tensor, noise: Tensor, level: Tensor) -> Tensor:
        return noise - x0

    def summary(self) -> str:
        return f"flow matching, {self.t_sampling} t"
