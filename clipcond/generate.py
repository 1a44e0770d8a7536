"""`clipcond generate`: images from prompts with a trained pipeline folder, one PNG per image plus a labelled grid.

    clipcond generate --model runs/decoder --prompt "a red circle" --prompt "" --num-images 4 --output-dir samples

writes `samples/00000.png ...` (prompt by prompt), `samples/grid.png` (a row per prompt, labelled with it) and
`samples/images.jsonl`, one record per image with everything needed to make it again: image k is drawn from its own
generator seeded with `--seed + k`, so it comes out the same whatever the batch size, and
`--prompt P --seed S --num-images 1` with its recorded prompt and seed regenerates it alone.

The command is split so that other pipelines plug in: `load_pipeline(args)` builds the pipeline (a text-to-image
pipeline now; a prior + decoder later), `generate_images` calls it with the diffusers argument names, and
`write_outputs` (shared with `clipcond vary` / `interpolate`) writes the files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

DTYPES = ("fp32", "bf16", "fp16")
# The keys of `clipcond.pipelines.text_to_image.SCHEDULERS`, spelled out so that `--help` needs no diffusers import.
SCHEDULER_NAMES = ("ddim", "ddpm", "dpm", "euler", "unipc")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="clipcond generate",
        description="Generate images from text prompts with a trained pipeline folder (written with save_pretrained).",
    )
    parser.add_argument("--model", required=True, help="pipeline folder (model_index.json + component folders)")
    parser.add_argument(
        "--prompt", action="append", default=[], help='a prompt; repeat for several; "" generates unconditionally'
    )
    parser.add_argument("--prompts-file", help="a text file with one prompt a line (blank lines are skipped)")
    parser.add_argument("--negative-prompt", default=None, help="what guidance steers away from (default: none)")
    parser.add_argument("--num-images", type=int, default=4, help="images per prompt (default 4)")
    parser.add_argument("--num-inference-steps", type=int, default=25, help="denoising steps (default 25)")
    parser.add_argument(
        "--guidance-scale", type=float, default=3.0, help="classifier-free guidance weight; <= 1: none (default 3.0)"
    )
    parser.add_argument(
        "--scheduler", choices=SCHEDULER_NAMES, default=None, help="sampler (default: the one saved with the model)"
    )
    parser.add_argument("--seed", type=int, default=0, help="image k is drawn with seed + k (default 0)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per pipeline call (default 16)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="weights' precision (default fp32)")
    parser.add_argument("--output-dir", required=True, help="folder for the PNGs, grid.png and images.jsonl")
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
    for flag, value in (("--num-images", args.num_images), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ValueError(f"`{flag}` must be >= 1, got {value}")
    if args.seed < 0:
        raise ValueError(f"`--seed` must be >= 0, got {args.seed}")


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


def load_pipeline(args: argparse.Namespace):
    """The pipeline named by `--model`, on `--device` in `--dtype`, with `--scheduler` swapped in if given."""
    from clipcond.pipelines.text_to_image import TextToImagePipeline, scheduler_from_name

    model = os.fspath(args.model)
    if not os.path.isdir(model):
        raise FileNotFoundError(f"`--model` {model!r} does not exist")
    if not os.path.isfile(os.path.join(model, "model_index.json")):
        raise FileNotFoundError(
            f"`--model` {model!r} holds no model_index.json; expected a pipeline folder written with "
            "`save_pretrained` (as the decoder training writes it)"
        )
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    pipe = TextToImagePipeline.from_pretrained(model, local_files_only=True, **{_dtype_keyword(): dtype}).to(device)
    if pipe.unet.dtype != dtype:  # a diffusers that ignored the keyword
        pipe.to(dtype=dtype)
    if args.scheduler is not None:
        pipe.scheduler = scheduler_from_name(args.scheduler, pipe.scheduler.config)
    return pipe


def _dtype_keyword() -> str:
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


def generate_images(pipe, prompts: Sequence[str], args: argparse.Namespace) -> tuple[list, list[dict]]:
    """`--num-images` images per prompt, in batches of `--batch-size`, each from its own generator (seed + index).

    Returns the PIL images and one record per image, in order (all images of the first prompt first).
    """
    import torch

    per_image = [prompt for prompt in prompts for _ in range(args.num_images)]
    jobs = [(prompt, args.seed + index) for index, prompt in enumerate(per_image)]  # image k: seed + k
    pipe.set_progress_bar_config(disable=True)
    images = []
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
        )
        images += output.images
    scheduler = scheduler_name(pipe.scheduler)
    records = [
        {
            "file_name": f"{index:05d}.png",
            "prompt": prompt,
            "negative_prompt": args.negative_prompt,
            "seed": seed,
            "num_inference_steps": args.num_inference_steps,
            "guidance_scale": args.guidance_scale,
            "scheduler": scheduler,
            "model": os.fspath(args.model),
        }
        for index, (prompt, seed) in enumerate(jobs)
    ]
    return images, records


def write_outputs(
    images: Sequence,
    records: Sequence[dict],
    output_dir: str | os.PathLike,
    grid_rows: int,
    labels: Sequence[str] | None = None,
) -> Path:
    """Save each image as `output_dir/<record["file_name"]>`, the records as `images.jsonl` (one JSON object a line,
    in order) and the images tiled `grid_rows` rows deep, row by row, with `labels` under them, as `grid.png`.

    Returns the grid's path.
    """
    from clipcond.evaluation.plots import image_grid

    if len(images) != len(records):
        raise ValueError(f"got {len(images)} images but {len(records)} records")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for image, record in zip(images, records):
        image.save(output_dir / record["file_name"], format="PNG")
    with open(output_dir / "images.jsonl", "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    grid_path = output_dir / "grid.png"
    cols = math.ceil(len(images) / grid_rows)
    image_grid(images, rows=grid_rows, cols=cols, labels=labels).save(grid_path, format="PNG")
    return grid_path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_args(args)
    prompts = read_prompts(args)
    start = time.perf_counter()
    pipe = load_pipeline(args)
    images, records = generate_images(pipe, prompts, args)
    labels = [record["prompt"] or "(unconditional)" for record in records]
    grid_path = write_outputs(images, records, args.output_dir, grid_rows=len(prompts), labels=labels)
    print(
        f"clipcond generate: {len(images)} images ({len(prompts)} prompts x {args.num_images}) in "
        f"{time.perf_counter() - start:.1f} s -> {args.output_dir} (grid: {grid_path})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
