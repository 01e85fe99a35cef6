"""Real images' features, cached by difflab as plain tensors, so torch-fidelity never reads a
cache file: its own cache is loaded with torch.load(weights_only=False), which runs whatever
code a planted file names.

An entry is {cache_dir}/features/<name>-<extractor>.pt, read with torch.load(weights_only=True)
(tensors, strings and containers only). It holds the features of each layer and the SHA-256
of the images they were extracted from, so an entry made from other images (a folder data set
edited since, a file planted under the name) is extracted anew rather than used.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from difflab.checkpoint import atomic_save
from difflab.errors import UserError
from difflab.evaluate.extractors import FeatureExtraction

log = logging.getLogger("difflab.evaluate")


def cached_features(images: Tensor, extract: FeatureExtraction, folder: Path, name: Optional[str]) -> dict[str, Tensor]:
    """The images' features in extract.layers: from the entry `name` in `folder` when it holds
    them for these very images, else extracted (and stored there when `name` is given)."""
    if name is None:
        return extract(images)
    path = folder / f"{name}-{extract.extractor.name}.pt"
    digest = hashlib.sha256(images.cpu().contiguous().numpy().tobytes()).hexdigest()
    features = _load(path, digest, extract.layers, len(images))
    if features is None:
        features = extract(images)
        _store(path, digest, features)
    return features


def _load(path: Path, digest: str, layers: list[str], count: int) -> Optional[dict[str, Tensor]]:
    if not path.is_file():
        return None
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
        if entry["images_sha256"] != digest:
            return None
        features = {layer: entry["features"][layer] for layer in layers}
        if not all(isinstance(f, Tensor) and f.dim() == 2 and len(f) == count for f in features.values()):
            raise ValueError(f"features of other shapes than {count} x D")
        return features
    except Exception as e:  # a truncated or foreign file (weights_only=True refuses any code): extract again
        log.warning("Ignoring the unreadable feature cache %s (%s): extracting the features again.", path, e)
        return None


def _store(path: Path, digest: str, features: dict[str, Tensor]) -> None:
    try:
        atomic_save({"images_sha256": digest, "features": {k: v.contiguous() for k, v in features.items()}}, path)
    except OSError as e:
        raise UserError(f"Cannot write the feature cache {path} ({e.strerror}): set paths.cache_dir to a "
                        "writable folder with free space.") from None
