"""How the generation evaluations draw images: from a diffusers text-to-image pipeline or any `generate(prompts,
guidance_scale, generators)` callable, image k of a prompt from its own generator seeded `image_seed(seed, prompt,
k)`, at each guidance scale. Shared by the judged evaluation of the shapes data (`clipcond.evaluation.generation`)
and the CLIP-space one of any captioned data (`clipcond.evaluation.captioned`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from clipcond.device import dtype_name
from clipcond.evaluation.judged import call_pipeline, derived_seed, draw_seeded
from clipcond.finite import is_finite_number
from clipcond.pipeline_loading import scheduler_name, use_scheduler

# generate(prompts, guidance_scale, generators) -> uint8 images (len(prompts), 3, H, W); generators[i] draws image i.
GenerateFn = Callable[[list[str], float, list[torch.Generator]], torch.Tensor]


def image_seed(seed: int, prompt: str, index: int) -> int:
    """The seed of the `index`-th image of `prompt`: the same at every guidance scale and whatever else is evaluated,
    so that figures at two guidance scales compare the same initial noise."""
    return derived_seed("clipcond-eval-generation", seed, prompt, index)


def pipeline_generate_fn(pipe, num_inference_steps: int) -> GenerateFn:
    """A `GenerateFn` over a diffusers text-to-image pipeline with the standard argument names."""

    def generate(prompts: list[str], guidance_scale: float, generators: list[torch.Generator]) -> torch.Tensor:
        return call_pipeline(
            pipe,
            generators,
            prompt=list(prompts),
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
        )

    return generate


@contextmanager
def prepared_pipeline(pipe, scheduler: str | None) -> Iterator[None]:
    """The pipeline with `scheduler` swapped in and its progress bar off; both restored afterwards."""
    previous_scheduler = pipe.scheduler
    previous_bar = dict(getattr(pipe, "_progress_bar_config", {}))
    use_scheduler(pipe, scheduler)
    pipe.set_progress_bar_config(disable=True)
    try:
        yield
    finally:
        pipe.scheduler = previous_scheduler
        pipe._progress_bar_config = previous_bar


def is_diffusers_pipeline(obj) -> bool:
    """Whether `obj` is a diffusers pipeline (else, for an evaluation, a generate callable)."""
    if "diffusers" not in sys.modules:  # then obj cannot be a pipeline; importing diffusers costs seconds
        return False
    from diffusers import DiffusionPipeline

    return isinstance(obj, DiffusionPipeline)


def check_scales(guidance_scales: Sequence[float], guidance_scale: float | None) -> tuple[list[float], float]:
    """The scales to evaluate, the headline one (default: the last) among them, each >= 1."""
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
    return scales, headline


def check_generator(pipe, reference_images: torch.Tensor | None) -> bool:
    """Whether `pipe` is a diffusers pipeline (else a generate callable); refuses anything else, and reference images
    that are not uint8 (N, 3, H, W)."""
    if reference_images is not None and (reference_images.dtype != torch.uint8 or reference_images.ndim != 4):
        raise ValueError(
            f"`reference_images` must be uint8 (N, 3, H, W), got {reference_images.dtype} {tuple(reference_images.shape)}"
        )
    is_pipeline = is_diffusers_pipeline(pipe)
    if not is_pipeline and not callable(pipe):
        raise ValueError(f"`pipe` must be a diffusers pipeline or a generate callable, got {type(pipe).__name__}")
    return is_pipeline


def draw_prompts(
    generate: GenerateFn,
    prompts: list[str],
    per_prompt: int,
    guidance_scale: float,
    *,
    seed: int,
    batch_size: int,
    bar,
) -> torch.Tensor:
    """Images uint8 (len(prompts) * per_prompt, 3, H, W), prompt by prompt, image k of a prompt drawn from a
    generator seeded `image_seed(seed, prompt, k)`; in batches of `batch_size`, each checked."""
    jobs = [(p, k) for p in range(len(prompts)) for k in range(per_prompt)]
    return draw_seeded(
        lambda batch, generators: generate([prompts[p] for p, _ in batch], guidance_scale, generators),
        jobs,
        lambda job: image_seed(seed, prompts[job[0]], job[1]),
        batch_size,
        bar,
        "the generator",
        lambda n: f"{n} prompts",
    )


def scale_key(guidance_scale: float) -> str:
    """The key of a guidance scale's figures and image folders ("3.0")."""
    return str(float(guidance_scale))


def pipeline_settings(pipe, is_pipeline: bool, num_inference_steps: int, scheduler: str | None) -> dict:
    """How a pipeline sampled (None for a generate callable, whose sampling the evaluation does not see)."""
    return {
        "num_inference_steps": num_inference_steps if is_pipeline else None,
        "scheduler": (scheduler or scheduler_name(pipe.scheduler)) if is_pipeline else None,
        "dtype": dtype_name(pipe.unet.dtype) if is_pipeline else None,
    }
