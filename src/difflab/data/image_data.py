"""The one in-memory form every data set takes: the runner keeps the whole set as uint8 and
indexes batches out of it, so nothing here is lazy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor


@dataclass
class ImageData:
    images: Tensor  # uint8, N x C x H x W
    labels: Tensor  # int64, N (zeros when the data set has no classes)
    num_classes: int  # 0 when unlabelled
    captions: Optional[list[str]] = None  # per image, a folder's metadata captions ("" where it has none)

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, index: Tensor) -> ImageData:
        captions = None if self.captions is None else [self.captions[i] for i in index.tolist()]
        return ImageData(self.images[index].contiguous(), self.labels[index].contiguous(), self.num_classes, captions)

