"""`clipcond eval unclip`: does the DALL-E 2 path draw what it is asked? Judged on the shapes data.

    clipcond eval unclip --decoder runs/unclip_decoder --prior runs/prior --data data/shapes

Three figures of the DALL-E 2 (unCLIP) path, with the attribute judge of `clipcond eval generation`
(`clipcond.evaluation.judge`):

- image variations (`evaluate_variations`): for every one-object colour-shape class of the data, the first
  `--sources-per-class` single-object images of the split are the sources; the image-embedding decoder makes
  `--variations-per-source` variations of each, and each variation is judged against its source's colour and shape
  (the data's labels). Seen and held-out compositions apart (dataset_info.json "held_out": pairs in no training
  image of the CLIP or the decoder). Beside them, the judge's accuracy on the sources themselves: what an exact copy
  would score, the ceiling of the figures;
- text-to-image through the prior: `clipcond.evaluation.generation.evaluate_generation` with a generate function
  over `UnCLIPTextToImagePipeline` (prompt -> prior -> CLIP image embedding -> decoder), the same prompts, seeds and
  figures as the Stable Diffusion path's evaluation;
- the prior's cosine to the true image embeddings beside both baselines (`clipcond.evaluation.prior`).

It prints ONE JSON object `{"prior": ..., "variations": ..., "text_to_image": ..., "settings": ...}` and writes
it to `--output-dir` (default DECODER/eval_unclip/) as metrics.json, beside `prior.json`, `variations/` (its
metrics.json and grid.png: a row per source, the source then its variations, framed green / orange / red for 2 / 1
/ 0 attributes kept) and `text_to_image/` (what `clipcond eval generation` writes).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from clipcond.data.open import add_allow_outside_paths
from clipcond.data.shapes import class_names, load_dataset_info, parse_held_out
from clipcond.device import DTYPES
from clipcond.evaluation.diversity import distance_to_sources
from clipcond.evaluation.generation import (
    GenerateFn,
    check_image_batch,
    clip_image_features,
    to_uint8_images,
)
from clipcond.evaluation.judge import AttributeJudge
from clipcond.evaluation.plots import image_grid
from clipcond.finite import finite_float, finite_or_null
from clipcond.pipelines.inputs import DEFAULT_GUIDANCE_START, DEFAULT_IMAGE_EMBEDDING_GUIDANCE_SCALE
from clipcond.sampling_options import add_guidance_interval_args, check_guidance_interval_args
from clipcond.storage import check_output_dir, dumps_json, write_json_atomic

logger = logging.getLogger(__name__)

DEFAULT_DECODER_GUIDANCE_SCALE = DEFAULT_IMAGE_EMBEDDING_GUIDANCE_SCALE  # the image-embedding decoder's

# vary(sources, generators) -> uint8 images (B, 3, H, W): one variation of sources[i] (uint8 (B, 3, h, w)) drawn
# from generators[i].
VaryFn = Callable[[torch.Tensor, list[torch.Generator]], torch.Tensor]

# 4 sources x 4 variations x 14 seen classes = 224 judged images: with 2 sources, readings scattered +-4 points.
DEFAULT_SOURCES_PER_CLASS = 4
DEFAULT_VARIATIONS_PER_SOURCE = 4
DEFAULT_INFERENCE_STEPS = 20  # DPM-Solver++ steps of the decoder, as `clipcond demo` samples
DEFAULT_PRIOR_GUIDANCE_SCALE = 4.0  # `clipcond eval prior`'s and the unCLIP pipeline's default
DEFAULT_PRIOR_INFERENCE_STEPS = 25
DEFAULT_PRIOR_MAX_CAPTIONS = 512  # about 40 s of the `tiny` prior on a CPU; the split's first items
GROUPS = ("", "_seen", "_heldout")
_FRAME = {2: (40, 170, 60), 1: (250, 150, 30), 0: (220, 30, 30)}  # frame colour by number of attributes kept


# ---------------------------------------------------------------- the sources


def variation_sources(dataset, classes: Sequence[str], per_class: int) -> tuple[torch.Tensor, list[str], list[int]]:
    """The first `per_class` one-object images of each class in `dataset` (an `ImageCaptionDataset` of the shapes
    data, whose `labels` name the class of a one-object image): uint8 images (S, 3, R, R), the class of each and the
    data set index of each, class by class in the order of `classes`."""
    if per_class < 1:
        raise ValueError(f"`per_class` must be >= 1, got {per_class}")
    chosen: list[int] = []
    for name in classes:
        items = [i for i, label in enumerate(dataset.labels) if label == name][:per_class]
        if not items:
            raise ValueError(
                f"{dataset!r} has no one-object image of class {name!r} (its `label` column); variations are judged "
                "on the test split of the built-in shapes data, which holds every colour-shape pair"
            )
        if len(items) < per_class:
            logger.warning("class %r has %d one-object image(s), fewer than %d", name, len(items), per_class)
        chosen += items
    samples = [dataset[i] for i in chosen]
    if any(sample["skipped"] for sample in samples):
        raise ValueError(f"some source images of {dataset!r} could not be read (see the warnings)")
    return torch.stack([s["pixel_values"] for s in samples]), [dataset.labels[i] for i in chosen], chosen


def variation_seed(seed: int, source: int, index: int) -> int:
    """The seed of variation `index` of source `source`: independent of the batch size and of other settings."""
    digest = hashlib.sha256(f"clipcond-eval-unclip/variations/{seed}/{source}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# ---------------------------------------------------------------- generate functions over the pipelines


def pipeline_vary_fn(
    pipe,
    *,
    num_inference_steps: int,
    guidance_scale: float,
    noise_level: int = 0,
    guidance_start: float = DEFAULT_GUIDANCE_START,
    guidance_end: float = 1.0,
) -> VaryFn:
    """A `VaryFn` over an `ImageVariationPipeline` (one image per source, each from its own generator)."""

    def vary(sources: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        output = pipe(
            image=sources,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            num_images_per_prompt=1,
            generator=list(generators),
            noise_level=noise_level,
            guidance_start=guidance_start,
            guidance_end=guidance_end,
            output_type="pt",
        )
        return to_uint8_images(output.images)

    return vary


def unclip_generate_fn(
    pipe,
    *,
    num_inference_steps: int,
    prior_guidance_scale: float = DEFAULT_PRIOR_GUIDANCE_SCALE,
    prior_num_inference_steps: int = DEFAULT_PRIOR_INFERENCE_STEPS,
    noise_level: int = 0,
    guidance_start: float = DEFAULT_GUIDANCE_START,
    guidance_end: float = 1.0,
) -> GenerateFn:
    """A `GenerateFn` for `evaluate_generation` over an `UnCLIPTextToImagePipeline`: text -> prior -> decoder. The
    guidance scale that `evaluate_generation` passes is the decoder's; the prior's is `prior_guidance_scale`. Each
    image's generator draws its prior noise, then its decoder noise."""

    def generate(prompts: list[str], guidance_scale: float, generators: list[torch.Generator]) -> torch.Tensor:
        output = pipe(
            prompt=list(prompts),
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            prior_num_inference_steps=prior_num_inference_steps,
            prior_guidance_scale=prior_guidance_scale,
            num_images_per_prompt=1,
            generator=list(generators),
            noise_level=noise_level,
            guidance_start=guidance_start,
            guidance_end=guidance_end,
            output_type="pt",
        )
        return to_uint8_images(output.images)

    return generate


# ---------------------------------------------------------------- variations


def _mean_or_none(values: torch.Tensor, mask: torch.Tensor) -> float | None:
    return values[mask].double().mean().item() if bool(mask.any()) else None


def _accuracies(colour_ok: torch.Tensor, shape_ok: torch.Tensor, groups: dict[str, torch.Tensor], prefix: str = ""):
    figures = {}
    for group, mask in groups.items():
        figures[f"{prefix}colour_accuracy{group}"] = _mean_or_none(colour_ok, mask)
        figures[f"{prefix}shape_accuracy{group}"] = _mean_or_none(shape_ok, mask)
        figures[f"{prefix}both_accuracy{group}"] = _mean_or_none(colour_ok & shape_ok, mask)
    return figures


def evaluate_variations(
    vary: VaryFn,
    sources: torch.Tensor,
    source_classes: Sequence[str],
    *,
    judge: AttributeJudge,
    clip_run=None,
    held_out: Sequence[str] | str | None = None,
    variations_per_source: int = DEFAULT_VARIATIONS_PER_SOURCE,
    seed: int = 0,
    batch_size: int = 32,
    output_dir: str | os.PathLike | None = None,
    extra_settings: dict | None = None,
    progress: bool = False,
) -> dict:
    """Make `variations_per_source` variations of every source and judge whether each keeps its source's colour and
    shape.

    Args:
        vary: `vary(sources uint8 (B, 3, h, w), generators) -> uint8 (B, 3, H, W)`, one variation per source row,
            each drawn from its own generator (`pipeline_vary_fn` over an `ImageVariationPipeline`).
        sources: uint8 (S, 3, h, w) one-object images (`variation_sources`).
        source_classes: the "colour shape" class of each source (what a variation should keep).
        clip_run: when given, the distances to the source are also measured in its image embedding space.
        held_out: the held-out pairs; figures "_heldout" cover their sources' variations, "_seen" the rest.
        seed: variation k of source s is drawn from a CPU generator seeded `variation_seed(seed, s, k)`.
        output_dir: when given, write metrics.json and grid.png (a row per source: the source, then its variations).

    Returns:
        `{"colour_accuracy", "shape_accuracy", "both_accuracy"` and their "_seen" / "_heldout" variants,
        the same of the judge on the sources prefixed "source_" (the ceiling), "distance" (to the source, to
        unrelated sources, of a copy: `clipcond.evaluation.diversity.distance_to_sources`), "per_class", "num_sources",
        "num_images", "generation_seconds", "judge", "settings"}`; a figure over no image is None.
    """
    start = time.perf_counter()
    # 1. check inputs
    if not isinstance(sources, torch.Tensor) or sources.dtype != torch.uint8 or sources.ndim != 4:
        raise ValueError(
            f"`sources` must be uint8 images (S, 3, H, W), got {type(sources).__name__} "
            f"{getattr(sources, 'dtype', '')} {tuple(getattr(sources, 'shape', ()))}"
        )
    if len(source_classes) != sources.shape[0]:
        raise ValueError(f"got {len(source_classes)} source classes for {sources.shape[0]} sources; give one each")
    pairs = []
    for name in source_classes:
        words = str(name).split()
        if len(words) != 2 or words[0] not in judge.colours or words[1] not in judge.shapes:
            raise ValueError(
                f"source class {name!r} is not '<colour> <shape>' with a colour in {', '.join(judge.colours)} and a "
                f"shape in {', '.join(judge.shapes)}"
            )
        pairs.append((words[0], words[1]))
    for name, value in (("variations_per_source", variations_per_source), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}")
    held = list(parse_held_out(held_out))

    # 2. the jobs (source, variation), source by source, and the groups of the images
    jobs = [(s, k) for s in range(sources.shape[0]) for k in range(variations_per_source)]
    source_heldout = torch.tensor([name in held for name in source_classes], dtype=torch.bool)
    is_heldout = source_heldout.repeat_interleave(variations_per_source)
    groups = {"": torch.ones(len(jobs), dtype=torch.bool), "_seen": ~is_heldout, "_heldout": is_heldout}
    source_groups = {
        "": torch.ones(len(pairs), dtype=torch.bool),
        "_seen": ~source_heldout,
        "_heldout": source_heldout,
    }

    # 3. generate in batches, each variation from its own generator
    chunks = []
    began = time.perf_counter()
    bar = tqdm(total=len(jobs), desc="variations", unit="img", disable=not progress, leave=False)
    for first in range(0, len(jobs), batch_size):
        batch = jobs[first : first + batch_size]
        generators = [torch.Generator("cpu").manual_seed(variation_seed(seed, s, k)) for s, k in batch]
        images = vary(sources[[s for s, _ in batch]], generators)
        check_image_batch(images, len(batch), "the vary function", f"a batch of {len(batch)} source rows")
        chunks.append(images.cpu())
        bar.update(len(batch))
    bar.close()
    images = torch.cat(chunks)  # (S * K, 3, H, W)
    seconds = time.perf_counter() - began

    # 4. judge the variations against their sources' classes, and the sources themselves (the ceiling)
    scores = judge.score(images, [pairs[s][0] for s, _ in jobs], [pairs[s][1] for s, _ in jobs])
    source_scores = judge.score(sources, [c for c, _ in pairs], [s for _, s in pairs])
    metrics = _accuracies(scores.colour_correct, scores.shape_correct, groups)
    metrics.update(_accuracies(source_scores.colour_correct, source_scores.shape_correct, source_groups, "source_"))
    features = (None, None)
    if clip_run is not None:
        features = (
            clip_image_features(clip_run, images, batch_size),
            clip_image_features(clip_run, sources, batch_size),
        )
    metrics["distance"] = distance_to_sources(images, sources, [s for s, _ in jobs], source_classes, *features)
    image_class = torch.tensor([s for s, _ in jobs])
    names = list(dict.fromkeys(source_classes))
    per_class = {}
    for name in names:
        mask = torch.tensor([source_classes[s] == name for s in image_class.tolist()], dtype=torch.bool)
        per_class[name] = {
            "heldout": name in held,
            "colour_accuracy": _mean_or_none(scores.colour_correct, mask),
            "shape_accuracy": _mean_or_none(scores.shape_correct, mask),
            "both_accuracy": _mean_or_none(scores.both_correct, mask),
            "judged": scores.judged_counts(mask),
        }
    metrics.update(
        outcomes={group.lstrip("_") or "all": scores.outcome_shares(mask) for group, mask in groups.items()},
        per_class=per_class,
        num_sources=int(sources.shape[0]),
        num_images=len(jobs),
        generation_seconds=round(seconds, 2),
        judge=judge.summary(),
        settings={
            "classes": names,
            "held_out": held,
            "variations_per_source": variations_per_source,
            "seed": seed,
            **(extra_settings or {}),
            "seconds": round(time.perf_counter() - start, 2),
        },
    )
    if output_dir is not None:
        _write_variations(metrics, sources, source_classes, images, scores, variations_per_source, Path(output_dir))
    return metrics


def _framed(image: torch.Tensor, colour: tuple[int, int, int], width: int = 2) -> Image.Image:
    array = image.permute(1, 2, 0).numpy()  # (H, W, 3)
    framed = np.empty((array.shape[0] + 2 * width, array.shape[1] + 2 * width, 3), dtype=np.uint8)
    framed[:] = colour
    framed[width:-width, width:-width] = array
    return Image.fromarray(framed, "RGB")


def _write_variations(metrics, sources, source_classes, images, scores, per_source: int, output_dir: Path) -> None:
    """grid.png (a row per source: the source unframed, then its variations, labelled with what the judge saw and
    framed by how many attributes they kept), then metrics.json."""
    output_dir.mkdir(parents=True, exist_ok=True)
    size = images.shape[-1]
    tiles, labels = [], []
    judged = scores.labels  # built once: a property over every image
    for s, name in enumerate(source_classes):
        source = sources[s]
        if source.shape[-1] != size:  # show the source at the variations' size
            source = to_uint8_images(
                torch.nn.functional.interpolate(source[None].float() / 255, size=(size, size), mode="bilinear")
            )[0]
        tiles.append(_framed(source, (255, 255, 255)))
        labels.append(f"source: {name}")
        for k in range(per_source):
            i = s * per_source + k
            kept = int(scores.colour_correct[i]) + int(scores.shape_correct[i])
            tiles.append(_framed(images[i], _FRAME[kept]))
            labels.append(judged[i])
    grid = image_grid(tiles, rows=len(source_classes), cols=per_source + 1, labels=labels, max_label_lines=2)
    grid.save(output_dir / "grid.png", format="PNG")
    write_json_atomic(output_dir / "metrics.json", finite_or_null(metrics))


# ---------------------------------------------------------------- the whole DALL-E 2 path


def evaluate_unclip(
    pipe,
    data: str | os.PathLike,
    *,
    judge: AttributeJudge,
    clip_run=None,
    reference_images: torch.Tensor | None = None,
    unreadable_reference_images: int = 0,
    split: str = "test",
    sources_per_class: int = DEFAULT_SOURCES_PER_CLASS,
    variations_per_source: int = DEFAULT_VARIATIONS_PER_SOURCE,
    images_per_prompt: int = 8,
    guidance_scale: float = DEFAULT_DECODER_GUIDANCE_SCALE,
    num_inference_steps: int = DEFAULT_INFERENCE_STEPS,
    prior_guidance_scale: float = DEFAULT_PRIOR_GUIDANCE_SCALE,
    prior_num_inference_steps: int = DEFAULT_PRIOR_INFERENCE_STEPS,
    prior_max_captions: int | None = DEFAULT_PRIOR_MAX_CAPTIONS,
    noise_level: int = 0,
    guidance_start: float = DEFAULT_GUIDANCE_START,
    guidance_end: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    output_dir: str | os.PathLike | None = None,
    progress: bool = False,
    allow_outside_paths: bool = False,
) -> dict:
    """The prior's cosine beside its baselines, judged variations and judged text-to-image through the prior.

    Args:
        pipe: an `UnCLIPTextToImagePipeline` (`from_runs(prior_run, decoder_run)`), with the decoder's sampler
            already chosen (the demo and the CLI swap in DPM-Solver++).
        data: the shapes data root (dataset_info.json gives the classes and the held-out pairs).
        judge: the attribute judge at the data's resolution.
        clip_run, reference_images: for the text-to-image CLIP score and FD (`evaluate_generation`); optional.
        unreadable_reference_images: how many files of the reference split could not be read (recorded).
        split: the split whose one-object images are the variation sources and whose captions the prior is
            evaluated on.
        guidance_scale, num_inference_steps, guidance_start, guidance_end: the decoder's, for variations and
            text-to-image alike.
        prior_max_captions: the prior's cosine on the split's first N items (None: all).
        output_dir: when given, `prior.json`, `variations/`, `text_to_image/`, then `metrics.json` (last: its
            presence marks a finished evaluation).
        allow_outside_paths: read images of `data` that lie outside its folders (see `ImageCaptionDataset`).
    """
    from clipcond.data.folders import ImageCaptionDataset
    from clipcond.device import dtype_name
    from clipcond.evaluation.generation import evaluate_generation
    from clipcond.evaluation.prior import evaluate_prior
    from clipcond.models.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    from clipcond.pipeline_loading import scheduler_name

    info = load_dataset_info(data)
    if info is None:
        raise ValueError(
            f"`data` {str(data)!r} has no dataset_info.json: this evaluation needs the built-in shapes data "
            "(`clipcond data shapes OUT`), whose colour-shape classes the attribute judge knows"
        )
    classes, held = class_names(info), list(info.get("held_out") or [])
    out = Path(output_dir) if output_dir is not None else None
    pipe.set_progress_bar_config(disable=True)

    # 1. the prior's image embeddings against the true ones and the baselines
    image_size = pipe.image_encoder.config.image_size
    clip_set = ImageCaptionDataset(data, split=split, resolution=image_size, allow_outside_paths=allow_outside_paths)
    extractor = pipe.feature_extractor  # the CLIP's pixel statistics; OpenAI's without one, as the pipeline does
    prior = evaluate_prior(
        pipe.prior_pipeline,
        clip_set,
        vision_model=pipe.image_encoder,
        image_mean=extractor.image_mean if extractor is not None else OPENAI_CLIP_MEAN,
        image_std=extractor.image_std if extractor is not None else OPENAI_CLIP_STD,
        guidance_scale=prior_guidance_scale,
        num_inference_steps=prior_num_inference_steps,
        max_captions=prior_max_captions,
        seed=seed,
        batch_size=256,
        progress=progress,
    )
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "prior.json", finite_or_null(prior))

    # 2. variations of the split's one-object images, at the data's resolution (the pipeline embeds them)
    dataset = ImageCaptionDataset(
        data, split=split, resolution=int(info["resolution"]), allow_outside_paths=allow_outside_paths
    )
    sources, source_classes, items = variation_sources(dataset, classes, sources_per_class)
    vary = pipeline_vary_fn(
        pipe.decoder_pipeline,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        noise_level=noise_level,
        guidance_start=guidance_start,
        guidance_end=guidance_end,
    )
    variations = evaluate_variations(
        vary,
        sources,
        source_classes,
        judge=judge,
        clip_run=clip_run,
        held_out=held,
        variations_per_source=variations_per_source,
        seed=seed,
        batch_size=batch_size,
        output_dir=None if out is None else out / "variations",
        extra_settings={
            "data": str(data),
            "split": split,
            "source_items": items,
            "guidance_scale": float(guidance_scale),
            "num_inference_steps": num_inference_steps,
            "noise_level": noise_level,
            "guidance_start": guidance_start,
            "guidance_end": guidance_end,
            "scheduler": scheduler_name(pipe.scheduler),
        },
        progress=progress,
    )

    # 3. text-to-image through the prior, as `clipcond eval generation` judges the Stable Diffusion path
    generate = unclip_generate_fn(
        pipe,
        num_inference_steps=num_inference_steps,
        prior_guidance_scale=prior_guidance_scale,
        prior_num_inference_steps=prior_num_inference_steps,
        noise_level=noise_level,
        guidance_start=guidance_start,
        guidance_end=guidance_end,
    )
    text_to_image = evaluate_generation(
        generate,
        classes=classes,
        held_out=held,
        judge=judge,
        clip_run=clip_run,
        reference_images=reference_images,
        num_images_per_prompt=images_per_prompt,
        guidance_scales=[guidance_scale],
        guidance_scale=guidance_scale,
        seed=seed,
        batch_size=batch_size,
        output_dir=None if out is None else out / "text_to_image",
        extra_settings={
            "data": str(data),
            "num_inference_steps": num_inference_steps,
            "scheduler": scheduler_name(pipe.scheduler),
            "prior_guidance_scale": float(prior_guidance_scale),
            "prior_num_inference_steps": prior_num_inference_steps,
            "noise_level": noise_level,
            "guidance_start": guidance_start,
            "guidance_end": guidance_end,
            "unreadable_reference_images": unreadable_reference_images,
        },
        progress=progress,
    )

    metrics = {
        "prior": prior,
        "variations": variations,
        "text_to_image": text_to_image,
        "settings": {
            "data": str(data),
            "split": split,
            "sources_per_class": sources_per_class,
            "variations_per_source": variations_per_source,
            "images_per_prompt": images_per_prompt,
            "guidance_scale": float(guidance_scale),
            "num_inference_steps": num_inference_steps,
            "prior_guidance_scale": float(prior_guidance_scale),
            "prior_num_inference_steps": prior_num_inference_steps,
            "prior_max_captions": prior_max_captions,
            "noise_level": noise_level,
            "guidance_start": guidance_start,
            "guidance_end": guidance_end,
            "seed": seed,
            "dtype": dtype_name(pipe.decoder_pipeline.unet.dtype),
        },
    }
    if out is not None:
        write_json_atomic(out / "metrics.json", finite_or_null(metrics))
    return metrics


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="clipcond eval unclip",
        description=(
            "Judge the DALL-E 2 path on the shapes data: variations of one-object test images (do they keep the "
            "source's colour and shape?), text-to-image through the prior (the prompted colour and shape?), seen and "
            "held-out compositions apart, by the attribute judge of `clipcond eval generation`; and the prior's "
            "cosine to the true image embeddings beside its baselines. Prints one JSON object and writes it, the "
            "grids and the images to --output-dir."
        ),
    )
    parser.add_argument(
        "--decoder", required=True, metavar="RUN", help="`clipcond train decoder --conditioning image-embedding` run"
    )
    parser.add_argument("--prior", required=True, metavar="RUN", help="`clipcond train prior` run")
    parser.add_argument("--data", required=True, metavar="DIR", help="the shapes data root (with dataset_info.json)")
    parser.add_argument("--split", default="test", help="split of the sources, the captions and the FD reference")
    parser.add_argument(
        "--sources-per-class", type=int, default=DEFAULT_SOURCES_PER_CLASS, help="one-object images per class varied"
    )
    parser.add_argument(
        "--variations-per-source", type=int, default=DEFAULT_VARIATIONS_PER_SOURCE, help="variations of each source"
    )
    parser.add_argument("--images-per-prompt", type=int, default=8, help="text-to-image images per prompt")
    parser.add_argument(
        "--guidance-scale",
        type=finite_float,
        default=DEFAULT_DECODER_GUIDANCE_SCALE,
        help="the decoder's guidance weight",
    )
    parser.add_argument(
        "--num-inference-steps", type=int, default=DEFAULT_INFERENCE_STEPS, help="the decoder's sampler steps"
    )
    parser.add_argument("--scheduler", default="dpm", help="the decoder's sampler, a SCHEDULERS name or 'saved'")
    parser.add_argument(
        "--prior-guidance-scale", type=finite_float, default=DEFAULT_PRIOR_GUIDANCE_SCALE, help="the prior's guidance"
    )
    parser.add_argument(
        "--prior-num-inference-steps", type=int, default=DEFAULT_PRIOR_INFERENCE_STEPS, help="the prior's steps"
    )
    parser.add_argument(
        "--prior-max-captions",
        type=int,
        default=DEFAULT_PRIOR_MAX_CAPTIONS,
        help="the prior's cosine on the split's first N items (0: all)",
    )
    parser.add_argument("--noise-level", type=int, default=0, help="the decoder's embedding noise augmentation")
    add_guidance_interval_args(parser)
    parser.add_argument("--clip", metavar="PATH", help="CLIP run for CLIP score and FD (default: the decoder's)")
    parser.add_argument("--allow-clip-mismatch", action="store_true", help="pair runs trained on different CLIPs")
    parser.add_argument("--batch-size", type=int, default=32, help="images per pipeline call")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-image generators")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="fp32",
        help="the pipelines' precision, as `clipcond generate --dtype` (default fp32; bf16 samples about twice as fast "
        "on CPU)",
    )
    parser.add_argument("--judge-cache-dir", metavar="DIR", help="where the judge is cached (default ~/.cache/...)")
    parser.add_argument("--output-dir", metavar="DIR", help="default DECODER/eval_unclip")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    add_allow_outside_paths(parser)
    args = parser.parse_args(argv)
    for name in (
        "sources_per_class",
        "variations_per_source",
        "images_per_prompt",
        "num_inference_steps",
        "prior_num_inference_steps",
        "batch_size",
    ):
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name.replace('_', '-')}` must be >= 1, got {getattr(args, name)}")
    if args.prior_max_captions < 0:
        raise ValueError(f"`--prior-max-captions` must be >= 0 (0: all), got {args.prior_max_captions}")
    if args.guidance_scale < 1:
        raise ValueError(f"`--guidance-scale` must be >= 1 (1: no guidance), got {args.guidance_scale}")
    if args.prior_guidance_scale < 0:
        raise ValueError(f"`--prior-guidance-scale` must be >= 0, got {args.prior_guidance_scale}")
    check_guidance_interval_args(args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # 1. check the inputs before the slow loads
    for flag, path in (("--decoder", args.decoder), ("--prior", args.prior), ("--data", args.data)):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"`{flag}` {path!r} does not exist")
    output_dir = Path(args.output_dir) if args.output_dir else Path(args.decoder) / "eval_unclip"
    check_output_dir(output_dir)
    info = load_dataset_info(args.data)
    if info is None:
        raise ValueError(
            f"`--data` {args.data!r} has no dataset_info.json: this evaluation needs the built-in shapes data "
            "(`clipcond data shapes OUT`), whose colour-shape classes the attribute judge knows"
        )
    from clipcond.device import dtype_keyword, resolve_dtype
    from clipcond.evaluation.generation import check_palette, load_reference_images, resolve_clip_path
    from clipcond.evaluation.judge import load_or_train_judge
    from clipcond.models.clip import load_clip
    from clipcond.pipelines.text_to_image import SCHEDULERS, scheduler_from_name
    from clipcond.pipelines.unclip import UnCLIPTextToImagePipeline

    if args.scheduler != "saved" and args.scheduler not in SCHEDULERS:
        raise ValueError(f"`--scheduler` must be one of {sorted(SCHEDULERS)} or 'saved', got {args.scheduler!r}")
    clip_path, _ = resolve_clip_path(Path(args.decoder), args.clip)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = resolve_dtype(args.dtype, device)  # fp16 needs CUDA: say so before the slow loads

    # 2. load the judge, the CLIP, the reference images and the paired pipeline
    judge = load_or_train_judge(int(info["resolution"]), cache_dir=args.judge_cache_dir, device=device)
    check_palette(info, judge)
    clip_run = load_clip(clip_path, device=device)
    reference, unreadable = load_reference_images(
        args.data, args.split, clip_run.image_size, allow_outside_paths=args.allow_outside_paths
    )
    pipe = UnCLIPTextToImagePipeline.from_runs(
        args.prior,
        args.decoder,
        allow_clip_mismatch=args.allow_clip_mismatch,
        local_files_only=True,
        **{dtype_keyword(): dtype},
    ).to(device)
    if args.scheduler != "saved":
        pipe.scheduler = scheduler_from_name(args.scheduler, pipe.scheduler.config)

    # 3. evaluate, write, print
    metrics = evaluate_unclip(
        pipe,
        args.data,
        judge=judge,
        clip_run=clip_run,
        reference_images=reference,
        unreadable_reference_images=len(unreadable),
        split=args.split,
        sources_per_class=args.sources_per_class,
        variations_per_source=args.variations_per_source,
        images_per_prompt=args.images_per_prompt,
        guidance_scale=args.guidance_scale,
        num_inference_steps=args.num_inference_steps,
        prior_guidance_scale=args.prior_guidance_scale,
        prior_num_inference_steps=args.prior_num_inference_steps,
        prior_max_captions=args.prior_max_captions or None,
        noise_level=args.noise_level,
        guidance_start=args.guidance_start,
        guidance_end=args.guidance_end,
        seed=args.seed,
        batch_size=args.batch_size,
        output_dir=output_dir,
        progress=not args.no_progress,
        allow_outside_paths=args.allow_outside_paths,
    )
    print(dumps_json(finite_or_null(metrics), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
