"""Sample quality through torch-fidelity's metric functions, the same code path for every extractor:

- Inception (when its weights are at hand): FID, KID, Inception Score, precision and recall;
- the data set's evaluation classifier: the same Frechet distance and KID in its feature space,
  the class accuracy of class-conditional samples, and how far the shares of the classes it reads
  in the samples are from the real data's (class_share_tv, evaluate/class_shares.py).

Each is computed for the generated samples and, as the reference a reader needs, for a held-out
real sample of equal size, both against the same seeded pick of real training images. difflab
extracts the features as torch_fidelity.calculate_metrics does and computes the metrics from
them with torch-fidelity's feature-level functions and calculate_metrics' settings, so the values
are the ones calculate_metrics gives; the real images' features are cached by difflab
(feature_cache.py) under names of the data set, split, size and extractor, in
paths.cache_dir/features, and torch-fidelity reads no cache file.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch_fidelity.metric_fid import fid_featuresdict_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_featuresdict_to_metric
from torch_fidelity.metric_kid import kid_featuresdict_to_metric
from torch_fidelity.metric_prc import prc_featuresdict_to_metric

from difflab.artifacts import settings_key
from difflab.data import ImageData
from difflab.evaluate.class_shares import class_share_distance
from difflab.evaluate.extractors import (Extractor, FeatureExtraction, classifier_extractor, find_inception_weights,
                                         inception_extractor, metric_layers)
from difflab.evaluate.feature_cache import cached_features
from difflab.evaluate.feature_classifier import (LoadedClassifier, accuracy, classifier_settings, feature_classifier,
                                                 predicted_classes, real_splits)
from difflab.evaluate.memorisation import memorisation, spread
from difflab.evaluate.uncertainty import (REPLICATES, fd_standard_error, frechet_distance, kid_standard_error,
                                          share_standard_error)
from difflab.pictures import save_pairs

if TYPE_CHECKING:
    from difflab.sampling import SampleResult
    from difflab.trained import DiffusionModel

log = logging.getLogger("difflab.evaluate")

REFERENCE_SEED = 1  # which training images form the reference set
MIN_IMAGES = 4  # precision/recall look at each image's 3 nearest neighbours
FIDELITY_SEED = 2020  # torch-fidelity's default: KID subsets and IS splits

# torch-fidelity's result keys -> metrics.json keys, per extractor
KEYS = {
    "inception": {"frechet_inception_distance": "fid", "kernel_inception_distance_mean": "kid",
                  "kernel_inception_distance_std": "kid_std", "inception_score_mean": "inception_score",
                  "inception_score_std": "inception_score_std", "precision": "precision_inception",
                  "recall": "recall_inception"},  # "precision" alone is the training's number format
    "classifier": {"frechet_inception_distance": "fd_classifier", "kernel_inception_distance_mean": "kid_classifier",
                   "kernel_inception_distance_std": "kid_classifier_std", "precision": "precision_classifier",
                   "recall": "recall_classifier"},
}
SE = "_se"  # suffix of a metric's standard error in metrics.json


@dataclass
class Measured:
    metrics: dict[str, float]
    features: Tensor  # the images' features in the FD layer
    reference: Tensor  # the reference's


def measure(images: Tensor, reference: Tensor, extractor: Extractor, device: torch.device, batch_size: int,
            cache_root: str | Path, names: tuple[Optional[str], Optional[str]] = (None, None),
            bootstrap: int = REPLICATES) -> Measured:
    """FD, KID, precision and recall of uint8 `images` against `reference` in the extractor's
    feature space (with Inception also IS), under difflab's metric names, each with its standard
    error (`bootstrap` replicates for FD and KID; 0 = none). A named input's features are cached in
    `cache_root`; an unnamed one (generated samples) never is. KID averages over subsets of half
    the samples (at most 1000), so its std says how much it varies."""
    inception = extractor.kind == "inception"
    wanted = {"isc": inception, "fid": True, "kid": True, "prc": min(len(images), len(reference)) >= MIN_IMAGES}
    layers = metric_layers(extractor, [metric for metric, on in wanted.items() if on])
    extract = FeatureExtraction(extractor, sorted(set(layers.values())), device, batch_size)
    first, second = (cached_features(x, extract, Path(cache_root), name) for x, name in zip((images, reference), names))
    metrics = metrics_from_features(first, second, layers, extractor.kind, bootstrap)
    return Measured(metrics, first[layers["fid"]], second[layers["fid"]])


def metrics_from_features(first: dict[str, Tensor], second: dict[str, Tensor], layers: dict[str, str], kind: str,
                          bootstrap: int = REPLICATES) -> dict[str, float]:
    """measure()'s metrics from the two inputs' features ({layer: N x D}) for the metrics in
    `layers` (metric -> layer, from metric_layers), under the names of extractor `kind`."""
    n, m = len(first[layers["fid"]]), len(second[layers["fid"]])
    raw = _metrics_from_features(first, second, layers, rng_seed=FIDELITY_SEED, save_cpu_ram=True, verbose=False,
                                 kid_subset_size=max(2, min(1000, n, m) // 2), isc_splits=min(10, n))
    keys = KEYS[kind]
    metrics = {ours: float(raw[theirs]) for theirs, ours in keys.items() if theirs in raw}
    if bootstrap:
        metrics[keys["frechet_inception_distance"] + SE] = fd_standard_error(first[layers["fid"]],
                                                                             second[layers["fid"]], bootstrap)
        metrics[keys["kernel_inception_distance_mean"] + SE] = kid_standard_error(first[layers["kid"]],
                                                                                  second[layers["kid"]], bootstrap)
    for name, count in (("precision", n), ("recall", m)):
        if keys[name] in metrics:  # a share of the images (precision) or of the reference (recall)
            metrics[keys[name] + SE] = share_standard_error(metrics[keys[name]], count)
    return metrics


def fidelity_metrics(images: Tensor, reference: Tensor, extractor: Extractor, device: torch.device, batch_size: int,
                     cache_root: str | Path, names: tuple[Optional[str], Optional[str]] = (None, None),
                     bootstrap: int = REPLICATES) -> dict[str, float]:
    """measure()'s metrics alone."""
    return measure(images, reference, extractor, device, batch_size, cache_root, names, bootstrap).metrics


def _metrics_from_features(first: dict[str, Tensor], second: dict[str, Tensor], layers: dict[str, str],
                           **settings) -> dict[str, float]:
    """torch-fidelity's results for the metrics in `layers` (metric -> feature layer), from the
    two inputs' features by its own feature-level functions, as calculate_metrics calls them."""
    raw = {}
    if "isc" in layers:
        raw.update(isc_featuresdict_to_metric(first, layers["isc"], **settings))
    statistics = [fid_featuresdict_to_statistics(features, layers["fid"]) for features in (first, second)]
    raw.update(fid_statistics_to_metric(*statistics, verbose=False))
    raw.update(kid_featuresdict_to_metric(first, second, layers["kid"], **settings))
    if "prc" in layers:
        raw.update(prc_featuresdict_to_metric(first, second, layers["prc"], **settings))
    return raw


def per_class_fd(features: Tensor, labels: Tensor, reference: Tensor, reference_labels: Tensor) -> dict[str, float]:
    """class -> FD of the images of that class to the reference images of that class: where a
    model's overall FD hides one class drawn badly. Classes with under MIN_IMAGES on either side
    are left out."""
    out = {}
    for c in labels.unique().tolist():
        mine, theirs = features[labels == c].double(), reference[reference_labels == c].double()
        if min(len(mine), len(theirs)) >= MIN_IMAGES:
            out[str(c)] = frechet_distance(mine.mean(0), torch.cov(mine.T), theirs.mean(0), torch.cov(theirs.T))
    return out


def _extractors(cfg: DictConfig, num_classes: int, device: torch.device) -> tuple[list[Extractor], Optional[LoadedClassifier], dict]:
    """The extractors eval.extractors asks for that can be had here, the evaluation classifier,
    and for each extractor what it is (or why it was skipped)."""
    chosen, classifier, about = [], None, {}
    if "inception" in cfg.eval.extractors:
        path, why_not = find_inception_weights(cfg.eval.inception_weights)
        if path is None:
            log.info("Inception metrics (FID, KID, IS, precision/recall) skipped: %s", why_not)
            about["inception"] = {"skipped": why_not}
        else:
            chosen.append(inception_extractor(path))
            about["inception"] = {"name": chosen[-1].name, "weights": str(path)}
    if "classifier" in cfg.eval.extractors:
        if num_classes == 0:
            log.info("classifier metrics skipped: the data set has no classes to train an evaluation classifier on")
            about["classifier"] = {"skipped": "the data set has no classes"}
        else:
            classifier = feature_classifier(cfg, device)
            chosen.append(classifier_extractor(classifier.path, classifier.key))
            about["classifier"] = {"name": chosen[-1].name, "weights": str(classifier.path),
                                   "test_accuracy": classifier.test_accuracy, "trained_now": classifier.trained_now}
    return chosen, classifier, about


def class_share_metrics(classifier: LoadedClassifier, images: Tensor, reference: Tensor, held_out: Tensor,
                        device: torch.device, bootstrap: int) -> dict:
    """class_share_tv: how far the classes the classifier reads in the samples are from their shares in the
    reference (evaluate/class_shares.py), with its error; real_class_share_tv the same for held-out real images."""
    k = classifier.num_classes
    target = predicted_classes(classifier.net, reference, device)
    out = {}
    for key, given in (("class_share_tv", images), ("real_class_share_tv", held_out)):
        if len(given) >= MIN_IMAGES:
            out[key], out[key + SE] = class_share_distance(predicted_classes(classifier.net, given, device), target, k,
                                                           bootstrap)
    return out


def evaluate_model(model: DiffusionModel, cfg: DictConfig, device: torch.device, checkpoint: str,
                   sample: Callable[[int], SampleResult], writer=None, step: int = 0,
                   pictures: Optional[Path] = None, tag_prefix: str = "val/final/") -> dict:
    """Sample cfg.eval.num_samples images with `sample(n)` and measure them; returns the
    metrics.json entries (flat numbers with their standard errors, per-class FD, plus an `eval`
    block saying how each was produced). The memorisation check's closest pairs go to
    `pictures`/nearest_neighbours.png when a folder is given. The curve metrics go to `writer`
    (the run's trackers) as `tag_prefix`<metric> at `step`."""
    # The data set is the one the model learnt; paths and eval.* are this run's.
    data_cfg = OmegaConf.merge(model.cfg, {"paths": cfg.paths, "eval": cfg.eval})
    n, bootstrap = cfg.eval.num_samples, cfg.eval.bootstrap
    train, held_out = real_splits(data_cfg, n)
    extractors, classifier, about = _extractors(data_cfg, train.num_classes, device)
    samples = sample(n)
    t0 = time.perf_counter()
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(REFERENCE_SEED))[:n]
    reference = train.images[pick]
    tag = f"difflab-{data_cfg.dataset.name}-{settings_key(classifier_settings(data_cfg)['dataset'])[:8]}"
    ref_name, held_name = f"{tag}-train{len(reference)}-seed{REFERENCE_SEED}", f"{tag}-heldout{len(held_out)}"
    metrics: dict = {}
    produced_by: dict[str, str] = {}
    cache_root = Path(str(OmegaConf.select(data_cfg, "paths.cache_dir"))).expanduser() / "features"
    for ex in extractors:
        generated = measure(samples.images, reference, ex, device, cfg.eval.batch_size, cache_root, (None, ref_name),
                            bootstrap)
        real = measure(held_out.images, reference, ex, device, cfg.eval.batch_size, cache_root,
                       (held_name, ref_name), bootstrap) if len(held_out) >= MIN_IMAGES else None
        metrics.update(generated.metrics)
        metrics.update({f"real_{k}": v for k, v in real.metrics.items()} if real else {})
        produced_by.update({k: ex.kind for k in generated.metrics})
        produced_by.update({f"real_{k}": ex.kind for k in real.metrics} if real else {})
        if ex.kind != "classifier":
            continue
        if samples.labels is not None:
            by_class = per_class_fd(generated.features, samples.labels, generated.reference, train.labels[pick])
            metrics["fd_classifier_per_class"] = by_class
            metrics["fd_classifier_class_mean"] = sum(by_class.values()) / max(len(by_class), 1)
        if real is not None and cfg.eval.memorisation > 0:
            checked = memorisation_check(generated, real, train, ex, device, cfg.eval, cache_root, tag, samples,
                                         pictures)
            metrics.update(checked)
            produced_by.update({k: ex.kind for k in checked})
    if classifier is not None:
        metrics.update(class_share_metrics(classifier, samples.images, reference, held_out.images, device, bootstrap))
        produced_by.update({k: "classifier" for k in ("class_share_tv", "real_class_share_tv")})
    if classifier is not None and samples.labels is not None:
        metrics["class_accuracy"] = accuracy(classifier.net, samples.images, samples.labels, device)
        metrics["class_accuracy_se"] = share_standard_error(metrics["class_accuracy"], len(samples.images))
        metrics["real_class_accuracy"] = classifier.test_accuracy
        if classifier.test_accuracy is not None:
            metrics["real_class_accuracy_se"] = share_standard_error(classifier.test_accuracy, classifier.test_images)
        produced_by.update({"class_accuracy": "classifier", "real_class_accuracy": "classifier"})
    feature_seconds = time.perf_counter() - t0
    metrics = {k: v for k, v in metrics.items() if v is not None}
    if writer is not None:
        for key, value in curve_metrics(metrics).items():
            writer.add_scalar(f"{tag_prefix}{key}", value, step)
    log.info("evaluation of %d samples (%.1f s sampling, %.1f s features): %s", n, samples.seconds, feature_seconds,
             _summary(metrics) or "no extractor available")
    return {**metrics, "eval_sampling_seconds": samples.seconds, "eval_feature_seconds": feature_seconds, "eval": {
        "checkpoint": checkpoint, "num_samples": n, "labels": "balanced" if samples.labels is not None else None,
        "sampler": cfg.sampler.name, "sampler_steps": cfg.sampler.steps, "guidance": cfg.guidance.name,
        "guidance_scale": cfg.guidance.scale, "seed": cfg.seed,
        "reference": f"{data_cfg.dataset.name} training split, {len(reference)} images (seed {REFERENCE_SEED})",
        "held_out": f"{data_cfg.dataset.name} held-out split, {len(held_out)} images",
        "standard_errors": f"bootstrap over the samples, {bootstrap} replicates (FD, KID); binomial (shares)"
                           if bootstrap else "binomial (shares) only: eval.bootstrap=0",
        "extractors": about, "produced_by": produced_by,
        "classifier_train_seconds": classifier.train_seconds if classifier is not None else 0.0,
    }}


def curve_metrics(metrics: dict) -> dict[str, float]:
    """The evaluation's own numbers, for curves and the HParams view: not their standard errors,
    the held-out data's reference values or the counts."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and not k.endswith((SE, "_std", "_checked")) and not k.startswith("real_")}


# train.best_metric -> (the metrics that measure it, in order of preference; +1 lower is better, -1 higher)
BEST_METRICS = {"fd": (("fid", "fd_classifier"), 1), "class_accuracy": (("class_accuracy",), -1)}


def best_score(metrics: dict, best_metric: str) -> Optional[float]:
    """The score train.best_metric chooses best.pt by, lower is better (None for val_loss, or when
    the evaluation did not measure it)."""
    if best_metric not in BEST_METRICS:
        return None
    keys, sign = BEST_METRICS[best_metric]
    value = next((metrics[k] for k in keys if metrics.get(k) is not None), None)
    return None if value is None else sign * float(value)


def _summary(metrics: dict) -> str:
    """'fd_classifier 0.83 ± 0.02, ...': the numbers with their errors, the errors not on their own."""
    shown = [k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
             and not k.endswith(SE) and not k.startswith("real_")]
    return ", ".join(f"{k} {metrics[k]:.4g}" + (f" ± {metrics[k + SE]:.2g}" if k + SE in metrics else "")
                     for k in shown)


def memorisation_check(generated: Measured, real: Measured, train: ImageData, extractor: Extractor,
                       device: torch.device, eval_cfg: DictConfig, cache_root: Path, tag: str,
                       samples: SampleResult, pictures: Optional[Path]) -> dict:
    """The memorisation entries of metrics.json for up to eval.memorisation samples, spread over the whole draw,
    against every training image (their features cached once per data set); the 16 closest pairs pictured."""
    count = min(eval_cfg.memorisation, len(generated.features), len(real.features))
    extract = FeatureExtraction(extractor, [metric_layers(extractor, ["fid"])["fid"]], device, eval_cfg.batch_size)
    train_features = cached_features(train.images, extract, cache_root, f"{tag}-train-all")[extract.layers[0]]
    checked, held_out = spread(len(generated.features), count), spread(len(real.features), count)
    check = memorisation(generated.features[checked], real.features[held_out], train_features)
    if pictures is not None:
        pairs = check.closest(min(16, count))
        save_pairs(samples.images[checked[[s for s, _ in pairs]]], train.images[[t for _, t in pairs]],
                   pictures / "nearest_neighbours.png")
    log.info("memorisation: %.1f%% of %d samples are as close to a training image as the closest %.1f%% of held-out "
             "images are%s", 100 * check.share_close, count, 100 * check.expected,
             " -- the model may be returning training images" if check.flagged else "")
    return {**check.metrics(), "memorisation_checked": count}
