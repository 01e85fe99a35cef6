"""The images and masks a user gives mode=edit, read whole and checked, so a missing or broken
file is one sentence before any work: an image folder (every image under it, sorted by path) or
an .npz in the samples.npz format (images uint8 N,H,W,C; labels int64 N, -1 = none), and masks as
one image for all inputs or a folder of one per input (white = regenerate)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from einops import rearrange
from PIL import Image
from torch import Tensor

from difflab.data.folder import image_files
from difflab.errors import UserError

GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")  # PIL modes read as one channel; any other as RGB
PIL_FAILURES = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def _path(spec: str, setting: str, what: str) -> Path:
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"{setting}={spec} does not exist: give {what}.")
    return path


def _decode(path: Path, setting: str, grey: Optional[bool] = None) -> Tensor:
    """An image file as uint8 C,H,W at its own size; grey: forced to one channel (masks)."""
    try:
        with Image.open(path) as image:
            one = image.mode in GREY_MODES if grey is None else grey
            pixels = np.asarray(image.convert("L" if one else "RGB"), dtype=np.uint8)
    except PIL_FAILURES:
        raise UserError(f"{setting}: {path} is not a readable image: replace it or remove it.") from None
    return torch.from_numpy(pixels.reshape(*pixels.shape[:2], -1).copy()).permute(2, 0, 1)


def _stacked(files: list[Path], setting: str, grey: Optional[bool] = None) -> Tensor:
    images = [_decode(f, setting, grey) for f in files]
    shapes = sorted({tuple(t.shape) for t in images})
    if len(shapes) > 1:
        shown = ", ".join("x".join(map(str, s)) for s in shapes[:2])
        raise UserError(f"{setting} holds images of different sizes or channels ({shown}): give images of one size, "
                        "that of the model's.")
    return torch.stack(images)


def _folder_files(root: Path, setting: str) -> list[Path]:
    files = image_files(root)
    if not files:
        raise UserError(f"{setting}={root} holds no .png or .jpg images: put the images to edit there.")
    return files


def _read_npz(path: Path, setting: str) -> tuple[Tensor, Optional[Tensor]]:
    """images (and labels where it has them) of a samples.npz, read without pickle."""
    try:
        data = np.load(path, allow_pickle=False)
        if not hasattr(data, "files"):  # a plain .npy array under an .npz name
            raise ValueError("one array, not an archive of named arrays")
        with data:
            images = data["images"] if "images" in data.files else None
            labels = data["labels"] if "labels" in data.files else None
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"{setting}={path} is not a readable .npz ({e}): give a samples.npz written by "
                        "difflab.") from None
    shaped = images is not None and images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] in (1, 3)
    if not shaped or not len(images):
        raise UserError(f"{setting}={path} has no `images` array of uint8 N,H,W,C with C 1 or 3: give a samples.npz "
                        "written by difflab (or one in its format).")
    if labels is not None and (labels.shape != (len(images),) or labels.dtype.kind not in "iu"):
        raise UserError(f"{setting}={path} has `labels` that are not one integer per image: fix or drop them.")
    as_tensor = None if labels is None else torch.from_numpy(labels.astype(np.int64))
    return rearrange(torch.from_numpy(images.copy()), "n h w c -> n c h w").contiguous(), as_tensor


def read_edit_images(spec: Optional[str]) -> tuple[Tensor, Optional[Tensor]]:
    """The images to edit (uint8 N,C,H,W, in the order given) and the labels a .npz carries."""
    if not spec:
        raise UserError("mode=edit needs images: add edit.images=<a folder of images, or a samples.npz>.")
    what = "a folder of images or a samples.npz file"
    path = _path(spec, "edit.images", what)
    if path.is_dir():
        return _stacked(_folder_files(path, "edit.images"), "edit.images"), None
    if path.suffix.lower() == ".npz":
        return _read_npz(path, "edit.images")
    raise UserError(f"edit.images={spec} is neither a folder nor an .npz file: give {what}.")


def read_masks(spec: str, count: int, size: tuple[int, int]) -> Tensor:
    """The masks of `count` inputs of size H,W as float N,1,H,W of 0 and 1 (1 = regenerate): one
    image for all, or a folder of exactly one per input (matched by sorted path)."""
    path = _path(spec, "edit.mask", "a mask image, or a folder of one mask image per input")
    if path.is_dir():
        files = _folder_files(path, "edit.mask")
        if len(files) != count:
            raise UserError(f"edit.mask={spec} holds {len(files)} masks for {count} images: give one mask per image "
                            "(matched in sorted order), or a single mask image for all.")
    else:
        files = [path]
    masks = _stacked(files, "edit.mask", grey=True)
    if tuple(masks.shape[-2:]) != tuple(size):
        raise UserError(f"edit.mask={spec} is {masks.shape[-1]}x{masks.shape[-2]} but the images are "
                        f"{size[1]}x{size[0]}: give masks of the images' size.")
    return (masks >= 128).float().expand(count, -1, -1, -1) if len(files) == 1 else (masks >= 128).float()
