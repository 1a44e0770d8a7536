"""`clipcond eval generation`: does a generator draw what it is asked for? Judged on the shapes data; measured in
the CLIP's space on any other captioned data.

    clipcond eval generation --model runs/decoder --data data/shapes [--num-images-per-prompt 8] [--guidance-scales 1,3]
    clipcond eval generation --model runs/decoder --data my_images/ [--split test] [--max-prompts 64]

On data other than the shapes (no dataset_info.json, or one of another data set such as `clipcond data tuxpaint`
writes), `evaluate_captioned` prompts with the captions of `--split` and reports CLIP score, the Fréchet distance in
the CLIP's image space to the real images of those captions and a grid of real beside drawn images
(`clipcond.evaluation.captioned`). On the shapes data:

For every one-object colour-shape class of the data ("a red circle", ...) it generates `--num-images-per-prompt`
images, each from its own seeded generator, at each guidance scale, and reports:

- colour, shape and both-correct accuracy as judged by an attribute classifier trained on ground-truth renders
  (`clipcond.evaluation.judge`), overall, for the seen compositions and for the held-out ones (dataset_info.json
  "held_out": pairs the decoder and the CLIP never saw in training), and per class;
- CLIP score: the mean cosine between each image's and its prompt's embedding under the trained CLIP (raw cosine,
  not the 100 x max(cos, 0) scaling of Hessel et al. 2021 that other data also report as `clip_score_100`), and `clip_top1`, how often the image is nearer its own
  prompt than any other class's prompt;
- `fd_clip`: the Fréchet distance (Heusel et al. 2017, FID's formula) between CLIP image features of the generated
  images and of the reference images (the single-object images of the test split), and `fd_clip_floor`, the same
  distance for as many fresh ground-truth renders of the same prompts: the value a perfect generator would get at
  this sample size, since FD is biased upwards for small samples.
- with `--inception-weights FILE` (a local safetensors file; `clipcond.evaluation.inception`), on either data, the
  same two distances in Inception-v3's pool3 space, FID proper: `fd_inception` and `fd_inception_floor` (absent
  without the flag).

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
import os
import random
import re
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from clipcond.data.shapes import (
    class_names,
    is_shapes_data,
    load_dataset_info,
    parse_held_out,
    render_scene,
    sample_scene,
)
from clipcond.device import DTYPES, resolve_device, resolve_dtype
from clipcond.evaluation.arguments import add_judged_arguments, check_at_least, eval_parser
from clipcond.evaluation.captioned import DEFAULT_MAX_PROMPTS, evaluate_captioned
from clipcond.evaluation.diversity import diversity
from clipcond.evaluation.frechet import (  # noqa: F401 (frechet_distance*: public here)
    FeatureFn,
    FrechetSpaces,
    frechet_distance,
    frechet_distance_from_stats,
    with_inception_keys,
)
from clipcond.evaluation.inception import InceptionFeatures, check_inception_weights
from clipcond.evaluation.judge import AttributeJudge, JudgeScores, load_or_train_judge
from clipcond.evaluation.judged import (
    GROUPS,
    accuracy_figures,
    check_counts,
    check_palette,
    class_pairs,
    clip_image_features,
    frechet_extractors,
    group_masks,
    judged_tile,
    load_clip_and_reference,
    mean_or_none,
    outcome_figures,
    per_class_table,
    resolve_clip_path,
)
from clipcond.evaluation.sampling import (
    GenerateFn,
    check_generator,
    check_scales,
    draw_prompts,
    image_seed,  # noqa: F401 (public here: `clipcond demo` and the tests name the seeds of the written images)
    pipeline_generate_fn,
    pipeline_settings,
    prepared_pipeline,
    scale_key,
)
from clipcond.finite import finite_float, finite_or_null, is_finite_number
from clipcond.pipeline_loading import DEFAULT_SAMPLER, SCHEDULER_CHOICES, chosen_scheduler, load_pretrained
from clipcond.pipelines.inputs import DEFAULT_TEXT_GUIDANCE_SCALE
from clipcond.plots import heatmap_png, image_grid
from clipcond.storage import (
    check_output_dir,
    dumps_json,
    remove_earlier_outputs,
    save_image_atomic,
    write_json_atomic,
)

DEFAULT_PROMPT_TEMPLATE = "a {colour} {shape}"
DEFAULT_GUIDANCE_SCALE = DEFAULT_TEXT_GUIDANCE_SCALE  # `clipcond generate`'s default for a text-to-image decoder
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


# The command's description in `--help`.
DESCRIPTION = """Evaluate a text-to-image run. On the shapes data: generate images for every one-object colour-shape
prompt ('a red circle', ...) with fixed seeds at guidance 1 and the default guidance, and report colour, shape and
both-correct accuracy (by an attribute classifier trained on ground-truth renders) for seen and held-out compositions,
CLIP score under the trained CLIP, and a Fréchet distance on CLIP image features against the test split. On any other
image-caption data (e.g. `clipcond data tuxpaint`): prompt with up to --max-prompts distinct captions of --split and
report CLIP score (the cosine, as on the shapes data; clip_score_100 is 100 x max(cos, 0)) beside the real images'
own, and the Fréchet distance in the CLIP's image space to the real images of those captions, with a grid of each
caption's real image beside what was drawn. With --inception-weights FILE, on either data, also the Fréchet
distance in Inception-v3's pool3 space (FID). Prints one JSON object and writes it, the grids and the images to
--output-dir.
"""
INCEPTION_HELP = (
    "Inception-v3 weights, a local safetensors file, for fd_inception (FID: the Fréchet distance of pool3 features; "
    "images resized to 299x299 bilinearly as pytorch-fid does, not bicubically as clean-fid) beside fd_clip, and "
    "fd_inception_floor beside fd_clip_floor; without it those keys are absent. The file is a torchvision "
    "inception_v3 state dict: convert a .pth you trust (torchvision's inception_v3_google-0cc3c7bd.pth) with "
    "`safetensors.torch.save_file(torch.load(PTH, map_location='cpu', weights_only=True), FILE)`. torchvision's "
    "ImageNet weights are not the TF weights of published FIDs: the figures compare runs measured with the same "
    "file. pytorch-fid's pt_inception-2015-12-05-6726825d.pth, converted the same way, is recognised by its "
    "1008-class classifier and gives pytorch-fid's features. Needs torchvision."
)


# ---------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class _Plan:
    """What an evaluation draws: `per_prompt` images of each class's prompt, prompt by prompt (image i of the
    evaluation is `jobs[i]` = (prompt index, image index)), from generators seeded by `image_seed(seed, ...)`, at
    each guidance scale."""

    pairs: list[tuple[str, str]]  # (colour, shape) of each class
    held: list[str]  # the held-out "colour shape" names among them
    prompt_template: str
    per_prompt: int
    scales: list[float]  # the guidance scales, the headline one among them
    headline: float
    seed: int
    batch_size: int  # images per call of the generator

    @property
    def prompts(self) -> list[str]:
        return [self.prompt_template.format(colour=c, shape=s) for c, s in self.pairs]

    @property
    def names(self) -> list[str]:
        return [f"{c} {s}" for c, s in self.pairs]

    @property
    def jobs(self) -> list[tuple[int, int]]:
        return [(p, k) for p in range(len(self.prompts)) for k in range(self.per_prompt)]

    @property
    def image_class(self) -> torch.Tensor:
        """The class index of each image, (N,)."""
        return torch.tensor([p for p, _ in self.jobs])

    @property
    def groups(self) -> dict[str, torch.Tensor]:
        names = self.names
        return group_masks(torch.tensor([names[p] in self.held for p, _ in self.jobs], dtype=torch.bool))

    @property
    def rows(self) -> list[range]:
        """The images of each prompt."""
        return [range(p * self.per_prompt, (p + 1) * self.per_prompt) for p in range(len(self.prompts))]


def _check_classes(classes: Sequence[str], held_out: Sequence[str], judge: AttributeJudge) -> list[tuple[str, str]]:
    if isinstance(classes, str) or not classes:
        raise ValueError(f"`classes` must be a non-empty list of 'colour shape' names, got {classes!r}")
    note = "; this evaluation judges the one-object classes of the shapes data"
    pairs = class_pairs(classes, judge, note=note)
    if len(set(pairs)) != len(pairs):
        raise ValueError(f"`classes` holds duplicates: {list(classes)}")
    names = {f"{c} {s}" for c, s in pairs}
    unknown = [pair for pair in held_out if pair not in names]
    if unknown:
        raise ValueError(f"held-out pairs {unknown} are not among the classes {sorted(names)}")
    return pairs


def _plan(
    classes: Sequence[str],
    held_out: Sequence[str] | str | None,
    judge: AttributeJudge,
    template: str,
    per_prompt: int,
    seed: int,
    batch_size: int,
    scales: list[float],
    headline: float,
) -> _Plan:
    """The checked classes, prompts and counts of an evaluation (see `evaluate_generation`)."""
    held = list(parse_held_out(held_out))
    pairs = _check_classes(classes, held, judge)
    _check_template(template)
    check_counts(num_images_per_prompt=per_prompt, batch_size=batch_size)
    return _Plan(pairs, held, template, per_prompt, scales, headline, seed, batch_size)


def _check_template(template: str) -> None:
    try:
        prompt = template.format(colour="red", shape="circle")
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(
            f"`prompt_template` {template!r} must use only the fields {{colour}} and {{shape}} ({err!r})"
        ) from None
    if "red" not in prompt or "circle" not in prompt:
        raise ValueError(f"`prompt_template` {template!r} must contain both {{colour}} and {{shape}}")


def ground_truth_renders(pairs: Sequence[tuple[str, str]], per_pair: int, resolution: int, seed: int) -> torch.Tensor:
    """Renders uint8 (len(pairs) * per_pair, 3, R, R) of each pair, drawn as the data set draws a single object."""
    images = []
    for colour, shape in pairs:
        for k in range(per_pair):
            rng = random.Random(f"clipcond-eval-generation/renders/{seed}/{colour} {shape}/{k}")
            scene = sample_scene("single", [f"{colour} {shape}"], rng, pair=f"{colour} {shape}")
            images.append(np.asarray(render_scene(scene, resolution)))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


@dataclass
class _Fixed:
    """What does not depend on the guidance scale."""

    text_features: torch.Tensor | None  # (P, D) CLIP embeddings of the prompts
    frechet: FrechetSpaces | None  # the reference images' features in each FD space (None: no FD)
    fd_floor: dict[str, float | None]  # "fd_<space>_floor": the FD of ground-truth renders to the reference
    real_diversity: dict  # the diversity of real images of each class
    inception: bool  # whether `fd_inception` is measured


def _fixed_figures(
    plan: _Plan, judge: AttributeJudge, clip_run, reference_images: torch.Tensor | None, inception: FeatureFn | None
) -> _Fixed:
    """Prompt embeddings, reference features, the FD floor, and the diversity of real images of each class (renders
    drawn as the data set draws them, in the jobs' order)."""
    floor_keys = with_inception_keys(("fd_clip_floor",), inception is not None)
    fixed = _Fixed(None, None, dict.fromkeys(floor_keys), {}, inception is not None)
    renders = ground_truth_renders(plan.pairs, plan.per_prompt, judge.resolution, plan.seed)
    render_features = {}
    if clip_run is not None:
        fixed.text_features = clip_run.encode_text(plan.prompts).cpu()  # (P, D)
        render_features["clip"] = clip_image_features(clip_run, renders, plan.batch_size)
    extractors = frechet_extractors(clip_run, inception, plan.batch_size)
    if extractors and reference_images is not None and len(plan.jobs) >= 2:  # FD needs >= 2 images
        fixed.frechet = FrechetSpaces(extractors, reference_images)
        fixed.fd_floor.update(fixed.frechet.distances(renders, features=render_features, suffix="_floor"))
    fixed.real_diversity = diversity(renders, plan.rows, render_features.get("clip"))
    return fixed


def _generate_all(generate: GenerateFn, plan: _Plan, guidance_scale: float, bar) -> torch.Tensor:
    """Images uint8 (N, 3, H, W) of the plan's jobs (`plan.jobs` is `draw_prompts`' order), in batches, checked."""
    return draw_prompts(
        generate, plan.prompts, plan.per_prompt, guidance_scale, seed=plan.seed, batch_size=plan.batch_size, bar=bar
    )


def _judge_scale(
    generate: GenerateFn, guidance_scale: float, plan: _Plan, judge: AttributeJudge, clip_run, fixed: _Fixed, bar
) -> tuple[dict, torch.Tensor, JudgeScores]:
    """Generate the plan's images at one guidance scale and judge them: (figures, images, scores)."""
    began = time.perf_counter()
    images = _generate_all(generate, plan, guidance_scale, bar)  # (N, 3, H, W) uint8
    seconds = time.perf_counter() - began
    jobs, groups, image_class = plan.jobs, plan.groups, plan.image_class
    scores = judge.score(images, [plan.pairs[p][0] for p, _ in jobs], [plan.pairs[p][1] for p, _ in jobs])

    clip_score = image_features = None
    keys = with_inception_keys(GROUP_KEYS, fixed.inception)
    figures_extra = {"clip_top1": None, **dict.fromkeys(key for key in keys if key.startswith("fd_"))}
    if clip_run is not None:
        image_features = clip_image_features(clip_run, images, plan.batch_size)  # (N, D)
        similarity = image_features @ fixed.text_features.T  # (N, P) cosines
        clip_score = similarity[torch.arange(len(jobs)), image_class]
        figures_extra["clip_top1"] = (similarity.argmax(dim=1) == image_class).double().mean().item()
    if fixed.frechet is not None:
        features = {} if image_features is None else {"clip": image_features}
        figures_extra.update(fixed.frechet.distances(images, features=features))

    figures = accuracy_figures(scores.colour_correct, scores.shape_correct, groups)
    for group, mask in groups.items():
        figures[f"clip_score{group}"] = None if clip_score is None else mean_or_none(clip_score, mask)
    figures.update(figures_extra, num_images=len(jobs), generation_seconds=round(seconds, 2))
    figures = {key: figures[key] for key in keys}
    image_classes = [plan.names[p] for p, _ in jobs]
    figures["per_class"] = per_class_table(plan.names, plan.held, image_classes, scores, {"clip_score": clip_score})
    figures["diversity"] = {
        **diversity(images, plan.rows, image_features),
        **{f"{key}_real": value for key, value in fixed.real_diversity.items()},
    }
    figures["outcomes"] = outcome_figures(scores, groups)
    return figures, images, scores


def _judge_scales(generate: GenerateFn, plan: _Plan, judge: AttributeJudge, clip_run, fixed: _Fixed, progress: bool):
    """Figures, images and scores at every guidance scale of the plan, by `scale_key`."""
    results: dict[str, dict] = {}
    images: dict[str, torch.Tensor] = {}
    scores: dict[str, JudgeScores] = {}
    total = len(plan.jobs) * len(plan.scales)
    with tqdm(total=total, desc="generating", unit="img", disable=not progress, leave=False) as bar:
        for g in plan.scales:
            key = scale_key(g)
            results[key], images[key], scores[key] = _judge_scale(generate, g, plan, judge, clip_run, fixed, bar)
    return results, images, scores


def _headline_figures(results: dict[str, dict], headline: float, fixed: _Fixed) -> dict:
    """The top level of the figures (`HEADLINE_KEYS`, with Inception's when measured): those at the headline
    guidance scale, and the FD floors."""
    metrics = {"guidance_scale": headline, **results[scale_key(headline)], **fixed.fd_floor}
    return {key: metrics[key] for key in with_inception_keys(HEADLINE_KEYS, fixed.inception)}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "prompt"


def image_file(output_dir: str | os.PathLike, guidance_scale: float, prompt: str, index: int) -> Path:
    """Where an evaluation written to `output_dir` saved image `index` of `prompt` at `guidance_scale`; it was drawn
    from a generator seeded `image_seed(seed, prompt, index)`."""
    return Path(output_dir) / "images" / f"guidance_{scale_key(guidance_scale)}" / f"{_slug(prompt)}_{index}.png"


def evaluate_generation(
    pipe,
    *,
    classes: Sequence[str],
    held_out: Sequence[str] | str | None = None,
    judge: AttributeJudge,
    clip_run=None,
    reference_images: torch.Tensor | None = None,
    inception: FeatureFn | None = None,
    num_images_per_prompt: int = 8,
    guidance_scales: Sequence[float] = (1.0, DEFAULT_GUIDANCE_SCALE),
    guidance_scale: float | None = None,
    num_inference_steps: int = 25,
    scheduler: str | None = DEFAULT_SAMPLER,
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
        inception: Inception-v3 pool3 features (`clipcond.evaluation.inception.load_inception`), for the FD in
            Inception's space, FID proper: `fd_inception` beside `fd_clip` and `fd_inception_floor` beside
            `fd_clip_floor`. None: not measured, and those keys are absent.
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
    # 1. check inputs: the scales, the classes' prompts, one generator seed per image; the generator
    scales, headline = check_scales(guidance_scales, guidance_scale)
    plan = _plan(classes, held_out, judge, prompt_template, num_images_per_prompt, seed, batch_size, scales, headline)
    is_pipeline = check_generator(pipe, reference_images)
    # 2. what does not depend on the guidance scale
    fixed = _fixed_figures(plan, judge, clip_run, reference_images, inception)
    # 3. generate and judge at every guidance scale
    generate = pipeline_generate_fn(pipe, num_inference_steps) if is_pipeline else pipe
    with prepared_pipeline(pipe, scheduler) if is_pipeline else nullcontext():
        results, images, scores = _judge_scales(generate, plan, judge, clip_run, fixed, progress)
    # 4. assemble: the headline figures first, then every scale, the judge and the settings
    metrics = {**_headline_figures(results, plan.headline, fixed), "guidance": results}
    metrics["judge"] = judge.summary()
    metrics["settings"] = {
        **{"classes": plan.names, "held_out": plan.held, "prompt_template": prompt_template},
        **{"num_images_per_prompt": num_images_per_prompt, "guidance_scales": plan.scales},
        **pipeline_settings(pipe, is_pipeline, num_inference_steps, scheduler),
        "seed": seed,
        "clip": None if clip_run is None else str(clip_run.path),
        "num_reference_images": None if reference_images is None else int(reference_images.shape[0]),
        **(extra_settings or {}),
        "seconds": round(time.perf_counter() - start, 2),
    }
    if output_dir is not None:
        write_outputs(metrics, images, scores, plan.prompts, num_images_per_prompt, output_dir)
    return metrics


# ---------------------------------------------------------------- outputs


def _write_grid(images: torch.Tensor, scores: JudgeScores, prompts: list[str], per_prompt: int, key: str, out: Path):
    """grid_guidance_<g>.png and images/guidance_<g>/<prompt>_<k>.png of one guidance scale."""
    tiles, labels = [], []
    judged_labels = scores.labels  # built once: a property over every image
    for i, image in enumerate(images):
        prompt = prompts[i // per_prompt]
        right = int(scores.colour_correct[i]) + int(scores.shape_correct[i])
        judged = judged_labels[i]
        labels.append(f"{prompt}: {judged}" if right == 2 else f"{prompt}: WRONG {judged}")
        tiles.append(judged_tile(image, scores, i))
        path = image_file(out, float(key), prompt, i % per_prompt)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image_atomic(Image.fromarray(image.permute(1, 2, 0).numpy(), "RGB"), path)
    grid = image_grid(tiles, rows=len(prompts), cols=per_prompt, labels=labels, max_label_lines=3)
    return save_image_atomic(grid, out / f"grid_guidance_{key}.png")


def _write_heatmap(metrics: dict, key: str, out: Path) -> Path:
    """accuracy_guidance_<g>.png: both-correct accuracy, colour x shape; the row labels name the held-out pairs."""
    names = metrics["settings"]["classes"]
    held = set(metrics["settings"]["held_out"])
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
    return heatmap_png(
        matrix,
        row_labels,
        shapes,
        out / f"accuracy_guidance_{key}.png",
        f"judged both-correct accuracy, guidance {key}",
        vmin=0.0,
        vmax=1.0,
        xlabel="shape",
        ylabel="colour",
    )


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
    (both-correct accuracy, colour x shape; the row labels name the held-out pairs) and images/guidance_<g>/<prompt>_<k>.png.
    An earlier evaluation's grids, heatmaps and images in `output_dir` are removed first: it may have drawn other
    guidance scales or more images per prompt, which would otherwise sit beside these metrics."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    remove_earlier_outputs(output_dir, ("grid_guidance_*.png", "accuracy_guidance_*.png", "images/guidance_*"))
    paths = []
    for key, batch in images.items():
        paths.append(_write_grid(batch, scores[key], prompts, num_images_per_prompt, key, output_dir))
        paths.append(_write_heatmap(metrics, key, output_dir))
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
    parser = eval_parser("clipcond eval generation", DESCRIPTION, model="pipeline folder (`clipcond train decoder`)")
    parser.add_argument(
        "--clip", metavar="PATH", help="CLIP run for CLIP score and FD (default: RUN/clipcond_run.json clip.path)"
    )
    parser.add_argument(
        "--allow-clip-mismatch",
        action="store_true",
        help="evaluate with a --clip other than the one the decoder was trained on (recorded in the metrics)",
    )
    parser.add_argument(
        "--split",
        default="test",
        help="split whose images are the FD reference (the shapes data: its single-object images; other data: the "
        "images of the captions used as prompts)",
    )
    parser.add_argument(
        "--num-images-per-prompt",
        type=int,
        default=None,
        help="images per prompt (default 8 on the shapes data, 1 on other data)",
    )
    parser.add_argument(
        "--max-prompts",
        type=int,
        default=DEFAULT_MAX_PROMPTS,
        help=f"other data: distinct captions of --split drawn as prompts, >= 2 (default {DEFAULT_MAX_PROMPTS})",
    )
    parser.add_argument(
        "--prompt-template",
        default=DEFAULT_PROMPT_TEMPLATE,
        help=f"prompt of a class, with {{colour}} and {{shape}} (default {DEFAULT_PROMPT_TEMPLATE!r})",
    )
    parser.add_argument("--num-inference-steps", type=int, default=25, help="denoising steps (default 25)")
    parser.add_argument(
        "--scheduler",
        choices=SCHEDULER_CHOICES,
        default=DEFAULT_SAMPLER,
        help=f"sampler (default {DEFAULT_SAMPLER}; 'saved': the run's own)",
    )
    parser.add_argument(
        "--guidance-scale",
        type=finite_float,
        default=None,
        help=f"the default guidance, whose figures are the top-level ones (default {DEFAULT_GUIDANCE_SCALE}, or the "
        "last of --guidance-scales when they do not include it)",
    )
    parser.add_argument("--guidance-scales", help="comma-separated scales to evaluate (default: 1,<--guidance-scale>)")
    parser.add_argument("--inception-weights", metavar="FILE", help=INCEPTION_HELP)
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="fp32",
        help="the pipeline's precision, as `clipcond generate --dtype` (default fp32; bf16 samples about twice as fast "
        "on CPU)",
    )
    add_judged_arguments(parser, output_dir="default RUN/eval_generation")
    return parser.parse_args(argv)


def _guidance_scales(args: argparse.Namespace) -> tuple[list[float], float]:
    """`--guidance-scales` (default: 1 and the headline) and the headline scale, `--guidance-scale` (default:
    `DEFAULT_GUIDANCE_SCALE` when evaluated, else the last scale)."""
    if args.guidance_scales:
        scales = _parse_scales(args.guidance_scales)
        default = DEFAULT_GUIDANCE_SCALE if DEFAULT_GUIDANCE_SCALE in scales else scales[-1]
        return scales, args.guidance_scale if args.guidance_scale is not None else default
    headline = args.guidance_scale if args.guidance_scale is not None else DEFAULT_GUIDANCE_SCALE
    return [1.0, headline], headline


def _check_pipeline_folder(model: str) -> None:
    if not Path(model).is_dir():
        raise FileNotFoundError(f"`--model` {model!r} does not exist")
    if not (Path(model) / "model_index.json").is_file():
        raise FileNotFoundError(
            f"`--model` {model!r} holds no model_index.json; expected a pipeline folder written with "
            "`save_pretrained` (as `clipcond train decoder` writes it)"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # 1. check the inputs before the slow loads
    _check_pipeline_folder(args.model)
    run = Path(args.model)
    if not os.path.isdir(args.data):
        raise FileNotFoundError(f"`--data` {args.data!r} does not exist")
    output_dir = Path(args.output_dir) if args.output_dir else run / "eval_generation"
    check_output_dir(output_dir)
    info = load_dataset_info(args.data)
    shapes = is_shapes_data(info)  # other data sets (`clipcond data tuxpaint`, ...) may hold a dataset_info too
    if args.num_images_per_prompt is None:
        args.num_images_per_prompt = 8 if shapes else 1
    scales, headline = _guidance_scales(args)
    check_at_least(args, 1, "num_images_per_prompt", "batch_size")
    check_at_least(args, 2, "max_prompts", note=" (the Fréchet distance needs two images of distinct captions)")
    _check_template(args.prompt_template)
    clip_path, clip_hash = resolve_clip_path(run, args.clip)
    scheduler = chosen_scheduler(args.scheduler)
    inception_weights = None if args.inception_weights is None else check_inception_weights(args.inception_weights)

    from clipcond.lineage import check_evaluation_clip
    from clipcond.pipelines.text_to_image import TextToImagePipeline

    mismatch = check_evaluation_clip(clip_path, clip_hash, what="the decoder", allow=args.allow_clip_mismatch)
    device = resolve_device(args.device)
    resolve_dtype(args.dtype, device)  # fp16 needs CUDA: say so before the slow loads
    common = {
        "num_images_per_prompt": args.num_images_per_prompt,
        "guidance_scales": scales,
        "guidance_scale": headline,
        "num_inference_steps": args.num_inference_steps,
        "scheduler": scheduler,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "output_dir": output_dir,
        "progress": not args.no_progress,
    }
    settings = {"model": str(run), "data": str(args.data), "reference_split": args.split, "clip_mismatch": mismatch}
    if inception_weights is not None:
        common["inception"] = InceptionFeatures(inception_weights, device, batch_size=args.batch_size)
        settings["inception"] = inception_weights.settings

    # 2. load the judge (shapes data), the CLIP, the reference images and the pipeline; 3. evaluate
    if not shapes:
        metrics = _evaluate_captioned_data(args, run, clip_path, device, common, settings)
    else:
        judge = load_or_train_judge(int(info["resolution"]), cache_dir=args.judge_cache_dir, device=device)
        check_palette(info, judge)
        clip_run, reference, unreadable = load_clip_and_reference(
            clip_path, args.data, args.split, device, allow_outside_paths=args.allow_outside_paths
        )
        pipe = load_pretrained(TextToImagePipeline, run, device, args.dtype)
        metrics = evaluate_generation(
            pipe,
            classes=class_names(info),
            held_out=info.get("held_out") or [],
            judge=judge,
            clip_run=clip_run,
            reference_images=reference,
            prompt_template=args.prompt_template,
            extra_settings={**settings, "unreadable_reference_images": len(unreadable)},
            **common,
        )
    print(dumps_json(finite_or_null(metrics), indent=2))
    return 0


def _evaluate_captioned_data(
    args: argparse.Namespace, run: Path, clip_path: Path, device, common: dict, settings: dict
):
    """The command on data other than the shapes: its `--split` captions as prompts (`evaluate_captioned`)."""
    from clipcond.evaluation.captioned import load_caption_set, load_split_sample
    from clipcond.models.clip import load_clip
    from clipcond.pipelines.text_to_image import TextToImagePipeline

    clip_run = load_clip(clip_path, device=device, progress=False)
    size, outside = clip_run.image_size, args.allow_outside_paths
    captions = load_caption_set(
        args.data, args.split, size, max_prompts=args.max_prompts, seed=args.seed, allow_outside_paths=outside
    )
    floor_split = "train" if args.split != "train" else None
    floor = None
    if floor_split is not None:
        floor = load_split_sample(
            args.data, floor_split, size, len(captions.prompts), seed=args.seed, allow_outside_paths=outside
        )
    pipe = load_pretrained(TextToImagePipeline, run, device, args.dtype)
    return evaluate_captioned(
        pipe,
        prompts=captions.prompts,
        real_images=captions.images,
        clip_run=clip_run,
        floor_images=floor,
        extra_settings={
            **settings,
            "floor_split": floor_split if floor is not None else None,
            "unreadable_reference_images": len(captions.unreadable),
        },
        **common,
    )


if __name__ == "__main__":
    raise SystemExit(main())
