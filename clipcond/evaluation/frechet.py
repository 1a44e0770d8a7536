"""The Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017, FID's formula), without
scipy, and `FrechetSpaces`, the feature spaces an evaluation measures it in: `clipcond eval generation` measures it
on the run's CLIP image features (`fd_clip`) and, given Inception weights, on Inception-v3 pool3 features
(`fd_inception`, FID proper; `clipcond.evaluation.inception`)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

# A feature extractor: uint8 images (N, 3, H, W) -> features (N, D).
FeatureFn = Callable[[torch.Tensor], torch.Tensor]


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
    (means and unbiased covariances, as pytorch-fid does).

    With fewer images than dimensions (N1 + N2 <= D: a few hundred images in Inception's 2048 dimensions) it is
    computed from the centred samples X1, X2 instead of the D x D covariances, exactly and far faster: the non-zero
    eigenvalues of S1 S2 = X1^T X1 X2^T X2 / ((N1 - 1)(N2 - 1)) are those of M M^T for M = X1 X2^T, so
    Tr((S1 S2)^(1/2)) is M's nuclear norm over sqrt((N1 - 1)(N2 - 1)), and Tr(Si) = ||Xi||_F^2 / (Ni - 1).
    """
    samples = []
    for name, features in (("features1", features1), ("features2", features2)):
        if isinstance(features, torch.Tensor):
            features = features.detach().cpu().double().numpy()
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[0] < 2:
            raise ValueError(f"`{name}` must be (N, D) with N >= 2 to fit a covariance, got shape {features.shape}")
        samples.append(features)
    (n1, d1), (n2, d2) = samples[0].shape, samples[1].shape
    if d1 != d2:
        raise ValueError(f"the two feature sets have widths {d1} and {d2}")
    mu1, mu2 = samples[0].mean(axis=0), samples[1].mean(axis=0)
    if n1 + n2 > d1:
        cov1, cov2 = np.cov(samples[0], rowvar=False), np.cov(samples[1], rowvar=False)
        return frechet_distance_from_stats(mu1, cov1, mu2, cov2)
    x1, x2 = samples[0] - mu1, samples[1] - mu2  # (N1, D), (N2, D)
    trace_sqrt = np.linalg.svd(x1 @ x2.T, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
    traces = np.sum(x1**2) / (n1 - 1) + np.sum(x2**2) / (n2 - 1)
    distance = np.sum((mu1 - mu2) ** 2) + traces - 2.0 * trace_sqrt
    return float(max(distance, 0.0))  # round-off can leave -1e-12 for identical samples


class FrechetSpaces:
    """The reference of an evaluation's Fréchet distances in each of its feature spaces: `extractors` maps a space's
    name ("clip", "inception") to its `FeatureFn`, and the reference images' features are taken once in each.

    `distances(images)` gives {"fd_<name>": FD of `images` to the reference} for every space; features that the
    caller has already computed (the CLIP features that CLIP score uses too) are passed by space name, so no image
    goes through an extractor twice.
    """

    def __init__(
        self,
        extractors: dict[str, FeatureFn],
        reference_images: torch.Tensor,
        *,
        features: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.extractors = dict(extractors)
        self.reference = {
            name: _features(name, extract, reference_images, features) for name, extract in self.extractors.items()
        }

    @property
    def keys(self) -> list[str]:
        """The figures' names, "fd_<space>", in the order of `extractors`."""
        return [f"fd_{name}" for name in self.extractors]

    def distances(
        self, images: torch.Tensor, *, features: dict[str, torch.Tensor] | None = None, suffix: str = ""
    ) -> dict[str, float | None]:
        """{"fd_<space><suffix>": ...} of `images` to the reference in every space; None when there are fewer
        than 2 images (no covariance)."""
        distances = {}
        for name, extract in self.extractors.items():
            if images.shape[0] < 2:
                distances[f"fd_{name}{suffix}"] = None
                continue
            distances[f"fd_{name}{suffix}"] = frechet_distance(
                _features(name, extract, images, features), self.reference[name]
            )
        return distances


def _features(name: str, extract: FeatureFn, images: torch.Tensor, given: dict[str, torch.Tensor] | None):
    if given is not None and name in given:
        return given[name]
    return extract(images)


def with_inception_keys(keys: tuple[str, ...], inception: bool) -> tuple[str, ...]:
    """An evaluation's figure names with Inception's after CLIP's ("fd_inception" after "fd_clip",
    "fd_inception_floor" after "fd_clip_floor") when Inception features are measured; `keys` unchanged when not."""
    if not inception:
        return keys
    named = []
    for key in keys:
        named.append(key)
        if key in ("fd_clip", "fd_clip_floor"):
            named.append(key.replace("clip", "inception"))
    return tuple(named)
