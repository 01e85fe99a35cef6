"""Reverse-process samplers. Each is one short loop that reads like its paper's algorithm.

A sampler walks a descending list of timesteps (a respaced subset of 0..T-1) and treats the
step after the last as clean data (alpha_bar = 1). It sees the model only through a
`Denoiser`, which returns (x0_hat, eps_hat) with guidance and clipping already applied, and
through `denoiser.guide_mean`, the classifier-guidance shift of the DDPM mean.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Protocol

import torch
from torch import Tensor

from difflab.diffusion.process import GaussianDiffusion

OnStep = Callable[[int, Tensor, Tensor], None]  # (step index, x_t, x0_hat)


class Denoiser(Protocol):
    def __call__(self, x: Tensor, t: Tensor, *, shift_eps: bool = True) -> tuple[Tensor, Tensor]: ...

    def guide_mean(self, x: Tensor, t: Tensor) -> Optional[Tensor]: ...


def respaced_timesteps(T: int, steps: int | None) -> list[int]:
    """`steps` evenly spaced timesteps from T-1 down ("trailing" spacing, Lin et al. 2023): the
    first step always starts from the last, noisiest timestep; all T when steps is None."""
    steps = T if steps is None else steps
    if not 1 <= steps <= T:
        raise ValueError(f"sampler.steps must be between 1 and schedule.T={T}, got {steps}: change sampler.steps.")
    ts = (T - torch.arange(steps, dtype=torch.float64) * (T / steps)).round().long() - 1
    return list(dict.fromkeys(ts.tolist()))


def _pairs(process: GaussianDiffusion, ts: list[int]):
    """(index, t, alpha_bar_t, alpha_bar_next) with alpha_bar = 1 after the last step."""
    ab = process.alphas_bar.tolist()
    for i, t in enumerate(ts):
        yield i, t, ab[t], ab[ts[i + 1]] if i + 1 < len(ts) else 1.0


def _noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def ddpm(denoiser: Denoiser, process: GaussianDiffusion, x: Tensor, ts: list[int],
         generator: torch.Generator | None = None, on_step: OnStep | None = None, **_) -> Tensor:
    """Ancestral sampling from q(x_s | x_t, x0_hat) (Ho et al. 2020, Alg. 2; any respacing)."""
    for i, t, ab_t, ab_s in _pairs(process, ts):
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        x0, _ = denoiser(x, tt, shift_eps=False)
        beta = 1 - ab_t / ab_s
        mean = (math.sqrt(ab_s) * beta / (1 - ab_t)) * x0 + (math.sqrt(1 - beta) * (1 - ab_s) / (1 - ab_t)) * x
        var = beta * (1 - ab_s) / (1 - ab_t)
        shift = denoiser.guide_mean(x, tt)
        if shift is not None:
            mean = mean + var * shift  # classifier guidance: mu + Sigma * grad log p(y | x_t)
        x = mean + math.sqrt(var) * _noise(x, generator) if i + 1 < len(ts) else mean
        if on_step:
            on_step(i, x, x0)
    return x


def ddim(denoiser: Denoiser, process: GaussianDiffusion, x: Tensor, ts: list[int], eta: float = 0.0,
         generator: torch.Generator | None = None, on_step: OnStep | None = None, **_) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12); eta = 0 is deterministic, eta = 1 matches DDPM."""
    for i, t, ab_t, ab_s in _pairs(process, ts):
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        x0, eps = denoiser(x, tt)
        sigma = eta * math.sqrt((1 - ab_s) / (1 - ab_t)) * math.sqrt(1 - ab_t / ab_s)
        x = math.sqrt(ab_s) * x0 + math.sqrt(max(1 - ab_s - sigma**2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * _noise(x, generator)
        if on_step:
            on_step(i, x, x0)
    return x


LOWER_ORDER_FINAL_BELOW = 15  # fewer steps than this: the last two steps are first order


def dpmpp_2m(denoiser: Denoiser, process: GaussianDiffusion, x: Tensor, ts: list[int],
             on_step: OnStep | None = None, **_) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) in data prediction. The first step and the
    final step to clean data are first order, and with fewer than 15 steps so is the one
    before it (diffusers' lower_order_final): the multistep correction is least reliable
    where the steps are longest, close to the data."""
    x0_prev, h_prev = None, None
    for i, t, ab_t, ab_s in _pairs(process, ts):
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        x0, _ = denoiser(x, tt)
        if ab_s >= 1.0:  # last step: sigma_s = 0, the update reduces to x0_hat
            x = x0
        else:
            alpha_s, sigma_s, sigma_t = math.sqrt(ab_s), math.sqrt(1 - ab_s), math.sqrt(1 - ab_t)
            h = 0.5 * math.log(ab_s / (1 - ab_s)) - 0.5 * math.log(ab_t / (1 - ab_t))
            first_order = x0_prev is None or (len(ts) < LOWER_ORDER_FINAL_BELOW and i == len(ts) - 2)
            d = x0 if first_order else x0 + (x0 - x0_prev) * (h / (2 * h_prev))
            x = (sigma_s / sigma_t) * x - alpha_s * math.expm1(-h) * d
            x0_prev, h_prev = x0, h
        if on_step:
            on_step(i, x, x0)
    return x


# The registry of sampler.name: a new sampler is its function here plus its conf/sampler/ YAML.
SAMPLERS = {"ddpm": ddpm, "ddim": ddim, "dpmpp_2m": dpmpp_2m}


def run_sampler(name: str, denoiser: Denoiser, process: GaussianDiffusion, noise: Tensor,
                steps: int | None, eta: float = 0.0, generator: torch.Generator | None = None,
                on_step: OnStep | None = None) -> Tensor:
    """Sample from noise x_T. Gradients stay off except where the denoiser enables them
    (classifier guidance differentiates through the classifier only)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}: choose one of {', '.join(SAMPLERS)}.")
    ts = respaced_timesteps(process.T, steps)
    # inference_mode skips autograd's version counters and views bookkeeping; classifier guidance
    # differentiates the classifier, which tensors made under inference_mode cannot enter.
    guided = getattr(denoiser, "classifier", None) is not None
    with torch.no_grad() if guided else torch.inference_mode():
        return SAMPLERS[name](denoiser, process, noise, ts, eta=eta, generator=generator, on_step=on_step)
