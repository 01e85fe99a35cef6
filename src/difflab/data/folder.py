"""A folder of the user's own images, with optional one-sub-folder-per-class labels.

Images come in any size and mode, so each is brought to the configured mode and square size
by PIL as it is decoded; a bad file is skipped (and named in one warning) rather than ending
a run over one image in thousands.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from difflab.data.captions import metadata_file, read_metadata
from difflab.data.image_data import ImageData
from difflab.errors import UserError

log = logging.getLogger("difflab.data")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
MODES = {1: "L", 3: "RGB"}
NAMED_IN_WARNING = 5


def read_folder(root: Path, image_size: int, channels: int) -> ImageData:
    """Every image under root, sorted by path; labelled by top-level sub-folder when every image
    lies in one and there are at least two (one folder of images is just an unlabelled set);
    captioned by the folder's metadata file when it has one."""
    if not root.is_dir():
        raise UserError(f"dataset.root={root} is not a folder: set dataset.root to a folder of .png or .jpg images.")
    files = image_files(root)
    class_of = _class_names(root, files)
    captions = folder_captions(root, files)
    decoded, bad, kept = [], [], []
    for path in files:
        try:
            decoded.append((_decode(path, image_size, MODES[channels]), class_of.get(path)))
            kept.append(path)
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):  # PIL's ways to fail
            bad.append(path)
    if bad:
        _warn_skipped(root, bad)
    if not decoded:
        raise UserError(f"No readable images found in {_shown(root)}: put .png or .jpg files there "
                        "(optionally in one sub-folder per class) or set dataset.root.")
    classes = _readable_classes(root, set(class_of.values()), {name for _, name in decoded if name is not None})
    index = {name: i for i, name in enumerate(classes)}
    labels = [index[name] if classes else 0 for _, name in decoded]
    log.info("Read %d images from %s (%s).", len(decoded), _shown(root),
             f"{len(classes)} classes: {', '.join(classes)}" if classes else "unlabelled")
    texts = None if captions is None else [captions.get(p.resolve(), "") for p in kept]
    return ImageData(torch.stack([t for t, _ in decoded]), torch.tensor(labels, dtype=torch.int64), len(classes), texts)


def folder_captions(root: Path, files: list[Path] | None = None) -> dict[Path, str] | None:
    """(resolved) image path -> caption from the folder's metadata file, None without one."""
    path = metadata_file(root)
    return None if path is None else read_metadata(path, image_files(root) if files is None else files)


def _readable_classes(root: Path, named: set[str], readable: set[str]) -> list[str]:
    """The class folders that kept at least one readable image: a class without any would be
    sampled and scored though nothing of it was learnt. Fewer than two left: unlabelled."""
    empty = sorted(named - readable)
    if empty:
        log.warning("Skipped the class folder(s) %s of %s: none of their images is readable.",
                    ", ".join(map(_shown, empty)), _shown(root))
    if named and len(readable) < 2:
        log.warning("Only %d class folder of %s has readable images: the images are read as unlabelled.",
                    len(readable), _shown(root))
        return []
    return sorted(readable)


def folder_classes(root: Path) -> list[str]:
    """The class names read_folder would label the folder's images with, without decoding any."""
    if not root.is_dir():
        raise UserError(f"dataset.root={root} is not a folder: set dataset.root to a folder of .png or .jpg images.")
    return sorted(set(_class_names(root, image_files(root)).values()))


def image_files(root: Path) -> list[Path]:
    """Image files anywhere under root, skipping hidden files and folders (.git, .ipynb_checkpoints)."""
    return sorted(p for p in root.rglob("*")
                  if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def _class_names(root: Path, files: list[Path]) -> dict[Path, str]:
    """Each file's top-level sub-folder, or {} when some image lies in root itself or all share one folder."""
    parts = {p: p.relative_to(root).parts for p in files}
    if any(len(rel) == 1 for rel in parts.values()):
        return {}
    class_of = {p: rel[0] for p, rel in parts.items()}
    return class_of if len(set(class_of.values())) > 1 else {}


def _decode(path: Path, image_size: int, mode: str) -> torch.Tensor:
    """Decode, centre-crop to a square and resize (antialiased) to a C x H x W uint8 tensor."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)  # photos store their rotation in EXIF
        if image.mode == "P":
            image = image.convert("RGBA")  # palette transparency is lost in a direct convert
        image = _centre_square(image.convert(mode)).resize((image_size, image_size), Image.Resampling.BICUBIC)
        pixels = np.asarray(image, dtype=np.uint8).reshape(image_size, image_size, -1)
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()


def _centre_square(image: Image.Image) -> Image.Image:
    """Crop before resizing (rather than resize with a box), so nothing outside the square bleeds in."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))


def _shown(path: Path | str) -> str:
    """A path as text any log stream can take: bytes of a name that is not UTF-8 as escapes."""
    return str(path).encode("utf-8", "backslashreplace").decode("utf-8")


def _warn_skipped(root: Path, bad: list[Path]) -> None:
    names = [_shown(p.relative_to(root)) for p in bad[:NAMED_IN_WARNING]]
    more = f" and {len(bad) - NAMED_IN_WARNING} more" if len(bad) > NAMED_IN_WARNING else ""
    log.warning("Skipped %d unreadable image file(s) in %s: %s%s.", len(bad), _shown(root), ", ".join(names), more)
