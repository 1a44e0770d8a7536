"""Quality of `clipcond index` + `clipcond search` on the built-in shapes data (a benchmark, not a test).

    python benchmarks/search_quality.py --clip RUN --data DIR     # an existing CLIP and data set
    python benchmarks/search_quality.py [--data DIR] [--output-dir RUN] [--seed N]   # trains the demo's CLIP first
    python benchmarks/search_quality.py --demo-dir DIR --seeds 0,1,2   # the CLIPs of `decoder_quality.py`'s demos

builds an index of the test split (`ImageIndex.build`, as `clipcond index DIR/test` does), queries it with every
colour-shape label ("red circle", ...) embedded through the zero-shot templates (`clipcond search --ensemble`), and
prints one JSON object: per label and averaged, `precision_at_k` (the fraction of the top-k images whose label is the
query's), `hit_at_k` (whether any is), `contains_at_k` (the fraction that show the queried colour-shape at all, a
two-object image included), the same precision for the bare label without templates, means over seen and held-out
compositions, the index's build time, and `meets_bar`: mean precision_at_5 >= 0.90.

Without `--clip` it trains a CLIP as `clipcond demo` does (`clipcond train clip` with the recipe's defaults, in the
demo's precision for the device; minutes on a CPU), on `--data` (written with the demo's defaults when absent; one of
another seed is an error). With `--demo-dir DIR --seeds 0,1,2` it evaluates the CLIP of each demo that
`python benchmarks/decoder_quality.py --demo-dir DIR --seeds 0,1,2` ran (`DIR/seed-N/clip` on `DIR/seed-N/data`)
and prints the figures per seed and over the seeds: the bar holds by the README's rule
(`clipcond.evaluation.stats.bar_holds`, each seed's precision counted over its labels' top-5 results).
`--save-results` also writes the object to benchmarks/results/search_quality.json.
Progress and logs go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from common import (
    add_demo_args,
    add_results_flag,
    check_demo_args,
    check_demo_parts,
    command_line,
    ensure_shapes,
    save_results,
)

BAR = {"mean_precision_at_5": 0.90}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/search_quality.py",
        description="Index the shapes test split with a CLIP, query every label, print one JSON object.",
    )
    parser.add_argument("--clip", type=Path, help="CLIP run folder (default: train the demo's CLIP)")
    parser.add_argument("--data", type=Path, help="shapes data set root, made if absent (default: a temp dir)")
    parser.add_argument("--output-dir", type=Path, help="where to train the CLIP without --clip (default: temp dir)")
    parser.add_argument("--split", default="test", help="split folder to index (default test)")
    parser.add_argument("--top-k", type=int, default=5, help="results per query (default 5)")
    parser.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16", help="stored embeddings (default fp16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data set and the training")
    add_demo_args(parser)
    add_results_flag(parser)
    args = parser.parse_args(argv)
    if args.top_k < 1:
        raise ValueError(f"`--top-k` must be >= 1, got {args.top_k}")
    check_demo_args(args)
    if args.demo_dir is not None and (args.clip or args.data or args.top_k != 5):
        raise ValueError(
            "`--demo-dir` takes each demo's CLIP and data, and the bar is on the top 5: drop `--clip`, "
            "`--data` and `--top-k`"
        )
    if args.clip is not None and args.data is None:
        raise ValueError("`--clip` needs `--data` (the data set it is evaluated on)")
    return args


def ensure_clip(args: argparse.Namespace, data_dir: Path, output_dir: Path) -> Path:
    """The CLIP to evaluate: `--clip`, or one trained as `clipcond demo` trains it (data written if absent)."""
    if args.clip is not None:
        return args.clip
    from clipcond.demo import default_train_precision
    from clipcond.runs import RunRecord
    from clipcond.train import clip as train_clip
    from clipcond.train.loop import reset_accelerate_state

    ensure_shapes(data_dir, seed=args.seed, flag="--data")  # the demo's data
    if not RunRecord.exists(output_dir):
        argv = ["--data", str(data_dir), "--output-dir", str(output_dir), "--seed", str(args.seed)]
        argv += ["--mixed-precision", default_train_precision()]  # as the demo trains it
        with contextlib.redirect_stdout(sys.stderr):  # stdout holds only our JSON
            train_clip.main([*argv, "--resume-from-checkpoint", "latest", "--validation-steps", "0"])
        reset_accelerate_state()
    return output_dir


def read_metadata(split_dir: Path) -> dict[str, dict]:
    """`{file_name: row}` of a split's metadata.jsonl."""
    path = split_dir / "metadata.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; `--data` must be a shapes data set root")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {row["file_name"]: row for row in rows}


def shows(row: dict, label: str) -> bool:
    """Whether an image shows the colour-shape `label` at all (any of its objects)."""
    return row.get("label") == label or any(f"{o['colour']} {o['shape']}" == label for o in row.get("objects", []))


def mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def evaluate(clip_dir: Path, data_dir: Path, split: str, top_k: int, dtype: str) -> dict:
    import torch

    from clipcond.data.shapes import class_names, load_dataset_info
    from clipcond.evaluation.zero_shot import DEFAULT_TEMPLATES, build_zero_shot_classifier
    from clipcond.index import ImageIndex
    from clipcond.models.clip import load_clip

    split_dir = data_dir / split
    metadata = read_metadata(split_dir)
    info = load_dataset_info(data_dir) or {}
    present = {row.get("label") for row in metadata.values()} - {None, ""}
    labels = [name for name in class_names(info or None) if name in present] or sorted(present)
    if not labels:
        raise ValueError(f"{split_dir / 'metadata.jsonl'} has no labelled image to query for")
    held_out = set(info.get("held_out") or [])

    # 1. the index of the split, as `clipcond index` builds it
    clip_run = load_clip(clip_dir, device="cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    index = ImageIndex.build(split_dir, clip_run, dtype=dtype)
    index_seconds = time.perf_counter() - start

    # 2. one query per label: template-ensembled (`clipcond search --ensemble`) and the bare label
    ensembled = build_zero_shot_classifier(clip_run.encode_text, labels, DEFAULT_TEMPLATES)  # (C, D)
    bare = clip_run.encode_text(labels)  # (C, D)

    def top_rows(query: torch.Tensor) -> list[dict]:
        results = index.search(query, top_k=top_k)
        return [metadata[Path(r.path).relative_to(index.root).as_posix()] for r in results]

    per_label = {}
    for c, label in enumerate(labels):
        rows, bare_rows = top_rows(ensembled[c]), top_rows(bare[c])
        per_label[label] = {
            "precision_at_k": sum(r.get("label") == label for r in rows) / top_k,
            "hit_at_k": float(any(r.get("label") == label for r in rows)),
            "contains_at_k": sum(shows(r, label) for r in rows) / top_k,
            "precision_at_k_no_templates": sum(r.get("label") == label for r in bare_rows) / top_k,
            "num_relevant": sum(r.get("label") == label for r in metadata.values()),
            "held_out": label in held_out,
        }

    def mean_of(key: str, which=lambda stats: True) -> float | None:
        return mean([stats[key] for stats in per_label.values() if which(stats)])

    result = {
        "top_k": top_k,
        "mean_precision_at_k": mean_of("precision_at_k"),
        "mean_hit_at_k": mean_of("hit_at_k"),
        "mean_contains_at_k": mean_of("contains_at_k"),
        "mean_precision_at_k_no_templates": mean_of("precision_at_k_no_templates"),
        "mean_precision_at_k_seen": mean_of("precision_at_k", lambda s: not s["held_out"]),
        "mean_precision_at_k_heldout": mean_of("precision_at_k", lambda s: s["held_out"]),
        "per_label": per_label,
        "num_labels": len(labels),
        "templates": list(DEFAULT_TEMPLATES),
        "index": {
            "num_images": len(index),
            "dtype": dtype,
            "seconds": round(index_seconds, 2),
            "images_per_second": round(len(index) / index_seconds, 1),
        },
        "clip": str(clip_dir),
        "data": str(data_dir),
        "split": split,
        "bar": BAR,
    }
    result["meets_bar"] = bool(top_k == 5 and result["mean_precision_at_k"] >= BAR["mean_precision_at_5"])
    return result


def over_demos(args: argparse.Namespace) -> dict:
    """The CLIP of each seed's demo under `--demo-dir`, per seed and over the seeds (`bar_holds`)."""
    from clipcond.evaluation.stats import bar_holds

    check_demo_parts(args.demo_dir, args.seeds)
    per_seed = {}
    for seed in args.seeds:
        demo = args.demo_dir / f"seed-{seed}"
        per_seed[seed] = evaluate(demo / "clip", demo / "data", args.split, args.top_k, args.dtype)
    values = {seed: r["mean_precision_at_k"] for seed, r in per_seed.items()}
    counts = {seed: r["num_labels"] * r["top_k"] for seed, r in per_seed.items()}
    summary = {"mean_precision_at_5": bar_holds(values, counts, BAR["mean_precision_at_5"])}
    return {"demo_dir": str(args.demo_dir), "seeds": args.seeds, "per_seed": per_seed, "over_seeds": summary}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="search_quality_") as tmp:
        if args.demo_dir is not None:
            result = over_demos(args)
        else:
            data_dir = args.data or Path(tmp, "shapes")
            clip_dir = ensure_clip(args, data_dir, args.output_dir or Path(tmp, "clip"))
            if not os.path.isdir(data_dir / args.split):
                raise FileNotFoundError(f"`--data` {str(data_dir)!r} has no split folder {args.split!r}")
            result = evaluate(clip_dir, data_dir, args.split, args.top_k, args.dtype)
    command = command_line("search_quality", argv)
    result = {"command": command.strip(), **result}
    text = json.dumps(result, indent=2)
    print(text)
    if args.save_results:
        save_results("search_quality", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
