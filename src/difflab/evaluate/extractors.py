"""The feature extractors the metrics are computed with, registered with torch-fidelity under
names that identify their weights, so the feature cache (feature_cache.py) never mixes two sets
of weights, and the extraction itself, done as torch_fidelity.calculate_metrics does it.

- Inception-v3 (torch-fidelity's own network): when its weights file is at hand, from
  `eval.inception_weights` or torch's hub cache (`eval.inception_weights=download` fetches it there
  first); offline without it, it is skipped.
- The data set's evaluation classifier (feature_classifier.py), trained here, always at hand.

Both receive uint8 3-channel images at the data set's size: Inception resizes to 299 inside,
the classifier converts back to its own channels and size.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
import torch_fidelity
from einops import repeat
from torch import Tensor
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

from difflab.artifacts import sha256_file
from difflab.data.transforms import fit_images
from difflab.errors import UserError
from difflab.evaluate.feature_classifier import load_classifier_file

log = logging.getLogger("difflab.evaluate")

INCEPTION_FILE = Path(URL_INCEPTION_V3).name  # weights-inception-2015-12-05-6726825d.pth
DOWNLOAD = "download"  # eval.inception_weights: fetch the file into torch's hub cache at the start of a run


@dataclass
class Extractor:
    kind: str  # inception | classifier (config.EVAL_EXTRACTORS)
    name: str  # as registered with torch-fidelity
    weights: Path


class FidelityImages(Dataset):
    """uint8 N,C,H,W images as torch-fidelity reads them: 3 channels, grey repeated."""

    def __init__(self, images: Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor:
        image = self.images[i]
        return repeat(image, "1 h w -> 3 h w") if image.shape[0] == 1 else image


class ClassifierFeatures(torch_fidelity.FeatureExtractorBase):
    """The evaluation classifier seen through torch-fidelity: 'features' (128-d, for FD, KID)
    and 'logits'. The weights file comes as feature_extractor_weights_path."""

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str = None, **_):
        super().__init__(name, features_list)
        self.net, meta = load_classifier_file(feature_extractor_weights_path, torch.device("cpu"))
        self.channels, self.image_size = meta["channels"], meta["image_size"]

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("features", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return "logits" if metric == "isc" else "features"

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> Tensor:
        return torch.zeros((1, 3, 28, 28), dtype=torch.uint8)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        images = fit_images(x.cpu(), self.channels, self.image_size).to(x.device)
        features, logits = self.net(images.float() / 127.5 - 1.0)
        out = {"features": features, "logits": logits}
        return tuple(out[name] for name in self.features_list)


def _register(name: str, cls: type) -> None:
    if name not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(name, cls)


def classifier_extractor(path: Path, key: str) -> Extractor:
    name = f"difflab-classifier-{key}"
    _register(name, ClassifierFeatures)
    return Extractor("classifier", name, path)


def _hub_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def find_inception_weights(configured: Optional[str]) -> tuple[Optional[Path], str]:
    """(weights file, "") when one is at hand, else (None, why not). `download` means torch's hub
    cache, where download_inception_weights puts the file."""
    if configured and configured != DOWNLOAD:
        path = Path(configured).expanduser()
        return (path, "") if path.is_file() else (None, f"eval.inception_weights={configured} does not exist")
    path = _hub_path()
    if path.is_file():
        return path, ""
    return None, (f"{INCEPTION_FILE} is not in torch's hub cache ({path.parent}); pass eval.inception_weights=PATH "
                  f"or eval.inception_weights={DOWNLOAD}")


def inception_url() -> str:
    """Where eval.inception_weights=download fetches from: torch-fidelity's release, or a mirror named by
    $DIFFLAB_INCEPTION_URL."""
    return os.environ.get("DIFFLAB_INCEPTION_URL") or URL_INCEPTION_V3


def download_inception_weights(url: Optional[str] = None) -> Path:
    """torch-fidelity's Inception weights in torch's hub cache, downloaded from `url` unless they are there
    already; the file is checked to be Inception's before it takes its place, so a failed or foreign download
    leaves nothing behind."""
    path, url = _hub_path(), url or inception_url()
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f"{path.name}.{os.getpid()}.part")
    log.info("downloading the Inception weights from %s to %s", url, path)
    try:
        torch.hub.download_url_to_file(url, str(part), progress=False)
        inception_extractor(part)
        os.replace(part, path)
    except UserError:
        raise UserError(f"eval.inception_weights={DOWNLOAD} fetched {url}, which is not Inception's weights file: "
                        f"download {INCEPTION_FILE} yourself and pass eval.inception_weights=PATH.") from None
    except Exception as e:  # urllib raises URLError, HTTPError, timeouts and OSErrors
        raise UserError(f"eval.inception_weights={DOWNLOAD} could not fetch {url} ({type(e).__name__}): connect to "
                        f"the internet, or pass eval.inception_weights=PATH to a copy of {INCEPTION_FILE}.") from None
    finally:
        part.unlink(missing_ok=True)
    return path


def inception_extractor(path: Path) -> Extractor:
    """Checks the file is an Inception state dict (read with weights_only=True, before
    torch-fidelity reads it without), and registers it under a name of its content's hash."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        fc = state["fc.weight"]
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise UserError(f"eval.inception_weights={path} is not torch-fidelity's Inception state dict ({type(e).__name__}): "
                        f"use its {INCEPTION_FILE}, or drop the key to skip the Inception metrics.") from None
    if tuple(fc.shape) != (1008, 2048):
        raise UserError(f"eval.inception_weights={path} has a {tuple(fc.shape)} fc layer, not Inception's (1008, 2048): "
                        f"use torch-fidelity's {INCEPTION_FILE}.")
    name = f"inception-v3-{sha256_file(path)[:12]}"
    _register(name, FeatureExtractorInceptionV3)
    return Extractor("inception", name, path)


def metric_layers(extractor: Extractor, metrics: Iterable[str]) -> dict[str, str]:
    """metric (isc, fid, kid, prc) -> the layer torch-fidelity computes it on with this extractor."""
    registered = FEATURE_EXTRACTORS_REGISTRY[extractor.name]
    return {metric: registered.get_default_feature_layer_for_metric(metric) for metric in metrics}


class FeatureExtraction:
    """uint8 images -> {layer: N x D features}, through the module, data loader and batch size
    torch_fidelity.calculate_metrics uses, so the features are the ones it would compute. The
    module (for Inception, its weights) is built on first use, so a call whose inputs' features
    are all cached never builds it."""

    def __init__(self, extractor: Extractor, layers: Sequence[str], device: torch.device, batch_size: int):
        self.extractor, self.layers, self.batch_size = extractor, list(layers), batch_size
        self.cuda = device.type == "cuda"

    @functools.cached_property
    def module(self) -> torch_fidelity.FeatureExtractorBase:
        return create_feature_extractor(self.extractor.name, self.layers, cuda=self.cuda, verbose=False,
                                        feature_extractor_weights_path=str(self.extractor.weights))

    def __call__(self, images: Tensor) -> dict[str, Tensor]:
        return get_featuresdict_from_dataset(FidelityImages(images), self.module, self.batch_size, self.cuda,
                                             save_cpu_ram=True, verbose=False)
