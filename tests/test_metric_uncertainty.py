"""The metrics' standard errors, the evaluation classifier's sensitivity to known degradations,
per-class FD and the memorisation check, in-process on a shapes folder (a classifier trained for
a few steps) and on Gaussian features whose spread is known."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, make_shapes_folder, tiny_overrides
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from torch_fidelity.metric_fid import fid_statistics_to_metric

from difflab.cli import CONF_DIR
from difflab.evaluate.class_shares import class_share_distance
from difflab.evaluate.extractors import FeatureExtraction, classifier_extractor
from difflab.evaluate.feature_classifier import feature_classifier, real_splits
from difflab.evaluate.memorisation import memorisation
from difflab.evaluate.metrics import evaluate_model, fidelity_metrics
from difflab.evaluate.uncertainty import fd_standard_error, frechet_distance, kid_standard_error, share_standard_error
from difflab.sampling import SampleResult

sys.path.insert(0, str(REPO / "benchmarks"))
from metric_sensitivity import add_noise, blur, fit_for_purpose  # noqa: E402

CPU = torch.device("cpu")


def gaussian(n: int, dim: int = 16, shift: float = 0.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=torch.Generator().manual_seed(99)) / dim ** 0.5
    return torch.randn(n, dim, generator=g) @ mixing + shift


def test_frechet_distance_is_torch_fidelitys():
    a, b = gaussian(500).double(), gaussian(800, shift=0.3, seed=1).double()
    stats = [{"mu": x.mean(0).numpy(), "sigma": torch.cov(x.T).numpy()} for x in (a, b)]
    theirs = fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]
    assert frechet_distance(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T)) == pytest.approx(theirs, rel=1e-6)


def test_standard_errors_match_the_spread_of_fresh_draws_and_shrink_with_n():
    reference = gaussian(4000, seed=100)
    ref_mu, ref_cov = reference.double().mean(0), torch.cov(reference.double().T)
    for n in (400, 1600):
        fresh = [gaussian(n, shift=0.2, seed=s).double() for s in range(1, 25)]
        spread = torch.tensor([frechet_distance(x.mean(0), torch.cov(x.T), ref_mu, ref_cov) for x in fresh]).std()
        se = fd_standard_error(gaussian(n, shift=0.2), reference)
        assert 0.5 * spread < se < 2.0 * spread, (n, se, spread)
    small, large = (fd_standard_error(gaussian(n, shift=0.2), reference) for n in (400, 1600))
    assert large < 0.7 * small  # about 1/sqrt(4) = 0.5
    kid_small, kid_large = (kid_standard_error(gaussian(n, shift=0.2), reference) for n in (400, 1600))
    assert 0 < kid_large < 0.7 * kid_small
    assert share_standard_error(0.9, 400) == pytest.approx(0.015)
    assert share_standard_error(0.9, 1600) == pytest.approx(0.0075)


def test_bootstrap_is_reproducible_and_off_when_asked():
    x, ref = gaussian(300, shift=0.1), gaussian(600, seed=7)
    assert fd_standard_error(x, ref) == fd_standard_error(x, ref)
    assert math.isnan(fd_standard_error(x, ref, replicates=0))


@pytest.fixture(scope="module")
def shapes_cfg(tmp_path_factory):
    """A shapes folder of 400 images (so an FD has samples to be estimated from) and a config
    whose evaluation classifier trains for a few steps."""
    folder = make_shapes_folder(tmp_path_factory.mktemp("shapes400"), per_class=200)
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        cfg = compose(config_name="config", overrides=[
            *tiny_overrides(folder, tmp_path_factory.mktemp("cache")), "dataset.val_size=100",
            "eval.classifier_steps=30", "eval.batch_size=100"])
    GlobalHydra.instance().clear()
    return cfg


@pytest.fixture(scope="module")
def extractor(shapes_cfg):
    classifier = feature_classifier(shapes_cfg, CPU)
    return classifier, classifier_extractor(classifier.path, classifier.key)


def test_fd_climbs_the_noise_and_blur_ladders_and_real_held_out_images_sit_at_the_floor(shapes_cfg, extractor):
    _, ex = extractor
    train, held_out = real_splits(shapes_cfg, 100)
    shuffled = train.images[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))]
    reference, same_kind = shuffled[:200], shuffled[200:200 + len(held_out)]  # as many as are held out

    def fd(images: torch.Tensor) -> tuple[float, float]:
        m = fidelity_metrics(images, reference, ex, CPU, 100, "/nonexistent-never-written")
        return m["fd_classifier"], m["fd_classifier_se"]

    noise = [fd(add_noise(same_kind, sigma)) for sigma in (0.0, 0.05, 0.1, 0.2)]
    blurred = [fd(blur(same_kind, sigma)) for sigma in (0.0, 0.5, 1.0, 2.0)]
    for ladder in (noise, blurred):
        verdict = fit_for_purpose([v for v, _ in ladder], [e for _, e in ladder], worse_is_higher=True)
        assert verdict["monotone"], ladder
    (floor, floor_se), test_split = noise[0], fd(held_out.images)[0]
    assert abs(test_split - floor) < 2 * 2 ** 0.5 * floor_se and test_split < noise[2][0] / 2, (test_split, noise)


def test_features_keep_their_magnitude_and_are_standardised_on_training_images(shapes_cfg, extractor):
    classifier, ex = extractor
    train, _ = real_splits(shapes_cfg, 100)
    features = FeatureExtraction(ex, ["features"], CPU, 100)(train.images)["features"]
    net = classifier.net
    assert features.shape[1] == net.feature_dim > 128
    low, high = features[:, :net.low_level_dim], features[:, net.low_level_dim:]
    # silent units keep a floor of a tenth of the typical spread, so the medians are the check
    assert features.mean(0).abs().max() < 0.1 and abs(high.std(0).median() - 1) < 0.05 and high.std(0).max() < 1.05
    assert abs(low.std(0).median() - net.low_level_weight) < 0.05
    brighter = FeatureExtraction(ex, ["features"], CPU, 100)((train.images.float() * 0.5).to(torch.uint8))["features"]
    assert (brighter.norm(dim=1) - features.norm(dim=1)).abs().mean() > 0.1  # no per-image normalisation


def _stand_in_sampler(images: torch.Tensor, labels: torch.Tensor):
    """A 'model' whose samples are the given images, in a seeded order (the folder's is by class)."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    return lambda n: SampleResult(images[order[:n]], labels[order[:n]], 1.0, [])


def _in_order_sampler(images: torch.Tensor, labels: torch.Tensor):
    """Returns the images in the order given, as a balanced draw comes in class order."""
    return lambda n: SampleResult(images[:n], labels[:n], 1.0, [])


def test_memorisation_flags_a_model_that_returns_training_images(shapes_cfg, extractor, tmp_path):
    train, held_out = real_splits(shapes_cfg, 100)
    model = SimpleNamespace(cfg=shapes_cfg)
    cfg = compose_eval(shapes_cfg, 100)
    copier = evaluate_model(model, cfg, CPU, "copier", _stand_in_sampler(train.images, train.labels),
                            pictures=tmp_path)
    # shapes repeat exactly across the splits, so many held-out images sit at distance 0 too
    assert copier["memorisation_flagged"] is True
    assert copier["memorisation_share_close"] > 1.5 * copier["memorisation_expected_share"]
    assert (tmp_path / "nearest_neighbours.png").is_file()
    # other draws of the same shapes, lightly noised: binary shapes at whole-pixel offsets repeat
    # the training images exactly, which a model that does not copy would not do
    fresh = make_shapes_folder(tmp_path / "unseen", per_class=50)
    unseen = real_splits(compose_eval(shapes_cfg, 100, root=fresh), 0)[0]
    honest = evaluate_model(model, cfg, CPU, "honest", _stand_in_sampler(add_noise(unseen.images, 0.02), unseen.labels))
    assert honest["memorisation_flagged"] is False, honest["memorisation_share_close"]
    for m in (copier, honest):
        for key in ("fd_classifier", "kid_classifier", "precision_classifier", "recall_classifier", "class_accuracy"):
            assert m[f"{key}_se"] >= 0, key  # a share of 1 has a binomial error of 0
        assert m["fd_classifier_se"] > 0 and m["kid_classifier_se"] > 0
        assert set(m["fd_classifier_per_class"]) == {"0", "1"}
        assert m["fd_classifier_class_mean"] == pytest.approx(sum(m["fd_classifier_per_class"].values()) / 2)
        assert m["class_share_tv"] < 0.15 and m["class_share_tv_se"] > 0 and m["real_class_share_tv"] < 0.15
    ones = train.labels == 1  # a model that draws one of the two shapes only: half the mix is missing
    dropped = evaluate_model(model, cfg, CPU, "dropped", _stand_in_sampler(train.images[ones], train.labels[ones]))
    assert dropped["class_share_tv"] > 0.4 > honest["class_share_tv"] + 4 * honest["class_share_tv_se"]


def test_memorisation_checks_samples_from_the_whole_draw_not_its_first_classes(shapes_cfg, extractor, tmp_path):
    """A balanced draw comes in class order: with eval.memorisation below eval.num_samples, the check must not
    read the first class alone. Here class 0's samples copy training images and class 1's are new."""
    train, _ = real_splits(shapes_cfg, 100)
    fresh = real_splits(compose_eval(shapes_cfg, 100, root=make_shapes_folder(tmp_path / "unseen", per_class=50)), 0)[0]
    copies, new = train.images[train.labels == 0][:50], add_noise(fresh.images[fresh.labels == 1][:50], 0.02)
    images, labels = torch.cat([copies, new]), torch.tensor([0] * 50 + [1] * 50)
    cfg = OmegaConf.merge(compose_eval(shapes_cfg, 100), {"eval": {"memorisation": 30}})
    half = evaluate_model(SimpleNamespace(cfg=shapes_cfg), cfg, CPU, "half-copier", _in_order_sampler(images, labels))
    only_copies = memorisation_share(copies, shapes_cfg)
    assert half["memorisation_checked"] == 30
    # shapes repeat across the splits, so copies are not all "close"; half the checked samples are copies
    share = half["memorisation_share_close"]
    assert 0.25 * only_copies < share < 0.75 * only_copies, (share, only_copies)


def memorisation_share(images: torch.Tensor, shapes_cfg) -> float:
    cfg = compose_eval(shapes_cfg, len(images))
    labels = torch.zeros(len(images), dtype=torch.long)
    sampler = _in_order_sampler(images, labels)
    return evaluate_model(SimpleNamespace(cfg=shapes_cfg), cfg, CPU, "copies", sampler)["memorisation_share_close"]


def test_class_share_distance_counts_the_mix_and_its_error_shrinks_with_n():
    g = torch.Generator().manual_seed(0)
    reference = torch.arange(10).repeat(200)
    same, floor = class_share_distance(reference, reference, 10)
    assert same == 0.0 and 0 < floor < 0.02  # resampling the same mix still moves it a little
    assert class_share_distance(torch.zeros(50, dtype=torch.long), reference, 10)[0] == pytest.approx(0.9)
    shares = torch.tensor([0.12] * 5 + [0.08] * 5)  # 60% of the draws from the first five classes
    tv, se = class_share_distance(torch.multinomial(shares, 20000, True, generator=g), reference, 10)
    assert tv == pytest.approx(0.1, abs=0.01) and 0 < se < 0.01
    errors = [class_share_distance(torch.multinomial(shares, n, True, generator=g), reference, 10)[1]
              for n in (200, 2000)]
    assert errors[1] < errors[0] / 2
    assert class_share_distance(reference[:7], reference, 10, replicates=0)[1] is None


def compose_eval(cfg, n: int, root: Path | None = None):
    from omegaconf import OmegaConf
    extra = {"eval": {"num_samples": n, "memorisation": n}}
    if root is not None:
        extra["dataset"] = {"root": str(root), "val_size": 0}
    return OmegaConf.merge(cfg, extra)


def test_memorisation_on_features_alone():
    train = gaussian(2000, seed=1)
    held_out = gaussian(300, seed=2)
    copies = memorisation(train[:300] + 1e-4, held_out, train)
    fresh = memorisation(gaussian(300, seed=3), held_out, train)
    assert copies.flagged and copies.share_close == 1.0 and copies.distance_ratio < 0.01
    assert not fresh.flagged and 0 <= fresh.share_close < 0.15 and fresh.expected == pytest.approx(0.05, abs=0.01)
    assert all(sample == original for sample, original in copies.closest(10))  # a copy's nearest is its original
