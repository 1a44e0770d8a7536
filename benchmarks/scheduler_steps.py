"""Samplers and step counts on one trained decoder, judged (a benchmark, not a test).

    python benchmarks/scheduler_steps.py --model demo/decoder --data demo/data [--images-per-prompt 8]
        [--samplers ddpm@1000,dpm@20,dpm@10,ddim@20,ddim@50,euler@20,euler@50,unipc@10,unipc@20]
        [--guidance-scale G] [--seen-only] [--dtype fp32|bf16] [--save-results]
    python benchmarks/scheduler_steps.py --demo-dir DIR --seeds 0,1,2 [...]   # the decoders of three demos

For each `name@steps` it runs `evaluate_generation` (the function of `clipcond eval generation`) on the decoder with
that scheduler (built from the saved training noise schedule, as `clipcond generate --scheduler` does), the same
per-image seeds for every sampler, at the default guidance scale, and prints one JSON object: per sampler the judged
colour / shape / both-correct accuracy for seen and held-out compositions, the share of seen images judged blank or
several objects, the CLIP score and the seconds it took; and, when `ddpm@1000` is among them (the reference: DDPM's
ancestral sampler over the whole training chain), every other sampler against it (`against_reference`): the signed
gaps on seen colour, shape and both-correct accuracy with their 95% intervals, and `within_3_points` when none is
more than 3 percentage points below it (one-sided: the reference is the 1000-step chain, not a ceiling, and a
few-step sampler that scores higher than it has lost nothing). With `--demo-dir DIR --seeds 0,1,2` it does the same
on the decoder and data of each demo that `python benchmarks/decoder_quality.py --demo-dir DIR --seeds 0,1,2` ran
(`DIR/seed-N/decoder`, `DIR/seed-N/data`), and sets each sampler against the reference over the seeds
(`over_seeds`): per figure the mean gap and its verdict by the README's rule (`clipcond.evaluation.stats.gain_holds`:
the mean gap is at most 3 points below, and no seed's gap lies below that beyond its own interval), and the gap of
the images pooled over the seeds with its 95% interval, the resolution the images buy. `--save-results` also writes
the object to benchmarks/results/scheduler_steps.json.

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

from common import add_demo_args, add_results_flag, check_demo_args, check_demo_parts, command_line, save_results

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
    parser.add_argument("--model", type=Path, help="decoder run folder (`clipcond train decoder`)")
    parser.add_argument("--data", type=Path, help="the shapes data root (with dataset_info.json)")
    parser.add_argument("--samplers", default=DEFAULT_SAMPLERS, help="comma-separated NAME@STEPS")
    parser.add_argument("--images-per-prompt", type=int, default=8, help="images per colour-shape prompt")
    parser.add_argument("--guidance-scale", type=float, default=DEFAULT_GUIDANCE_SCALE, help="guidance weight")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-image generators")
    parser.add_argument("--output-dir", type=Path, help="also write each sampler's grids here (default: none)")
    parser.add_argument("--seen-only", action="store_true", help="draw the seen compositions' prompts only")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="the pipeline's precision (default fp32)")
    add_demo_args(parser)
    add_results_flag(parser, results_name="scheduler_steps")
    args = parser.parse_args(argv)
    check_demo_args(args)
    if args.demo_dir is not None and (args.model or args.data):
        raise ValueError("`--demo-dir` takes each demo's decoder and data: drop `--model` and `--data`")
    if args.demo_dir is None and (args.model is None or args.data is None):
        raise ValueError("pass `--model` and `--data` (one decoder), or `--demo-dir` with `--seeds`")
    if args.demo_dir is not None and args.output_dir is not None:
        raise ValueError("`--output-dir` writes one decoder's grids: drop it with `--demo-dir`")
    return args


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


def run_decoder(model: Path, data: Path, args: argparse.Namespace) -> dict:
    """Every sampler of `--samplers` on the decoder `model` (shapes data `data`), judged: one result object."""
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
    info = load_dataset_info(data)
    if info is None:
        raise ValueError(f"`--data` {str(data)!r} has no dataset_info.json; pass the shapes data root")
    device = resolve_device(args.device)
    judge = load_or_train_judge(int(info["resolution"]), device=device)
    clip_run = load_clip(resolve_clip_path(model, None)[0], device=device)
    pipe = load_pretrained(TextToImagePipeline, model, device, args.dtype)
    held_out = info.get("held_out") or []
    classes = [c for c in class_names(info) if not (args.seen_only and c in held_out)]

    results = {}
    for name, steps in samplers:
        key = f"{name}@{steps}"
        print(f"scheduler_steps: {model}: {key} ...", file=sys.stderr)
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
        "model": str(model),
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


def over_seeds(per_seed: dict[int, dict], reference: str) -> dict:
    """Per sampler other than `reference`, over the decoders of `per_seed` ({seed: `run_decoder`'s result}): per seen
    figure, the gap to the reference by the README's rule (`gain_holds`: the mean gap is at most 3 points below, and
    no seed's gap lies below that beyond its own 95% interval), and the gap of the images pooled over the seeds with
    its 95% interval (`pooled`); `within_3_points` when every figure's gap holds."""
    from clipcond.evaluation.stats import difference_interval, gain_holds

    images = {seed: r["seen_images_per_sampler"] for seed, r in per_seed.items()}  # per sampler, on each decoder
    n, total = {seed: (count, count) for seed, count in images.items()}, sum(images.values())
    names = [name for name in next(iter(per_seed.values()))["samplers"] if name != reference]
    compared = {}
    for name in names:
        figures = {}
        for key in FIGURES[:3]:  # seen compositions
            ours = {seed: r["samplers"][name][key] for seed, r in per_seed.items()}
            theirs = {seed: r["samplers"][reference][key] for seed, r in per_seed.items()}
            pooled_ours, pooled_theirs = (
                sum(values[seed] * images[seed] for seed in values) / total for values in (ours, theirs)
            )
            low, high = difference_interval(pooled_ours, total, pooled_theirs, total)
            pooled = {
                "minus_reference": round(pooled_ours - pooled_theirs, 4),
                "interval": [round(low, 4), round(high, 4)],
            }
            figures[key] = gain_holds(ours, theirs, n, -TOLERANCE) | {"pooled": pooled | {"images": total}}
        compared[name] = {"figures": figures, "within_3_points": all(f["holds"] for f in figures.values())}
    return compared


def run(args: argparse.Namespace) -> dict:
    """One decoder's result (`--model`), or every demo's with the samplers set against the reference over seeds."""
    if args.demo_dir is None:
        return run_decoder(args.model, args.data, args)
    check_demo_parts(args.demo_dir, args.seeds, ("decoder", "data"))
    per_seed = {}
    for seed in args.seeds:
        demo = args.demo_dir / f"seed-{seed}"
        per_seed[seed] = run_decoder(demo / "decoder", demo / "data", args)
    first = per_seed[args.seeds[0]]
    settings = ("guidance_scale", "images_per_prompt", "num_prompts", "dtype", "device", "seed", "judge")
    result = {"demo_dir": str(args.demo_dir), "seeds": args.seeds, **{k: first[k] for k in settings}}
    result["per_seed"] = per_seed
    if REFERENCE in first["samplers"]:
        result["reference"] = REFERENCE
        result["over_seeds"] = over_seeds(per_seed, REFERENCE)
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
