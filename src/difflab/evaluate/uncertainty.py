"""Standard errors of the sample-quality metrics, so a difference between two runs can be told
from the noise of drawing a few thousand samples.

The reference images are one fixed, seeded pick shared by every run of a data set, so what
separates two runs is their samples: the errors here are over the samples (the generated images,
or the held-out real images for the real_* numbers), the reference held fixed.

- FD and KID: bootstrap, every replicate a multinomial reweighting of the samples. FD's
  replicates are computed in closed form from weighted means and covariances; KID's from the
  kernel matrix by quadratic forms, leaving out the pairs of an image with its own copies, as the
  unbiased estimator leaves out the diagonal.
- Shares (class accuracy, precision, recall, memorisation): the binomial error sqrt(p (1 - p) / n)
  of a share of n independent yes/no outcomes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

REPLICATES = 50  # bootstrap replicates: the error of an error of 50 replicates is about 10%
SEED = 0


def bootstrap_weights(n: int, replicates: int, seed: int = SEED) -> Tensor:
    """n x replicates multinomial counts, each column summing to n (float64)."""
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(n, (replicates, n), generator=g)
    counts = torch.zeros(replicates, n, dtype=torch.float64)
    counts.scatter_add_(1, picks, torch.ones_like(picks, dtype=torch.float64))
    return counts.T.contiguous()


def _sqrt_psd(matrix: Tensor) -> Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    """|mu1 - mu2|^2 + tr(cov1 + cov2 - 2 (cov1^1/2 cov2 cov1^1/2)^1/2), in float64."""
    root = _sqrt_psd(cov1.double())
    middle = torch.linalg.eigvalsh(root @ cov2.double() @ root).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).double().square().sum() + cov1.double().trace() + cov2.double().trace() - 2 * middle)


def fd_standard_error(samples: Tensor, reference: Tensor, replicates: int = REPLICATES, seed: int = SEED) -> float:
    """Bootstrap standard error of the Frechet distance of `samples` (n x d features) to the fixed
    `reference` (m x d)."""
    x, ref = samples.double(), reference.double()
    n = len(x)
    if replicates < 2 or n < 2:
        return float("nan")
    ref_mu = ref.mean(0)
    # cov^1/2 = V S V^T from the thin SVD of the centred rows: no d x d eigendecomposition when
    # there are fewer reference images than dimensions (Inception's 2048)
    _, singular, vh = torch.linalg.svd((ref - ref_mu) / (len(ref) - 1) ** 0.5, full_matrices=False)
    root, ref_trace = (vh.T * singular) @ vh, singular.square().sum()
    weights = bootstrap_weights(n, replicates, seed)
    values = []
    for w in weights.T:
        mu = (w @ x) / n
        # cov = Y^T Y / (n - 1) with Y the weighted, centred rows; root cov root = Z^T Z / (n - 1)
        # with Z = Y root, whose non-zero eigenvalues are those of the smaller of Z^T Z and Z Z^T
        y = (x - mu) * w.sqrt()[:, None]
        z = y @ root
        gram = z @ z.T if n < z.shape[1] else z.T @ z
        middle = torch.linalg.eigvalsh(gram / (n - 1)).clamp_min(0).sqrt().sum()
        trace = y.square().sum() / (n - 1)
        values.append(float((mu - ref_mu).square().sum() + trace + ref_trace - 2 * middle))
    return float(torch.tensor(values).std())


def _kernel(a: Tensor, b: Tensor) -> Tensor:
    """KID's polynomial kernel (a.b / d + 1)^3, as torch-fidelity computes it."""
    return (a @ b.T / a.shape[1] + 1) ** 3


def kid_standard_error(samples: Tensor, reference: Tensor, replicates: int = REPLICATES, seed: int = SEED,
                       block: int = 2048) -> float:
    """Bootstrap standard error of the unbiased MMD^2 with KID's kernel between `samples` and the
    fixed `reference`. Only the terms with samples vary: E k(x, x') (copies of one image left out)
    and E k(x, y); the kernel is built in row blocks, so memory stays O(block x n)."""
    x, ref = samples.double(), reference.double()
    n = len(x)
    if replicates < 2 or n < 2:
        return float("nan")
    weights = bootstrap_weights(n, replicates, seed)
    kw = torch.empty_like(weights)  # K_xx @ weights
    diagonal = torch.empty(n, dtype=torch.float64)
    cross = torch.empty(n, dtype=torch.float64)  # mean over the reference of k(x_i, y)
    for start in range(0, n, block):
        rows = x[start:start + block]
        k = _kernel(rows, x)
        kw[start:start + block] = k @ weights
        diagonal[start:start + block] = k.diagonal(start)
        cross[start:start + block] = _kernel(rows, ref).mean(1)
    # sum over pairs of distinct images: w^T K w - sum_i w_i^2 K_ii, over n^2 - sum_i w_i^2 pairs
    pairs = (weights * kw).sum(0) - (weights.square() * diagonal[:, None]).sum(0)
    within = pairs / (n * n - weights.square().sum(0))
    between = (weights * cross[:, None]).sum(0) / n
    return float((within - 2 * between).std())


def mean_standard_error(values: Tensor) -> float | None:
    """Standard error of the mean of `values` (None for fewer than 2)."""
    return float(values.double().std() / math.sqrt(len(values))) if len(values) > 1 else None


def share_standard_error(share: float, n: int) -> float:
    """Binomial standard error of a share of n outcomes."""
    return math.sqrt(max(share * (1 - share), 0.0) / n) if n > 0 else float("nan")
