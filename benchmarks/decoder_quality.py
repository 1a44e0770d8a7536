"""Does the demo's decoder draw what it is asked? (a benchmark, not a test)

    python benchmarks/decoder_quality.py [--demo-dir DIR] [--seeds 0,1,2] [--images-per-prompt N] [--write-results]

runs `clipcond demo --output-dir DIR/seed-N --seed N` for every seed (every recipe at its defaults; a finished demo
of that seed and judge is reused, an interrupted one resumed) and prints one JSON object: under "per_seed", for each seed, the judged colour / shape / both-correct accuracy of the
generated images for the seen and the held-out compositions at guidance 1 and at the default guidance, the CLIP
score and FD, the demo's time by stage (wall and CPU seconds), and `meets_quality_bar` against the bar: the prompted colour
in >= 90% and the prompted shape in >= 75% of the images of seen compositions at the default guidance, and the
whole demo within 15 minutes of wall time, counted only for a demo that ran as one command with no training resumed
(`clipcond.demo.uninterrupted`; it holds on 2 quiet CPU cores only: the load average is reported, as other work on
the machine inflates the wall times; the CPU seconds say what the demo itself used).

`--images-per-prompt N` judges N images per prompt again (`clipcond eval generation` on the demo's decoder, into
DIR/decoder/eval_benchmark/) for tighter figures than the demo's own evaluation, drawn as the demo drew its own (its
steps, guidance, sampler, precision and noise seed). `--write-results` also writes the object to
benchmarks/results/decoder_quality.json. Progress and logs go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from common import add_results_flag, demo_times, demos_by_seed, emptied, parse_seeds, save_results

BAR = {"colour_accuracy_seen": 0.90, "shape_accuracy_seen": 0.75, "demo_wall_seconds": 900.0}
CLIP_BAR = {"zero_shot_top1_seen": 0.95, "zero_shot_top1_heldout": 0.80}
FIGURES = (
    *(f"{m}_{g}" for g in ("seen", "heldout") for m in ("colour_accuracy", "shape_accuracy", "both_accuracy")),
    "clip_score",
    "clip_top1",
    "fd_clip",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/decoder_quality.py",
        description="Run (or reuse) `clipcond demo` and judge its decoder against the bar; print one JSON object.",
    )
    parser.add_argument("--demo-dir", type=Path, help="demo folder, run or resumed there (default: a temp dir)")
    parser.add_argument(
        "--images-per-prompt", type=int, default=None, help="judge again with N images per prompt (default: reuse)"
    )
    parser.add_argument("--seeds", default="0", help="comma-separated demo seeds (default 0; the README's: 0,1,2)")
    add_results_flag(parser)
    args = parser.parse_args(argv)
    args.seeds = parse_seeds(args.seeds)
    if args.images_per_prompt is not None and args.images_per_prompt < 1:
        raise ValueError(f"`--images-per-prompt` must be >= 1, got {args.images_per_prompt}")
    return args


def _figures(generation: dict) -> dict:
    return {
        key: {name: figures[name] for name in FIGURES} | {"generation_seconds": figures["generation_seconds"]}
        for key, figures in generation["guidance"].items()
    }


def _clip_group_sizes(clip_eval: dict, num_seen: int, num_classes: int) -> dict:
    """One-object test images of seen and of held-out classes, which give each zero-shot figure its interval: as
    `clipcond eval clip` counts them, or, for a demo evaluated before it did, from the split's balance over the
    classes."""
    if clip_eval.get("num_zero_shot_images_seen") is not None:
        return {f"num_images_{g}": clip_eval[f"num_zero_shot_images_{g}"] for g in ("seen", "heldout")}
    total = clip_eval["num_zero_shot_images"]
    return {
        "num_images_seen": total * num_seen // num_classes,
        "num_images_heldout": total * (num_classes - num_seen) // num_classes,
    }


def rejudge_argv(demo_dir: Path, generation: dict, images_per_prompt: int, out: Path) -> list[str]:
    """`clipcond eval generation` drawing `images_per_prompt` images per prompt as the demo drew its own (steps,
    guidance, sampler, precision and noise seed of its `generation` metrics): a larger sample of the same figures."""
    settings = generation["settings"]
    argv = ["--model", str(demo_dir / "decoder"), "--data", str(demo_dir / "data"), "--output-dir", str(out)]
    argv += ["--num-images-per-prompt", str(images_per_prompt), "--no-progress"]
    argv += ["--num-inference-steps", str(settings["num_inference_steps"])]
    argv += ["--guidance-scales", f"1,{generation['guidance_scale']}"]
    argv += ["--scheduler", settings["scheduler"], "--dtype", settings["dtype"], "--seed", str(settings["seed"])]
    return argv


def run(demo_dir: Path, images_per_prompt: int | None, seed: int = 0) -> dict:

    from clipcond.demo import main as demo_main
    from clipcond.demo import uninterrupted

    with contextlib.redirect_stdout(sys.stderr):  # the demo's own lines; stdout holds only our JSON
        demo_main(["--output-dir", str(demo_dir), "--seed", str(seed)])
    report = json.loads((demo_dir / "report.json").read_text())
    generation = report["generation"]
    check_reused_demo(report, demo_dir, seed)
    if images_per_prompt is not None:
        from clipcond.evaluation.generation import main as eval_main

        out = emptied(demo_dir / "decoder" / "eval_benchmark")
        with contextlib.redirect_stdout(sys.stderr):
            eval_main(rejudge_argv(demo_dir, generation, images_per_prompt, out))
        generation = json.loads((out / "metrics.json").read_text())

    default = generation["guidance"][str(float(generation["guidance_scale"]))]
    settings = generation["settings"]
    seen_classes = [name for name in settings["classes"] if name not in settings["held_out"]]
    result = {
        "seed": seed,
        "guidance_scale": generation["guidance_scale"],
        "images_per_prompt": generation["settings"]["num_images_per_prompt"],
        "sampler": f"{generation['settings']['scheduler']}@{generation['settings']['num_inference_steps']}",
        "figures": _figures(generation),
        "num_judged_seen": len(seen_classes) * settings["num_images_per_prompt"],
        "outcomes": default.get("outcomes"),
        "diversity": default.get("diversity"),
        "fd_clip_floor": generation["fd_clip_floor"],
        "judge": {k: v for k, v in generation["judge"].items() if k != "path"},
        "decoder": report["decoder"],
        "clip": {
            **{k: report["clip_eval"][k] for k in ("zero_shot_top1_seen", "zero_shot_top1_heldout")},
            **_clip_group_sizes(report["clip_eval"], len(seen_classes), len(settings["classes"])),
        },
        **demo_times(report),
        "bar": BAR,
    }
    result["meets_quality_bar"] = bool(
        default["colour_accuracy_seen"] >= BAR["colour_accuracy_seen"]
        and default["shape_accuracy_seen"] >= BAR["shape_accuracy_seen"]
    )
    # The time bar holds for one uninterrupted command only: a demo put together by several attempts, or with a
    # training resumed from a checkpoint, sums times that no single run took.
    result["uninterrupted"] = uninterrupted(report)
    result["meets_time_bar"] = bool(
        result["uninterrupted"] and result["demo_wall_seconds"] <= BAR["demo_wall_seconds"]
    )
    return result


def check_reused_demo(report: dict, demo_dir: Path, seed: int) -> None:
    """A finished demo in `demo_dir` is reused as it is: refuse one of another seed, of an older judge or with runs
    of another recipe than today's, whose figures would be reported under this seed, judge and commit."""
    from clipcond.demo import stale_runs
    from clipcond.evaluation.judge import JUDGE_VERSION

    made = report["generation"]["settings"].get("seed")
    judge = report["generation"]["judge"].get("version")
    if made != seed or judge != JUDGE_VERSION:
        raise ValueError(
            f"{demo_dir} holds a demo of seed {made} judged by judge v{judge}, not seed {seed} and judge "
            f"v{JUDGE_VERSION}; give another `--demo-dir`"
        )
    stale = stale_runs(demo_dir, report.get("recipe", "cpu"))  # reports before `recipe` were of the cpu one
    if stale:
        raise ValueError(f"{demo_dir} holds runs of another recipe ({'; '.join(stale)}); give another `--demo-dir`")


def over_seeds(per_seed: dict[int, dict]) -> dict:
    """Every bar's figure over the seeds (`clipcond.evaluation.stats.bar_holds`), and the time bar in every run."""
    from clipcond.evaluation.stats import bar_holds, mean_interval

    runs = list(per_seed.values())
    summary = {}

    def figure(r: dict, name: str) -> float:
        return r["figures"][str(float(r["guidance_scale"]))][name]

    for name in ("colour_accuracy_seen", "shape_accuracy_seen"):
        values = {seed: figure(r, name) for seed, r in per_seed.items()}
        summary[name] = bar_holds(values, {seed: r["num_judged_seen"] for seed, r in per_seed.items()}, BAR[name])
    for name, bar in CLIP_BAR.items():
        group = name.rsplit("_", 1)[1]
        values = {seed: r["clip"][name] for seed, r in per_seed.items()}
        counts = {seed: r["clip"][f"num_images_{group}"] for seed, r in per_seed.items()}
        summary[f"clip_{name}"] = bar_holds(values, counts, bar)
    for name in ("colour_accuracy_heldout", "shape_accuracy_heldout"):  # reported, no bar
        summary[name] = mean_interval([figure(r, name) for r in runs], bounds=(0.0, 1.0))
    walls = [r["demo_wall_seconds"] for r in runs]
    summary["demo_wall_seconds"] = {
        **mean_interval(walls),
        "max": max(walls),
        "bar": BAR["demo_wall_seconds"],
        "holds": all(r["meets_time_bar"] for r in runs),
    }
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    per_seed = demos_by_seed(
        args.demo_dir, args.seeds, lambda folder, seed: run(folder, args.images_per_prompt, seed), "decoder_quality"
    )
    summary = over_seeds(per_seed)
    result = {
        "command": "python benchmarks/decoder_quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seeds": args.seeds,
        "over_seeds": summary,
        "meets_quality_bar": all(summary[k]["holds"] for k in ("colour_accuracy_seen", "shape_accuracy_seen")),
        "meets_clip_bar": all(summary[f"clip_{k}"]["holds"] for k in CLIP_BAR),
        "meets_time_bar": summary["demo_wall_seconds"]["holds"],
        "per_seed": {str(seed): r for seed, r in per_seed.items()},
    }
    text = json.dumps(result, indent=2)
    if args.save_results:
        save_results("decoder_quality", result)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
