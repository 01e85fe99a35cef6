"""Loads the configured data set as uint8 tensors at the configured size and channels.

The standard data sets are decoded once and kept as tensors (native size, before any resize)
in the artifact cache, {cache_dir}/artifacts/datasets/<key>/, one entry per split, so later
runs load in a fraction of a second; the cache's lock makes parallel sweep jobs wait for the
first one's decode instead of all decoding at once, and its hash check decodes a damaged entry
again.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException
from torch import Tensor

from difflab.artifacts import ArtifactCache, obtain
from difflab.checkpoint import atomic_save
from difflab.config import conditioning_name
from difflab.data.captions import CaptionTable, class_captions
from difflab.data.folder import MODES, folder_captions, folder_classes, read_folder
from difflab.data.image_data import ImageData
from difflab.data.sources import STANDARD, Splits, read_standard
from difflab.data.transforms import fit_images
from difflab.errors import UserError
from difflab.models.text_encoder import WordTokenizer

log = logging.getLogger("difflab.data")

SPLITS = ("train", "test")
CACHE_VERSION = 1  # bump when what a cache file holds changes
STAGE = "datasets"  # their folder in the artifact cache
HOLDOUT_SEED = 0
FOLDER_VAL_FRACTION = 0.1  # a folder has no test split: hold out at most this much of it


def load_splits(cfg, cache_dir: str) -> tuple[ImageData, ImageData]:
    """(train, val): val is a fixed, seeded random pick of cfg.val_size images, from the official
    test split for the standard data sets, and taken out of the images for a folder."""
    if cfg.val_size < 0:
        raise UserError(f"dataset.val_size={cfg.val_size} is negative: use 0 (no validation) or e.g. 1000.")
    train = load_split(cfg, "train", cache_dir)
    if train.num_classes != cfg.num_classes:
        log.info("dataset.num_classes=%d, but %s has %d classes: using %d.", cfg.num_classes, cfg.name,
                 train.num_classes, train.num_classes)
    if cfg.name == "folder":
        size = min(cfg.val_size, int(len(train) * FOLDER_VAL_FRACTION))
        if size < cfg.val_size:
            log.info("Holding out %d of the folder's %d images for validation (at most %d%%), not "
                     "dataset.val_size=%d.", size, len(train), int(FOLDER_VAL_FRACTION * 100), cfg.val_size)
        order = _seeded_permutation(len(train))
        return train.subset(order[size:].sort().values), train.subset(order[:size])
    test = load_split(cfg, "test", cache_dir)
    return train, test.subset(_seeded_permutation(len(test))[:cfg.val_size])


def load_split(cfg, split: str, cache_dir: str) -> ImageData:
    """One full official split ("train" or "test"); a folder has none, so both are all of it."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    _check(cfg)
    root = _root(cfg)
    if cfg.name == "folder":
        return read_folder(root, cfg.image_size, cfg.channels)
    cache = Path(cache_dir).expanduser()
    data = _cached(cfg.name, split, cache, lambda: read_standard(cfg.name, root, split, cache, cfg.download))
    return ImageData(fit_images(data.images, cfg.channels, cfg.image_size), data.labels, data.num_classes)


def dataset_classes(cfg) -> int:
    """The number of classes the data set's labels have (0 = unlabelled), known before any image
    is decoded: a folder's are its class sub-folders."""
    _check(cfg)
    return len(folder_classes(_root(cfg))) if cfg.name == "folder" else cfg.num_classes


# Names of the standard data sets' classes, as their labels index them (MNIST's are its digits).
CLASS_NAMES = {
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
}


def class_names(cfg) -> Optional[list[str]]:
    """What each label means, for pictures: a folder's class sub-folders, a standard data set's
    names; None where the label itself is the name (MNIST's digits) or not known (CIFAR-100)."""
    if cfg.name == "folder":
        try:
            return folder_classes(_root(cfg)) or None
        except UserError:
            return None
    names = CLASS_NAMES.get(cfg.name)
    return list(names) if names else None


def caption_options(cfg, data: Optional[ImageData] = None) -> tuple[list[list[str]], Optional[Tensor]]:
    """The captions conditioning=text trains on, as options[key][k], and each example's key: a
    folder's metadata captions (one option per distinct caption), else the templates per class
    (key = label). Without `data`, only the options (what the vocabulary is built from)."""
    captions = data.captions if data is not None else (folder_captions(_root(cfg)) if cfg.name == "folder" else None)
    if captions is not None:
        texts = captions if data is not None else list(captions.values())
        distinct = sorted(set(texts))
        index = {c: i for i, c in enumerate(distinct)}
        keys = torch.tensor([index[c] for c in texts], dtype=torch.long) if data is not None else None
        return [[c] for c in distinct], keys
    classes = folder_classes(_root(cfg)) if cfg.name == "folder" else ()
    options = class_captions(cfg, list(cfg.get("captions", {}).get("templates") or []), classes)
    return options, (data.labels if data is not None else None)


def default_prompts(cfg, data: Optional[ImageData] = None) -> dict:
    """What a text model samples when given no prompts, for its checkpoint's meta: the first
    template of each class ({"class_prompts"}: sampling follows sample.labels), or a folder's
    distinct captions ({"prompts"}, at most 100)."""
    options, _ = caption_options(cfg, data)
    captioned = data.captions is not None if data is not None else cfg.name == "folder" and folder_captions(_root(cfg)) is not None
    return {"prompts": [row[0] for row in options][:100]} if captioned else {"class_prompts": [row[0] for row in options]}


def caption_table(cfg, data: ImageData, tokenize) -> CaptionTable:
    """Every example's caption options as token ids (`tokenize`: prompts -> ids)."""
    options, keys = caption_options(cfg, data)
    return CaptionTable.build(options, keys, tokenize)


def _check(cfg) -> None:
    if cfg.name not in (*STANDARD, "folder"):
        raise UserError(f"dataset.name={cfg.name} is not a data set: choose one of {', '.join(STANDARD)}, folder.")
    if cfg.channels not in MODES:
        raise UserError(f"dataset.channels={cfg.channels} is not supported: use 1 (grey) or 3 (RGB).")
    if cfg.image_size <= 0:
        raise UserError(f"dataset.image_size={cfg.image_size} must be positive: use e.g. 32.")


def _root(cfg) -> Path:
    """cfg.root as a path; empty or ??? means the user has not set it (conf/dataset/folder.yaml)."""
    try:
        root = cfg.root
    except MissingMandatoryValue:
        root = ""
    except OmegaConfBaseException as e:
        reason = str(e).splitlines()[0]
        raise UserError(f"dataset.root could not be resolved ({reason}): set dataset.root=/path/to/data.") from None
    if not root.strip():
        raise UserError("dataset.root is not set: add dataset.root=/path/to/your/images to the command line.")
    return Path(root).expanduser()


def _seeded_permutation(n: int) -> torch.Tensor:
    """The same shuffle on every run and machine, whatever the global seed."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(HOLDOUT_SEED))


def _cached(name: str, split: str, cache_dir: Path, read: Callable[[], Splits]) -> ImageData:
    """The decoded split, from the artifact cache or decoded now (every split `read` gives is
    stored, so the next split a run needs is there already). Each process obtains it on its own:
    rank 0 alone reads the held-out split for an evaluation."""
    cache = ArtifactCache(cache_dir)
    with contextlib.ExitStack() as until_stored:
        def decode() -> tuple[Path, dict]:  # the files live until obtain has stored them
            cache.root.mkdir(parents=True, exist_ok=True)
            tmp = Path(until_stored.enter_context(tempfile.TemporaryDirectory(dir=cache.root)))
            splits = read()
            for each, data in splits.items():
                _save_cache(tmp / f"{each}.pt", data)
                if each != split:
                    cache.store(STAGE, _split_settings(name, each), tmp / f"{each}.pt", _record(data))
            return tmp / f"{split}.pt", _record(splits[split])

        artifact = obtain(cache, STAGE, _split_settings(name, split), decode, what=f"decoded {name} {split} split",
                          alone=True, anew="")
    return _load_cache(artifact.path)  # its hash was checked


def _split_settings(name: str, split: str) -> dict:
    return {"dataset": name, "split": split, "version": CACHE_VERSION}


def _record(data: ImageData) -> dict:
    return {"images": len(data), "shape": list(data.images.shape[1:]), "num_classes": data.num_classes}


def _load_cache(path: Path) -> ImageData:
    saved = torch.load(path, weights_only=True)
    return ImageData(saved["images"], saved["labels"], saved["num_classes"])


def _save_cache(path: Path, data: ImageData) -> None:
    state = {"version": CACHE_VERSION, "images": data.images.contiguous(), "labels": data.labels.contiguous(),
             "num_classes": data.num_classes}
    try:
        atomic_save(state, path)
    except OSError as e:
        raise UserError(f"Cannot write the data cache {path} ({e.strerror}): set paths.cache_dir to a "
                        "writable folder with free space.") from None


def text_vocabulary(cfg) -> Optional[list[str]]:
    """The learned text encoder's words: those of every caption the data set has (templates over
    its classes, or a folder's metadata), known before any image is read; None for other encoders."""
    if conditioning_name(cfg) != "text" or cfg.text_encoder.name != "learned":
        return None
    options, _ = caption_options(cfg.dataset)
    return WordTokenizer.from_captions([c for row in options for c in row], cfg.text_encoder.max_length).vocabulary
