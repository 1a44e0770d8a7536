"""Counterfactual image-caption pairs for CLIP pretraining: for an image of the shapes data, its twin with one
attribute changed in the pixels and in the caption alike, added to the batch as a pair of its own.

NegCLIP's hard negatives (`clipcond.data.hard_negatives`) give each image a wrong caption to score below its own,
but no image to go with it: the text tower learns that "a blue circle left of a red square" is not "a red circle
left of a blue square", while nothing asks the image tower to tell the two scenes apart. TripletCLIP (Patel et al.,
"TripletCLIP: Improving Compositional Reasoning of CLIP via Synthetic Vision-Language Negatives", NeurIPS 2024)
adds the negative caption's own image, so that each of the two pairs is a hard negative of the other in both
directions of the loss. Here the twin is exact rather than generated: the shapes renderer draws flat colours on a
flat background (`clipcond.data.shapes.render_scene`), so exchanging the two objects' colours in the pixels draws
the scene the swapped caption describes.

Kinds (`KINDS`, the values of `clipcond train clip --counterfactual-pairs`):

- ``swap-colours``: a two-object scene of two colours with the colours exchanged, in the image (`swap_colours`)
  and in the caption (`hard_negatives.swap_attributes`), "a red circle left of a blue square" -> "a blue circle
  left of a red square". A twin that would show a held-out composition (`dataset_info.json`'s "held_out") is not
  made: held-out pairs never appear in training.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from clipcond.data.hard_negatives import SHARE_SAMPLE, is_scene, parse_kinds, swap_attributes
from clipcond.data.shapes import is_shapes_data

KINDS = ("swap-colours",)
# A pixel farther than this (RGB distance, 0-255 scale) from every blend of the background with one of the two
# colours is unexplained; a twin is made only where at most UNEXPLAINED_SHARE of the pixels are (resampling from
# another resolution leaves a few such pixels at the edges, a photo or another palette many).
TOLERANCE = 24.0
UNEXPLAINED_SHARE = 0.02
LOW_SHARE = 0.05  # below this share of captions with a twin, training warns that twins are few


def parse_pair_kinds(text: str | None) -> tuple[str, ...]:
    """The kinds of `--counterfactual-pairs` ("swap-colours"); "" or "none" (or None) for none."""
    return parse_kinds(text, "--counterfactual-pairs", KINDS)


def swap_colours(
    pixels: torch.Tensor, colour_a: Sequence[int], colour_b: Sequence[int], background: Sequence[int]
) -> torch.Tensor | None:
    """A (3, H, W) uint8 image of flat colours on a flat `background`, with `colour_a` and `colour_b` exchanged.

    Each pixel is read as ``background + alpha * (colour - background)`` for the one of the two colours that
    explains it best (the renderer's anti-aliased edges are such blends, alpha in [0, 1]) and redrawn with the
    other colour at the same alpha; background pixels stay as they are. Returns None when the image is no drawing
    in these colours (more than `UNEXPLAINED_SHARE` of its pixels unexplained, see `TOLERANCE`)."""
    p = pixels.float()
    bg = torch.tensor(background, dtype=torch.float32, device=p.device).view(3, 1, 1)
    directions = [
        torch.tensor(c, dtype=torch.float32, device=p.device).view(3, 1, 1) - bg for c in (colour_a, colour_b)
    ]
    offset = p - bg  # (3, H, W)
    alphas, residuals = [], []
    for direction in directions:
        alpha = ((offset * direction).sum(0) / (direction * direction).sum()).clamp(0, 1)  # (H, W)
        alphas.append(alpha)
        residuals.append((offset - alpha * direction).norm(dim=0))
    is_a = residuals[0] <= residuals[1]  # (H, W)
    if (torch.minimum(*residuals) > TOLERANCE).float().mean() > UNEXPLAINED_SHARE:
        return None
    alpha = torch.where(is_a, *alphas)
    swapped = bg + alpha * torch.where(is_a.unsqueeze(0), directions[1], directions[0])
    background_pixel = offset.norm(dim=0, keepdim=True) <= 1.0
    return torch.where(background_pixel, p, swapped).round().clamp(0, 255).to(torch.uint8)


class CounterfactualPairs:
    """Makes the twins of a batch's images (`twins`) from the shapes data's metadata rows and palette.

    `records`: the data set's metadata rows (`ImageCaptionDataset.records`), read at each sample's "index";
    `info`: its dataset_info.json (`ImageCaptionDataset.info`), which must be the shapes data's."""

    def __init__(self, kinds: Sequence[str], records: Sequence[dict] | None, info: dict | None):
        if not kinds or any(kind not in KINDS for kind in kinds):
            raise ValueError(f"kinds={list(kinds)!r} must be one or more of {', '.join(KINDS)}")
        if records is None or not is_shapes_data(info):
            raise ValueError(
                f"`--counterfactual-pairs` {','.join(kinds)} draws twins of the shapes data's images from their "
                "metadata rows and its palette (dataset_info.json); this data set is no folder of the shapes data "
                "(`clipcond data shapes`)"
            )
        self.kinds = tuple(kinds)
        self.records = records
        self.colours = {name: tuple(rgb) for name, rgb in info["colours"].items()}
        self.background = tuple(info["background"])
        self.held_out = set(info.get("held_out") or ())

    def twin_caption(self, caption: str, record: dict | None) -> tuple[str, str, str] | None:
        """(twin caption, colour a, colour b) for a two-object scene of two colours whose exchange shows no
        held-out composition; None otherwise."""
        if not is_scene(record) or record["kind"] != "relation":
            return None
        first, second = record["objects"]
        a, b = first["colour"], second["colour"]
        if a == b or a not in self.colours or b not in self.colours:
            return None
        if f"{b} {first['shape']}" in self.held_out or f"{a} {second['shape']}" in self.held_out:
            return None
        swapped = swap_attributes(caption, record["objects"], fields=("colour",))
        return (swapped[0], a, b) if swapped and swapped[0] != caption else None

    def twins(self, samples: Sequence[dict]) -> dict:
        """The twins of a batch of data set items (each with "pixel_values", "text", "index"): `twin_pixel_values`
        (C, 3, H, W) uint8, `twin_text` (C captions), `twin_source` (C,) int64, the row of each twin's original."""
        pixels, texts, sources = [], [], []
        for row, sample in enumerate(samples):
            found = self.twin_caption(sample["text"], self.records[sample["index"]])
            if found is None:
                continue
            caption, a, b = found
            image = swap_colours(sample["pixel_values"], self.colours[a], self.colours[b], self.background)
            if image is not None:
                pixels.append(image)
                texts.append(caption)
                sources.append(row)
        shape = tuple(samples[0]["pixel_values"].shape) if samples else (3, 0, 0)
        return {
            "twin_pixel_values": torch.stack(pixels) if pixels else torch.zeros(0, *shape, dtype=torch.uint8),
            "twin_text": texts,
            "twin_source": torch.tensor(sources, dtype=torch.long),
        }

    def coverage(self, captions: Sequence[str]) -> dict:
        """The share of captions (up to `SHARE_SAMPLE`, evenly spaced) whose metadata gives a twin, before its image
        is checked: {"share", "captions_checked"}."""
        n = len(captions)
        picked = sorted({i * n // SHARE_SAMPLE for i in range(SHARE_SAMPLE)}) if n > SHARE_SAMPLE else range(n)
        found = sum(self.twin_caption(captions[i], self.records[i]) is not None for i in picked)
        return {"share": round(found / max(len(picked), 1), 4), "captions_checked": len(picked)}
