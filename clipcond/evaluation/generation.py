"""`clipcond eval generation`: does a generator draw what it is asked for? Judged on the shapes data.

    clipcond eval generation --model runs/decoder --data data/shapes [--num-images-per-prompt 8] [--guidance-scales 1,3]

For every one-object colour-shape class of the data ("a red circle", ...) it generates `--num-images-per-prompt`
images, each from its own seeded generator, at each guidance scale, and reports:

- colour, shape and both-correct accuracy as judged by an attribute classifier trained on ground-truth renders
  (`clipcond.evaluation.judge`), overall, for the seen compositions and for the held-out ones (dataset_info.json
  "held_out": pairs the decoder and the CLIP never saw in training), and per class;
- CLIP score: the mean cosine between each image's and its prompt's embedding under the trained CLIP (raw cosine,
  not the 100 x max(cos, 0) scaling of Hessel et al. 2021), and `clip_top1`, how often the image is nearer its own
  prompt than any other class's prompt;
- `fd_clip`: the Fréchet distance (Heusel et al. 2017, FID's formula) between CLIP image features of the generated
  images and of the reference images (the single-object images of the test split), and `fd_clip_floor`, the same
  distance for as many fresh ground-truth renders of the same prompts: the value a perfect generator would get at
  this sample size, since FD is biased upwards for small samples.

It prints ONE JSON object: the headline figures at the default guidance scale at the top level (`HEADLINE_KEYS`),
the same figures for every guidance scale under "guidance" ({"1.0": {...}, "3.0": {...}}), and "judge" and
"settings". `--output-dir` (default RUN/eval_generation/) receives it as metrics.json, a labelled grid per guidance
scale (a row per prompt; frames: green right, orange half right, red wrong), a colour x shape accuracy heatmap per
guidance scale and every image under images/guidance_<g>/.

`evaluate_generation` is the evaluation as a function, generic over a `generate(prompts, guidance_scale,
generators) -> uint8 images` callable, so the DALL-E 2 path (prior + decoder, image variations) reuses it; it also
takes a diffusers pipeline with the standard arguments directly.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import random
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from clipcond.data.open import add_allow_outside_paths
from clipcond.data.shapes import class_names, load_dataset_info, parse_held_out, render_scene, sample_scene
from clipcond.device import DTYPES, dtype_name, resolve_dtype
from clipcond.evaluation.diversity import diversity
from clipcond.evaluation.judge import AttributeJudge, load_or_train_judge
from clipcond.evaluation.plots import heatmap_png, image_grid
from clipcond.finite import finite_float, finite_or_null, is_finite_number
from clipcond.pipeline_loading import load_pretrained, scheduler_name
from clipcond.pipelines.inputs import DEFAULT_TEXT_GUIDANCE_SCALE
from clipcond.runs import RUN_RECORD, RunRecord
from clipcond.storage import check_output_dir, dumps_json, write_json_atomic

logger = logging.getLogger(__name__)

# generate(prompts, guidance_scale, generators) -> uint8 images (len(prompts), 3, H, W); generators[i] draws image i.
GenerateFn = Callable[[list[str], float, list[torch.Generator]], torch.Tensor]

DEFAULT_PROMPT_TEMPLATE = "a {colour} {shape}"
DEFAULT_GUIDANCE_SCALE = DEFAULT_TEXT_GUIDANCE_SCALE  # `clipcond generate`'s default for a text-to-image decoder
GROUPS = ("", "_seen", "_heldout")  # all classes, seen compositions, held-out compositions
# The figures of one guidance scale, in the order printed (then "per_class").
GROUP_KEYS = (
    *(f"{metric}{group}" for group in GROUPS for metric in ("colour_accuracy", "shape_accuracy", "both_accuracy")),
    *(f"clip_score{group}" for group in GROUPS),
    "clip_top1",
    "fd_clip",
    "num_images",
    "generation_seconds",
)
# The top level of the printed JSON: the figures at the default guidance scale, then "guidance", "judge", "settings".
HEADLINE_KEYS = ("guidance_scale", *GROUP_KEYS[:-1], "fd_clip_floor")
_FRAME = {2: (40, 170, 60), 1: (250, 150, 30), 0: (220, 30, 30)}  # grid frame colour by number of attributes right


# ---------------------------------------------------------------- Fréchet distance


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) for Gaussians N(mu1, S1), N(mu2, S2) (Dowson & Landau 1982).

    Tr((S1 S2)^(1/2)) is computed as Tr((S1^(1/2) S2 S1^(1/2))^(1/2)): the same eigenvalues, but of a symmetric
    positive semi-definite matrix, so two `eigh` calls in float64 give it without scipy's `sqrtm` and without the
    complex round-off that the eigenvalues of the non-symmetric S1 S2 would have.
    """
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"mismatched statistics: means {mu1.shape} and {mu2.shape}, covariances {sigma1.shape} and {sigma2.shape}"
        )
    values, vectors = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    sqrt_sigma1 = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
    middle = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    distance = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt
    return float(max(distance, 0.0))  # round-off can leave -1e-12 for identical statistics


def frechet_distance(features1, features2) -> float:
    """Fréchet distance between the Gaussians fitted to two sets of features (N1, D) and (N2, D), N >= 2 each
    (means and unbiased covariances, as pytorch-fid does)."""
    stats = []
    for name, features in (("features1", features1), ("features2", features2)):
        if isinstance(features, torch.Tensor):
            features = features.detach().cpu().double().numpy()
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[0] < 2:
            raise ValueError(f"`{name}` must be (N, D) with N >= 2 to fit a covariance, got shape {features.shape}")
        stats.append((features.mean(axis=0), np.cov(features, rowvar=False)))
    if stats[0][0].shape != stats[1][0].shape:
        raise ValueError(f"the two feature sets have widths {stats[0][0].size} and {stats[1][0].size}")
    return frechet_distance_from_stats(*stats[0], *stats[1])


# ---------------------------------------------------------------- generators


def image_seed(seed: int, prompt: str, index: int) -> int:
    """The seed of the `index`-th image of `prompt`: the same at every guidance scale and whatever else is evaluated,
    so that figures at two guidance scales compare the same initial noise."""
    digest = hashlib.sha256(f"clipcond-eval-generation/{seed}/{prompt}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def to_uint8_images(images) -> torch.Tensor:
    """A pipeline's images ("pt" float (B, 3, H, W) or "np" float (B, H, W, 3) in [0, 1], PIL list, or uint8) as a
    uint8 tensor (B, 3, H, W) on the CPU."""
    if isinstance(images, (list, tuple)) and images and isinstance(images[0], Image.Image):
        images = np.stack([np.asarray(image.convert("RGB")) for image in images])  # (B, H, W, 3) uint8
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
        if images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
            images = images.permute(0, 3, 1, 2)
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError(f"expected images (B, 3, H, W), got {type(images).__name__} {getattr(images, 'shape', '')}")
    images = images.detach().cpu()
    if images.is_floating_point():
        images = (images.float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    if images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 or float images, got {images.dtype}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images.contiguous()


def pipeline_generate_fn(pipe, num_inference_steps: int) -> GenerateFn:
    """A `GenerateFn` over a diffusers text-to-image pipeline with the standard argument names."""

    def generate(prompts: list[str], guidance_scale: float, generators: list[torch.Generator]) -> torch.Tensor:
        output = pipe(
            prompt=list(prompts),
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            num_images_per_prompt=1,
            generator=list(generators),
            output_type="pt",
        )
        return to_uint8_images(output.images)

    return generate


@contextmanager
def _prepared_pipeline(pipe, scheduler: str | None) -> Iterator[None]:
    """The pipeline with `scheduler` swapped in and its progress bar off; both restored afterwards."""
    previous_scheduler = pipe.scheduler
    previous_bar = dict(getattr(pipe, "_progress_bar_config", {}))
    if scheduler is not None:
        from clipcond.pipelines.text_to_image import scheduler_from_name

        pipe.scheduler = scheduler_from_name(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    try:
        yield
    finally:
        pipe.scheduler = previous_scheduler
        pipe._progress_bar_config = previous_bar


def _is_pipeline(obj) -> bool:
    if "diffusers" not in sys.modules:  # then obj cannot be a pipeline; importing diffusers costs seconds
        return False
    from diffusers import DiffusionPipeline

    return isinstance(obj, DiffusionPipeline)


# ---------------------------------------------------------------- evaluation


def _check_classes(classes: Sequence[str], held_out: Sequence[str], judge: AttributeJudge) -> list[tuple[str, str]]:
    if isinstance(classes, str) or not classes:
        raise ValueError(f"`classes` must be a non-empty list of 'colour shape' names, got {classes!r}")
    pairs = []
    for name in classes:
        words = str(name).split()
        if len(words) != 2 or words[0] not in judge.colours or words[1] not in judge.shapes:
            raise ValueError(
                f"class {name!r} is not '<colour> <shape>' with a colour in {', '.join(judge.colours)} and a shape "
                f"in {', '.join(judge.shapes)}; this evaluation judges the one-object classes of the shapes data"
            )
        pairs.append((words[0], words[1]))
    if len(set(pairs)) != len(pairs):
        raise ValueError(f"`classes` holds duplicates: {list(classes)}")
    names = {f"{c} {s}" for c, s in pairs}
    unknown = [pair for pair in held_out if pair not in names]
    if unknown:
        raise ValueError(f"held-out pairs {unknown} are not among the classes {sorted(names)}")
    return pairs


def _check_template(template: str) -> None:
    try:
        prompt = template.format(colour="red", shape="circle")
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(
            f"`prompt_template` {template!r} must use only the fields {{colour}} and {{shape}} ({err!r})"
        ) from None
    if "red" not in prompt or "circle" not in prompt:
        raise ValueError(f"`prompt_template` {template!r} must contain both {{colour}} and {{shape}}")


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> uint8 (B, 3, size, size), antialiased; unchanged when already that size."""
    if images.shape[-2:] == (size, size):
        return images
    x = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)


def clip_image_features(clip_run, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """L2-normalised CLIP features (N, D) of uint8 images, resized to the CLIP's input size if needed."""
    chunks = [
        clip_run.encode_images(_resize(images[start : start + batch_size], clip_run.image_size)).cpu()
        for start in range(0, images.shape[0], batch_size)
    ]
    return torch.cat(chunks)


def ground_truth_renders(pairs: Sequence[tuple[str, str]], per_pair: int, resolution: int, seed: int) -> torch.Tensor:
    """Renders uint8 (len(pairs) * per_pair, 3, R, R) of each pair, drawn as the data set draws a single object."""
    images = []
    for colour, shape in pairs:
        for k in range(per_pair):
            rng = random.Random(f"clipcond-eval-generation/renders/{seed}/{colour} {shape}/{k}")
            scene = sample_scene("single", [f"{colour} {shape}"], rng, pair=f"{colour} {shape}")
            images.append(np.asarray(render_scene(scene, resolution)))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def _mean_or_none(values: torch.Tensor, mask: torch.Tensor) -> float | None:
    return values[mask].double().mean().item() if bool(mask.any()) else None


def _figures(
    colour_ok: torch.Tensor,
    shape_ok: torch.Tensor,
    clip_score: torch.Tensor | None,
    groups: dict[str, torch.Tensor],
) -> dict:
    """Accuracies (and CLIP score) of the images selected by each group mask, keyed "<metric><group>"."""
    figures = {}
    for group, mask in groups.items():
        figures[f"colour_accuracy{group}"] = _mean_or_none(colour_ok, mask)
        figures[f"shape_accuracy{group}"] = _mean_or_none(shape_ok, mask)
        figures[f"both_accuracy{group}"] = _mean_or_none(colour_ok & shape_ok, mask)
    for group, mask in groups.items():
        figures[f"clip_score{group}"] = None if clip_score is None else _mean_or_none(clip_score, mask)
    return figures


def _scale_key(guidance_scale: float) -> str:
    return str(float(guidance_scale))


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "prompt"


def image_file(output_dir: str | os.PathLike, guidance_scale: float, prompt: str, index: int) -> Path:
    """Where an evaluation written to `output_dir` saved image `index` of `prompt` at `guidance_scale`; it was drawn
    from a generator seeded `image_seed(seed, prompt, index)`."""
    return Path(output_dir) / "images" / f"guidance_{_scale_key(guidance_scale)}" / f"{_slug(prompt)}_{index}.png"


def evaluate_generation(
    pipe,
    *,
    classes: Sequence[str],
    held_out: Sequence[str] | str | None = None,
    judge: AttributeJudge,
    clip_run=None,
    reference_images: torch.Tensor | None = None,
    num_images_per_prompt: int = 8,
    guidance_scales: Sequence[float] = (1.0, DEFAULT_GUIDANCE_SCALE),
    guidance_scale: float | None = None,
    num_inference_steps: int = 25,
    scheduler: str | None = "dpm",
    seed: int = 0,
    batch_size: int = 32,
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
    output_dir: str | os.PathLike | None = None,
    extra_settings: dict | None = None,
    progress: bool = False,
) -> dict:
    """Generate images for every class's prompt at every guidance scale, judge them, and return the figures.

    Args:
        pipe: a diffusers text-to-image pipeline (`TextToImagePipeline`), called with `prompt`,
            `num_inference_steps`, `guidance_scale`, `generator` (one per image) and `output_type="pt"`; or any
            `generate(prompts, guidance_scale, generators) -> uint8 (B, 3, H, W)` callable, for which
            `num_inference_steps` and `scheduler` are not used.
        classes: "colour shape" names (`clipcond.data.shapes.class_names(info)`); each gives one prompt.
        held_out: the held-out pairs among `classes` (dataset_info["held_out"]); figures "_heldout" cover them,
            "_seen" the rest. None: all classes are seen.
        judge: the attribute judge (`load_or_train_judge(resolution)`).
        clip_run: a `ClipRun` for CLIP score and FD; None skips them (their figures are None).
        reference_images: uint8 (N, 3, H, W) real images for the Fréchet distance (None: no FD).
        guidance_scales: the scales to evaluate, each >= 1 (1: no guidance). `guidance_scale` (default: the last
            of them) gives the headline figures and is added to the list if missing.
        scheduler: a `SCHEDULERS` name swapped into `pipe` for the evaluation (None: the pipeline's own); the
            pipeline's scheduler is restored afterwards.
        seed: image k of a prompt is drawn from a CPU generator seeded with `image_seed(seed, prompt, k)`: the same
            noise at every guidance scale.
        batch_size: images per call of the generator.
        output_dir: when given, write metrics.json, the grids, the heatmaps and the images there.
        extra_settings: more entries for "settings" (the CLI records the run and data folders).
        progress: a tqdm bar on stderr.

    Returns:
        `{HEADLINE_KEYS at guidance_scale..., "guidance": {"<scale>": {GROUP_KEYS..., "per_class": {...}}},
        "judge": {...}, "settings": {...}}`; a figure over no image (e.g. no held-out class) is None.
    """
    start = time.perf_counter()
    # 1. check inputs
    held = list(parse_held_out(held_out))
    pairs = _check_classes(classes, held, judge)
    _check_template(prompt_template)
    scales = [float(g) for g in guidance_scales]
    headline = float(guidance_scale) if guidance_scale is not None else (scales[-1] if scales else None)
    if headline is None:
        raise ValueError("`guidance_scales` is empty and no `guidance_scale` was given")
    if headline not in scales:
        scales.append(headline)
    scales = list(dict.fromkeys(scales))
    for g in scales:
        if not (is_finite_number(g) and g >= 1.0):
            raise ValueError(f"guidance scales must be finite numbers >= 1 (1: no guidance), got {g}")
    for name, value in (("num_images_per_prompt", num_images_per_prompt), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}")
    if reference_images is not None and (reference_images.dtype != torch.uint8 or reference_images.ndim != 4):
        raise ValueError(
            f"`reference_images` must be uint8 (N, 3, H, W), got {reference_images.dtype} {tuple(reference_images.shape)}"
        )
    is_pipeline = _is_pipeline(pipe)
    if not is_pipeline and not callable(pipe):
        raise ValueError(f"`pipe` must be a diffusers pipeline or a generate callable, got {type(pipe).__name__}")

    # 2. the prompts, one generator seed per image, and the per-image class and group
    names = [f"{c} {s}" for c, s in pairs]
    prompts = [prompt_template.format(colour=c, shape=s) for c, s in pairs]
    jobs = [(p, k) for p in range(len(prompts)) for k in range(num_images_per_prompt)]  # prompt by prompt
    image_class = torch.tensor([p for p, _ in jobs])
    is_heldout = torch.tensor([names[p] in held for p, _ in jobs], dtype=torch.bool)
    groups = {"": torch.ones(len(jobs), dtype=torch.bool), "_seen": ~is_heldout, "_heldout": is_heldout}

    # 3. what does not depend on the guidance scale: prompt embeddings, reference features, the FD floor, and the
    # diversity of real images of each class (renders drawn as the data set draws them, in the jobs' order)
    text_features = reference_features = render_features = None
    fd_floor = None
    renders = ground_truth_renders(pairs, num_images_per_prompt, judge.resolution, seed)
    prompt_rows = [range(p * num_images_per_prompt, (p + 1) * num_images_per_prompt) for p in range(len(prompts))]
    if clip_run is not None:
        text_features = clip_run.encode_text(prompts).cpu()  # (P, D)
        render_features = clip_image_features(clip_run, renders, batch_size)
        if reference_images is not None and len(jobs) >= 2:  # FD needs >= 2 images to fit a covariance
            reference_features = clip_image_features(clip_run, reference_images, batch_size)
            fd_floor = frechet_distance(render_features, reference_features)
    real_diversity = diversity(renders, prompt_rows, render_features)

    # 4. generate and judge at every guidance scale
    generate = pipeline_generate_fn(pipe, num_inference_steps) if is_pipeline else pipe
    results: dict[str, dict] = {}
    all_images: dict[str, torch.Tensor] = {}
    all_scores: dict[str, object] = {}
    bar = tqdm(total=len(jobs) * len(scales), desc="generating", unit="img", disable=not progress, leave=False)
    with _prepared_pipeline(pipe, scheduler) if is_pipeline else _nothing():
        for g in scales:
            began = time.perf_counter()
            images = _generate_all(generate, prompts, jobs, g, seed, batch_size, bar)  # (N, 3, H, W) uint8
            seconds = time.perf_counter() - began
            scores = judge.score(images, [pairs[p][0] for p, _ in jobs], [pairs[p][1] for p, _ in jobs])

            clip_score = image_features = None
            figures_extra = {"clip_top1": None, "fd_clip": None}
            if clip_run is not None:
                image_features = clip_image_features(clip_run, images, batch_size)  # (N, D)
                similarity = image_features @ text_features.T  # (N, P) cosines
                clip_score = similarity[torch.arange(len(jobs)), image_class]
                figures_extra["clip_top1"] = (similarity.argmax(dim=1) == image_class).double().mean().item()
                if reference_features is not None:
                    figures_extra["fd_clip"] = frechet_distance(image_features, reference_features)

            figures = _figures(scores.colour_correct, scores.shape_correct, clip_score, groups)
            figures.update(figures_extra, num_images=len(jobs), generation_seconds=round(seconds, 2))
            figures = {key: figures[key] for key in GROUP_KEYS}
            figures["per_class"] = _per_class(names, held, image_class, scores, clip_score)
            figures["diversity"] = {
                **diversity(images, prompt_rows, image_features),
                **{f"{key}_real": value for key, value in real_diversity.items()},
            }
            figures["outcomes"] = {
                group.lstrip("_") or "all": scores.outcome_shares(mask) for group, mask in groups.items()
            }
            results[_scale_key(g)] = figures
            all_images[_scale_key(g)] = images
            all_scores[_scale_key(g)] = scores
    bar.close()

    # 5. assemble: the headline figures first, then every scale, the judge and the settings
    top = results[_scale_key(headline)]
    metrics = {"guidance_scale": headline, **{key: top[key] for key in GROUP_KEYS[:-1]}, "fd_clip_floor": fd_floor}
    metrics = {key: metrics[key] for key in HEADLINE_KEYS}
    metrics["guidance"] = results
    metrics["judge"] = judge.summary()
    metrics["settings"] = {
        "classes": names,
        "held_out": held,
        "prompt_template": prompt_template,
        "num_images_per_prompt": num_images_per_prompt,
        "guidance_scales": scales,
        "num_inference_steps": num_inference_steps if is_pipeline else None,
        "scheduler": (scheduler or scheduler_name(pipe.scheduler)) if is_pipeline else None,
        "dtype": dtype_name(pipe.unet.dtype) if is_pipeline else None,
        "seed": seed,
        "clip": None if clip_run is None else str(clip_run.path),
        "num_reference_images": None if reference_images is None else int(reference_images.shape[0]),
        **(extra_settings or {}),
        "seconds": round(time.perf_counter() - start, 2),
    }
    if output_dir is not None:
        write_outputs(metrics, all_images, all_scores, prompts, num_images_per_prompt, output_dir)
    return metrics


def check_image_batch(images, expected: int, what: str, per: str) -> None:
    """Refuse anything but `expected` uint8 images (expected, 3, H, W) from `what` (a generate/vary callable)."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(
            f"{what} must return uint8 images (B, 3, H, W), got {type(images).__name__} "
            f"{getattr(images, 'dtype', '')} {tuple(getattr(images, 'shape', ()))}"
        )
    if images.shape[0] != expected or images.shape[1] != 3:
        raise ValueError(
            f"{what} returned images of shape {tuple(images.shape)} for {per}; expected ({expected}, 3, H, W)"
        )


def _generate_all(
    generate: GenerateFn,
    prompts: list[str],
    jobs: list[tuple[int, int]],
    guidance_scale: float,
    seed: int,
    batch_size: int,
    bar,
) -> torch.Tensor:
    """Images uint8 (len(jobs), 3, H, W) for the (prompt index, image index) jobs, in batches, checked."""
    chunks = []
    for first in range(0, len(jobs), batch_size):
        batch = jobs[first : first + batch_size]
        generators = [torch.Generator("cpu").manual_seed(image_seed(seed, prompts[p], k)) for p, k in batch]
        images = generate([prompts[p] for p, _ in batch], guidance_scale, generators)
        check_image_batch(images, len(batch), "the generator", f"{len(batch)} prompts")
        chunks.append(images.cpu())
        bar.update(len(batch))
    return torch.cat(chunks)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _per_class(names: list[str], held: list[str], image_class: torch.Tensor, scores, clip_score) -> dict:
    per_class = {}
    for p, name in enumerate(names):
        mask = image_class == p
        per_class[name] = {
            "heldout": name in held,
            "colour_accuracy": _mean_or_none(scores.colour_correct, mask),
            "shape_accuracy": _mean_or_none(scores.shape_correct, mask),
            "both_accuracy": _mean_or_none(scores.both_correct, mask),
            "clip_score": None if clip_score is None else _mean_or_none(clip_score, mask),
            "judged": scores.judged_counts(mask),  # what the judge saw in this class's images, most frequent first
        }
    return per_class


# ---------------------------------------------------------------- outputs


def _framed(image: torch.Tensor, colour: tuple[int, int, int], width: int = 2) -> Image.Image:
    array = image.permute(1, 2, 0).numpy()  # (H, W, 3)
    framed = np.empty((array.shape[0] + 2 * width, array.shape[1] + 2 * width, 3), dtype=np.uint8)
    framed[:] = colour
    framed[width:-width, width:-width] = array
    return Image.fromarray(framed, "RGB")


def write_outputs(
    metrics: dict,
    images: dict[str, torch.Tensor],
    scores: dict,
    prompts: list[str],
    num_images_per_prompt: int,
    output_dir: str | os.PathLike,
) -> list[Path]:
    """metrics.json; per guidance scale g: grid_guidance_<g>.png (a row per prompt, each image labelled with what
    the judge saw and framed green / orange / red for 2 / 1 / 0 attributes right), accuracy_guidance_<g>.png
    (both-correct accuracy, colour x shape; the row labels name the held-out pairs) and images/guidance_<g>/<prompt>_<k>.png."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    names = metrics["settings"]["classes"]
    held = set(metrics["settings"]["held_out"])
    for key, batch in images.items():
        score = scores[key]
        tiles, labels = [], []
        judged_labels = score.labels  # built once: a property over every image
        for i, image in enumerate(batch):
            prompt = prompts[i // num_images_per_prompt]
            right = int(score.colour_correct[i]) + int(score.shape_correct[i])
            judged = judged_labels[i]
            labels.append(f"{prompt}: {judged}" if right == 2 else f"{prompt}: WRONG {judged}")
            tiles.append(_framed(image, _FRAME[right]))
            path = image_file(output_dir, float(key), prompt, i % num_images_per_prompt)
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy(), "RGB").save(path, format="PNG")
        grid = image_grid(tiles, rows=len(prompts), cols=num_images_per_prompt, labels=labels, max_label_lines=3)
        paths.append(output_dir / f"grid_guidance_{key}.png")
        grid.save(paths[-1], format="PNG")

        colours = list(dict.fromkeys(name.split()[0] for name in names))
        shapes = list(dict.fromkeys(name.split()[1] for name in names))
        matrix = np.full((len(colours), len(shapes)), np.nan)
        for name, figures in metrics["guidance"][key]["per_class"].items():
            colour, shape = name.split()
            matrix[colours.index(colour), shapes.index(shape)] = figures["both_accuracy"]
        row_labels = []
        for colour in colours:
            held_shapes = [shape for shape in shapes if f"{colour} {shape}" in held]
            row_labels.append(f"{colour} (held out: {', '.join(held_shapes)})" if held_shapes else colour)
        paths.append(
            heatmap_png(
                matrix,
                row_labels,
                shapes,
                output_dir / f"accuracy_guidance_{key}.png",
                f"judged both-correct accuracy, guidance {key}",
                vmin=0.0,
                vmax=1.0,
                xlabel="shape",
                ylabel="colour",
            )
        )
    paths.append(output_dir / "metrics.json")
    write_json_atomic(paths[-1], finite_or_null(metrics))
    return paths


# ---------------------------------------------------------------- command line


def _parse_scales(text: str) -> list[float]:
    try:
        scales = [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ValueError(f"`--guidance-scales` must be comma-separated numbers such as 1,3; got {text!r}") from None
    if not scales:
        raise ValueError(f"`--guidance-scales` names no scale: {text!r}")
    if not all(map(is_finite_number, scales)):
        raise ValueError(f"`--guidance-scales` must be finite numbers, got {text!r}")
    return scales


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="clipcond eval generation",
        description=(
            "Judge a text-to-image run on the shapes data: generate images for every one-object colour-shape "
            "prompt ('a red circle', ...) with fixed seeds at guidance 1 and the default guidance, and report colour, "
            "shape and both-correct accuracy (by an attribute classifier trained on ground-truth renders) for seen "
            "and held-out compositions, CLIP score under the trained CLIP, and a Fréchet distance on CLIP image "
            "features against the test split. Prints one JSON object and writes it, labelled grids and the images "
            "to --output-dir."
        ),
    )
    parser.add_argument("--model", required=True, metavar="RUN", help="pipeline folder (`clipcond train decoder`)")
    parser.add_argument("--data", required=True, metavar="DIR", help="the shapes data root (with dataset_info.json)")
    parser.add_argument(
        "--clip", metavar="PATH", help="CLIP run for CLIP score and FD (default: RUN/clipcond_run.json clip.path)"
    )
    parser.add_argument(
        "--allow-clip-mismatch",
        action="store_true",
        help="evaluate with a --clip other than the one the decoder was trained on (recorded in the metrics)",
    )
    parser.add_argument("--split", default="test", help="split whose single-object images are the FD reference")
    parser.add_argument("--num-images-per-prompt", type=int, default=8, help="images per prompt (default 8)")
    parser.add_argument(
        "--prompt-template",
        default=DEFAULT_PROMPT_TEMPLATE,
        help=f"prompt of a class, with {{colour}} and {{shape}} (default {DEFAULT_PROMPT_TEMPLATE!r})",
    )
    parser.add_argument("--num-inference-steps", type=int, default=25, help="denoising steps (default 25)")
    parser.add_argument("--scheduler", default="dpm", help="sampler, a SCHEDULERS name or 'saved' (default dpm)")
    parser.add_argument(
        "--guidance-scale",
        type=finite_float,
        default=None,
        help=f"the default guidance, whose figures are the top-level ones (default {DEFAULT_GUIDANCE_SCALE}, or the "
        "last of --guidance-scales when they do not include it)",
    )
    parser.add_argument("--guidance-scales", help="comma-separated scales to evaluate (default: 1,<--guidance-scale>)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per pipeline call (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-image generators (default 0)")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="fp32",
        help="the pipeline's precision, as `clipcond generate --dtype` (default fp32; bf16 samples about twice as fast "
        "on CPU)",
    )
    parser.add_argument("--judge-cache-dir", metavar="DIR", help="where the judge is cached (default ~/.cache/...)")
    parser.add_argument("--output-dir", metavar="DIR", help="default RUN/eval_generation")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_allow_outside_paths(parser)
    return parser.parse_args(argv)


def resolve_clip_path(run: Path, override: str | None) -> tuple[Path, str | None]:
    """The CLIP run of a decoder run (`--clip` when given) and the content hash of the CLIP it was trained on (None
    when its run record names none)."""
    record = RunRecord.read_if_present(run)
    clip_hash = None if record is None else record.clip_hash
    if override is not None:
        if not os.path.isdir(override):
            raise FileNotFoundError(f"`--clip` {override!r} does not exist")
        return Path(override), clip_hash
    record_path = run / RUN_RECORD
    if record is None:
        raise FileNotFoundError(
            f"{record_path} does not exist, so the CLIP run of `--model` {str(run)!r} is unknown; pass `--clip PATH`"
        )
    if not record.clip_path:
        raise ValueError(f"{record_path} has no clip.path; pass `--clip PATH`")
    recorded = Path(record.clip_path)
    # A relative path was relative to where training ran; try there (the current folder), then beside the run.
    for candidate in (recorded, run / recorded, run.parent / recorded):
        if candidate.is_dir():
            return candidate, clip_hash
    raise FileNotFoundError(
        f"the CLIP run {str(recorded)!r} named in {record_path} does not exist (tried it from the current folder and "
        f"from {run}); pass `--clip PATH`"
    )


def load_reference_images(
    data: str, split: str, resolution: int, *, allow_outside_paths: bool = False
) -> tuple[torch.Tensor, list[str]]:
    """The split's readable single-object images (those with a label), uint8 (N, 3, R, R) at `resolution`, and the
    paths of the single-object files that could not be read (or lie outside the data folder, see
    `ImageCaptionDataset`): those are left out and counted (the data set's stand-in for one, the next readable
    image, would count twice)."""
    from clipcond.data.folders import ImageCaptionDataset

    dataset = ImageCaptionDataset(data, split=split, resolution=resolution, allow_outside_paths=allow_outside_paths)
    images, unreadable = [], []
    for i in range(len(dataset)):
        if not dataset.labels[i]:
            continue  # not a single-object image: not a reference whether it reads or not
        item = dataset[i]
        if item["index"] != i:  # the data set's stand-in for an unreadable file
            unreadable.append(str(dataset.image_paths[i]))
        else:
            images.append(item["pixel_values"])
    if unreadable:
        logger.warning("%d unreadable image(s) in split %r left out, e.g. %s", len(unreadable), split, unreadable[0])
    if len(images) < 2:
        raise ValueError(
            f"split {split!r} of {data} has {len(images)} readable single-object image(s); the Fréchet distance "
            "needs >= 2"
        )
    return torch.stack(images), unreadable


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # 1. check the inputs before the slow loads
    run = Path(args.model)
    if not run.is_dir():
        raise FileNotFoundError(f"`--model` {args.model!r} does not exist")
    if not (run / "model_index.json").is_file():
        raise FileNotFoundError(
            f"`--model` {args.model!r} holds no model_index.json; expected a pipeline folder written with "
            "`save_pretrained` (as `clipcond train decoder` writes it)"
        )
    if not os.path.isdir(args.data):
        raise FileNotFoundError(f"`--data` {args.data!r} does not exist")
    output_dir = Path(args.output_dir) if args.output_dir else run / "eval_generation"
    check_output_dir(output_dir)
    info = load_dataset_info(args.data)
    if info is None:
        raise ValueError(
            f"`--data` {args.data!r} has no dataset_info.json: this evaluation needs the built-in shapes data "
            "(`clipcond data shapes OUT`), whose colour-shape classes the attribute judge knows"
        )
    if args.guidance_scales:
        scales = _parse_scales(args.guidance_scales)
        default = DEFAULT_GUIDANCE_SCALE if DEFAULT_GUIDANCE_SCALE in scales else scales[-1]
        headline = args.guidance_scale if args.guidance_scale is not None else default
    else:
        headline = args.guidance_scale if args.guidance_scale is not None else DEFAULT_GUIDANCE_SCALE
        scales = [1.0, headline]
    for flag, value in (("--num-images-per-prompt", args.num_images_per_prompt), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ValueError(f"`{flag}` must be >= 1, got {value}")
    _check_template(args.prompt_template)
    clip_path, clip_hash = resolve_clip_path(run, args.clip)
    scheduler = None if args.scheduler == "saved" else args.scheduler

    from clipcond.lineage import check_evaluation_clip
    from clipcond.models.clip import load_clip
    from clipcond.pipelines.text_to_image import SCHEDULERS, TextToImagePipeline

    if scheduler is not None and scheduler not in SCHEDULERS:
        raise ValueError(f"`--scheduler` must be one of {sorted(SCHEDULERS)} or 'saved', got {scheduler!r}")
    mismatch = check_evaluation_clip(clip_path, clip_hash, what="the decoder", allow=args.allow_clip_mismatch)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    resolve_dtype(args.dtype, device)  # fp16 needs CUDA: say so before the slow loads

    # 2. load the judge, the CLIP, the reference images and the pipeline
    judge = load_or_train_judge(int(info["resolution"]), cache_dir=args.judge_cache_dir, device=device)
    check_palette(info, judge)
    clip_run = load_clip(clip_path, device=device)
    reference, unreadable = load_reference_images(
        args.data, args.split, clip_run.image_size, allow_outside_paths=args.allow_outside_paths
    )
    pipe = load_pretrained(TextToImagePipeline, run, device, args.dtype)

    # 3. evaluate, write, print
    metrics = evaluate_generation(
        pipe,
        classes=class_names(info),
        held_out=info.get("held_out") or [],
        judge=judge,
        clip_run=clip_run,
        reference_images=reference,
        num_images_per_prompt=args.num_images_per_prompt,
        guidance_scales=scales,
        guidance_scale=headline,
        num_inference_steps=args.num_inference_steps,
        scheduler=scheduler,
        seed=args.seed,
        batch_size=args.batch_size,
        prompt_template=args.prompt_template,
        output_dir=output_dir,
        extra_settings={
            "model": str(run),
            "data": str(args.data),
            "reference_split": args.split,
            "unreadable_reference_images": len(unreadable),
            "clip_mismatch": mismatch,
        },
        progress=not args.no_progress,
    )
    print(dumps_json(finite_or_null(metrics), indent=2))
    return 0


def check_palette(info: dict, judge: AttributeJudge) -> None:
    """The data's colours (with their RGB) and shapes must be those the judge was trained to tell apart."""
    known = judge.info.get("colours", {})
    for name, rgb in (info.get("colours") or {}).items():
        if name not in judge.colours or (known and list(known.get(name, [])) != list(rgb)):
            raise ValueError(
                f"the data's colour {name!r} {list(rgb)} is not one the judge knows ({known or judge.colours}); "
                "this evaluation needs the built-in shapes palette"
            )
    for shape in info.get("shapes") or []:
        if shape not in judge.shapes:
            raise ValueError(f"the data's shape {shape!r} is not one the judge knows ({', '.join(judge.shapes)})")


if __name__ == "__main__":
    raise SystemExit(main())
