"""The DDPM (variance-preserving) process on a beta schedule: level t in 0..T-1, alpha_t =
sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t); the network predicts eps, x0 or v and is
conditioned on t itself; training draws t uniformly, optionally with min-SNR-gamma weights.

A level between two steps (the karras and logsnr spacings, EDM's churn) is interpolated linearly
in log-SNR, so the network is evaluated at a fractional t whose (alpha, sigma) is exactly the
one asked for.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from difflab.diffusion.process import NoiseProcess, per_example

PREDICTIONS = ("eps", "x0", "v")


def broadcast_at(values: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """values[t] broadcast against a batch shaped like `like`."""
    return values.to(like.device)[t].float().view(-1, *([1] * (like.dim() - 1)))


class DDPMProcess(NoiseProcess):
    """Buffers derived from the betas, and the identities every sampler and loss relies on."""

    name = "ddpm"

    def __init__(self, betas: Tensor, prediction: str = "eps", min_snr_gamma: Optional[float] = None):
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}: choose one of {', '.join(PREDICTIONS)}.")
        betas = betas.double()
        self.prediction, self.min_snr_gamma = prediction, min_snr_gamma
        self.T = self.index_count = len(betas)
        self.betas = betas
        self.alphas = 1 - betas
        self.alphas_bar = torch.cumprod(self.alphas, 0)
        self.alphas_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_bar[:-1]])
        self.sqrt_ab = self.alphas_bar.sqrt()
        self.sqrt_1m_ab = (1 - self.alphas_bar).sqrt()
        self.snr = self.alphas_bar / (1 - self.alphas_bar)
        self.log_snr = 0.5 * self.snr.log()  # lambda_t = ln(alpha_t / sigma_t), decreasing in t
        # q(x_{t-1} | x_t, x0) = N(c0 * x0 + ct * x_t, posterior_var)
        self.posterior_var = betas * (1 - self.alphas_bar_prev) / (1 - self.alphas_bar)
        self.posterior_c0 = betas * self.alphas_bar_prev.sqrt() / (1 - self.alphas_bar)
        self.posterior_ct = (1 - self.alphas_bar_prev) * self.alphas.sqrt() / (1 - self.alphas_bar)

    @property
    def alpha_bar_T(self) -> float:
        return float(self.alphas_bar[-1])

    def summary(self) -> str:
        return f"DDPM, {self.prediction} prediction, alpha_bar_T={self.alpha_bar_T:.3g}"

    def facts(self) -> dict[str, float]:
        return {"alpha_bar_T": self.alpha_bar_T}

    def alpha_sigma(self, level: Tensor) -> tuple[Tensor, Tensor]:
        t = level.cpu()
        if not t.is_floating_point() or bool((t == t.round()).all()):
            i = t.long()
            return self.sqrt_ab[i], self.sqrt_1m_ab[i]
        t = t.double().clamp(0, self.T - 1)
        lo = t.floor().long()
        hi = (lo + 1).clamp(max=self.T - 1)
        w = t - lo
        lam = torch.where(w == 0, self.log_snr[lo], self.log_snr[lo] + w * (self.log_snr[hi] - self.log_snr[lo]))
        return torch.sigmoid(2 * lam).sqrt(), torch.sigmoid(-2 * lam).sqrt()

    def level_of_ve(self, ve_sigma: Tensor) -> Tensor:
        finite = torch.isfinite(self.log_snr)
        lam, t = self.log_snr[finite].numpy()[::-1], np.arange(self.T, dtype=np.float64)[finite.numpy()][::-1]
        return torch.from_numpy(np.interp(-np.log(ve_sigma.double().numpy()), lam, t))

    def index_level(self, index: Tensor) -> Tensor:
        return index.round().long()

    @property
    def ve_range(self) -> tuple[float, float]:
        ve = (self.sqrt_1m_ab / self.sqrt_ab)
        return float(ve[0]), float(ve[torch.isfinite(ve)].max())

    def _draw(self, n: int, device: torch.device | str, generator: Optional[torch.Generator]) -> Tensor:
        return torch.randint(0, self.T, (n,), generator=generator, device=device)

    def net_inputs(self, x_t: Tensor, level: Tensor) -> tuple[Tensor, Tensor]:
        return x_t, level

    def _coefficients(self, level: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        alpha, sigma = self.alpha_sigma(level)
        return per_example(alpha, like), per_example(sigma, like)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        return self.add_noise(x0, noise, t)

    def target(self, x0: Tensor, noise: Tensor, level: Tensor) -> Tensor:
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        a, s = self._coefficients(level, x0)
        return a * noise - s * x0

    def to_x0_eps(self, out: Tensor, x_t: Tensor, level: Tensor) -> tuple[Tensor, Tensor]:
        a, s = self._coefficients(level, x_t)
        if self.prediction == "eps":
            return (x_t - s * out) / a, out
        if self.prediction == "x0":
            return out, (x_t - a * out) / s
        return a * x_t - s * out, s * x_t + a * out

    def posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of q(x_{t-1} | x_t, x0)."""
        mean = broadcast_at(self.posterior_c0, t, x_t) * x0 + broadcast_at(self.posterior_ct, t, x_t) * x_t
        return mean, broadcast_at(self.posterior_var, t, x_t)

    def loss_weight(self, level: Tensor) -> Optional[Tensor]:
        """Min-SNR-gamma weights (Hang et al. 2023), expressed for this parameterisation."""
        if self.min_snr_gamma is None:
            return None
        snr = self.snr.to(level.device)[level.long()].float()
        clipped = snr.clamp(max=self.min_snr_gamma)
        if self.prediction == "eps":
            return clipped / snr
        if self.prediction == "v":
            return clipped / (snr + 1)
        return clipped

    def level_bands(self, bands: int) -> list[tuple[str, int, int]]:
        width = len(str(self.T - 1))
        return [(f"{lo:0{width}d}-{hi:0{width}d}", lo, hi) for _, lo, hi in super().level_bands(bands)]


GaussianDiffusion = DDPMProcess  # the name the first issues used
