"""Quality and training time of the default captioner recipe on a CLIP run and its shapes data, on this machine (a
benchmark, not a test).

    python benchmarks/captioner_quality.py --clip CLIP_RUN --data DIR [--output-dir RUN] [--seed N] [--save-results]
    python benchmarks/captioner_quality.py --demo-dir DIR --seeds 0,1,2 [--save-results]

does what a user would type, with every training option at its default (the `tiny` language model):

    clipcond train captioner --clip CLIP_RUN --data DIR --output-dir RUN --seed N
    clipcond eval captioner --model RUN --data DIR            # the test split

and prints one JSON object: the evaluation (greedy captions, the best of 8 candidates that `clipcond caption` writes
by default, and detailed descriptions of the one-object test images: colour / shape / count / position, seen and
held-out compositions; answers per question type), the training time
(wall and CPU, the vision-token cache and validation included), the recipe and the machine, and the bars: colour,
shape and count right in >= 90% of the one-object images, position >= 80%, training within 10 minutes.

With `--demo-dir DIR --seeds` it trains one captioner per seed N on the CLIP and data of `decoder_quality.py`'s demo
DIR/seed-N (training seed N, into a temporary folder) and reports each bar over the seeds
(`clipcond.evaluation.stats.bar_holds`: the mean meets it and no seed's own interval lies below it) and the slowest
training against the time bar, beside every seed's own result.
`--save-results` also writes it to benchmarks/results/captioner_quality.json. Progress and logs go to stderr.
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

from common import (
    add_demo_args,
    add_results_flag,
    check_demo_args,
    check_demo_parts,
    command_line,
    machine,
    save_results,
)

from clipcond.evaluation.captioner import TEXTS  # greedy captions, the best of several, detailed descriptions

BARS = {"colour": 0.9, "shape": 0.9, "count": 0.9, "position": 0.8}
TIME_BAR_SECONDS = 600


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/captioner_quality.py",
        description="Train the default captioner recipe on a CLIP run, evaluate it, print one JSON object.",
    )
    parser.add_argument("--clip", type=Path, help="CLIP run folder (`clipcond train clip`)")
    parser.add_argument("--data", type=Path, help="the shapes data the CLIP was trained on")
    parser.add_argument("--output-dir", type=Path, help="run folder, must not hold a run (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    add_demo_args(parser)
    add_results_flag(parser)
    args = parser.parse_args(argv)
    check_demo_args(args)
    one_run = ("--clip", args.clip), ("--data", args.data), ("--output-dir", args.output_dir), ("--seed", args.seed)
    if args.demo_dir is not None:
        given = [flag for flag, value in one_run if value is not None and not (flag == "--seed" and value == 0)]
        if given:
            raise ValueError(f"`--demo-dir` takes each demo's CLIP and data and trains with its seed: drop {given}")
    elif args.clip is None or args.data is None:
        raise ValueError("give `--clip` and `--data`, or `--demo-dir` and `--seeds`")
    return args


def run(clip: Path, data: Path, output_dir: Path, seed: int) -> dict:
    import torch

    from clipcond.evaluation.captioner import main as eval_main
    from clipcond.runs import RunRecord
    from clipcond.train.captioner import main as train_main

    if RunRecord.exists(output_dir):
        raise FileExistsError(f"--output-dir {output_dir} already holds a run; pass an empty or new folder")

    # 1. train with the defaults; the entry points' own JSON goes to stderr, so stdout holds only ours
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    argv = ["--clip", str(clip), "--data", str(data), "--output-dir", str(output_dir), "--seed", str(seed)]
    with contextlib.redirect_stdout(sys.stderr):
        train_main(argv)
    wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
    record = RunRecord.read(output_dir)
    args, summary = record.args, record.summary

    # 2. evaluate as `clipcond eval captioner` does
    with contextlib.redirect_stdout(sys.stderr):
        eval_main(["--model", str(output_dir), "--data", str(data)])
    evaluation = json.loads((output_dir / "eval" / "captioner.json").read_text())

    holds = {text: {f: evaluation[text]["all"][f]["accuracy"] >= bar for f, bar in BARS.items()} for text in TEXTS}
    return {
        **{text: {g: evaluation[text][g] for g in ("all", "seen", "heldout")} for text in TEXTS},
        "best_of_candidates": evaluation["best_of"]["candidates"],
        "names_position": {text: evaluation[text]["names_position"] for text in TEXTS},
        "questions": evaluation["questions"],
        "chance": evaluation["chance"],
        "num_images": evaluation["num_images"],
        "bar": BARS,
        "holds": holds,
        "time_bar_seconds": TIME_BAR_SECONDS,
        "train_wall_seconds_with_caches": round(wall, 1),
        "train_cpu_seconds_with_caches": round(cpu, 1),  # all threads; the cache and validation included
        "train_seconds": summary["seconds"],
        "steps": summary["steps"],
        "train_batch_size": args["train_batch_size"],
        "learning_rate": args["learning_rate"],
        "model": args["model"],
        "lm_parameters": record.section("lm")["parameters"],
        "torch_threads": torch.get_num_threads(),
        "seed": seed,
        "clip": record.clip,
        "data": {"path": str(data), "num_train": record.section("data")["num_samples"]},
        "machine": machine(),
        "load_average": [round(x, 2) for x in os.getloadavg()],  # others' work on the machine inflates the times
    }


def over_seeds(per_seed: dict[int, dict]) -> dict:
    """Each bar of captions and descriptions over the seeds (`bar_holds`: the mean of the seeds' figures; each seed's
    one-object images give its own interval), and the slowest training against the time bar."""
    from clipcond.evaluation.stats import bar_holds

    summary = {}
    for text in TEXTS:
        for field, bar in BARS.items():
            values = {seed: r[text]["all"][field]["accuracy"] for seed, r in per_seed.items()}
            counts = {seed: r[text]["all"][field]["n"] for seed, r in per_seed.items()}
            summary[f"{text}_{field}"] = bar_holds(values, counts, bar)
    slowest = max(r["train_wall_seconds_with_caches"] for r in per_seed.values())
    summary["train_wall_seconds"] = {"max": slowest, "bar": TIME_BAR_SECONDS, "holds": slowest <= TIME_BAR_SECONDS}
    return summary


def run_seeds(demo_dir: Path, seeds: list[int]) -> dict:
    """One captioner per demo seed (see the module's docstring), each in its own temporary folder."""
    check_demo_parts(demo_dir, seeds)  # before the first training
    per_seed = {}
    for seed in seeds:
        demo = demo_dir / f"seed-{seed}"
        with tempfile.TemporaryDirectory(prefix="captioner_quality_") as tmp:
            per_seed[seed] = run(demo / "clip", demo / "data", Path(tmp, "run"), seed)
    return {"seeds": seeds, "over_seeds": over_seeds(per_seed), "per_seed": {str(s): r for s, r in per_seed.items()}}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.demo_dir is not None:
        result = run_seeds(args.demo_dir, args.seeds)
    else:
        with tempfile.TemporaryDirectory(prefix="captioner_quality_") as tmp:
            result = run(args.clip, args.data, args.output_dir or Path(tmp, "run"), args.seed)
    result = {"command": command_line("captioner_quality", argv)} | result
    if args.save_results:
        save_results("captioner_quality", result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
