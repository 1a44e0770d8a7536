"""The README's speed and memory tables, as markdown, from the latest benchmarks/results/*.json.

    python benchmarks/report.py            # prints the tables; paste them into README.md's "Speed and scale"

Reads clip_throughput.json, decoder_throughput.json and loss_memory.json (written by the benchmarks with
`--save-results`); a missing file gives a line saying which command makes it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import RESULTS_DIR

THROUGHPUT = {
    "clip_throughput": ("CLIP training", "open_clip", "open_clip `CLIP` + `ClipLoss`"),
    "decoder_throughput": ("Decoder training", "plain", "diffusers text-to-image example loop"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python benchmarks/report.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    return parser.parse_args(argv)


def _machine(report: dict) -> str:
    m = report.get("machine", {})
    return (
        f"{m.get('device', '?')} ({m.get('cpu_count', '?')} cores), {m.get('torch_threads', '?')} torch threads, "
        f"torch {m.get('torch', '?')}"
    )


def throughput_table(name: str, report: dict) -> list[str]:
    title, theirs, theirs_label = THROUGHPUT[name]
    unit = report.get("unit", "samples/s")
    lines = [
        f"**{title}** ({unit}, median of alternating rounds in one process; {_machine(report)}; "
        f"goal: {report.get('goal', '?')})",
        "",
        f"| preset | precision | attention (clipcond/{theirs}) | device | batch | rounds | clipcond | {theirs_label} | ratio (min-max) |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for case, r in sorted(report.get("cases", {}).items()):
        preset, precision = r.get("preset"), r.get("precision")
        if preset is None:  # results written before cases named their fields: "<preset>_<precision>"
            preset, precision = case.rsplit("_", 1)
        attention = "/".join(r.get("attention", {"clipcond": "default"}).values())
        low, high = r.get("ratio_min_max", [None, None])
        lines.append(
            f"| {preset} | {precision} | {attention} | {r.get('device', 'cpu')} | {r.get('batch_size', '?')} | "
            f"{r.get('rounds', '?')} | {r['clipcond_samples_per_s']} | {r[f'{theirs}_samples_per_s']} | "
            f"{r['ratio']}x ({low}-{high}) |"
        )
    lines += ["", f"Last command: `{report.get('command', '')}`", ""]
    return lines


def memory_table(report: dict) -> list[str]:
    law = report["loss"]
    settings = report.get("settings", {})
    lines = [
        f"**Contrastive loss memory** (forward + backward, rank 0 of W simulated ranks, local batch "
        f"{settings.get('local_batch', '?')}, width {settings.get('dim', '?')}; {report.get('method', '')}; "
        f"{_machine(report)})",
        "",
        "| W | global batch | local loss (b x B), KiB | full loss (B x B), KiB |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for w, b, local, full in zip(
        law["world_sizes"], law["global_batch"], law["peak_bytes_local_loss"], law["peak_bytes_full_loss"], strict=True
    ):
        lines.append(f"| {w} | {b} | {local / 1024:.0f} | {full / 1024:.0f} |")
    lines += [
        "",
        f"Growth exponent in W: {law['growth_exponent_local_loss']} (local loss; 1 = b x B) against "
        f"{law['growth_exponent_full_loss']} (full loss; 2 = B^2).",
    ]
    for name, peaks in report.get("step", {}).items():
        cells = ", ".join(f"W={w}: {v / 2**20:.1f} MiB" for w, v in peaks.items())
        lines.append(f"Whole step, {name.replace('_', ' ')}: {cells}.")
    lines += ["", f"Command: `{report.get('command', '')}`", ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out: list[str] = []
    for name in (*THROUGHPUT, "loss_memory"):
        path = args.results_dir / f"{name}.json"
        if not path.is_file():
            out += [f"_{name}: no results yet (`python benchmarks/{name}.py --save-results`)_", ""]
            continue
        report = json.loads(path.read_text())
        out += memory_table(report) if name == "loss_memory" else throughput_table(name, report)
    print("\n".join(out).rstrip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
