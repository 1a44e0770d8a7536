"""Compositional probes on the shapes data: minimal pairs for a CLIP, judged prompts for the generators, and fields
read back from a captioner's captions (`clipcond probe`).

A *minimal pair* is an image with two captions that differ in one field only (Thrush et al. 2022, "Winoground";
Yuksekgonul et al. 2023, "When and why vision-language models behave like bags-of-words"):

- count:    "a red circle" vs "two red circles" (on one- and two-object images);
- relation: "a red circle left of a blue square" vs "a red circle right of a blue square";
- binding:  "a red circle and a blue square" vs "a blue circle and a red square" (attributes swapped);
- position: "a red circle on the left" vs "a red circle on the right";
- size:     "a small red circle" vs "a large red circle".

Captions use one canonical wording (`describe`), and `read_caption` reads the fields back from any text in the
shapes vocabulary, so a test can check that the two captions of a pair differ only in the probed field. A CLIP
passes a pair when the image embedding is closer to the right caption; a guess passes half of them.

Generated images are read by a *scene reader* (`read_scene`): the shapes are objects on a flat light background,
so pixels far from the background colour (the median of the border) are segmented into connected components, specks
are dropped, and each component is pasted alone onto a clean background and named by the attribute judge
(`clipcond.evaluation.judge`). The reader gives the count, each object's colour, shape, centre and size, and so the
relation between two objects. Its own accuracy is measured on renders of the same prompts (`reader` figures), and a
prompt-blind baseline (renders of other prompts of the same kind, read against the prompt) gives each generator
field its chance level.

Every figure is a proportion with its Wilson 95% interval (`clipcond.evaluation.stats`).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipcond.data.shapes import (
    BACKGROUND,
    COLOURS,
    OPPOSITE_POSITION,
    OPPOSITE_RELATION,
    POSITION_PHRASE,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    relation_of,
    render_scene,
    sample_scene,
)
from clipcond.evaluation.judge import OUTCOMES, AttributeJudge
from clipcond.evaluation.stats import wilson_interval

PROBES: tuple[str, ...] = ("count", "relation", "binding", "position", "size")
GROUPS: tuple[str, ...] = ("seen", "heldout")
# Which field of `CaptionFields.as_dict()` each probe changes.
PROBE_FIELD = {"count": "count", "relation": "relation", "binding": "pairs", "position": "position", "size": "size"}
# The prompts the generators are judged on, and the fields judged for each kind.
GENERATOR_KINDS: dict[str, tuple[str, ...]] = {
    "count": ("count",),
    "relation": ("count", "objects", "binding", "relation"),
    "binding": ("count", "objects", "binding"),
}
# Chance of a generator field (`judge_reading`): one or two objects; one of the two bindings of two colours to two
# shapes; one of four relations. "objects" has none a priori: its chance is the prompt-blind baseline's accuracy.
GENERATOR_CHANCE = {"count": 0.5, "binding": 0.5, "relation": 0.25}

# Canonical wording (the data's captions use these words among others; `read_caption` reads all of them).
OTHER_SIZE = {"small": "large", "large": "small"}

_SIZE_WORDS = {"small": "small", "little": "small", "tiny": "small", "large": "large", "big": "large"}
_POSITION_WORDS = {
    "left": "left",
    "right": "right",
    "top": "top",
    "bottom": "bottom",
    "centre": "centre",
    "center": "centre",
    "middle": "centre",
}
_RELATION_WORDS = {"above": "above", "over": "above", "below": "below", "under": "below", "beneath": "below"}
_TWO_WORDS = {"two", "pair", "both"}

# Scene reader: a pixel belongs to an object when a channel is this far from the background; a component smaller
# than this share of the image is a speck (the smallest object of the data covers about 2.5% of it).
READER_THRESHOLD = 60
READER_MIN_AREA = 0.008
# Between the data's two nominal sides (0.25 and 0.40 of the image, jittered by 10%): their geometric mean.
SIZE_BOUNDARY = (SIZES["small"] * SIZES["large"]) ** 0.5


# ---------------------------------------------------------------- captions and their fields


def _noun(colour: str, shape: str, size: str | None = None, plural: bool = False) -> str:
    words = [size, colour, shape + ("s" if plural else "")]
    words = [w for w in words if w]
    if plural:
        return " ".join(["two", *words])
    return " ".join(["an" if words[0][0] in "aeiou" else "a", *words])


def describe(scene: Scene, probe: str, *, relation: str | None = None, count: int | None = None) -> str:
    """The canonical caption of `scene` for `probe` (see the module docstring); `relation` and `count` override
    the scene's (the wrong caption of a relation or count pair)."""
    first = scene.objects[0]
    if probe == "count":
        count = count if count is not None else len(scene.objects)
        return _noun(first.colour, first.shape, plural=count == 2)
    if probe == "relation":
        a, b = scene.objects
        return f"{_noun(a.colour, a.shape)} {relation or scene.relation} {_noun(b.colour, b.shape)}"
    if probe == "binding":
        a, b = scene.objects
        return f"{_noun(a.colour, a.shape)} and {_noun(b.colour, b.shape)}"
    if probe == "position":
        return f"{_noun(first.colour, first.shape)} {POSITION_PHRASE[first.position]}"
    if probe == "size":
        return _noun(first.colour, first.shape, size=first.size)
    raise ValueError(f"probe={probe!r} is not one of {', '.join(PROBES)}")


@dataclass(frozen=True)
class CaptionFields:
    """What a caption (or a scene) says: the objects in the order named ("colour shape", or None for a word the
    reader could not pair), the relation and size words (None where it names none; the first where it names
    several), and every position word in order."""

    objects: tuple[tuple[str | None, str], ...] = ()
    relation: str | None = None
    size: str | None = None
    positions: tuple[str, ...] = ()

    @property
    def position(self) -> str | None:
        """The first position named, or None."""
        return self.positions[0] if self.positions else None

    @property
    def count(self) -> int:
        return len(self.objects)

    @property
    def pairs(self) -> tuple[str, ...]:
        """The distinct "colour shape" pairs, in order of first mention."""
        return tuple(dict.fromkeys(f"{c} {s}" for c, s in self.objects))

    def as_dict(self) -> dict:
        return {
            "count": self.count,
            "pairs": tuple(sorted(self.pairs)),
            "colours": tuple(sorted({c or "" for c, _ in self.objects})),
            "shapes": tuple(sorted({s for _, s in self.objects})),
            "relation": self.relation,
            "position": self.position,
            "size": self.size,
        }


def read_caption(text: str) -> CaptionFields:
    """Read the fields of a caption in the shapes vocabulary ("a small red circle at the top", "two blue squares",
    "a red circle to the left of a blue square", "a red circle and a blue square").

    Each shape word makes an object with the nearest colour word before it, or, with none, the colour of an "in
    COLOUR" right after it ("a small circle in red on the left": the captioner's detailed descriptions,
    `clipcond.data.questions.describe`); a plural shape word ("circles"), or one after "two" / "pair" / "both", makes
    two. "left"/"right" followed by "of" is a relation, otherwise a position; so are "top", "bottom", "centre".
    """
    words = re.findall(r"[a-z]+", text.lower())
    objects: list[tuple[str | None, str]] = []
    positions: list[str] = []
    colour = None
    two = False  # a number word before the next shape word
    uncoloured: int | None = None  # where the objects of the last shape word begin, while they have no colour
    relation = size = None
    for i, word in enumerate(words):
        if word in COLOURS and uncoloured is not None and words[i - 1] == "in":
            objects[uncoloured:] = [(word, shape) for _, shape in objects[uncoloured:]]
            uncoloured = None
        elif word in COLOURS:
            colour = word
        elif word in _TWO_WORDS:
            two = True
        elif word in SHAPES or (word.endswith("s") and word[:-1] in SHAPES):
            plural = word not in SHAPES
            uncoloured = len(objects) if colour is None else None
            objects += [(colour, word.rstrip("s") if plural else word)] * (2 if plural or two else 1)
            colour, two = None, False
        elif word in ("left", "right") and i + 1 < len(words) and words[i + 1] == "of":
            relation = relation or f"{word} of"
        elif word in _RELATION_WORDS:
            relation = relation or _RELATION_WORDS[word]
        elif word in _POSITION_WORDS:
            positions.append(_POSITION_WORDS[word])
        elif word in _SIZE_WORDS:
            size = size or _SIZE_WORDS[word]
    return CaptionFields(tuple(objects), relation, size, tuple(positions))


def scene_fields(scene: Scene, probe: str) -> CaptionFields:
    """The fields that the canonical caption of `scene` for `probe` states (what a right caption must say)."""
    return read_caption(describe(scene, probe))


# ---------------------------------------------------------------- minimal pairs


@dataclass
class MinimalPair:
    """An image with the caption that describes it and one that differs in the probed field only."""

    probe: str
    scene: Scene
    right: str
    wrong: str
    heldout: bool  # the image shows a held-out colour-shape pair
    image: Image.Image | None = None  # None: render the scene (`pair_images`)
    source: str = "render"  # "render" or the image file it was read from


def wrong_caption(scene: Scene, probe: str) -> str | None:
    """The caption that differs from `describe(scene, probe)` in the probed field only; None when the scene cannot
    carry the probe (a probe of one object on a two-object scene, a binding swap that changes nothing, ...)."""
    n = len(scene.objects)
    if probe == "count":
        return describe(scene, probe, count=3 - n) if scene.kind in ("single", "count") else None
    if probe == "relation":
        return describe(scene, probe, relation=OPPOSITE_RELATION[scene.relation]) if scene.relation else None
    if probe == "binding":
        if scene.kind != "relation":
            return None
        a, b = scene.objects
        if a.colour == b.colour or a.shape == b.shape:
            return None  # swapping the colours would not change the caption's pairs
        swapped = Scene((_restyled(a, colour=b.colour), _restyled(b, colour=a.colour)), scene.relation)
        return describe(swapped, probe)
    if probe in ("position", "size"):
        if scene.kind != "single" or (probe == "position" and scene.objects[0].position not in OPPOSITE_POSITION):
            return None
        obj = scene.objects[0]
        if probe == "position":
            return describe(Scene((_restyled(obj, position=OPPOSITE_POSITION[obj.position]),)), probe)
        return describe(Scene((_restyled(obj, size=OTHER_SIZE[obj.size]),)), probe)
    raise ValueError(f"probe={probe!r} is not one of {', '.join(PROBES)}")


def _restyled(obj: ShapeObject, **changes) -> ShapeObject:
    fields = {"colour": obj.colour, "shape": obj.shape, "size": obj.size, "position": obj.position}
    return ShapeObject(**{**fields, **changes}, dx=obj.dx, dy=obj.dy, scale=obj.scale)


def _scene_kinds(probe: str) -> tuple[str, ...]:
    return {"count": ("single", "count"), "relation": ("relation",), "binding": ("relation",)}.get(probe, ("single",))


def _pair_groups(held_out: Sequence[str]) -> dict[str, tuple[list[str], list[str]]]:
    """Per group: (the pairs a scene draws from, the pairs of which it must show one)."""
    all_pairs = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    held = [p for p in all_pairs if p in set(held_out)]
    seen = [p for p in all_pairs if p not in set(held_out)]
    groups = {"seen": (seen, seen)}
    if held:
        groups["heldout"] = (all_pairs, held)
    return groups


def build_pairs(probe: str, n: int, *, held_out: Sequence[str] = (), seed: int = 0) -> list[MinimalPair]:
    """`n` minimal pairs of `probe` per group (seen compositions, and held-out ones when `held_out` names any), on
    scenes drawn by the data's own sampler from a `random.Random` seeded by (seed, probe, group)."""
    if probe not in PROBES:
        raise ValueError(f"probe={probe!r} is not one of {', '.join(PROBES)}")
    if n < 1:
        raise ValueError(f"the number of pairs must be >= 1, got {n}")
    pairs: list[MinimalPair] = []
    for group, (pool, required) in _pair_groups(held_out).items():
        rng = random.Random(f"clipcond-probe/{seed}/{probe}/{group}")
        kinds = _scene_kinds(probe)
        made = 0
        while made < n:
            kind = kinds[made % len(kinds)]
            fixed = rng.choice(required) if kind in ("single", "count") else None
            scene = sample_scene(kind, pool, rng, pair=fixed)
            if not any(obj.pair in required for obj in scene.objects):
                continue  # a relation scene of the held-out group must show a held-out pair
            wrong = wrong_caption(scene, probe)
            if wrong is None:
                continue
            pairs.append(MinimalPair(probe, scene, describe(scene, probe), wrong, heldout=group == "heldout"))
            made += 1
    return pairs


def scene_from_record(record: dict) -> Scene | None:
    """The scene of an imagefolder metadata row that carries the shapes fields ("objects" with colour, shape, size
    and position; "relation"), or None when it does not."""
    objects = record.get("objects")
    if not isinstance(objects, list) or len(objects) not in (1, 2):
        return None
    try:
        scene = Scene(
            tuple(ShapeObject(o["colour"], o["shape"], o["size"], o["position"]) for o in objects),
            record.get("relation") or None,
        )
        scene.kind  # noqa: B018 - raises for two different objects without a relation
    except (KeyError, TypeError, ValueError):
        return None
    return scene


def pairs_from_metadata(
    split_dir: str | Path, probe: str, n: int, *, held_out: Sequence[str] = (), seed: int = 0
) -> list[MinimalPair]:
    """Up to `n` minimal pairs of `probe` per group from an imagefolder split whose metadata.jsonl rows carry the
    shapes fields (`scene_from_record`); rows without them, or that cannot carry the probe, are skipped. The rows are
    taken in a seeded shuffled order."""
    split_dir = Path(split_dir)
    path = split_dir / "metadata.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{str(split_dir)!r} holds no metadata.jsonl")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    random.Random(f"clipcond-probe/{seed}/{probe}/metadata").shuffle(rows)
    root = split_dir.resolve()
    taken = dict.fromkeys(GROUPS, 0)
    pairs = []
    for row in rows:
        scene = scene_from_record(row)
        wrong = None if scene is None else wrong_caption(scene, probe)
        if wrong is None:
            continue
        heldout = any(obj.pair in set(held_out) for obj in scene.objects)
        group = "heldout" if heldout else "seen"
        file = (split_dir / str(row.get("file_name", ""))).resolve()
        if taken[group] >= n or not file.is_relative_to(root) or not file.is_file():
            continue
        with Image.open(file) as image:
            pairs.append(
                MinimalPair(probe, scene, describe(scene, probe), wrong, heldout, image.convert("RGB"), str(file))
            )
        taken[group] += 1
    return pairs


def render_scenes(scenes: Sequence[Scene], resolution: int) -> torch.Tensor:
    """uint8 (N, 3, resolution, resolution) renders of `scenes`."""
    arrays = [np.asarray(render_scene(scene, resolution), dtype=np.uint8) for scene in scenes]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def pair_images(pairs: Sequence[MinimalPair], resolution: int) -> torch.Tensor:
    """uint8 (N, 3, H, W): each pair's image, rendered from its scene at `resolution` when it has none."""
    arrays = [
        np.asarray(p.image if p.image is not None else render_scene(p.scene, resolution), dtype=np.uint8)
        for p in pairs
    ]
    sides = {a.shape for a in arrays}
    if len(sides) > 1:
        raise ValueError(f"the probe images differ in size ({sorted(sides)}); resize them to one side first")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------- accuracy against chance


def proportion(successes: float, n: int, chance: float | None) -> dict:
    """{"accuracy", "low", "high", "chance", "n"}: a proportion with its Wilson 95% interval, beside chance, and
    where chance lies: "above", "at" (inside the interval) or "below" chance (None without a chance level)."""
    low, high = wilson_interval(successes, n)
    verdict = None
    if chance is not None and n:
        verdict = "above" if low > chance else "below" if high < chance else "at"
    return {
        "accuracy": successes / n if n else None,
        "low": low,
        "high": high,
        "chance": chance,
        "n": n,
        "versus_chance": verdict,
    }


# score(images uint8 (B, 3, H, W), captions) -> (B,) how well image i matches caption i (higher is better).
Scorer = Callable[[torch.Tensor, list[str]], torch.Tensor]


def clip_scorer(clip_run, batch_size: int = 256) -> Scorer:
    """The cosine between a CLIP's image and text embeddings of each (image, caption)."""
    from clipcond.evaluation.judged import clip_image_features

    def score(images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        image_features = clip_image_features(clip_run, images, batch_size)
        text_features = clip_run.encode_text(list(captions)).cpu()
        return (image_features * text_features).sum(dim=-1)

    return score


def preferred(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """1 where `first` scores above `second`, 0 where below, 1/2 on a tie (a coin flip's expectation, so a scorer
    that cannot tell the two apart sits exactly at chance)."""
    first, second = first.float(), second.float()
    return (first > second).float() + 0.5 * (first == second).float()


def pair_outcomes(score: Scorer, pairs: Sequence[MinimalPair], images: torch.Tensor) -> torch.Tensor:
    """(N,) per pair: whether the image scores its right caption above the wrong one (`preferred`)."""
    return preferred(score(images, [p.right for p in pairs]), score(images, [p.wrong for p in pairs]))


def group_figures(outcomes: torch.Tensor, heldout: Sequence[bool], chance: float | None) -> dict:
    """`proportion` over all items, the seen ones and the held-out ones (a group without items is left out)."""
    heldout = torch.as_tensor(list(heldout), dtype=torch.bool)
    figures = {"all": proportion(outcomes.sum().item(), len(outcomes), chance)}
    for group, mask in (("seen", ~heldout), ("heldout", heldout)):
        if mask.any():
            figures[group] = proportion(outcomes[mask].sum().item(), int(mask.sum()), chance)
    return figures


def run_pair_probes(
    score: Scorer, pairs_by_probe: dict[str, list[MinimalPair]], resolution: int
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Each probe's figures (`group_figures`, chance 1/2) and its per-pair outcomes."""
    figures, outcomes = {}, {}
    for probe, pairs in pairs_by_probe.items():
        if not pairs:
            continue
        outcomes[probe] = pair_outcomes(score, pairs, pair_images(pairs, resolution))
        figures[probe] = group_figures(outcomes[probe], [p.heldout for p in pairs], chance=0.5)
    return figures, outcomes


# ---------------------------------------------------------------- the scene reader


@dataclass
class ReadObject:
    """One object the reader found: the judge's colour, shape and outcome, the centre of its bounding box (x, y,
    fractions of the side, y down) and the larger side of its bounding box (fraction of the image side)."""

    colour: str
    shape: str
    outcome: str
    centre: tuple[float, float]
    side: float

    @property
    def pair(self) -> str | None:
        """ "colour shape", or None when the judge did not see one recognisable object in it."""
        return f"{self.colour} {self.shape}" if self.outcome == "object" else None

    @property
    def size(self) -> str:
        return "small" if self.side < SIZE_BOUNDARY else "large"

    @property
    def position(self) -> str:
        x, y = self.centre
        return min(POSITIONS, key=lambda name: (POSITIONS[name][0] - x) ** 2 + (POSITIONS[name][1] - y) ** 2)


@dataclass
class SceneReading:
    objects: list[ReadObject] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.objects)


def relation_between(a: ReadObject, b: ReadObject) -> str:
    """The relation "a <relation> b" along the axis on which the centres are further apart (`relation_of`)."""
    return relation_of(a.centre, b.centre)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """The 4-connected components of a boolean (H, W) mask, each as a boolean mask."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    found = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        label = len(found) + 1
        labels[y0, x0] = label
        stack = [(y0, x0)]
        while stack:
            y, x = stack.pop()
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    stack.append((ny, nx))
        found.append(labels == label)
    return found


def _dilate(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    h, w = mask.shape
    return np.logical_or.reduce(
        [padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    )


def segment(image: torch.Tensor) -> list[np.ndarray]:
    """The object masks (H, W) of one uint8 image (3, H, W): pixels at least `READER_THRESHOLD` from the background
    (the median colour of the border) in some channel, 4-connected, without specks (< `READER_MIN_AREA`)."""
    pixels = image.permute(1, 2, 0).numpy().astype(np.int16)  # (H, W, 3)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    mask = np.abs(pixels - background).max(axis=-1) >= READER_THRESHOLD
    min_area = READER_MIN_AREA * mask.size
    return [m for m in _components(mask) if m.sum() >= min_area]


def read_scenes(images: torch.Tensor, judge: AttributeJudge) -> list[SceneReading]:
    """Read each uint8 image (N, 3, H, W): segment it (`segment`), paste each object (with a pixel of edge) alone on
    the data's background, and have the judge name it."""
    crops, owners, geometry = [], [], []
    for i, image in enumerate(images):
        pixels = image.permute(1, 2, 0).numpy()
        h, w = pixels.shape[:2]
        for mask in segment(image):
            canvas = np.empty_like(pixels)
            canvas[:] = BACKGROUND
            keep = _dilate(mask)
            canvas[keep] = pixels[keep]
            crops.append(torch.from_numpy(canvas).permute(2, 0, 1))
            ys, xs = np.nonzero(mask)
            # The bounding box's centre, as the data places objects (a triangle's centroid sits lower).
            centre = ((xs.min() + xs.max() + 1) / (2 * w), (ys.min() + ys.max() + 1) / (2 * h))
            side = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) / max(h, w)
            owners.append(i)
            geometry.append((centre, float(side)))
    readings = [SceneReading() for _ in range(len(images))]
    if crops:
        colour, shape, outcome = judge.predict(torch.stack(crops))
        for k, owner in enumerate(owners):
            readings[owner].objects.append(
                ReadObject(
                    judge.colours[colour[k]],
                    judge.shapes[shape[k]],
                    OUTCOMES[outcome[k]],
                    centre=tuple(float(v) for v in geometry[k][0]),
                    side=geometry[k][1],
                )
            )
    return readings


def judge_reading(expected: CaptionFields, reading: SceneReading) -> dict[str, bool | None]:
    """Whether an image's reading matches what a prompt asks for, field by field (None: not judged on this image):

    - "count": as many objects as the prompt names;
    - "objects": the objects are exactly the prompt's colour-shape pairs, each recognisable;
    - "binding" (two different pairs): among images that show the prompt's two colours and two shapes on two
      objects, whether each colour sits on its shape (the only other way is the swap: chance 1/2);
    - "relation": among images whose objects are right, whether they stand in the prompt's relation (chance 1/4);
    - "position", "size": of a prompt's one object.
    """
    wanted = sorted(f"{c} {s}" for c, s in expected.objects)
    got = sorted(obj.pair or "?" for obj in reading.objects)
    verdict: dict[str, bool | None] = {"count": reading.count == expected.count, "objects": got == wanted}
    if expected.count == 2 and len(set(wanted)) == 2:
        recognised = reading.count == 2 and all(obj.pair for obj in reading.objects)
        same_words = recognised and all(
            sorted(getattr(obj, attribute) for obj in reading.objects) == sorted(w[k] for w in expected.objects)
            for k, attribute in ((0, "colour"), (1, "shape"))
        )
        verdict["binding"] = verdict["objects"] if same_words else None
    if expected.relation is not None:
        verdict["relation"] = None
        if verdict["objects"] and expected.count == 2:
            first = f"{expected.objects[0][0]} {expected.objects[0][1]}"
            a = next(obj for obj in reading.objects if obj.pair == first)
            b = next(obj for obj in reading.objects if obj is not a)
            verdict["relation"] = relation_between(a, b) == expected.relation
    one = reading.objects[0] if reading.count == 1 else None
    if expected.position is not None:
        verdict["position"] = one is not None and one.position == expected.position
    if expected.size is not None:
        verdict["size"] = one is not None and one.size == expected.size
    return verdict


def reader_scorer(judge: AttributeJudge) -> Scorer:
    """A scorer that reads the image and gives 1 when everything the caption says holds in it, else 0: an oracle on
    clean renders (as good as the reader), to check the minimal-pair machinery."""

    def score(images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        readings = read_scenes(images, judge)
        return torch.tensor(
            [
                float(all(v is not False for v in judge_reading(read_caption(c), r).values()))
                for c, r in zip(captions, readings)
            ]
        )

    return score


# ---------------------------------------------------------------- generators


@dataclass
class Prompt:
    kind: str  # a key of GENERATOR_KINDS
    text: str
    scene: Scene  # a scene that the prompt describes (rendered for the reader's accuracy and the baseline)
    heldout: bool


def generator_prompts(n: int, *, held_out: Sequence[str] = (), seed: int = 0) -> list[Prompt]:
    """`n` prompts of each kind and group: count ("a red circle" and "two red circles", alternating), relation and
    binding, on scenes drawn like the minimal pairs'."""
    prompts = []
    for kind, probe in (("count", "count"), ("relation", "relation"), ("binding", "binding")):
        for pair in build_pairs(probe, n, held_out=held_out, seed=seed):
            prompts.append(Prompt(kind, pair.right, pair.scene, pair.heldout))
    return prompts


def judge_prompts(
    prompts: Sequence[Prompt], images: torch.Tensor, judge: AttributeJudge, per_prompt: int = 1
) -> dict[str, torch.Tensor]:
    """Per judged field (`GENERATOR_KINDS`), (len(prompts) * per_prompt,) floats, 1 where image i matches prompt
    i // per_prompt in that field, NaN where the field is not judged (for that prompt's kind, or on that image)."""
    readings = read_scenes(images, judge)
    fields = sorted({f for kind_fields in GENERATOR_KINDS.values() for f in kind_fields})
    out = {f: torch.full((len(readings),), float("nan")) for f in fields}
    for i, reading in enumerate(readings):
        prompt = prompts[i // per_prompt]
        verdict = judge_reading(read_caption(prompt.text), reading)
        for f in GENERATOR_KINDS[prompt.kind]:
            if verdict.get(f) is not None:
                out[f][i] = float(verdict[f])
    return out


def _field_figures(prompts, verdicts, per_prompt: int, chance: dict | None) -> dict:
    """{kind: {field: group_figures}} from `judge_prompts` output, over the images where each field was judged;
    chance from `GENERATOR_CHANCE`, and for "objects" the accuracy in `chance` (the baseline's figures)."""
    figures: dict = {}
    heldout = [p.heldout for p in prompts for _ in range(per_prompt)]
    kinds = [p.kind for p in prompts for _ in range(per_prompt)]
    for kind, fields in GENERATOR_KINDS.items():
        rows = torch.tensor([k == kind for k in kinds], dtype=torch.bool)
        if not rows.any():
            continue
        figures[kind] = {}
        for f in fields:
            level = GENERATOR_CHANCE.get(f)
            if f == "objects":
                level = None if chance is None else chance[kind][f]["all"]["accuracy"]
            judged = rows & ~verdicts[f].isnan()
            figures[kind][f] = group_figures(verdicts[f][judged], [h for h, r in zip(heldout, judged) if r], level)
    return figures


def reader_figures(
    prompts: Sequence[Prompt], judge: AttributeJudge, resolution: int, seed: int = 0
) -> tuple[dict, dict]:
    """The scene reader on renders of the prompts' own scenes (its accuracy, the ceiling of every generator figure),
    and the prompt-blind baseline: renders of other prompts of the same kind (a seeded shuffle), read against the
    prompt; the baseline's accuracy is the chance level of a generator that draws the right kind of scene."""
    images = render_scenes([p.scene for p in prompts], resolution)
    accuracy = _field_figures(prompts, judge_prompts(prompts, images, judge), 1, None)
    order = list(range(len(prompts)))
    rng = random.Random(f"clipcond-probe/{seed}/baseline")
    for kind in GENERATOR_KINDS:
        members = [i for i, p in enumerate(prompts) if p.kind == kind]
        shuffled = members[:]
        rng.shuffle(shuffled)
        for i, j in zip(members, shuffled):
            order[i] = j
    baseline = _field_figures(prompts, judge_prompts(prompts, images[order], judge), 1, None)
    return accuracy, baseline


def generator_figures(
    prompts: Sequence[Prompt], images: torch.Tensor, judge: AttributeJudge, per_prompt: int, baseline: dict
) -> dict:
    """A generator's images (per_prompt per prompt, prompt-major) judged field by field, against the prompt-blind
    baseline as chance."""
    return _field_figures(prompts, judge_prompts(prompts, images, judge, per_prompt), per_prompt, baseline)


# ---------------------------------------------------------------- captioners


# caption(images uint8 (B, 3, H, W)) -> one caption per image.
Captioner = Callable[[torch.Tensor], list[str]]


def captioner_figures(
    caption: Captioner, pairs_by_probe: dict[str, list[MinimalPair]], resolution: int, batch_size: int = 64
) -> dict:
    """A captioner's captions of the probes' images, read back with `read_caption`: per probe, the share whose
    probed field matches the image's (chance: 1/2, a guess between the pair's two values). `caption` sees at most
    `batch_size` images a call, so its memory does not grow with the number of pairs."""
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
    figures = {}
    for probe, pairs in pairs_by_probe.items():
        if not pairs:
            continue
        images = pair_images(pairs, resolution)
        captions = [
            text for start in range(0, len(pairs), batch_size) for text in caption(images[start : start + batch_size])
        ]
        if len(captions) != len(pairs):
            raise ValueError(f"`caption` returned {len(captions)} captions for {len(pairs)} {probe} images")
        hits = torch.tensor(
            [float(states_field(probe, read_caption(text), read_caption(p.right))) for text, p in zip(captions, pairs)]
        )
        figures[probe] = group_figures(hits, [p.heldout for p in pairs], chance=0.5)
    return figures


def states_field(probe: str, said: CaptionFields, truth: CaptionFields) -> bool:
    """Whether a caption's fields state the probed field as `truth` does. A relation counts in either order of the
    objects ("a blue square left of a red circle" states "a red circle right of a blue square")."""
    if probe != "relation":
        key = PROBE_FIELD[probe]
        return said.as_dict()[key] == truth.as_dict()[key]
    if said.relation is None:
        return False
    if said.pairs == truth.pairs:
        return said.relation == truth.relation
    return said.pairs == truth.pairs[::-1] and said.relation == OPPOSITE_RELATION[truth.relation]
