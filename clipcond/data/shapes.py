"""The built-in data set: flat-coloured shapes with compositional captions (`clipcond data shapes OUT`).

Every image is one or two objects on a flat light background. An object is a colour (`COLOURS`), a shape
(`SHAPES`), a size (`SIZES`) and a position (`POSITIONS`), plus a small seeded jitter of its centre and side so that
images of the same description differ. Three kinds of scene:

- single:   one object, "a small red circle at the top"; its `label` is "red circle";
- relation: two objects of different colour/shape, "a red circle left of a blue square" (or, for a share
  `unplaced_share` of them, "a red circle and a blue square": both named, their places not);
- count:    two objects of the same colour and shape, "two green triangles".

Captions come from varied templates, but always name the colour and shape of every object with the canonical words
(plurals add an "s"); synonyms are used only for the other words ("little"/"small", "to the left of"/"left of",
"middle"/"centre", "a picture of", ...). They stay under 16 words for a 32-token text context.

Held-out compositions (`DEFAULT_HELD_OUT`, or `held_out=`) never appear in a training image or caption; the test
split holds a balanced number of single-object images of every colour-shape pair, seen and held-out, so that
zero-shot accuracy can be measured per class, plus two-object scenes.

The output is in the Hugging Face `imagefolder` layout (`datasets.load_dataset("imagefolder", data_dir=OUT)` reads
it, and so does `clipcond.data.folders.ImageCaptionDataset`)::

    OUT/dataset_info.json          colours (name -> RGB), shapes, sizes, positions, background, held_out, seed, ...
    OUT/train/metadata.jsonl       {"file_name", "text", "label", "kind", "num_objects", "objects", "relation", "heldout"}
    OUT/train/00000.png ...
    OUT/test/...

The writer is deterministic: the same arguments give byte-identical PNGs and metadata (each image draws from its
own `random.Random` seeded by (seed, split, index), so the result does not depend on the order of work).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from clipcond.data.writer import DATASET_INFO, prepare_dataset_dir, write_metadata
from clipcond.finite import finite_float
from clipcond.storage import check_output_dir, save_image_atomic, write_json_atomic

FORMAT_VERSION = 1

# Flat background: a light, neutral grey, far from every object colour.
BACKGROUND: tuple[int, int, int] = (240, 240, 240)

# Object colours: saturated and well separated (the closest pair, orange-yellow, is 85 apart in RGB).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 215, 20),
    "purple": (140, 50, 180),
    "orange": (250, 130, 20),
}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

# Nominal side of an object's bounding square, as a fraction of the image side (jittered by `SCALE_JITTER`).
SIZES: dict[str, float] = {"small": 0.25, "large": 0.40}

# Anchor of an object's centre, (x, y) as fractions of the image side, y down (jittered by `POSITION_JITTER`).
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.50),
    "right": (0.75, 0.50),
    "top": (0.50, 0.25),
    "bottom": (0.50, 0.75),
    "centre": (0.50, 0.50),
}

# Relations of two-object scenes, read "objects[0] <relation> objects[1]", and the anchors they put the two on.
RELATIONS: dict[str, tuple[str, str]] = {
    "left of": ("left", "right"),
    "right of": ("right", "left"),
    "above": ("top", "bottom"),
    "below": ("bottom", "top"),
}

# Every colour and shape still appears in training in other pairs (each colour in >= 2, each shape in >= 4).
DEFAULT_HELD_OUT: tuple[str, ...] = ("red triangle", "green circle", "blue square", "purple triangle")

POSITION_JITTER = 0.06  # max shift of a centre, fraction of the image side
SCALE_JITTER = (0.9, 1.1)  # range of the factor on the nominal side
MARGIN = 0.03  # min distance of an object from the border, and min gap between two objects (fraction of the side)
SUPERSAMPLE = 4  # draw at 4x and box-filter down, for clean anti-aliased edges
COUNT_FRACTION = 0.3  # share of count scenes among two-object scenes
MIN_RESOLUTION = 16

# Caption vocabulary. Colour and shape words are always the canonical names; only these other words vary.
_PREFIXES = ("", "", "", "a picture of ", "an image showing ", "a drawing of ", "a photo of ")
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
POSITION_PHRASES = {
    "left": ("on the left", "on the left side"),
    "right": ("on the right", "on the right side"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "centre": ("in the centre", "in the middle"),
}
RELATION_PHRASES = {
    "left of": ("left of", "to the left of", "on the left of"),
    "right of": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
TWO_WORDS = ("two", "a pair of")
# An unplaced relation caption joins its two noun phrases with this instead of a relation phrase. Which object is
# named first says nothing of its place: a relation scene's first object is left or right (above or below) alike.
UNPLACED_PHRASE = "and"
# The canonical phrase of each position, the first of its synonyms: how questions, descriptions and probes word it.
POSITION_PHRASE = {position: phrases[0] for position, phrases in POSITION_PHRASES.items()}
# The mirror image of each relation and position ("centre" has none): probes' wrong captions, hard negatives.
OPPOSITE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
OPPOSITE_POSITION = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
# How a count caption may end: where the two objects are, without naming a relation between them
SIDE_BY_SIDE, ONE_ABOVE_THE_OTHER = "side by side", "one above the other"

DATASET_NAME = "clipcond-shapes"  # dataset_info.json's "name": tells the shapes data from other data sets


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene. `dx`, `dy` and `scale` are the jitter; the defaults draw the nominal object."""

    colour: str  # a key of COLOURS
    shape: str  # one of SHAPES
    size: str  # a key of SIZES
    position: str  # a key of POSITIONS
    dx: float = 0.0  # shift of the centre from the position's anchor, fraction of the image side (+ is right)
    dy: float = 0.0  # (+ is down)
    scale: float = 1.0  # factor on the nominal side of `size`

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("colour", self.colour, COLOURS),
            ("shape", self.shape, SHAPES),
            ("size", self.size, SIZES),
            ("position", self.position, POSITIONS),
        ):
            if value not in allowed:
                raise ValueError(f"ShapeObject {name}={value!r} is not one of {', '.join(allowed)}")

    @property
    def pair(self) -> str:
        """The colour-shape class, e.g. "red circle"."""
        return f"{self.colour} {self.shape}"

    def box(self) -> tuple[float, float, float, float]:
        """Bounding square (x0, y0, x1, y1) in fractions of the image side, kept `MARGIN` inside the border."""
        half = SIZES[self.size] * self.scale / 2
        ax, ay = POSITIONS[self.position]
        lo, hi = half + MARGIN, 1 - half - MARGIN
        cx = min(max(ax + self.dx, lo), hi)
        cy = min(max(ay + self.dy, lo), hi)
        return (cx - half, cy - half, cx + half, cy + half)

    def bbox(self, resolution: int) -> list[float]:
        """Bounding square in pixels of a `resolution`-sided image, rounded to 0.01."""
        return [round(v * resolution, 2) for v in self.box()]

    def to_dict(self, resolution: int) -> dict:
        return {
            "colour": self.colour,
            "shape": self.shape,
            "size": self.size,
            "position": self.position,
            "bbox": self.bbox(resolution),
        }


@dataclass(frozen=True)
class Scene:
    """One image: one or two objects, and for a relation scene the relation read `objects[0] <relation> objects[1]`."""

    objects: tuple[ShapeObject, ...]
    relation: str | None = None  # a key of RELATIONS, or None

    def __post_init__(self) -> None:
        if len(self.objects) not in (1, 2):
            raise ValueError(f"a Scene has 1 or 2 objects, got {len(self.objects)}")
        if self.relation is not None and self.relation not in RELATIONS:
            raise ValueError(f"Scene relation={self.relation!r} is not None or one of {', '.join(RELATIONS)}")
        if self.relation is not None and len(self.objects) != 2:
            raise ValueError("a Scene with a relation needs two objects")

    @property
    def kind(self) -> str:
        """'single', 'relation' or 'count' (two objects of the same colour and shape, no relation)."""
        if len(self.objects) == 1:
            return "single"
        if self.relation is None:
            a, b = self.objects
            if a.pair != b.pair:
                raise ValueError(
                    f"a two-object Scene without a relation must show one pair twice, got {a.pair}, {b.pair}"
                )
            return "count"
        return "relation"


def render_scene(objects: Sequence[ShapeObject] | Scene, resolution: int = 32) -> Image.Image:
    """Draw objects on the flat background; returns an RGB image of `resolution` x `resolution` pixels.

    Drawn at `SUPERSAMPLE` times the size and box-filtered down, so edges are anti-aliased while the inside of an
    object keeps its exact `COLOURS` value. Triangles point up and fill their bounding square's width.
    """
    if isinstance(objects, Scene):
        objects = objects.objects
    return render_boxes([(COLOURS[obj.colour], obj.shape, obj.box()) for obj in objects], resolution)


def render_boxes(
    objects: Sequence[tuple[Sequence[int], str, Sequence[float]]],
    resolution: int = 32,
    background: Sequence[int] = BACKGROUND,
) -> Image.Image:
    """`render_scene` for objects given as (RGB fill, shape, bounding square in fractions of the side): what a
    metadata row's objects draw (their "bbox" divided by the resolution)."""
    if resolution < MIN_RESOLUTION:
        raise ValueError(f"resolution={resolution} is too small; use at least {MIN_RESOLUTION}")
    side = resolution * SUPERSAMPLE
    image = Image.new("RGB", (side, side), tuple(background))
    draw = ImageDraw.Draw(image)
    for fill, shape, box in objects:
        x0, y0, x1, y1 = (round(v * side) for v in box)
        fill = tuple(fill)
        if shape == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif shape == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        else:  # triangle
            draw.polygon([((x0 + x1 - 1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
    return image.reduce(SUPERSAMPLE)


# ---------------------------------------------------------------- captions


def article(next_word: str) -> str:
    """The indefinite article before `next_word`: "an" before a vowel, else "a"."""
    return "an" if next_word[0] in "aeiou" else "a"


def _noun_phrase(obj: ShapeObject, rng: random.Random, with_size: bool) -> str:
    words = [obj.colour, obj.shape]
    if with_size:
        words.insert(0, rng.choice(SIZE_WORDS[obj.size]))
    determiner = "one" if rng.random() < 0.15 else article(words[0])
    return " ".join([determiner, *words])


def caption_scene(scene: Scene, rng: random.Random, unplaced_share: float = 0.0) -> str:
    """A caption for a scene, drawn from varied templates with `rng` (a `random.Random`).

    Always names each object's colour and shape with the canonical words, e.g. "a small red circle at the top",
    "an image showing a blue square to the left of a big yellow circle", "two green triangles side by side".
    With probability `unplaced_share` a relation scene's relation phrase becomes "and" ("a blue square and a big
    yellow circle"), the rest of its caption unchanged; at 0, no draw is made, so captions are as they were.
    """
    prefix = rng.choice(_PREFIXES)
    kind = scene.kind
    if kind == "single":
        (obj,) = scene.objects
        where = rng.choice(POSITION_PHRASES[obj.position])
        template = rng.randrange(5)
        noun = _noun_phrase(obj, rng, with_size=template in (0, 2, 4))
        if template in (0, 1):
            return f"{prefix}{noun} {where}"
        if template in (2, 3):
            return f"{prefix}{noun}"
        return f"{where}, {noun}"
    if kind == "relation":
        a, b = scene.objects
        phrase = rng.choice(RELATION_PHRASES[scene.relation])
        na = _noun_phrase(a, rng, with_size=rng.random() < 0.3)
        nb = _noun_phrase(b, rng, with_size=rng.random() < 0.3)
        if unplaced_share and rng.random() < unplaced_share:
            phrase = UNPLACED_PHRASE
        return f"{prefix}{na} {phrase} {nb}"
    # count: two of the same colour and shape
    a, b = scene.objects
    words = [rng.choice(TWO_WORDS)]
    if a.size == b.size and rng.random() < 0.3:
        words.append(rng.choice(SIZE_WORDS[a.size]))
    words += [a.colour, a.shape + "s"]
    caption = prefix + " ".join(words)
    if rng.random() < 0.4:
        side_by_side = {a.position, b.position} == {"left", "right"}
        caption += f" {SIDE_BY_SIDE}" if side_by_side else f", {ONE_ABOVE_THE_OTHER}"
    return caption


# ---------------------------------------------------------------- sampling


def parse_held_out(held_out: str | Iterable[str] | None) -> tuple[str, ...]:
    """Normalise held-out pairs ("red triangle, blue square" or a list) to canonical "colour shape" strings."""
    if held_out is None:
        return ()
    items = held_out.split(",") if isinstance(held_out, str) else list(held_out)
    pairs: list[str] = []
    for item in items:
        words = str(item).lower().split()
        if not words:
            continue
        if len(words) != 2 or words[0] not in COLOURS or words[1] not in SHAPES:
            raise ValueError(
                f"held-out pair {item!r} is not '<colour> <shape>' with a colour in {', '.join(COLOURS)} "
                f"and a shape in {', '.join(SHAPES)}"
            )
        pair = " ".join(words)
        if pair not in pairs:
            pairs.append(pair)
    return tuple(pairs)


def _all_pairs() -> list[str]:
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def _jittered(colour: str, shape: str, size: str, position: str, rng: random.Random) -> ShapeObject:
    obj = ShapeObject(
        colour,
        shape,
        size,
        position,
        dx=rng.uniform(-POSITION_JITTER, POSITION_JITTER),
        dy=rng.uniform(-POSITION_JITTER, POSITION_JITTER),
        scale=rng.uniform(*SCALE_JITTER),
    )
    # Store the clamped centre, so that dx/dy describe where the object is.
    x0, y0, x1, y1 = obj.box()
    ax, ay = POSITIONS[position]
    return ShapeObject(colour, shape, size, position, dx=(x0 + x1) / 2 - ax, dy=(y0 + y1) / 2 - ay, scale=obj.scale)


def relation_of(centre_a: Sequence[float], centre_b: Sequence[float]) -> str:
    """The relation "a <relation> b" of two centres (x, y; y down), along the axis on which they are further apart."""
    dx, dy = centre_b[0] - centre_a[0], centre_b[1] - centre_a[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


def boxes_apart(a: Sequence[float], b: Sequence[float], gap: float = MARGIN) -> bool:
    """Whether two boxes (x0, y0, x1, y1) are at least `gap` apart along x or along y."""
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _apart(a: ShapeObject, b: ShapeObject) -> bool:
    return boxes_apart(a.box(), b.box())


def _two_objects(pair_a: str, pair_b: str, pos_a: str, pos_b: str, sizes: tuple[str, str], rng: random.Random):
    (ca, sa), (cb, sb) = pair_a.split(), pair_b.split()
    for _ in range(20):
        a = _jittered(ca, sa, sizes[0], pos_a, rng)
        b = _jittered(cb, sb, sizes[1], pos_b, rng)
        if _apart(a, b):
            return a, b
    # The nominal objects never touch: the anchors are 0.5 apart and the largest side is 0.4 (with MARGIN 0.03).
    a, b = ShapeObject(ca, sa, sizes[0], pos_a), ShapeObject(cb, sb, sizes[1], pos_b)
    assert _apart(a, b)
    return a, b


def sample_scene(kind: str, pairs: Sequence[str], rng: random.Random, pair: str | None = None) -> Scene:
    """Draw a scene of `kind` ('single', 'relation', 'count') whose objects use colour-shape pairs from `pairs`.

    `pair` fixes the pair of a single-object or count scene (the balanced test split uses it).
    """
    if kind == "single":
        colour, shape = (pair or rng.choice(pairs)).split()
        return Scene((_jittered(colour, shape, rng.choice(list(SIZES)), rng.choice(list(POSITIONS)), rng),))
    if kind == "relation":
        pair_a, pair_b = rng.sample(list(pairs), 2)
        relation = rng.choice(list(RELATIONS))
        pos_a, pos_b = RELATIONS[relation]
        sizes = (rng.choice(list(SIZES)), rng.choice(list(SIZES)))
        return Scene(_two_objects(pair_a, pair_b, pos_a, pos_b, sizes, rng), relation)
    if kind == "count":
        pair = pair or rng.choice(pairs)
        positions = rng.choice([("left", "right"), ("top", "bottom")])
        size = rng.choice(list(SIZES))
        return Scene(_two_objects(pair, pair, *positions, (size, size), rng))
    raise ValueError(f"kind={kind!r} is not one of single, relation, count")


def _split_plan(
    split: str, n: int, pairs: list[str], single_fraction: float, seed: int
) -> list[tuple[str, str | None]]:
    """(kind, fixed pair or None) for each image of a split, shuffled deterministically.

    Train: round(n * single_fraction) single objects of random seen pairs, the rest two-object scenes.
    Test: the same number of single-object images for every pair (at least one each), the rest two-object scenes.
    """
    if split == "test":
        per_class = max(1, round(n * single_fraction / len(pairs)))
        per_class = min(per_class, n // len(pairs))
        plan: list[tuple[str, str | None]] = [("single", p) for p in pairs for _ in range(per_class)]
    else:
        plan = [("single", None)] * round(n * single_fraction)
    n_multi = n - len(plan)
    n_count = round(n_multi * COUNT_FRACTION) if len(pairs) > 1 else n_multi
    plan += [("count", None)] * n_count + [("relation", None)] * (n_multi - n_count)
    random.Random(f"clipcond-shapes/{seed}/{split}/plan").shuffle(plan)
    return plan


# ---------------------------------------------------------------- writer


def _check_args(
    num_images, resolution, test_fraction, num_test_images, single_fraction, held_out, unplaced_share
) -> int:
    """Validate the writer's arguments; returns the number of test images."""
    if not isinstance(resolution, int) or resolution < MIN_RESOLUTION:
        raise ValueError(f"resolution={resolution!r} must be an int >= {MIN_RESOLUTION} (e.g. 32 or 64)")
    for name, share in (("single_fraction", single_fraction), ("unplaced_share", unplaced_share)):
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"{name}={share} must lie in [0, 1]")
    n_pairs = len(COLOURS) * len(SHAPES)
    if num_test_images is None:
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction={test_fraction} must lie strictly between 0 and 1")
        num_test = round(num_images * test_fraction)
    else:
        num_test = num_test_images
    if num_test < n_pairs:
        raise ValueError(
            f"the test split needs at least {n_pairs} images (one single-object image per colour-shape pair for "
            f"zero-shot evaluation), got {num_test} of num_images={num_images}; raise num_images, test_fraction "
            f"or num_test_images"
        )
    if num_images - num_test < 1:
        raise ValueError(f"num_images={num_images} leaves no training images after {num_test} test images")

    seen = [p for p in _all_pairs() if p not in held_out]
    for colour in COLOURS:
        if not any(p.split()[0] == colour for p in seen):
            raise ValueError(
                f"held_out={list(held_out)} holds out every pair of colour {colour!r}; keep one in training"
            )
    for shape in SHAPES:
        if not any(p.split()[1] == shape for p in seen):
            raise ValueError(
                f"held_out={list(held_out)} holds out every pair of shape {shape!r}; keep one in training"
            )
    return num_test


def _write_split(
    split_dir: Path, split: str, plan, pairs, held_out: set[str], resolution: int, seed: int, unplaced_share: float
) -> dict:
    split_dir.mkdir()
    width = max(5, len(str(len(plan) - 1)))
    counts = {"num_images": len(plan), "single": 0, "relation": 0, "count": 0, "heldout": 0}
    records = []
    for index, (kind, pair) in enumerate(plan):
        rng = random.Random(f"clipcond-shapes/{seed}/{split}/{index}")
        scene = sample_scene(kind, pairs, rng, pair=pair)
        text = caption_scene(scene, rng, unplaced_share)
        file_name = f"{index:0{width}d}.png"
        save_image_atomic(render_scene(scene, resolution), split_dir / file_name)
        heldout = any(obj.pair in held_out for obj in scene.objects)
        counts[kind] += 1
        counts["heldout"] += heldout
        record = {
            "file_name": file_name,
            "text": text,
            "label": scene.objects[0].pair if kind == "single" else "",
            "kind": kind,
            "num_objects": len(scene.objects),
            "objects": [obj.to_dict(resolution) for obj in scene.objects],
            "relation": scene.relation,
            "heldout": heldout,
        }
        records.append(record)
    write_metadata(split_dir, records)
    return counts


def write_shapes_dataset(
    out_dir: str | Path,
    *,
    num_images: int,
    resolution: int = 32,
    seed: int = 0,
    test_fraction: float = 0.1,
    num_test_images: int | None = None,
    single_fraction: float = 0.5,
    held_out: str | Iterable[str] | None = DEFAULT_HELD_OUT,
    unplaced_share: float = 0.0,
    overwrite: bool = False,
) -> dict:
    """Write the shapes data set to `out_dir` (imagefolder layout) and return its dataset_info.

    Args:
        num_images: total images, split into train and test by `test_fraction` (or `num_test_images`).
        resolution: image side in pixels (>= 16).
        seed: the same seed and arguments give byte-identical files.
        single_fraction: share of single-object images (train; the test split holds about the same share, balanced
            over all colour-shape pairs); the rest are two-object scenes, `COUNT_FRACTION` of them counts.
        held_out: colour-shape pairs kept out of training ("red triangle, blue square" or a list); None or "" for none.
        unplaced_share: share of relation scenes captioned without their relation, "a red circle and a blue square"
            (both splits); the images, and every other caption, are those of the same arguments at 0.
        overwrite: replace `out_dir/train`, `out_dir/test` and `dataset_info.json` when `out_dir` is not empty.

    Raises:
        FileExistsError: `out_dir` is not empty and `overwrite` is False.
        ValueError: an argument out of range (the message names it).
    """
    held = parse_held_out(held_out)
    num_test = _check_args(
        num_images, resolution, test_fraction, num_test_images, single_fraction, held, unplaced_share
    )
    out = Path(out_dir)
    prepare_dataset_dir(out, overwrite)

    all_pairs = _all_pairs()
    seen = [p for p in all_pairs if p not in held]
    splits = {}
    for split, n, pairs in (("train", num_images - num_test, seen), ("test", num_test, all_pairs)):
        plan = _split_plan(split, n, pairs, single_fraction, seed)
        splits[split] = _write_split(out / split, split, plan, pairs, set(held), resolution, seed, unplaced_share)

    info = {
        "name": DATASET_NAME,
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "resolution": resolution,
        "background": list(BACKGROUND),
        "colours": {name: list(rgb) for name, rgb in COLOURS.items()},
        "shapes": list(SHAPES),
        "sizes": dict(SIZES),
        "positions": {name: list(xy) for name, xy in POSITIONS.items()},
        "relations": list(RELATIONS),
        "held_out": list(held),
        "classes": all_pairs,
        "single_fraction": single_fraction,
        **({"unplaced_share": unplaced_share} if unplaced_share else {}),  # absent: 0, as before the option
        "splits": splits,
    }
    # Written last: its presence marks a complete data set.
    write_json_atomic(out / DATASET_INFO, info)
    return info


def load_dataset_info(root: str | Path) -> dict | None:
    """The dataset_info.json of a data set root (or of the parent of a split folder such as ROOT/train), or None."""
    root = Path(root)
    candidates = [root / "dataset_info.json"]
    if (root / "metadata.jsonl").is_file() or (root / "metadata.csv").is_file():
        candidates.append(root.parent / "dataset_info.json")
    for path in candidates:
        if path.is_file():
            info = json.loads(path.read_text(encoding="utf-8"))
            version = info.get("format_version", FORMAT_VERSION)
            if isinstance(version, int) and version > FORMAT_VERSION:
                import warnings

                warnings.warn(
                    f"{path} has format_version {version}, newer than this clipcond's {FORMAT_VERSION}", stacklevel=2
                )
            return info
    return None


def is_shapes_data(info: dict | None) -> bool:
    """Whether a dataset_info (`load_dataset_info`) is the built-in shapes data's: other data sets (`clipcond data
    tuxpaint`, a user's folder) may write one too, under another "name"."""
    return info is not None and info.get("name") == DATASET_NAME


def class_names(info: dict | None) -> list[str]:
    """Zero-shot classes "colour shape", colours-major, from a dataset_info (None: the built-in colours and shapes)."""
    if info is not None and "classes" in info:
        return list(info["classes"])
    colours = info["colours"] if info is not None and "colours" in info else COLOURS
    shapes = info["shapes"] if info is not None and "shapes" in info else SHAPES
    return [f"{c} {s}" for c in colours for s in shapes]


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="clipcond data shapes",
        description=(
            "Write the built-in synthetic data set: flat-coloured circles, squares and triangles (6 colours, 2 sizes, "
            "5 positions) in scenes of one object, two objects in a spatial relation, or two of a kind, with "
            "captions. Held-out colour-shape pairs appear only in the test split, which has a balanced number of "
            "single-object images of every pair for zero-shot evaluation. Output: OUT/train and OUT/test in the "
            "Hugging Face imagefolder layout (PNGs + metadata.jsonl) and OUT/dataset_info.json."
        ),
    )
    parser.add_argument("out", metavar="OUT", type=Path, help="output directory (must be empty unless --overwrite)")
    parser.add_argument("--num-images", type=int, default=20000, help="total images, train + test (default 20000)")
    parser.add_argument("--resolution", type=int, default=32, help="image side in pixels, >= 16 (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same arguments, same bytes (default 0)")
    parser.add_argument(
        "--test-fraction", type=finite_float, default=0.1, help="share of --num-images in the test split (default 0.1)"
    )
    parser.add_argument(
        "--num-test-images", type=int, default=None, help="test images, instead of --test-fraction (at least 18)"
    )
    parser.add_argument(
        "--single-fraction",
        type=finite_float,
        default=0.5,
        help="share of single-object images; the rest are two-object relations and counts (default 0.5)",
    )
    parser.add_argument(
        "--held-out",
        default=",".join(DEFAULT_HELD_OUT),
        help=f"comma-separated colour-shape pairs kept out of training; '' for none (default {','.join(DEFAULT_HELD_OUT)!r})",
    )
    parser.add_argument(
        "--unplaced-share",
        type=finite_float,
        default=0.0,
        help="share of two-object relation scenes captioned without their places, 'a red circle and a blue square' "
        "(default 0: every one says where, 'a red circle left of a blue square')",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing data set in OUT")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_output_dir(args.out, "OUT")
    start = time.perf_counter()
    info = write_shapes_dataset(
        args.out,
        num_images=args.num_images,
        resolution=args.resolution,
        seed=args.seed,
        test_fraction=args.test_fraction,
        num_test_images=args.num_test_images,
        single_fraction=args.single_fraction,
        held_out=args.held_out,
        unplaced_share=args.unplaced_share,
        overwrite=args.overwrite,
    )
    seconds = time.perf_counter() - start
    n_train, n_test = info["splits"]["train"]["num_images"], info["splits"]["test"]["num_images"]
    held = ", ".join(info["held_out"]) or "none"
    print(
        f"wrote {n_train} train + {n_test} test images ({args.resolution} px, seed {args.seed}, held out: {held}) "
        f"to {args.out} in {seconds:.1f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
