"""How different a model's images are from each other, and from the image they vary.

Accuracy alone rewards a model that draws every seed of a prompt as the same image (strong guidance does that), and
scores a copy of the source as the best possible variation. Two distances, in pixels and in CLIP image space:

- pixel distance: the root-mean-square difference of two images with values in [0, 1] (resized to one side);
- CLIP distance: 1 - cosine of their L2-normalised CLIP image embeddings.

`diversity` is the mean pairwise distance within each group (a prompt's images), averaged over groups; evaluations
report it beside the same figure for real images of each class (`ground_truth_renders`), so a ratio well below 1
says the model collapses a prompt's seeds. `distance_to_sources` is the mean distance of each variation to its
source, reported beside the sources of unrelated classes (what "unrelated" scores) and a copy (0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _as_float(images: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float (N, 3, S, S) in [0, 1], resized with antialiasing when `size` differs."""
    x = images.float() / 255.0
    if size is not None and x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


def pixel_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise RMS pixel distance (N,) of uint8 images a, b (N, 3, H, W) (b resized to a's side if needed)."""
    x, y = _as_float(a), _as_float(b, a.shape[-1])
    return (x - y).pow(2).mean(dim=(1, 2, 3)).sqrt()


def _pairwise_mean(distance: torch.Tensor) -> float | None:
    """Mean of the off-diagonal entries of a square distance matrix; None for fewer than two items."""
    n = distance.shape[0]
    if n < 2:
        return None
    return float((distance.sum() - distance.diagonal().sum()) / (n * (n - 1)))


def diversity(
    images: torch.Tensor, groups: Sequence[Sequence[int]], features: torch.Tensor | None = None
) -> dict[str, float | None]:
    """{"pixels", "clip"}: mean pairwise distance within each group of rows, averaged over the groups.

    images: uint8 (N, 3, H, W); groups: the row indices of each prompt's images; features: L2-normalised CLIP
    image embeddings (N, D) of the same rows, or None (then "clip" is None).
    """
    x = _as_float(images).flatten(1)  # (N, 3HW)
    pixels, clip = [], []
    for rows in groups:
        rows = list(rows)
        part = x[rows]
        squared = (part[:, None, :] - part[None, :, :]).pow(2).mean(dim=-1)  # (n, n) mean squared difference
        value = _pairwise_mean(squared.sqrt())
        if value is not None:
            pixels.append(value)
        if features is not None:
            value = _pairwise_mean(1 - features[rows] @ features[rows].T)
            if value is not None:
                clip.append(value)
    return {
        "pixels": sum(pixels) / len(pixels) if pixels else None,
        "clip": sum(clip) / len(clip) if clip else None,
    }


def _unrelated_sources(source_classes: Sequence[str]) -> list[list[int]]:
    """For each source, the sources whose "colour shape" class shares neither the colour nor the shape (else any
    other class): images unrelated to it."""
    words = [name.split() for name in source_classes]
    unrelated = []
    for a in words:
        rows = [j for j, b in enumerate(words) if all(x != y for x, y in zip(a, b))]
        unrelated.append(rows or [j for j, b in enumerate(words) if b != a])
    return unrelated


def distance_to_sources(
    variations: torch.Tensor,
    sources: torch.Tensor,
    source_index: Sequence[int],
    source_classes: Sequence[str],
    variation_features: torch.Tensor | None = None,
    source_features: torch.Tensor | None = None,
) -> dict[str, dict[str, float | None]]:
    """Mean distance of each variation to its source, to the sources of unrelated classes (neither the colour nor
    the shape of its source's: what "unrelated" scores), and of a copy (0):
    {"to_source": {"pixels", "clip"}, "to_unrelated_sources": {...}, "copy": {...}}.

    variations: uint8 (N, 3, H, W); sources: uint8 (S, 3, h, w); source_index[i]: the source of variation i;
    source_classes: the class of each source; features: L2-normalised CLIP image embeddings of the variations
    (N, D) and the sources (S, D), or None ("clip" is then None).
    """
    index = torch.tensor(list(source_index), dtype=torch.long)
    with_clip = variation_features is not None and source_features is not None
    x = _as_float(variations).flatten(1)  # (N, 3HW)
    y = _as_float(sources, variations.shape[-1]).flatten(1)  # (S, 3HW)
    pixels = torch.cdist(x.double(), y.double()) / math.sqrt(x.shape[1])  # (N, S) RMS pixel distances
    clip = (1 - variation_features.double() @ source_features.double().T) if with_clip else None  # (N, S)
    unrelated = _unrelated_sources(source_classes)
    rows = torch.arange(len(index))

    def unrelated_mean(matrix: torch.Tensor) -> float | None:
        means = [matrix[i, unrelated[s]].mean() for i, s in enumerate(index.tolist()) if unrelated[s]]
        return float(torch.stack(means).mean()) if means else None

    return {
        "to_source": {
            "pixels": float(pixel_distances(variations, sources[index]).mean()),  # exact: a copy scores 0
            "clip": float(clip[rows, index].mean()) if with_clip else None,
        },
        "to_unrelated_sources": {
            "pixels": unrelated_mean(pixels),
            "clip": unrelated_mean(clip) if with_clip else None,
        },
        "copy": {"pixels": 0.0, "clip": 0.0 if with_clip else None},
    }
