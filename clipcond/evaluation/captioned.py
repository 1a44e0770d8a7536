"""What `clipcond eval generation` measures on data other than the built-in shapes: the data's own captions as
prompts, its own images as the reference, the run's CLIP as the only judge.

- `clip_score`: CLIPScore (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image
  Captioning"), w * max(cos(image, text), 0) with the weight w = 100 of torchmetrics' `CLIPScore` (the paper uses
  2.5), in the run's CLIP space; the real images of the same captions give the level of the data itself;
- the Fréchet distance in the run's CLIP image space (`clipcond.evaluation.frechet`) between the generated images
  and the real images of the captions that prompted them, and, for scale, between as many real images of another
  split and the same reference (the distance a generator that drew real images would get at this sample size: FD is
  biased upwards for small samples);
- a grid: each caption's real image beside what the model drew for it (`caption_grid`).

Inception's FD (FID) is left out: it needs Inception-v3 weights, which are not shipped here.
The judged colour and shape figures stay for the shapes data (`clipcond.evaluation.generation`).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import torch
from PIL import Image

from clipcond.plots import image_grid

logger = logging.getLogger(__name__)

CLIP_SCORE_WEIGHT = 100.0  # torchmetrics' CLIPScore; Hessel et al. 2021 weight the cosine by 2.5
DEFAULT_MAX_PROMPTS = 64
GRID_ROWS = 16  # captions shown in a grid; every image is written as a file


def clip_score(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """CLIPScore of each (image, text) pair, (N,): `CLIP_SCORE_WEIGHT * max(cos, 0)` of L2-normalised features
    (N, D) and (N, D), row i with row i."""
    if image_features.shape != text_features.shape or image_features.ndim != 2:
        raise ValueError(
            f"image and text features must be paired (N, D) each, got {tuple(image_features.shape)} and "
            f"{tuple(text_features.shape)}"
        )
    cosine = (image_features.double() * text_features.double()).sum(dim=-1)
    return CLIP_SCORE_WEIGHT * cosine.clamp(min=0.0)


@dataclass
class CaptionSet:
    """Distinct captions of a split and the real image of each: the prompts and the reference of an evaluation."""

    prompts: list[str]
    images: torch.Tensor  # uint8 (P, 3, R, R), image p is the one captioned prompts[p]
    split: str
    unreadable: list[str]  # files of the sampled rows that could not be read (left out)


def load_caption_set(
    data: str,
    split: str,
    resolution: int,
    *,
    max_prompts: int = DEFAULT_MAX_PROMPTS,
    seed: int = 0,
    allow_outside_paths: bool = False,
    what: str = "`--data`",
) -> CaptionSet:
    """Up to `max_prompts` rows of `split` with distinct captions, drawn in a seeded order (data sets are often
    sorted by class), each with its image at `resolution`. Unreadable images are left out and listed."""
    from clipcond.data.folders import ImageCaptionDataset

    if max_prompts < 2:
        raise ValueError(f"`max_prompts` must be >= 2 (the Fréchet distance needs two images), got {max_prompts}")
    try:
        dataset = ImageCaptionDataset(
            data, split=split, resolution=resolution, allow_outside_paths=allow_outside_paths
        )
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{what} {data!r} has no readable split {split!r} ({err}); pass `--split`") from None
    order = list(range(len(dataset)))
    random.Random(f"clipcond-eval-generation/captions/{seed}").shuffle(order)
    prompts, images, unreadable, seen = [], [], [], set()
    for i in order:
        caption = dataset.captions[i].strip()
        if caption in seen:
            continue
        item = dataset[i]
        if item["index"] != i:  # the data set's stand-in for an unreadable file
            unreadable.append(str(dataset.image_paths[i]))
            continue
        seen.add(caption)
        prompts.append(caption)
        images.append(item["pixel_values"])
        if len(prompts) == max_prompts:
            break
    if unreadable:
        logger.warning("%d unreadable image(s) in split %r left out, e.g. %s", len(unreadable), split, unreadable[0])
    if len(prompts) < 2:
        raise ValueError(
            f"split {split!r} of {data} has {len(prompts)} readable image(s) with distinct captions; the Fréchet "
            "distance needs >= 2"
        )
    return CaptionSet(prompts, torch.stack(images), split, unreadable)


def load_split_sample(
    data: str, split: str, resolution: int, count: int, *, seed: int = 0, allow_outside_paths: bool = False
) -> torch.Tensor | None:
    """`count` readable images of `split` in a seeded order, uint8 (count, 3, R, R); None when the split does not
    exist or holds fewer (the Fréchet floor is then not measured)."""
    from clipcond.data.folders import ImageCaptionDataset

    try:
        dataset = ImageCaptionDataset(
            data, split=split, resolution=resolution, allow_outside_paths=allow_outside_paths
        )
    except (FileNotFoundError, ValueError):
        return None
    order = list(range(len(dataset)))
    random.Random(f"clipcond-eval-generation/floor/{seed}").shuffle(order)
    images = []
    for i in order:
        item = dataset[i]
        if item["index"] == i:
            images.append(item["pixel_values"])
            if len(images) == count:
                return torch.stack(images)
    return None


def caption_grid(
    prompts: list[str], real: torch.Tensor, generated: torch.Tensor, scores: torch.Tensor, rows: int = GRID_ROWS
) -> Image.Image:
    """A row per caption (the first `rows`): its real image, then the images drawn for it, each labelled with its
    CLIP score. `generated` (P * k, 3, H, W) holds prompt p's images at p * k ... p * k + k - 1."""
    per_prompt = generated.shape[0] // len(prompts)
    shown = min(rows, len(prompts))
    tiles, labels = [], []
    for p in range(shown):
        tiles.append(_pil(real[p]))
        labels.append(f"real: {prompts[p]}")
        for k in range(per_prompt):
            i = p * per_prompt + k
            tiles.append(_pil(generated[i]))
            labels.append(f"drawn, CLIP score {scores[i].item():.1f}")
    return image_grid(tiles, rows=shown, cols=1 + per_prompt, labels=labels, max_label_lines=3)


def _pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).numpy(), "RGB")
