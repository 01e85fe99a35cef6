"""Denoising networks."""

from difflab.models.unet import UNet, build_unet, count_parameters

__all__ = ["UNet", "build_unet", "count_parameters"]
