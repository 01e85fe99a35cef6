"""The evaluation classifier: a small CNN trained on a data set's clean training images. Its
penultimate layer is the feature space of the Frechet distance and KID that need no download
(the Inception weights may not be had offline), and its predictions read the class of
class-conditional samples.

It is not the noise-aware classifier of classifier guidance: it sees clean real images only,
never noised or generated ones. It is trained on first use and kept in the artifact cache under
a key of the data settings and its own training settings, and never the run's seed, so every
run on a data set is measured with the same extractor.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from difflab.artifacts import ArtifactCache, dataset_settings, obtain
from difflab.checkpoint import atomic_save, load_checkpoint
from difflab.config import EMAConfig, TrainConfig
from difflab.data import ImageData, load_splits, to_model_range
from difflab.models import count_parameters
from difflab.train.loop import StepBatches, Trainer

log = logging.getLogger("difflab.evaluate")

STAGE = "feature_classifier"  # its folder in the artifact cache
FEATURES = 128
TRAIN_SEED = 0  # fixed: the extractor must not change with the run's seed
TEST_IMAGES = 10_000  # its test accuracy is measured on up to this many held-out images


# What the feature space is: each entry is part of the classifier's cache key. "multi" features are
# the first conv layer's per-channel spatial mean and standard deviation (what noise, blur and
# contrast move) beside the 128-d fc layer (class content), each dimension standardised by the
# training images' statistics ("standard"), so an image's feature magnitude survives; the low-level
# dimensions are then weighted by `low_level_weight`, so they register noise and blur without
# drowning out class content (benchmarks/metric_sensitivity.py chose these by its ladders).
# "last" + "layer" is the earlier design: the fc layer, layer-normalised per image.
NETWORK = {"width": 32, "features": "multi", "norm": "standard", "low_level_weight": 0.5}
FEATURE_LAYERS = ("last", "multi")
FEATURE_NORMS = ("layer", "standard")
STANDARDISE_IMAGES = 10_000  # training images the per-dimension statistics are taken over


class FeatureClassifier(nn.Module):
    """Three conv layers, then a 128-d fc layer and a linear head; any image size (the feature map
    is pooled to 4 x 4). Features are taken before the head's ReLU, so no unit is constant zero and
    their covariance stays full rank; standardised, they are on the scale of Inception's, where
    KID's cubic kernel (x.y / d + 1)^3 stays well conditioned."""

    def __init__(self, channels: int, num_classes: int, width: int = 32, features: str = "multi",
                 norm: str = "standard", low_level_weight: float = 1.0):
        super().__init__()
        if features not in FEATURE_LAYERS or norm not in FEATURE_NORMS:
            raise ValueError(f"unknown feature design {features}/{norm}")
        self.features, self.norm, self.low_level_weight = features, norm, low_level_weight
        self.convs = nn.ModuleList([nn.Conv2d(channels, width, 3, padding=1),
                                    nn.Conv2d(width, 2 * width, 3, padding=1),
                                    nn.Conv2d(2 * width, 2 * width, 3, padding=1)])
        self.fc = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(2 * width * 16, FEATURES))
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(FEATURES, num_classes))
        self.low_level_dim = 2 * width if features == "multi" else 0
        self.register_buffer("feature_mean", torch.zeros(self.feature_dim))
        self.register_buffer("feature_std", torch.ones(self.feature_dim))

    @property
    def feature_dim(self) -> int:
        return self.low_level_dim + FEATURES

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(features, logits) of images in model range [-1, 1]."""
        h = F.relu(self.convs[0](x))
        low_level = [h.mean((2, 3)), h.std((2, 3))] if self.low_level_dim else []
        h = F.max_pool2d(F.relu(self.convs[1](F.max_pool2d(h, 2))), 2)
        fc = self.fc(F.relu(self.convs[2](h)))
        if self.norm == "layer":
            fc = F.layer_norm(fc, (FEATURES,))
        raw = torch.cat([*low_level, fc], 1)
        return (raw - self.feature_mean) / self.feature_std if self.norm == "standard" else raw, self.head(fc)

    @torch.no_grad()
    def standardise(self, images: Tensor, batch_size: int = 1000) -> None:
        """Fix the per-dimension mean and standard deviation from uint8 training images."""
        self.feature_mean.zero_()
        self.feature_std.fill_(1.0)
        device = self.feature_mean.device
        raw = torch.cat([self(to_model_range(images[i:i + batch_size]).to(device))[0].double()
                         for i in range(0, len(images), batch_size)])
        self.feature_mean.copy_(raw.mean(0))
        # A unit (nearly) silent on real images would blow any activity up a millionfold: each
        # group's spreads are at least a tenth of its typical unit's.
        groups = raw.split([self.low_level_dim, FEATURES], 1) if self.low_level_dim else [raw]
        std = [g.std(0).clamp_min(0.1 * float(g.std(0).median())) for g in groups]
        if self.low_level_dim:
            std[0] = std[0] / self.low_level_weight
        self.feature_std.copy_(torch.cat(std))


@dataclass
class LoadedClassifier:
    net: FeatureClassifier
    channels: int
    image_size: int
    num_classes: int
    path: Path
    key: str
    test_accuracy: float | None
    test_images: int
    trained_now: bool
    train_seconds: float


def real_splits(cfg: DictConfig, held_out: int) -> tuple[ImageData, ImageData]:
    """(train, held-out) real images: the held-out ones come from the official test split (a
    folder: its validation share), a seeded pick of up to `held_out` of them."""
    return load_splits(OmegaConf.merge(cfg, {"dataset": {"val_size": held_out}}).dataset, cfg.paths.cache_dir)


def classifier_settings(cfg: DictConfig, network: dict = NETWORK) -> dict:
    return {"dataset": dataset_settings(cfg), "network": {**network, "fc": FEATURES},
            "steps": cfg.eval.classifier_steps, "batch_size": cfg.eval.classifier_batch_size,
            "seed": TRAIN_SEED}


def _train_config(steps: int, batch_size: int, progress: bool) -> DictConfig:
    return OmegaConf.structured(TrainConfig(
        max_steps=steps, batch_size=batch_size, lr=2e-3, warmup_steps=min(50, steps // 10), precision="fp32",
        ema=EMAConfig(decay=0.99), log_every=max(1, steps // 5), val_every=steps, image_every=0,
        checkpoint_every=steps, keep_checkpoints=0, progress=progress,
    ))


@torch.no_grad()
def predicted_classes(net: FeatureClassifier, images: Tensor, device: torch.device, batch_size: int = 1000) -> Tensor:
    """The class the classifier reads in each uint8 image."""
    return torch.cat([net(to_model_range(images[i:i + batch_size]).to(device))[1].argmax(1).cpu()
                      for i in range(0, len(images), batch_size)]) if len(images) else torch.zeros(0, dtype=torch.long)


def accuracy(net: FeatureClassifier, images: Tensor, labels: Tensor, device: torch.device,
             batch_size: int = 1000) -> float:
    """Share of uint8 images the classifier assigns to their label."""
    return int((predicted_classes(net, images, device, batch_size) == labels).sum()) / max(len(images), 1)


def _build(meta: dict) -> FeatureClassifier:
    network = meta["network"]
    return FeatureClassifier(meta["channels"], meta["num_classes"], network["width"], network["features"],
                             network["norm"], network.get("low_level_weight", 1.0))


def _train(cfg: DictConfig, device: torch.device, folder: Path, settings: dict) -> tuple[dict, dict]:
    """Fit the classifier on the training split, then fix its feature statistics; (checkpoint
    state, metrics)."""
    train, held_out = real_splits(cfg, TEST_IMAGES)
    meta = {"channels": train.images.shape[1], "image_size": train.images.shape[2], "num_classes": train.num_classes,
            "network": {k: v for k, v in settings["network"].items() if k != "fc"}}
    tcfg = _train_config(settings["steps"], settings["batch_size"], bool(cfg.train.progress))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TRAIN_SEED)
        net = _build(meta).to(device)
        trainer = Trainer(net, tcfg, folder, device, stage="eval-classifier")
        images, labels = train.images.to(device), train.labels.to(device)
        batches = StepBatches(len(train), min(tcfg.batch_size, len(train)), TRAIN_SEED)

        def loss(model: nn.Module, idx: Tensor) -> Tensor:
            return F.cross_entropy(model(to_model_range(images[idx]))[1], labels[idx])

        result = trainer.fit(loss, lambda step: batches.indices(step).to(device), batches.batch_size)
    ema = trainer.ema.model.eval()
    ema.standardise(train.images[:STANDARDISE_IMAGES])
    test_accuracy = accuracy(ema, held_out.images, held_out.labels, device) if len(held_out) else None
    metrics = {"test_accuracy": test_accuracy, "test_images": len(held_out), "steps": result.step,
               "final_loss": result.final_loss, "train_wall_time_s": result.wall_time_s,
               "num_params": count_parameters(ema)}
    state = {"config": settings, "stage": STAGE, "meta": meta, "model": ema.state_dict(), "metrics": metrics}
    return state, metrics


def load_classifier_file(path: str | Path, device: torch.device) -> tuple[FeatureClassifier, dict]:
    """The network and meta of a stored evaluation classifier (weights_only load)."""
    state = load_checkpoint(path, "evaluation classifier")
    meta = state["meta"]
    net = _build(meta)
    net.load_state_dict(state["model"])
    return net.to(device).eval(), {**meta, **state["metrics"]}


def feature_classifier(cfg: DictConfig, device: torch.device, network: dict = NETWORK) -> LoadedClassifier:
    """The data set's evaluation classifier from the artifact cache, trained first if missing
    (parallel jobs wait on a lock for the one training it); `network` other than NETWORK is for
    comparing feature designs."""
    cache, settings = ArtifactCache(cfg.paths.cache_dir), classifier_settings(cfg, network)
    t0 = time.perf_counter()
    with contextlib.ExitStack() as until_stored:
        def train() -> tuple[Path, dict]:  # the file lives until obtain has stored it
            log.info("training the evaluation classifier for %s (%d steps; once per data set, then cached)",
                     cfg.dataset.name, settings["steps"])
            cache.root.mkdir(parents=True, exist_ok=True)
            tmp = Path(until_stored.enter_context(tempfile.TemporaryDirectory(dir=cache.root)))
            state, metrics = _train(cfg, device, tmp / "checkpoints", settings)
            atomic_save(state, tmp / "model.pt")
            return tmp / "model.pt", {"metrics": metrics}

        artifact = obtain(cache, STAGE, settings, train, what="evaluation classifier", alone=True, anew="")
    seconds = time.perf_counter() - t0 if artifact.trained else 0.0
    net, meta = load_classifier_file(artifact.path, device)
    log.info("evaluation classifier %s: test accuracy %s on %d held-out images", artifact.path,
             "n/a" if meta["test_accuracy"] is None else f"{meta['test_accuracy']:.4f}", meta["test_images"])
    return LoadedClassifier(net, meta["channels"], meta["image_size"], meta["num_classes"], artifact.path,
                            artifact.key, meta["test_accuracy"], meta["test_images"], artifact.trained, seconds)
