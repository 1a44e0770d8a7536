"""Image-text retrieval recall@k with duplicate captions counted as matches.

Synthetic and web data repeat captions ("a red circle" describes many images), so the usual rule "only the
paired item is correct" would punish a model for ranking an equally correct item first. Here image i and text j
match when their captions are the same after lower-casing and collapsing whitespace: M[i, j] = caption_i == caption_j.
Image -> text: image i is a hit at k when any of its k nearest texts matches it. Text -> image: text j is a hit at k
when any of its k nearest images has a caption identical to caption j. With all captions distinct this is the
standard recall@k of paired data.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def normalize_caption(caption: str) -> str:
    """The form captions are compared in: lower case, whitespace runs collapsed to one space, ends stripped."""
    return " ".join(caption.split()).lower()


def caption_ids(captions: Sequence[str]) -> torch.Tensor:
    """An id per caption (N,), equal for captions that compare equal under `normalize_caption`."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(normalize_caption(c), len(ids)) for c in captions], dtype=torch.long)


@torch.no_grad()
def retrieval_hits(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    captions: Sequence[str],
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, torch.Tensor]:
    """Per query, whether it is a hit at k, both ways, for N paired images and texts compared by cosine: the
    figures of `retrieval_recall` before they are averaged, so that a caller can average them over a subset.

    Args:
        image_features: (N, D); normalised here, so raw projections work too.
        text_features: (N, D); text j is the caption of image j.
        captions: the N captions, to decide which pairs match (see the module docstring).
        ks: the k values; k larger than N counts as N (every item is retrieved).
        chunk_size: queries scored at a time, so memory stays at chunk_size x N similarities (10k x 10k is fine).

    Returns:
        `{"image_to_text_R@k": (N,) bool, ..., "text_to_image_R@k": (N,) bool, ...}`, on the CPU.
    """
    n = image_features.shape[0]
    if image_features.ndim != 2 or text_features.ndim != 2:
        raise ValueError(
            f"features must be 2-D (N, D), got image {tuple(image_features.shape)} "
            f"and text {tuple(text_features.shape)}"
        )
    if text_features.shape != image_features.shape:
        raise ValueError(
            f"image and text features must have the same shape (N, D), got {tuple(image_features.shape)} "
            f"and {tuple(text_features.shape)}"
        )
    if len(captions) != n:
        raise ValueError(f"got {len(captions)} captions for {n} image-text pairs")
    if n == 0:
        raise ValueError("retrieval needs at least one image-text pair")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"`ks` must be positive integers, got {ks}")
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be >= 1, got {chunk_size}")

    images = F.normalize(image_features.float(), dim=-1)
    texts = F.normalize(text_features.float(), dim=-1).to(images.device)
    ids = caption_ids(captions).to(images.device)
    metrics = {}
    for direction, queries, keys in (("image_to_text", images, texts), ("text_to_image", texts, images)):
        hits = _hits_at_k(queries, keys, ids, ks, chunk_size)
        metrics.update({f"{direction}_R@{k}": hits[k] for k in ks})
    return metrics


def retrieval_recall(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    captions: Sequence[str],
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Recall@k both ways for N paired images and texts, whose features are compared by cosine (the arguments and
    errors of `retrieval_hits`): `{"image_to_text_R@k": float, ..., "text_to_image_R@k": float, ...}` in [0, 1]."""
    hits = retrieval_hits(image_features, text_features, captions, ks, chunk_size)
    return {key: recall(hit) for key, hit in hits.items()}


def recall(hits: torch.Tensor) -> float:
    """The share of queries that are hits: one entry of `retrieval_hits`, or a subset of it."""
    return int(hits.sum()) / len(hits)


def _hits_at_k(
    queries: torch.Tensor, keys: torch.Tensor, ids: torch.Tensor, ks: list[int], chunk_size: int
) -> dict[int, torch.Tensor]:
    """Per query (N,) on the CPU, whether a key of its own caption id is among its k most similar keys, per k."""
    n = queries.shape[0]
    k_max = min(max(ks), n)
    hits = {k: [] for k in ks}
    for start in range(0, n, chunk_size):
        similarity = queries[start : start + chunk_size] @ keys.T  # (b, N)
        top = similarity.topk(k_max, dim=-1).indices  # (b, k_max), most similar first
        match = ids[top] == ids[start : start + chunk_size, None]  # (b, k_max)
        for k in ks:
            hits[k].append(match[:, : min(k, k_max)].any(dim=-1).cpu())
    return {k: torch.cat(chunks) for k, chunks in hits.items()}
