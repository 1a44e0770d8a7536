"""Command-line options that the commands and evaluations which sample images share: the DALL-E 2 path's prior
options (`add_prior_args`) and the image-embedding decoder's guided steps (`add_guidance_interval_args`).
"""

from __future__ import annotations

import argparse

from clipcond.finite import finite_float
from clipcond.pipelines.inputs import DEFAULT_GUIDANCE_START


def add_prior_args(parser: argparse.ArgumentParser) -> None:
    """The options of the DALL-E 2 path (a prior before an image-embedding decoder): `generate`, `interpolate`."""
    unclip = parser.add_argument_group("DALL-E 2: text -> prior -> CLIP image embedding -> decoder")
    unclip.add_argument(
        "--prior",
        default=None,
        help="prior run folder (`clipcond train prior`), when --model is an image-embedding decoder run",
    )
    unclip.add_argument(
        "--prior-guidance-scale",
        type=finite_float,
        default=4.0,
        help="the prior's classifier-free guidance (default 4.0)",
    )
    unclip.add_argument(
        "--prior-num-inference-steps", type=int, default=25, help="the prior's denoising steps (default 25)"
    )
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
