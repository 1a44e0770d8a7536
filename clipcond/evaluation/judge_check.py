"""The attribute judge checked on images it did not make: a second renderer, harder corruptions, an untrained model.

The judge (`clipcond.evaluation.judge`) learns from `clipcond.data.shapes.render_scene` and from corruptions in fixed
ranges, so its accuracy on its own held-out renders says little about images drawn another way. This module draws
the same classes independently of shapes.py: shapes from signed distance functions, anti-aliased by a smooth step of
random width instead of a 4x box filter, sometimes with a darker outline, slightly rotated, at sizes and positions of
other ranges than the data set's (down to 18% of the side, anywhere on the canvas), with the palette's colours off by a
few levels, on a background of varying grey. Then
it corrupts them beyond what the judge was trained on (stronger noise and blur, JPEG). Each case has the outcome a
person would give:

    one object (clean / noise 0.2 / blur 1.2 px / JPEG q30)   -> "object", with its colour and shape
    blank (noise over the background)                         -> "blank"
    two or three separate objects                             -> "several"
    an unknown shape (ellipse, plus, ring, crescent)          -> "unrecognisable"

What it does not cover: the crescent is the only unknown shape of a kind the judge never saw drawn (ellipses, rings
and crosses are in its training, drawn by another renderer), and its several-object scenes keep the objects apart,
while a generator's second object often touches the first (what the judge says of touching objects is not checked).

`check_judge(judge)` returns the share judged right per case, and `judge_untrained_samples` what the judge says of
an untrained UNet's samples (it should not call them objects). `python benchmarks/judge_quality.py` records both.
"""

from __future__ import annotations

import io
import math
import random

import numpy as np
import torch
from PIL import Image

from clipcond.data.shapes import COLOURS, SHAPES
from clipcond.evaluation.judge import OUTCOMES, AttributeJudge
from clipcond.pipelines.inputs import DEFAULT_TEXT_GUIDANCE_SCALE

# The cases of `check_judge`: (name, what is drawn, corruption, expected outcome).
CASES: tuple[tuple[str, str, str | None, str], ...] = (
    ("one object", "object", None, "object"),
    ("one object, noise 0.2", "object", "noise", "object"),
    ("one object, blur 1.2 px", "object", "blur", "object"),
    ("one object, JPEG q30", "object", "jpeg", "object"),
    ("blank", "blank", "noise", "blank"),
    ("several objects", "several", None, "several"),
    ("unknown shape", "unknown", None, "unrecognisable"),
)
UNKNOWN = ("ellipse", "plus", "ring", "crescent")


def _signed_distance(shape: str, x: np.ndarray, y: np.ndarray, cx: float, cy: float, r: float, angle: float, rng):
    """Signed distance (pixels, negative inside) of a shape of "radius" r centred at (cx, cy), rotated by `angle`."""
    cos, sin = math.cos(angle), math.sin(angle)
    u, v = (x - cx) * cos + (y - cy) * sin, -(x - cx) * sin + (y - cy) * cos  # rotated coordinates
    if shape == "circle":
        return np.hypot(u, v) - r
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) - r
    if shape == "triangle":  # equilateral, apex up: three half-planes, the largest distance
        normals = [(0.0, 1.0), (math.sqrt(3) / 2, -0.5), (-math.sqrt(3) / 2, -0.5)]
        return np.max([u * nx + v * ny for nx, ny in normals], axis=0) - r * 0.5
    if shape == "ellipse":
        return (np.hypot(u / r, v / (r / rng.uniform(2.0, 2.8))) - 1) * r / 2.4
    if shape == "plus":
        t = r * 0.33
        return np.minimum(np.maximum(np.abs(u) - r, np.abs(v) - t), np.maximum(np.abs(u) - t, np.abs(v) - r))
    if shape == "ring":
        return np.abs(np.hypot(u, v) - r * 0.75) - r * 0.25
    if shape == "crescent":
        return np.maximum(np.hypot(u, v) - r, -(np.hypot(u - r * 0.55, v) - r * 0.8))
    raise ValueError(f"unknown shape {shape!r}")


def _draw(canvas: np.ndarray, shape: str, colour: tuple[int, int, int], cx, cy, r, rng: random.Random) -> None:
    """Paint one shape onto `canvas` (R, R, 3) float, anti-aliased by a smooth step, sometimes with an outline."""
    side = canvas.shape[0]
    y, x = np.mgrid[0:side, 0:side] + 0.5
    angle = rng.uniform(-0.2, 0.2) if shape in ("square", "triangle") else rng.uniform(0, 2 * math.pi)
    distance = _signed_distance(shape, x, y, cx, cy, r, angle, rng)
    width = rng.uniform(0.5, 1.5)  # anti-aliasing width in pixels
    fill = np.array([min(255, max(0, v + rng.randint(-12, 12))) for v in colour], dtype=np.float64)
    coverage = np.clip(0.5 - distance / width, 0.0, 1.0)[..., None]
    canvas[:] = canvas * (1 - coverage) + fill * coverage
    if rng.random() < 0.4:  # a darker outline of 0.7-1.2 px
        stroke = rng.uniform(0.7, 1.2)
        edge = np.clip(0.5 - (np.abs(distance) - stroke / 2) / width, 0.0, 1.0)[..., None]
        canvas[:] = canvas * (1 - edge) + fill * 0.6 * edge


def _place(rng: random.Random, count: int, side: int) -> list[tuple[float, float, float]]:
    """`count` (cx, cy, r) in pixels: sides 18-50% of the image (one object) or 15-30% (several), kept apart."""
    while True:
        sizes = [rng.uniform(0.09, 0.25) if count == 1 else rng.uniform(0.075, 0.15) for _ in range(count)]
        spots = [(rng.uniform(r + 0.02, 1 - r - 0.02), rng.uniform(r + 0.02, 1 - r - 0.02), r) for r in sizes]
        if all(
            math.hypot(a[0] - b[0], a[1] - b[1]) > (a[2] + b[2]) * 1.5 + 0.04
            for i, a in enumerate(spots)
            for b in spots[i + 1 :]
        ):
            return [(cx * side, cy * side, r * side) for cx, cy, r in spots]


def _corrupt(image: np.ndarray, kind: str | None, rng: random.Random) -> np.ndarray:
    """Corruptions beyond the judge's training ranges (noise std <= 0.15, blur std <= 0.9 px at 32 px, no JPEG)."""
    side = image.shape[0]
    if kind == "noise":
        generator = np.random.default_rng(rng.randrange(2**32))
        image = image + generator.normal(0.0, 0.2 * 255, image.shape)
    elif kind == "blur":
        from PIL import ImageFilter

        pil = Image.fromarray(np.clip(image, 0, 255).round().astype(np.uint8), "RGB")
        image = np.asarray(pil.filter(ImageFilter.GaussianBlur(1.2 * side / 32)), dtype=np.float64)
    elif kind == "jpeg":
        buffer = io.BytesIO()
        Image.fromarray(np.clip(image, 0, 255).round().astype(np.uint8), "RGB").save(buffer, "JPEG", quality=30)
        image = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"), dtype=np.float64)
    return np.clip(image, 0, 255).round().astype(np.uint8)


def render_case(what: str, corruption: str | None, n: int, resolution: int, seed: int):
    """n images uint8 (n, 3, R, R) of one case, with the colour and shape names of each (None but for "object")."""
    rng = random.Random(f"clipcond-judge-check/{what}/{corruption}/{seed}")
    images, colours, shapes = [], [], []
    for i in range(n):
        grey = rng.uniform(225, 252)
        canvas = np.empty((resolution, resolution, 3))
        canvas[:] = [grey + rng.uniform(-6, 6) for _ in range(3)]
        colour = shape = None
        if what == "object":
            colour, shape = list(COLOURS)[i % len(COLOURS)], SHAPES[(i // len(COLOURS)) % len(SHAPES)]
            _draw(canvas, shape, COLOURS[colour], *_place(rng, 1, resolution)[0], rng)
        elif what == "several":
            for spot in _place(rng, rng.choice((2, 3)), resolution):
                _draw(canvas, rng.choice(SHAPES), COLOURS[rng.choice(list(COLOURS))], *spot, rng)
        elif what == "unknown":
            cx, cy, r = _place(rng, 1, resolution)[0]
            _draw(
                canvas, rng.choice(UNKNOWN), COLOURS[rng.choice(list(COLOURS))], cx, cy, max(r, resolution * 0.16), rng
            )
        images.append(_corrupt(canvas, corruption, rng))
        colours.append(colour)
        shapes.append(shape)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), colours, shapes


def judge_images(judge: AttributeJudge, images: torch.Tensor, expected: str, colours=None, shapes=None) -> dict:
    """{"right": share judged as expected (for "object": one object of the right colour and shape), "outcomes":
    share of each outcome, "num_images"}."""
    colour_idx, shape_idx, outcome_idx = judge.predict(images)
    outcomes = [OUTCOMES[i] for i in outcome_idx.tolist()]
    right = [o == expected for o in outcomes]
    if expected == "object" and colours is not None:
        right = [
            ok and judge.colours[c] == colour and judge.shapes[s] == shape
            for ok, c, s, colour, shape in zip(right, colour_idx.tolist(), shape_idx.tolist(), colours, shapes)
        ]
    n = max(1, len(outcomes))
    return {
        "right": sum(right) / n,
        "outcomes": {o: outcomes.count(o) / n for o in OUTCOMES},
        "num_images": len(outcomes),
    }


def check_judge(judge: AttributeJudge, n: int = 180, seed: int = 0) -> dict[str, dict]:
    """The judge on `n` independent renders of every case in `CASES`, at its resolution: {case: judge_images(...)}."""
    results = {}
    for name, what, corruption, expected in CASES:
        images, colours, shapes = render_case(what, corruption, n, judge.resolution, seed)
        results[name] = {"expected": expected, **judge_images(judge, images, expected, colours, shapes)}
    return results


@torch.no_grad()
def untrained_unet_samples(
    pipe, n: int, seed: int = 0, num_inference_steps: int = 20, guidance_scale: float = DEFAULT_TEXT_GUIDANCE_SCALE
):
    """n samples uint8 (n, 3, R, R) of `pipe` with its UNet re-initialised at random (seeded): what a model that
    learnt nothing draws, for every colour-shape prompt in turn. `pipe`'s own UNet is put back afterwards."""
    from clipcond.evaluation.sampling import pipeline_generate_fn

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the initialisation, drawn on the CPU whatever the device
        unet = type(pipe.unet).from_config(pipe.unet.config).to(pipe.unet.device, pipe.unet.dtype)
    original, pipe.unet = pipe.unet, unet
    try:
        generate = pipeline_generate_fn(pipe, num_inference_steps)
        prompts = [f"a {colour} {shape}" for colour in COLOURS for shape in SHAPES]
        chunks = []
        for start in range(0, n, len(prompts)):
            batch = [prompts[k % len(prompts)] for k in range(start, min(n, start + len(prompts)))]
            generators = [torch.Generator("cpu").manual_seed(seed * 100_003 + start + k) for k in range(len(batch))]
            chunks.append(generate(batch, guidance_scale, generators).cpu())
    finally:
        pipe.unet = original
    return torch.cat(chunks)
