"""Denoising networks and the noise-aware classifier."""

from difflab.models.classifier import NoisyClassifier, build_classifier
from difflab.models.unet import UNet, build_unet, count_parameters

__all__ = ["NoisyClassifier", "UNet", "build_classifier", "build_unet", "count_parameters"]
