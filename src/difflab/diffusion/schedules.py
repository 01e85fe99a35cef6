"""Noise schedules: betas over T steps, exactly as in reference/diffusion.md.

All schedules are computed in float64 so that alpha_bar products over 1000 steps stay exact
to well below float32 resolution; the process casts to float32 when it builds its buffers.
"""

from __future__ import annotations

import math
from typing import Callable

import torch


def linear_betas(T: int, low: float = 1e-4, high: float = 0.02) -> torch.Tensor:
    """DDPM's linear betas, rescaled so any T spans the same noise range as T=1000."""
    scale = 1000.0 / T
    return torch.linspace(low * scale, high * scale, T, dtype=torch.float64)


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Improved DDPM: alpha_bar follows cos^2, betas capped at max_beta near t = T."""

    def f(t: float) -> float:
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - f(i + 1) / f(i), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float64)


def dns_betas(T: int, low: float = 1e-4, high: float = 0.02, offset: float | None = 5.0) -> torch.Tensor:
    """Seed 001's "dynamic negative square" schedule: betas grow quadratically in i."""
    low, high = low * 1000.0 / T, high * 1000.0 / T
    if not 0 <= low < high <= 1:
        raise ValueError(
            f"dns schedule needs 0 <= beta_start' < beta_end' <= 1 after scaling by 1000/T, got "
            f"{low:g} and {high:g}: lower schedule.beta_end or raise schedule.T."
        )
    off = float(T) if offset is None else float(offset)
    i = torch.arange(T, dtype=torch.float64)
    return low + (high - low) * ((i + off) / (T + 1 + off)) ** 2


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alpha_bar) so the last step is pure noise (Lin et al. 2023;
    diffusers' rescale_betas_zero_snr)."""
    alphas_bar_sqrt = torch.cumprod(1 - betas, 0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


# The registry of schedule.name: T and the schedule block's values -> betas. A new schedule is
# its function here plus its conf/schedule/ YAML.
SCHEDULES: dict[str, Callable[[int, dict], torch.Tensor]] = {
    "linear": lambda T, p: linear_betas(T, p["beta_start"], p["beta_end"]),
    "cosine": lambda T, p: cosine_betas(T, p["cosine_s"]),
    "dns": lambda T, p: dns_betas(T, p["beta_start"], p["beta_end"], p["dns_offset"]),
}


def make_betas(
    name: str,
    T: int,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    cosine_s: float = 0.008,
    dns_offset: float | None = 5.0,
    zero_terminal_snr: bool = False,
) -> torch.Tensor:
    if T < 2:
        raise ValueError(f"schedule.T must be at least 2, got {T}: set schedule.T=1000.")
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}: choose one of {', '.join(SCHEDULES)}.")
    betas = SCHEDULES[name](T, {"beta_start": beta_start, "beta_end": beta_end, "cosine_s": cosine_s,
                                "dns_offset": dns_offset})
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas
