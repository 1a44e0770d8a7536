"""Does the demo's latent path draw what it is asked? (a benchmark, not a test)

    python benchmarks/latent_quality.py [--demo-dir DIR] [--seeds 0,1,2] [--save-results]

runs `clipcond demo --latent --output-dir DIR/seed-N --seed N` for every seed (every recipe at its defaults; a
finished demo is reused, an interrupted one resumed) and prints one JSON object with, per seed and over the seeds:

- the VAE: PSNR of its reconstructions of one-object test images, and the attribute judge's colour and shape
  accuracy on the reconstructions beside the originals (issue 19's bar: within 2 points);
- the latent text-to-image decoder: judged colour / shape accuracy on seen and held-out compositions at the default
  guidance, against the pixel decoder's bar (colour >= 90% and shape >= 75% on seen prompts, as a mean over seeds:
  `clipcond.evaluation.stats.bar_holds`), beside the same demo's pixel decoder;
- each latent stage's time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from common import add_results_flag, demos_by_seed, machine, parse_seeds, save_results
from decoder_quality import BAR, check_reused_demo

JUDGE_GAP_POINTS = 2.0  # the judge must read reconstructions within this many points of the originals
LATENT_STAGES = ("latent_data", "vae", "vae_eval", "latent_decoder", "latent_generation_eval")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/latent_quality.py",
        description="Run (or reuse) `clipcond demo --latent` and judge its VAE and latent decoder; print one JSON "
        "object.",
    )
    parser.add_argument("--demo-dir", type=Path, help="demo folder, run or resumed there (default: a temp dir)")
    parser.add_argument("--seeds", type=parse_seeds, default=[0], help="comma-separated demo seeds (default 0)")
    parser.add_argument("--quick", action="store_true", help="the demo's --quick: checks the plumbing, no figure")
    add_results_flag(parser)
    return parser.parse_args(argv)


def _at_default_guidance(generation: dict) -> dict:
    default = generation["guidance"][str(float(generation["guidance_scale"]))]
    keys = [f"{m}_{g}" for g in ("seen", "heldout") for m in ("colour_accuracy", "shape_accuracy", "both_accuracy")]
    return {key: default[key] for key in keys}


def run(demo_dir: Path, seed: int, quick: bool = False) -> dict:
    from clipcond.demo import main as demo_main

    with contextlib.redirect_stdout(sys.stderr):  # the demo's own lines; stdout holds only our JSON
        demo_main(["--output-dir", str(demo_dir), "--seed", str(seed), "--latent", *(["--quick"] if quick else [])])
    report = json.loads((demo_dir / "report.json").read_text())
    check_reused_demo(report, demo_dir, seed)
    vae_eval, latent = report["vae_eval"], report["latent_generation"]
    gaps = {
        attribute: round(
            100 * (vae_eval["judged_originals"][attribute] - vae_eval["judged_reconstructions"][attribute]), 2
        )
        for attribute in ("colour_accuracy", "shape_accuracy")
    }
    settings = latent["settings"]
    seen = [name for name in settings["classes"] if name not in settings["held_out"]]
    return {
        "seed": seed,
        "vae": {**report["vae"], "eval": vae_eval, "judge_gap_points": gaps},
        "latent_decoder": report["latent_decoder"],
        "latent": _at_default_guidance(latent),
        "pixel": _at_default_guidance(report["generation"]),
        "guidance_scale": latent["guidance_scale"],
        "num_judged_seen": len(seen) * settings["num_images_per_prompt"],
        "timings": {name: report["timings"][name] for name in LATENT_STAGES},
        "reused_stages": [name for name, t in report["timings"].items() if t.get("reused")],
    }


def over_seeds(per_seed: dict[int, dict]) -> dict:
    from clipcond.evaluation.stats import bar_holds, mean_interval

    summary = {}
    for name in ("colour_accuracy_seen", "shape_accuracy_seen"):
        values = {seed: r["latent"][name] for seed, r in per_seed.items()}
        summary[name] = bar_holds(values, {seed: r["num_judged_seen"] for seed, r in per_seed.items()}, BAR[name])
    for name in ("colour_accuracy_heldout", "shape_accuracy_heldout"):
        summary[name] = mean_interval([r["latent"][name] for r in per_seed.values()], bounds=(0.0, 1.0))
    summary["vae_psnr"] = mean_interval([r["vae"]["eval"]["psnr"] for r in per_seed.values()])
    worst_gap = max(gap for r in per_seed.values() for gap in r["vae"]["judge_gap_points"].values())
    summary["vae_judge_gap_points"] = {
        "worst": worst_gap,
        "bar": JUDGE_GAP_POINTS,
        "holds": worst_gap <= JUDGE_GAP_POINTS,
    }
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    per_seed = demos_by_seed(
        args.demo_dir, args.seeds, lambda folder, seed: run(folder, seed, args.quick), "latent_quality"
    )
    summary = over_seeds(per_seed)
    result = {
        "benchmark": "latent_quality",
        "command": "python benchmarks/latent_quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seeds": args.seeds,
        "quick": args.quick,
        "machine": machine(),
        "over_seeds": summary,
        "meets_quality_bar": all(summary[k]["holds"] for k in ("colour_accuracy_seen", "shape_accuracy_seen")),
        "meets_vae_judge_bar": summary["vae_judge_gap_points"]["holds"],
        "per_seed": {str(seed): r for seed, r in per_seed.items()},
    }
    print(json.dumps(result, indent=2))
    if args.save_results:
        save_results("latent_quality", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
