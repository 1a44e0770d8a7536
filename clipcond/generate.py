"""`clipcond generate`: images from prompts with a trained pipeline folder, one PNG per image plus a labelled grid.

    clipcond generate --model runs/decoder --prompt "a red circle" --prompt "" --num-images 4 --output-dir samples

writes `samples/00000.png ...` (prompt by prompt), `samples/grid.png` (a row per prompt, labelled with it) and
`samples/images.jsonl`, one record per image with everything needed to make it again: image k is drawn from its own
generator seeded with `--seed + k`, so it comes out the same whatever the batch size, and
`--prompt P --seed S --num-images 1` with its recorded prompt and seed regenerates it alone.

The command is split so that other pipelines plug in: `clipcond.pipeline_loading.load_pipeline` builds the
pipeline (a text-to-image pipeline, or DALL-E 2's prior + decoder), `clipcond.drawing.generate_batches` calls it
with the diffusers argument names (as `clipcond serve` does), and a `clipcond.image_files.ImageWriter` (shared with
`clipcond vary` / `interpolate`) writes each batch's files as soon as it is drawn.

Text-to-image through a prior (DALL-E 2): `--model` an image-embedding decoder run and `--prior` a prior run, or
`--model` an `UnCLIPTextToImagePipeline` folder (saved with both), with the prior's own `--prior-guidance-scale` and
`--prior-num-inference-steps`:

    clipcond generate --model runs/unclip_decoder --prior runs/prior --prompt "a red circle" --output-dir samples
"""

from __future__ import annotations

import argparse
import os
import time

from clipcond.drawing import check_text_to_image, generate_batches
from clipcond.finite import finite_float
from clipcond.image_files import ImageWriter
from clipcond.pipeline_loading import load_pipeline, pipeline_class_name
from clipcond.pipelines.inputs import DEFAULT_IMAGE_EMBEDDING_GUIDANCE_SCALE, DEFAULT_TEXT_GUIDANCE_SCALE
from clipcond.sampling_options import (
    add_prior_args,
    add_sampling_args,
    check_batch_args,
    check_guidance_interval_args,
    pipeline_options,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="clipcond generate",
        description="Generate images from text prompts with a trained pipeline folder (written with save_pretrained).",
    )
    parser.add_argument(
        "--model",
        required=True,
        help="pipeline folder (model_index.json + component folders): a text-to-image or unCLIP pipeline, or an "
        "image-embedding decoder run (with --prior)",
    )
    parser.add_argument(
        "--prompt", action="append", default=[], help='a prompt; repeat for several; "" generates unconditionally'
    )
    parser.add_argument("--prompts-file", help="a text file with one prompt a line (blank lines are skipped)")
    parser.add_argument("--negative-prompt", default=None, help="what guidance steers away from (default: none)")
    parser.add_argument("--num-images", type=int, default=4, help="images per prompt (default 4)")
    parser.add_argument("--num-inference-steps", type=int, default=25, help="denoising steps (default 25)")
    parser.add_argument(
        "--guidance-scale",
        type=finite_float,
        default=None,
        help=f"classifier-free guidance weight; <= 1: none (default {DEFAULT_TEXT_GUIDANCE_SCALE:g} for a "
        f"text-to-image decoder, {DEFAULT_IMAGE_EMBEDDING_GUIDANCE_SCALE:g} for the image-embedding decoder through a "
        "prior)",
    )
    add_sampling_args(parser, seed_help="image k is drawn with seed + k (default 0)")
    parser.add_argument(
        "--text-encoder",
        default=None,
        metavar="SPEC",
        help="a text-to-image run with another frozen encoder than the one saved with it (clipcond.encoders spec: "
        "clipcond:RUN, transformers:PATH, open_clip:MODEL@WEIGHTS, t5:PATH); refused unless it is the encoder the "
        "run was trained on, or --allow-encoder-mismatch",
    )
    parser.add_argument(
        "--allow-encoder-mismatch",
        action="store_true",
        help="use --text-encoder even when the run records another encoder (the widths must still fit)",
    )
    add_prior_args(parser)
    return parser.parse_args(argv)


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The `--prompt`s in order, then the lines of `--prompts-file`."""
    prompts = list(args.prompt)
    if args.prompts_file is not None:
        if not os.path.isfile(args.prompts_file):
            raise FileNotFoundError(f"`--prompts-file` {args.prompts_file!r} does not exist")
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts += [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError('no prompt given: pass `--prompt TEXT` (`--prompt ""` for unconditional) or `--prompts-file`')
    return prompts


def check_args(args: argparse.Namespace) -> None:
    check_batch_args(args)
    if getattr(args, "num_inference_steps", None) is not None and args.num_inference_steps < 1:
        raise ValueError(f"`--num-inference-steps` must be >= 1, got {args.num_inference_steps}")
    if getattr(args, "prior_num_inference_steps", 1) < 1:
        raise ValueError(f"`--prior-num-inference-steps` must be >= 1, got {args.prior_num_inference_steps}")
    if getattr(args, "noise_level", 0) < 0:
        raise ValueError(f"`--noise-level` must be >= 0, got {args.noise_level}")
    check_guidance_interval_args(args)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_args(args)
    prompts = read_prompts(args)
    check_text_to_image(pipeline_class_name(args.model), args)  # before loading anything
    start = time.perf_counter()
    pipe = load_pipeline(args.model, **pipeline_options(args))
    writer = ImageWriter(args.output_dir)
    for images, records in generate_batches(pipe, prompts, args):
        writer.add(images, records)
    labels = [record["prompt"] or "(unconditional)" for record in writer.records]
    grid_path = writer.finish(grid_rows=len(prompts), labels=labels)
    print(
        f"clipcond generate: {len(writer.images)} images ({len(prompts)} prompts x {args.num_images}) in "
        f"{time.perf_counter() - start:.1f} s -> {args.output_dir} (grid: {grid_path})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
