"""The one in-memory form every data set takes: the runner keeps the whole set as uint8 and
indexes batches out of it, so nothing here is lazy."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class ImageData:
    images: Tensor  # uint8, N x C x H x W
    labels: Tensor  # int64, N (zeros when the data set has no classes)
    num_classes: int  # 0 when unlabelled

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, index: Tensor) -> ImageData:
        return ImageData(self.images[index].contiguous(), self.labels[index].contiguous(), self.num_classes)

