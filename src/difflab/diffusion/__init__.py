"""Diffusion math: schedules, the Gaussian process, samplers and guidance. No Hydra here."""

from difflab.diffusion.guidance import GuidedDenoiser
from difflab.diffusion.process import GaussianDiffusion
from difflab.diffusion.samplers import respaced_timesteps, run_sampler
from difflab.diffusion.schedules import make_betas

__all__ = ["GaussianDiffusion", "GuidedDenoiser", "make_betas", "respaced_timesteps", "run_sampler"]
