"""`clipcond vary`: variations of images with an image-embedding decoder (DALL-E 2's image variations).

    clipcond vary --model runs/unclip_decoder circle.png square.png --num-images 4 --output-dir variations

Each image is embedded with the decoder's CLIP vision tower and decoded `--num-images` times. It writes
`variations/00000.png ...` (source by source), `variations/grid.png` (a row per source: the source image, then its
variations) and `variations/images.jsonl`, one record per variation naming its source image and everything needed to
make it again: variation k is drawn from its own generator seeded with `--seed + k`, so it comes out the same
whatever the batch size. `--model` is the run folder of `clipcond train decoder --conditioning image-embedding`
(an `ImageVariationPipeline`), or an `UnCLIPTextToImagePipeline` folder, whose decoder is used.
"""

from __future__ import annotations

import argparse
import os
import time

from clipcond.drawing import vary_batches
from clipcond.image_files import ImageWriter, read_images
from clipcond.pipeline_loading import (
    check_reads_images,
    decoder_of,
    load_pipeline,
    pipeline_class_name,
)
from clipcond.sampling_options import (
    add_guidance_interval_args,
    add_image_embedding_guidance_arg,
    add_sampling_args,
    check_batch_args,
    check_guidance_interval_args,
    pipeline_options,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="clipcond vary",
        description="Variations of images with an image-embedding decoder (a CLIP image embedding -> new images).",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files to vary")
    parser.add_argument(
        "--model", required=True, help="decoder run folder (`clipcond train decoder --conditioning image-embedding`)"
    )
    parser.add_argument("--num-images", type=int, default=4, help="variations per image (default 4)")
    parser.add_argument("--num-inference-steps", type=int, default=25, help="denoising steps (default 25)")
    add_image_embedding_guidance_arg(parser)
    parser.add_argument(
        "--noise-level",
        type=int,
        default=0,
        help="noise augmentation of the embedding (decoders trained with --noise-level only): more variety (default 0)",
    )
    add_guidance_interval_args(parser)
    add_sampling_args(parser, seed_help="variation k is drawn with seed + k (default 0)")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    check_batch_args(args)
    if args.noise_level < 0:
        raise ValueError(f"`--noise-level` must be >= 0, got {args.noise_level}")
    check_guidance_interval_args(args)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_args(args)
    sources = read_images(args.images)
    check_reads_images(pipeline_class_name(args.model), args.model)  # before loading anything
    start = time.perf_counter()
    pipe = decoder_of(load_pipeline(args.model, **pipeline_options(args)), args.model)
    writer = ImageWriter(args.output_dir)
    for batch_images, batch_records in vary_batches(pipe, sources, args):
        writer.add(batch_images, batch_records)
    images, records = writer.images, writer.records
    # The grid: a row per source, the source (at the output size) first, then its variations.
    size = images[0].size
    grid, labels = [], []
    for s, source in enumerate(sources):
        grid.append(source.resize(size) if source.size != size else source)
        labels.append(os.path.basename(args.images[s]))
        row = images[s * args.num_images : (s + 1) * args.num_images]
        grid += row
        labels += [f"seed {r['seed']}" for r in records[s * args.num_images : (s + 1) * args.num_images]]
    grid_path = writer.finish(grid_rows=len(sources), labels=labels, grid_images=grid)
    print(
        f"clipcond vary: {len(images)} variations ({len(sources)} images x {args.num_images}) in "
        f"{time.perf_counter() - start:.1f} s -> {args.output_dir} (grid: {grid_path})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
