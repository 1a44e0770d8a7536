"""How far the attribute judge can be trusted (a benchmark, not a test).

    python benchmarks/judge_quality.py [--decoder DIR/decoder] [--rejudge DIR/decoder/eval_generation] --save-results

1. The default judge at `--resolution` on the independent renderer's cases (`clipcond.evaluation.judge_check`:
   another renderer, corruptions outside the training ranges), `--images-per-case` each, for every `--seeds`
   seed: the share judged as a person would, mean and 95% interval over seeds.
2. With `--decoder`: samples of that pipeline with its UNet re-initialised at random, judged (the share called one
   object should be near 0, not near chance).
3. With `--rejudge`: the images an earlier `clipcond eval generation` saved, judged again by this judge, beside the
   figures its metrics.json holds (from the judge it ran with): what changed, and why, per outcome.

Prints one JSON object; `--save-results` writes benchmarks/results/judge_quality.json and appends to its history.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from common import add_results_flag, parse_seeds, save_results
from PIL import Image

# What the judge must reach on the independent cases (mean over seeds), and on an untrained UNet.
BAR = {"one object": 0.95, "corrupted one object": 0.8, "blank": 0.95, "several objects": 0.9, "unknown shape": 0.85}
UNTRAINED_OBJECT_SHARE_MAX = 0.05


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python benchmarks/judge_quality.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=32, help="the judge's resolution (default 32)")
    parser.add_argument("--images-per-case", type=int, default=180, help="independent renders per case and seed")
    parser.add_argument("--seeds", default="0,1,2", help="renderer seeds (default 0,1,2)")
    parser.add_argument("--decoder", type=Path, help="a text-to-image run folder: judge its UNet re-initialised")
    parser.add_argument("--untrained-images", type=int, default=144, help="untrained-UNet samples (default 144)")
    parser.add_argument("--rejudge", type=Path, help="an eval_generation folder whose saved images to judge again")
    add_results_flag(parser)
    args = parser.parse_args(argv)
    args.seeds = parse_seeds(args.seeds)
    return args


def independent_cases(judge, n: int, seeds: list[int]) -> dict:
    from clipcond.evaluation.judge_check import check_judge
    from clipcond.evaluation.stats import mean_interval

    runs = [check_judge(judge, n=n, seed=seed) for seed in seeds]
    cases = {}
    for name in runs[0]:
        cases[name] = {
            "expected": runs[0][name]["expected"],
            "right": mean_interval([run[name]["right"] for run in runs]),
            "per_seed": [run[name]["right"] for run in runs],
            "outcomes": {
                o: float(np.mean([run[name]["outcomes"][o] for run in runs])) for o in runs[0][name]["outcomes"]
            },
        }
    return cases


def untrained(judge, decoder: Path, n: int) -> dict:
    from clipcond.evaluation.judge_check import judge_images, untrained_unet_samples
    from clipcond.pipelines.text_to_image import TextToImagePipeline

    pipe = TextToImagePipeline.from_pretrained(decoder, local_files_only=True)
    images = untrained_unet_samples(pipe, n)
    return {"decoder": str(decoder), **judge_images(judge, images, "unrecognisable")}


def rejudge(judge, folder: Path) -> dict:
    """Every guidance scale's saved images judged again, with the figures the folder's metrics.json reports."""
    from clipcond.evaluation.generation import image_file
    from clipcond.evaluation.stats import wilson_interval

    metrics = json.loads((folder / "metrics.json").read_text())
    held = set(metrics["settings"]["held_out"])
    template = metrics["settings"]["prompt_template"]
    out = {}
    for key, figures in metrics["guidance"].items():
        paths, colours, shapes = [], [], []
        for name in metrics["settings"]["classes"]:
            colour, shape = name.split()
            prompt = template.format(colour=colour, shape=shape)
            for k in range(metrics["settings"]["num_images_per_prompt"]):
                paths.append(image_file(folder, float(key), prompt, k))
                colours.append(colour)
                shapes.append(shape)
        images = torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths]))
        scores = judge.score(images.permute(0, 3, 1, 2).contiguous(), colours, shapes)
        out[key] = {}
        for group in ("seen", "heldout"):
            mask = torch.tensor([(f"{c} {s}" in held) == (group == "heldout") for c, s in zip(colours, shapes)])
            n = int(mask.sum())
            if n == 0:  # no class of this group in the evaluation
                continue
            now = {
                what: scores_of.double()[mask].mean().item()
                for what, scores_of in (("colour", scores.colour_correct), ("shape", scores.shape_correct))
            }
            out[key][group] = {
                "num_images": n,
                "before": {what: figures[f"{what}_accuracy_{group}"] for what in ("colour", "shape")},
                "now": now,
                "now_interval": {what: wilson_interval(v * n, n) for what, v in now.items()},
                "outcomes": scores.outcome_shares(mask),
            }
    return {"folder": str(folder), "judge_before": metrics["judge"], "guidance": out}


def verdict(cases: dict, untrained_figures: dict | None) -> dict:
    corrupted = [c["right"]["mean"] for name, c in cases.items() if name.startswith("one object,")]
    checks = {
        "one object": cases["one object"]["right"]["mean"] >= BAR["one object"],
        "corrupted one object": min(corrupted) >= BAR["corrupted one object"],
        "blank": cases["blank"]["right"]["mean"] >= BAR["blank"],
        "several objects": cases["several objects"]["right"]["mean"] >= BAR["several objects"],
        "unknown shape": cases["unknown shape"]["right"]["mean"] >= BAR["unknown shape"],
    }
    if untrained_figures is not None:
        checks["untrained UNet"] = untrained_figures["outcomes"]["object"] <= UNTRAINED_OBJECT_SHARE_MAX
    return checks


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from clipcond.evaluation.judge import load_or_train_judge

    judge = load_or_train_judge(args.resolution)
    report = {
        "command": "python benchmarks/judge_quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "judge": judge.summary(),
        "images_per_case": args.images_per_case,
        "seeds": args.seeds,
        "cases": independent_cases(judge, args.images_per_case, args.seeds),
    }
    report["untrained_unet"] = untrained(judge, args.decoder, args.untrained_images) if args.decoder else None
    if args.rejudge:
        report["rejudged"] = rejudge(judge, args.rejudge)
    report["bar"] = {**BAR, "untrained_object_share_max": UNTRAINED_OBJECT_SHARE_MAX}
    report["checks"] = verdict(report["cases"], report["untrained_unet"])
    report["meets_bar"] = all(report["checks"].values())
    print(json.dumps(report, indent=2))
    if args.save_results:
        print(f"wrote {save_results('judge_quality', report)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
