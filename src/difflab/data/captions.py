"""Captions of a data set, for text conditioning: a folder's own (the Hugging Face imagefolder
convention: a metadata.jsonl or metadata.csv beside the images, with `file_name` and `text`), or
for a labelled data set sentences made from its class names by templates
(dataset.captions.templates), one drawn per example per training step.

Everything here reads the metadata file or the config only, never an image, so the plan checks
captions (and builds the learned encoder's vocabulary) before any work.
"""

from __future__ import annotations

import csv
import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from difflab.errors import UserError

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FASHION_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def metadata_file(root: Path) -> Optional[Path]:
    """The folder's metadata file, if it has one."""
    found = [root / name for name in METADATA_FILES if (root / name).is_file()]
    if len(found) > 1:
        raise UserError(f"{root} has both metadata.jsonl and metadata.csv: keep one of them.")
    return found[0] if found else None


def read_metadata(path: Path, images: Sequence[Path]) -> dict[Path, str]:
    """file -> caption of a metadata file, checked: each row has file_name and text, and names
    an image of the folder (`images`, the paths the folder reader found)."""
    rows = _rows(path)
    known = {p.resolve() for p in images}
    captions: dict[Path, str] = {}
    for number, row in rows:
        missing = [k for k in ("file_name", "text") if k not in row]
        if missing:
            raise UserError(f"{path} row {number} has no `{missing[0]}` column (it has {', '.join(map(str, row)) or 'none'}): "
                            "give every row file_name and text, as in Hugging Face's imagefolder.")
        file = (path.parent / str(row["file_name"])).resolve()
        if file not in known:
            raise UserError(f"{path} row {number} names file_name={row['file_name']}, which is not an image of "
                            f"{path.parent}: fix the name (relative to the metadata file) or add the image.")
        captions[file] = str(row["text"] or "")
    return captions


def _rows(path: Path) -> list[tuple[int, dict]]:
    """(row number, fields) of a metadata.jsonl or metadata.csv."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path} cannot be read as UTF-8 text ({e}): rewrite it as UTF-8.") from None
    if path.suffix == ".csv":
        return [(i + 2, dict(row)) for i, row in enumerate(csv.DictReader(text.splitlines()))]
    rows = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {i + 1} is not JSON ({e.msg}): write one JSON object per line.") from None
        if not isinstance(row, dict):
            raise UserError(f"{path} line {i + 1} is not a JSON object: write one object with file_name and text per line.")
        rows.append((i + 1, row))
    return rows


def class_fields(dataset_cfg, folder_classes: Sequence[str] = ()) -> list[dict[str, str]]:
    """Per class, what a template's {placeholders} become: {name}, and on MNIST {digit} and {word}."""
    name = dataset_cfg.name
    if name == "mnist":
        return [{"digit": str(d), "word": w, "name": w} for d, w in enumerate(NUMBER_WORDS)]
    names = {"fashion_mnist": FASHION_NAMES, "cifar10": CIFAR10_NAMES}.get(name) or tuple(folder_classes)
    if not names:
        raise UserError(f"dataset.captions.templates need class names, and {name} has none here: use a folder with a "
                        "metadata.jsonl of captions, or class sub-folders.")
    return [{"name": n} for n in names]


def fill(template: str, fields: dict[str, str]) -> str:
    """The template with its placeholders replaced; an unknown one is a UserError."""
    for _, key, _, _ in string.Formatter().parse(template):
        if key is not None and key not in fields:
            raise UserError(f"dataset.captions.templates has {template!r}, whose {{{key}}} this data set does not fill: "
                            f"use {', '.join('{' + k + '}' for k in fields)}.")
    return template.format(**fields)


def class_captions(dataset_cfg, templates: Sequence[str], folder_classes: Sequence[str] = ()) -> list[list[str]]:
    """[class][template] -> caption."""
    if not templates:
        raise UserError(f"conditioning=text on {dataset_cfg.name} needs captions: set dataset.captions.templates, e.g. "
                        "'[\"a photo of a {name}\"]', or use a folder with a metadata.jsonl.")
    return [[fill(t, fields) for t in templates] for fields in class_fields(dataset_cfg, folder_classes)]


@dataclass
class CaptionTable:
    """The token ids of every caption an example may be drawn with: ids[key, k] for the example's
    key (its class for templates, its caption for a folder's metadata) and the k-th of its options."""

    ids: Tensor  # (keys, options, L)
    keys: Tensor  # (N,) int64, per example

    @classmethod
    def build(cls, options: Sequence[Sequence[str]], keys: Tensor, tokenize: Callable[[Sequence[str]], Tensor]) -> CaptionTable:
        width = len(options[0])
        ids = tokenize([c for row in options for c in row])
        return cls(ids.view(len(options), width, -1), keys)

    def draw(self, keys: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """One caption's ids per key, its option drawn uniformly: (B, L)."""
        pick = torch.randint(self.ids.shape[1], (len(keys),), generator=generator).to(self.ids.device)
        return self.ids[keys.to(self.ids.device), pick]

    def to(self, device: torch.device) -> CaptionTable:
        return CaptionTable(self.ids.to(device), self.keys.to(device))
