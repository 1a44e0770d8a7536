"""Quality of the default CLIP recipe on the built-in shapes data, on this machine (a benchmark, not a test).

    python benchmarks/clip_quality.py [--data-dir DIR] [--output-dir RUN] [--seed N] [--mixed-precision bf16]
        [--write-results]

does what a user would type, with every training option at its default:

    clipcond data shapes DIR                        # 20,000 images, 32 px (reused when DIR holds it already)
    clipcond train clip --data DIR --output-dir RUN --seed N
    clipcond eval clip --model RUN --data DIR

and prints one JSON object: the evaluation metrics, the training time (the optimisation loop, validation and
checkpoints included; building the model and caching the images not), seconds per step, the recipe (steps, batch,
precision, torch threads) and the machine, and `meets_bar` against the bar of the CPU recipe: zero-shot top-1 >= 0.95
on seen compositions and >= 0.80 on held-out ones, in at most 300 s of training. `--write-results` also writes the
object to benchmarks/results/clip_quality.json. Progress and logs go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from common import add_results_flag, save_results

BAR = {"zero_shot_top1_seen": 0.95, "zero_shot_top1_heldout": 0.80, "train_seconds": 300.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/clip_quality.py",
        description="Train the default CLIP recipe on the shapes data, evaluate it, print one JSON object.",
    )
    parser.add_argument("--data-dir", type=Path, help="shapes data set folder, made if absent (default: a temp dir)")
    parser.add_argument("--output-dir", type=Path, help="run folder, must not hold a run (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (the data set is always seed 0)")
    parser.add_argument(
        "--mixed-precision",
        default="no",
        choices=["no", "bf16"],
        help="training precision: the recipe's default (fp32), or bf16 as `clipcond demo` trains it",
    )
    add_results_flag(parser)
    return parser.parse_args(argv)


def ensure_shapes(data_dir: Path) -> dict:
    """The default shapes data set in `data_dir`: reused when complete, written otherwise."""
    from clipcond.data.shapes import load_dataset_info, write_shapes_dataset

    info = load_dataset_info(data_dir) if data_dir.is_dir() else None
    if info is not None and (data_dir / "train").is_dir():
        print(f"reusing the shapes data set in {data_dir}", file=sys.stderr)
        return info
    print(f"writing the shapes data set to {data_dir}", file=sys.stderr)
    return write_shapes_dataset(data_dir, num_images=20000)  # the defaults of `clipcond data shapes`


def run(data_dir: Path, output_dir: Path, seed: int, mixed_precision: str = "no") -> dict:
    import torch
    from accelerate.state import AcceleratorState

    from clipcond.evaluation.clip import main as eval_main
    from clipcond.runs import RunRecord
    from clipcond.train.clip import main as train_main

    if RunRecord.exists(output_dir):
        raise FileExistsError(f"--output-dir {output_dir} already holds a run; pass an empty or new folder")
    info = ensure_shapes(data_dir)

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
        "data": {"num_train": info["splits"]["train"]["num_images"], "resolution": info["resolution"]},
        "machine": {"processor": platform.processor(), "cpu_count": os.cpu_count(), "torch": torch.__version__},
        "load_average": [round(x, 2) for x in os.getloadavg()],  # others' work on the machine inflates the times
        "bar": BAR,
    }
    result["meets_bar"] = bool(
        metrics["zero_shot_top1_seen"] >= BAR["zero_shot_top1_seen"]
        and metrics["zero_shot_top1_heldout"] >= BAR["zero_shot_top1_heldout"]
        and seconds <= BAR["train_seconds"]
    )
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="clip_quality_") as tmp:
        data_dir = args.data_dir or Path(tmp, "shapes")
        output_dir = args.output_dir or Path(tmp, "run")
        result = run(data_dir, output_dir, args.seed, args.mixed_precision)
    text = json.dumps(result, indent=2)
    if args.save_results:
        save_results("clip_quality", result)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
