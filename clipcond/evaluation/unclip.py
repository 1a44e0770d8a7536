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
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from clipcond.data.shapes import class_names, parse_held_out
from clipcond.device import DTYPES, resolve_device
from clipcond.evaluation import judged
from clipcond.evaluation.arguments import add_judged_arguments, check_at_least, eval_parser
from clipcond.evaluation.diversity import distance_to_sources
from clipcond.evaluation.judge import AttributeJudge, JudgeScores
from clipcond.evaluation.sampling import GenerateFn
from clipcond.finite import finite_float, finite_or_null
from clipcond.hub import local_files_only
from clipcond.pipeline_loading import DEFAULT_SAMPLER, SCHEDULER_CHOICES, use_scheduler
from clipcond.pipelines.inputs import (
    DEFAULT_GUIDANCE_START,
    DEFAULT_IMAGE_EMBEDDING_GUIDANCE_SCALE,
    DEFAULT_PRIOR_GUIDANCE_SCALE,
    DEFAULT_PRIOR_INFERENCE_STEPS,
)
from clipcond.plots import image_grid
from clipcond.sampling_options import add_guidance_interval_args, check_guidance_interval_args
from clipcond.storage import check_output_dir, dumps_json, save_image_atomic, write_json_atomic

logger = logging.getLogger(__name__)

DEFAULT_DECODER_GUIDANCE_SCALE = DEFAULT_IMAGE_EMBEDDING_GUIDANCE_SCALE  # the image-embedding decoder's

# vary(sources, generators) -> uint8 images (B, 3, H, W): one variation of sources[i] (uint8 (B, 3, h, w)) drawn
# from generators[i].
VaryFn = Callable[[torch.Tensor, list[torch.Generator]], torch.Tensor]

# 4 sources x 4 variations x 14 seen classes = 224 judged images: with 2 sources, readings scattered +-4 points.
DEFAULT_SOURCES_PER_CLASS = 4
DEFAULT_VARIATIONS_PER_SOURCE = 4
DEFAULT_INFERENCE_STEPS = 20  # DPM-Solver++ steps of the decoder, as `clipcond demo` samples
DEFAULT_PRIOR_MAX_CAPTIONS = 512  # the split's first items: enough for the prior's cosines, seconds on a CPU


# The command's description in `--help`.
DESCRIPTION = """Judge the DALL-E 2 path on the shapes data: variations of one-object test images (do they keep the
source's colour and shape?), text-to-image through the prior (the prompted colour and shape?), seen and held-out
compositions apart, by the attribute judge of `clipcond eval generation`; and the prior's cosine to the true image
embeddings beside its baselines. Prints one JSON object and writes it, the grids and the images to --output-dir.
"""


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
    return judged.derived_seed("clipcond-eval-unclip/variations", seed, source, index)


# ---------------------------------------------------------------- generate functions over the pipelines


@dataclasses.dataclass(frozen=True)
class DecoderSampling:
    """How the image-embedding decoder samples, for variations and text-to-image through the prior alike."""

    guidance_scale: float
    num_inference_steps: int
    noise_level: int = 0  # the embedding noise augmentation
    guidance_start: float = DEFAULT_GUIDANCE_START  # guidance on the steps from this fraction of the schedule...
    guidance_end: float = 1.0  # ... to this one

    def settings(self) -> dict:
        """The pipeline's keyword arguments, as the figures record them."""
        return {**dataclasses.asdict(self), "guidance_scale": float(self.guidance_scale)}


@dataclasses.dataclass(frozen=True)
class PriorSettings:
    """How the prior samples (for its cosine and for text-to-image) and on how many captions its cosine is taken."""

    guidance_scale: float = DEFAULT_PRIOR_GUIDANCE_SCALE
    num_inference_steps: int = DEFAULT_PRIOR_INFERENCE_STEPS
    max_captions: int | None = DEFAULT_PRIOR_MAX_CAPTIONS  # the split's first N items (None: all)


def pipeline_vary_fn(pipe, sampling: DecoderSampling) -> VaryFn:
    """A `VaryFn` over an `ImageVariationPipeline` (one image per source, each from its own generator)."""

    def vary(sources: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        return judged.call_pipeline(pipe, generators, image=sources, **dataclasses.asdict(sampling))

    return vary


def unclip_generate_fn(pipe, sampling: DecoderSampling, prior: PriorSettings) -> GenerateFn:
    """A `GenerateFn` for `evaluate_generation` over an `UnCLIPTextToImagePipeline`: text -> prior -> decoder. The
    guidance scale that `evaluate_generation` passes is the decoder's; the prior's is `prior.guidance_scale`. Each
    image's generator draws its prior noise, then its decoder noise."""

    def generate(prompts: list[str], guidance_scale: float, generators: list[torch.Generator]) -> torch.Tensor:
        return judged.call_pipeline(
            pipe,
            generators,
            prompt=list(prompts),
            **{**dataclasses.asdict(sampling), "guidance_scale": guidance_scale},
            prior_num_inference_steps=prior.num_inference_steps,
            prior_guidance_scale=prior.guidance_scale,
        )

    return generate


# ---------------------------------------------------------------- variations


def _check_sources(sources, source_classes: Sequence[str], judge: AttributeJudge) -> list[tuple[str, str]]:
    """The (colour, shape) each source's variations should keep."""
    if not isinstance(sources, torch.Tensor) or sources.dtype != torch.uint8 or sources.ndim != 4:
        raise ValueError(
            f"`sources` must be uint8 images (S, 3, H, W), got {type(sources).__name__} "
            f"{getattr(sources, 'dtype', '')} {tuple(getattr(sources, 'shape', ()))}"
        )
    if len(source_classes) != sources.shape[0]:
        raise ValueError(f"got {len(source_classes)} source classes for {sources.shape[0]} sources; give one each")
    return judged.class_pairs(source_classes, judge, what="source class")


def _draw_variations(vary: VaryFn, sources: torch.Tensor, jobs: list, seed: int, batch_size: int, progress: bool):
    """Variations uint8 (S * K, 3, H, W) of the (source, variation) jobs, in batches, each from its own generator;
    and the seconds they took."""
    began = time.perf_counter()
    bar = tqdm(total=len(jobs), desc="variations", unit="img", disable=not progress, leave=False)
    images = judged.draw_seeded(
        lambda batch, generators: vary(sources[[s for s, _ in batch]], generators),
        jobs,
        lambda job: variation_seed(seed, *job),
        batch_size,
        bar,
        "the vary function",
        lambda n: f"a batch of {n} source rows",
    )
    bar.close()
    return images, time.perf_counter() - began


def _judge_variations(
    images: torch.Tensor,
    sources: torch.Tensor,
    source_classes: Sequence[str],
    pairs: list[tuple[str, str]],
    *,
    per_source: int,
    held: list[str],
    judge: AttributeJudge,
    clip_run,
    batch_size: int,
) -> tuple[dict, JudgeScores]:
    """The judge's figures of the variations (`per_source` of each source, source by source) against their sources'
    classes and of the sources themselves (the ceiling), the distance to the sources, the outcomes and the per-class
    table; and the variations' scores."""
    source_of = [s for s in range(len(pairs)) for _ in range(per_source)]  # the source of each variation
    source_heldout = torch.tensor([name in held for name in source_classes], dtype=torch.bool)
    groups = judged.group_masks(source_heldout.repeat_interleave(per_source))
    scores = judge.score(images, [pairs[s][0] for s in source_of], [pairs[s][1] for s in source_of])
    source_scores = judge.score(sources, [c for c, _ in pairs], [s for _, s in pairs])
    metrics = judged.accuracy_figures(scores.colour_correct, scores.shape_correct, groups)
    source_groups = judged.group_masks(source_heldout)
    metrics.update(
        judged.accuracy_figures(source_scores.colour_correct, source_scores.shape_correct, source_groups, "source_")
    )
    features = (None, None)
    if clip_run is not None:
        features = (
            judged.clip_image_features(clip_run, images, batch_size),
            judged.clip_image_features(clip_run, sources, batch_size),
        )
    metrics["distance"] = distance_to_sources(images, sources, source_of, source_classes, *features)
    metrics["outcomes"] = judged.outcome_figures(scores, groups)
    image_classes = [source_classes[s] for s in source_of]
    metrics["per_class"] = judged.per_class_table(list(dict.fromkeys(source_classes)), held, image_classes, scores)
    return metrics, scores


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
    pairs = _check_sources(sources, source_classes, judge)
    judged.check_counts(variations_per_source=variations_per_source, batch_size=batch_size)
    held = list(parse_held_out(held_out))

    # 2. generate in batches, source by source, each variation from its own generator
    jobs = [(s, k) for s in range(sources.shape[0]) for k in range(variations_per_source)]
    images, seconds = _draw_variations(vary, sources, jobs, seed, batch_size, progress)

    # 3. judge the variations against their sources' classes, and the sources themselves (the ceiling)
    metrics, scores = _judge_variations(
        images,
        sources,
        source_classes,
        pairs,
        per_source=variations_per_source,
        held=held,
        judge=judge,
        clip_run=clip_run,
        batch_size=batch_size,
    )
    metrics.update(
        num_sources=int(sources.shape[0]),
        num_images=len(jobs),
        generation_seconds=round(seconds, 2),
        judge=judge.summary(),
        settings={
            "classes": list(dict.fromkeys(source_classes)),
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


def _write_variations(
    metrics: dict, sources, source_classes, images, scores: JudgeScores, per_source: int, output_dir: Path
) -> None:
    """grid.png (a row per source: the source unframed, then its variations, labelled with what the judge saw and
    judged.framed by how many attributes they kept), then metrics.json."""
    output_dir.mkdir(parents=True, exist_ok=True)
    size = images.shape[-1]
    tiles, labels = [], []
    seen = scores.labels  # what the judge saw, built once: a property over every image
    for s, name in enumerate(source_classes):
        source = sources[s]
        if source.shape[-1] != size:  # show the source at the variations' size
            source = judged.to_uint8_images(
                torch.nn.functional.interpolate(source[None].float() / 255, size=(size, size), mode="bilinear")
            )[0]
        tiles.append(judged.framed(source, judged.SOURCE_FRAME))
        labels.append(f"source: {name}")
        for i in range(s * per_source, (s + 1) * per_source):
            tiles.append(judged.judged_tile(images[i], scores, i))
            labels.append(seen[i])
    grid = image_grid(tiles, rows=len(source_classes), cols=per_source + 1, labels=labels, max_label_lines=2)
    save_image_atomic(grid, output_dir / "grid.png")
    write_json_atomic(output_dir / "metrics.json", finite_or_null(metrics))


# ---------------------------------------------------------------- the whole DALL-E 2 path


@dataclasses.dataclass
class _Context:
    """What the steps of one `evaluate_unclip` share."""

    pipe: object  # the `UnCLIPTextToImagePipeline`
    data: str | os.PathLike
    split: str
    judge: AttributeJudge
    clip_run: object
    seed: int
    batch_size: int
    out: Path | None
    progress: bool
    allow_outside_paths: bool
    info: dict = dataclasses.field(init=False)  # the data's dataset_info.json

    def __post_init__(self):
        self.info = judged.shapes_info(self.data, "`data`")  # refuses other data before any work

    @property
    def classes(self) -> list[str]:
        return class_names(self.info)

    @property
    def held(self) -> list[str]:
        return list(self.info.get("held_out") or [])

    def dataset(self, resolution: int):
        from clipcond.data.folders import ImageCaptionDataset

        return ImageCaptionDataset(
            self.data, split=self.split, resolution=resolution, allow_outside_paths=self.allow_outside_paths
        )

    def evaluation_arguments(self, name: str) -> dict:
        """The keyword arguments that `evaluate_variations` and `evaluate_generation` take alike; they write into
        the subfolder `name` of the output folder."""
        return {
            "judge": self.judge,
            "clip_run": self.clip_run,
            "held_out": self.held,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "output_dir": None if self.out is None else self.out / name,
            "progress": self.progress,
        }


def _prior_figures(context: _Context, prior: PriorSettings) -> dict:
    """The prior's image embeddings against the true ones of the split and the baselines (`evaluate_prior`), also
    written to prior.json."""
    from clipcond.evaluation.prior import evaluate_prior
    from clipcond.models.clip_pixels import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    pipe = context.pipe
    extractor = pipe.feature_extractor  # the CLIP's pixel statistics; OpenAI's without one, as the pipeline does
    figures = evaluate_prior(
        pipe.prior_pipeline,
        context.dataset(pipe.image_encoder.config.image_size),
        vision_model=pipe.image_encoder,
        image_mean=extractor.image_mean if extractor is not None else OPENAI_CLIP_MEAN,
        image_std=extractor.image_std if extractor is not None else OPENAI_CLIP_STD,
        guidance_scale=prior.guidance_scale,
        num_inference_steps=prior.num_inference_steps,
        max_captions=prior.max_captions,
        seed=context.seed,
        batch_size=256,
        progress=context.progress,
    )
    if context.out is not None:
        context.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(context.out / "prior.json", finite_or_null(figures))
    return figures


def _variation_figures(
    context: _Context, sampling: DecoderSampling, scheduler: str, sources_per_class: int, variations_per_source: int
) -> dict:
    """`evaluate_variations` of the split's first one-object images of each class, at the data's resolution (the
    pipeline embeds them)."""
    dataset = context.dataset(int(context.info["resolution"]))
    sources, source_classes, items = variation_sources(dataset, context.classes, sources_per_class)
    settings = {"data": str(context.data), "split": context.split, "source_items": items, **sampling.settings()}
    return evaluate_variations(
        pipeline_vary_fn(context.pipe.decoder_pipeline, sampling),
        sources,
        source_classes,
        variations_per_source=variations_per_source,
        extra_settings={**settings, "scheduler": scheduler},
        **context.evaluation_arguments("variations"),
    )


def _text_to_image_figures(
    context: _Context,
    sampling: DecoderSampling,
    prior: PriorSettings,
    scheduler: str,
    images_per_prompt: int,
    reference: tuple[torch.Tensor | None, int],
) -> dict:
    """`evaluate_generation` of text-to-image through the prior, as `clipcond eval generation` judges the Stable
    Diffusion path: the same prompts, seeds and figures. `reference`: the FD's reference images and how many of
    the split's could not be read."""
    from clipcond.evaluation.generation import evaluate_generation

    reference_images, unreadable_reference_images = reference
    return evaluate_generation(
        unclip_generate_fn(context.pipe, sampling, prior),
        classes=context.classes,
        reference_images=reference_images,
        num_images_per_prompt=images_per_prompt,
        guidance_scales=[sampling.guidance_scale],
        guidance_scale=sampling.guidance_scale,
        extra_settings={
            "data": str(context.data),
            "num_inference_steps": sampling.num_inference_steps,
            "scheduler": scheduler,
            "prior_guidance_scale": float(prior.guidance_scale),
            "prior_num_inference_steps": prior.num_inference_steps,
            "noise_level": sampling.noise_level,
            "guidance_start": sampling.guidance_start,
            "guidance_end": sampling.guidance_end,
            "unreadable_reference_images": unreadable_reference_images,
        },
        **context.evaluation_arguments("text_to_image"),
    )


def _settings(
    context: _Context, counts: tuple[int, int, int], sampling: DecoderSampling, prior: PriorSettings
) -> dict:
    """The settings of an `evaluate_unclip`, as its metrics record them (`counts`: sources per class, variations
    per source, images per prompt)."""
    return {
        "data": str(context.data),
        "split": context.split,
        **dict(zip(("sources_per_class", "variations_per_source", "images_per_prompt"), counts)),
        "guidance_scale": float(sampling.guidance_scale),
        "num_inference_steps": sampling.num_inference_steps,
        "prior_guidance_scale": float(prior.guidance_scale),
        "prior_num_inference_steps": prior.num_inference_steps,
        "prior_max_captions": prior.max_captions,
        "noise_level": sampling.noise_level,
        "guidance_start": sampling.guidance_start,
        "guidance_end": sampling.guidance_end,
        "seed": context.seed,
    }


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
    from clipcond.device import dtype_name
    from clipcond.pipeline_loading import scheduler_name

    out = Path(output_dir) if output_dir is not None else None
    context = _Context(pipe, data, split, judge, clip_run, seed, batch_size, out, progress, allow_outside_paths)
    sampling = DecoderSampling(guidance_scale, num_inference_steps, noise_level, guidance_start, guidance_end)
    prior = PriorSettings(prior_guidance_scale, prior_num_inference_steps, prior_max_captions)
    pipe.set_progress_bar_config(disable=True)

    # 1. the prior's image embeddings against the true ones and the baselines
    metrics = {"prior": _prior_figures(context, prior)}
    # 2. variations of the split's one-object images
    scheduler = scheduler_name(pipe.scheduler)
    metrics["variations"] = _variation_figures(context, sampling, scheduler, sources_per_class, variations_per_source)
    # 3. text-to-image through the prior, as `clipcond eval generation` judges the Stable Diffusion path
    reference = (reference_images, unreadable_reference_images)
    metrics["text_to_image"] = _text_to_image_figures(
        context, sampling, prior, scheduler, images_per_prompt, reference
    )
    counts = (sources_per_class, variations_per_source, images_per_prompt)
    metrics["settings"] = {
        **_settings(context, counts, sampling, prior),
        "dtype": dtype_name(pipe.decoder_pipeline.unet.dtype),
    }
    if out is not None:
        write_json_atomic(out / "metrics.json", finite_or_null(metrics))
    return metrics


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = eval_parser("clipcond eval unclip", DESCRIPTION, shapes=True)
    parser.add_argument(
        "--decoder", required=True, metavar="RUN", help="`clipcond train decoder --conditioning image-embedding` run"
    )
    parser.add_argument("--prior", required=True, metavar="RUN", help="`clipcond train prior` run")
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
    parser.add_argument(
        "--scheduler",
        choices=SCHEDULER_CHOICES,
        default=DEFAULT_SAMPLER,
        help=f"the decoder's sampler (default {DEFAULT_SAMPLER}; 'saved': the run's own)",
    )
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
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="fp32",
        help="the pipelines' precision, as `clipcond generate --dtype` (default fp32; bf16 samples about twice as fast "
        "on CPU)",
    )
    add_judged_arguments(parser, output_dir="default DECODER/eval_unclip")
    args = parser.parse_args(argv)
    counts = ("sources_per_class", "variations_per_source", "images_per_prompt", "num_inference_steps")
    check_at_least(args, 1, *counts, "prior_num_inference_steps", "batch_size")
    check_at_least(args, 0, "prior_max_captions", note=" (0: all)")
    check_at_least(args, 1, "guidance_scale", note=" (1: no guidance)")
    check_at_least(args, 0, "prior_guidance_scale")
    check_guidance_interval_args(args)
    return args


def _load_pipeline(args: argparse.Namespace, device: torch.device, **dtype):
    """The prior and decoder runs as one `UnCLIPTextToImagePipeline` on `device` (refused when trained on different
    CLIPs, unless --allow-clip-mismatch), with the decoder's `--scheduler`."""
    from clipcond.pipelines.unclip import UnCLIPTextToImagePipeline

    pipe = UnCLIPTextToImagePipeline.from_runs(
        args.prior,
        args.decoder,
        allow_clip_mismatch=args.allow_clip_mismatch,
        local_files_only=local_files_only(),
        **dtype,
    ).to(device)
    return use_scheduler(pipe, args.scheduler)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # 1. check the inputs before the slow loads
    for flag, path in (("--decoder", args.decoder), ("--prior", args.prior), ("--data", args.data)):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"`{flag}` {path!r} does not exist")
    output_dir = Path(args.output_dir) if args.output_dir else Path(args.decoder) / "eval_unclip"
    check_output_dir(output_dir)
    info = judged.shapes_info(args.data)
    from clipcond.device import dtype_keyword, resolve_dtype
    from clipcond.evaluation.judge import load_or_train_judge

    clip_path, _ = judged.resolve_clip_path(Path(args.decoder), args.clip)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)  # fp16 needs CUDA: say so before the slow loads

    # 2. load the judge, the CLIP, the reference images and the paired pipeline
    judge = load_or_train_judge(int(info["resolution"]), cache_dir=args.judge_cache_dir, device=device)
    judged.check_palette(info, judge)
    clip_run, reference, unreadable = judged.load_clip_and_reference(
        clip_path, args.data, args.split, device, allow_outside_paths=args.allow_outside_paths
    )
    pipe = _load_pipeline(args, device, **{dtype_keyword(): dtype})

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
