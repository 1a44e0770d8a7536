"""Command-line options that the commands and evaluations which sample images share: the sampler, seed, device,
precision and output folder (`add_sampling_args`), the DALL-E 2 path's prior options (`add_prior_args`) and the
image-embedding decoder's guidance (`add_image_embedding_guidance_arg`, `add_guidance_interval_args`).
"""

from __future__ import annotations

import argparse

from clipcond.device import DTYPES
from clipcond.finite import finite_float
from clipcond.pipeline_loading import DEFAULT_SAMPLER, SAVED_SCHEDULER, SCHEDULER_CHOICES
from clipcond.pipelines.inputs import (
    DEFAULT_GUIDANCE_START,
    DEFAULT_IMAGE_EMBEDDING_GUIDANCE_SCALE,
    DEFAULT_PRIOR_GUIDANCE_SCALE,
    DEFAULT_PRIOR_INFERENCE_STEPS,
)
from clipcond.storage import check_output_dir


def add_sampling_args(
    parser: argparse.ArgumentParser,
    *,
    seed_help: str,
    scheduler_help: str = "sampler",
    batch_size: bool = True,
) -> None:
    """`--scheduler`, `--seed`, `--batch-size` (unless `batch_size` is False), `--device`, `--dtype` and
    `--output-dir`, in this order: how and where `generate`, `vary` and `interpolate` draw."""
    parser.add_argument(
        "--scheduler",
        choices=SCHEDULER_CHOICES,
        default=DEFAULT_SAMPLER,
        help=f"{scheduler_help} (default {DEFAULT_SAMPLER}, as the evaluations and the web page; {SAVED_SCHEDULER!r}: "
        "the one saved with the model)",
    )
    parser.add_argument("--seed", type=int, default=0, help=seed_help)
    if batch_size:
        parser.add_argument("--batch-size", type=int, default=16, help="images per pipeline call (default 16)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="weights' precision (default fp32)")
    parser.add_argument("--output-dir", required=True, help="folder for the PNGs, grid.png and images.jsonl")


def check_batch_args(args: argparse.Namespace) -> None:
    """`--output-dir` writable, `--num-images` and `--batch-size` >= 1, `--seed` >= 0 (`generate`, `vary`)."""
    check_output_dir(args.output_dir)
    for flag, value in (("--num-images", args.num_images), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ValueError(f"`{flag}` must be >= 1, got {value}")
    if args.seed < 0:
        raise ValueError(f"`--seed` must be >= 0, got {args.seed}")


def add_image_embedding_guidance_arg(parser: argparse.ArgumentParser) -> None:
    """`--guidance-scale` of the image-embedding decoder (`vary`, `interpolate`)."""
    parser.add_argument(
        "--guidance-scale",
        type=finite_float,
        default=DEFAULT_IMAGE_EMBEDDING_GUIDANCE_SCALE,
        help=f"the image-embedding decoder's classifier-free guidance; <= 1: none "
        f"(default {DEFAULT_IMAGE_EMBEDDING_GUIDANCE_SCALE:g})",
    )


def decoder_settings(args: argparse.Namespace) -> dict:
    """The image-embedding decoder's sampling options as its pipeline's keyword arguments, which the images.jsonl
    records of `vary` and `interpolate` repeat."""
    return {
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "noise_level": args.noise_level,
        "guidance_start": args.guidance_start,
        "guidance_end": args.guidance_end,
    }


def add_prior_sampling_args(parser) -> None:
    """How a prior samples: `--prior-guidance-scale` and `--prior-num-inference-steps` (a parser or an argument
    group)."""
    parser.add_argument(
        "--prior-guidance-scale",
        type=finite_float,
        default=DEFAULT_PRIOR_GUIDANCE_SCALE,
        help=f"the prior's classifier-free guidance (default {DEFAULT_PRIOR_GUIDANCE_SCALE})",
    )
    parser.add_argument(
        "--prior-num-inference-steps",
        type=int,
        default=DEFAULT_PRIOR_INFERENCE_STEPS,
        help=f"the prior's denoising steps (default {DEFAULT_PRIOR_INFERENCE_STEPS})",
    )


def add_prior_args(parser: argparse.ArgumentParser) -> None:
    """The options of the DALL-E 2 path (a prior before an image-embedding decoder): `generate`, `interpolate`."""
    unclip = parser.add_argument_group("DALL-E 2: text -> prior -> CLIP image embedding -> decoder")
    unclip.add_argument(
        "--prior",
        default=None,
        help="prior run folder (`clipcond train prior`), when --model is an image-embedding decoder run",
    )
    add_prior_sampling_args(unclip)
    unclip.add_argument(
        "--noise-level",
        type=int,
        default=0,
        help="the decoder's embedding noise augmentation (decoders trained with --noise-level only; default 0)",
    )
    add_guidance_interval_args(unclip)
    unclip.add_argument(
        "--allow-clip-mismatch",
        action="store_true",
        help="pair a prior and a decoder even when their run records name different CLIPs",
    )


def add_guidance_interval_args(parser) -> None:
    """The image-embedding decoder's guided steps (`clipcond.pipelines.inputs.guided_steps`): the prior options,
    `vary`, `eval unclip`."""
    parser.add_argument(
        "--guidance-start",
        type=finite_float,
        default=DEFAULT_GUIDANCE_START,
        help="the image-embedding decoder guides only from this fraction of the sampling steps on, counted from the "
        f"noisiest (default {DEFAULT_GUIDANCE_START}: earlier guidance washes objects out)",
    )
    parser.add_argument(
        "--guidance-end",
        type=finite_float,
        default=1.0,
        help="... and up to this fraction (default 1.0: to the last step)",
    )


def check_guidance_interval_args(args: argparse.Namespace) -> None:
    if not 0 <= args.guidance_start < args.guidance_end <= 1:
        raise ValueError(
            "`--guidance-start` and `--guidance-end` must be fractions of the sampling steps with "
            f"0 <= start < end <= 1, got {args.guidance_start} and {args.guidance_end}"
        )


def pipeline_options(args: argparse.Namespace) -> dict:
    """`clipcond.pipeline_loading.load_pipeline`'s keyword arguments from a command's flags (those it has)."""
    names = ("device", "dtype", "scheduler", "prior", "text_encoder", "allow_clip_mismatch", "allow_encoder_mismatch")
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
