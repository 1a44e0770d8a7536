"""An attribute judge for the shapes data: a small CNN that names the colour and the shape of a one-object image.

Generated images are judged by what they show, not by a CLIP that may share the generator's blind spots: the judge
is trained on ground-truth renders (`clipcond.data.shapes.render_scene`, one object of random colour, shape, size,
position and jitter) at the data's resolution, corrupted the way a diffusion model's samples can be (Gaussian pixel
noise, slight blur, small colour jitter, a mild background tint), so that a sample that is recognisably "a red
circle" to a person is judged so too. Training takes seconds on a CPU; the weights are cached as safetensors beside a
small JSON (resolution, class lists, version, training settings and the judge's own accuracy) under
`default_cache_dir()`, keyed by everything that changes them, so later evaluations load them.

    judge = load_or_train_judge(32)
    colour_idx, shape_idx = judge.predict(images)  # images: uint8 (B, 3, H, W)
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
from safetensors.torch import load_file, save_file
from torch import nn

from clipcond.data.shapes import (
    BACKGROUND,
    COLOURS,
    MIN_RESOLUTION,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapeObject,
    render_scene,
)

logger = logging.getLogger(__name__)

# Bump when the network, the renders or the corruptions change: cached judges of another version are not reused.
JUDGE_VERSION = 1
WEIGHTS_NAME = "judge.safetensors"
CONFIG_NAME = "judge.json"
# The network sees every image at this side (resized with antialiasing): an object is >= 7 px there, enough to tell
# a circle from a square, and the cost of training does not grow with the data's resolution.
WORKING_RESOLUTION = 32


@dataclass(frozen=True)
class JudgeTrainingConfig:
    """How a judge is trained; every field is part of the cache key."""

    num_renders: int = 3072  # training renders, balanced over the colour-shape pairs
    epochs: int = 5  # passes over the renders, each with fresh corruptions
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
    """A few conv layers, pooled globally (mean and max, so a small object still counts), and two linear heads."""

    def __init__(self, num_colours: int, num_shapes: int, width: int = 16):
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

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, 3, 32, 32) standardised pixels -> colour logits (B, num_colours), shape logits (B, num_shapes)."""
        h = self.features(x)  # (B, 4w, 8, 8)
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)  # (B, 8w)
        return self.colour_head(pooled), self.shape_head(pooled)


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
        obj = ShapeObject(
            colours[c],
            shapes[s],
            rng.choice(list(SIZES)),
            rng.choice(list(POSITIONS)),
            dx=rng.uniform(-0.1, 0.1),
            dy=rng.uniform(-0.1, 0.1),
            scale=rng.uniform(0.8, 1.2),
        )
        images[i] = np.asarray(render_scene([obj], resolution))
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
    """Per-image judgements of images against the colours and shapes they should show."""

    colour: list[str]  # judged colour of each image
    shape: list[str]  # judged shape of each image
    colour_correct: torch.Tensor  # (B,) bool
    shape_correct: torch.Tensor  # (B,) bool

    @property
    def both_correct(self) -> torch.Tensor:
        return self.colour_correct & self.shape_correct

    def accuracy(self) -> dict[str, float]:
        """{"colour_accuracy", "shape_accuracy", "both_accuracy"}: shares of images judged right."""
        return {
            "colour_accuracy": self.colour_correct.double().mean().item(),
            "shape_accuracy": self.shape_correct.double().mean().item(),
            "both_accuracy": self.both_correct.double().mean().item(),
        }


class AttributeJudge:
    """A trained `AttributeNet` with its class lists: judges the colour and shape of one-object uint8 images."""

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

    def to(self, device: torch.device | str) -> AttributeJudge:
        self.model.to(device)
        return self

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """Judged colour and shape indices (B,), (B,) (into `colours`, `shapes`) of uint8 images (B, 3, H, W)."""
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"`images` must be a uint8 tensor (B, 3, H, W), got {type(images).__name__} "
                f"{getattr(images, 'dtype', '')} {tuple(getattr(images, 'shape', ()))}"
            )
        if images.shape[1] != 3:
            raise ValueError(f"`images` must have 3 channels (B, 3, H, W), got shape {tuple(images.shape)}")
        was_training = self.model.training
        self.model.eval()
        colour_chunks, shape_chunks = [], []
        try:
            for start in range(0, images.shape[0], batch_size):
                x = to_working_resolution(images[start : start + batch_size].to(self.device)).float() / 255.0
                colour_logits, shape_logits = self.model(_standardise(x))
                colour_chunks.append(colour_logits.argmax(dim=-1).cpu())
                shape_chunks.append(shape_logits.argmax(dim=-1).cpu())
        finally:
            self.model.train(was_training)
        empty = torch.empty(0, dtype=torch.long, device="cpu")
        return (
            torch.cat(colour_chunks) if colour_chunks else empty,
            torch.cat(shape_chunks) if shape_chunks else empty,
        )

    def score(self, images: torch.Tensor, colours: Sequence[str | int], shapes: Sequence[str | int]) -> JudgeScores:
        """Judge images against the colour and shape each should show (names such as "red", or indices)."""
        if len(colours) != images.shape[0] or len(shapes) != images.shape[0]:
            raise ValueError(
                f"got {len(colours)} colours and {len(shapes)} shapes for {images.shape[0]} images; give one each"
            )
        target_colour = torch.tensor([self._index(c, self.colours, "colour") for c in colours], dtype=torch.long)
        target_shape = torch.tensor([self._index(s, self.shapes, "shape") for s in shapes], dtype=torch.long)
        colour_idx, shape_idx = self.predict(images)
        return JudgeScores(
            colour=[self.colours[i] for i in colour_idx.tolist()],
            shape=[self.shapes[i] for i in shape_idx.tolist()],
            colour_correct=colour_idx == target_colour,
            shape_correct=shape_idx == target_shape,
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
        """Accuracy on `n` fresh renders of seed `seed` (random pairs), clean or corrupted with `corruption`."""
        images, colour_idx, shape_idx = render_single_objects(n, self.resolution, seed, balanced=False)
        if corruption is not None:
            generator = torch.Generator().manual_seed(seed)
            images = (corrupt(images, generator, **corruption) * 255).round().to(torch.uint8)
        return self.score(images, colour_idx.tolist(), shape_idx.tolist()).accuracy()


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
    images, colour_idx, shape_idx = render_single_objects(config.num_renders, resolution, seed)
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
            colour_logits, shape_logits = model(x)
            loss = F.cross_entropy(colour_logits, colour_idx[batch].to(device)) + F.cross_entropy(
                shape_logits, shape_idx[batch].to(device)
            )
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
        "trained an attribute judge at %d px in %.1f s: both-correct accuracy %.3f clean, %.3f noisy",
        resolution,
        train_seconds,
        clean["both_accuracy"],
        noisy["both_accuracy"],
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
        save_file(state, tmp / WEIGHTS_NAME)
        info = {**judge.info, "colours_order": judge.colours, "shapes_order": judge.shapes}
        (tmp / CONFIG_NAME).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
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
