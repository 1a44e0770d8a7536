"""Samplers and step counts on one trained decoder, judged (a benchmark, not a test).

    python benchmarks/scheduler_steps.py --model demo/decoder --data demo/data [--images-per-prompt 8]
        [--samplers ddpm@1000,dpm@20,dpm@10,ddim@20,ddim@50,euler@20,euler@50,unipc@10,unipc@20]
        [--guidance-scale G] [--seen-only] [--dtype fp32|bf16] [--save-results]

For each `name@steps` it runs `evaluate_generation` (the function of `clipcond eval generation`) on the decoder with
that scheduler (built from the saved training noise schedule, as `clipcond generate --scheduler` does), the same
per-image seeds for every sampler, at the default guidance scale, and prints one JSON object: per sampler the judged
colour / shape / both-correct accuracy for seen and held-out compositions, the share of seen images judged blank or
several objects, the CLIP score and the seconds it took; and, when `ddpm@1000` is among them (the reference: DDPM's
ancestral sampler over the whole training chain), every other sampler against it (`against_reference`): the signed
gaps on seen colour, shape and both-correct accuracy with their 95% intervals, and `within_3_points` when none is
more than 3 percentage points below it (one-sided: the reference is the 1000-step chain, not a ceiling, and a
few-step sampler that scores higher than it has lost nothing). `--save-results` also writes the object to
benchmarks/results/scheduler_steps.json.

Cost: a sampler's time grows with its steps, so ddpm@1000 costs fifty times dpm@20 and takes hours on 2 CPU cores at
the images per prompt that resolve a 3-point gap (about 900 seen images); `--seen-only` leaves out the held-out
prompts, and `--dtype bf16` draws in bf16, as `clipcond demo` does on a CPU with bf16 units.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from common import add_results_flag, command_line, save_results

DEFAULT_SAMPLERS = "ddpm@1000,dpm@20,dpm@10,ddim@20,ddim@50,euler@20,euler@50,unipc@10,unipc@20"
REFERENCE = "ddpm@1000"
TOLERANCE = 0.03
FIGURES = (
    *(f"{m}_{g}" for g in ("seen", "heldout") for m in ("colour_accuracy", "shape_accuracy", "both_accuracy")),
    "clip_score",
)


def parse_samplers(text: str) -> list[tuple[str, int]]:
    from clipcond.pipelines.text_to_image import SCHEDULERS

    samplers = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, steps = item.partition("@")
        if name not in SCHEDULERS or not steps.isdigit() or int(steps) < 1:
            raise ValueError(f"`--samplers` entry {item!r} must be NAME@STEPS with NAME in {sorted(SCHEDULERS)}")
        samplers.append((name, int(steps)))
    if not samplers:
        raise ValueError(f"`--samplers` names no sampler: {text!r}")
    return samplers


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from clipcond.device import DTYPES
    from clipcond.evaluation.generation import DEFAULT_GUIDANCE_SCALE

    parser = argparse.ArgumentParser(
        prog="python benchmarks/scheduler_steps.py",
        description="Judge one decoder under several samplers and step counts; print one JSON object.",
    )
    parser.add_argument("--model", required=True, type=Path, help="decoder run folder (`clipcond train decoder`)")
    parser.add_argument("--data", required=True, type=Path, help="the shapes data root (with dataset_info.json)")
    parser.add_argument("--samplers", default=DEFAULT_SAMPLERS, help="comma-separated NAME@STEPS")
    parser.add_argument("--images-per-prompt", type=int, default=8, help="images per colour-shape prompt")
    parser.add_argument("--guidance-scale", type=float, default=DEFAULT_GUIDANCE_SCALE, help="guidance weight")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-image generators")
    parser.add_argument("--output-dir", type=Path, help="also write each sampler's grids here (default: none)")
    parser.add_argument("--seen-only", action="store_true", help="draw the seen compositions' prompts only")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="the pipeline's precision (default fp32)")
    add_results_flag(parser, results_name="scheduler_steps")
    return parser.parse_args(argv)


def against_reference(samplers: dict, n_seen: int, reference: str) -> dict:
    """Per sampler of `samplers` (`run`'s figures by "name@steps"), its seen colour / shape / both-correct accuracy
    minus `reference`'s, each gap's 95% interval (Newcombe's, the two samplers' `n_seen` images counted as
    independent) and `within_3_points`: no gap more than 3 points below the reference."""
    from clipcond.evaluation.stats import difference_interval

    compared = {}
    for name, figures in samplers.items():
        if name == reference:
            continue
        gaps = {k: figures[k] - samplers[reference][k] for k in FIGURES[:3]}  # seen compositions
        intervals = {k: difference_interval(figures[k], n_seen, samplers[reference][k], n_seen) for k in gaps}
        compared[name] = {
            "minus_reference": {k: round(v, 4) for k, v in gaps.items()},
            "interval": {k: [round(x, 4) for x in interval] for k, interval in intervals.items()},
            "within_3_points": all(v >= -TOLERANCE for v in gaps.values()),
        }
    return compared


def run(args: argparse.Namespace) -> dict:
    import torch

    from clipcond.data.shapes import class_names, load_dataset_info
    from clipcond.device import resolve_device
    from clipcond.evaluation.generation import evaluate_generation, resolve_clip_path
    from clipcond.evaluation.judge import load_or_train_judge
    from clipcond.evaluation.sampling import scale_key
    from clipcond.models.clip import load_clip
    from clipcond.pipeline_loading import load_pretrained
    from clipcond.pipelines.text_to_image import TextToImagePipeline

    samplers = parse_samplers(args.samplers)
    info = load_dataset_info(args.data)
    if info is None:
        raise ValueError(f"`--data` {str(args.data)!r} has no dataset_info.json; pass the shapes data root")
    device = resolve_device(args.device)
    judge = load_or_train_judge(int(info["resolution"]), device=device)
    clip_run = load_clip(resolve_clip_path(args.model, None)[0], device=device)
    pipe = load_pretrained(TextToImagePipeline, args.model, device, args.dtype)
    held_out = info.get("held_out") or []
    classes = [c for c in class_names(info) if not (args.seen_only and c in held_out)]

    results = {}
    for name, steps in samplers:
        key = f"{name}@{steps}"
        print(f"scheduler_steps: {key} ...", file=sys.stderr)
        start = time.perf_counter()
        metrics = evaluate_generation(
            pipe,
            classes=classes,
            held_out=[] if args.seen_only else held_out,
            judge=judge,
            clip_run=clip_run,
            num_images_per_prompt=args.images_per_prompt,
            guidance_scales=[args.guidance_scale],
            num_inference_steps=steps,
            scheduler=name,
            seed=args.seed,
            output_dir=None if args.output_dir is None else args.output_dir / f"{name}_{steps}",
        )
        outcomes = metrics["guidance"][scale_key(args.guidance_scale)]["outcomes"]["seen"]  # several, blank, ...
        results[key] = {k: metrics[k] for k in FIGURES} | {
            "outcomes_seen": outcomes,
            "seconds": round(time.perf_counter() - start, 1),
        }
        print(f"scheduler_steps: {key} {json.dumps(results[key])}", file=sys.stderr)

    result = {
        "model": str(args.model),
        "guidance_scale": args.guidance_scale,
        "images_per_prompt": args.images_per_prompt,
        "num_prompts": len(classes),
        "dtype": args.dtype,
        "device": str(device),
        "samplers": results,
        "seed": args.seed,
        "judge": {"version": judge.summary()["version"]},
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    result["seen_images_per_sampler"] = args.images_per_prompt * len([c for c in classes if c not in held_out])
    if REFERENCE in results:
        result["reference"] = REFERENCE
        result["against_reference"] = against_reference(results, result["seen_images_per_sampler"], REFERENCE)
    return result


def main(argv: list[str] | None = None) -> int:
    import warnings

    # diffusers' DPM-Solver under numpy 2: harmless, and it would repeat every step
    warnings.filterwarnings("ignore", message="__array__ implementation doesn't accept a copy keyword")
    args = parse_args(argv)
    command = command_line("scheduler_steps", argv)
    result = {"command": command, **run(args)}
    text = json.dumps(result, indent=2)
    if args.save_results:
        save_results(args.results_name, result)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
