"""Does the demo's decoder draw what it is asked? (a benchmark, not a test)

    python benchmarks/decoder_quality.py [--demo-dir DIR] [--images-per-prompt N] [--write-results]

runs `clipcond demo --output-dir DIR` (every recipe at its defaults; a finished demo in DIR is reused, an
interrupted one resumed) and prints one JSON object: the judged colour / shape / both-correct accuracy of the
generated images for the seen and the held-out compositions at guidance 1 and at the default guidance, the CLIP
score and FD, the demo's time by stage (wall and CPU seconds), and `meets_bar` against the bar: the prompted colour
in >= 90% and the prompted shape in >= 75% of the images of seen compositions at the default guidance, and the
whole demo within 15 minutes of wall time, counted only for a demo that ran as one command with no training resumed
(`clipcond.demo.uninterrupted`; it holds on 2 quiet CPU cores only: the load average is reported, as other work on
the machine inflates the wall times; the CPU seconds say what the demo itself used).

`--images-per-prompt N` judges N images per prompt again (`clipcond eval generation` on the demo's decoder, into
DIR/decoder/eval_benchmark/) for tighter figures than the demo's own evaluation. `--write-results` also writes the
object to benchmarks/results/decoder_quality.json. Progress and logs go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

from common import add_results_flag, save_results

BAR = {"colour_accuracy_seen": 0.90, "shape_accuracy_seen": 0.75, "demo_wall_seconds": 900.0}
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
    add_results_flag(parser)
    return parser.parse_args(argv)


def _figures(generation: dict) -> dict:
    return {
        key: {name: figures[name] for name in FIGURES} | {"generation_seconds": figures["generation_seconds"]}
        for key, figures in generation["guidance"].items()
    }


def run(demo_dir: Path, images_per_prompt: int | None) -> dict:
    import torch

    from clipcond.demo import main as demo_main
    from clipcond.demo import uninterrupted

    with contextlib.redirect_stdout(sys.stderr):  # the demo's own lines; stdout holds only our JSON
        demo_main(["--output-dir", str(demo_dir)])
    report = json.loads((demo_dir / "report.json").read_text())
    generation = report["generation"]
    if images_per_prompt is not None:
        from clipcond.evaluation.generation import main as eval_main

        out = demo_dir / "decoder" / "eval_benchmark"
        argv = ["--model", str(demo_dir / "decoder"), "--data", str(demo_dir / "data"), "--output-dir", str(out)]
        argv += ["--num-images-per-prompt", str(images_per_prompt), "--no-progress"]
        argv += ["--num-inference-steps", str(generation["settings"]["num_inference_steps"])]
        argv += ["--guidance-scales", f"1,{generation['guidance_scale']}"]
        with contextlib.redirect_stdout(sys.stderr):
            eval_main(argv)
        generation = json.loads((out / "metrics.json").read_text())

    default = generation["guidance"][str(float(generation["guidance_scale"]))]
    timings = report["timings"]
    wall = round(sum(t["wall"] for t in timings.values()), 1)
    result = {
        "guidance_scale": generation["guidance_scale"],
        "images_per_prompt": generation["settings"]["num_images_per_prompt"],
        "sampler": f"{generation['settings']['scheduler']}@{generation['settings']['num_inference_steps']}",
        "figures": _figures(generation),
        "fd_clip_floor": generation["fd_clip_floor"],
        "judge": {k: v for k, v in generation["judge"].items() if k != "path"},
        "decoder": report["decoder"],
        "clip": {k: report["clip_eval"][k] for k in ("zero_shot_top1_seen", "zero_shot_top1_heldout")},
        "timings": timings,
        "demo_wall_seconds": wall,
        "demo_cpu_seconds": round(sum(t["cpu"] for t in timings.values()), 1),
        # stages found complete keep the times of the run that made them (the demo's timings.json)
        "reused_stages": [name for name, t in timings.items() if t.get("reused")],
        "machine": {
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "load_average_at_demo_start": report["machine"]["load_average_start"],
            "load_average_now": [round(x, 2) for x in os.getloadavg()],
        },
        "bar": BAR,
    }
    result["meets_quality_bar"] = bool(
        default["colour_accuracy_seen"] >= BAR["colour_accuracy_seen"]
        and default["shape_accuracy_seen"] >= BAR["shape_accuracy_seen"]
    )
    # The time bar holds for one uninterrupted command only: a demo put together by several attempts, or with a
    # training resumed from a checkpoint, sums times that no single run took.
    result["uninterrupted"] = uninterrupted(report)
    result["meets_time_bar"] = bool(result["uninterrupted"] and wall <= BAR["demo_wall_seconds"])
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="decoder_quality_") as tmp:
        result = run(args.demo_dir or Path(tmp, "demo"), args.images_per_prompt)
    text = json.dumps(result, indent=2)
    if args.save_results:
        save_results("decoder_quality", result)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
