"""Which classes a model's samples fall into, against the real data's: the total variation
distance between the two class histograms as the evaluation classifier reads them (the reference
read by the same classifier, so its mistakes fall on both sides). It sees imbalance and dropped
classes directly: a 60/40 split of MNIST's two halves of the classes is 0.1 away from the
balanced one, about 4x this distance's floor at 2000 samples, where FD cannot tell the two apart
(benchmarks/results/metric_sensitivity_mnist.json). The counting behind mode-coverage scores on
stacked MNIST (Metz et al. 2017; Srivastava et al. 2017), as one number with its bootstrap error."""

from __future__ import annotations

import torch
from torch import Tensor

from difflab.evaluate.uncertainty import REPLICATES, bootstrap_weights


def class_shares(classes: Tensor, num_classes: int, weights: Tensor | None = None) -> Tensor:
    """The share of each class among `classes` (n ids), or per bootstrap replicate (weights n x R: R x K)."""
    one_hot = torch.nn.functional.one_hot(classes.long(), num_classes).double()
    if weights is None:
        return one_hot.mean(0)
    return (weights.T @ one_hot) / weights.sum(0)[:, None]


def class_share_distance(classes: Tensor, reference: Tensor, num_classes: int,
                         replicates: int = REPLICATES) -> tuple[float, float | None]:
    """Total variation between the class shares of `classes` and of `reference` (each a tensor of class ids),
    and its bootstrap standard error over `classes` (None when replicates is 0)."""
    target = class_shares(reference, num_classes)
    distance = float(0.5 * (class_shares(classes, num_classes) - target).abs().sum())
    if replicates <= 0:
        return distance, None
    drawn = class_shares(classes, num_classes, bootstrap_weights(len(classes), replicates))
    return distance, float((0.5 * (drawn - target).abs().sum(1)).std())
