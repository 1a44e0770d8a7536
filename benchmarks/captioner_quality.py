"""Quality and training time of the default captioner recipe on a CLIP run and its shapes data, on this machine (a
benchmark, not a test).

    python benchmarks/captioner_quality.py --clip CLIP_RUN --data DIR [--output-dir RUN] [--seed N] [--save-results]

does what a user would type, with every training option at its default (the `tiny` language model):

    clipcond train captioner --clip CLIP_RUN --data DIR --output-dir RUN --seed N
    clipcond eval captioner --model RUN --data DIR            # the test split

and prints one JSON object: the evaluation (greedy captions and detailed descriptions of the one-object test images,
colour / shape / count / position, seen and held-out compositions; answers per question type), the training time
(wall and CPU, the vision-token cache and validation included), the recipe and the machine, and the bars: colour,
shape and count right in >= 90% of the one-object images, position >= 80%, training within 10 minutes.
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

from common import add_results_flag, command_line, machine, save_results

BARS = {"colour": 0.9, "shape": 0.9, "count": 0.9, "position": 0.8}
TIME_BAR_SECONDS = 600


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/captioner_quality.py",
        description="Train the default captioner recipe on a CLIP run, evaluate it, print one JSON object.",
    )
    parser.add_argument("--clip", type=Path, required=True, help="CLIP run folder (`clipcond train clip`)")
    parser.add_argument("--data", type=Path, required=True, help="the shapes data the CLIP was trained on")
    parser.add_argument("--output-dir", type=Path, help="run folder, must not hold a run (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    add_results_flag(parser)
    return parser.parse_args(argv)


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

    holds = {
        text: {f: evaluation[text]["all"][f]["accuracy"] >= bar for f, bar in BARS.items()}
        for text in ("caption", "description")
    }
    return {
        "caption": {g: evaluation["caption"][g] for g in ("all", "seen", "heldout")},
        "description": {g: evaluation["description"][g] for g in ("all", "seen", "heldout")},
        "names_position": {t: evaluation[t]["names_position"] for t in ("caption", "description")},
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="captioner_quality_") as tmp:
        output_dir = args.output_dir or Path(tmp, "run")
        result = run(args.clip, args.data, output_dir, args.seed)
    result = {"command": command_line("captioner_quality", argv)} | result
    if args.save_results:
        save_results("captioner_quality", result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
