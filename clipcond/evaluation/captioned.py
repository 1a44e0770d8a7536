"""What `clipcond eval generation` measures on data other than the built-in shapes (`evaluate_captioned`): the
data's own captions as prompts, its own images as the reference, the run's CLIP as the only judge.

- `clip_score`: the mean cosine between each image's and its caption's embedding in the run's CLIP space, as on
  the shapes data (`clipcond.evaluation.generation`); `clip_score_100`: CLIPScore (Hessel et al. 2021, "CLIPScore: A
  Reference-free Evaluation Metric for Image Captioning"), w * max(cos, 0) with the weight w = 100 of torchmetrics'
  `CLIPScore` (the paper uses 2.5), for comparison with figures reported that way; the real images of the same
  captions give the level of the data itself (`clip_score_real`, `clip_score_100_real`);
- the Fréchet distance in the run's CLIP image space (`clipcond.evaluation.frechet`) between the generated images
  and the real images of the captions that prompted them, and, for scale, between as many real images of another
  split and the same reference (the distance a generator that drew real images would get at this sample size: FD is
  biased upwards for small samples);
- the same two in Inception-v3's pool3 space (FID proper: `fd_inception`, `fd_inception_floor`) when the caller
  gives Inception features (`clipcond.evaluation.inception`; the weights are a local file the user supplies);
- a grid: each caption's real image beside what the model drew for it (`caption_grid`).

The judged colour and shape figures stay for the shapes data (`clipcond.evaluation.generation`).
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from clipcond.evaluation.frechet import FeatureFn, FrechetSpaces, with_inception_keys
from clipcond.evaluation.judged import check_counts, clip_image_features, frechet_extractors
from clipcond.evaluation.sampling import (
    GenerateFn,
    check_generator,
    check_scales,
    draw_prompts,
    pipeline_generate_fn,
    pipeline_settings,
    prepared_pipeline,
    scale_key,
)
from clipcond.finite import finite_or_null
from clipcond.pipeline_loading import DEFAULT_SAMPLER
from clipcond.pipelines.inputs import DEFAULT_TEXT_GUIDANCE_SCALE
from clipcond.plots import image_grid
from clipcond.storage import save_image_atomic, write_json_atomic

logger = logging.getLogger(__name__)

CLIP_SCORE_WEIGHT = 100.0  # `clip_score_100`: torchmetrics' CLIPScore; Hessel et al. 2021 weight the cosine by 2.5
DEFAULT_MAX_PROMPTS = 64
GRID_ROWS = 16  # captions shown in a grid; every image is written as a file


def paired_cosine(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """The CLIP score of each (image, text) pair, (N,) float64: the cosine of L2-normalised features (N, D) and
    (N, D), row i with row i."""
    if image_features.shape != text_features.shape or image_features.ndim != 2:
        raise ValueError(
            f"image and text features must be paired (N, D) each, got {tuple(image_features.shape)} and "
            f"{tuple(text_features.shape)}"
        )
    return (image_features.double() * text_features.double()).sum(dim=-1)


def clip_score_100(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """CLIPScore of each (image, text) pair as torchmetrics reports it, (N,): `CLIP_SCORE_WEIGHT * max(cos, 0)`
    (Hessel et al. 2021) of the `paired_cosine`."""
    return CLIP_SCORE_WEIGHT * paired_cosine(image_features, text_features).clamp(min=0.0)


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
    CLIP score (`paired_cosine`). `generated` (P * k, 3, H, W) holds prompt p's images at p * k ... p * k + k - 1."""
    per_prompt = generated.shape[0] // len(prompts)
    shown = min(rows, len(prompts))
    tiles, labels = [], []
    for p in range(shown):
        tiles.append(_pil(real[p]))
        labels.append(f"real: {prompts[p]}")
        for k in range(per_prompt):
            i = p * per_prompt + k
            tiles.append(_pil(generated[i]))
            labels.append(f"drawn, CLIP score {scores[i].item():.3f}")
    return image_grid(tiles, rows=shown, cols=1 + per_prompt, labels=labels, max_label_lines=3)


def _pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).numpy(), "RGB")


# ---------------------------------------------------------------- the evaluation

# The figures of one guidance scale on captioned data, in the order printed.
CAPTIONED_KEYS = ("clip_score", "clip_score_100", "fd_clip", "num_images", "generation_seconds")
# The top level of the printed JSON on captioned data; then "guidance" and "settings".
CAPTIONED_HEADLINE_KEYS = (
    "guidance_scale",
    "clip_score",
    "clip_score_real",
    "clip_score_100",
    "clip_score_100_real",
    "fd_clip",
    "fd_clip_floor",
    "num_images",
)


def _check_inputs(pipe, prompts: Sequence[str], real_images: torch.Tensor, clip_run, counts: dict) -> bool:
    """Refuse empty or blank prompts, counts below 1, real images that do not pair with the prompts and a missing
    CLIP; whether `pipe` is a diffusers pipeline (else a generate callable)."""
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"`prompts` must be a non-empty list of captions, got {prompts[:3]!r}")
    check_counts(**counts)
    is_pipeline = check_generator(pipe, real_images)
    if real_images.shape[0] != len(prompts):
        raise ValueError(f"`real_images` holds {real_images.shape[0]} images for {len(prompts)} prompts")
    if clip_run is None:
        raise ValueError("`clip_run` is required: every figure on captioned data is in the CLIP's space")
    return is_pipeline


@dataclass
class _Fixed:
    """What does not depend on the guidance scale."""

    text_features: torch.Tensor  # (P, D) CLIP embeddings of the prompts
    frechet: FrechetSpaces  # the real images' features in each FD space, the FD reference
    clip_score_real: float  # the real images' CLIP score: the level of the data itself
    clip_score_100_real: float  # the same as `clip_score_100`
    fd_floor: dict[str, float | None]  # "fd_<space>_floor": the FD of the floor images to the reference
    inception: bool  # whether `fd_inception` is measured


def _fixed_figures(
    clip_run,
    prompts: list[str],
    real_images: torch.Tensor,
    floor_images: torch.Tensor | None,
    batch_size: int,
    inception: FeatureFn | None,
) -> _Fixed:
    """The prompts' and the real images' features, the real images' CLIP score and the FD floors."""
    text_features = clip_run.encode_text(prompts).cpu()  # (P, D)
    real_features = clip_image_features(clip_run, real_images, batch_size)  # (P, D)
    cosine_real = paired_cosine(real_features, text_features)
    clip_score_100_real = (CLIP_SCORE_WEIGHT * cosine_real.clamp(min=0.0)).mean().item()
    extractors = frechet_extractors(clip_run, inception, batch_size)
    frechet = FrechetSpaces(extractors, real_images, features={"clip": real_features})
    fd_floor = dict.fromkeys(with_inception_keys(("fd_clip_floor",), inception is not None))
    if floor_images is not None:
        fd_floor.update(frechet.distances(floor_images, suffix="_floor"))
    return _Fixed(
        text_features, frechet, cosine_real.mean().item(), clip_score_100_real, fd_floor, inception is not None
    )


def _measure_scale(
    generate: GenerateFn,
    guidance_scale: float,
    prompts: list[str],
    clip_run,
    fixed: _Fixed,
    *,
    per_prompt: int,
    seed: int,
    batch_size: int,
    bar,
) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Draw `per_prompt` images of every prompt at one guidance scale and measure them: (figures, images, each
    image's CLIP score)."""
    began = time.perf_counter()
    drawn = draw_prompts(generate, prompts, per_prompt, guidance_scale, seed=seed, batch_size=batch_size, bar=bar)
    seconds = time.perf_counter() - began
    features = clip_image_features(clip_run, drawn, batch_size)  # (N, D)
    prompt_of_image = torch.arange(len(prompts)).repeat_interleave(per_prompt)  # (N,)
    paired_text = fixed.text_features[prompt_of_image]
    scores = paired_cosine(features, paired_text)  # (N,)
    figures = {
        "clip_score": scores.mean().item(),
        "clip_score_100": (CLIP_SCORE_WEIGHT * scores.clamp(min=0.0)).mean().item(),
        **fixed.frechet.distances(drawn, features={"clip": features}),
        "num_images": len(drawn),
        "generation_seconds": round(seconds, 2),
    }
    return {key: figures[key] for key in with_inception_keys(CAPTIONED_KEYS, fixed.inception)}, drawn, scores


def _measure_scales(
    generate: GenerateFn, scales: list[float], prompts: list[str], clip_run, fixed: _Fixed, draw: dict, progress: bool
) -> tuple[dict[str, dict], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Figures, images and per-image CLIP scores at every guidance scale, by `scale_key`; `draw` holds
    `_measure_scale`'s per_prompt, seed and batch_size."""
    results, images, scores = {}, {}, {}
    total = len(prompts) * draw["per_prompt"] * len(scales)
    with tqdm(total=total, desc="generating", unit="img", disable=not progress, leave=False) as bar:
        for g in scales:
            key = scale_key(g)
            results[key], images[key], scores[key] = _measure_scale(
                generate, g, prompts, clip_run, fixed, **draw, bar=bar
            )
    return results, images, scores


def _headline_figures(results: dict[str, dict], headline: float, fixed: _Fixed) -> dict:
    """The top level of the figures (`CAPTIONED_HEADLINE_KEYS`): those at the headline guidance scale, the real
    images' CLIP score and the FD floor."""
    figures = {
        **results[scale_key(headline)],
        "clip_score_real": fixed.clip_score_real,
        "clip_score_100_real": fixed.clip_score_100_real,
        **fixed.fd_floor,
    }
    figures["guidance_scale"] = headline
    return {key: figures[key] for key in with_inception_keys(CAPTIONED_HEADLINE_KEYS, fixed.inception)}


def evaluate_captioned(
    pipe,
    *,
    prompts: Sequence[str],
    real_images: torch.Tensor,
    clip_run,
    floor_images: torch.Tensor | None = None,
    inception: FeatureFn | None = None,
    num_images_per_prompt: int = 1,
    guidance_scales: Sequence[float] = (1.0, DEFAULT_TEXT_GUIDANCE_SCALE),
    guidance_scale: float | None = None,
    num_inference_steps: int = 25,
    scheduler: str | None = DEFAULT_SAMPLER,
    seed: int = 0,
    batch_size: int = 32,
    output_dir: str | os.PathLike | None = None,
    extra_settings: dict | None = None,
    progress: bool = False,
) -> dict:
    """Generate images for a data set's captions at every guidance scale and measure them in the CLIP's space:
    CLIP score (the cosine), CLIPScore as torchmetrics reports it (`clip_score_100`) and the Fréchet distance to
    the real images.

    Args:
        pipe: as in `clipcond.evaluation.generation.evaluate_generation`: a diffusers text-to-image pipeline or a
            `generate` callable (`clipcond.evaluation.sampling.GenerateFn`).
        prompts: the captions (`load_caption_set`), one prompt each.
        real_images: uint8 (P, 3, H, W), image p is the real image of prompts[p]: the FD reference, and the
            real images' CLIP score (`clip_score_real`, `clip_score_100_real`) is the level of the data itself.
        clip_run: the `ClipRun` whose space the figures are in (the one the decoder was trained on).
        floor_images: uint8 real images of another split (e.g. train), for `fd_clip_floor`, their FD to the
            reference; None: not measured.
        inception: Inception-v3 pool3 features (`clipcond.evaluation.inception.load_inception`), for the FD in
            Inception's space, FID proper: `fd_inception` beside `fd_clip` and `fd_inception_floor` beside
            `fd_clip_floor`. None: not measured, and those keys are absent.
        num_images_per_prompt, guidance_scales, guidance_scale, num_inference_steps, scheduler, seed, batch_size,
            output_dir, extra_settings, progress: as in `evaluate_generation`.

    Returns:
        `{CAPTIONED_HEADLINE_KEYS at guidance_scale..., "guidance": {"<scale>": {CAPTIONED_KEYS...}},
        "settings": {...}}`. `output_dir` receives metrics.json, prompts.json, grid_guidance_<g>.png (a row per
        caption: the real image, then the drawn ones) and images/guidance_<g>/prompt_<p>_<k>.png.
    """
    start = time.perf_counter()
    # 1. check inputs
    scales, headline = check_scales(guidance_scales, guidance_scale)
    prompts = list(prompts)
    counts = {"num_images_per_prompt": num_images_per_prompt, "batch_size": batch_size}
    is_pipeline = _check_inputs(pipe, prompts, real_images, clip_run, counts)
    # 2. the prompts' and the real images' features
    fixed = _fixed_figures(clip_run, prompts, real_images, floor_images, batch_size, inception)
    # 3. generate and measure at every guidance scale
    generate = pipeline_generate_fn(pipe, num_inference_steps) if is_pipeline else pipe
    with prepared_pipeline(pipe, scheduler) if is_pipeline else nullcontext():
        draw = {"per_prompt": num_images_per_prompt, "seed": seed, "batch_size": batch_size}
        results, images, scores = _measure_scales(generate, scales, prompts, clip_run, fixed, draw, progress)
    # 4. assemble: the headline figures first, then every scale and the settings
    metrics = _headline_figures(results, headline, fixed)
    metrics["guidance"] = results
    metrics["settings"] = {
        "num_prompts": len(prompts),
        "num_images_per_prompt": num_images_per_prompt,
        "guidance_scales": scales,
        **pipeline_settings(pipe, is_pipeline, num_inference_steps, scheduler),
        "seed": seed,
        "clip": str(clip_run.path),
        "clip_score": "cos(image, caption) in the CLIP's space",
        "clip_score_100": "100 * max(cos, 0) (torchmetrics' CLIPScore; Hessel et al. 2021)",
        "num_floor_images": None if floor_images is None else int(floor_images.shape[0]),
        **(extra_settings or {}),
        "seconds": round(time.perf_counter() - start, 2),
    }
    if output_dir is not None:
        write_captioned_outputs(metrics, prompts, real_images, images, scores, num_images_per_prompt, output_dir)
    return metrics


def write_captioned_outputs(
    metrics: dict,
    prompts: list[str],
    real_images: torch.Tensor,
    images: dict[str, torch.Tensor],
    scores: dict[str, torch.Tensor],
    num_images_per_prompt: int,
    output_dir: str | os.PathLike,
) -> None:
    """metrics.json, prompts.json (prompt p is the p-th), and per guidance scale g: grid_guidance_<g>.png (a row per
    caption, `caption_grid`) and images/guidance_<g>/prompt_<p>_<k>.png (named by index: captions make poor file
    names)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for key, drawn in images.items():
        folder = output_dir / "images" / f"guidance_{key}"
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(drawn):
            p, k = divmod(i, num_images_per_prompt)
            save_image_atomic(
                Image.fromarray(image.permute(1, 2, 0).numpy(), "RGB"), folder / f"prompt_{p:04d}_{k}.png"
            )
        grid = caption_grid(prompts, real_images, drawn, scores[key])
        save_image_atomic(grid, output_dir / f"grid_guidance_{key}.png")
    write_json_atomic(output_dir / "prompts.json", prompts)
    write_json_atomic(output_dir / "metrics.json", finite_or_null(metrics))
