"""What every objective's noise process is: x_l = alpha(l) x0 + sigma(l) eps at a noise level l
in the objective's own variable (DDPM's step t, EDM's sigma, flow matching's t), the network's
inputs there (its preconditioning), its output turned into estimates of x0 and eps, the training
levels and loss, and the maps between levels and the VE sigma = sigma / alpha that the step
spacings and samplers work in (reference/methods.md, "One notation for every objective").

Samplers see a process only through the (alpha, sigma) of each level and a denoiser's x0
estimates, so each sampler works with each objective.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

LOSSES = ("l2", "l1")
Model = Callable[[Tensor, Tensor], Tensor]  # (network input, noise conditioning) -> network output


def per_example(x: Tensor, like: Tensor) -> Tensor:
    """A (B,) tensor of coefficients, float32, shaped to broadcast against the batch `like`."""
    return x.to(like.device, torch.float32).view(-1, *([1] * (like.dim() - 1)))


def log_snr(alpha: float, sigma: float) -> float:
    """lambda = ln(alpha / sigma): -inf at pure noise, +inf at clean data."""
    if alpha == 0.0:
        return -math.inf
    if sigma == 0.0:
        return math.inf
    return math.log(alpha / sigma)


class NoiseProcess(ABC):
    """One objective's forward process, parameterisation and training distribution of levels."""

    name = ""
    index_count = 1000  # the index grid the trailing/leading/linspace spacings divide (DDPM: its T)

    @abstractmethod
    def alpha_sigma(self, level: Tensor) -> tuple[Tensor, Tensor]:
        """alpha and sigma at each level, float64."""

    @abstractmethod
    def level_of_ve(self, ve_sigma: Tensor) -> Tensor:
        """The level whose sigma / alpha is ve_sigma (float64, clamped to the process's range)."""

    @abstractmethod
    def index_level(self, index: Tensor) -> Tensor:
        """The level of each index of the 0..index_count-1 grid (index_count - 1 the noisiest)."""

    @property
    @abstractmethod
    def ve_range(self) -> tuple[float, float]:
        """The finite (smallest, largest) sigma / alpha the karras and logsnr spacings span."""

    @abstractmethod
    def _draw(self, n: int, device: torch.device | str, generator: Optional[torch.Generator]) -> Tensor:
        """n training levels drawn on `device` (with `generator` where one is given)."""

    def draw_levels(self, n: int, device: torch.device | str = "cpu",
                    generator: Optional[torch.Generator] = None) -> Tensor:
        """n training levels from the objective's training distribution; with a (CPU) generator
        they are drawn on the CPU, so fixed draws do not depend on the device."""
        return self._draw(n, "cpu" if generator is not None else device, generator).to(device)

    @abstractmethod
    def net_inputs(self, x_t: Tensor, level: Tensor) -> tuple[Tensor, Tensor]:
        """(what the network takes as its image, its noise conditioning) at these levels."""

    @abstractmethod
    def to_x0_eps(self, out: Tensor, x_t: Tensor, level: Tensor) -> tuple[Tensor, Tensor]:
        """The network's output at x_t as (x0_hat, eps_hat)."""

    @abstractmethod
    def target(self, x0: Tensor, noise: Tensor, level: Tensor) -> Tensor:
        """What the network is trained to output at x_t = alpha x0 + sigma noise."""

    def loss_weight(self, level: Tensor) -> Optional[Tensor]:
        """Per-example weight of the loss, or None for unweighted."""
        return None

    def add_noise(self, x0: Tensor, noise: Tensor, level: Tensor) -> Tensor:
        alpha, sigma = self.alpha_sigma(level)
        return per_example(alpha, x0) * x0 + per_example(sigma, x0) * noise

    def eps_from_x0(self, x0: Tensor, x_t: Tensor, level: Tensor) -> Tensor:
        alpha, sigma = self.alpha_sigma(level)
        return (x_t - per_example(alpha, x_t) * x0) / per_example(sigma, x_t)

    def ve_sigma(self, level: Tensor) -> Tensor:
        alpha, sigma = self.alpha_sigma(level)
        return sigma / alpha

    def clean_levels(self, n: int, device: torch.device | str = "cpu") -> Tensor:
        """n times the least noisy level of the index grid (where a classifier reads clean data)."""
        return self.index_level(torch.zeros(n, dtype=torch.long)).to(device)

    def summary(self) -> str:
        """The process in a few words, for the log."""
        return self.name

    def facts(self) -> dict[str, float]:
        """Numbers about the process a run records (DDPM: alpha_bar_T)."""
        return {}

    def _noised(self, x0: Tensor, level: Tensor | None, noise: Tensor | None) -> tuple[Tensor, Tensor]:
        """The levels (drawn when not given) and noise (likewise) of a training example."""
        level = self.draw_levels(x0.shape[0], x0.device) if level is None else level
        return level, torch.randn_like(x0) if noise is None else noise

    def training_loss(self, model: Model, x0: Tensor, loss: str = "l2", level: Tensor | None = None,
                      noise: Tensor | None = None) -> Tensor:
        """Per-example loss at levels drawn from the training distribution (or those given)."""
        level, noise = self._noised(x0, level, noise)
        out = model(*self.net_inputs(self.add_noise(x0, noise, level), level))
        err = F.mse_loss if loss == "l2" else F.l1_loss
        per = err(out.float(), self.target(x0, noise, level), reduction="none").flatten(1).mean(1)
        weight = self.loss_weight(level)
        return per if weight is None else per * weight.to(per)

    def classifier_loss(self, classify: Model, x0: Tensor, y: Tensor, level: Tensor | None = None,
                        noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Per-example cross-entropy of a noise-aware classifier `classify(x_in, cond) -> logits`
        on inputs noised at training levels (or those given), and whether each was right."""
        level, noise = self._noised(x0, level, noise)
        logits = classify(*self.net_inputs(self.add_noise(x0, noise, level), level)).float()
        return F.cross_entropy(logits, y, reduction="none"), logits.argmax(1) == y

    def level_bands(self, bands: int) -> list[tuple[str, int, int]]:
        """`bands` equal ranges of the index grid as (label, first index, last index); a band's
        levels are index_level of the indices in it."""
        out = []
        for b in range(bands):
            lo, hi = b * self.index_count // bands, (b + 1) * self.index_count // bands - 1
            levels = self.index_level(torch.tensor([lo, hi], dtype=torch.float64)).tolist()
            out.append((f"{self.level_name}={levels[0]:.3g}..{levels[1]:.3g}", lo, hi))
        return out

    level_name = "t"  # what a level is called in reports


def parse_band(label: str) -> tuple[str, float, float]:
    """(level name, lowest, highest) of a level_bands label: "t=0.001..0.1", "sigma=0.002..0.0088",
    or DDPM's "000-099" (steps)."""
    if "=" in label:
        name, span = label.split("=", 1)
        lo, hi = span.split("..")
        return name, float(lo), float(hi)
    lo, hi = label.split("-")
    return "t", float(lo), float(hi)
