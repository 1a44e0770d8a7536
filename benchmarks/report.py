"""The README's figure tables, as markdown, from the latest benchmarks/results/*.json.

    python benchmarks/report.py                     # prints every table
    python benchmarks/report.py --write README.md   # replaces the README's generated blocks with them
    python benchmarks/report.py --check README.md   # exit 1, with a diff, when the README's blocks differ

The README holds three generated blocks, each between `<!-- report:NAME -->` and `<!-- /report:NAME -->`:
"quality" (the bars, from decoder_quality.json, unclip_quality.json, search_quality.json, scheduler_steps.json and
judge_quality.json), "speed" (clip_throughput.json, decoder_throughput.json, loss_memory.json) and "faults"
(fault_probes.json). Every row names
its result file and the commit it was measured at; the commands that write them are in each benchmark's docstring.
A missing file gives a line saying which command makes it. tests/test_benchmarks.py fails when the README's blocks
are not what this script renders, so no figure in them is typed by hand.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import json
import re
import sys
from pathlib import Path

from common import RESULTS_DIR

THROUGHPUT = {
    "clip_throughput": ("CLIP training", "open_clip", "open_clip `CLIP` + `ClipLoss`"),
    "decoder_throughput": ("Decoder training", "plain", "diffusers text-to-image example loop"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python benchmarks/report.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", type=Path, metavar="README", help="replace the generated blocks of this file")
    action.add_argument("--check", type=Path, metavar="README", help="exit 1 when its generated blocks differ")
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
        attention = "/".join(r["attention"].values()) if "attention" in r else "–"  # not recorded before
        low, high = r.get("ratio_min_max", [None, None])
        lines.append(
            f"| {preset} | {precision} | {attention} | {r.get('device', '–')} | {r.get('batch_size', '?')} | "
            f"{r.get('rounds', '?')} | {r['clipcond_samples_per_s']} | {r[f'{theirs}_samples_per_s']} | "
            f"{r['ratio']}x ({low}-{high}) |"
        )
    lines += ["", f"Last command: `{report.get('command', '')}`", ""]
    return lines


def latent_step_table(report: dict) -> list[str]:
    lines = [
        f"**Latent vs pixel decoder step** (samples/s of `clipcond train decoder`'s step, the same UNet widths on "
        f"pixels or on the VAE's latents, median of alternating rounds in one process; {_machine(report)}; goal: "
        f"{report.get('goal', '?')})",
        "",
        "| preset | precision | resolution | UNet input (pixels / latents) | batch | rounds | pixels | latents | "
        "ratio (min-max) | caching once, per image, in pixel steps | pixel blocks (`--space-to-depth`): samples/s, "
        "ratio (min-max) |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | --- | ---: | --- |",
    ]
    for _, r in sorted(report.get("cases", {}).items()):
        low, high = r["ratio_min_max"]
        size = r["sample_size"]
        lines.append(
            f"| {r['preset']} | {r['precision']} | {r['resolution']} | {size['pixels']}² × 3 / {size['latents']}² latents "
            f"(`{r['vae']}` VAE) | {r['batch_size']} | {r['rounds']} | {r['pixels_samples_per_s']} | "
            f"{r['latents_samples_per_s']} | {r['ratio']}x ({low}-{high}) | {r['cache_encode_in_pixel_steps_per_image']} | "
            f"{_blocks_cell(r)} |"
        )
    return [*lines, "", f"Last command: `{report.get('command', '')}`", ""]


def _blocks_cell(case: dict) -> str:
    """The pixel-blocks contender of a latent step-cost case: F, its input, samples/s and ratio; "–" if not timed."""
    blocks = case.get("blocks")
    if not blocks:
        return "–"
    f, size = blocks["space_to_depth"], blocks["sample_size"]
    low, high = blocks["ratio_min_max"]
    return f"F={f}, {size}² × {3 * f * f}: {case['blocks_samples_per_s']}, {blocks['ratio']}x ({low}-{high})"


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
    lines += _step_rows(report.get("step", {}), settings)
    lines += ["", f"Command: `{report.get('command', '')}`", ""]
    return lines


def _step_rows(step: dict, settings: dict) -> list[str]:
    """The whole training step's peak and the loss's share of it, where the result has the share."""
    rows = [
        (name.rsplit("_", 1)[-1], w, r)
        for name, per_w in step.items()
        for w, r in per_w.items()
        if isinstance(r, dict) and r.get("loss_share") is not None
    ]
    if not rows:
        return []
    lines = [
        "",
        f"Whole step of the `{settings.get('step_preset', '?')}` towers (forward, loss, backward; local batch "
        f"{settings.get('local_batch', '?')}): its peak, and what the loss adds above the towers' activations while "
        "it runs.",
        "",
        "| gradient checkpointing | W | step peak, MiB | loss's share, KiB |",
        "| --- | ---: | ---: | ---: |",
    ]
    for checkpointing, w, r in rows:
        lines.append(f"| {checkpointing} | {w} | {r['peak'] / 2**20:.1f} | {r['loss_share'] / 1024:.0f} |")
    return lines


# ---------------------------------------------------------------- the quality block


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _source(name: str, report: dict) -> str:
    commit = report.get("commit")
    if not commit:
        return f"`{name}.json` (commit not recorded)"
    return f"`{name}.json` at {commit[:7]}{'+' if report.get('dirty') else ''}, {report.get('date', '')[:10]}"


def _over_seeds(summary: dict) -> str:
    """ "mean (95% interval low-high)"; one value has no interval."""
    if summary.get("low") is None:
        return f"**{_pct(summary['mean'])}** (one run)"
    low, high = max(0.0, summary["low"]), min(1.0, summary["high"])  # a proportion (results before the clipping)
    return f"**{_pct(summary['mean'])}** ({_pct(low)}–{_pct(high)})"


def _mark(ok: bool) -> str:
    return "✓" if ok else "✗"


def _row(what: str, figure: str, seeds, bar: str, holds: str, source: str) -> str:
    """One row of the quality table: what | figure | seeds | bar | holds | result file."""
    cells = (what, figure, seeds, bar, holds, source)
    return "|" + "|".join(f" {cell} " if cell != "" else " " for cell in cells) + "|"


def _held(holds: bool, judge_version: int | None) -> str:
    """✓ / ✗, or, for a figure of the judge that forced every image into a class, that it awaits the new judge."""
    if judge_version is not None and judge_version < 2:
        return f"not re-measured (judge v{judge_version}, one seed, read {_mark(holds)})"
    return _mark(holds)


def _seeds_below(missing: list | None) -> str:
    """The seeds that lie below a bar beyond their interval, named: "below: seeds 0, 2" ("" for none)."""
    if not missing:
        return ""
    return f"below: seed{'s' if len(missing) > 1 else ''} {', '.join(str(s) for s in missing)}"


def _below(missing: list | None) -> str:
    """`_seeds_below` in brackets after a verdict: " (below: seeds 0, 2)"."""
    return f" ({_seeds_below(missing)})" if missing else ""


def _verdict(entry: dict) -> str:
    """✓ / ✗ of a bar over seeds (`bar_holds`), naming the seeds that lie below it beyond their interval."""
    return _mark(entry["holds"]) + ("" if entry["holds"] else _below(entry.get("seeds_missing")))


def decoder_rows(report: dict) -> list[str]:
    summary, runs = report["over_seeds"], list(report["per_seed"].values())
    seeds = "/".join(str(s) for s in report["seeds"])
    source = _source("decoder_quality", report)

    def per_seed(key: str) -> str:
        return " / ".join(_pct(r["figures"][str(float(r["guidance_scale"]))][key]) for r in runs)

    def clip_per_seed(key: str) -> str:
        return " / ".join(_pct(r["clip"][key]) for r in runs)

    def row(what: str, figure: str, bar: str = "reported", holds: str = "") -> str:
        return _row(what, figure, seeds, bar, holds, source)

    first = runs[0]
    sampler, ipp = first["sampler"], first["images_per_prompt"]
    several = " / ".join(_pct(r["outcomes"]["seen"]["several"]) for r in runs)
    walls = " / ".join(f"{r['demo_wall_seconds']:.0f} s" for r in runs)
    wall = summary["demo_wall_seconds"]
    rows = [
        row(
            "whole `clipcond demo`, wall time",
            f"{wall['mean']:.0f} s (max {wall['max']:.0f} s); {walls}",
            f"≤ {wall['bar']:.0f} s, uninterrupted",
            _mark(wall["holds"]),
        )
    ]
    for key, label in (("colour_accuracy_seen", "colour"), ("shape_accuracy_seen", "shape")):
        entry = summary[key]
        what = f"Stable Diffusion path, seen prompts, {label} ({ipp} images per prompt, {sampler}, guidance "
        what += f"{first['guidance_scale']:g})"
        rows.append(row(what, f"{_over_seeds(entry)}; {per_seed(key)}", f"≥ {_pct(entry['bar'])}", _verdict(entry)))
    rows.append(row("Stable Diffusion path, seen prompts drawn as several objects", several))
    diversity = " / ".join(
        f"{r['diversity']['clip']:.3f} ({r['diversity']['clip_real']:.3f})" for r in runs if r.get("diversity")
    )
    if diversity:
        what = "Stable Diffusion path, diversity: mean 1 - CLIP cosine between two images of a prompt (renders of "
        rows.append(row(what + "the class)", diversity))
    for key, label in (("colour_accuracy_heldout", "colour"), ("shape_accuracy_heldout", "shape")):
        what = f"Stable Diffusion path, held-out prompts, {label}"
        rows.append(row(what, f"{_over_seeds(summary[key])}; {per_seed(key)}"))
    for key, label in (("zero_shot_top1_seen", "seen"), ("zero_shot_top1_heldout", "held-out")):
        entry = summary[f"clip_{key}"]
        figure = f"{_over_seeds(entry)}; {clip_per_seed(key)}"
        what = f"the demo's CLIP, zero-shot top-1, {label} classes"
        rows.append(row(what, figure, f"≥ {_pct(entry['bar'])}", _verdict(entry)))
    return rows


def unclip_rows(report: dict) -> list[str]:
    """The DALL-E 2 path over seeds: the prior's cosine against its baselines, the judged accuracies of text-to-image
    through the prior and of variations against their bars, and how far a variation lies from its source."""
    summary, runs = report["over_seeds"], list(report["per_seed"].values())
    seeds, source = "/".join(str(s) for s in report["seeds"]), _source("unclip_quality", report)
    version = runs[0]["judge"].get("version")

    def row(what: str, figure: str, bar: str = "reported", holds: str = "") -> str:
        return _row(what, figure, seeds, bar, holds, source)

    cosines = "; ".join(
        f"seed {r['seed']}: {r['prior']['cosine_predicted']:.3f} vs {r['prior']['cosine_text_baseline']:.3f} / "
        f"{r['prior']['cosine_random_baseline']:.3f}"
        for r in runs
    )
    what = "DALL-E 2 path: prior cosine to the true image embedding, vs text / random image"
    rows = [row(what, cosines, "beats both on every seed", _mark(summary["prior_cosine_beats_baselines"]["holds"]))]

    def per_seed_or_one(values: list[str]) -> str:  # one value when the seeds agree, else each seed's
        return values[0] if len(set(values)) == 1 else " / ".join(values)

    def judged(part: str) -> str:
        return per_seed_or_one([str(r["num_judged_seen"][part]) for r in runs]) + " judged a seed"

    # the decoder's guidance, in both parts (demos evaluated at different commits may differ)
    guidance = (
        "decoder guidance "
        + per_seed_or_one(
            [f"{r['settings']['guidance_scale']:g} from {r['settings']['guidance_start']:g}" for r in runs]
        )
        + " of the steps"
    )
    for part, label in (("prior_text_to_image", "text-to-image through the prior"), ("variations", "variations")):
        for attribute in ("colour", "shape"):
            entry = summary[f"{part}_{attribute}_accuracy_seen"]
            per_seed = " / ".join(_pct(r[part][f"{attribute}_accuracy_seen"]) for r in runs)
            what = f"DALL-E 2 path: {label}, seen, {attribute} (judge v{version}; {judged(part)}, {guidance})"
            rows.append(row(what, f"{_over_seeds(entry)}; {per_seed}", f"≥ {_pct(entry['bar'])}", _verdict(entry)))
    distances = {r["seed"]: r["variations"].get("distance") for r in runs}
    if all(distances.values()):
        what = "DALL-E 2 path: distance of a variation to its source (1 - CLIP cosine; RMS pixels), beside the "
        what += "sources of unrelated classes and a copy (0)"
        figure = "; ".join(
            f"seed {seed}: CLIP {d['to_source']['clip']:.3f} vs {d['to_unrelated_sources']['clip']:.3f}, pixels "
            f"{d['to_source']['pixels']:.3f} vs {d['to_unrelated_sources']['pixels']:.3f}"
            for seed, d in distances.items()
        )
        rows.append(row(what, figure))
    return rows


def search_rows(report: dict) -> list[str]:
    if "per_seed" in report:  # the demos' CLIPs, over seeds
        entry, runs = report["over_seeds"]["mean_precision_at_5"], list(report["per_seed"].values())
        figure = f"{_over_seeds(entry)}; " + " / ".join(_pct(r["mean_precision_at_k"]) for r in runs)
        what = "text → image search with the demo's CLIP, mean top-5 precision"
        seeds = "/".join(str(s) for s in report["seeds"])
        return [
            _row(what, figure, seeds, f"≥ {_pct(entry['bar'])}", _verdict(entry), _source("search_quality", report))
        ]
    value, bar = report["mean_precision_at_k"], report["bar"]["mean_precision_at_5"]
    what = f"text → image search with the demo's CLIP, mean top-{report['top_k']} precision"
    return [
        _row(
            what,
            _pct(value),
            report.get("seed", "–"),
            f"≥ {_pct(bar)}",
            _mark(value >= bar),
            _source("search_quality", report),
        )
    ]


def scheduler_rows(report: dict) -> list[str]:
    """Few-step samplers against DDPM's 1000 steps on one decoder: each one's seen gaps, with their intervals in the
    results of `--seen-only` runs (2026-12-06 on), against the bar "at most 3 points below"."""
    if "over_seeds" in report:
        return scheduler_seed_rows(report)
    version = report.get("judge", {}).get("version", 1)  # written before results named their judge: judge v1
    source, seed = _source("scheduler_steps", report), report.get("seed", "–")
    if "seen_images_per_sampler" not in report:  # older results: DPM-Solver++ 20 only, no interval
        diff = report["dpm@20_minus_ddpm@1000"]
        cells = ", ".join(f"{k.replace('_accuracy_seen', '')} {100 * v:+.1f}" for k, v in diff.items())
        what = "DPM-Solver++ 20 steps minus DDPM 1000 steps, seen, points "
        what += f"({report['images_per_prompt']} images per prompt, judge v{version})"
        return [_row(what, cells, seed, "at most 3 below", _held(report["within_3_points"], version), source)]
    from scheduler_steps import against_reference

    reference, n = report.get("reference", "ddpm@1000"), report["seen_images_per_sampler"]  # named from 9acfc76 on
    rows = []
    for name, compared in against_reference(report["samplers"], n, reference).items():
        gaps, intervals = compared["minus_reference"], compared["interval"]
        cells = ", ".join(
            f"{k.replace('_accuracy_seen', '')} {100 * gap:+.1f} ({100 * intervals[k][0]:+.1f} to "
            f"{100 * intervals[k][1]:+.1f})"
            for k, gap in gaps.items()
        )
        what = f"{name} minus {reference}, seen, points ({n} seen images per sampler, guidance "
        what += f"{report['guidance_scale']:g}, {report['dtype']}, judge v{version})"
        rows.append(_row(what, cells, seed, "at most 3 below", _held(compared["within_3_points"], version), source))
    return rows


def scheduler_seed_rows(report: dict) -> list[str]:
    """Few-step samplers against DDPM's 1000 steps on the decoders of several demos: per seen figure the mean gap
    over seeds, the pooled images' gap with its interval, and each seed's gap, against "at most 3 points below"."""
    seeds = "/".join(str(s) for s in report["seeds"])
    reference, runs = report["reference"], list(report["per_seed"].values())
    rows = []
    for name, compared in report["over_seeds"].items():
        cells: dict[str, list[str]] = {}  # one cell per distinct text, naming every figure that reads it
        for key, figure in compared["figures"].items():
            low, high = figure["pooled"]["interval"]
            per_seed = " / ".join(
                f"{100 * (r['samplers'][name][key] - r['samplers'][reference][key]):+.1f}" for r in runs
            )
            text = f"{100 * figure['mean']:+.1f} (pooled {100 * low:+.1f} to {100 * high:+.1f}; {per_seed})"
            cells.setdefault(text, []).append(key.replace("_accuracy_seen", ""))
        cells = [f"{' = '.join(keys)} {text}" for text, keys in cells.items()]
        n = runs[0]["seen_images_per_sampler"]
        what = f"{name} minus {reference}, seen, points, mean over seeds ({n} seen images per sampler and seed, "
        what += f"guidance {report['guidance_scale']:g}, {report['dtype']}, judge v{report['judge']['version']})"
        holds = compared["within_3_points"]
        missing = sorted({s for f in compared["figures"].values() for s in f["seeds_missing"]})
        verdict = _mark(holds) + ("" if holds else _below(missing))
        rows.append(
            _row(what, "; ".join(cells), seeds, "at most 3 below", verdict, _source("scheduler_steps", report))
        )
    return rows


def sampler_rows(report: dict, name: str = "samplers", decoder: str = "one decoder") -> list[str]:
    """Samplers side by side on one decoder (result file `name`): seen colour / shape and the share of one-object
    prompts drawn as several objects or blank, per sampler; the seeds column names the images' noise seed."""
    cells = "; ".join(
        f"{sampler}: {_pct(r['colour_accuracy_seen'])} / {_pct(r['shape_accuracy_seen'])}, "
        f"several {_pct(r['outcomes_seen']['several'])}, blank {_pct(r['outcomes_seen']['blank'])}"
        for sampler, r in report["samplers"].items()
    )
    images = (
        f"{report['seen_images_per_sampler']} seen images per sampler, {report['dtype']}"
        if "seen_images_per_sampler" in report
        else f"{report['images_per_prompt']} images per prompt"
    )
    what = (
        f"Stable Diffusion path, samplers on {decoder}, seen colour / shape ({images}, guidance "
        f"{report['guidance_scale']:g}, judge v{report['judge']['version']})"
    )
    return [_row(what, cells, report.get("seed", "–"), "reported", "", _source(name, report))]


HARD_NEGATIVE_FIGURES = {
    "zero_shot_top1_seen": "zero-shot top-1, seen classes",
    "zero_shot_top1_heldout": "zero-shot top-1, held-out classes",
    "probe_binding_all": "binding probe, right colour on each shape vs swapped (chance 50%)",
    "probe_relation_all": "relation probe, left/right/above/below vs the opposite (chance 50%)",
    "probe_count_all": "count probe, one vs two (chance 50%)",
    "probe_position_all": "position probe (chance 50%)",
    "probe_size_all": "size probe (chance 50%)",
}


MIN_SEEDS = 3  # a bar is judged over at least this many seeds


def _hard_negative_bar(key: str, target: dict, difference: dict) -> tuple[str, str]:
    """The bar of one figure of the hard-negative comparison and whether it holds (on the mean difference)."""
    if key == "zero_shot_top1_seen":
        return f"at most {100 * target['zero_shot_loss']:g} point below plain", _mark(
            difference["mean"] >= -target["zero_shot_loss"]
        )
    probe = key.removeprefix("probe_").removesuffix("_all")
    if probe in target["probes"]:
        bar = f"≥ {100 * target['probe_gain']:g} points above plain"
        verdict = target.get("per_probe", {}).get(probe)
        if verdict is None:  # results before per-seed verdicts: on the mean alone
            return bar, _mark(difference["mean"] >= target["probe_gain"])
        return bar, _mark(verdict["holds"]) + _below(verdict["seeds_missing"])
    return "reported", ""


def treated_recipe(settings: dict) -> str:
    """The options of `benchmarks/hard_negatives.py`'s treated run: "`--hard-negatives K`", "`--counterfactual-pairs
    P`", "`--counterfactual-weight W`" and "`--counterfactual-kind-weights KIND=W`", those it used (results from before
    an option have none of it)."""
    options = [
        f"`{flag} {value}`"
        for flag, value in (
            ("--hard-negatives", settings.get("kinds")),
            ("--counterfactual-pairs", settings.get("counterfactual_pairs")),
            ("--counterfactual-weight", f"{settings.get('counterfactual_weight') or 0:g}"),
            ("--counterfactual-kind-weights", settings.get("counterfactual_kind_weights")),
        )
        if value and value not in ("none", "0")
    ]
    return " + ".join(options)


def data_note(data: dict) -> str:
    """How a hard-negative result's data differs from `clipcond data shapes`' defaults ("" where it does not)."""
    share = data.get("unplaced_share")
    return f"; data: {100 * share:g}% of relation captions unplaced, 'A and B'" if share else ""


def hard_negative_rows(report: dict, name: str = "hard_negatives") -> list[str]:
    """The CLIP's zero-shot and minimal-pair probes, plain recipe vs `--hard-negatives` and/or
    `--counterfactual-pairs`, over seeds (issue 20)."""
    summary, settings = report["summary"], report["settings"]
    seeds, source = "/".join(sorted(report["per_seed"]["plain"], key=int)), _source(name, report)
    earlier = report.get("seeds_from")
    if earlier:  # seeds taken from an earlier result (`--seeds-from`) name their own commit
        which = "/".join(map(str, earlier["seeds"]))
        source += f"; seed {which} from {_source(Path(earlier['file']).stem, earlier)}"
    steps = sorted({run["steps"] for runs in report["per_seed"].values() for run in runs.values()})
    num_seeds = len(report["per_seed"]["plain"])
    equal_steps = f"equal steps, {steps[0]}" if len(steps) == 1 else f"steps {'/'.join(map(str, steps))}"
    rows = []
    for key, label in HARD_NEGATIVE_FIGURES.items():
        if key not in summary["plain"]:
            continue
        difference = summary["difference"][key]
        figure = (
            f"{_over_seeds(summary['plain'][key])} vs {_over_seeds(summary['hard_negatives'][key])}; difference "
            f"{100 * difference['mean']:+.1f} points"
        )
        what = f"CLIP, plain recipe vs {treated_recipe(settings)} ({equal_steps}{data_note(report['data'])}): {label}"
        bar, holds = _hard_negative_bar(key, summary["target"], difference)
        if holds and num_seeds < MIN_SEEDS:  # a bar counts over three seeds (README, above the table)
            holds = f"not judged: {num_seeds} seed (read {holds})"
        rows.append(_row(what, figure, seeds, bar, holds, source))
    return rows


def hard_negative_decoder_rows(report: dict, name: str = "hard_negatives_decoder") -> list[str]:
    """The Stable Diffusion path on each recipe's CLIP: its two-object prompts read by the probe's scene reader."""
    seeds = sorted(report["per_seed"]["plain"])
    source = _source(name, report)
    options = treated_recipe(
        {
            "kinds": ",".join(report.get("kinds") or ()),
            "counterfactual_pairs": ",".join(report.get("counterfactual_pairs") or ()),
            "counterfactual_weight": report.get("counterfactual_weight"),
            "counterfactual_kind_weights": report.get("counterfactual_kind_weights"),
        }
    )
    details = (options + data_note(report.get("data", {}))).removeprefix("; ")  # results before "data": none
    kinds = f" ({details})" if details else ""
    rows = []
    for kind, field, label in (
        ("count", "count", '"two X" / "a X" prompts drawn with the right number of objects'),
        ("relation", "relation", "relation prompts, relation right (among images whose objects are right)"),
        ("binding", "binding", "binding prompts, colours on the right shapes (among images with both)"),
        ("binding", "objects", "binding prompts, exactly the two prompted objects"),
    ):
        cells = []
        for recipe in ("plain", "hard_negatives"):
            figures = [report["per_seed"][recipe][s]["generator"][kind][field]["all"] for s in seeds]
            cells.append(" / ".join(f"{_pct(f['accuracy'])} (n={f['n']})" for f in figures))
        chance = report["per_seed"]["plain"][seeds[0]]["generator"][kind][field]["all"]["chance"]
        what = f"Stable Diffusion path on the plain vs the hard-negative CLIP{kinds}: {label}, chance {_pct(chance)}"
        rows.append(_row(what, " vs ".join(cells), "/".join(seeds), "measured", "", source))
    return rows


def judge_rows(report: dict) -> list[str]:
    seeds = "/".join(str(s) for s in report["seeds"])
    version, bar, checks = report["judge"]["version"], report["bar"], report["checks"]
    source = _source("judge_quality", report)
    rows = []
    for name, case in report["cases"].items():
        key = "corrupted one object" if name.startswith("one object,") else name
        what = f"judge v{version} on another renderer: {name} (→ {case['expected']})"
        rows.append(_row(what, _over_seeds(case["right"]), seeds, f"≥ {_pct(bar[key])}", _mark(checks[key]), source))
    if report.get("untrained_unet"):
        share = report["untrained_unet"]["outcomes"]["object"]
        what = f"judge v{version}: an untrained UNet's samples called one object"
        limit = f"≤ {_pct(bar['untrained_object_share_max'])}"
        rows.append(_row(what, _pct(share), 0, limit, _mark(checks["untrained UNet"]), source))
    rejudged = report.get("rejudged")
    if rejudged:
        before = rejudged["judge_before"].get("version")
        for key, groups in rejudged["guidance"].items():
            for group, figures in groups.items():
                cells = ", ".join(
                    f"{what} {_pct(figures['before'][what])} → {_pct(figures['now'][what])}"
                    for what in ("colour", "shape")
                )
                what = (
                    f"the same {figures['num_images']} saved images ({group}, guidance {float(key):g}) read by judge "
                    f"v{before} → v{version}"
                )
                figure = f"{cells}; {_pct(figures['outcomes']['several'])} several"
                rows.append(_row(what, figure, 0, "reported", "", source))
    return rows


def clip_rows(report: dict) -> list[str]:
    """The default CLIP recipe's zero-shot bars over seeds, and its training time on every seed."""
    summary, runs = report["over_seeds"], list(report["per_seed"].values())
    seeds, source = "/".join(str(s) for s in report["seeds"]), _source("clip_quality", report)
    precision = {"no": "fp32"}.get(report["mixed_precision"], report["mixed_precision"])
    rows = []
    one_data_set = report.get("data_seed", 0) is not None  # results without the key trained on one data set
    data = "training seeds, one data set" if one_data_set else "data and training seeds"
    for key, label in (("zero_shot_top1_seen", "seen"), ("zero_shot_top1_heldout", "held-out")):
        entry = summary[key]
        what = f"`clipcond train clip` recipe ({precision}, {data}), zero-shot top-1, {label} classes"
        figure = f"{_over_seeds(entry)}; " + " / ".join(_pct(r[key]) for r in runs)
        rows.append(_row(what, figure, seeds, f"≥ {_pct(entry['bar'])}", _verdict(entry), source))
    time = summary["train_seconds"]
    where = f"{report['machine']['device']}, {report['machine']['torch_threads']} threads"
    what = f"`clipcond train clip` recipe ({precision}), training time ({runs[0]['steps']} steps; {where})"
    figure = " / ".join(f"{r['train_seconds']:.0f} s" for r in runs)
    rows.append(_row(what, figure, seeds, f"≤ {time['bar']:.0f} s on every seed", _mark(time["holds"]), source))
    return rows


def clip_real_data_rows(report: dict) -> list[str]:
    """clipcond's CLIP recipe beside plain transformers and open_clip loops on the Tux Paint stamps, per figure."""
    summary, settings = report["summary"], report["settings"]
    seeds = "/".join(str(s) for s in settings["seeds"])
    recipe = " ".join(settings.get("clipcond_args") or []) or "defaults"
    name = settings.get("results_name", "clip_real_data")
    rows, data_set = [], f"CLIP on real data (Tux Paint stamps, {settings['steps']} steps of {settings['batch_size']})"
    topics = f"zero-shot top-1 ({len(report['data']['classes'])} topics"
    words = report["data"].get("label_words")  # recorded from 2026-12-06 (late) on
    if words is not None:
        topics += f", named by {_pct(words['own_label_named'])} of the training captions; uniform chance "
        topics += _pct(words["uniform_chance"])
    for key, label in (("text_to_image_R@10", "text→image R@10"), ("zero_shot_top1", topics + ")")):
        what = f"{data_set}, {label}: clipcond ({recipe}) vs transformers / open_clip loops"
        others = " / ".join(_pct(summary[other][key]["mean"]) for other in ("transformers", "open_clip"))
        figure = f"{_over_seeds(summary['clipcond'][key])} vs {others}"
        holds = _mark(summary["clipcond_beats_both"][key])
        rows.append(_row(what, figure, seeds, "beats both", holds, _source(name, report)))
    if "text_to_image_R@10_new_words" in summary["clipcond"]:  # recorded from 2026-12-06 (late) on
        rows.append(_known_words_row(report, f"{data_set}, text→image R@10", seeds, recipe, _source(name, report)))
    return rows


def _known_words_row(report: dict, what: str, seeds: str, recipe: str, source: str) -> str:
    """Text->image R@10 (`what` names it) of each contender on the test captions whose words all occur in training
    captions, and on the others (a word no training caption has)."""
    summary, data = report["summary"], report["data"]
    known, total = data["test_captions_with_known_words"], data["splits"]["test"]["num_images"]
    what += (
        f" on the {known} test captions whose every word is in a training caption / the {total - known} with a new "
        f"word: clipcond ({recipe}) vs transformers / open_clip loops"
    )
    figure = " vs ".join(
        f"{_pct(summary[c]['text_to_image_R@10_known_words']['mean'])} / "
        f"{_pct(summary[c]['text_to_image_R@10_new_words']['mean'])}"
        for c in ("clipcond", "transformers", "open_clip")
    )
    return _row(what, figure, seeds, "reported", "", source)


def latent_rows(report: dict) -> list[str]:
    """The demo's latent path: the VAE's reconstructions (PSNR, the judge's gap) and the latent decoder's bars."""
    summary, runs, source = report["over_seeds"], list(report["per_seed"].values()), _source("latent_quality", report)
    seeds = "/".join(str(s) for s in report["seeds"])
    psnr = " / ".join(f"{r['vae']['eval']['psnr']:.1f} dB" for r in runs)
    gap = summary["vae_judge_gap_points"]
    rows = [
        _row(
            "latent path: the `tiny` VAE's reconstructions of one-object test images, PSNR",
            psnr,
            seeds,
            "reported",
            "",
            source,
        ),
        _row(
            "latent path: the judge on reconstructions vs originals, worst gap (colour or shape)",
            f"{gap['worst']:g} points",
            seeds,
            f"≤ {gap['bar']:g} points",
            _mark(gap["holds"]),
            source,
        ),
    ]
    for name, label in (("colour_accuracy_seen", "colour"), ("shape_accuracy_seen", "shape")):
        latent = " / ".join(_pct(r["latent"][name]) for r in runs)
        pixel = " / ".join(_pct(r["pixel"][name]) for r in runs)
        figure = f"{_over_seeds(summary[name])}; {latent}; the same demos' pixel decoder (32 px) {pixel}"
        what = f"latent path (64 px, 16x16x4 latents), seen prompts, {label}"
        bar = f"≥ {_pct(summary[name]['bar'])}"
        rows.append(_row(what, figure, seeds, bar, _verdict(summary[name]), source))
    return rows


def captioner_rows(report: dict) -> list[str]:
    """The captioner recipe: the one-object test images' captions and descriptions against the bars (over seeds where
    the result has several: the means, then each seed's figures), the held-out compositions, the answers, and the
    slowest training against the time bar."""
    runs = list(report["per_seed"].values()) if "per_seed" in report else [report]
    summary, first = report.get("over_seeds"), runs[0]
    seeds, source, bars = "/".join(str(r["seed"]) for r in runs), _source("captioner_quality", report), first["bar"]
    fields = list(bars)
    bar = "≥ " + " / ".join(_pct(bars[f]) for f in fields)

    def figures(text: str, group: str) -> str:
        each = [" / ".join(_pct(r[text][group][f]["accuracy"]) for f in fields) for r in runs]
        if len(runs) == 1:
            return each[0]
        means = " / ".join(_pct(sum(r[text][group][f]["accuracy"] for r in runs) / len(runs)) for f in fields)
        return f"**{means}** (means); " + "; ".join(f"seed {r['seed']}: {e}" for r, e in zip(runs, each, strict=True))

    def verdict(text: str) -> str:
        """✓, or ✗ with the fields that miss (and, over seeds, the seeds below each beyond their interval)."""
        if not summary:
            failed = [f for f in fields if not first["holds"][text][f]]
            return _mark(not failed) + (f" ({', '.join(failed)})" if failed else "")
        entries = {f: summary[f"{text}_{f}"] for f in fields}
        failed = [
            ", ".join(filter(None, [f, _seeds_below(e["seeds_missing"])]))
            for f, e in entries.items()
            if not e["holds"]
        ]
        return _mark(not failed) + (f" ({'; '.join(failed)})" if failed else "")

    rows = []
    texts = {
        "caption": "greedy captions",
        "best_of": f"the best of {first.get('best_of_candidates')} candidates (`clipcond caption`'s default)",
        "description": "detailed descriptions (`caption --detailed`)",
    }
    for text, label in texts.items():
        if text not in first:  # results written before the best-of captions
            continue
        what = f"captioner (`{first['model']}` LM), one-object test images, {label}: {' / '.join(fields)}"
        rows.append(_row(what, figures(text, "all"), seeds, bar, verdict(text), source))
        n = first[text]["heldout"][fields[0]]["n"]
        what = f"the same, held-out compositions only ({n} images a seed)"
        rows.append(_row(what, figures(text, "heldout"), seeds, "reported", "", source))
    answers = "; ".join(
        " / ".join(f"{kind} {_pct(v['accuracy'])}" for kind, v in r["questions"].items())
        + (f" (seed {r['seed']})" if len(runs) > 1 else "")
        for r in runs
    )
    rows.append(
        _row("captioner, answers to the test images' questions (exact match)", answers, seeds, "reported", "", source)
    )
    walls = [r["train_wall_seconds_with_caches"] for r in runs]  # over seeds, the slowest is the summary's "max"
    limit = first["time_bar_seconds"]
    what = f"captioner training, wall time ({first['steps']} steps of {first['train_batch_size']}, cache and "
    what += "validation included" + ("; the slowest seed" if len(runs) > 1 else "") + ")"
    figure = f"{max(walls):.0f} s" + (" (" + " / ".join(f"{w:.0f}" for w in walls) + " s)" if len(runs) > 1 else "")
    rows.append(_row(what, figure, seeds, f"≤ {limit} s", _mark(max(walls) <= limit), source))
    return rows


# the Stable Diffusion path trained on a hard-negative benchmark's CLIP runs (`hard_negatives_decoder.py`)
DECODER_ON_RUNS = "hard_negatives_decoder.py --runs-dir RUNS --data-dir DIR --seeds 0"


def _named_result(name: str, script_and_options: str, rows) -> tuple[str, functools.partial]:
    """A `QUALITY` entry of a result file that a script writes under `--results-name NAME`: its command (the script
    in benchmarks/ with its options) and its rows (`rows(report, name=NAME)`)."""
    command = f"python benchmarks/{script_and_options} --results-name {name} --save-results"
    return command, functools.partial(rows, name=name)


QUALITY = {
    "decoder_quality": ("python benchmarks/decoder_quality.py --seeds 0,1,2 --save-results", decoder_rows),
    "unclip_quality": ("python benchmarks/unclip_quality.py --seeds 0,1,2 --save-results", unclip_rows),
    "search_quality": ("python benchmarks/search_quality.py --demo-dir DIR --seeds 0,1,2 --save-results", search_rows),
    "scheduler_steps": (
        "python benchmarks/scheduler_steps.py --demo-dir DIR --seeds 0,1,2 --samplers dpm-sde@20,dpm@20,ddpm@1000 "
        "--images-per-prompt 16 --guidance-scale 3 --seen-only --dtype bf16 --save-results",
        scheduler_rows,
    ),
    "samplers": (
        "python benchmarks/scheduler_steps.py --model DIR/decoder --data DIR/data "
        "--samplers dpm@20,dpm-sde@20,euler-a@25 --images-per-prompt 24 --guidance-scale 3 --results-name samplers "
        "--save-results",
        sampler_rows,
    ),
    **{
        f"samplers_blocks_seed{seed}": (
            f"python benchmarks/scheduler_steps.py --model DIR/seed-{seed}/decoder --data DIR/seed-{seed}/data "
            "--samplers dpm@20,dpm-sde@20 --images-per-prompt 32 --guidance-scale 3 --seen-only --dtype bf16 "
            f"--seed 1234 --results-name samplers_blocks_seed{seed} --save-results",
            functools.partial(
                sampler_rows, name=f"samplers_blocks_seed{seed}", decoder=f"the seed-{seed} demo's decoder"
            ),
        )
        for seed in (1, 2)
    },
    "judge_quality": ("python benchmarks/judge_quality.py --save-results", judge_rows),
    "hard_negatives": (
        "python benchmarks/hard_negatives.py --data-dir DIR --seeds 0,1,2 --save-results",
        hard_negative_rows,
    ),
    "hard_negatives_1560": _named_result(
        "hard_negatives_1560",
        "hard_negatives.py --data-dir DIR --seeds 0,1,2 --max-train-steps 1560",
        hard_negative_rows,
    ),
    "hard_negatives_decoder": (
        "python benchmarks/hard_negatives_decoder.py --runs-dir RUNS --data-dir DIR --seeds 0 --save-results",
        hard_negative_decoder_rows,
    ),
    "hard_negatives_count": _named_result(
        "hard_negatives_count", "hard_negatives.py --data-dir DIR --seeds 0 --kinds swap-count", hard_negative_rows
    ),
    "hard_negatives_count_decoder": _named_result(
        "hard_negatives_count_decoder", DECODER_ON_RUNS, hard_negative_decoder_rows
    ),
    **{
        f"hard_negatives_twins{suffix}": _named_result(
            f"hard_negatives_twins{suffix}",
            f"hard_negatives.py --data-dir DIR --seeds 0,1,2 --kinds none --counterfactual-pairs {kinds}",
            hard_negative_rows,
        )
        for suffix, kinds in (
            ("", "swap-colours"),
            ("_shapes", "swap-colours,swap-shapes"),
            ("_relations", "swap-colours,swap-relations"),
            ("_weighted", "swap-colours,swap-relations --counterfactual-weight 8"),
        )
    },
    "hard_negatives_unplaced": _named_result(
        "hard_negatives_unplaced",
        "hard_negatives.py --data-dir DIR --unplaced-share 0.5 --seeds 0,1,2 --kinds none --counterfactual-pairs "
        "swap-colours,swap-relations --counterfactual-weight 8",
        hard_negative_rows,
    ),
    "hard_negatives_twins_decoder": _named_result(
        "hard_negatives_twins_decoder", DECODER_ON_RUNS, hard_negative_decoder_rows
    ),
    "clip_quality": ("python benchmarks/clip_quality.py --seeds 0,1,2 --save-results", clip_rows),
    "latent_quality": ("python benchmarks/latent_quality.py --seeds 0 --save-results", latent_rows),
    "clip_real_data": (
        "python benchmarks/clip_real_data.py --data-dir DIR --steps 200 --batch-size 64 --save-results",
        clip_real_data_rows,
    ),
    "captioner_quality": (
        "python benchmarks/captioner_quality.py --demo-dir DIR --seeds 0,1,2 --save-results",
        captioner_rows,
    ),
}


def quality_block(results_dir: Path) -> list[str]:
    lines = [
        "| what | figure: mean over seeds (95% interval); per seed | seeds | bar | holds | result file |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    missing = []
    for name, (command, rows) in QUALITY.items():
        path = results_dir / f"{name}.json"
        report = json.loads(path.read_text()) if path.is_file() else None
        if name == "decoder_quality" and report is not None and "over_seeds" not in report:
            missing.append(f"_{name}: the latest result is of one seed, from before `--seeds` (`{command}`)_")
        elif report is not None:
            lines += rows(report)
        else:
            missing.append(f"_{name}: no results yet (`{command}`)_")
    return lines + ([""] + missing if missing else [])


# the commands of speed results whose name is not their script's
SPEED_COMMANDS = {
    "latent_step_cost_32px": "python benchmarks/latent_step_cost.py --resolution 32 --space-to-depth 2 --precision fp32 "
    "--results-name latent_step_cost_32px"
}


def speed_block(results_dir: Path) -> list[str]:
    out: list[str] = []
    # latent_step_cost_32px: the same benchmark at the demo's 32 px, where pixel blocks are the pixel path's option
    for name in (*THROUGHPUT, "latent_step_cost", "latent_step_cost_32px", "loss_memory"):
        path = results_dir / f"{name}.json"
        if not path.is_file():
            out += [
                f"_{name}: no results yet (`{SPEED_COMMANDS.get(name, f'python benchmarks/{name}.py')} --save-results`)_",
                "",
            ]
            continue
        report = json.loads(path.read_text())
        tables = {
            "loss_memory": memory_table,
            "latent_step_cost": latent_step_table,
            "latent_step_cost_32px": latent_step_table,
        }
        out += tables[name](report) if name in tables else throughput_table(name, report)
    return out[:-1] if out and out[-1] == "" else out


FAULT_GROUPS = {
    "kill": "SIGKILL points, resumed to the uninterrupted run's weights",
    "corrupt": "damaged or malicious checkpoint files: skipped, named, resumed from the one before",
    "bad-input": "invalid command lines and files: exit 2, one line naming the argument",
    "disk-full": "full disks (a real tmpfs): one line saying so, earlier files intact",
    "concurrent": "two writers into one folder: one refused at once",
}


def faults_block(results_dir: Path) -> list[str]:
    path = results_dir / "fault_probes.json"
    if not path.is_file():
        return ["_fault_probes: no results yet (`python benchmarks/fault_probes.py --write-results`)_"]
    report = json.loads(path.read_text())
    lines = ["| probes | passed | failed | result file |", "| --- | --- | --- | --- |"]
    for group, count in report["counts"].items():
        failed = [r["probe"] for r in report["rows"] if r["group"] == group and r["ok"] is False]
        passed = f"{count['ok']} of {count['of']}" + (
            " (not run here: no small file system)" if count.get("not_run") else ""
        )
        cells = (FAULT_GROUPS.get(group, group), passed, ", ".join(failed) or "none", _source("fault_probes", report))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render(results_dir: Path) -> dict[str, list[str]]:
    return {
        "quality": quality_block(results_dir),
        "speed": speed_block(results_dir),
        "faults": faults_block(results_dir),
    }


def replace_blocks(text: str, blocks: dict[str, list[str]]) -> str:
    """`text` with every `<!-- report:NAME -->` ... `<!-- /report:NAME -->` block's inside replaced."""
    for name, lines in blocks.items():
        pattern = re.compile(rf"(<!-- report:{name} -->\n).*?(<!-- /report:{name} -->)", re.S)
        if not pattern.search(text):
            raise ValueError(f"the README has no `<!-- report:{name} -->` ... `<!-- /report:{name} -->` block")
        body = "\n".join(lines) + "\n"
        text = pattern.sub(lambda m, body=body: m.group(1) + body + m.group(2), text)
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    blocks = render(args.results_dir)
    if args.write or args.check:
        path = args.write or args.check
        text = path.read_text(encoding="utf-8")
        new = replace_blocks(text, blocks)
        if args.write:
            path.write_text(new, encoding="utf-8")
            return 0
        if new != text:
            diff = difflib.unified_diff(text.splitlines(), new.splitlines(), str(path), "report.py", lineterm="")
            print("\n".join(diff), file=sys.stderr)
            print(
                f"{path}'s figure tables differ from the results: run `python benchmarks/report.py --write {path}`",
                file=sys.stderr,
            )
            return 1
        return 0
    print("\n\n".join("\n".join(lines) for lines in blocks.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
