"""An attribute judge for the shapes data: a small CNN that says whether an image shows one recognisable object and,
if it does, names its colour and shape.

Generated images are judged by what they show, not by a CLIP that may share the generator's blind spots. The judge
has three heads on one trunk:

- an *outcome*: "object" (exactly one object of a known shape), "blank" (no object), "several" (two or more
  objects) or "unrecognisable" (a smear, a blob without a shape, an unknown shape, a texture);
- the colour and the shape of the object, read only when the outcome is "object".

It is trained on renders at the data's resolution: one-object scenes drawn by `clipcond.data.shapes.render_scene`
(random colour, shape, size, position and a jitter wider than the data set's) for "object", and for the other
outcomes empty canvases, scenes of two or three separate objects, and objects no person would call a circle, square
or triangle (ellipses, stars, crosses, rings, irregular blobs, heavily blurred shapes, coloured noise). All of them are
corrupted the way a diffusion model's samples can be (Gaussian pixel noise, slight blur, colour jitter, a background
tint). A forced choice among 18 colour-shape classes gives a colour blob its colour and the nearest shape; this judge
calls it unrecognisable, and a one-object prompt drawn as two objects "several", and evaluations count both as wrong.
`clipcond.evaluation.judge_check` validates the judge on images it did not make: another renderer, corruptions
outside its training ranges and an untrained UNet's samples.

Training takes well under a minute on a CPU; the weights are cached as safetensors beside a small JSON (resolution,
class lists, version, training settings and the judge's own accuracy) under `default_cache_dir()`, keyed by
everything that changes them, so later evaluations load them.

    judge = load_or_train_judge(32)
    colour_idx, shape_idx, outcome_idx = judge.predict(images)  # images: uint8 (B, 3, H, W)
    judge.score(images, ["red"] * B, ["circle"] * B).accuracy()
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter
from safetensors.torch import load_file, save_file
from torch import nn

from clipcond.data.shapes import (
    BACKGROUND,
    COLOURS,
    MIN_RESOLUTION,
    POSITIONS,
    SHAPES,
    SIZES,
    SUPERSAMPLE,
    ShapeObject,
    boxes_apart,
    render_scene,
)
from clipcond.finite import finite_or_null
from clipcond.storage import dumps_json, writing

logger = logging.getLogger(__name__)

# Bump when the network, the renders or the corruptions change: cached judges of another version are not reused.
JUDGE_VERSION = 2
WEIGHTS_NAME = "judge.safetensors"
CONFIG_NAME = "judge.json"
# The network sees every image at this side (resized with antialiasing): an object is >= 7 px there, enough to tell
# a circle from a square, and the cost of training does not grow with the data's resolution.
WORKING_RESOLUTION = 32
# What an image shows. Only "object" has a colour and a shape; evaluations count every other outcome as wrong.
OUTCOMES: tuple[str, ...] = ("object", "blank", "several", "unrecognisable")
OBJECT = OUTCOMES.index("object")
# Shapes that are none of SHAPES, drawn for the "unrecognisable" outcome (with heavily blurred objects and noise).
UNKNOWN_SHAPES: tuple[str, ...] = ("ellipse", "star", "cross", "ring", "blob")
# Share of each outcome among the training renders, in a repeating cycle of 20.
_OUTCOME_CYCLE = ("object",) * 11 + ("blank",) * 2 + ("several",) * 3 + ("unrecognisable",) * 4


@dataclass(frozen=True)
class JudgeTrainingConfig:
    """How a judge is trained; every field is part of the cache key."""

    num_renders: int = 7200  # training renders: 55% one object (balanced over the colour-shape pairs), 45% others
    epochs: int = 6  # passes over the renders, each with fresh corruptions
    batch_size: int = 128
    learning_rate: float = 1e-2  # peak of AdamW's one-cycle schedule
    width: int = 16  # channels of the first conv layer (then 2x)
    num_eval_renders: int = 720  # held-out renders (another seed) for the judge's own accuracy


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/clipcond/judge`, or `~/.cache/clipcond/judge`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "clipcond" / "judge"


# ---------------------------------------------------------------- the network


class AttributeNet(nn.Module):
    """A few conv layers, pooled globally (mean and max, so a small object still counts), and three linear heads:
    colour, shape and outcome."""

    def __init__(self, num_colours: int, num_shapes: int, width: int = 16, num_outcomes: int = len(OUTCOMES)):
        super().__init__()

        def block(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
            conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
            return [conv, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

        w = width
        self.features = nn.Sequential(
            *block(3, w, stride=2),  # 32 -> 16: a strided stem keeps the cost low on a CPU
            *block(w, 2 * w),
            nn.MaxPool2d(2),  # 16 -> 8
            *block(2 * w, 4 * w),
            *block(4 * w, 4 * w),
        )
        self.colour_head = nn.Linear(8 * w, num_colours)
        self.shape_head = nn.Linear(8 * w, num_shapes)
        self.outcome_head = nn.Linear(8 * w, num_outcomes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (B, 3, 32, 32) standardised pixels -> colour (B, num_colours), shape (B, num_shapes) and outcome
        (B, num_outcomes) logits."""
        h = self.features(x)  # (B, 4w, 8, 8)
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)  # (B, 8w)
        return self.colour_head(pooled), self.shape_head(pooled), self.outcome_head(pooled)


def to_working_resolution(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (B, 3, H, W) -> uint8 (B, 3, 32, 32), resized with antialiasing (unchanged at 32 px)."""
    if images.shape[-2:] == (WORKING_RESOLUTION, WORKING_RESOLUTION):
        return images
    x = F.interpolate(
        images.float(), size=(WORKING_RESOLUTION, WORKING_RESOLUTION), mode="bilinear", antialias=True
    )  # (B, 3, 32, 32)
    return x.round().clamp(0, 255).to(torch.uint8)


def _standardise(pixels: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] -> the network's input, roughly zero-mean and unit-variance."""
    return (pixels - 0.5) / 0.25


# ---------------------------------------------------------------- renders and corruptions


def _random_object(rng: random.Random, colour: str, shape: str, centre: tuple[float, float] | None = None):
    """A `ShapeObject` of random size and scale, at a jittered anchor or (when given) at `centre` (fractions)."""
    size, scale = rng.choice(list(SIZES)), rng.uniform(0.8, 1.2)
    if centre is None:
        return ShapeObject(
            colour,
            shape,
            size,
            rng.choice(list(POSITIONS)),
            dx=rng.uniform(-0.1, 0.1),
            dy=rng.uniform(-0.1, 0.1),
            scale=scale,
        )
    ax, ay = POSITIONS["centre"]
    return ShapeObject(colour, shape, size, "centre", dx=centre[0] - ax, dy=centre[1] - ay, scale=scale)


def _several_objects(rng: random.Random, count: int) -> list[ShapeObject]:
    """`count` objects whose bounding squares keep a gap, so that they read as separate objects; half the scenes
    repeat one colour-shape pair (a one-object prompt drawn twice)."""
    colours, shapes = list(COLOURS), list(SHAPES)
    same = (rng.choice(colours), rng.choice(shapes)) if rng.random() < 0.5 else None
    while True:
        objects = []
        for _ in range(count):
            colour, shape = same or (rng.choice(colours), rng.choice(shapes))
            objects.append(_random_object(rng, colour, shape, (rng.uniform(0.15, 0.85), rng.uniform(0.15, 0.85))))
        boxes = [obj.box() for obj in objects]
        if all(boxes_apart(a, b, gap=0.04) for i, a in enumerate(boxes) for b in boxes[i + 1 :]):
            return objects


def _draw_unknown_shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[float, ...], fill, rng: random.Random):
    """Draw one of `UNKNOWN_SHAPES` into `box` (x0, y0, x1, y1 in canvas pixels)."""
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if kind == "ellipse":  # clearly not a circle: aspect 1.9-2.6, lying or standing
        a, b = r, r / rng.uniform(1.9, 2.6)
        a, b = (a, b) if rng.random() < 0.5 else (b, a)
        draw.ellipse((cx - a, cy - b, cx + a, cy + b), fill=fill)
    elif kind == "star":
        points, inner, turn = rng.choice((4, 5, 6)), rng.uniform(0.3, 0.45), rng.uniform(0, 2 * math.pi)
        vertices = [
            (cx + rr * math.cos(turn + k * math.pi / points), cy + rr * math.sin(turn + k * math.pi / points))
            for k in range(2 * points)
            for rr in [r if k % 2 == 0 else r * inner]
        ]
        draw.polygon(vertices, fill=fill)
    elif kind == "cross":
        t = r * rng.uniform(0.25, 0.4)
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    elif kind == "ring":
        hole = r * rng.uniform(0.45, 0.65)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        draw.ellipse((cx - hole, cy - hole, cx + hole, cy + hole), fill=BACKGROUND)
    else:  # blob: three overlapping discs of different sizes, a lumpy outline that is none of the shapes
        turn = rng.uniform(0, 2 * math.pi)
        for k in range(3):
            angle, rr = turn + k * 2 * math.pi / 3 + rng.uniform(-0.4, 0.4), r * rng.uniform(0.4, 0.6)
            ox, oy = cx + 0.45 * r * math.cos(angle), cy + 0.45 * r * math.sin(angle)
            draw.ellipse((ox - rr, oy - rr, ox + rr, oy + rr), fill=fill)


def _unrecognisable(rng: random.Random, resolution: int) -> Image.Image:
    """An image no person would call one circle, square or triangle of a colour."""
    kind = rng.choice((*UNKNOWN_SHAPES, "smear", "noise"))
    colour = COLOURS[rng.choice(list(COLOURS))]
    if kind == "smear":  # a known shape blurred until its outline is gone (std 2.2-3.5 px at 32 px)
        image = render_scene([_random_object(rng, rng.choice(list(COLOURS)), rng.choice(SHAPES))], resolution)
        return image.filter(ImageFilter.GaussianBlur(rng.uniform(2.2, 3.5) * resolution / WORKING_RESOLUTION))
    if kind == "noise":  # blocks of random colours over part or all of the canvas
        cells = rng.choice((4, 8, 16))
        block = np.array(rng.choices(list(COLOURS.values()) + [BACKGROUND] * 2, k=cells * cells), dtype=np.uint8)
        image = Image.fromarray(block.reshape(cells, cells, 3), "RGB")
        return image.resize((resolution, resolution), Image.Resampling.NEAREST)
    side = resolution * SUPERSAMPLE
    image = Image.new("RGB", (side, side), BACKGROUND)
    # Large only: at the small size (8 px at 32 px) a star or a blob is hard to tell from a known shape, for a person too.
    x0, y0, x1, y1 = ShapeObject(
        "red",
        "circle",
        "large",
        "centre",
        dx=rng.uniform(-0.2, 0.2),
        dy=rng.uniform(-0.2, 0.2),
        scale=rng.uniform(0.9, 1.2),
    ).box()
    _draw_unknown_shape(ImageDraw.Draw(image), kind, (x0 * side, y0 * side, x1 * side, y1 * side), colour, rng)
    return image.reduce(SUPERSAMPLE)


def render_judge_set(
    n: int, resolution: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training renders of every outcome: images uint8 (n, 3, R, R), outcome, colour and shape indices (n,) each.

    Outcomes cycle through `_OUTCOME_CYCLE`; the one-object renders cycle through the colour-shape pairs. Colour and
    shape are -1 (ignored) for every outcome but "object".
    """
    rng = random.Random(f"clipcond-judge/set/{seed}")
    pairs = [(c, s) for c in range(len(COLOURS)) for s in range(len(SHAPES))]
    images = np.empty((n, resolution, resolution, 3), dtype=np.uint8)
    outcome_idx = torch.empty(n, dtype=torch.long)
    colour_idx = torch.full((n,), -1, dtype=torch.long)
    shape_idx = torch.full((n,), -1, dtype=torch.long)
    num_objects = 0
    for i in range(n):
        outcome = _OUTCOME_CYCLE[i % len(_OUTCOME_CYCLE)]
        if outcome == "object":
            c, s = pairs[num_objects % len(pairs)]
            num_objects += 1
            image = render_scene([_random_object(rng, list(COLOURS)[c], SHAPES[s])], resolution)
            colour_idx[i], shape_idx[i] = c, s
        elif outcome == "blank":
            image = render_scene([], resolution)
        elif outcome == "several":
            image = render_scene(_several_objects(rng, rng.choice((2, 2, 3))), resolution)
        else:
            image = _unrecognisable(rng, resolution)
        images[i] = np.asarray(image)
        outcome_idx[i] = OUTCOMES.index(outcome)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), outcome_idx, colour_idx, shape_idx


def render_single_objects(
    n: int, resolution: int, seed: int, *, balanced: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ground-truth renders of one object each: images uint8 (n, 3, R, R), colour indices (n,), shape indices (n,).

    Size, position, centre shift (wider than the data set's jitter) and scale are random; colour-shape pairs cycle
    in order when `balanced`, else are random. Indices are into `COLOURS` and `SHAPES`.
    """
    rng = random.Random(f"clipcond-judge/{seed}")
    colours, shapes = list(COLOURS), list(SHAPES)
    pairs = [(c, s) for c in range(len(colours)) for s in range(len(shapes))]
    images = np.empty((n, resolution, resolution, 3), dtype=np.uint8)
    colour_idx = torch.empty(n, dtype=torch.long)
    shape_idx = torch.empty(n, dtype=torch.long)
    for i in range(n):
        c, s = pairs[i % len(pairs)] if balanced else rng.choice(pairs)
        images[i] = np.asarray(render_scene([_random_object(rng, colours[c], shapes[s])], resolution))
        colour_idx[i], shape_idx[i] = c, s
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), colour_idx, shape_idx


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur every image of x (B, C, H, W) with a Gaussian of std `sigma` pixels (separable, edges replicated)."""
    c = x.shape[1]
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-(t**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).repeat(c, 1)  # (C, k), one per channel (a depthwise conv)
    x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, kernel[:, None, None, :], groups=c)  # along width
    return F.conv2d(x, kernel[:, None, :, None], groups=c)  # along height


def corrupt(
    images: torch.Tensor,
    generator: torch.Generator,
    *,
    noise: tuple[float, float] = (0.0, 0.15),
    blur: tuple[float, float] = (0.0, 0.9),
    blur_probability: float = 0.5,
    colour_jitter: float = 0.05,
    background_tint: float = 0.08,
) -> torch.Tensor:
    """Corrupt uint8 renders (B, 3, R, R) as a diffusion model's samples can be; returns floats in [0, 1].

    Per image: a background tint (offset per channel up to `background_tint` on the background pixels), a colour
    jitter (gain 1 +- `colour_jitter` and offset +- `colour_jitter` per channel), with `blur_probability` a slight
    blur (a blend with the Gaussian blur of std `blur[1]` px at 32 px, scaled with the resolution, of weight from
    blur[0] / blur[1] to 1), and Gaussian noise of std drawn from `noise`; then clamped and quantised to 8 bits like a saved sample. The ranges keep the closest colours
    (orange and yellow, 85 apart in green) apart.
    """
    b, _, r, _ = images.shape
    x = images.float() / 255.0

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(shape, generator=generator)

    background = torch.tensor(BACKGROUND, dtype=x.dtype).view(1, 3, 1, 1) / 255.0
    is_background = ((x - background).abs().amax(dim=1, keepdim=True) < 0.02).to(x.dtype)  # (B, 1, R, R)
    x = x + is_background * uniform(-background_tint, background_tint, b, 3, 1, 1)
    x = x * uniform(1 - colour_jitter, 1 + colour_jitter, b, 3, 1, 1) + uniform(
        -colour_jitter, colour_jitter, b, 3, 1, 1
    )
    if blur[1] > 0 and blur_probability > 0:
        # A blend of the image and its blur at the strongest std: about a blur of std up to blur[1] per image,
        # at the cost of one depthwise conv for the batch.
        strength = uniform(blur[0] / blur[1], 1.0, b, 1, 1, 1)
        strength = strength * (torch.rand(b, 1, 1, 1, generator=generator) < blur_probability)
        x = x + strength * (_gaussian_blur(x, blur[1] * r / WORKING_RESOLUTION) - x)
    x = x + uniform(*noise, b, 1, 1, 1) * torch.randn(x.shape, generator=generator)
    return (x.clamp(0.0, 1.0) * 255.0).round() / 255.0


# Fixed corruptions for reporting the judge's accuracy on "noisy renders": noise std 0.1, blur std 0.7 px.
NOISY_EVAL = {"noise": (0.1, 0.1), "blur": (0.7, 0.7), "blur_probability": 1.0, "colour_jitter": 0.05}


# ---------------------------------------------------------------- the judge


@dataclass
class JudgeScores:
    """Per-image judgements of images against the colours and shapes they should show.

    An image is right only when it shows one recognisable object ("object") of the right colour / shape: blank,
    several-object and unrecognisable images are wrong in colour and in shape alike.
    """

    colour: list[str]  # judged colour of each image (meaningful only where outcome is "object")
    shape: list[str]  # judged shape of each image (idem)
    outcome: list[str]  # one of OUTCOMES per image
    colour_correct: torch.Tensor  # (B,) bool
    shape_correct: torch.Tensor  # (B,) bool

    @property
    def both_correct(self) -> torch.Tensor:
        return self.colour_correct & self.shape_correct

    @property
    def labels(self) -> list[str]:
        """What the judge saw in each image: "red circle", or the outcome ("several", "blank", ...)."""
        return [f"{c} {s}" if o == "object" else o for c, s, o in zip(self.colour, self.shape, self.outcome)]

    def accuracy(self) -> dict[str, float]:
        """{"colour_accuracy", "shape_accuracy", "both_accuracy"}: shares of images judged right."""
        return {
            "colour_accuracy": self.colour_correct.double().mean().item(),
            "shape_accuracy": self.shape_correct.double().mean().item(),
            "both_accuracy": self.both_correct.double().mean().item(),
        }

    def outcome_shares(self, mask: torch.Tensor | None = None) -> dict[str, float] | None:
        """Share of each outcome among the images selected by `mask` (all by default); None when it selects none."""
        chosen = [
            o
            for o, keep in zip(self.outcome, mask.tolist() if mask is not None else [True] * len(self.outcome))
            if keep
        ]
        return {o: chosen.count(o) / len(chosen) for o in OUTCOMES} if chosen else None

    def judged_counts(self, mask: torch.Tensor) -> dict[str, int]:
        """How often the judge saw each label in the images selected by `mask`, most frequent first."""
        judged = [label for label, keep in zip(self.labels, mask.tolist()) if keep]
        return {label: judged.count(label) for label in sorted(set(judged), key=lambda x: (-judged.count(x), x))}


class AttributeJudge:
    """A trained `AttributeNet` with its class lists: judges whether uint8 images show one object, and its colour
    and shape."""

    def __init__(
        self,
        model: AttributeNet,
        resolution: int,
        colours: Sequence[str] = tuple(COLOURS),
        shapes: Sequence[str] = SHAPES,
        info: dict | None = None,
        path: str | os.PathLike | None = None,
    ):
        self.model = model.eval()
        self.resolution = resolution  # the side of the renders it was trained on
        self.colours = list(colours)
        self.shapes = list(shapes)
        self.info = info or {}  # the cached judge.json: version, training settings, accuracy
        self.path = Path(path) if path is not None else None
        self.trained = False  # True when `load_or_train_judge` trained it rather than loading it

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def accuracy(self) -> dict:
        """The judge's own accuracy on held-out renders, clean and noisy (measured when it was trained)."""
        return dict(self.info.get("accuracy", {}))

    def summary(self) -> dict:
        """What an evaluation records about its judge: where, which version, its own accuracy, and chance."""
        return {
            "path": None if self.path is None else str(self.path),
            "resolution": self.resolution,
            "version": self.info.get("version"),
            "outcomes": list(OUTCOMES),
            **{key: value for key, value in self.accuracy.items() if key.endswith("accuracy")},
            # What guessing uniformly among the classes would score if every image were judged one object.
            "chance_colour_accuracy": 1 / len(self.colours),
            "chance_shape_accuracy": 1 / len(self.shapes),
            "chance_both_accuracy": 1 / (len(self.colours) * len(self.shapes)),
        }

    def to(self, device: torch.device | str) -> AttributeJudge:
        self.model.to(device)
        return self

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Judged colour, shape and outcome indices (B,) each (into `colours`, `shapes`, `OUTCOMES`) of uint8 images
        (B, 3, H, W)."""
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"`images` must be a uint8 tensor (B, 3, H, W), got {type(images).__name__} "
                f"{getattr(images, 'dtype', '')} {tuple(getattr(images, 'shape', ()))}"
            )
        if images.shape[1] != 3:
            raise ValueError(f"`images` must have 3 channels (B, 3, H, W), got shape {tuple(images.shape)}")
        was_training = self.model.training
        self.model.eval()
        chunks: list[tuple[torch.Tensor, ...]] = []
        try:
            for start in range(0, images.shape[0], batch_size):
                x = to_working_resolution(images[start : start + batch_size].to(self.device)).float() / 255.0
                chunks.append(tuple(logits.argmax(dim=-1).cpu() for logits in self.model(_standardise(x))))
        finally:
            self.model.train(was_training)
        if not chunks:
            return tuple(torch.empty(0, dtype=torch.long) for _ in range(3))
        return tuple(torch.cat(parts) for parts in zip(*chunks))

    def score(self, images: torch.Tensor, colours: Sequence[str | int], shapes: Sequence[str | int]) -> JudgeScores:
        """Judge images against the colour and shape each should show (names such as "red", or indices)."""
        if len(colours) != images.shape[0] or len(shapes) != images.shape[0]:
            raise ValueError(
                f"got {len(colours)} colours and {len(shapes)} shapes for {images.shape[0]} images; give one each"
            )
        target_colour = torch.tensor([self._index(c, self.colours, "colour") for c in colours], dtype=torch.long)
        target_shape = torch.tensor([self._index(s, self.shapes, "shape") for s in shapes], dtype=torch.long)
        colour_idx, shape_idx, outcome_idx = self.predict(images)
        one_object = outcome_idx == OBJECT
        return JudgeScores(
            colour=[self.colours[i] for i in colour_idx.tolist()],
            shape=[self.shapes[i] for i in shape_idx.tolist()],
            outcome=[OUTCOMES[i] for i in outcome_idx.tolist()],
            colour_correct=one_object & (colour_idx == target_colour),
            shape_correct=one_object & (shape_idx == target_shape),
        )

    @staticmethod
    def _index(value: str | int, names: list[str], what: str) -> int:
        if isinstance(value, str):
            if value not in names:
                raise ValueError(f"{what} {value!r} is not one the judge knows: {', '.join(names)}")
            return names.index(value)
        if not 0 <= int(value) < len(names):
            raise ValueError(f"{what} index {value} is outside [0, {len(names)})")
        return int(value)

    @torch.no_grad()
    def evaluate_on_renders(self, n: int, seed: int, corruption: dict | None = None) -> dict[str, float]:
        """Accuracy on `n` fresh renders of seed `seed`, clean or corrupted with `corruption`: colour, shape and both
        on one-object renders (random pairs), and "outcome_accuracy" on renders of every outcome."""
        images, colour_idx, shape_idx = render_single_objects(n, self.resolution, seed, balanced=False)
        mixed, outcome_idx, _, _ = render_judge_set(n, self.resolution, seed)
        if corruption is not None:
            generator = torch.Generator().manual_seed(seed)
            images = (corrupt(images, generator, **corruption) * 255).round().to(torch.uint8)
            mixed = (corrupt(mixed, generator, **corruption) * 255).round().to(torch.uint8)
        figures = self.score(images, colour_idx.tolist(), shape_idx.tolist()).accuracy()
        figures["outcome_accuracy"] = (self.predict(mixed)[2] == outcome_idx).double().mean().item()
        return figures


# ---------------------------------------------------------------- training and the cache


def train_judge(
    resolution: int, *, seed: int = 0, config: JudgeTrainingConfig | None = None, device: torch.device | str = "cpu"
) -> AttributeJudge:
    """Train a judge on corrupted renders at `resolution`; deterministic for a seed on a device.

    The global torch RNG is left as it was. The returned judge's `info["accuracy"]` holds its accuracy on held-out
    renders (another seed), clean and corrupted with `NOISY_EVAL`.
    """
    if not isinstance(resolution, int) or resolution < MIN_RESOLUTION:
        raise ValueError(f"resolution={resolution!r} must be an int >= {MIN_RESOLUTION}")
    config = config or JudgeTrainingConfig()
    start = time.perf_counter()
    images, outcome_idx, colour_idx, shape_idx = render_judge_set(config.num_renders, resolution, seed)
    # Corrupt at the working resolution: cheaper at 64 px and above, and noise there is no weaker than noise at
    # the native resolution after the resize that `predict` does.
    images = to_working_resolution(images)  # (N, 3, 32, 32) uint8
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AttributeNet(len(COLOURS), len(SHAPES), config.width).to(device)
    steps_per_epoch = math.ceil(config.num_renders / config.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.learning_rate, total_steps=config.epochs * steps_per_epoch, pct_start=0.2
    )
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(config.num_renders, generator=generator)
        for step in range(steps_per_epoch):
            batch = order[step * config.batch_size : (step + 1) * config.batch_size]
            x = _standardise(corrupt(images[batch], generator)).to(device)
            colour_logits, shape_logits, outcome_logits = model(x)
            loss = F.cross_entropy(outcome_logits, outcome_idx[batch].to(device))
            # Colour and shape are learnt from the one-object renders only (-1 elsewhere; a batch without one would
            # give cross_entropy's mean over no element, NaN).
            if bool((colour_idx[batch] >= 0).any()):
                loss = loss + F.cross_entropy(colour_logits, colour_idx[batch].to(device), ignore_index=-1)
                loss = loss + F.cross_entropy(shape_logits, shape_idx[batch].to(device), ignore_index=-1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    train_seconds = time.perf_counter() - start

    judge = AttributeJudge(model, resolution)
    eval_seed = seed + 1_000_003  # renders the judge never saw
    clean = judge.evaluate_on_renders(config.num_eval_renders, eval_seed)
    noisy = judge.evaluate_on_renders(config.num_eval_renders, eval_seed, NOISY_EVAL)
    judge.info = {
        **_identity(resolution, seed, config),
        "accuracy": {
            **{f"clean_{key}": value for key, value in clean.items()},
            **{f"noisy_{key}": value for key, value in noisy.items()},
            "num_eval_renders": config.num_eval_renders,
            "noisy_corruption": {key: list(v) if isinstance(v, tuple) else v for key, v in NOISY_EVAL.items()},
        },
        "train_seconds": round(train_seconds, 2),
    }
    judge.trained = True
    logger.info(
        "trained an attribute judge at %d px in %.1f s: both-correct accuracy %.3f clean, %.3f noisy; outcome "
        "accuracy %.3f clean, %.3f noisy",
        resolution,
        train_seconds,
        clean["both_accuracy"],
        noisy["both_accuracy"],
        clean["outcome_accuracy"],
        noisy["outcome_accuracy"],
    )
    return judge


def _identity(resolution: int, seed: int, config: JudgeTrainingConfig) -> dict:
    """Everything that determines a judge's weights: the cache key hashes this."""
    return {
        "version": JUDGE_VERSION,
        "resolution": resolution,
        "working_resolution": WORKING_RESOLUTION,
        "colours": {name: list(rgb) for name, rgb in COLOURS.items()},
        "shapes": list(SHAPES),
        "outcomes": list(OUTCOMES),
        "unknown_shapes": list(UNKNOWN_SHAPES),
        "background": list(BACKGROUND),
        "seed": seed,
        "training": asdict(config),
    }


def judge_cache_path(
    resolution: int, *, seed: int = 0, config: JudgeTrainingConfig | None = None, cache_dir=None
) -> Path:
    """The folder a judge of these settings is cached in (it may not exist yet)."""
    identity = _identity(resolution, seed, config or JudgeTrainingConfig())
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir or default_cache_dir()) / f"judge-v{JUDGE_VERSION}-r{resolution}-s{seed}-{digest}"


def save_judge(judge: AttributeJudge, folder: str | os.PathLike) -> Path:
    """Write `judge.safetensors` and `judge.json` to `folder` atomically: the folder appears whole or not at all."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        state = {key: value.detach().cpu().contiguous() for key, value in judge.model.state_dict().items()}
        info = {**judge.info, "colours_order": judge.colours, "shapes_order": judge.shapes}
        with writing(folder, scratch=[tmp]):
            save_file(state, tmp / WEIGHTS_NAME)
            (tmp / CONFIG_NAME).write_text(dumps_json(finite_or_null(info), indent=2) + "\n", encoding="utf-8")
        try:
            os.replace(tmp, folder)  # atomic; fails if another process finished the same folder first
        except OSError:
            if not (folder / CONFIG_NAME).is_file():
                raise
            logger.info("judge cache %s was written concurrently; keeping that one", folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    judge.path = folder
    return folder


def load_judge(folder: str | os.PathLike, device: torch.device | str = "cpu") -> AttributeJudge:
    """Load a judge written by `save_judge`."""
    folder = Path(folder)
    if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{folder} holds no attribute judge ({CONFIG_NAME} and {WEIGHTS_NAME})")
    info = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    if info.get("version") != JUDGE_VERSION:
        raise ValueError(
            f"the judge in {folder} has version {info.get('version')}, this clipcond reads {JUDGE_VERSION}"
        )
    colours = info.get("colours_order", list(info["colours"]))
    shapes = info.get("shapes_order", info["shapes"])
    model = AttributeNet(len(colours), len(shapes), info["training"]["width"])
    model.load_state_dict(load_file(folder / WEIGHTS_NAME))
    judge = AttributeJudge(model.to(device), info["resolution"], colours, shapes, info=info, path=folder)
    return judge


def load_or_train_judge(
    resolution: int,
    *,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    config: JudgeTrainingConfig | None = None,
    device: torch.device | str = "cpu",
) -> AttributeJudge:
    """The cached judge for (resolution, colours, shapes, version, seed, training settings), trained on a miss.

    `cache_dir` defaults to `default_cache_dir()`. Training runs on `device` (a CPU trains one in well under a
    minute); the judge is returned on `device`, with `.trained` telling whether it was trained now.
    """
    folder = judge_cache_path(resolution, seed=seed, config=config, cache_dir=cache_dir)
    if (folder / CONFIG_NAME).is_file():
        try:
            return load_judge(folder, device)
        except Exception as err:  # a cache: whatever broke it (safetensors raises its own error type), retrain
            logger.warning("the cached judge in %s is unreadable (%s); training a new one", folder, err)
            shutil.rmtree(folder, ignore_errors=True)
    judge = train_judge(resolution, seed=seed, config=config, device=device)
    save_judge(judge, folder)
    return judge
