"""A training set's latents, encoded once and kept in the artifact cache under a key of the
autoencoder file and the images' bytes, so any change to either encodes anew and training
pays no autoencoder cost per step."""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from difflab.artifacts import ArtifactCache, obtain
from difflab.checkpoint import atomic_save
from difflab.data.transforms import to_model_range
from difflab.progress import progress

if TYPE_CHECKING:
    from difflab.trained import LatentSpace

CHUNK = 4096  # images moved to the device and encoded at a time


def cached_latents(space: LatentSpace, images_uint8: Tensor, cache_dir: str, device: torch.device) -> Tensor:
    """The scaled latents of the (un-augmented) images, on `device`. Under torchrun rank 0
    encodes alone; the other ranks read the stored latents."""
    cache = ArtifactCache(cache_dir)
    images_digest = hashlib.sha256(images_uint8.contiguous().numpy().tobytes()).hexdigest()[:16]
    settings = {"autoencoder_file": space.identity, "latent_scale": space.scale, "images": images_digest}
    with contextlib.ExitStack() as until_stored:
        def encode_all() -> tuple[Path, dict]:  # the latents file lives until obtain has stored it
            cache.root.mkdir(parents=True, exist_ok=True)
            tmp = Path(until_stored.enter_context(tempfile.TemporaryDirectory(dir=cache.root)))
            z = []
            with progress("encode latents", len(images_uint8), unit="img") as bar:
                for chunk in images_uint8.split(CHUNK):
                    z.append(space.encode(to_model_range(chunk.to(device))).cpu())
                    bar.update(len(chunk))
            z = torch.cat(z)
            atomic_save({"latents": z}, tmp / "latents.pt")
            return tmp / "latents.pt", {"images": len(z), "shape": list(z.shape[1:])}

        artifact = obtain(cache, "latents", settings, encode_all, what="encoded training latents", collective=False,
                            anew="")
    return torch.load(artifact.path, map_location="cpu", weights_only=True)["latents"].to(device)
