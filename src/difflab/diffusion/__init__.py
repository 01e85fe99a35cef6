"""Diffusion math: schedules, the objectives' noise processes, step spacings, samplers and
guidance. No Hydra here."""

from difflab.diffusion.ddpm import DDPMProcess, GaussianDiffusion
from difflab.diffusion.edm import EDMProcess
from difflab.diffusion.flow import FlowProcess
from difflab.diffusion.guidance import GuidedDenoiser
from difflab.diffusion.process import NoiseProcess
from difflab.diffusion.samplers import Churn, nfe, run_sampler
from difflab.diffusion.schedules import make_betas
from difflab.diffusion.spacing import respaced_timesteps, sampling_grid

__all__ = ["Churn", "DDPMProcess", "EDMProcess", "FlowProcess", "GaussianDiffusion", "GuidedDenoiser", "NoiseProcess",
           "make_betas", "nfe", "respaced_timesteps", "run_sampler", "sampling_grid"]
