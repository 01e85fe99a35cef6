"""difflab: a Hydra-composed experiment runner for diffusion models."""

__version__ = "0.1.0"
