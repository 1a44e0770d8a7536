"""What the speed benchmarks share: the machine's description, alternating timing of competing training steps, and
writing `benchmarks/results/<name>.json`.

Alternating (A B, then B A, ...) inside one process exposes both contenders to the same load on a shared machine;
each round gives one ratio, and the median of the ratios is robust to a round that a neighbour's job slowed down.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).parent / "results"


def machine() -> dict:
    """The hardware and software a figure was measured on, for the README's table."""
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = _cpu_model() or platform.processor() or "cpu"
    return {
        "device": device,
        "cuda": torch.cuda.is_available(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
    }


def provenance(root: Path = REPO_ROOT) -> dict:
    """The commit a figure was measured at (and whether the tree at `root` had changes beside it), and when."""

    def git(*argv: str) -> str | None:
        try:
            done = subprocess.run(["git", *argv], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    # the result files that earlier benchmarks of the same session wrote are not a change to what is measured
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results")
    return {
        "commit": git("rev-parse", "HEAD") or os.environ.get("CLIPCOND_COMMIT"),  # a copy without .git: given
        "dirty": None if status is None else bool(status),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def alternate(steps: dict[str, Callable[[], None]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time one call of each step per round, in an order that alternates between rounds; seconds per call.

    `warmup` untimed rounds come first (allocation, autotuning, lazy initialisation). On CUDA the device is
    synchronised around each call, so a time is that of the work, not of its launch.
    """
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    sync()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            steps[name]()
            sync()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def ratio_summary(seconds: dict[str, list[float]], samples_per_step: int, ours: str, theirs: str) -> dict:
    """Median samples/s of each contender and the median over rounds of ours/theirs (> 1: ours is faster)."""
    summary = {
        f"{name}_samples_per_s": round(samples_per_step / statistics.median(times), 2)
        for name, times in seconds.items()
    }
    ratios = [t_theirs / t_ours for t_ours, t_theirs in zip(seconds[ours], seconds[theirs], strict=True)]
    summary["ratio"] = round(statistics.median(ratios), 3)
    summary["ratio_min_max"] = [round(min(ratios), 3), round(max(ratios), 3)]
    summary["rounds"] = len(ratios)
    return summary


def save_results(name: str, report: dict, merge_cases: bool = False) -> Path:
    """Write `report` to benchmarks/results/<name>.json (what benchmarks/report.py turns into the README's table),
    and append it, with the commit and date (`provenance`), as one line of benchmarks/results/history/<name>.jsonl:
    the latest file is replaced, the history never is.

    With `merge_cases`, the file's earlier `cases` that this run did not measure are kept beside the new ones (each
    case carries its own settings), so the cases of a table can be measured by several short commands."""
    report = {**report, **provenance()}
    history = RESULTS_DIR / "history" / f"{name}.jsonl"
    history.parent.mkdir(parents=True, exist_ok=True)
    with open(history, "a") as f:
        f.write(json.dumps(report) + "\n")
    path = RESULTS_DIR / f"{name}.json"
    if merge_cases and path.is_file():
        earlier = json.loads(path.read_text()).get("cases", {})
        report = {**report, "cases": {**earlier, **report["cases"]}}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)
    return path


class SeedsError(ValueError, argparse.ArgumentTypeError):
    """A bad `--seeds`: a ValueError for callers, and argparse prints its message when `parse_seeds` is a `type=`."""


def parse_seeds(text: str) -> list[int]:
    """`--seeds` "0,1,2" -> [0, 1, 2]; an error naming the flag and the value otherwise."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SeedsError(f"`--seeds` must be comma-separated integers such as 0,1,2; got {text!r}") from None
    if not seeds:
        raise SeedsError(f"`--seeds` names no seed: {text!r}")
    return seeds


def ensure_shapes(
    data_dir: Path,
    *,
    seed: int,
    flag: str,
    num_images: int = 20000,
    num_test_images: int | None = None,
    unplaced_share: float = 0.0,
) -> dict:
    """The shapes data set of `seed` (and `unplaced_share`) in `data_dir`: reused when complete, written otherwise
    (the defaults of `clipcond data shapes`: 20,000 images). A folder that holds other data is an error naming `flag`
    (the option `data_dir` came from), never overwritten."""
    from clipcond.data.shapes import load_dataset_info, write_shapes_dataset

    info = load_dataset_info(data_dir) if data_dir.is_dir() else None
    if info is not None and (data_dir / "train").is_dir():
        # data written before "unplaced_share" existed has none: 0
        for key, wanted, default in (("seed", seed, None), ("unplaced_share", unplaced_share, 0.0)):
            held = info.get(key, default)
            if held != wanted:
                raise ValueError(
                    f"{data_dir} (from `{flag}`) holds the shapes data of {key} {held}, not {wanted}; pass "
                    f"another `{flag}` or move that folder"
                )
        print(f"reusing the shapes data set in {data_dir}", file=sys.stderr)
        return info
    print(f"writing the shapes data set of seed {seed} to {data_dir}", file=sys.stderr)
    return write_shapes_dataset(
        data_dir, num_images=num_images, num_test_images=num_test_images, seed=seed, unplaced_share=unplaced_share
    )


def shapes_data_summary(info: dict) -> dict:
    """What a result names of the shapes data it trained on (`dataset_info.json`'s `info`): training images,
    resolution, and the unplaced share only where set, so that results from before it name the same data alike."""
    data = {"num_train": info["splits"]["train"]["num_images"], "resolution": info["resolution"]}
    if info.get("unplaced_share"):
        data["unplaced_share"] = info["unplaced_share"]
    return data


def add_demo_args(parser) -> None:
    """`--demo-dir DIR` with `--seeds`: a benchmark that reads the demos `decoder_quality.py` ran (DIR/seed-N)."""
    parser.add_argument(
        "--demo-dir", type=Path, help="folder of `decoder_quality.py`'s demos: DIR/seed-N (needs --seeds)"
    )
    parser.add_argument("--seeds", type=parse_seeds, help="with --demo-dir: the demos' seeds (the README's: 0,1,2)")


def check_demo_args(args) -> None:
    if (args.demo_dir is None) != (args.seeds is None):
        raise ValueError("`--demo-dir` and `--seeds` go together")


def check_demo_parts(demo_dir: Path, seeds: list[int], parts: tuple[str, ...] = ("clip", "data")) -> None:
    """Refuse, before any work, a `--demo-dir` that lacks one of `parts` for one of `seeds` (DIR/seed-N/PART)."""
    for seed in seeds:
        for part in parts:
            if not (demo_dir / f"seed-{seed}" / part).is_dir():
                raise FileNotFoundError(f"`--demo-dir` {str(demo_dir)!r} has no {part} folder for seed {seed}")


def emptied(folder: Path) -> Path:
    """`folder`, a benchmark's own output folder inside a demo (e.g. DIR/decoder/eval_benchmark), removed if it
    exists, so that no image or grid of an earlier run sits beside this run's metrics."""
    shutil.rmtree(folder, ignore_errors=True)
    return folder


def demos_by_seed(demo_dir: Path | None, seeds: list[int], run: Callable[[Path, int], dict], name: str) -> dict:
    """{seed: `run(DIR/seed-N, N)`} for every seed: each seed's demo in its own folder under `demo_dir`, or under a
    temporary folder (removed afterwards) when it is None; `name` prefixes that folder."""
    with tempfile.TemporaryDirectory(prefix=f"{name}_") as tmp:
        base = demo_dir or Path(tmp, "demo")
        return {seed: run(base / f"seed-{seed}", seed) for seed in seeds}


def demo_times(report: dict) -> dict:
    """What a finished `clipcond demo` (its report.json) says of its time: each stage's wall and CPU seconds, their
    sums, the stages reused from an earlier attempt (they keep that attempt's times: see `clipcond.demo.uninterrupted`),
    and the machine this benchmark reads it on."""
    timings = report["timings"]
    return {
        "timings": timings,
        "demo_wall_seconds": round(sum(t["wall"] for t in timings.values()), 1),
        "demo_cpu_seconds": round(sum(t["cpu"] for t in timings.values()), 1),
        "reused_stages": [name for name, t in timings.items() if t.get("reused")],
        "machine": {
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "load_average_at_demo_start": report["machine"]["load_average_start"],
            "load_average_now": [round(x, 2) for x in os.getloadavg()],
        },
    }


def command_line(benchmark: str, argv: list[str] | None) -> str:
    """The command that ran `benchmarks/<benchmark>.py` with `argv` (None: this process's own arguments), as result
    files record it."""
    return f"python benchmarks/{benchmark}.py " + " ".join(sys.argv[1:] if argv is None else argv)


def add_results_flag(parser, results_name: str | None = None) -> None:
    """`--save-results`; with `results_name`, also `--results-name` (that default), so that another recipe or
    comparison measured by the same script keeps a result file of its own."""
    parser.add_argument(
        "--save-results",
        "--write-results",
        dest="save_results",
        action="store_true",
        help="also write the JSON to benchmarks/results/<name>.json",
    )
    if results_name is not None:
        parser.add_argument(
            "--results-name",
            type=checked_results_name,
            default=results_name,
            help=f"with --save-results: benchmarks/results/<name>.json (default {results_name})",
        )


def checked_results_name(text: str) -> str:
    """A result file's name: lower-case letters, digits and underscores, so that it stays in benchmarks/results/."""
    if not re.fullmatch(r"[a-z0-9_]+", text):
        raise argparse.ArgumentTypeError(
            f"must be lower-case letters, digits and underscores (a file in benchmarks/results/), got {text!r}"
        )
    return text


def add_case_args(
    parser, *, presets_help: str, batch_size: int, batch_help: str, attention: list[str], attention_help: str
):
    """The options whose product `run_cases` runs (presets, precisions, attentions), and how each case is timed."""
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"], help=presets_help)
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--batch-size", type=int, default=batch_size, help=batch_help)
    parser.add_argument("--steps", type=int, default=10, help="timed rounds (one step of each contender per round)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--attention", nargs="+", default=attention, choices=attention, help=attention_help)


def run_cases(
    benchmark: str,
    args,
    argv: list[str] | None,
    *,
    unit: str,
    goal: str,
    run_case: Callable[..., dict],
    suffix: str = "",
) -> int:
    """The `main` of a side-by-side throughput benchmark: every (preset, precision, attention) case of `args`
    through `run_case(preset, precision, attention, args)`, printed as one JSON report (and saved with
    `--save-results`, beside the file's earlier cases)."""
    report = {
        "benchmark": benchmark,
        "unit": unit,
        "goal": goal,
        "machine": machine(),
        "settings": {k: v for k, v in vars(args).items() if k != "save_results"},
        "command": command_line(benchmark, argv),
        "cases": {},
    }
    for preset, precision, attention in itertools.product(args.presets, args.precision, args.attention):
        name = f"{preset}_{precision}_{attention}{suffix}"
        report["cases"][name] = {
            "preset": preset,
            "precision": precision,
            **run_case(preset, precision, attention, args),
            "batch_size": args.batch_size,
            "steps": args.steps,
            "threads": torch.get_num_threads(),
        }
        print(name, json.dumps(report["cases"][name]), file=sys.stderr, flush=True)
    print(json.dumps(report, indent=2))
    if args.save_results:  # `--results-name`, where the benchmark has one: another comparison, its own file
        save_results(getattr(args, "results_name", benchmark), report, merge_cases=True)
    return 0
