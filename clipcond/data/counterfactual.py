"""Counterfactual image-caption pairs for CLIP pretraining: for an image of the shapes data, its twin with one
thing changed in the pixels and in the caption alike (the objects' colours, shapes or places), added to the batch as
a pair of its own.

NegCLIP's hard negatives (`clipcond.data.hard_negatives`) give each image a wrong caption to score below its own,
but no image to go with it: the text tower learns that "a blue circle left of a red square" is not "a red circle
left of a blue square", while nothing asks the image tower to tell the two scenes apart. TripletCLIP (Patel et al.,
"TripletCLIP: Improving Compositional Reasoning of CLIP via Synthetic Vision-Language Negatives", NeurIPS 2024)
adds the negative caption's own image, so that each of the two pairs is a hard negative of the other in both
directions of the loss. Here the twin is exact rather than generated: the shapes renderer draws flat colours on a
flat background (`clipcond.data.shapes.render_scene`), so exchanging the two objects' colours in the pixels draws
the scene the swapped caption describes, and the metadata row's bounding boxes redraw a scene with other shapes or
with the two objects in each other's places.

Kinds (`KINDS`, the values of `clipcond train clip --counterfactual-pairs`):

- ``swap-colours``: a two-object scene of two colours with the colours exchanged, in the image (`swap_colours`)
  and in the caption (`hard_negatives.swap_attributes`), "a red circle left of a blue square" -> "a blue circle
  left of a red square";
- ``swap-shapes``: the two objects' shapes exchanged, each drawn in the other's bounding box (`render_boxes`), "a
  red circle left of a blue square" -> "a red square left of a blue circle"; made where the metadata row redraws the
  original image (`REDRAW_TOLERANCE`), not for an image resampled from another resolution;
- ``swap-relations``: the two objects in each other's places, each keeping its colour, shape and size
  (`exchange_places`), and the caption's relation the opposite (`hard_negatives.swap_relations`), "a red circle
  left of a blue square" -> "a red circle right of a blue square"; made where the row redraws the image, as above,
  and the two objects can exchange places (not where one moved in from the border would touch the other). The
  original's caption with its noun phrases exchanged ("a blue square left of a red circle") describes the twin too:
  `twin_captions` names both, so that training keeps either out of the hard negatives.

The first two show the same two colour-shape pairs, bound the other way, in two layouts: a twin that would show a
held-out composition (`dataset_info.json`'s "held_out") is not made, since held-out pairs never appear in training.
The third shows the original's own pairs, in the other order.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from clipcond.data.hard_negatives import (
    OTHER_FIELD,
    is_scene,
    is_unplaced,
    parse_kinds,
    share_of_captions,
    swap_attributes,
    swap_relations,
    told_apart_by_size,
    unplaced_swaps,
)
from clipcond.data.shapes import (
    MARGIN,
    OPPOSITE_RELATION,
    boxes_apart,
    is_shapes_data,
    load_dataset_info,
    relation_of,
    render_boxes,
)
from clipcond.finite import finite_float

KINDS = ("swap-colours", "swap-shapes", "swap-relations")
FIELDS = {"swap-colours": "colour", "swap-shapes": "shape"}  # the metadata field each attribute kind exchanges
# A pixel farther than this (RGB distance, 0-255 scale) from every blend of the background with one of the two
# colours is unexplained; a twin is made only where at most UNEXPLAINED_SHARE of the pixels are (resampling from
# another resolution leaves a few such pixels at the edges, a photo or another palette many).
TOLERANCE = 24.0
UNEXPLAINED_SHARE = 0.02
LOW_SHARE = 0.05  # below this share of captions with a twin, training warns that twins are few
REDRAW_TOLERANCE = 1.0  # mean absolute difference (0-255) between an image and its redrawing from metadata


def parse_pair_kinds(text: str | None) -> tuple[str, ...]:
    """The kinds of `--counterfactual-pairs` ("swap-colours,swap-shapes"); "" or "none" (or None) for none."""
    return parse_kinds(text, "--counterfactual-pairs", KINDS)


def parse_kind_weights(text: str | None, kinds: Sequence[str]) -> dict[str, float]:
    """`--counterfactual-kind-weights` ("swap-relations=16,swap-colours=4"): the pair-term weight of the twins of each
    named kind, one of `kinds` (those of `--counterfactual-pairs`), in the order of `KINDS`; "" or "none" (or None)
    for none."""
    flag = "--counterfactual-kind-weights"
    if text is None or text.strip().lower() in ("", "none"):
        return {}
    if not kinds:
        raise ValueError(f"`{flag}` {text!r} weighs twins, but `--counterfactual-pairs` is 'none'; name their kinds")
    weights: dict[str, float] = {}
    for item in text.split(","):
        kind, sep, value = (part.strip() for part in item.partition("="))
        kind = kind.lower()
        if not sep:
            raise ValueError(f"`{flag}` {text!r}: {item.strip()!r} must read KIND=WEIGHT, e.g. swap-relations=16")
        if kind not in kinds:
            raise ValueError(
                f"`{flag}` {text!r} names {kind!r}, which `--counterfactual-pairs` {','.join(kinds)} does not make; "
                "add it there or weigh one of those kinds"
            )
        try:
            weight = finite_float(value)
        except argparse.ArgumentTypeError as err:
            raise ValueError(f"`{flag}` {text!r}: the weight of {kind} {err}") from None
        if weight < 0:
            raise ValueError(f"`{flag}` {text!r}: the weight of {kind} must be >= 0, got {value!r}")
        if kind in weights:
            raise ValueError(f"`{flag}` {text!r} names {kind} twice")
        weights[kind] = weight + 0.0  # -0 -> 0
    return {kind: weights[kind] for kind in KINDS if kind in weights}


def format_kind_weights(weights: dict[str, float] | None) -> str:
    """`--counterfactual-kind-weights`' text of `parse_kind_weights`' dict ("swap-relations=16"), which parses back to
    the same weights; "none" for none."""
    if not weights:
        return "none"

    def text(weight: float) -> str:
        short = f"{weight:g}"
        return short if float(short) == weight else repr(weight)

    return ",".join(f"{kind}={text(weight)}" for kind, weight in weights.items())


def has_palette(info: dict | None) -> bool:
    """Whether a dataset_info is the shapes data's, with what twins are drawn from: colours, background, resolution."""
    return is_shapes_data(info) and all(key in info for key in ("colours", "background", "resolution"))


def check_pair_data(kinds: Sequence[str], data: str | os.PathLike) -> None:
    """Refuse `--counterfactual-pairs` for a `--data` that is not the shapes data (read from its dataset_info.json
    alone: before any image is decoded)."""
    info = load_dataset_info(data) if Path(data).is_dir() else None
    if not has_palette(info):
        raise ValueError(
            f"`--counterfactual-pairs` {','.join(kinds)} draws twins of the shapes data's images from their metadata "
            f"rows and palette, but `--data` {str(data)!r} holds no shapes data set (its dataset_info.json, with "
            "colours, background and resolution, is missing or another data set's); make one with `clipcond data "
            "shapes`, or drop the option"
        )


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


def _draw_row(
    objects: Sequence[dict],
    info: dict,
    size: int,
    shapes: Sequence[str] | None = None,
    boxes: Sequence[Sequence[float]] | None = None,
) -> torch.Tensor:
    """The (3, size, size) uint8 drawing of a metadata row's objects in their colours, with `shapes` and `boxes`
    (fractions of the side) in place of the row's own where given."""
    shapes = shapes or [obj["shape"] for obj in objects]
    boxes = boxes or [_box(obj, info) for obj in objects]
    drawn = zip((info["colours"][obj["colour"]] for obj in objects), shapes, boxes, strict=True)
    image = render_boxes(list(drawn), size, info["background"])
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)


def _box(obj: dict, info: dict) -> list[float]:
    """A metadata row object's bounding box in fractions of the side (its "bbox" is at the data's resolution)."""
    return [v / info["resolution"] for v in obj["bbox"]]


def _redraws(pixels: torch.Tensor, objects: Sequence[dict], info: dict) -> bool:
    """Whether a metadata row's objects (colour, shape, "bbox") draw `pixels` itself, to within `REDRAW_TOLERANCE`."""
    if any("bbox" not in obj or obj.get("colour") not in info["colours"] for obj in objects):
        return False
    return (_draw_row(objects, info, pixels.shape[-1]).float() - pixels.float()).abs().mean() <= REDRAW_TOLERANCE


def redraw_swapped_shapes(pixels: torch.Tensor, objects: Sequence[dict], info: dict) -> torch.Tensor | None:
    """The (3, H, W) uint8 image of a two-object metadata row with the objects' shapes exchanged, each in the
    other's bounding box; None when the row does not redraw `pixels` (`_redraws`)."""
    if not _redraws(pixels, objects, info):
        return None
    shapes = [obj["shape"] for obj in objects][::-1]
    return _draw_row(objects, info, pixels.shape[-1], shapes=shapes).to(pixels.device)


def _centre(box: Sequence[float]) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def exchange_places(
    first: Sequence[float], second: Sequence[float], relation: str
) -> tuple[list[float], list[float]] | None:
    """Two boxes (x0, y0, x1, y1, fractions of the side) of a scene "first `relation` second" with their centres
    exchanged, each keeping its size and kept `MARGIN` inside the border as the generator keeps it
    (`ShapeObject.box`); None unless the two are then `MARGIN` apart and in the opposite relation (`relation_of`,
    as the probes read a relation)."""

    def moved(box: Sequence[float], centre: tuple[float, float]) -> list[float]:
        halves = ((box[2] - box[0]) / 2, (box[3] - box[1]) / 2)
        cx, cy = (min(max(c, half + MARGIN), 1 - half - MARGIN) for c, half in zip(centre, halves, strict=True))
        return [cx - halves[0], cy - halves[1], cx + halves[0], cy + halves[1]]

    a, b = moved(first, _centre(second)), moved(second, _centre(first))
    opposite = relation_of(_centre(a), _centre(b)) == OPPOSITE_RELATION[relation]
    return (a, b) if opposite and boxes_apart(a, b) else None


def redraw_swapped_places(
    pixels: torch.Tensor, objects: Sequence[dict], relation: str, info: dict
) -> torch.Tensor | None:
    """The (3, H, W) uint8 image of a two-object metadata row "objects[0] `relation` objects[1]" with the objects in
    each other's places (`exchange_places`); None when the row does not redraw `pixels` (`_redraws`) or the
    exchange does not give the opposite relation."""
    if not _redraws(pixels, objects, info):
        return None
    boxes = exchange_places(*(_box(obj, info) for obj in objects), relation)
    return None if boxes is None else _draw_row(objects, info, pixels.shape[-1], boxes=boxes).to(pixels.device)


class CounterfactualPairs:
    """Makes the twins of a batch's images (`twins`) from the shapes data's metadata rows and palette.

    `records`: the data set's metadata rows (`ImageCaptionDataset.records`), read at each sample's "index";
    `info`: its dataset_info.json (`ImageCaptionDataset.info`), which must be the shapes data's."""

    def __init__(self, kinds: Sequence[str], records: Sequence[dict] | None, info: dict | None):
        if not kinds or any(kind not in KINDS for kind in kinds):
            raise ValueError(f"kinds={list(kinds)!r} must be one or more of {', '.join(KINDS)}")
        if records is None or not has_palette(info):
            raise ValueError(
                f"`--counterfactual-pairs` {','.join(kinds)} draws twins of the shapes data's images from their "
                "metadata rows and its palette (dataset_info.json); this data set is no folder of the shapes data "
                "(`clipcond data shapes`)"
            )
        self.kinds = tuple(kinds)
        self.records = records
        self.info = info
        self.held_out = set(info.get("held_out") or ())

    def twin_captions(self, caption: str, record: dict | None, kind: str) -> list[str]:
        """The captions true of the twin of `kind` of a two-object scene, its own first: the caption with the two
        objects' colours (or shapes) exchanged, or with the opposite relation and then the noun phrases exchanged
        around the original relation. An unplaced caption ("a red circle and a blue square", no relation named)
        has no relation twin, and where no size it names tells its objects apart, its attribute twin is also named
        by the other attribute exchanged ("a blue circle and a red square" = "a red square and a blue circle"). []
        where there is no twin: nothing to exchange (one colour, one shape, no relation phrase found; in an
        unplaced caption, nothing but the exchanged attribute tells the objects apart), a twin that would show a
        held-out composition, objects that cannot exchange places."""
        if not is_scene(record) or record["kind"] != "relation":
            return []
        if kind == "swap-relations":
            return swap_relations(caption, record["relation"]) if self._exchanged(record) is not None else []
        first, second = record["objects"]
        field = FIELDS[kind]
        if first[field] == second[field]:
            return []
        # either exchange shows the same two pairs: the first colour on the second shape, and the other way round
        if (
            f"{second['colour']} {first['shape']}" in self.held_out
            or f"{first['colour']} {second['shape']}" in self.held_out
        ):
            return []
        objects = record["objects"]
        if not is_unplaced(caption, record):
            swapped = swap_attributes(caption, objects, fields=(field,))
            return swapped[:1] if swapped and swapped[0] != caption else []
        swapped = unplaced_swaps(caption, objects, fields=(field,))
        if not swapped or told_apart_by_size(caption, objects):
            return swapped[:1]
        # only colours and shapes tell the objects apart: the other attribute exchanged names the same two objects
        return swapped[:1] + swap_attributes(caption, objects, fields=(OTHER_FIELD[field],))[:1]

    def kinds_of(self, caption: str, record: dict | None) -> tuple[str, ...]:
        """The kinds whose twins a sample gets: all, except that an unplaced caption ("A and B") whose objects only
        colours and shapes tell apart gets one attribute twin, its colour twin where both are chosen: its shape twin
        would be another drawing of the same caption (`twin_captions`), the other's copy in the batch."""
        attributes = "swap-colours" in self.kinds and is_scene(record) and record["kind"] == "relation"
        if attributes and is_unplaced(caption, record) and not told_apart_by_size(caption, record["objects"]):
            return tuple(kind for kind in self.kinds if kind != "swap-shapes")
        return self.kinds

    def twin_caption(self, caption: str, record: dict | None, kind: str) -> str | None:
        """The twin's own caption (`twin_captions`' first), or None."""
        captions = self.twin_captions(caption, record, kind)
        return captions[0] if captions else None

    def _exchanged(self, record: dict) -> tuple[list[float], list[float]] | None:
        """A relation scene's boxes with the objects in each other's places (`exchange_places`), from its row."""
        if any("bbox" not in obj for obj in record["objects"]):
            return None
        return exchange_places(*(_box(obj, self.info) for obj in record["objects"]), record["relation"])

    def twin_image(self, pixels: torch.Tensor, record: dict, kind: str) -> torch.Tensor | None:
        """The twin's image of `kind`, or None where the image is no drawing of its metadata row."""
        if kind == "swap-shapes":
            return redraw_swapped_shapes(pixels, record["objects"], self.info)
        if kind == "swap-relations":
            return redraw_swapped_places(pixels, record["objects"], record["relation"], self.info)
        first, second = record["objects"]
        colours = self.info["colours"]
        if first["colour"] not in colours or second["colour"] not in colours:
            return None
        return swap_colours(pixels, colours[first["colour"]], colours[second["colour"]], self.info["background"])

    def twins(self, samples: Sequence[dict]) -> dict:
        """The twins of a batch of data set items (each with "pixel_values", "text", "index"), per sample in the
        order of `kinds`: `twin_pixel_values` (C, 3, H, W) uint8, `twin_text` (C captions), `twin_source` (C,)
        int64, the row of each twin's original, `twin_kind` (C,) int64, the index of its kind in `kinds`, and
        `twin_paraphrases` (C lists), the other captions true of each twin (`twin_captions`)."""
        pixels, texts, sources, kinds, paraphrases = [], [], [], [], []
        for row, sample in enumerate(samples):
            record = self.records[sample["index"]]
            for kind in self.kinds_of(sample["text"], record):
                captions = self.twin_captions(sample["text"], record, kind)
                image = self.twin_image(sample["pixel_values"], record, kind) if captions else None
                if image is not None:
                    pixels.append(image)
                    texts.append(captions[0])
                    paraphrases.append(captions[1:])
                    sources.append(row)
                    kinds.append(self.kinds.index(kind))
        shape = tuple(samples[0]["pixel_values"].shape) if samples else (3, 0, 0)
        return {
            "twin_pixel_values": torch.stack(pixels) if pixels else torch.zeros(0, *shape, dtype=torch.uint8),
            "twin_text": texts,
            "twin_source": torch.tensor(sources, dtype=torch.long),
            "twin_kind": torch.tensor(kinds, dtype=torch.long),
            "twin_paraphrases": paraphrases,
        }

    def coverage(self, captions: Sequence[str]) -> dict:
        """The share of captions whose metadata gives a twin of any kind and of each, before their images are
        checked (`share_of_captions`)."""
        return share_of_captions(
            len(captions),
            self.kinds,
            lambda i, kind: (
                kind in self.kinds_of(captions[i], self.records[i])
                and self.twin_caption(captions[i], self.records[i], kind) is not None
            ),
        )
