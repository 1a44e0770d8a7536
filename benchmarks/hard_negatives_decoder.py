"""What hard negatives in CLIP pretraining do to the Stable Diffusion path's two-object prompts (a benchmark, not a
test).

    python benchmarks/hard_negatives_decoder.py --runs-dir RUNS --data-dir DIR [--seeds 0] [--num-prompts 16]
        [--images-per-prompt 4] [--save-results]

RUNS is the `--work-dir` of `benchmarks/hard_negatives.py`, which holds the CLIPs `plain-seedN` and
`hard_negatives-seedN` trained on DIR. For each seed and recipe this trains a text-to-image decoder on that CLIP
with `clipcond train decoder`'s defaults (the demo's: `tiny` UNet, bf16 where the device has fast bf16 and fp32
elsewhere, `clipcond.demo.default_train_precision`; a finished decoder is reused, an interrupted one resumed) and
runs `clipcond probe --model` on it: prompts of each kind (one vs two objects, a relation, a two-object binding)
drawn and read by the probe's scene reader (`clipcond.evaluation.probes`), beside the reader's own accuracy on
renders of the same prompts.

Prints one JSON object: per recipe and seed each field's accuracy with its 95% interval, n and chance; per field the
difference hard negatives - plain (mean over seeds).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from common import add_results_flag, command_line, machine, parse_seeds, save_results, shapes_data_summary

RECIPES = ("plain", "hard_negatives")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/hard_negatives_decoder.py",
        description="Train a decoder on each recipe's CLIP (plain, hard negatives) and probe its two-object prompts.",
    )
    parser.add_argument("--runs-dir", type=Path, required=True, help="benchmarks/hard_negatives.py's --work-dir")
    parser.add_argument("--data-dir", type=Path, required=True, help="the shapes data those CLIPs trained on")
    parser.add_argument("--seeds", type=parse_seeds, default=[0], help="comma-separated seeds (default 0)")
    parser.add_argument("--num-prompts", type=int, default=16, help="prompts per kind and group (default 16)")
    parser.add_argument("--images-per-prompt", type=int, default=4, help="images per prompt (default 4)")
    parser.add_argument(
        "--decoder-args", nargs=argparse.REMAINDER, default=[], help="more `clipcond train decoder` options, last"
    )
    add_results_flag(parser, results_name="hard_negatives_decoder")
    return parser.parse_args(argv)


def train_decoder(clip: Path, data_dir: Path, out: Path, seed: int, extra: list[str]) -> dict:
    """`clipcond train decoder` on `clip` (reused when finished on this very CLIP: the content hash its record
    holds; refused when trained on another): its run record's summary and training precision."""
    from clipcond.demo import default_train_precision
    from clipcond.runs import RunRecord
    from clipcond.train.decoder import main as decoder_main
    from clipcond.train.loop import reset_accelerate_state

    if RunRecord.exists(out):
        trained_on, clip_hash = RunRecord.read(out).clip_hash, RunRecord.read(clip).content_hash
        if trained_on != clip_hash:
            raise ValueError(
                f"{out} holds a decoder trained on a CLIP of content hash {trained_on}, not on {clip} ({clip_hash}); "
                "remove it or pass another --runs-dir"
            )
    else:
        argv = ["--clip", str(clip), "--data", str(data_dir), "--output-dir", str(out), "--seed", str(seed)]
        with contextlib.redirect_stdout(sys.stderr):
            decoder_main([*argv, "--mixed-precision", default_train_precision(), *extra])  # as the demo
        reset_accelerate_state()
    record = RunRecord.read(out)
    return {**record.summary, "mixed_precision": record.args.get("mixed_precision")}


def probe_decoder(clip: Path, decoder: Path, data_dir: Path, args: argparse.Namespace, seed: int) -> dict:
    """`clipcond probe --model`'s Stable Diffusion section and the scene reader's accuracy on renders."""
    from clipcond.probe import main as probe_main

    out = decoder / "probes"
    argv = ["--clip", str(clip), "--model", str(decoder), "--data", str(data_dir), "--output-dir", str(out)]
    argv += ["--num-prompts", str(args.num_prompts), "--images-per-prompt", str(args.images_per_prompt)]
    with contextlib.redirect_stdout(sys.stderr):
        probe_main([*argv, "--seed", str(seed)])
    report = json.loads((out / "probes.json").read_text())
    return {"generator": report["generators"]["stable_diffusion"], "reader": report["reader"]["accuracy"]}


def treated_setting(runs_dir: Path, seeds: list[int], section: str, field: str = "kinds"):
    """One setting of the treated CLIPs, as their run records' `section` ("hard_negatives" or "counterfactual_pairs")
    say it: its `field` ("kinds", or the twins' "weight" or "kind_weights"), the same for every seed; None if
    unrecorded (not used, or from before the field)."""
    from clipcond.runs import RunRecord

    records = [RunRecord.read(runs_dir / f"hard_negatives-seed{s}") for s in seeds]
    values = {json.dumps((getattr(record, section) or {}).get(field)) for record in records}
    if len(values) != 1:
        raise ValueError(
            f"`--runs-dir` {str(runs_dir)!r}: the seeds' treated CLIPs differ in {section} {field} {sorted(values)}"
        )
    return json.loads(values.pop())


def differences(per_seed: dict[str, dict[int, dict]]) -> dict:
    """Per kind and field, hard negatives - plain of the overall accuracy, averaged over the seeds."""
    seeds = sorted(per_seed["plain"])
    out: dict[str, dict[str, float | None]] = {}
    for kind, fields in per_seed["plain"][seeds[0]]["generator"].items():
        for field in fields:
            gaps = []
            for s in seeds:
                plain = per_seed["plain"][s]["generator"][kind][field]["all"]["accuracy"]
                negatives = per_seed["hard_negatives"][s]["generator"][kind][field]["all"]["accuracy"]
                gaps.append(None if plain is None or negatives is None else negatives - plain)
            out.setdefault(kind, {})[field] = None if None in gaps else round(sum(gaps) / len(gaps), 4)
    return out


def main(argv: list[str] | None = None) -> int:
    from clipcond.data.counterfactual import format_kind_weights
    from clipcond.data.shapes import load_dataset_info

    args = parse_args(argv)
    info = load_dataset_info(args.data_dir)
    if info is None:
        raise FileNotFoundError(f"`--data-dir` {str(args.data_dir)!r} holds no shapes data set (no dataset_info.json)")
    per_seed: dict[str, dict[int, dict]] = {recipe: {} for recipe in RECIPES}
    for seed in args.seeds:
        for recipe in RECIPES:
            clip = args.runs_dir / f"{recipe}-seed{seed}"
            if not (clip / "clipcond_run.json").is_file():
                raise FileNotFoundError(
                    f"`--runs-dir`: no finished CLIP run {str(clip)!r}; run hard_negatives.py first"
                )
            decoder = args.runs_dir / f"decoder-{recipe}-seed{seed}"
            summary = train_decoder(clip, args.data_dir, decoder, seed, args.decoder_args)
            per_seed[recipe][seed] = {"decoder": summary, **probe_decoder(clip, decoder, args.data_dir, args, seed)}
            print(json.dumps({"seed": seed, "recipe": recipe, **per_seed[recipe][seed]}), file=sys.stderr, flush=True)
    report = {
        "benchmark": "hard_negatives_decoder",
        "command": command_line("hard_negatives_decoder", argv),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "save_results"},
        "data": shapes_data_summary(info),
        "kinds": treated_setting(args.runs_dir, args.seeds, "hard_negatives") or None,
        "counterfactual_pairs": treated_setting(args.runs_dir, args.seeds, "counterfactual_pairs") or None,
        "counterfactual_weight": treated_setting(args.runs_dir, args.seeds, "counterfactual_pairs", "weight"),
        "counterfactual_kind_weights": format_kind_weights(
            treated_setting(args.runs_dir, args.seeds, "counterfactual_pairs", "kind_weights")
        ),
        "machine": machine(),
        "per_seed": per_seed,
        "difference": differences(per_seed),
    }
    print(json.dumps(report, indent=2))
    if args.save_results:
        save_results(args.results_name, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
