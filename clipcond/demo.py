"""`clipcond demo`: the whole path on the built-in data, with a report.

    clipcond demo --output-dir demo

Stages, each a folder of OUTPUT_DIR that later stages read, skipped when already complete (so an interrupted demo
picks up where it stopped, and both trainings resume from their latest checkpoint):

1. `data/`: the shapes data set;
2. `clip/`: CLIP pretraining, then its evaluation in `clip/eval/`;
3. `decoder/`: the Stable Diffusion path's UNet on the frozen CLIP text encoder (`clipcond train decoder`);
4. `decoder/eval_generation/`: what `clipcond eval generation` reports (judged colour / shape accuracy for seen and
   held-out compositions at guidance 1 and the default, CLIP score, FD);
5. `samples/`: `--samples-per-prompt` images of every colour-shape prompt, held-out compositions included, written
   as `clipcond generate` writes them (PNGs, `images.jsonl` with the seed that redraws each, `grid.png`): the first
   images the evaluation drew at the default guidance, not drawn twice;
6. `report.md` / `report.json`: the figures, the sample grid, and the time of every stage (wall and CPU), "startup"
   (the imports before the first stage) included, so that the stages add up to the command's time.

`--dalle2` adds the DALL-E 2 (unCLIP) path on the same frozen CLIP, before the report (opt-in: the default demo
fits in 15 minutes on 2 CPU cores, this does not):

- `prior/`: the prior (`clipcond train prior`);
- `unclip_decoder/`: the image-embedding decoder (`clipcond train decoder --conditioning image-embedding`);
- `unclip_eval/`: what `clipcond eval unclip` reports (`clipcond.evaluation.unclip`): the prior's cosine beside
  both baselines, judged variations of one-object test images and judged text-to-image through the prior;

and the report gains a "DALL-E 2 path" section with one table of the judged colour and shape accuracy of the
Stable Diffusion path, of text-to-image through the prior and of variations, for seen and held-out compositions.

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

from clipcond.demo_layout import LATENT_RESOLUTION, DemoLayout
from clipcond.demo_report import dalle2_table, summary_line, write_report
from clipcond.device import fast_bf16, resolve_device
from clipcond.finite import finite_float, finite_or_null
from clipcond.help_formatter import HelpFormatter
from clipcond.hub import local_files_only
from clipcond.pipeline_loading import DEFAULT_SAMPLER, use_scheduler
from clipcond.runlock import run_folder_lock
from clipcond.runs import RunRecord
from clipcond.storage import check_output_dir, save_image_atomic, write_json_atomic

logger = logging.getLogger(__name__)


def default_train_precision() -> str:
    """The CLIP's and the decoders' training precision: bf16 autocast where bf16 is fast (`fast_bf16`: faster than
    fp32 on CPUs with bf16 units, the README's speed table), fp32 elsewhere."""
    return "bf16" if fast_bf16(resolve_device(None)) else "no"


def default_sample_dtype() -> str:
    """The precision of the judged images and samples: bf16 where it is fast, drawing them in about half the time of
    fp32 and judged the same (docs/lab-notes.md, beside the demo's times); fp32 elsewhere."""
    return "bf16" if fast_bf16(resolve_device(None)) else "fp32"


QUICK_JUDGE = {"num_renders": 256, "epochs": 1, "num_eval_renders": 36}  # a judge that only has to run

# What each training stage runs beyond its trainer's own defaults, by recipe (`--recipe`). "cpu" is the trainers'
# recipes as they are, sized for 2 CPU cores (the whole demo in 15 minutes), but for the decoders' spaces and steps.
# "gpu", the default where CUDA is, keeps their learning rates and schedules but sees many more samples: larger
# batches and more steps, which a GPU takes in seconds (the decoder's judged shape accuracy was still climbing at the
# CPU recipe's step count). "quick" only checks the plumbing. Later arguments win, so `--clip-steps` and the like
# still override a recipe's step count.
RECIPES = {
    # The pixel decoders denoise 2 x 2 pixel blocks (`--space-to-depth 2`): the same images, at a quarter of the
    # positions, so a step costs a fraction of a pixel step, and 2400 steps take less time than the text decoder's
    # 1200 pixel steps did, a little more than the image-embedding decoder's 800 (docs/lab-notes.md, "pixel blocks,
    # the pixel path's cheaper steps" and "the demo on pixel blocks"). The latent decoder's step costs less than half
    # a pixel step, hence its 2400 steps too ("the latent decoder at 2400 steps").
    "cpu": {
        "clip": [],
        "decoder": ["--space-to-depth", "2", "--max-train-steps", "2400"],
        "prior": [],
        "unclip_decoder": ["--space-to-depth", "2", "--max-train-steps", "2400"],
        "vae": [],
        "latent_decoder": ["--max-train-steps", "2400"],
    },
    "gpu": {
        "clip": ["--train-batch-size", "512", "--max-train-steps", "1500", "--lr-warmup-steps", "100"],
        "decoder": ["--train-batch-size", "128", "--max-train-steps", "2000", "--lr-warmup-steps", "100"],
        "prior": ["--train-batch-size", "512", "--max-train-steps", "1000", "--lr-warmup-steps", "50"],
        "unclip_decoder": ["--train-batch-size", "128", "--max-train-steps", "2500", "--lr-warmup-steps", "100"],
        "vae": ["--train-batch-size", "64", "--max-train-steps", "2000", "--lr-warmup-steps", "100"],
        "latent_decoder": ["--train-batch-size", "128", "--max-train-steps", "2000", "--lr-warmup-steps", "100"],
    },
    "quick": {
        "clip": ["--model", "test", "--max-train-steps", "4", "--train-batch-size", "16"],
        "decoder": ["--model", "test", "--max-train-steps", "4", "--train-batch-size", "8", "--lr-warmup-steps", "1"],
        "prior": ["--model", "test", "--max-train-steps", "4", "--train-batch-size", "16", "--lr-warmup-steps", "1"],
        "unclip_decoder": [
            *("--model", "test", "--max-train-steps", "4", "--train-batch-size", "8", "--lr-warmup-steps", "1"),
        ],
        "vae": ["--model", "test", "--max-train-steps", "4", "--train-batch-size", "4", "--lr-warmup-steps", "1"],
        "latent_decoder": [
            *("--model", "test", "--max-train-steps", "4", "--train-batch-size", "8", "--lr-warmup-steps", "1"),
        ],
    },
}
# Images per prompt and guidance scale that the evaluations judge, by recipe: a GPU draws 4x as many in seconds,
# which narrows the accuracies' confidence intervals by half.
EVAL_IMAGES_PER_PROMPT = {"cpu": 8, "gpu": 32, "quick": 1}
# Minimal pairs per probe and group (seen, held-out) of the demo's CLIP probes (`clipcond probe`): five probes of
# 2 x 100 pairs embed in seconds; the generator probes sample images and are left to `clipcond probe --model`.
PROBE_PAIRS, PROBE_PAIRS_QUICK = 100, 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from clipcond.device import DTYPES
    from clipcond.evaluation.generation import DEFAULT_GUIDANCE_SCALE  # light: no torch model is built
    from clipcond.pipelines.inputs import DEFAULT_IMAGE_EMBEDDING_GUIDANCE_SCALE

    parser = argparse.ArgumentParser(
        prog="clipcond demo",
        description="End to end on the built-in shapes data: make the data, pretrain a CLIP, train a text-to-image "
        "decoder on its frozen text encoder, generate and judge samples, report; with --dalle2 also the DALL-E 2 path "
        "(a prior and an image-embedding decoder), judged beside it.",
        formatter_class=HelpFormatter,
    )
    _add_training_arguments(parser)
    _add_sampling_arguments(parser, DEFAULT_GUIDANCE_SCALE, DTYPES)
    parser.add_argument("--quick", action="store_true", help="tiny budgets: checks the plumbing in seconds")
    _add_dalle2_arguments(
        parser.add_argument_group("--dalle2: the DALL-E 2 path (prior + image-embedding decoder) as well"),
        DEFAULT_IMAGE_EMBEDDING_GUIDANCE_SCALE,
    )
    _add_latent_arguments(
        parser.add_argument_group("--latent: the latent path (a VAE and a latent text-to-image decoder) as well")
    )
    args = parser.parse_args(argv)
    args.recipe = resolve_recipe(args.recipe, args.quick)
    if args.eval_images_per_prompt is None:
        args.eval_images_per_prompt = EVAL_IMAGES_PER_PROMPT[args.recipe]
    args.sample_dtype = args.sample_dtype or default_sample_dtype()
    _check_args(args)
    return args


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the demo writes, its seed, and the budgets of its data and trainings."""
    parser.add_argument("--output-dir", default="demo", help="where every stage writes its folder and the report")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of every training run")
    parser.add_argument(
        "--recipe",
        default="auto",
        choices=["auto", "cpu", "gpu"],
        help="the training budgets (see RECIPES in clipcond/demo.py): the trainers' own, sized for 2 CPU cores, or "
        "larger batches and more steps for a GPU (auto: gpu where CUDA is available)",
    )
    parser.add_argument("--num-images", type=int, default=20000, help="size of the shapes data set")
    parser.add_argument("--clip-steps", type=int, default=None, help="CLIP optimizer steps (default: its recipe)")
    parser.add_argument(
        "--decoder-steps", type=int, default=None, help="decoder optimizer steps (default: its recipe)"
    )
    parser.add_argument(
        "--mixed-precision",
        default=None,
        choices=["no", "bf16", "fp16"],
        help="precision of the trainings (default: bf16 for the CLIP and the decoders where bf16 is fast: a GPU, or a "
        "CPU with AVX512-BF16 or AMX; fp32 elsewhere; the prior's and the VAE's recipes for them)",
    )


def _add_sampling_arguments(parser: argparse.ArgumentParser, guidance_scale: float, dtypes) -> None:
    """How the judged images and the samples are drawn (`guidance_scale`: the default guidance; `dtypes`: the
    precisions `clipcond generate` takes)."""
    parser.add_argument(
        "--samples-per-prompt", type=int, default=4, help="images per prompt in samples/ (the evaluation's first ones)"
    )
    parser.add_argument(
        "--eval-images-per-prompt",
        type=int,
        default=None,
        help="images per prompt and guidance scale judged (default: "
        + ", ".join(
            f"{n} with the {recipe} recipe" for recipe, n in EVAL_IMAGES_PER_PROMPT.items() if recipe != "quick"
        )
        + ")",
    )
    parser.add_argument("--num-inference-steps", type=int, default=20, help="DPM-Solver++ steps per image")
    parser.add_argument(
        "--guidance-scale",
        type=finite_float,
        default=guidance_scale,
        help=f"the text-to-image decoder's classifier-free guidance weight (default {guidance_scale:g})",
    )
    parser.add_argument(
        "--sample-dtype",
        default=None,
        choices=dtypes,
        help="precision of the pipelines that draw the judged images and the samples (and, with --dalle2, the "
        "prior's embeddings and the variations), as `clipcond generate --dtype` (fp16: CUDA only; default: bf16 "
        "where it is fast, as --mixed-precision, fp32 elsewhere)",
    )


def _add_dalle2_arguments(dalle2: argparse._ArgumentGroup, guidance_scale: float) -> None:
    """`--dalle2` and its budgets (`guidance_scale`: the image-embedding decoder's default guidance)."""
    dalle2.add_argument(
        "--dalle2", action="store_true", help="also train a prior and an image-embedding decoder, judge both paths"
    )
    dalle2.add_argument("--prior-steps", type=int, default=None, help="prior optimizer steps (default: its recipe)")
    dalle2.add_argument(
        "--unclip-decoder-steps", type=int, default=None, help="image-embedding decoder steps (default: its recipe)"
    )
    dalle2.add_argument(
        "--variation-sources", type=int, default=4, help="one-object test images varied per colour-shape class"
    )
    dalle2.add_argument("--variations-per-source", type=int, default=4, help="variations judged per source image")
    dalle2.add_argument(
        "--unclip-guidance-scale",
        type=finite_float,
        default=guidance_scale,
        help=f"the image-embedding decoder's guidance weight (default {guidance_scale:g})",
    )


def _add_latent_arguments(latent: argparse._ArgumentGroup) -> None:
    latent.add_argument(
        "--latent",
        action="store_true",
        help=f"also train a VAE on the shapes data at {LATENT_RESOLUTION} px and a text-to-image decoder on its latents "
        "(Stable Diffusion's conditioning: unmasked text states, so it exports to stock diffusers), judge both",
    )
    latent.add_argument("--vae-steps", type=int, default=None, help="VAE optimizer steps (default: its recipe)")
    latent.add_argument(
        "--latent-decoder-steps", type=int, default=None, help="latent decoder optimizer steps (default: its recipe)"
    )


def _check_args(args: argparse.Namespace) -> None:
    """Refuse counts and steps below 1, guidance below 1, more samples than judged images, fp16 without CUDA."""
    for name in (
        "num_images",
        "samples_per_prompt",
        "eval_images_per_prompt",
        "num_inference_steps",
        "variation_sources",
        "variations_per_source",
    ):
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name.replace('_', '-')}` must be >= 1, got {getattr(args, name)}")
    for name in (
        "clip_steps",
        "decoder_steps",
        "prior_steps",
        "unclip_decoder_steps",
        "vae_steps",
        "latent_decoder_steps",
    ):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"`--{name.replace('_', '-')}` must be >= 1, got {getattr(args, name)}")
    for flag, value in (
        ("--guidance-scale", args.guidance_scale),
        ("--unclip-guidance-scale", args.unclip_guidance_scale),
    ):
        if not value >= 1:
            raise ValueError(f"`{flag}` must be >= 1 (1: no guidance), got {value}")
    if args.samples_per_prompt > args.eval_images_per_prompt and not args.quick:  # --quick keeps one of each
        raise ValueError(
            f"`--samples-per-prompt` ({args.samples_per_prompt}) must be <= `--eval-images-per-prompt` "
            f"({args.eval_images_per_prompt}): the samples are the first images that the evaluation draws"
        )
    if args.sample_dtype == "fp16":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("`--sample-dtype fp16` needs a CUDA device, and none is available; use bf16 or fp32")


def resolve_recipe(recipe: str, quick: bool = False) -> str:
    """The `RECIPES` key of `--recipe` (auto: gpu where CUDA is available, else cpu); `--quick` overrides it."""
    if quick:
        return "quick"
    if recipe == "auto":
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"
    return recipe


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (user + system)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class _StageTimes:
    """Wall and CPU seconds of every stage, kept in OUTPUT_DIR/timings.json across runs: a stage found complete
    keeps the time it took when it ran (marked `reused`), so the report of a rerun still says what each stage cost.
    Each time names the command that measured it (`run`: when it started), so `uninterrupted` can tell one command's
    stages from stages put together by several."""

    def __init__(self, path: Path):
        self.path = path
        self.previous = json.loads(path.read_text()) if path.is_file() else {}
        self.timings: dict[str, dict] = {}
        self.run_id = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) + f"-{os.getpid()}"

    def run(self, name: str, fn: Callable[[], object], complete: bool) -> object:
        wall, cpu = time.perf_counter(), _cpu_seconds()
        logger.info("demo: %s ...", name)
        result = fn()
        self.record(name, wall, cpu, complete)
        return result

    def record(self, name: str, wall: float, cpu: float, complete: bool) -> None:
        """Record stage `name`, begun at `time.perf_counter()` = `wall` and `_cpu_seconds()` = `cpu`; when it was
        `complete` before and has a recorded time, that time is kept."""
        if complete and name in self.previous:
            self.timings[name] = {**self.previous[name], "reused": True}
            logger.info("demo: %s reused (it took %.1f s when it ran)", name, self.timings[name]["wall"])
        else:
            self.timings[name] = {
                "wall": round(time.perf_counter() - wall, 1),
                "cpu": round(_cpu_seconds() - cpu, 1),
                "load_average": round(os.getloadavg()[0], 2),  # the 1-minute load average at the end of the stage
                "reused": complete,
                "run": self.run_id,
            }
            logger.info(
                "demo: %s done in %.1f s (%.1f CPU s)", name, self.timings[name]["wall"], self.timings[name]["cpu"]
            )
        write_json_atomic(self.path, {**self.previous, **self.timings})


def _recipe_values(extra: list[str]) -> dict[str, str | bool]:
    """A recipe's arguments as {dest: value}: "--flag VALUE" pairs, and True for a flag with no value."""
    values, rest = {}, list(extra)
    while rest:
        flag = rest.pop(0)
        values[flag.lstrip("-").replace("-", "_")] = rest.pop(0) if rest and not rest[0].startswith("--") else True
    return values


def stale_runs(out_dir: str | os.PathLike, recipe: str) -> list[str]:
    """What the finished runs in the demo folder `out_dir` trained with that `RECIPES[recipe]` would not give them,
    one line per argument: a demo reuses a finished run as it is, so a folder kept from an older recipe (or a run
    given other steps) still reports that run. Empty when every finished run follows the recipe."""
    layout, lines = DemoLayout(out_dir), []
    for stage, extra in RECIPES[recipe].items():
        if not RunRecord.exists(getattr(layout, stage)):
            continue
        trained = RunRecord.read(getattr(layout, stage)).args
        for dest, wanted in _recipe_values(extra).items():
            had = trained.get(dest)
            if had is None or (had if isinstance(wanted, bool) else str(had)) != wanted:
                lines.append(f"{stage}: trained with {dest}={had!r}, the {recipe!r} recipe gives {wanted!r}")
    return lines


def uninterrupted(report: dict) -> bool:
    """Whether a demo's stages all ran in one command and none of its trainings resumed from a checkpoint: only then
    do its stage times add up to the wall time of one uninterrupted run (a stage finished by an earlier, killed
    attempt keeps that attempt's time; a resumed training counts only its steps after the resume)."""
    runs = {t.get("run") for t in report["timings"].values()}  # times written before `run` existed: unknown
    names = ("clip", "decoder", "prior", "unclip_decoder", "vae", "latent_decoder")
    trained = [report[name] for name in names if name in report]
    return len(runs) == 1 and None not in runs and all(summary.get("resumed_from") is None for summary in trained)


def _train_unless_done(
    args: argparse.Namespace, stage: str, trainer, out_dir: Path, argv: list[str], *, steps: int | None, precision
) -> RunRecord:
    """Run the training entry point `trainer` (a module with `main(argv)`) into `out_dir` unless its run record says
    it finished; a killed run resumes from its latest checkpoint. The recipe's arguments for `stage` come after
    `argv`, then `steps` (when given, and not --quick) as `--max-train-steps`. Returns the run record."""
    if not RunRecord.exists(out_dir):
        argv = [*argv, "--resume-from-checkpoint", "latest", "--validation-steps", "0", *RECIPES[args.recipe][stage]]
        if steps and not args.quick:
            argv += ["--max-train-steps", str(steps)]
        if precision:
            argv += ["--mixed-precision", precision]
        from clipcond.train.loop import reset_accelerate_state

        trainer.main(argv)
        reset_accelerate_state()  # each stage builds its own Accelerator in this one process
    return RunRecord.read(out_dir)


# The training arguments that the report gives for every trained stage.
RECIPE_ARGS = ("model", "train_batch_size", "learning_rate", "mixed_precision")


def _run_summary(record: RunRecord, *arg_names: str, **extra) -> dict:
    """A run record's summary, with its `RECIPE_ARGS` and `arg_names` arguments and the `extra` fields."""
    return {**record.summary, **{name: record.args[name] for name in (*RECIPE_ARGS, *arg_names)}, **extra}


def _stage_data(args: argparse.Namespace, data_dir: Path, resolution: int = 32) -> None:
    from clipcond.data.shapes import load_dataset_info, write_shapes_dataset

    if load_dataset_info(data_dir) is not None:
        logger.info("demo: reusing the data set in %s", data_dir)
        return
    num_images, num_test = (300, 36) if args.quick else (args.num_images, None)
    write_shapes_dataset(
        data_dir,
        num_images=num_images,
        num_test_images=num_test,
        resolution=resolution,
        seed=args.seed,
        overwrite=True,
    )


def _stage_clip(args: argparse.Namespace, data_dir: Path, clip_dir: Path) -> dict:
    from clipcond.train import clip as train_clip

    argv = ["--data", str(data_dir), "--output-dir", str(clip_dir), "--seed", str(args.seed)]
    precision = args.mixed_precision or default_train_precision()
    record = _train_unless_done(args, "clip", train_clip, clip_dir, argv, steps=args.clip_steps, precision=precision)
    return _run_summary(record)


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
    write_json_atomic(metrics_path, finite_or_null(metrics))  # last: its presence marks the stage complete
    return metrics


def _stage_probe(
    args: argparse.Namespace, data_dir: Path, clip_dir: Path, probe_dir: Path, current: dict | None
) -> dict:
    """The CLIP's compositional minimal pairs (`clipcond probe` without the generators: seconds); the figures with
    their markdown tables for the demo's report. `current`: the report already in `probe_dir` when it is of this
    CLIP (`current_clip_probes`; a CLIP stage that re-ran makes it stale), else None: the probes run."""
    from clipcond.evaluation.probe_report import markdown_tables, run_clip_probes, write_report

    report = current
    if report is None:
        report, _ = run_clip_probes(clip_dir, data_dir, probe_dir, _probe_pairs(args), args.seed)
        write_report(report, probe_dir, title="clipcond probe (demo)")
    return {**report, "markdown": markdown_tables(report, heading="###")}


def _probe_pairs(args: argparse.Namespace) -> int:
    return PROBE_PAIRS_QUICK if args.quick else PROBE_PAIRS


def _stage_decoder(
    args: argparse.Namespace,
    data_dir: Path,
    clip_dir: Path,
    decoder_dir: Path,
    *,
    stage: str = "decoder",
    extra: tuple[str, ...] = (),
    steps: int | None = None,
) -> dict:
    """`clipcond train decoder` (with `extra` arguments) with the recipe's defaults for `stage`; resumes from the
    latest checkpoint after a kill."""
    from clipcond.train import decoder as train_decoder

    argv = ["--clip", str(clip_dir), "--data", str(data_dir), "--output-dir", str(decoder_dir), *extra]
    argv += ["--seed", str(args.seed)]
    precision = args.mixed_precision or default_train_precision()
    record = _train_unless_done(args, stage, train_decoder, decoder_dir, argv, steps=steps, precision=precision)
    return _run_summary(
        record,
        "prediction_type",
        "beta_schedule",
        "snr_gamma",
        "caption_dropout",
        parameters=record.parameters,
        ema=record.ema,
        space_to_depth=record.args.get("space_to_depth", 1),  # 1 in run records from before the flag
    )


def _prompts(info: dict) -> list[str]:
    from clipcond.data.shapes import class_names
    from clipcond.evaluation.generation import DEFAULT_PROMPT_TEMPLATE

    return [DEFAULT_PROMPT_TEMPLATE.format(colour=c, shape=s) for c, s in (n.split() for n in class_names(info))]


def _samples_per_prompt(args: argparse.Namespace) -> int:
    return 1 if args.quick else args.samples_per_prompt


def _samples_complete(info: dict, per_prompt: int, samples_dir: Path) -> bool:
    """grid.png is written after images.jsonl: both there, with a record per image, mark a finished stage."""
    records = samples_dir / "images.jsonl"
    if not ((samples_dir / "grid.png").is_file() and records.is_file()):
        return False
    return len(records.read_text().splitlines()) == len(_prompts(info)) * per_prompt


def _stage_samples(args: argparse.Namespace, info: dict, decoder_dir: Path, samples_dir: Path, generation: dict):
    """`--samples-per-prompt` images of every colour-shape prompt at the default guidance, in `clipcond generate`'s
    layout (PNGs, images.jsonl, grid.png, written by its own `write_outputs`): the first images that the evaluation
    drew and judged, not drawn a second time. Each record names the seed that redraws its image:
    `clipcond generate --model DECODER --prompt P --seed SEED --num-images 1` with the recorded sampler, steps and
    guidance gives the same picture."""
    from PIL import Image

    from clipcond.evaluation.generation import image_file, image_seed
    from clipcond.image_files import image_record, write_outputs

    settings, per_prompt = generation["settings"], _samples_per_prompt(args)
    guidance = float(generation["guidance_scale"])
    eval_dir = decoder_dir / "eval_generation"
    if not _samples_complete(info, per_prompt, samples_dir):
        jobs = [(prompt, k) for prompt in _prompts(info) for k in range(per_prompt)]
        images = []
        for prompt, k in jobs:
            with Image.open(image_file(eval_dir, guidance, prompt, k)) as image:
                images.append(image.convert("RGB"))
        records = [
            image_record(
                index,
                prompt,
                image_seed(settings["seed"], prompt, k),
                negative_prompt=None,
                num_inference_steps=settings["num_inference_steps"],
                guidance_scale=guidance,
                scheduler=settings["scheduler"],
                model=decoder_dir,
                dtype=settings.get("dtype", "fp32"),  # evaluations before the option drew in fp32
            )
            for index, (prompt, k) in enumerate(jobs)
        ]
        labels = [record["prompt"] for record in records]
        write_outputs(images, records, samples_dir, grid_rows=len(_prompts(info)), labels=labels)
    return {
        "folder": str(samples_dir),
        "grid": str(samples_dir / "grid.png"),
        "num_images": len(_prompts(info)) * per_prompt,
        "images_per_prompt": per_prompt,
        "num_inference_steps": settings["num_inference_steps"],
        "guidance_scale": guidance,
        "scheduler": settings["scheduler"],
        "dtype": settings.get("dtype", "fp32"),
    }


def _judge(args: argparse.Namespace, info: dict, judge_dir: Path, device):
    """The attribute judge at the data's resolution (cached in ~/.cache); with `--quick` one that trains in a second,
    cached in the demo folder, whose verdicts mean nothing."""
    from clipcond.evaluation.judge import JudgeTrainingConfig, load_or_train_judge

    if args.quick:
        return load_or_train_judge(
            int(info["resolution"]), cache_dir=judge_dir, config=JudgeTrainingConfig(**QUICK_JUDGE)
        )
    return load_or_train_judge(int(info["resolution"]), device=device)


def _stage_generation_eval(
    args: argparse.Namespace, info: dict, data_dir: Path, clip_dir: Path, decoder_dir: Path, judge_dir: Path
) -> dict:
    """`clipcond eval generation` on the decoder: guidance 1 and `--guidance-scale`, judged, CLIP score and FD."""
    out = decoder_dir / "eval_generation"
    if (out / "metrics.json").is_file():  # written last by the evaluation
        return json.loads((out / "metrics.json").read_text())

    from clipcond.data.shapes import class_names
    from clipcond.evaluation.generation import evaluate_generation
    from clipcond.evaluation.judged import load_clip_and_reference
    from clipcond.pipeline_loading import load_pretrained
    from clipcond.pipelines.text_to_image import TextToImagePipeline

    device = resolve_device(None)
    judge = _judge(args, info, judge_dir, device)
    clip_run, reference, unreadable = load_clip_and_reference(clip_dir, data_dir, "test", device)
    pipe = load_pretrained(TextToImagePipeline, decoder_dir, device, args.sample_dtype)
    return evaluate_generation(
        pipe,
        classes=class_names(info),
        held_out=info.get("held_out") or [],
        judge=judge,
        clip_run=clip_run,
        reference_images=reference,
        num_images_per_prompt=args.eval_images_per_prompt,
        guidance_scales=[1.0, args.guidance_scale],
        guidance_scale=args.guidance_scale,
        num_inference_steps=2 if args.quick else args.num_inference_steps,
        scheduler=DEFAULT_SAMPLER,
        seed=args.seed,
        output_dir=out,
        extra_settings={
            "model": str(decoder_dir),
            "data": str(data_dir),
            "reference_split": "test",
            "unreadable_reference_images": len(unreadable),
        },
    )


def _stage_vae(args: argparse.Namespace, data_dir: Path, vae_dir: Path) -> dict:
    """`clipcond train vae` with its recipe's defaults; resumes from the latest checkpoint after a kill."""
    from clipcond.train import vae as train_vae

    argv = ["--data", str(data_dir), "--output-dir", str(vae_dir), "--seed", str(args.seed)]
    record = _train_unless_done(
        args, "vae", train_vae, vae_dir, argv, steps=args.vae_steps, precision=args.mixed_precision
    )
    vae = record.section("vae")
    kept = ("preset", "parameters", "downsampling_factor", "latent_size", "scaling_factor")
    return _run_summary(record, "reconstruction_loss", "kl_weight", **{key: vae[key] for key in kept})


def _stage_vae_eval(args: argparse.Namespace, info: dict, data_dir: Path, vae_dir: Path, judge_dir: Path) -> dict:
    """The VAE's reconstructions of one-object test images: PSNR, and the attribute judge's accuracy on them beside
    its accuracy on the originals (a VAE that loses colour or shape caps every latent decoder); a grid of both."""
    out = vae_dir / "eval"
    if (out / "metrics.json").is_file():  # written last
        return json.loads((out / "metrics.json").read_text())

    import torch

    from clipcond.data.folders import ImageCaptionDataset
    from clipcond.data.shapes import class_names
    from clipcond.evaluation.unclip import variation_sources
    from clipcond.models.vae import load_vae
    from clipcond.train.vae import reconstruct, reconstruction_grid, reconstruction_metrics

    device = resolve_device(None)
    dataset = ImageCaptionDataset(data_dir, split="test", resolution=int(info["resolution"]))
    originals, labels, _ = variation_sources(dataset, class_names(info), 1 if args.quick else 4)
    reconstructions = reconstruct(load_vae(vae_dir).to(device).eval(), originals, batch_size=64)
    judge = _judge(args, info, judge_dir, device)
    colours, shapes = zip(*(label.split() for label in labels), strict=True)
    as_uint8 = (reconstructions * 255).round().to(torch.uint8)
    metrics = {
        **reconstruction_metrics(originals, reconstructions),
        "judged_originals": judge.score(originals, colours, shapes).accuracy(),
        "judged_reconstructions": judge.score(as_uint8, colours, shapes).accuracy(),
    }
    out.mkdir(parents=True, exist_ok=True)
    save_image_atomic(reconstruction_grid(originals[:18], reconstructions[:18]), out / "reconstructions.png")
    write_json_atomic(out / "metrics.json", finite_or_null(metrics))
    return metrics


def _stage_prior(args: argparse.Namespace, data_dir: Path, clip_dir: Path, prior_dir: Path) -> dict:
    """`clipcond train prior` with its recipe's defaults; resumes from the latest checkpoint after a kill."""
    from clipcond.train import prior as train_prior

    argv = ["--clip", str(clip_dir), "--data", str(data_dir), "--output-dir", str(prior_dir)]
    argv += ["--seed", str(args.seed)]
    record = _train_unless_done(
        args, "prior", train_prior, prior_dir, argv, steps=args.prior_steps, precision=args.mixed_precision
    )
    return _run_summary(record, "beta_schedule", "caption_dropout", parameters=record.parameters, ema=record.ema)


def _stage_unclip_decoder(args: argparse.Namespace, data_dir: Path, clip_dir: Path, unclip_dir: Path) -> dict:
    """`clipcond train decoder --conditioning image-embedding` with its recipe's defaults; resumes after a kill."""
    from clipcond.train import decoder as train_decoder

    argv = ["--conditioning", "image-embedding", "--clip", str(clip_dir), "--data", str(data_dir)]
    argv += ["--output-dir", str(unclip_dir), "--seed", str(args.seed)]
    precision = args.mixed_precision or default_train_precision()
    record = _train_unless_done(
        args, "unclip_decoder", train_decoder, unclip_dir, argv, steps=args.unclip_decoder_steps, precision=precision
    )
    return _run_summary(
        record,
        "prediction_type",
        "caption_dropout",
        parameters=record.parameters,
        embedding_tokens=record.embedding_tokens,
        noise_level=record.max_noise_level,
        ema=record.ema,
        space_to_depth=record.args.get("space_to_depth", 1),
    )


def _stage_unclip_eval(
    args: argparse.Namespace, info: dict, data_dir: Path, clip_dir: Path, prior_dir: Path, unclip_dir: Path, out: Path
) -> dict:
    """`clipcond eval unclip` on the prior and the image-embedding decoder: the prior's cosine beside both baselines,
    judged variations, judged text-to-image through the prior (the SD path's prompts, seeds and sampler)."""
    if (out / "metrics.json").is_file():  # written last by the evaluation
        return json.loads((out / "metrics.json").read_text())

    from clipcond.device import dtype_keyword, resolve_dtype
    from clipcond.evaluation.judged import load_clip_and_reference
    from clipcond.evaluation.unclip import evaluate_unclip
    from clipcond.pipelines.unclip import UnCLIPTextToImagePipeline

    device = resolve_device(None)
    judge = _judge(args, info, out.parent / "judge", device)
    clip_run, reference, unreadable = load_clip_and_reference(clip_dir, data_dir, "test", device)
    dtype = {dtype_keyword(): resolve_dtype(args.sample_dtype, device)}
    pipe = UnCLIPTextToImagePipeline.from_runs(prior_dir, unclip_dir, local_files_only=local_files_only(), **dtype).to(
        device
    )
    use_scheduler(pipe, DEFAULT_SAMPLER)  # the decoder's; the prior keeps DDPM
    quick = {"sources_per_class": 1, "variations_per_source": 1, "images_per_prompt": 1, "num_inference_steps": 2}
    budget = {
        "sources_per_class": args.variation_sources,
        "variations_per_source": args.variations_per_source,
        "images_per_prompt": args.eval_images_per_prompt,
        "num_inference_steps": args.num_inference_steps,
    }
    return evaluate_unclip(
        pipe,
        data_dir,
        judge=judge,
        clip_run=clip_run,
        reference_images=reference,
        unreadable_reference_images=len(unreadable),
        guidance_scale=args.unclip_guidance_scale,
        **(quick if args.quick else budget),
        **({"prior_num_inference_steps": 2, "prior_max_captions": 36} if args.quick else {}),
        seed=args.seed,
        output_dir=out,
    )


def main(argv: list[str] | None = None) -> int:
    began, began_cpu = time.perf_counter(), _cpu_seconds()  # "startup": the imports before the first stage
    args = parse_args(argv)
    check_output_dir(args.output_dir)
    with run_folder_lock(args.output_dir):  # one demo per folder (each stage also holds its own run folder)
        return run_demo(args, began, began_cpu)


def run_demo(args: argparse.Namespace, began: float, began_cpu: float) -> int:
    """The demo's stages in order, each skipped when an earlier attempt finished it (`main` holds the folder)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    from clipcond.data.shapes import load_dataset_info

    layout = DemoLayout(out)
    times = _StageTimes(layout.timings)
    data_done = load_dataset_info(layout.data) is not None  # a demo folder that holds its data set continues a run
    times.record("startup", began, began_cpu, complete=data_done)
    load_start = round(os.getloadavg()[0], 2)

    # 1. data
    times.run("data", lambda: _stage_data(args, layout.data), complete=data_done)
    info = load_dataset_info(layout.data)
    # 2.-5. CLIP, the decoder, its judged evaluation and samples; 6. with --dalle2 the DALL-E 2 path
    report = _stable_diffusion_stages(args, info, layout, times)
    if args.dalle2:
        report.update(_dalle2_stages(args, info, layout, times, report["generation"]))
    if args.latent:
        report.update(_latent_stages(args, layout, times))

    # 7. report
    report = _report(args, info, report, times, load_start)
    write_report(out, report)
    print(summary_line(report, out))
    print(f"clipcond demo: report in {layout.report_md} (samples in {layout.samples})")
    return 0


def _stable_diffusion_stages(args: argparse.Namespace, info: dict, out: DemoLayout, times: _StageTimes) -> dict:
    """CLIP pretraining and evaluation, the decoder on the frozen CLIP text encoder, its judged evaluation, and
    samples of every colour-shape prompt as `clipcond generate` writes them (the evaluation's first images)."""
    data_dir, clip_dir, decoder_dir, samples_dir = out.data, out.clip, out.decoder, out.samples
    done = RunRecord.exists(clip_dir)
    clip_summary = times.run("clip", lambda: _stage_clip(args, data_dir, clip_dir), complete=done)
    done = (clip_dir / "eval" / "metrics.json").is_file()
    clip_eval = times.run("clip_eval", lambda: _stage_clip_eval(data_dir, clip_dir), complete=done)
    from clipcond.evaluation.probe_report import current_clip_probes

    current = current_clip_probes(out.probe, clip_dir, _probe_pairs(args), args.seed)
    probe = times.run(
        "probe", lambda: _stage_probe(args, data_dir, clip_dir, out.probe, current), complete=current is not None
    )
    done = RunRecord.exists(decoder_dir)
    decoder = times.run(
        "decoder",
        lambda: _stage_decoder(args, data_dir, clip_dir, decoder_dir, steps=args.decoder_steps),
        complete=done,
    )
    done = (decoder_dir / "eval_generation" / "metrics.json").is_file()
    generation = times.run(
        "generation_eval",
        lambda: _stage_generation_eval(args, info, data_dir, clip_dir, decoder_dir, out.judge),
        complete=done,
    )
    samples = times.run(
        "samples",
        lambda: _stage_samples(args, info, decoder_dir, samples_dir, generation),
        complete=_samples_complete(info, _samples_per_prompt(args), samples_dir),
    )
    return {
        "clip": clip_summary,
        "clip_eval": clip_eval,
        "probe": probe,
        "decoder": decoder,
        "samples": samples,
        "generation": generation,
    }


def _dalle2_stages(
    args: argparse.Namespace, info: dict, out: DemoLayout, times: _StageTimes, generation: dict
) -> dict:
    """The prior, the image-embedding decoder, their judged evaluation, and the table beside the Stable Diffusion
    path's `generation` figures."""
    data_dir, clip_dir = out.data, out.clip
    prior_dir, unclip_dir, unclip_eval_dir = out.prior, out.unclip_decoder, out.unclip_eval
    dalle2 = {}
    done = RunRecord.exists(prior_dir)
    dalle2["prior"] = times.run("prior", lambda: _stage_prior(args, data_dir, clip_dir, prior_dir), complete=done)
    done = RunRecord.exists(unclip_dir)
    dalle2["unclip_decoder"] = times.run(
        "unclip_decoder", lambda: _stage_unclip_decoder(args, data_dir, clip_dir, unclip_dir), complete=done
    )
    done = (unclip_eval_dir / "metrics.json").is_file()
    dalle2["unclip_eval"] = times.run(
        "unclip_eval",
        lambda: _stage_unclip_eval(args, info, data_dir, clip_dir, prior_dir, unclip_dir, unclip_eval_dir),
        complete=done,
    )
    dalle2["dalle2_table"] = dalle2_table(generation, dalle2["unclip_eval"])
    return dalle2


def _latent_stages(args: argparse.Namespace, out: DemoLayout, times: _StageTimes) -> dict:
    """The latent path at `LATENT_RESOLUTION`: the shapes data drawn at that size (same seed), a VAE and its judged
    reconstructions, and a text-to-image decoder on the VAE's latents and the CLIP's text encoder, with Stable
    Diffusion's unmasked text states (so `clipcond export stable-diffusion` takes it), judged as the pixel one is."""
    from clipcond.data.shapes import load_dataset_info

    data_dir, clip_dir = out.latent_data, out.clip
    vae_dir, decoder_dir = out.vae, out.latent_decoder
    done = load_dataset_info(data_dir) is not None
    times.run("latent_data", lambda: _stage_data(args, data_dir, LATENT_RESOLUTION), complete=done)
    info = load_dataset_info(data_dir)
    latent = {}
    latent["vae"] = times.run("vae", lambda: _stage_vae(args, data_dir, vae_dir), complete=RunRecord.exists(vae_dir))
    latent["vae_eval"] = times.run(
        "vae_eval",
        lambda: _stage_vae_eval(args, info, data_dir, vae_dir, out.judge),
        complete=(vae_dir / "eval" / "metrics.json").is_file(),
    )
    extra = ("--vae", str(vae_dir), "--no-mask-text-padding")
    steps = args.latent_decoder_steps
    latent["latent_decoder"] = times.run(
        "latent_decoder",
        lambda: _stage_decoder(
            args, data_dir, clip_dir, decoder_dir, stage="latent_decoder", extra=extra, steps=steps
        ),
        complete=RunRecord.exists(decoder_dir),
    )
    latent["latent_generation"] = times.run(
        "latent_generation_eval",
        lambda: _stage_generation_eval(args, info, data_dir, clip_dir, decoder_dir, out.judge),
        complete=(decoder_dir / "eval_generation" / "metrics.json").is_file(),
    )
    return latent


def _report(args: argparse.Namespace, info: dict, stages: dict, times: _StageTimes, load_start: float) -> dict:
    """The report (`clipcond.demo_report`): the data, the stages' figures, the time of every stage, the machine."""
    import torch

    report = {
        "quick": args.quick,
        "recipe": args.recipe,
        "data": {
            "num_train": info["splits"]["train"]["num_images"],
            "num_test": info["splits"]["test"]["num_images"],
            "held_out": info["held_out"],
        },
        **stages,
        "seconds": {name: t["wall"] for name, t in times.timings.items()},
        "uninterrupted": None,  # filled in below, from the timings and the trainings' summaries
        "timings": times.timings,
        "machine": {
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_start": load_start,
        },
    }
    report["uninterrupted"] = uninterrupted(report)
    return report


if __name__ == "__main__":
    raise SystemExit(main())
