"""The evaluation's pieces in-process: the evaluation classifier (trained for a few steps on the
shapes folder) registered as a torch-fidelity feature extractor, the Frechet distance and KID
from its features by torch-fidelity's own functions (the numbers its calculate_metrics gives),
the real images' feature cache, and the Inception weights lookup."""

from __future__ import annotations

import pytest
import torch
import torch_fidelity
from conftest import tiny_overrides
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from difflab.cli import CONF_DIR
from difflab.errors import UserError
from difflab.evaluate.extractors import (INCEPTION_FILE, ClassifierFeatures, FidelityImages, classifier_extractor,
                                         find_inception_weights, inception_extractor)
from difflab.evaluate.feature_classifier import feature_classifier, real_splits
from difflab.evaluate.metrics import FIDELITY_SEED, KEYS, fidelity_metrics

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cfg(shapes_dir, tmp_path_factory):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        cfg = compose(config_name="config", overrides=[
            *tiny_overrides(shapes_dir, tmp_path_factory.mktemp("cache")), "eval.classifier_steps=20"])
    GlobalHydra.instance().clear()
    return cfg


@pytest.fixture(scope="module")
def classifier(cfg):
    return feature_classifier(cfg, CPU)


@pytest.fixture(scope="module")
def shapes(cfg):
    return real_splits(cfg, 0)[0]


def test_evaluation_classifier_is_trained_once_then_cached(cfg, classifier):
    assert classifier.trained_now and classifier.path.is_file()
    assert classifier.num_classes == 2 and classifier.image_size == 16 and classifier.channels == 1
    assert classifier.test_accuracy is not None and 0 <= classifier.test_accuracy <= 1
    again = feature_classifier(cfg, CPU)
    assert not again.trained_now and again.path == classifier.path
    for a, b in zip(classifier.net.state_dict().values(), again.net.state_dict().values()):
        assert torch.equal(a, b)


def test_extractor_registration_and_features(classifier, shapes):
    ex = classifier_extractor(classifier.path, classifier.key)
    assert FEATURE_EXTRACTORS_REGISTRY[ex.name] is ClassifierFeatures
    assert classifier_extractor(classifier.path, classifier.key).name == ex.name  # registering again is a no-op
    module = ClassifierFeatures(ex.name, ["features", "logits"], feature_extractor_weights_path=str(ex.weights))
    grey = shapes.images[:6]
    features, logits = module(grey.repeat(1, 3, 1, 1))  # uint8 RGB in, as torch-fidelity passes it
    assert features.shape == (6, classifier.net.feature_dim) and logits.shape == (6, 2)
    direct = classifier.net(grey.float() / 127.5 - 1)[0]
    torch.testing.assert_close(features, direct)  # grey repeated to RGB and back is lossless
    bigger = torch.nn.functional.interpolate(grey.repeat(1, 3, 1, 1).float(), size=32, mode="nearest").to(torch.uint8)
    assert module(bigger)[0].shape == (6, classifier.net.feature_dim)  # other sizes are resized to the classifier's


def test_frechet_distance_is_zero_for_the_same_sample_and_grows_with_a_shift(classifier, shapes):
    ex = classifier_extractor(classifier.path, classifier.key)
    images = shapes.images

    def shifted(amount: int) -> torch.Tensor:
        return (images.int() + amount).clamp(0, 255).to(torch.uint8)

    def fd(other: torch.Tensor) -> float:
        return fidelity_metrics(other, images, ex, CPU, 16, "/nonexistent-never-written")["fd_classifier"]

    same = fd(images)
    small, large = fd(shifted(40)), fd(shifted(120))
    assert abs(same) < 1e-3 * large, (same, small, large)
    assert 0 < small < large, (small, large)
    m = fidelity_metrics(shifted(120), images, ex, CPU, 16, "/nonexistent-never-written")
    assert set(m) == {*KEYS["classifier"].values(), "fd_classifier_se", "kid_classifier_se", "precision_classifier_se",
                      "recall_classifier_se"}
    assert m["kid_classifier"] > 0 and m["fd_classifier_se"] > 0


def test_metrics_are_torch_fidelitys_calculate_metrics(classifier, shapes):
    ex = classifier_extractor(classifier.path, classifier.key)
    images = shapes.images
    noise = torch.randint(-60, 60, images.shape, generator=torch.Generator().manual_seed(0))
    generated, reference = (images.int() + noise).clamp(0, 255).to(torch.uint8)[:30], images[18:]
    ours = fidelity_metrics(generated, reference, ex, CPU, 16, "/nonexistent-never-written")
    theirs = torch_fidelity.calculate_metrics(
        input1=FidelityImages(generated), input2=FidelityImages(reference), fid=True, kid=True,
        feature_extractor=ex.name, feature_extractor_weights_path=str(ex.weights), cuda=False, batch_size=16,
        prc=True, save_cpu_ram=True, verbose=False, cache=False, kid_subset_size=15, rng_seed=FIDELITY_SEED)
    assert set(KEYS["classifier"].values()) <= set(ours) and ours["fd_classifier"] > 1
    for their_key, our_key in KEYS["classifier"].items():
        assert ours[our_key] == pytest.approx(theirs[their_key], rel=1e-6, abs=1e-9), our_key


def test_real_features_are_cached_per_extractor_and_name(classifier, shapes, tmp_path):
    ex = classifier_extractor(classifier.path, classifier.key)
    images = shapes.images
    first = fidelity_metrics(images[:20], images[20:], ex, CPU, 16, str(tmp_path), (None, "shapes-train20"))
    entry_file = tmp_path / f"shapes-train20-{ex.name}.pt"
    assert [p.name for p in tmp_path.iterdir()] == [entry_file.name]
    assert fidelity_metrics(images[:20], images[20:], ex, CPU, 16, str(tmp_path), (None, "shapes-train20")) == first
    entry = torch.load(entry_file, weights_only=True)
    assert entry["features"]["features"].shape == (len(images) - 20, classifier.net.feature_dim)
    entry["features"]["features"] *= 2
    torch.save(entry, entry_file)
    assert fidelity_metrics(images[:20], images[20:], ex, CPU, 16, str(tmp_path), (None, "shapes-train20")) != first
    other = images[10:]  # other images under the same name: extracted anew, not taken from the entry
    assert (fidelity_metrics(images[:20], other, ex, CPU, 16, str(tmp_path), (None, "shapes-train20"))
            == fidelity_metrics(images[:20], other, ex, CPU, 16, str(tmp_path)))


def test_inception_weights_lookup(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    path, why = find_inception_weights(None)
    assert path is None and "eval.inception_weights" in why and INCEPTION_FILE in why
    path, why = find_inception_weights(str(tmp_path / "nope.pth"))
    assert path is None and "does not exist" in why
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / INCEPTION_FILE).write_bytes(b"")
    assert find_inception_weights(None) == (tmp_path / "hub" / "checkpoints" / INCEPTION_FILE, "")


def test_foreign_inception_weights_are_one_clear_error(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a state dict")
    with pytest.raises(UserError, match="is not torch-fidelity's Inception state dict"):
        inception_extractor(bad)
    torch.save({"fc.weight": torch.zeros(10, 2048)}, tmp_path / "small.pth")
    with pytest.raises(UserError, match=r"\(10, 2048\) fc layer"):
        inception_extractor(tmp_path / "small.pth")
