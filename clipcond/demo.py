"""`clipcond demo`: the whole path on the built-in data, with a report.

    clipcond demo --output-dir demo

Stages, each a folder of OUTPUT_DIR that later stages read, skipped when already complete (so an interrupted demo
picks up where it stopped): `data/` (the shapes data set), `clip/` (CLIP pretraining, then its evaluation in
`clip/eval/`), and `report.md` / `report.json` with the figures and the time of every stage.
`--quick` shrinks every budget to a smoke test of the plumbing (the figures are then meaningless).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="clipcond demo",
        description="End to end on the built-in shapes data: make the data, pretrain a CLIP, evaluate it, report.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--output-dir", default="demo", help="where every stage writes its folder and the report")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of every training run")
    parser.add_argument("--num-images", type=int, default=20000, help="size of the shapes data set")
    parser.add_argument("--clip-steps", type=int, default=None, help="CLIP optimizer steps (default: its recipe)")
    parser.add_argument("--mixed-precision", default=None, choices=["no", "bf16", "fp16"], help="for all training")
    parser.add_argument("--quick", action="store_true", help="tiny budgets: checks the plumbing in about a minute")
    return parser.parse_args(argv)


def _timed(name: str, timings: dict[str, float], fn: Callable[[], object]) -> object:
    start = time.perf_counter()
    logger.info("demo: %s ...", name)
    result = fn()
    timings[name] = round(time.perf_counter() - start, 1)
    logger.info("demo: %s done in %.1f s", name, timings[name])
    return result


def _reset_accelerate() -> None:
    """Each stage builds its own Accelerator in this one process; Accelerate's singletons must not carry over."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _stage_data(args: argparse.Namespace, data_dir: Path) -> None:
    from clipcond.data.shapes import load_dataset_info, write_shapes_dataset

    if load_dataset_info(data_dir) is not None:
        logger.info("demo: reusing the data set in %s", data_dir)
        return
    num_images, num_test = (300, 36) if args.quick else (args.num_images, None)
    write_shapes_dataset(data_dir, num_images=num_images, num_test_images=num_test, seed=args.seed, overwrite=True)


def _stage_clip(args: argparse.Namespace, data_dir: Path, clip_dir: Path) -> dict:
    from clipcond.train import clip as train_clip

    record_path = clip_dir / train_clip.RUN_RECORD
    if not record_path.is_file():
        argv = ["--data", str(data_dir), "--output-dir", str(clip_dir), "--seed", str(args.seed)]
        argv += ["--resume-from-checkpoint", "latest", "--validation-steps", "0"]
        if args.quick:
            argv += ["--model", "test", "--max-train-steps", "4", "--train-batch-size", "16"]
        elif args.clip_steps:
            argv += ["--max-train-steps", str(args.clip_steps)]
        if args.mixed_precision:
            argv += ["--mixed-precision", args.mixed_precision]
        train_clip.main(argv)
        _reset_accelerate()
    return json.loads(record_path.read_text())["summary"]


def _stage_clip_eval(data_dir: Path, clip_dir: Path) -> dict:
    from clipcond.data.folders import ImageCaptionDataset
    from clipcond.evaluation.clip import evaluate_clip, write_figures
    from clipcond.models.clip import load_clip

    run = load_clip(clip_dir)
    dataset = ImageCaptionDataset(data_dir, split="test", resolution=run.image_size)
    metrics, extras = evaluate_clip(run, dataset, held_out=(dataset.info or {}).get("held_out"), progress=False)
    write_figures(extras, clip_dir / "eval", split="test")
    (clip_dir / "eval" / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _write_report(out: Path, report: dict) -> None:
    clip = report["clip_eval"]

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    lines = [
        "# clipcond demo report",
        "",
        f"Data: {report['data']['num_train']} train / {report['data']['num_test']} test images, "
        f"held out: {', '.join(report['data']['held_out']) or 'none'}.",
        "",
        "## CLIP",
        "",
        "| zero-shot top-1 (seen) | zero-shot top-1 (held-out) | overall | image→text R@1 | text→image R@1 |",
        "| --- | --- | --- | --- | --- |",
        f"| {pct(clip['zero_shot_top1_seen'])} | {pct(clip['zero_shot_top1_heldout'])} | "
        f"{pct(clip['zero_shot_top1'])} | {pct(clip['image_to_text_R@1'])} | {pct(clip['text_to_image_R@1'])} |",
        "",
        "![confusion matrix](clip/eval/confusion_matrix.png)",
        "",
        "## Time by stage",
        "",
        "| stage | seconds |",
        "| --- | --- |",
        *(f"| {name} | {seconds} |" for name, seconds in report["seconds"].items()),
        f"| **total** | {round(sum(report['seconds'].values()), 1)} |",
        "",
    ]
    if report.get("quick"):
        lines.insert(2, "**Quick mode: tiny budgets; these figures only show that the plumbing works.**\n")
    (out / "report.md").write_text("\n".join(lines))
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data_dir, clip_dir = out / "data", out / "clip"
    timings: dict[str, float] = {}

    # 1. data
    _timed("data", timings, lambda: _stage_data(args, data_dir))
    from clipcond.data.shapes import load_dataset_info

    info = load_dataset_info(data_dir)
    # 2. CLIP pretraining and evaluation
    clip_summary = _timed("clip", timings, lambda: _stage_clip(args, data_dir, clip_dir))
    clip_eval = _timed("clip_eval", timings, lambda: _stage_clip_eval(data_dir, clip_dir))

    # 3. report
    report = {
        "quick": args.quick,
        "data": {
            "num_train": info["splits"]["train"]["num_images"],
            "num_test": info["splits"]["test"]["num_images"],
            "held_out": info["held_out"],
        },
        "clip": clip_summary,
        "clip_eval": clip_eval,
        "seconds": timings,
    }
    _write_report(out, report)
    print(
        json.dumps(
            {
                "report": str(out / "report.md"),
                **{k: clip_eval[k] for k in ("zero_shot_top1_seen", "zero_shot_top1_heldout")},
                "seconds": timings,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
