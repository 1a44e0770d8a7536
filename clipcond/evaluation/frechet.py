"""The Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017, FID's formula), without
scipy: `clipcond eval generation` measures it on CLIP image features (`fd_clip`)."""

from __future__ import annotations

import numpy as np
import torch


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) for Gaussians N(mu1, S1), N(mu2, S2) (Dowson & Landau 1982).

    Tr((S1 S2)^(1/2)) is computed as Tr((S1^(1/2) S2 S1^(1/2))^(1/2)): the same eigenvalues, but of a symmetric
    positive semi-definite matrix, so two `eigh` calls in float64 give it without scipy's `sqrtm` and without the
    complex round-off that the eigenvalues of the non-symmetric S1 S2 would have.
    """
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"mismatched statistics: means {mu1.shape} and {mu2.shape}, covariances {sigma1.shape} and {sigma2.shape}"
        )
    values, vectors = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    sqrt_sigma1 = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
    middle = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    distance = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt
    return float(max(distance, 0.0))  # round-off can leave -1e-12 for identical statistics


def frechet_distance(features1, features2) -> float:
    """Fréchet distance between the Gaussians fitted to two sets of features (N1, D) and (N2, D), N >= 2 each
    (means and unbiased covariances, as pytorch-fid does)."""
    stats = []
    for name, features in (("features1", features1), ("features2", features2)):
        if isinstance(features, torch.Tensor):
            features = features.detach().cpu().double().numpy()
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[0] < 2:
            raise ValueError(f"`{name}` must be (N, D) with N >= 2 to fit a covariance, got shape {features.shape}")
        stats.append((features.mean(axis=0), np.cov(features, rowvar=False)))
    if stats[0][0].shape != stats[1][0].shape:
        raise ValueError(f"the two feature sets have widths {stats[0][0].size} and {stats[1][0].size}")
    return frechet_distance_from_stats(*stats[0], *stats[1])
