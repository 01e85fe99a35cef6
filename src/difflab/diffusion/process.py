"""The Gaussian diffusion process: forward noising, the posterior, prediction conversions and
the training loss. Networks and samplers build on this; it knows nothing of either.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

PREDICTIONS = ("eps", "x0", "v")
LOSSES = ("l2", "l1")


def broadcast_at(values: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """values[t] broadcast against a batch shaped like `like`."""
    return values.to(like.device)[t].float().view(-1, *([1] * (like.dim() - 1)))


class GaussianDiffusion:
    """Buffers derived from the betas, and the identities every sampler and loss relies on."""

    def __init__(self, betas: Tensor, prediction: str = "eps"):
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}: choose one of {', '.join(PREDICTIONS)}.")
        betas = betas.double()
        self.prediction = prediction
        self.T = len(betas)
        self.betas = betas
        self.alphas = 1 - betas
        self.alphas_bar = torch.cumprod(self.alphas, 0)
        self.alphas_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_bar[:-1]])
        self.sqrt_ab = self.alphas_bar.sqrt()
        self.sqrt_1m_ab = (1 - self.alphas_bar).sqrt()
        self.snr = self.alphas_bar / (1 - self.alphas_bar)
        # q(x_{t-1} | x_t, x0) = N(c0 * x0 + ct * x_t, posterior_var)
        self.posterior_var = betas * (1 - self.alphas_bar_prev) / (1 - self.alphas_bar)
        self.posterior_c0 = betas * self.alphas_bar_prev.sqrt() / (1 - self.alphas_bar)
        self.posterior_ct = (1 - self.alphas_bar_prev) * self.alphas.sqrt() / (1 - self.alphas_bar)

    @property
    def alpha_bar_T(self) -> float:
        return float(self.alphas_bar[-1])

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        return broadcast_at(self.sqrt_ab, t, x0) * x0 + broadcast_at(self.sqrt_1m_ab, t, x0) * noise

    def target(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """What the network is trained to output."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        return broadcast_at(self.sqrt_ab, t, x0) * noise - broadcast_at(self.sqrt_1m_ab, t, x0) * x0

    def to_x0_eps(self, out: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Convert a network output of any parameterisation to (x0_hat, eps_hat)."""
        a, s = broadcast_at(self.sqrt_ab, t, x_t), broadcast_at(self.sqrt_1m_ab, t, x_t)
        if self.prediction == "eps":
            return (x_t - s * out) / a, out
        if self.prediction == "x0":
            return out, (x_t - a * out) / s
        return a * x_t - s * out, s * x_t + a * out

    def eps_from_x0(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        return (x_t - broadcast_at(self.sqrt_ab, t, x_t) * x0) / broadcast_at(self.sqrt_1m_ab, t, x_t)

    def posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of q(x_{t-1} | x_t, x0)."""
        mean = broadcast_at(self.posterior_c0, t, x_t) * x0 + broadcast_at(self.posterior_ct, t, x_t) * x_t
        return mean, broadcast_at(self.posterior_var, t, x_t)

    def loss_weight(self, t: Tensor, min_snr_gamma: float | None) -> Tensor | None:
        """Min-SNR-gamma weights (Hang et al. 2023), expressed for this parameterisation."""
        if min_snr_gamma is None:
            return None
        snr = self.snr.to(t.device)[t].float()
        clipped = snr.clamp(max=min_snr_gamma)
        if self.prediction == "eps":
            return clipped / snr
        if self.prediction == "v":
            return clipped / (snr + 1)
        return clipped

    def training_loss(
        self,
        model: Callable[[Tensor, Tensor], Tensor],
        x0: Tensor,
        loss: str = "l2",
        min_snr_gamma: float | None = None,
        t: Tensor | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        """Per-example loss at uniformly drawn t; `model(x_t, t)` returns the prediction."""
        if t is None:
            t = torch.randint(0, self.T, (x0.shape[0],), device=x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        out = model(self.q_sample(x0, t, noise), t)
        target = self.target(x0, t, noise)
        err = F.mse_loss if loss == "l2" else F.l1_loss
        per_example = err(out.float(), target, reduction="none").flatten(1).mean(1)
        weight = self.loss_weight(t, min_snr_gamma)
        return per_example if weight is None else per_example * weight

    def classifier_loss(
        self,
        classify: Callable[[Tensor, Tensor], Tensor],
        x0: Tensor,
        y: Tensor,
        t: Tensor | None = None,
        noise: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Per-example cross-entropy of a noise-aware classifier `classify(x_t, t) -> logits` on
        inputs noised at uniformly drawn t, and whether each prediction was right."""
        if t is None:
            t = torch.randint(0, self.T, (x0.shape[0],), device=x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        logits = classify(self.q_sample(x0, t, noise), t).float()
        return F.cross_entropy(logits, y, reduction="none"), logits.argmax(1) == y
