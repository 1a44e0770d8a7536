"""`clipcond demo`: the whole path on the built-in data, with a report.

    clipcond demo --output-dir demo

Stages, each a folder of OUTPUT_DIR that later stages read, skipped when already complete (so an interrupted demo
picks up where it stopped, and both trainings resume from their latest checkpoint):

1. `data/`: the shapes data set;
2. `clip/`: CLIP pretraining, then its evaluation in `clip/eval/`;
3. `decoder/`: the Stable Diffusion path's UNet on the frozen CLIP text encoder (`clipcond train decoder`);
4. `samples/`: `--samples-per-prompt` images of every colour-shape prompt, held-out compositions included, written
   as `clipcond generate` writes them (PNGs, `images.jsonl`, `grid.png`);
5. `decoder/eval_generation/`: what `clipcond eval generation` reports (judged colour / shape accuracy for seen and
   held-out compositions at guidance 1 and the default, CLIP score, FD);
6. `report.md` / `report.json`: the figures, the sample grid, and the time of every stage (wall and CPU).

`--quick` shrinks every budget to a smoke test of the plumbing (the figures are then meaningless).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

# The sampler of the samples and the evaluation: DPM-Solver++ (2M), as `clipcond eval generation` uses it.
SCHEDULER = "dpm"
QUICK_JUDGE = {"num_renders": 256, "epochs": 1, "num_eval_renders": 36}  # a judge that only has to run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from clipcond.evaluation.generation import DEFAULT_GUIDANCE_SCALE  # light: no torch model is built

    parser = argparse.ArgumentParser(
        prog="clipcond demo",
        description="End to end on the built-in shapes data: make the data, pretrain a CLIP, train a text-to-image "
        "decoder on its frozen text encoder, generate and judge samples, report.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--output-dir", default="demo", help="where every stage writes its folder and the report")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of every training run")
    parser.add_argument("--num-images", type=int, default=20000, help="size of the shapes data set")
    parser.add_argument("--clip-steps", type=int, default=None, help="CLIP optimizer steps (default: its recipe)")
    parser.add_argument(
        "--decoder-steps", type=int, default=None, help="decoder optimizer steps (default: its recipe)"
    )
    parser.add_argument(
        "--mixed-precision",
        default=None,
        choices=["no", "bf16", "fp16"],
        help="for both trainings (default: each recipe's own)",
    )
    parser.add_argument("--samples-per-prompt", type=int, default=4, help="images per prompt in samples/")
    parser.add_argument(
        "--eval-images-per-prompt", type=int, default=8, help="images per prompt and guidance scale judged"
    )
    parser.add_argument("--num-inference-steps", type=int, default=20, help="DPM-Solver++ steps per image")
    parser.add_argument(
        "--guidance-scale", type=float, default=DEFAULT_GUIDANCE_SCALE, help="classifier-free guidance weight"
    )
    parser.add_argument("--quick", action="store_true", help="tiny budgets: checks the plumbing in seconds")
    args = parser.parse_args(argv)
    for name in ("num_images", "samples_per_prompt", "eval_images_per_prompt", "num_inference_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name.replace('_', '-')}` must be >= 1, got {getattr(args, name)}")
    for name in ("clip_steps", "decoder_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"`--{name.replace('_', '-')}` must be >= 1, got {getattr(args, name)}")
    if args.guidance_scale < 1:
        raise ValueError(f"`--guidance-scale` must be >= 1 (1: no guidance), got {args.guidance_scale}")
    return args


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (user + system)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class _StageTimes:
    """Wall and CPU seconds of every stage, kept in OUTPUT_DIR/timings.json across runs: a stage found complete
    keeps the time it took when it ran (marked `reused`), so the report of a rerun still says what each stage cost."""

    def __init__(self, path: Path):
        self.path = path
        self.previous = json.loads(path.read_text()) if path.is_file() else {}
        self.timings: dict[str, dict] = {}

    def run(self, name: str, fn: Callable[[], object], complete: bool) -> object:
        wall, cpu = time.perf_counter(), _cpu_seconds()
        logger.info("demo: %s ...", name)
        result = fn()
        if complete and name in self.previous:
            self.timings[name] = {**self.previous[name], "reused": True}
            logger.info("demo: %s reused (it took %.1f s when it ran)", name, self.timings[name]["wall"])
        else:
            self.timings[name] = {
                "wall": round(time.perf_counter() - wall, 1),
                "cpu": round(_cpu_seconds() - cpu, 1),
                "load_average": round(os.getloadavg()[0], 2),  # the 1-minute load average at the end of the stage
                "reused": complete,
            }
            logger.info(
                "demo: %s done in %.1f s (%.1f CPU s)", name, self.timings[name]["wall"], self.timings[name]["cpu"]
            )
        self.path.write_text(json.dumps({**self.previous, **self.timings}, indent=2) + "\n")
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

    metrics_path = clip_dir / "eval" / "metrics.json"
    if metrics_path.is_file():
        return json.loads(metrics_path.read_text())
    run = load_clip(clip_dir)
    dataset = ImageCaptionDataset(data_dir, split="test", resolution=run.image_size)
    metrics, extras = evaluate_clip(run, dataset, held_out=(dataset.info or {}).get("held_out"), progress=False)
    write_figures(extras, clip_dir / "eval", split="test")
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")  # last: its presence marks the stage complete
    return metrics


def _stage_decoder(args: argparse.Namespace, data_dir: Path, clip_dir: Path, decoder_dir: Path) -> dict:
    """`clipcond train decoder` with its recipe's defaults; resumes from the latest checkpoint after a kill."""
    from clipcond.train import decoder as train_decoder

    record_path = decoder_dir / train_decoder.RUN_RECORD
    if not record_path.is_file():
        argv = ["--clip", str(clip_dir), "--data", str(data_dir), "--output-dir", str(decoder_dir)]
        argv += ["--seed", str(args.seed), "--resume-from-checkpoint", "latest", "--validation-steps", "0"]
        if args.quick:
            argv += ["--model", "test", "--max-train-steps", "4", "--train-batch-size", "8", "--lr-warmup-steps", "1"]
        elif args.decoder_steps:
            argv += ["--max-train-steps", str(args.decoder_steps)]
        if args.mixed_precision:
            argv += ["--mixed-precision", args.mixed_precision]
        train_decoder.main(argv)
        _reset_accelerate()
    record = json.loads(record_path.read_text())
    run_args = record["args"]
    return {
        **record["summary"],
        "model": run_args["model"],
        "parameters": record["unet"]["parameters"],
        "train_batch_size": run_args["train_batch_size"],
        "learning_rate": run_args["learning_rate"],
        "mixed_precision": run_args["mixed_precision"],
        "prediction_type": run_args["prediction_type"],
        "beta_schedule": run_args["beta_schedule"],
        "snr_gamma": run_args["snr_gamma"],
        "caption_dropout": run_args["caption_dropout"],
        "ema": record["ema"],
    }


def _prompts(info: dict) -> list[str]:
    from clipcond.data.shapes import class_names
    from clipcond.evaluation.generation import DEFAULT_PROMPT_TEMPLATE

    return [DEFAULT_PROMPT_TEMPLATE.format(colour=c, shape=s) for c, s in (n.split() for n in class_names(info))]


def _samples_args(args: argparse.Namespace, info: dict, decoder_dir: Path, samples_dir: Path) -> argparse.Namespace:
    """`clipcond generate`'s arguments for every colour-shape prompt, `--samples-per-prompt` images each."""
    from clipcond import generate

    argv = ["--model", str(decoder_dir), "--output-dir", str(samples_dir), "--scheduler", SCHEDULER]
    argv += ["--num-images", str(1 if args.quick else args.samples_per_prompt)]
    argv += ["--num-inference-steps", str(2 if args.quick else args.num_inference_steps)]
    argv += ["--guidance-scale", str(args.guidance_scale), "--seed", str(args.seed), "--batch-size", "32"]
    for prompt in _prompts(info):
        argv += ["--prompt", prompt]
    return generate.parse_args(argv)


def _samples_complete(gen_args: argparse.Namespace, samples_dir: Path) -> bool:
    """grid.png is written after images.jsonl: both there, with a record per image, mark a finished stage."""
    records = samples_dir / "images.jsonl"
    if not ((samples_dir / "grid.png").is_file() and records.is_file()):
        return False
    return len(records.read_text().splitlines()) == len(gen_args.prompt) * gen_args.num_images


def _stage_samples(gen_args: argparse.Namespace, samples_dir: Path) -> dict:
    """The images of `gen_args`, written by `clipcond generate`'s own functions (PNGs, images.jsonl, grid.png)."""
    from clipcond import generate

    if not _samples_complete(gen_args, samples_dir):
        pipe = generate.load_pipeline(gen_args)
        images, records = generate.generate_images(pipe, gen_args.prompt, gen_args)
        labels = [record["prompt"] or "(unconditional)" for record in records]
        generate.write_outputs(images, records, samples_dir, grid_rows=len(gen_args.prompt), labels=labels)
    return {
        "folder": str(samples_dir),
        "grid": str(samples_dir / "grid.png"),
        "num_images": len(gen_args.prompt) * gen_args.num_images,
        "images_per_prompt": gen_args.num_images,
        "num_inference_steps": gen_args.num_inference_steps,
        "guidance_scale": gen_args.guidance_scale,
        "scheduler": gen_args.scheduler,
    }


def _stage_generation_eval(
    args: argparse.Namespace, info: dict, data_dir: Path, clip_dir: Path, decoder_dir: Path, judge_dir: Path
) -> dict:
    """`clipcond eval generation` on the decoder: guidance 1 and `--guidance-scale`, judged, CLIP score and FD."""
    out = decoder_dir / "eval_generation"
    if (out / "metrics.json").is_file():  # written last by the evaluation
        return json.loads((out / "metrics.json").read_text())
    import torch

    from clipcond.data.shapes import class_names
    from clipcond.evaluation.generation import evaluate_generation, load_reference_images
    from clipcond.evaluation.judge import JudgeTrainingConfig, load_or_train_judge
    from clipcond.models.clip import load_clip
    from clipcond.pipelines.text_to_image import TextToImagePipeline

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:  # a judge that trains in a second, cached in the demo folder; its verdicts mean nothing
        judge = load_or_train_judge(
            int(info["resolution"]), cache_dir=judge_dir, config=JudgeTrainingConfig(**QUICK_JUDGE)
        )
    else:
        judge = load_or_train_judge(int(info["resolution"]), device=device)
    clip_run = load_clip(clip_dir, device=device)
    reference = load_reference_images(str(data_dir), "test", clip_run.image_size)
    pipe = TextToImagePipeline.from_pretrained(decoder_dir, local_files_only=True).to(device)
    return evaluate_generation(
        pipe,
        classes=class_names(info),
        held_out=info.get("held_out") or [],
        judge=judge,
        clip_run=clip_run,
        reference_images=reference,
        num_images_per_prompt=1 if args.quick else args.eval_images_per_prompt,
        guidance_scales=[1.0, args.guidance_scale],
        guidance_scale=args.guidance_scale,
        num_inference_steps=2 if args.quick else args.num_inference_steps,
        scheduler=SCHEDULER,
        seed=args.seed,
        output_dir=out,
        extra_settings={"model": str(decoder_dir), "data": str(data_dir), "reference_split": "test"},
    )


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _generation_rows(generation: dict) -> list[str]:
    rows = []
    for key, g in generation["guidance"].items():
        rows.append(
            f"| {float(key):g} | {_pct(g['colour_accuracy_seen'])} | {_pct(g['shape_accuracy_seen'])} | "
            f"{_pct(g['both_accuracy_seen'])} | {_pct(g['colour_accuracy_heldout'])} | "
            f"{_pct(g['shape_accuracy_heldout'])} | {_pct(g['both_accuracy_heldout'])} | "
            f"{_num(g['clip_score'])} | {_num(g['fd_clip'], 2)} |"
        )
    return rows


def _write_report(out: Path, report: dict) -> None:
    clip, decoder, generation, samples = (
        report["clip_eval"],
        report["decoder"],
        report["generation"],
        report["samples"],
    )
    held_out = ", ".join(report["data"]["held_out"]) or "none"
    ema = decoder["ema"] or {}
    seconds = report["seconds"]
    lines = [
        "# clipcond demo report",
        "",
        f"Data: {report['data']['num_train']} train / {report['data']['num_test']} test images, held out: {held_out}.",
        "",
        "## CLIP",
        "",
        "| zero-shot top-1 (seen) | zero-shot top-1 (held-out) | overall | image→text R@1 | text→image R@1 |",
        "| --- | --- | --- | --- | --- |",
        f"| {_pct(clip['zero_shot_top1_seen'])} | {_pct(clip['zero_shot_top1_heldout'])} | "
        f"{_pct(clip['zero_shot_top1'])} | {_pct(clip['image_to_text_R@1'])} | {_pct(clip['text_to_image_R@1'])} |",
        "",
        "![confusion matrix](clip/eval/confusion_matrix.png)",
        "",
        "## Decoder (text-to-image)",
        "",
        f"UNet `{decoder['model']}` ({decoder['parameters'] / 1e6:.2f} M parameters) cross-attending to the frozen CLIP "
        f"text encoder's token states: {decoder['steps']} steps of batch {decoder['train_batch_size']} "
        f"({decoder['samples_seen']} samples), learning rate {decoder['learning_rate']:g}, "
        f"{decoder['prediction_type']} on a {decoder['beta_schedule']} schedule, min-SNR gamma {decoder['snr_gamma']}, "
        f"caption dropout {decoder['caption_dropout']:g}, precision {decoder['mixed_precision'] or 'fp32'}; "
        f"final loss {_num(decoder['final_loss'], 4)}; saved weights: "
        + (f"EMA (decay {_num(ema.get('decay'), 4)} at the end)." if ema else "raw (no EMA)."),
        "",
        f"Judged on {generation['settings']['num_images_per_prompt']} images per colour-shape prompt and guidance "
        f"scale ({generation['settings']['scheduler']}, {generation['settings']['num_inference_steps']} steps) by an "
        "attribute classifier trained on ground-truth renders (chance: colour "
        f"{_pct(generation['judge']['chance_colour_accuracy'])}, shape "
        f"{_pct(generation['judge']['chance_shape_accuracy'])}). Held-out compositions were in no training image "
        "or caption of the CLIP or the decoder.",
        "",
        "| guidance | colour (seen) | shape (seen) | both (seen) | colour (held-out) | shape (held-out) | "
        "both (held-out) | CLIP score | FD (CLIP features) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *_generation_rows(generation),
        "",
        f"CLIP score: mean cosine of image and prompt under the trained CLIP. FD: Fréchet distance of CLIP image "
        f"features to the test split's single-object images; ground-truth renders score "
        f"{_num(generation['fd_clip_floor'], 2)} at this sample size.",
        "",
        f"Samples ({samples['images_per_prompt']} per prompt, guidance {samples['guidance_scale']:g}, "
        f"{samples['scheduler']} {samples['num_inference_steps']} steps; `samples/images.jsonl` records each one's "
        "prompt and seed):",
        "",
        "![samples](samples/grid.png)",
        "",
        f"Judged grid: `decoder/eval_generation/grid_guidance_{float(generation['guidance_scale'])}.png`.",
        "",
        "## Time by stage",
        "",
        "| stage | wall seconds | CPU seconds | load average at the end |",
        "| --- | --- | --- | --- |",
        *(
            f"| {name}{' (reused)' if t.get('reused') else ''} | {t['wall']} | {t['cpu']} | {t['load_average']} |"
            for name, t in report["timings"].items()
        ),
        f"| **total** | {round(sum(seconds.values()), 1)} | "
        f"{round(sum(t['cpu'] for t in report['timings'].values()), 1)} | |",
        "",
        f"Machine: {report['machine']['cpu_count']} CPUs, {report['machine']['torch_threads']} torch threads, "
        f"load average {report['machine']['load_average_start']} at the start (other work on the machine inflates wall "
        "times, not CPU times). A reused stage was found complete; its times are those of the run that made it.",
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
    data_dir, clip_dir, decoder_dir, samples_dir = out / "data", out / "clip", out / "decoder", out / "samples"
    from clipcond.data.shapes import load_dataset_info
    from clipcond.train.clip import RUN_RECORD as CLIP_RECORD
    from clipcond.train.decoder import RUN_RECORD as DECODER_RECORD

    times = _StageTimes(out / "timings.json")
    load_start = round(os.getloadavg()[0], 2)

    # 1. data
    times.run("data", lambda: _stage_data(args, data_dir), complete=load_dataset_info(data_dir) is not None)
    info = load_dataset_info(data_dir)
    # 2. CLIP pretraining and evaluation
    done = (clip_dir / CLIP_RECORD).is_file()
    clip_summary = times.run("clip", lambda: _stage_clip(args, data_dir, clip_dir), complete=done)
    done = (clip_dir / "eval" / "metrics.json").is_file()
    clip_eval = times.run("clip_eval", lambda: _stage_clip_eval(data_dir, clip_dir), complete=done)
    # 3. the decoder on the frozen CLIP text encoder
    done = (decoder_dir / DECODER_RECORD).is_file()
    decoder = times.run("decoder", lambda: _stage_decoder(args, data_dir, clip_dir, decoder_dir), complete=done)
    # 4. samples of every colour-shape prompt, as `clipcond generate` writes them
    samples_args = _samples_args(args, info, decoder_dir, samples_dir)
    samples = times.run(
        "samples",
        lambda: _stage_samples(samples_args, samples_dir),
        complete=_samples_complete(samples_args, samples_dir),
    )
    # 5. judged evaluation of the decoder
    done = (decoder_dir / "eval_generation" / "metrics.json").is_file()
    generation = times.run(
        "generation_eval",
        lambda: _stage_generation_eval(args, info, data_dir, clip_dir, decoder_dir, out / "judge"),
        complete=done,
    )

    # 6. report
    import torch

    report = {
        "quick": args.quick,
        "data": {
            "num_train": info["splits"]["train"]["num_images"],
            "num_test": info["splits"]["test"]["num_images"],
            "held_out": info["held_out"],
        },
        "clip": clip_summary,
        "clip_eval": clip_eval,
        "decoder": decoder,
        "samples": samples,
        "generation": generation,
        "seconds": {name: t["wall"] for name, t in times.timings.items()},
        "timings": times.timings,
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_start": load_start,
        },
    }
    _write_report(out, report)
    headline = {
        key: generation[key]
        for key in ("colour_accuracy_seen", "shape_accuracy_seen", "colour_accuracy_heldout", "shape_accuracy_heldout")
    }
    print(
        json.dumps(
            {
                "report": str(out / "report.md"),
                **{k: clip_eval[k] for k in ("zero_shot_top1_seen", "zero_shot_top1_heldout")},
                **{k: None if v is None else round(v, 4) for k, v in headline.items()},
                "seconds": report["seconds"],
            }
        )
    )
    print(f"clipcond demo: report in {out / 'report.md'} (samples in {samples_dir})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
