"""Does the model return its training images? Each checked sample's nearest training image in
the evaluation feature space, its distance set against the distances at which unseen real images
(the held-out split) find their nearest training image.

A sample at most as far from the training set as the closest `QUANTILE` of the held-out images
are is "close"; a model that generalises makes close samples at about the held-out images' rate
or below (its samples are no nearer the training images than new real ones), a model that copies
makes them far more often. The check is flagged when the samples' share of close ones exceeds the
held-out images' by more than `Z` times their combined binomial standard error. (Data sets with exact duplicates
across their splits put many held-out images at distance 0: the rate is then above QUANTILE.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from difflab.evaluate.uncertainty import share_standard_error

QUANTILE = 0.05
Z = 3.0


def spread(total: int, count: int) -> Tensor:
    """`count` <= `total` distinct indices evenly across 0..total-1: a balanced draw comes in class order (as a
    folder's images do), so its first `count` would hold its first classes only."""
    return torch.linspace(0, total - 1, count).round().long()


@dataclass
class NearestTraining:
    distance: Tensor  # per sample, to its nearest training image
    index: Tensor  # which training image


def nearest_training(features: Tensor, train_features: Tensor, block: int = 1024) -> NearestTraining:
    """Euclidean nearest neighbour of each row of `features` among `train_features`, in row blocks."""
    train = train_features.float()
    distances, indices = [], []
    for start in range(0, len(features), block):
        d = torch.cdist(features[start:start + block].float(), train)
        best = d.min(1)
        distances.append(best.values)
        indices.append(best.indices)
    return NearestTraining(torch.cat(distances), torch.cat(indices))


@dataclass
class Memorisation:
    samples: NearestTraining
    threshold: float  # the QUANTILE of the held-out images' nearest-training distances
    share_close: float  # of the samples at most `threshold` from a training image
    expected: float  # the held-out images' share at most `threshold` from one
    held_out: int  # how many held-out images `expected` is a share of
    distance_ratio: float  # median sample distance / median held-out distance

    @property
    def share_close_se(self) -> float:
        return share_standard_error(self.share_close, len(self.samples.distance))

    @property
    def flagged(self) -> bool:
        """Both shares are estimates, so their difference is weighed against their combined error."""
        combined = math.hypot(share_standard_error(self.expected, len(self.samples.distance)),
                              share_standard_error(self.expected, self.held_out))
        return self.share_close - self.expected > Z * combined

    def metrics(self) -> dict:
        return {"memorisation_share_close": self.share_close, "memorisation_share_close_se": self.share_close_se,
                "memorisation_expected_share": self.expected, "memorisation_distance_ratio": self.distance_ratio,
                "memorisation_flagged": self.flagged}

    def closest(self, count: int) -> list[tuple[int, int]]:
        """(sample, training image) index pairs of the `count` closest samples, closest first."""
        order = self.samples.distance.argsort(stable=True)[:count]
        return [(int(i), int(self.samples.index[i])) for i in order]


def memorisation(sample_features: Tensor, held_out_features: Tensor, train_features: Tensor) -> Memorisation:
    samples = nearest_training(sample_features, train_features)
    held_out = nearest_training(held_out_features, train_features).distance
    threshold = float(torch.quantile(held_out, QUANTILE))
    return Memorisation(samples, threshold, float((samples.distance <= threshold).float().mean()),
                        float((held_out <= threshold).float().mean()), len(held_out),
                        float(samples.distance.median() / held_out.median().clamp_min(1e-12)))
