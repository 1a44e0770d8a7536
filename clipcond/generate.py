"""`clipcond generate`: images from prompts with a trained pipeline folder, one PNG per image plus a labelled grid.

    clipcond generate --model runs/decoder --prompt "a red circle" --prompt "" --num-images 4 --output-dir samples

writes `samples/00000.png ...` (prompt by prompt), `samples/grid.png` (a row per prompt, labelled with it) and
`samples/images.jsonl`, one record per image with everything needed to make it again: image k is drawn from its own
generator seeded with `--seed + k`, so it comes out the same whatever the batch size, and
`--prompt P --seed S --num-images 1` with its recorded prompt and seed regenerates it alone.

The command is split so that other pipelines plug in: `load_pipeline(args)` builds the pipeline (a text-to-image
pipeline, or DALL-E 2's prior + decoder), `generate_batches` calls it with the diffusers argument names, and
an `ImageWriter` (shared with `clipcond vary` / `interpolate`) writes each batch's files as soon as it is drawn.

Text-to-image through a prior (DALL-E 2): `--model` an image-embedding decoder run and `--prior` a prior run, or
`--model` an `UnCLIPTextToImagePipeline` folder (saved with both), with the prior's own `--prior-guidance-scale` and
`--prior-num-inference-steps`:

    clipcond generate --model runs/unclip_decoder --prior runs/prior --prompt "a red circle" --output-dir samples
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from clipcond.finite import finite_float
from clipcond.lineage import check_finished
from clipcond.pipelines.inputs import (
    DEFAULT_GUIDANCE_START,
    DEFAULT_IMAGE_EMBEDDING_GUIDANCE_SCALE,
    DEFAULT_TEXT_GUIDANCE_SCALE,
)
from clipcond.storage import check_output_dir, dumps_json, writing

DTYPES = ("fp32", "bf16", "fp16")
# The keys of `clipcond.pipelines.text_to_image.SCHEDULERS`, spelled out so that `--help` needs no diffusers import.
SCHEDULER_NAMES = ("ddim", "ddpm", "dpm", "euler", "unipc")


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
    parser.add_argument(
        "--scheduler", choices=SCHEDULER_NAMES, default=None, help="sampler (default: the one saved with the model)"
    )
    parser.add_argument("--seed", type=int, default=0, help="image k is drawn with seed + k (default 0)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per pipeline call (default 16)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="weights' precision (default fp32)")
    parser.add_argument("--output-dir", required=True, help="folder for the PNGs, grid.png and images.jsonl")
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


def add_prior_args(parser: argparse.ArgumentParser) -> None:
    """The options of the DALL-E 2 path (a prior before an image-embedding decoder); shared with `interpolate`."""
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
    """The image-embedding decoder's guided steps (`clipcond.pipelines.inputs.guided_steps`); shared with `vary`."""
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
    check_output_dir(args.output_dir)
    for flag, value in (("--num-images", args.num_images), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ValueError(f"`{flag}` must be >= 1, got {value}")
    if args.seed < 0:
        raise ValueError(f"`--seed` must be >= 0, got {args.seed}")
    if getattr(args, "num_inference_steps", None) is not None and args.num_inference_steps < 1:
        raise ValueError(f"`--num-inference-steps` must be >= 1, got {args.num_inference_steps}")
    if getattr(args, "prior_num_inference_steps", 1) < 1:
        raise ValueError(f"`--prior-num-inference-steps` must be >= 1, got {args.prior_num_inference_steps}")
    if getattr(args, "noise_level", 0) < 0:
        raise ValueError(f"`--noise-level` must be >= 0, got {args.noise_level}")
    check_guidance_interval_args(args)


def resolve_device(name: str | None):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"`--device` {name!r} asks for CUDA, but no CUDA device is available")
    return device


def resolve_dtype(name: str, device):
    import torch

    if name == "fp16" and device.type != "cuda":
        raise ValueError(f"`--dtype fp16` needs a CUDA device, got `--device` {device.type!r}; use fp32 or bf16")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def dtype_name(dtype) -> str:
    """torch.float32 -> "fp32", the `--dtype` name of a floating dtype (inverse of `resolve_dtype`)."""
    import torch

    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    if dtype not in names:
        raise ValueError(f"`dtype` must be one of {sorted(map(str, names))}, got {dtype}")
    return names[dtype]


# The pipelines `load_pipeline` reads, by the `_class_name` of their model_index.json.
PIPELINE_CLASSES = ("TextToImagePipeline", "ImageVariationPipeline", "UnCLIPTextToImagePipeline")


def pipeline_class_name(model: str | os.PathLike, flag: str = "--model") -> str:
    """The `_class_name` in the model_index.json of a pipeline folder, checking that there is one."""
    model = os.fspath(model)
    if not os.path.isdir(model):
        raise FileNotFoundError(f"`{flag}` {model!r} does not exist")
    check_finished(model, f"`{flag}`")
    index = os.path.join(model, "model_index.json")
    if not os.path.isfile(index):
        raise FileNotFoundError(
            f"`{flag}` {model!r} holds no model_index.json; expected a pipeline folder written with "
            "`save_pretrained` (as the training commands write it)"
        )
    try:
        with open(index, encoding="utf-8") as f:
            return json.load(f).get("_class_name", "")
    except (json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"`{flag}` {model!r}: model_index.json is not a JSON object ({err})") from None


def load_pipeline(args: argparse.Namespace):
    """The pipeline named by `--model` (and `--prior`), on `--device` in `--dtype`, with `--scheduler` swapped in
    if given: a `TextToImagePipeline`, an `ImageVariationPipeline` (an image-embedding decoder run), or an
    `UnCLIPTextToImagePipeline` (a folder saved as one, or `--model` a decoder run paired with `--prior`)."""
    from clipcond.pipelines.text_to_image import TextToImagePipeline, scheduler_from_name

    model = os.fspath(args.model)
    class_name = pipeline_class_name(model)
    prior = getattr(args, "prior", None)
    if getattr(args, "text_encoder", None) and (prior is not None or class_name != "TextToImagePipeline"):
        raise ValueError(
            f"`--text-encoder` swaps the encoder of a text-to-image run, but `--model` {model!r} holds a "
            f"{class_name or 'pipeline of unknown class'}{' paired with --prior' if prior else ''}"
        )
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    load_kwargs = {"local_files_only": True, dtype_keyword(): dtype}
    if prior is not None:
        from clipcond.pipelines.unclip import UnCLIPTextToImagePipeline

        if class_name != "ImageVariationPipeline":
            raise ValueError(
                f"`--prior` pairs a prior with an image-embedding decoder run, but `--model` {model!r} holds a "
                f"{class_name or 'pipeline of unknown class'}; pass the output folder of "
                "`clipcond train decoder --conditioning image-embedding`"
            )
        pipeline_class_name(prior, "--prior")
        allow = getattr(args, "allow_clip_mismatch", False)
        pipe = UnCLIPTextToImagePipeline.from_runs(prior, model, allow_clip_mismatch=allow, **load_kwargs)
    elif class_name == "UnCLIPTextToImagePipeline":
        from clipcond.pipelines.unclip import UnCLIPTextToImagePipeline

        pipe = UnCLIPTextToImagePipeline.from_pretrained(model, **load_kwargs)
    elif class_name == "ImageVariationPipeline":
        from clipcond.pipelines.variation import ImageVariationPipeline

        pipe = ImageVariationPipeline.from_pretrained(model, **load_kwargs)
    elif class_name == "TextToImagePipeline" and getattr(args, "text_encoder", None):
        from clipcond.encoders import load_text_to_image

        allow = getattr(args, "allow_encoder_mismatch", False)
        pipe = load_text_to_image(model, args.text_encoder, allow_encoder_mismatch=allow, **{dtype_keyword(): dtype})
    elif class_name == "TextToImagePipeline":
        pipe = TextToImagePipeline.from_pretrained(model, **load_kwargs)
    else:
        raise ValueError(
            f"`--model` {model!r} holds a {class_name or 'pipeline of unknown class'}; expected one of "
            f"{list(PIPELINE_CLASSES)} (the folders `clipcond train decoder` writes, or an unCLIP pipeline)"
        )
    pipe = pipe.to(device)
    if pipe.unet.dtype != dtype:  # a diffusers that ignored the keyword
        pipe.to(dtype=dtype)
    if args.scheduler is not None:
        pipe.scheduler = scheduler_from_name(args.scheduler, pipe.scheduler.config)
    return pipe


def load_pretrained(pipeline_class, path: str | os.PathLike, device, dtype: str):
    """`pipeline_class.from_pretrained(path)` (local files only) on `device` (a torch.device) in `dtype` ("fp32",
    "bf16" or "fp16", as `--dtype`)."""
    torch_dtype = resolve_dtype(dtype, device)
    pipe = pipeline_class.from_pretrained(path, local_files_only=True, **{dtype_keyword(): torch_dtype}).to(device)
    if pipe.unet.dtype != torch_dtype:  # a diffusers that ignored the keyword
        pipe.to(dtype=torch_dtype)
    return pipe


def dtype_keyword() -> str:
    """diffusers (by 0.42) renamed from_pretrained's `torch_dtype` to `dtype` (huggingface/diffusers#14205) and warns
    on the old name; casting with `.to` afterwards warns too, so pass the name this version expects."""
    import diffusers
    from packaging.version import Version

    return "dtype" if Version(diffusers.__version__) >= Version("0.42.0") else "torch_dtype"


def scheduler_name(scheduler) -> str:
    """The `--scheduler` name of a scheduler, or its class name when it is none of them."""
    from clipcond.pipelines.text_to_image import SCHEDULERS

    names = [name for name, cls in SCHEDULERS.items() if type(scheduler) is cls]
    return names[0] if names else type(scheduler).__name__


def is_unclip(pipe) -> bool:
    return type(pipe).__name__ == "UnCLIPTextToImagePipeline"


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


def generate_batches(pipe, prompts: Sequence[str], args: argparse.Namespace) -> Iterator[tuple[list, list[dict]]]:
    """`--num-images` images per prompt, in batches of `--batch-size`, each from its own generator (seed + index).

    Yields each batch's PIL images and one record per image as soon as the batch is drawn, in order (all images of
    the first prompt first), so that the caller can write them before the next batch.
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
    pipe.set_progress_bar_config(disable=True)
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
        yield output.images, records


def image_record(
    index: int,
    prompt: str,
    seed: int,
    *,
    negative_prompt: str | None,
    num_inference_steps: int,
    guidance_scale: float,
    scheduler: str,
    model: str | os.PathLike,
    dtype: str,
) -> dict:
    """The images.jsonl record of image `index`: what `clipcond generate --seed SEED --num-images 1` with these
    settings needs to draw it again (`dtype`: the `--dtype` it was drawn in)."""
    return {
        "file_name": f"{index:05d}.png",
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "seed": seed,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "scheduler": scheduler,
        "model": os.fspath(model),
        "dtype": dtype,
    }


class ImageWriter:
    """Writes generated images into `output_dir` as they are drawn: each image as `<record["file_name"]>` and its
    record as a line of `images.jsonl` (after the PNGs it names), batch by batch, so that a crash loses at most the
    batch being drawn; then the grid (`finish`). A full disk raises `DiskFullError` naming the file."""

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.records_path = self.output_dir / "images.jsonl"
        with writing(self.records_path):
            self.records_path.write_text("", encoding="utf-8")  # a previous run's records go
        self.images: list = []
        self.records: list[dict] = []

    def add(self, images: Sequence, records: Sequence[dict]) -> None:
        if len(images) != len(records):
            raise ValueError(f"got {len(images)} images but {len(records)} records")
        for image, record in zip(images, records):
            path = self.output_dir / record["file_name"]
            with writing(path, scratch=[path]):
                image.save(path, format="PNG")
        lines = "".join(dumps_json(record) + "\n" for record in records)
        size = self.records_path.stat().st_size
        try:
            with writing(self.records_path), open(self.records_path, "a", encoding="utf-8") as f:
                f.write(lines)
        except OSError:
            os.truncate(self.records_path, size)  # no half line for a reader to trip on
            raise
        self.images += images
        self.records += records

    def finish(self, grid_rows: int, labels: Sequence[str] | None = None, grid_images: Sequence | None = None) -> Path:
        """Tile the images written (or `grid_images`, e.g. with each row's source image first; `labels` then label
        them) `grid_rows` rows deep, row by row, with `labels` under them, as `grid.png`; returns its path."""
        from clipcond.evaluation.plots import image_grid

        grid_path = self.output_dir / "grid.png"
        tiles = list(self.images if grid_images is None else grid_images)
        cols = math.ceil(len(tiles) / grid_rows)
        with writing(grid_path, scratch=[grid_path]):
            image_grid(tiles, rows=grid_rows, cols=cols, labels=labels).save(grid_path, format="PNG")
        return grid_path


def write_outputs(
    images: Sequence,
    records: Sequence[dict],
    output_dir: str | os.PathLike,
    grid_rows: int,
    labels: Sequence[str] | None = None,
    grid_images: Sequence | None = None,
) -> Path:
    """All at once what `ImageWriter` writes batch by batch: the images, `images.jsonl` and `grid.png` (see
    `ImageWriter.finish` for `grid_rows`, `labels` and `grid_images`). Returns the grid's path."""
    writer = ImageWriter(output_dir)
    writer.add(images, records)
    return writer.finish(grid_rows, labels, grid_images)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_args(args)
    prompts = read_prompts(args)
    check_text_to_image(pipeline_class_name(args.model), args)  # before loading anything
    start = time.perf_counter()
    pipe = load_pipeline(args)
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
