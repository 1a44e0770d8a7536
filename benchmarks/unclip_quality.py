"""Does the DALL-E 2 path draw what it is asked? (a benchmark, not a test)

    python benchmarks/unclip_quality.py [--demo-dir DIR] [--seeds 0,1,2] [--sources-per-class N] [--write-results]
        [--quick]

runs `clipcond demo --dalle2 --seed N --output-dir DIR/seed-N` for each seed (every recipe at its defaults; a
finished demo there is reused, an interrupted one resumed, a finished default demo extended by the DALL-E 2 stages)
and prints one JSON object with, per seed and over the seeds (`clipcond.evaluation.stats.bar_holds`): the
prior's cosine to the true CLIP image embeddings beside the text-embedding and random-image baselines, the judged
colour / shape / both-correct accuracy of variations of one-object test images (against the source) and of
text-to-image through the prior (against the prompt), beside the Stable Diffusion path's on the same prompts, for
the seen and the held-out compositions; the demo's time by stage (wall and CPU seconds); and `meets_bar` against
the bar (seen compositions; a bar holds when its mean over the seeds meets it and no seed's own 95% interval lies
below it):

- variations keep the source's colour in >= 90% and its shape in >= 80% of the images;
- text-to-image through the prior reaches the prompted colour in >= 85% and shape in >= 70%;
- the prior's cosine beats both baselines, on every seed.

`--sources-per-class N` evaluates the demo's DALL-E 2 runs again, all three parts (the prior's cosine, text-to-image
through the prior and variations), with N sources per class (the demo's 4 judge 224 seen variations, about +-4
points): `clipcond eval unclip` on the demo's prior and image-embedding decoder, into
DIR/seed-N/unclip_decoder/eval_benchmark, at the demo's precision, noise seed and budgets (steps of the decoder and
the prior, images per prompt, captions of the cosine) and with the command's default sampling (the decoder's guidance,
its interval, the sampler), which is what a demo at this commit draws with: a demo made before a change of those
defaults is evaluated as a fresh one would be, and the result records the demo's own settings beside the new ones.
(`decoder_quality.py --images-per-prompt` differs: it repeats the demo's own sampling.) Not with `--quick`, whose
demo judges with a judge that means nothing.

`--write-results` also writes the object to benchmarks/results/unclip_quality.json. `--quick` runs the demo's
`--quick` budgets (the plumbing only; the figures mean nothing). Progress and logs go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from common import add_results_flag, demo_times, demos_by_seed, emptied, parse_seeds, save_results
from decoder_quality import check_reused_demo

BAR = {
    "variations_colour_accuracy_seen": 0.90,
    "variations_shape_accuracy_seen": 0.80,
    "prior_text_to_image_colour_accuracy_seen": 0.85,
    "prior_text_to_image_shape_accuracy_seen": 0.70,
}
ACCURACIES = tuple(
    f"{m}_{g}" for g in ("seen", "heldout") for m in ("colour_accuracy", "shape_accuracy", "both_accuracy")
)
COSINES = (
    "cosine_predicted",
    "cosine_text_baseline",
    "cosine_random_baseline",
    "cosine_predicted_seen",
    "cosine_predicted_heldout",
    "zero_shot_top1_predicted_seen",
    "zero_shot_top1_predicted_heldout",
    "zero_shot_top1_true_image_seen",
    "zero_shot_top1_true_image_heldout",
    "num_captions",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/unclip_quality.py",
        description="Run (or reuse) `clipcond demo --dalle2` and judge its DALL-E 2 path against the bar; print one "
        "JSON object.",
    )
    parser.add_argument("--demo-dir", type=Path, help="demo folder, run or resumed there (default: a temp dir)")
    parser.add_argument("--seeds", type=parse_seeds, default=[0], help="comma-separated demo seeds (default 0)")
    parser.add_argument(
        "--sources-per-class",
        type=int,
        default=None,
        help="evaluate the demo's DALL-E 2 runs again, with N sources per class and today's default sampling "
        "(default: read the demo's own evaluation)",
    )
    parser.add_argument("--quick", action="store_true", help="the demo's tiny budgets: checks the plumbing only")
    add_results_flag(parser)
    args = parser.parse_args(argv)
    if args.sources_per_class is not None and args.sources_per_class < 1:
        raise ValueError(f"`--sources-per-class` must be >= 1, got {args.sources_per_class}")
    if args.sources_per_class is not None and args.quick:
        raise ValueError(
            "`--sources-per-class` evaluates with the full judge; a `--quick` demo's figures mean nothing"
        )
    return args


def _pick(figures: dict, keys) -> dict:
    return {key: figures.get(key) for key in keys}


def meets_bar(variations: dict, text_to_image: dict, prior: dict) -> dict:
    """Each criterion of the bar, and all of them (`all`); a missing figure fails its criterion."""

    def at_least(value, bound) -> bool:
        return value is not None and value >= bound

    checks = {
        "variations_colour": at_least(variations["colour_accuracy_seen"], BAR["variations_colour_accuracy_seen"]),
        "variations_shape": at_least(variations["shape_accuracy_seen"], BAR["variations_shape_accuracy_seen"]),
        "prior_text_to_image_colour": at_least(
            text_to_image["colour_accuracy_seen"], BAR["prior_text_to_image_colour_accuracy_seen"]
        ),
        "prior_text_to_image_shape": at_least(
            text_to_image["shape_accuracy_seen"], BAR["prior_text_to_image_shape_accuracy_seen"]
        ),
        "prior_cosine_beats_baselines": bool(
            prior["cosine_predicted"] > prior["cosine_text_baseline"]
            and prior["cosine_predicted"] > prior["cosine_random_baseline"]
        ),
    }
    return {**checks, "all": all(checks.values())}


def rejudge_argv(demo_dir: Path, evaluation: dict, sources_per_class: int, out: Path) -> list[str]:
    """`clipcond eval unclip` on the demo's runs with `sources_per_class` sources per class, at the precision, noise
    seed and budgets of the demo's `unclip_eval` and the command's default sampling (see the module's docstring)."""
    settings = evaluation["settings"]
    argv = ["--decoder", str(demo_dir / "unclip_decoder"), "--prior", str(demo_dir / "prior")]
    argv += ["--data", str(demo_dir / "data"), "--output-dir", str(out), "--no-progress"]
    argv += ["--sources-per-class", str(sources_per_class)]
    budgets = (
        "variations_per_source",
        "images_per_prompt",
        "num_inference_steps",
        "prior_num_inference_steps",
        "seed",
    )
    for key in budgets:
        argv += ["--" + key.replace("_", "-"), str(settings[key])]
    argv += ["--prior-max-captions", str(settings["prior_max_captions"] or 0)]  # None: all, the command's 0
    return argv + ["--dtype", settings["dtype"]]


def run(demo_dir: Path, seed: int = 0, *, quick: bool = False, sources_per_class: int | None = None) -> dict:

    from clipcond.demo import main as demo_main

    with contextlib.redirect_stdout(sys.stderr):  # the demo's own lines; stdout holds only our JSON
        demo_main(["--output-dir", str(demo_dir), "--seed", str(seed), "--dalle2", *(["--quick"] if quick else [])])
    report = json.loads((demo_dir / "report.json").read_text())
    check_reused_demo(report, demo_dir, seed)
    evaluation = report["unclip_eval"]
    if sources_per_class is not None:
        from clipcond.evaluation.unclip import main as eval_main

        out = emptied(demo_dir / "unclip_decoder" / "eval_benchmark")
        with contextlib.redirect_stdout(sys.stderr):
            eval_main(rejudge_argv(demo_dir, evaluation, sources_per_class, out))
        evaluation = json.loads((out / "metrics.json").read_text())
    variations, text_to_image, prior = evaluation["variations"], evaluation["text_to_image"], evaluation["prior"]
    generation = report["generation"]
    result = {
        "seed": seed,
        "quick": quick,
        "num_judged_seen": _num_judged_seen(report["generation"]["settings"], evaluation["settings"]),
        "prior": _pick(prior, COSINES),
        "variations": {
            **_pick(variations, ACCURACIES),
            # the judge on the sources themselves: what an exact copy scores
            **_pick(variations, [f"source_{key}" for key in ACCURACIES]),
            "num_images": variations["num_images"],
            "generation_seconds": variations["generation_seconds"],
            # what the judge saw instead of one object, and how far the variations are from their sources
            "outcomes": variations.get("outcomes"),
            "distance": variations.get("distance"),
        },
        "prior_text_to_image": {
            **_pick(text_to_image, ACCURACIES),
            **_pick(text_to_image, ("clip_score", "clip_top1", "fd_clip", "fd_clip_floor")),
            "outcomes": text_to_image["guidance"][str(float(text_to_image["guidance_scale"]))].get("outcomes"),
        },
        "stable_diffusion_text_to_image": {
            **_pick(generation, ACCURACIES),
            **_pick(generation, ("clip_score", "clip_top1", "fd_clip", "fd_clip_floor")),
        },
        "settings": evaluation["settings"],
        # judged again: the demo's table and settings are those of its own evaluation
        **(
            {"table": report["dalle2_table"]}
            if sources_per_class is None
            else {"demo_settings": report["unclip_eval"]["settings"]}
        ),
        "judge": {k: v for k, v in text_to_image["judge"].items() if k != "path"},
        "prior_training": report["prior"],
        "unclip_decoder_training": report["unclip_decoder"],
        **demo_times(report),
        "bar": BAR,
    }
    result["meets_bar_by_criterion"] = meets_bar(variations, text_to_image, prior)
    result["meets_bar"] = result["meets_bar_by_criterion"]["all"]
    return result


def _num_judged_seen(classes: dict, settings: dict) -> dict:
    """Images judged per seen figure: variations (sources x variations per seen class) and text-to-image; `classes`
    the SD path's generation settings (its classes and held-out ones), `settings` the DALL-E 2 evaluation's."""
    seen = len([name for name in classes["classes"] if name not in classes["held_out"]])
    if (
        "source_items" in settings
        and len(settings["source_items"]) != len(classes["classes"]) * settings["sources_per_class"]
    ):
        # a class with fewer one-object images than asked for: the counts below would overstate what was judged
        raise ValueError(
            f"{len(settings['source_items'])} sources were varied, not {settings['sources_per_class']} for each of "
            f"{len(classes['classes'])} classes; ask for fewer sources per class"
        )
    return {
        "variations": seen * settings["sources_per_class"] * settings["variations_per_source"],
        "prior_text_to_image": seen * settings["images_per_prompt"],
    }


def over_seeds(per_seed: dict[int, dict]) -> dict:
    """Every bar's figure over the seeds (`clipcond.evaluation.stats.bar_holds`); the prior's cosines as mean and
    interval, and whether it beat both baselines on every seed."""
    from clipcond.evaluation.stats import bar_holds, mean_interval

    summary = {}
    for part in ("variations", "prior_text_to_image"):
        counts = {seed: r["num_judged_seen"][part] for seed, r in per_seed.items()}
        for attribute in ("colour", "shape"):
            name = f"{attribute}_accuracy_seen"
            values = {seed: r[part][name] for seed, r in per_seed.items()}
            summary[f"{part}_{name}"] = bar_holds(values, counts, BAR[f"{part}_{name}"])
            summary[f"{part}_{attribute}_accuracy_heldout"] = mean_interval(
                [r[part][f"{attribute}_accuracy_heldout"] for r in per_seed.values()], bounds=(0.0, 1.0)
            )
    for name in ("cosine_predicted", "cosine_text_baseline", "cosine_random_baseline"):
        summary[f"prior_{name}"] = mean_interval([r["prior"][name] for r in per_seed.values()])
    beats = [r["meets_bar_by_criterion"]["prior_cosine_beats_baselines"] for r in per_seed.values()]
    summary["prior_cosine_beats_baselines"] = {"holds": all(beats), "per_seed": beats}
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    per_seed = demos_by_seed(
        args.demo_dir,
        args.seeds,
        lambda folder, seed: run(folder, seed, quick=args.quick, sources_per_class=args.sources_per_class),
        "unclip_quality",
    )
    summary = over_seeds(per_seed)
    result = {
        "benchmark": "unclip_quality",
        "command": "python benchmarks/unclip_quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seeds": args.seeds,
        "quick": args.quick,
        "over_seeds": summary,
        "meets_bar": all(entry["holds"] for name, entry in summary.items() if "holds" in entry),
        "per_seed": {str(seed): r for seed, r in per_seed.items()},
    }
    text = json.dumps(result, indent=2)
    if args.save_results:
        save_results("unclip_quality", result)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
