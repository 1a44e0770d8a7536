"""Hard negatives in CLIP pretraining (NegCLIP) or counterfactual pairs (TripletCLIP) beside the plain recipe, at
equal steps, over seeds (a benchmark, not a test).

    python benchmarks/hard_negatives.py --data-dir DIR [--seeds 0,1,2] [--kinds swap-attributes,swap-relations]
        [--counterfactual-pairs swap-colours] [--counterfactual-weight W] [--counterfactual-kind-weights KIND=W]
        [--max-train-steps N] [--work-dir RUNS]
        [--seeds-from RESULT.json] [--save-results] [--clip-args ARGS...]
    python benchmarks/hard_negatives.py --smoke          # the `test` preset, a few steps: checks the wiring only

1. The shapes data set of seed 0 in DIR (`clipcond data shapes`, 20,000 images; reused when DIR holds it, an error
   when DIR holds another seed's).
2. Per seed, two runs of `clipcond train clip` with every other option at its default (or the `--smoke` sizes):
   the plain recipe, and the same with `--hard-negatives KINDS` and `--counterfactual-pairs KINDS` (and
   `--counterfactual-weight W` and `--counterfactual-kind-weights` when given; the recipe keyed "hard_negatives" in
   the output; `--kinds none` for twins alone). Both take the same steps, batch and data order.
3. Each run is evaluated by `clipcond eval clip` (zero-shot top-1 on seen and held-out compositions, retrieval)
   and by `clipcond probe`'s CLIP minimal-pair probes (count, relation, binding, position, size: the share of
   pairs where the image is closer to the right caption).

Prints one JSON object: per recipe and seed the figures, the training seconds and the run record's hard-negative
and twin shares; per recipe their mean with a 95% interval over the seeds; per figure the difference of the treated
recipe ("hard_negatives") and the plain one (mean and interval over the seeds, paired by seed); and `target`:
whether the binding and relation probes gain at least 20 points and seen zero-shot top-1 loses at most 1 point. The
generators conditioned on each CLIP are not trained here (a decoder per run and seed is the demo's ten minutes of
CPU); `clipcond probe --model ...` measures them on runs made apart.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

from common import (
    add_results_flag,
    command_line,
    ensure_shapes,
    machine,
    parse_seeds,
    save_results,
    shapes_data_summary,
)

from clipcond.data.counterfactual import format_kind_weights, parse_kind_weights, parse_pair_kinds
from clipcond.evaluation.stats import mean_interval
from clipcond.finite import finite_float

RECIPES = ("plain", "hard_negatives")
# what must agree for an earlier result's seeds to join a new one (`--seeds-from`)
SAME_SETTINGS = (
    "kinds",
    "counterfactual_pairs",
    "counterfactual_weight",
    "counterfactual_kind_weights",
    "model",
    "max_train_steps",
    "train_batch_size",
    "num_pairs",
    "mixed_precision",
    "smoke",
)
TARGET = {"probe_gain": 0.20, "probes": ("binding", "relation"), "zero_shot_loss": 0.01}
SMOKE = {"model": "test", "max_train_steps": 4, "train_batch_size": 16, "num_images": 276, "num_pairs": 8}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/hard_negatives.py",
        description="Train CLIP with and without hard negatives on the shapes data, per seed; evaluate and probe.",
    )
    parser.add_argument("--data-dir", type=Path, help="shapes data set folder, made if absent (default: a temp dir)")
    parser.add_argument("--work-dir", type=Path, help="where the runs go (default: a temp dir, removed)")
    parser.add_argument("--seeds", type=parse_seeds, default=[0, 1, 2], help="training seeds (default 0,1,2)")
    parser.add_argument(
        "--kinds",
        default="swap-attributes,swap-relations",
        help="the hard-negative run's --hard-negatives (default swap-attributes,swap-relations; none for none)",
    )
    parser.add_argument(
        "--counterfactual-pairs",
        default="none",
        help="the hard-negative run's --counterfactual-pairs (default none; swap-colours for twins)",
    )
    parser.add_argument(
        "--counterfactual-weight",
        type=float,
        default=0.0,
        help="the hard-negative run's --counterfactual-weight (default 0: none)",
    )
    parser.add_argument(
        "--counterfactual-kind-weights",
        default="none",
        metavar="KIND=W,...",
        help="the hard-negative run's --counterfactual-kind-weights (default none: every twin at "
        "--counterfactual-weight)",
    )
    parser.add_argument(
        "--unplaced-share",
        type=finite_float,
        default=0.0,
        help="writing --data-dir: the share of relation scenes captioned without their places, 'a red circle and a "
        "blue square' (`clipcond data shapes --unplaced-share`; default 0); reusing it: the share it must hold",
    )
    parser.add_argument("--model", default=None, help="CLIP preset (default: the recipe's; `test` with --smoke)")
    parser.add_argument("--max-train-steps", type=int, default=None, help="steps of every run (default: the recipe's)")
    parser.add_argument("--train-batch-size", type=int, default=None, help="batch (default: the recipe's)")
    parser.add_argument("--num-pairs", type=int, default=200, help="probe pairs per probe and group (default 200)")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16"], help="training precision")
    parser.add_argument(
        "--smoke", action="store_true", help="the `test` preset, 4 steps, 276 images: checks the wiring, no figure"
    )
    parser.add_argument(
        "--clip-args",
        nargs=argparse.REMAINDER,
        default=[],
        help="more `clipcond train clip` options for both recipes, last (e.g. --checkpointing-steps 520 "
        "--checkpoints-total-limit 3, to compare the recipes at earlier steps of one schedule)",
    )
    parser.add_argument(
        "--seeds-from",
        type=Path,
        help="an earlier result of this benchmark (a JSON file) with the same settings: its seeds that --seeds does "
        "not run join this result's summary, their provenance recorded (e.g. two new seeds beside a committed one)",
    )
    add_results_flag(parser, results_name="hard_negatives")
    args = parser.parse_args(argv)
    if not 0 <= args.unplaced_share <= 1:
        parser.error(f"--unplaced-share must lie in [0, 1], got {args.unplaced_share:g}")
    if args.counterfactual_weight < 0:
        parser.error(f"--counterfactual-weight must be >= 0, got {args.counterfactual_weight:g}")
    if args.counterfactual_weight and args.counterfactual_pairs == "none":
        parser.error(
            f"--counterfactual-weight {args.counterfactual_weight:g} weighs twins: pass --counterfactual-pairs"
        )
    try:  # written back as `clipcond train clip` reads it: results compare it as text
        weights = parse_kind_weights(args.counterfactual_kind_weights, parse_pair_kinds(args.counterfactual_pairs))
    except ValueError as err:
        parser.error(str(err))
    args.counterfactual_kind_weights = format_kind_weights(weights)
    if args.smoke:
        args.model = args.model or SMOKE["model"]
        args.max_train_steps = args.max_train_steps or SMOKE["max_train_steps"]
        args.train_batch_size = args.train_batch_size or SMOKE["train_batch_size"]
        args.num_pairs = min(args.num_pairs, SMOKE["num_pairs"])
    return args


def train_argv(args: argparse.Namespace, data_dir: Path, run: Path, seed: int, recipe: str) -> list[str]:
    argv = ["--data", str(data_dir), "--output-dir", str(run), "--seed", str(seed)]
    argv += ["--mixed-precision", args.mixed_precision]
    for flag, value in (
        ("--model", args.model),
        ("--max-train-steps", args.max_train_steps),
        ("--train-batch-size", args.train_batch_size),
    ):
        if value is not None:
            argv += [flag, str(value)]
    if args.smoke:
        argv += ["--lr-warmup-steps", "1", "--validation-steps", "0", "--checkpointing-steps", "0"]
    if recipe == "hard_negatives":
        argv += ["--hard-negatives", args.kinds, "--counterfactual-pairs", args.counterfactual_pairs]
        if args.counterfactual_weight:  # only when given: the runs of earlier results keep their command lines
            argv += ["--counterfactual-weight", str(args.counterfactual_weight)]
        if args.counterfactual_kind_weights != "none":  # as the weight: earlier runs keep their command lines
            argv += ["--counterfactual-kind-weights", args.counterfactual_kind_weights]
    return [*argv, *args.clip_args]


def probe_figures(run: Path, data_dir: Path, num_pairs: int, seed: int) -> tuple[dict[str, float], dict[str, int]]:
    """`clipcond probe`'s CLIP figures of a run: {"probe_<probe>_<group>": accuracy} (groups all, seen, heldout),
    and the number of pairs behind each."""
    from clipcond.probe import main as probe_main

    out = run / "probes"
    argv = ["--clip", str(run), "--data", str(data_dir), "--output-dir", str(out), "--num-pairs", str(num_pairs)]
    with contextlib.redirect_stdout(sys.stderr):
        probe_main([*argv, "--seed", str(seed)])
    clip = json.loads((out / "probes.json").read_text())["clip"]
    stats = {
        f"probe_{probe}_{group}": stat
        for probe, groups in clip.items()
        for group, stat in groups.items()
        if isinstance(stat, dict) and stat.get("accuracy") is not None
    }
    return {key: stat["accuracy"] for key, stat in stats.items()}, {key: stat["n"] for key, stat in stats.items()}


def run_one(args: argparse.Namespace, data_dir: Path, run: Path, seed: int, recipe: str) -> dict:
    """Train (unless `run` holds it finished: `finished_run_of`), evaluate and probe one run: its figures
    (proportions: `clipcond eval clip`'s zero-shot and recall, the probes' accuracies), training seconds and
    hard-negative and twin shares."""
    from clipcond.evaluation.clip import METRIC_KEYS
    from clipcond.evaluation.clip import main as eval_main
    from clipcond.runs import RunRecord
    from clipcond.train.clip import main as train_main
    from clipcond.train.loop import reset_accelerate_state

    start = time.perf_counter()
    argv = train_argv(args, data_dir, run, seed, recipe)
    with contextlib.redirect_stdout(sys.stderr):  # the entry points' own JSON: stdout holds only ours
        reused = finished_run_of(run, argv)  # a finished run of the same options (an interrupted benchmark's)
        if not reused:
            train_main(argv)
            reset_accelerate_state()
        eval_main(["--model", str(run), "--data", str(data_dir), "--no-progress"])
    wall = time.perf_counter() - start
    record = RunRecord.read(run)
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    figures = {key: metrics[key] for key in METRIC_KEYS if not key.startswith("num_")}
    probes, pairs = probe_figures(run, data_dir, args.num_pairs, seed)
    figures.update(probes)
    negatives = record.hard_negatives or {}
    twins = record.counterfactual_pairs or {}
    return {
        "figures": {key: None if value is None else round(value, 4) for key, value in figures.items()},
        "pairs": pairs,
        "train_seconds": record.summary["seconds"],
        "wall_seconds": round(wall, 1),
        "steps": record.summary["steps"],
        "hard_negative_share": negatives.get("share"),
        "twin_share": twins.get("share"),
        "reused": reused,  # trained before this benchmark: its record says when (`date` of clipcond_run.json)
    }


def finished_run_of(run: Path, argv: list[str]) -> bool:
    """Whether `run` holds a finished `clipcond train clip` run of `argv`'s options (to be reused, wherever it was
    trained: a copy of another work folder's run counts; an option newer than the run counts as its default); an
    error when it holds one trained with other options, naming the first that differs."""
    from clipcond.runs import RunRecord
    from clipcond.train.clip import parse_args as train_parse_args

    if not RunRecord.exists(run):
        return False

    def options(argv: list[str]) -> dict:
        return json.loads(json.dumps(vars(train_parse_args(argv)), default=str))

    expected, defaults = options(argv), options(argv[:4])  # argv[:4]: --data, --output-dir
    trained = RunRecord.read(run).args
    for key, value in expected.items():
        had = trained.get(key, defaults[key])
        # None: an option left to a per-device default, which the record holds resolved
        if key != "output_dir" and value is not None and had != value:
            raise ValueError(
                f"{run} holds a finished run trained with {key}={had!r}, not {value!r}; remove it or pass another "
                "--work-dir"
            )
    return True


def earlier_seeds(path: Path, args: argparse.Namespace) -> tuple[dict[str, dict[int, dict]], dict]:
    """The runs of `--seeds-from`'s result for the seeds that `--seeds` does not run, per recipe, and where they come
    from (file, seeds, command, commit, date, machine). Refused, naming the setting, when the earlier result ran with
    other settings (its options that predate a setting count as that setting's default)."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"`--seeds-from` {str(path)!r} cannot be read as a result: {err}") from None
    if report.get("benchmark") != "hard_negatives":
        raise ValueError(
            f"`--seeds-from` {str(path)!r} is not a result of this benchmark: {report.get('benchmark')!r}"
        )
    defaults = vars(parse_args([]))
    for key in (*SAME_SETTINGS, "clip_args"):  # and the data, checked by `check_same_data` once it is made
        theirs, ours = report["settings"].get(key, defaults[key]), getattr(args, key)
        if theirs != ours:
            raise ValueError(f"`--seeds-from` {str(path)!r} ran with {key}={theirs!r}, this run with {ours!r}")
    if report.get("seeds_from"):  # its own seeds would be credited to its commit: join the file they came from
        raise ValueError(
            f"`--seeds-from` {str(path)!r} joined seeds from {report['seeds_from']['file']!r} itself; pass a result "
            "that ran all its seeds"
        )
    seeds = sorted(int(seed) for seed in report["per_seed"]["plain"] if int(seed) not in args.seeds)
    if not seeds:
        raise ValueError(f"`--seeds-from` {str(path)!r} holds no seed besides `--seeds` {args.seeds}")
    runs = {recipe: {seed: report["per_seed"][recipe][str(seed)] for seed in seeds} for recipe in RECIPES}
    provenance = ("command", "commit", "dirty", "date", "machine", "data")
    return runs, {"file": path.name, "seeds": seeds, **{key: report.get(key) for key in provenance}}


def check_same_data(seeds_from: dict | None, data: dict) -> None:
    """Refuse to join seeds trained on other data (size, resolution, unplaced share) than this run's."""
    if seeds_from is not None and seeds_from["data"] != data:
        raise ValueError(f"`--seeds-from` {seeds_from['file']!r} trained on {seeds_from['data']}, this run on {data}")


def pairs_of(run: dict, key: str, num_pairs: int) -> int:
    """The pairs behind a run's probe figure (runs saved before they were recorded: both groups of `--num-pairs`)."""
    return run.get("pairs", {}).get(key, 2 * num_pairs)


def probe_gains(per_seed: dict[str, dict[int, dict]], num_pairs: int) -> dict[str, dict]:
    """Per target probe, whether its gain bar holds over the seeds (`gain_holds`: the mean gain meets it and no seed
    misses it beyond the interval of its two runs' pairs)."""
    from clipcond.evaluation.stats import gain_holds

    verdicts = {}
    for probe in TARGET["probes"]:
        key = f"probe_{probe}_all"
        negatives, plain = per_seed["hard_negatives"], per_seed["plain"]
        if any(run["figures"].get(key) is None for runs in (negatives, plain) for run in runs.values()):
            continue
        ours = {seed: run["figures"][key] for seed, run in negatives.items()}
        theirs = {seed: plain[seed]["figures"][key] for seed in ours}
        n = {seed: (pairs_of(negatives[seed], key, num_pairs), pairs_of(plain[seed], key, num_pairs)) for seed in ours}
        verdicts[probe] = gain_holds(ours, theirs, n, TARGET["probe_gain"])
    return verdicts


def summarise(per_seed: dict[str, dict[int, dict]], num_pairs: int) -> dict:
    """Per recipe the mean and interval of each figure; per figure the paired difference; the target's verdict."""
    seeds = sorted(per_seed["plain"])
    figures = {recipe: [per_seed[recipe][s]["figures"] for s in seeds] for recipe in RECIPES}
    keys = [  # the figures every run has (a data set without held-out pairs has no held-out zero-shot)
        key
        for key in figures["plain"][0]
        if all(run.get(key) is not None for recipe in RECIPES for run in figures[recipe])
    ]
    summary = {
        recipe: {key: mean_interval([run[key] for run in figures[recipe]], (0, 1)) for key in keys}
        for recipe in RECIPES
    }
    summary["difference"] = {
        key: mean_interval(
            [neg[key] - plain[key] for neg, plain in zip(figures["hard_negatives"], figures["plain"], strict=True)]
        )
        for key in keys
    }
    gains = {p: summary["difference"].get(f"probe_{p}_all", {}).get("mean") for p in TARGET["probes"]}
    zero_shot = summary["difference"].get("zero_shot_top1_seen", {}).get("mean")
    per_probe = probe_gains(per_seed, num_pairs)
    summary["target"] = {
        **TARGET,
        "probe_gains": gains,
        "per_probe": per_probe,
        "zero_shot_seen_change": zero_shot,
        "holds": None
        if len(per_probe) < len(TARGET["probes"]) or zero_shot is None
        else all(v["holds"] for v in per_probe.values()) and zero_shot >= -TARGET["zero_shot_loss"],
    }
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    per_seed: dict[str, dict[int, dict]] = {recipe: {} for recipe in RECIPES}
    seeds_from = None
    if args.seeds_from is not None:  # read first: refused before any work, and before its file may be overwritten
        per_seed, seeds_from = earlier_seeds(args.seeds_from, args)
    with tempfile.TemporaryDirectory(prefix="hard_negatives_") as tmp:
        data_dir = args.data_dir or Path(tmp, "shapes")
        sizes = {"num_images": SMOKE["num_images"], "num_test_images": 36} if args.smoke else {}
        info = ensure_shapes(data_dir, seed=0, flag="--data-dir", unplaced_share=args.unplaced_share, **sizes)
        data = shapes_data_summary(info)
        check_same_data(seeds_from, data)
        work = args.work_dir or Path(tmp, "runs")
        for seed in args.seeds:
            for recipe in RECIPES:
                per_seed[recipe][seed] = run_one(args, data_dir, work / f"{recipe}-seed{seed}", seed, recipe)
            print(json.dumps({"seed": seed, **{r: per_seed[r][seed] for r in RECIPES}}), file=sys.stderr, flush=True)
    report = {
        "benchmark": "hard_negatives",
        "command": command_line("hard_negatives", argv),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "save_results"},
        "data": data,
        "machine": machine(),
        "per_seed": {recipe: dict(sorted(runs.items())) for recipe, runs in per_seed.items()},
        "summary": summarise(per_seed, args.num_pairs),
    }
    if seeds_from is not None:
        report["seeds_from"] = seeds_from
    print(json.dumps(report, indent=2))
    if args.save_results:
        save_results("hard_negatives_smoke" if args.smoke else args.results_name, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
