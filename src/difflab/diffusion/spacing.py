"""Which noise levels a sampler visits (reference/methods.md, "Step spacings"): `trailing`,
`leading` and `linspace` divide the process's index grid (DDPM's 0..T-1) as diffusers does;
`karras` (EDM's rho-spacing) and `logsnr` (uniform in log-SNR, diffusers' use_lu_lambdas) are
laid out in the VE sigma = sigma / alpha and mapped to the process's levels. After the last
level comes clean data (alpha 1, sigma 0)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from difflab.diffusion.process import NoiseProcess

INDEX_SPACINGS = ("trailing", "leading", "linspace")
SPACINGS = (*INDEX_SPACINGS, "karras", "logsnr")
DEFAULT_SPACING = {"ddpm": "trailing", "edm": "karras", "flow": "trailing"}  # sampler.spacing=null


@dataclass(frozen=True)
class Grid:
    """The levels a sampler evaluates the network at, noisiest first, and the (alpha, sigma) of
    each, with clean data (1, 0) appended: alphas[i + 1], sigmas[i + 1] are where step i goes."""

    levels: Tensor
    alphas: list[float]
    sigmas: list[float]

    def __len__(self) -> int:
        return len(self.levels)

    def from_step(self, start: int) -> Grid:
        """The grid of steps start, start + 1, ... (start = len: clean data alone, no steps)."""
        return Grid(self.levels[start:], self.alphas[start:], self.sigmas[start:])

    def level(self, i: int, x: Tensor) -> Tensor:
        """Level i for every example of the batch x (int64 where the levels are DDPM steps)."""
        value = self.levels[i]
        dtype = torch.long if not value.is_floating_point() else torch.float32
        return torch.full((x.shape[0],), value.item(), dtype=dtype, device=x.device)


def index_spacing(name: str, count: int, steps: int) -> list[int]:
    """`steps` indices of 0..count-1, noisiest first, by diffusers' formulas (duplicates dropped)."""
    if name == "trailing":  # always starts from the noisiest index (Lin et al. 2023)
        ts = (count - torch.arange(steps, dtype=torch.float64) * (count / steps)).round().long() - 1
    elif name == "leading":
        ts = (torch.arange(steps) * (count // steps)).flip(0)
    else:
        ts = torch.linspace(0, count - 1, steps, dtype=torch.float64).round().long().flip(0)
    return list(dict.fromkeys(ts.tolist()))


def respaced_timesteps(T: int, steps: int | None) -> list[int]:
    """`steps` trailing timesteps of 0..T-1 (all T when steps is None)."""
    steps = T if steps is None else steps
    if not 1 <= steps <= T:
        raise ValueError(f"sampler.steps must be between 1 and schedule.T={T}, got {steps}: change sampler.steps.")
    return index_spacing("trailing", T, steps)


def karras_sigmas(steps: int, lo: float, hi: float, rho: float = 7.0) -> list[float]:
    """EDM's s_i = (hi^(1/rho) + i/(N-1) (lo^(1/rho) - hi^(1/rho)))^rho, i = 0..N-1."""
    if steps == 1:
        return [hi]
    return [(hi ** (1 / rho) + i / (steps - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho for i in range(steps)]


def logsnr_sigmas(steps: int, lo: float, hi: float) -> list[float]:
    """Uniform in lambda = -ln(VE sigma) from the noisiest end to the cleanest."""
    if steps == 1:
        return [hi]
    return [math.exp(math.log(hi) + i / (steps - 1) * (math.log(lo) - math.log(hi))) for i in range(steps)]


def spacing_of(process: NoiseProcess, spacing: Optional[str]) -> str:
    """The spacing a sampler takes: the one named, else the objective's usual one."""
    return spacing or DEFAULT_SPACING[process.name]


def sampling_grid(process: NoiseProcess, steps: Optional[int], spacing: Optional[str] = None,
                  rho: float = 7.0) -> Grid:
    """The grid of `steps` levels (None: every index of the process's grid) by `spacing` (None:
    the objective's usual one)."""
    spacing = spacing_of(process, spacing)
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}: choose one of {', '.join(SPACINGS)}.")
    steps = process.index_count if steps is None else steps
    if spacing in INDEX_SPACINGS:
        if not 1 <= steps <= process.index_count:
            of = f"schedule.T={process.index_count}" if process.name == "ddpm" else f"{process.index_count}"
            raise ValueError(f"sampler.steps must be between 1 and {of} for sampler.spacing={spacing}, got {steps}: "
                             "change sampler.steps, or use sampler.spacing=karras or logsnr.")
        levels = process.index_level(torch.tensor(index_spacing(spacing, process.index_count, steps)))
    else:
        if steps < 1:
            raise ValueError(f"sampler.steps must be at least 1, got {steps}: change sampler.steps.")
        lo, hi = process.ve_range
        sigmas = (karras_sigmas(steps, lo, hi, rho) if spacing == "karras" else logsnr_sigmas(steps, lo, hi))
        levels = process.level_of_ve(torch.tensor(sigmas, dtype=torch.float64))
    return levels_grid(process, levels)


def levels_grid(process: NoiseProcess, levels: Tensor) -> Grid:
    """The grid of these levels (noisiest first) of the process."""
    alpha, sigma = process.alpha_sigma(levels)
    return Grid(levels, [*alpha.tolist(), 1.0], [*sigma.tolist(), 0.0])
