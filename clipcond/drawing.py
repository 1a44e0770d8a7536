"""What the sampling commands draw, batch by batch, with a record per image: text-to-image (`generate_batches`, for
`clipcond generate` and `clipcond serve`) and variations of images (`vary_batches`, for `clipcond vary` and `clipcond
serve`). `args` is the command's parsed flags, or any object with the same attributes (`clipcond.app` builds one
per request), so that a page and the command line draw the same images and write the same records.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterator, Sequence

from clipcond.image_files import decoder_record, image_record
from clipcond.pipeline_loading import decoder_of, is_unclip, scheduler_name
from clipcond.pipelines.inputs import DEFAULT_IMAGE_EMBEDDING_GUIDANCE_SCALE, DEFAULT_TEXT_GUIDANCE_SCALE
from clipcond.sampling_options import decoder_settings

# Called after each batch with (images drawn so far, images in all).
Progress = Callable[[int, int], None]


def check_text_to_image(class_name: str, args: argparse.Namespace) -> None:
    """Refuse a pipeline class that cannot draw from text (an image-embedding decoder without a prior)."""
    if class_name == "ImageVariationPipeline" and getattr(args, "prior", None) is None:
        raise ValueError(
            f"`--model` {os.fspath(args.model)!r} is an image-embedding decoder: to generate from text, pair it with "
            "a prior (`--prior PRIOR_RUN`); for variations of images use `clipcond vary`"
        )


def prior_settings(pipe, args: argparse.Namespace) -> dict:
    """The DALL-E 2 path's extra pipeline arguments (empty for other pipelines); they go into the records too."""
    if not is_unclip(pipe):
        return {}
    return {
        "prior_guidance_scale": args.prior_guidance_scale,
        "prior_num_inference_steps": args.prior_num_inference_steps,
        "noise_level": args.noise_level,
        "guidance_start": args.guidance_start,
        "guidance_end": args.guidance_end,
    }


def generate_batches(
    pipe, prompts: Sequence[str], args: argparse.Namespace, progress: Progress | None = None
) -> Iterator[tuple[list, list[dict]]]:
    """`--num-images` images per prompt, in batches of `--batch-size`, each from its own generator (seed + index).

    Yields each batch's PIL images and one record per image as soon as the batch is drawn, in order (all images of
    the first prompt first), so that the caller can write them before the next batch; `progress` hears of each.
    """
    import torch

    check_text_to_image(type(pipe).__name__, args)
    if args.guidance_scale is None:  # each path's measured default
        from clipcond.pipelines.text_to_image import TextToImagePipeline

        plain = isinstance(pipe, TextToImagePipeline)
        args.guidance_scale = DEFAULT_TEXT_GUIDANCE_SCALE if plain else DEFAULT_IMAGE_EMBEDDING_GUIDANCE_SCALE
    settings = prior_settings(pipe, args)
    extra = {**({"prior": os.fspath(args.prior)} if getattr(args, "prior", None) else {}), **settings}
    per_image = [prompt for prompt in prompts for _ in range(args.num_images)]
    jobs = [(prompt, args.seed + index) for index, prompt in enumerate(per_image)]  # image k: seed + k
    scheduler = scheduler_name(pipe.scheduler)
    pipe.set_progress_bar_config(disable=progress is None)  # a caller that follows progress sees each step
    for start in range(0, len(jobs), args.batch_size):
        batch = jobs[start : start + args.batch_size]
        # CPU generators: the same seed gives the same noise on any device.
        generators = [torch.Generator("cpu").manual_seed(seed) for _, seed in batch]
        output = pipe(
            prompt=[prompt for prompt, _ in batch],
            negative_prompt=args.negative_prompt,
            num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale,
            generator=generators,
            output_type="pil",
            **settings,
        )
        records = [
            {
                **image_record(
                    index,
                    prompt,
                    seed,
                    negative_prompt=args.negative_prompt,
                    num_inference_steps=args.num_inference_steps,
                    guidance_scale=args.guidance_scale,
                    scheduler=scheduler,
                    model=args.model,
                    dtype=args.dtype,
                ),
                **extra,
            }
            for index, (prompt, seed) in enumerate(batch, start=start)
        ]
        if progress is not None:
            progress(start + len(batch), len(jobs))
        yield output.images, records


def vary_batches(
    pipe, sources: list, args: argparse.Namespace, progress: Progress | None = None
) -> Iterator[tuple[list, list[dict]]]:
    """`--num-images` variations of each source image (`args.images`: their names, for the records), in batches of
    `--batch-size`, each from its own generator (seed + index). Yields each batch's PIL images and one record per
    image as soon as it is drawn, source by source; `progress` hears of each."""
    import torch

    per_image = [s for s in range(len(sources)) for _ in range(args.num_images)]
    jobs = [(s, args.seed + index) for index, s in enumerate(per_image)]  # (source, seed); variation k: seed + k
    scheduler = scheduler_name(pipe.scheduler)
    settings = decoder_settings(args)
    pipe.set_progress_bar_config(disable=progress is None)  # a caller that follows progress sees each step
    for start in range(0, len(jobs), args.batch_size):
        batch = jobs[start : start + args.batch_size]
        generators = [torch.Generator("cpu").manual_seed(seed) for _, seed in batch]
        output = pipe(image=[sources[s] for s, _ in batch], generator=generators, output_type="pil", **settings)
        records = [
            decoder_record(
                index, seed, settings, scheduler=scheduler, model=args.model, source=args.images[s], source_index=s
            )
            for index, (s, seed) in enumerate(batch, start=start)
        ]
        if progress is not None:
            progress(start + len(batch), len(jobs))
        yield output.images, records


def interpolation_row(
    pipe, args: argparse.Namespace, sources: list | None = None, progress: Progress | None = None
) -> tuple[list, list[dict], list[str]]:
    """The row of `args.steps` frames between `args.prompts` (through `pipe`'s prior) or the images `sources`
    (named `args.images` in the records), all decoded from one noise seeded with `args.seed`: the frames, their
    records (with t) and their grid labels; `progress` hears of the row when it is drawn."""
    import torch

    pipe.set_progress_bar_config(disable=progress is None)  # a caller that follows progress sees each step
    settings = decoder_settings(args)
    common = {
        "num_frames": args.steps,
        "generator": torch.Generator("cpu").manual_seed(args.seed),
        "output_type": "pil",
        **settings,
    }
    if args.prompts:
        output = pipe.interpolate(
            prompt=list(args.prompts),
            negative_prompt=args.negative_prompt,
            prior_num_inference_steps=args.prior_num_inference_steps,
            prior_guidance_scale=args.prior_guidance_scale,
            **common,
        )
        ends = list(args.prompts)
        prior = {
            "prior": os.fspath(args.prior) if args.prior else None,
            "negative_prompt": args.negative_prompt,
            "prior_num_inference_steps": args.prior_num_inference_steps,
            "prior_guidance_scale": args.prior_guidance_scale,
        }
    else:
        output = decoder_of(pipe, args.model).interpolate(image=sources, **common)
        ends, prior = list(args.images), {}
    kind = "prompts" if args.prompts else "images"
    scheduler = scheduler_name(pipe.scheduler)
    records = [
        {
            **decoder_record(index, args.seed, settings, scheduler=scheduler, model=args.model, t=t, **{kind: ends}),
            **prior,
        }
        for index, t in enumerate(output.t)
    ]
    labels = [f"t={t:.2f}" for t in output.t]
    labels[0], labels[-1] = f"{ends[0]} (t=0)", f"{ends[1]} (t=1)"
    if progress is not None:
        progress(len(records), len(records))
    return output.images, records, labels
