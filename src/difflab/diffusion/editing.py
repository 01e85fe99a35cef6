"""Image-to-image over any sampler (reference/methods.md, "Editing"): SDEdit starts a sampler part way
down its grid from the input noised to that level; inpainting (RePaint) re-noises the known region
from the input after every step, so only the masked region is generated, and optionally resamples
each step by going back one level and taking it again.

Everything here is in the space the model denoises (pixels or latents), with masks already on
its grid; 1 in a mask marks what is regenerated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from difflab.diffusion.samplers import Denoiser, _noise, _posterior
from difflab.diffusion.spacing import Grid


@dataclass
class EditTask:
    """What an edit starts from: the inputs (N,C,H,W, model space), how far they are noised, and
    the masks of inpainting (N,1,H,W, 1 = regenerate; None = the whole image is edited)."""

    inputs: Tensor
    strength: float  # the share of the sampler's steps taken; 1 = from pure noise, as sampling
    masks: Optional[Tensor] = None
    resample: int = 1  # times each step is taken (RePaint's U); 1 = no resampling


def start_step(steps: int, strength: float) -> int:
    """The grid step SDEdit starts at: the last round(strength * steps) steps are taken (at least
    one for any strength above 0), as diffusers' img2img pipelines do."""
    taken = min(steps, max(round(strength * steps), 1 if strength > 0 else 0))
    return steps - taken


def noised(grid: Grid, x0: Tensor, noise: Tensor) -> Tensor:
    """x at the grid's first level: alpha x0 + sigma noise (q(x_t | x0))."""
    return grid.alphas[0] * x0 + grid.sigmas[0] * noise


@dataclass
class Inpainting:
    """The step hook of inpainting on `grid` (the steps the sampler takes): after step i, the known
    region (mask 0) is x_in noised afresh to the level step i reached, the masked region what the
    sampler made. With resample = U > 1 each step is then taken U - 1 more times: back one level
    by q(x_i | x_(i+1)), forward again by the ancestral step (RePaint's jump of length 1, whatever
    sampler takes the main steps), and the known region replaced again; not into clean data."""

    denoiser: Denoiser
    grid: Grid
    x_in: Tensor
    mask: Tensor
    resample: int = 1
    generator: Optional[torch.Generator] = None

    def _known(self, x: Tensor, i: int) -> Tensor:
        """x with its known region replaced by x_in at level i + 1 (where step i arrives)."""
        a, s = self.grid.alphas[i + 1], self.grid.sigmas[i + 1]
        known = a * self.x_in + s * _noise(x, self.generator) if s > 0 else self.x_in
        return self.mask * x + (1 - self.mask) * known

    def __call__(self, i: int, x: Tensor, x0: Tensor) -> Tensor:
        g = self.grid
        a_t, s_t, a_s, s_s = g.alphas[i], g.sigmas[i], g.alphas[i + 1], g.sigmas[i + 1]
        x = self._known(x, i)
        for _ in range(self.resample - 1 if s_s > 0 else 0):
            a_ts = a_t / a_s  # q(x_t | x_s): the forward step from level i + 1 back up to level i
            x = a_ts * x + math.sqrt(max(s_t**2 - a_ts**2 * s_s**2, 0.0)) * _noise(x, self.generator)
            x0, _ = self.denoiser(x, g.level(i, x))
            ct, c0, var = _posterior(a_t, s_t, a_s, s_s)
            x = self._known(ct * x + c0 * x0 + math.sqrt(var) * _noise(x, self.generator), i)
        return x
