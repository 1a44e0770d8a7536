"""Quality of the default CLIP recipe on the built-in shapes data, over seeds, on this machine (a benchmark, not a
test).

    python benchmarks/clip_quality.py [--data-dir DIR] [--work-dir DIR] [--seeds 0,1,2] [--data-seed K]
        [--mixed-precision bf16] [--save-results]

does, for each seed N, what a user would type, with every training option at its default:

    clipcond data shapes DIR/seed-N --seed N        # 20,000 images, 32 px (reused when DIR/seed-N holds it)
    clipcond train clip --data DIR/seed-N --output-dir WORK/seed-N --seed N
    clipcond eval clip --model WORK/seed-N --data DIR/seed-N

so that the spread covers the data's draw as well as the training's, as `clipcond demo --seed N` does; with
`--data-seed K` every seed trains on the one data set DIR/seed-K instead.

and prints one JSON object: per seed the evaluation metrics, the training time (the optimisation loop, validation and
checkpoints included; building the model and caching the images not), seconds per step and the recipe (steps,
batch, precision, torch threads); over the seeds each zero-shot bar as `clipcond.evaluation.stats.bar_holds` judges
it (the mean meets the bar and no seed lies below it beyond its own interval over its judged images): top-1 >= 0.95
on seen compositions and >= 0.80 on held-out ones, and every seed's training within 300 s. `--save-results` also
writes the object to benchmarks/results/clip_quality.json and its history. Progress and logs go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from common import add_results_flag, command_line, ensure_shapes, machine, parse_seeds, save_results

BAR = {"zero_shot_top1_seen": 0.95, "zero_shot_top1_heldout": 0.80, "train_seconds": 300.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/clip_quality.py",
        description="Train the default CLIP recipe on the shapes data, evaluate it, print one JSON object.",
    )
    parser.add_argument("--data-dir", type=Path, help="shapes data set folder, made if absent (default: a temp dir)")
    parser.add_argument(
        "--work-dir", type=Path, help="the runs go to WORK/seed-N, which must not hold a run (default: a temp dir)"
    )
    parser.add_argument(
        "--seeds", type=parse_seeds, default=[0, 1, 2], help="seeds of the data sets and of the training, e.g. 0,1,2"
    )
    parser.add_argument(
        "--data-seed", type=int, default=None, help="train every seed on this one data set (default: each its own)"
    )
    parser.add_argument(
        "--mixed-precision",
        default="no",
        choices=["no", "bf16"],
        help="training precision: the recipe's default (fp32), or bf16 as `clipcond demo` trains it",
    )
    add_results_flag(parser)
    return parser.parse_args(argv)


def run(data_dir: Path, output_dir: Path, seed: int, data_seed: int, mixed_precision: str = "no") -> dict:
    import torch
    from accelerate.state import AcceleratorState

    from clipcond.evaluation.clip import main as eval_main
    from clipcond.runs import RunRecord
    from clipcond.train.clip import main as train_main

    info = ensure_shapes(data_dir, seed=data_seed, flag="--data-dir")

    # 1. train with the defaults; the entry points' own JSON goes to stderr, so stdout holds only ours
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        argv = ["--data", str(data_dir), "--output-dir", str(output_dir), "--seed", str(seed)]
        train_main([*argv, "--mixed-precision", mixed_precision])
    wall = time.perf_counter() - start
    precision = AcceleratorState().mixed_precision
    record = RunRecord.read(output_dir)
    args, summary = record.args, record.summary

    # 2. evaluate as `clipcond eval clip` does
    with contextlib.redirect_stdout(sys.stderr):
        eval_main(["--model", str(output_dir), "--data", str(data_dir), "--no-progress"])
    metrics = json.loads((output_dir / "eval" / "metrics.json").read_text())

    seconds = summary["seconds"]
    result = {
        **metrics,
        "train_seconds": seconds,
        "train_wall_seconds": round(wall, 1),
        "seconds_per_step": round(seconds / summary["steps"], 4),
        "steps": summary["steps"],
        "train_batch_size": args["train_batch_size"],
        "learning_rate": args["learning_rate"],
        "model": args["model"],
        "precision": precision,
        "torch_threads": torch.get_num_threads(),
        "seed": seed,
        "data_seed": data_seed,
        "data": {"num_train": info["splits"]["train"]["num_images"], "resolution": info["resolution"]},
        "load_average": [round(x, 2) for x in os.getloadavg()],  # others' work on the machine inflates the times
    }
    return result


def check_work_dir(work: Path, seeds: list[int]) -> None:
    """Before any training: every seed once, and no WORK/seed-N that already holds a run."""
    from clipcond.runs import RunRecord

    if len(set(seeds)) != len(seeds):
        raise ValueError(f"`--seeds` names a seed twice: {','.join(map(str, seeds))}")
    taken = [str(work / f"seed-{seed}") for seed in seeds if RunRecord.exists(work / f"seed-{seed}")]
    if taken:
        raise FileExistsError(f"`--work-dir` {work} already holds runs in {', '.join(taken)}; pass a new folder")


def over_seeds(per_seed: dict[int, dict]) -> dict:
    """Each zero-shot bar over the seeds (`bar_holds`, each seed's interval from its judged images), and the time
    bar, which every seed must meet."""
    from clipcond.evaluation.stats import bar_holds

    summary = {}
    for group in ("seen", "heldout"):
        name = f"zero_shot_top1_{group}"
        values = {seed: r[name] for seed, r in per_seed.items()}
        counts = {seed: r[f"num_zero_shot_images_{group}"] for seed, r in per_seed.items()}
        summary[name] = bar_holds(values, counts, BAR[name])
    seconds = [r["train_seconds"] for r in per_seed.values()]
    time_bar = BAR["train_seconds"]
    summary["train_seconds"] = {"max": max(seconds), "bar": time_bar, "holds": max(seconds) <= time_bar}
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="clip_quality_") as tmp:
        data_root = args.data_dir or Path(tmp, "shapes")
        work = args.work_dir or Path(tmp)
        check_work_dir(work, args.seeds)
        per_seed = {}
        for seed in args.seeds:
            data_seed = seed if args.data_seed is None else args.data_seed
            data_dir = data_root / f"seed-{data_seed}"
            per_seed[seed] = run(data_dir, work / f"seed-{seed}", seed, data_seed, args.mixed_precision)
            print(json.dumps({"seed": seed, **per_seed[seed]}), file=sys.stderr, flush=True)
    summary = over_seeds(per_seed)
    report = {
        "benchmark": "clip_quality",
        "command": command_line("clip_quality", argv),
        "seeds": args.seeds,
        "data_seed": args.data_seed,
        "mixed_precision": args.mixed_precision,
        "machine": machine(),
        "bar": BAR,
        "over_seeds": summary,
        "meets_bar": all(entry["holds"] for entry in summary.values()),
        "per_seed": per_seed,
    }
    if args.save_results:
        save_results("clip_quality", report)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
