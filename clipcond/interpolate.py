"""`clipcond interpolate`: a row of images between two prompts or two images (DALL-E 2, Ramesh et al. 2022 sec. 3).

    clipcond interpolate --model runs/unclip_decoder --prior runs/prior --prompts "a red circle" "a blue square" \\
        --steps 8 --output-dir row
    clipcond interpolate --model runs/unclip_decoder --images a.png b.png --steps 8 --output-dir row

The two endpoints' CLIP image embeddings (from the prior, both sampled with the same seed, or from the images) are
interpolated spherically (`clipcond.pipelines.interpolation.slerp`) at `--steps` evenly spaced positions t in [0, 1],
endpoints included, and every frame is decoded from the same noise (seeded with `--seed`): only the embedding
changes along the row, and the end frames are what `clipcond generate` / `clipcond vary` draw for the endpoints
with `--seed`. It writes `row/00000.png ...`, `row/grid.png` (one row, labelled with t) and `row/images.jsonl` (one
record per frame with its t).
"""

from __future__ import annotations

import argparse
import os
import time

from clipcond.drawing import interpolation_row
from clipcond.image_files import ImageWriter, read_images
from clipcond.pipeline_loading import (
    check_reads_images,
    is_unclip,
    load_pipeline,
    pipeline_class_name,
)
from clipcond.sampling_options import (
    add_image_embedding_guidance_arg,
    add_prior_args,
    add_sampling_args,
    check_guidance_interval_args,
    pipeline_options,
)
from clipcond.storage import check_output_dir


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="clipcond interpolate",
        description="Images between two prompts (through a prior) or two images, along the CLIP image embedding.",
    )
    parser.add_argument(
        "--model",
        required=True,
        help="image-embedding decoder run folder (with --prior for prompts), or an unCLIP pipeline folder",
    )
    ends = parser.add_mutually_exclusive_group(required=True)
    ends.add_argument("--prompts", nargs=2, metavar=("A", "B"), help="two prompts (needs a prior)")
    ends.add_argument("--images", nargs=2, metavar=("A", "B"), help="two image files")
    parser.add_argument("--steps", type=int, default=8, help="frames in the row, both endpoints included (default 8)")
    parser.add_argument("--negative-prompt", default=None, help="what the prior's guidance steers away from")
    parser.add_argument(
        "--num-inference-steps", type=int, default=25, help="the decoder's denoising steps (default 25)"
    )
    add_image_embedding_guidance_arg(parser)
    add_sampling_args(
        parser,
        seed_help="seed of the noise every frame shares (default 0)",
        scheduler_help="decoder sampler",
        batch_size=False,
    )
    add_prior_args(parser)
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    check_output_dir(args.output_dir)
    if args.steps < 2:
        raise ValueError(f"`--steps` must be >= 2 (the row includes both endpoints), got {args.steps}")
    if args.seed < 0:
        raise ValueError(f"`--seed` must be >= 0, got {args.seed}")
    if args.num_inference_steps < 1:
        raise ValueError(f"`--num-inference-steps` must be >= 1, got {args.num_inference_steps}")
    if args.prior_num_inference_steps < 1:
        raise ValueError(f"`--prior-num-inference-steps` must be >= 1, got {args.prior_num_inference_steps}")
    check_guidance_interval_args(args)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_args(args)
    sources = read_images(args.images, "--images file") if args.images else None
    class_name = pipeline_class_name(args.model)  # checks before loading anything
    check_reads_images(class_name, args.model)
    if args.prompts and not (class_name == "UnCLIPTextToImagePipeline" or args.prior):
        raise ValueError(
            f"`--prompts` need a prior: pass `--prior PRIOR_RUN` with `--model` {os.fspath(args.model)!r}, or an "
            "unCLIP pipeline folder as `--model`; without one, interpolate between `--images`"
        )
    start = time.perf_counter()
    pipe = load_pipeline(args.model, **pipeline_options(args))
    assert not args.prompts or is_unclip(pipe), "a prior comes with --prior or the unCLIP folder"
    images, records, labels = interpolation_row(pipe, args, sources)
    writer = ImageWriter(args.output_dir)
    writer.add(images, records)  # the row is one batch: its frames share their noise
    grid_path = writer.finish(grid_rows=1, labels=labels)
    ends = records[0]["prompts" if args.prompts else "images"]
    print(
        f"clipcond interpolate: {len(images)} frames between {ends[0]!r} and {ends[1]!r} in "
        f"{time.perf_counter() - start:.1f} s -> {args.output_dir} (grid: {grid_path})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
