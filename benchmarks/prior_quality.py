"""Quality of the default DALL-E 2 prior recipe on a CLIP run and its data, on this machine (a benchmark, not a test).

    python benchmarks/prior_quality.py --clip CLIP_RUN --data DIR [--output-dir RUN] [--seed N] [--max-captions N]
                                       [--cache-dir DIR] [--write-results]

does what a user would type, with every training option at its default:

    clipcond train prior --clip CLIP_RUN --data DIR --output-dir RUN --seed N
    clipcond eval prior --model RUN --data DIR            # the test split, guidance 4, 25 DDPM steps

and prints one JSON object: the evaluation metrics (the cosine of the sampled image embeddings to the true ones,
beside the text-embedding and random-image baselines; zero-shot top-1 of the sampled embeddings beside the true
images'), the training time and CPU time per step, the recipe and the machine, and `meets_bar`: the prior beats both
baselines on cosine. `--write-results` also writes the object to benchmarks/results/prior_quality.json. Progress
and logs go to stderr.
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/prior_quality.py",
        description="Train the default prior recipe on a CLIP run, evaluate it, print one JSON object.",
    )
    parser.add_argument("--clip", type=Path, required=True, help="CLIP run folder (`clipcond train clip`)")
    parser.add_argument("--data", type=Path, required=True, help="the data set the CLIP was trained on (with test/)")
    parser.add_argument("--output-dir", type=Path, help="run folder, must not hold a run (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--max-captions", type=int, help="evaluate the first N test items only (default: all)")
    parser.add_argument("--cache-dir", type=Path, help="embedding caches to reuse (default: RUN/cache)")
    add_results_flag(parser)
    return parser.parse_args(argv)


def run(clip: Path, data: Path, output_dir: Path, seed: int, max_captions: int | None, cache_dir: Path | None) -> dict:
    import torch

    from clipcond.evaluation.prior import main as eval_main
    from clipcond.runs import RunRecord
    from clipcond.train.prior import main as train_main

    if RunRecord.exists(output_dir):
        raise FileExistsError(f"--output-dir {output_dir} already holds a run; pass an empty or new folder")

    # 1. train with the defaults; the entry points' own JSON goes to stderr, so stdout holds only ours
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    argv = ["--clip", str(clip), "--data", str(data), "--output-dir", str(output_dir), "--seed", str(seed)]
    cache = ["--cache-dir", str(cache_dir)] if cache_dir else []
    with contextlib.redirect_stdout(sys.stderr):
        train_main(argv + cache)
    wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
    record = RunRecord.read(output_dir)
    args, summary = record.args, record.summary

    # 2. evaluate as `clipcond eval prior` does
    argv = ["--model", str(output_dir), "--data", str(data), "--no-progress", *cache]
    if max_captions:
        argv += ["--max-captions", str(max_captions)]
    with contextlib.redirect_stdout(sys.stderr):
        eval_main(argv)
    metrics = json.loads((output_dir / "eval" / "metrics.json").read_text())

    result = {
        **metrics,
        "train_seconds": summary["seconds"],
        "train_wall_seconds_with_caches": round(wall, 1),
        "train_cpu_seconds_with_caches": round(cpu, 1),  # all threads; building the caches included
        "seconds_per_step": round(summary["seconds"] / summary["steps"], 4),
        "steps": summary["steps"],
        "train_batch_size": args["train_batch_size"],
        "learning_rate": args["learning_rate"],
        "model": args["model"],
        "prior_parameters": record.parameters,
        "torch_threads": torch.get_num_threads(),
        "seed": seed,
        "clip": record.clip,
        "data": {"path": str(data), "num_train": record.section("data")["num_samples"]},
        "machine": {"processor": platform.processor(), "cpu_count": os.cpu_count(), "torch": torch.__version__},
        "load_average": [round(x, 2) for x in os.getloadavg()],  # others' work on the machine inflates the times
    }
    result["meets_bar"] = bool(
        metrics["cosine_predicted"] > metrics["cosine_text_baseline"]
        and metrics["cosine_predicted"] > metrics["cosine_random_baseline"]
    )
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="prior_quality_") as tmp:
        output_dir = args.output_dir or Path(tmp, "run")
        result = run(args.clip, args.data, output_dir, args.seed, args.max_captions, args.cache_dir)
    text = json.dumps(result, indent=2)
    if args.save_results:
        save_results("prior_quality", result)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
