"""The report of `clipcond probe`: probes.json, probes.md (a table per probe), a bar chart per probe and a grid of
example pairs. `clipcond demo`'s report renders the same tables (`markdown_tables`)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from clipcond.data.counterfactual import format_kind_weights
from clipcond.evaluation.probes import (
    GENERATOR_KINDS,
    PROBE_FIELD,
    MinimalPair,
    clip_scorer,
    pair_images,
    run_pair_probes,
)
from clipcond.plots import image_grid, interval_bars_image
from clipcond.storage import save_image_atomic, write_json_atomic, write_text_atomic

GROUP_NAMES = {"seen": "seen", "heldout": "held-out", "all": "all"}
GENERATOR_NAMES = {"stable_diffusion": "Stable Diffusion path", "dalle2": "DALL-E 2 path (prior + decoder)"}
JSON_NAME = "probes.json"
MARKDOWN_NAME = "probes.md"
EXAMPLES_NAME = "examples.png"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _row(name: str, stat: dict, extra: str | None = None) -> str:
    cells = [
        name,
        _pct(stat["accuracy"]),
        f"[{_pct(stat['low'])}, {_pct(stat['high'])}]",
        _pct(stat["chance"]),
        str(stat["n"]),
        stat.get("versus_chance") or "-",
    ]
    if extra is not None:
        cells.append(extra)
    return "| " + " | ".join(cells) + " |"


_HEADER = "| {} | accuracy | 95% interval | chance | n | vs chance |{}\n|---|---|---|---|---|---|{}"


def _header(first: str, extra: str | None = None) -> str:
    return _HEADER.format(first, f" {extra} |" if extra else "", "---|" if extra else "")


def _groups(figures: dict) -> list[str]:
    return [g for g in ("seen", "heldout", "all") if g in figures]


def clip_recipe(clip_path: str | os.PathLike) -> dict:
    """How the probed CLIP was trained, from its run record: {"run_record": whether it has one (a Hub or other
    CLIPModel folder has none), "hard_negatives" and "counterfactual_pairs": the kinds of `--hard-negatives` and
    of `--counterfactual-pairs`, each None when not used (both None: the plain recipe), "counterfactual_weight":
    the twins' `--counterfactual-weight` (0 for twins from before it, None without twins), and
    "counterfactual_kind_weights": their `--counterfactual-kind-weights` ({kind: weight}; None where not given)}."""
    from clipcond.runs import RunRecord

    record = RunRecord.read_if_present(clip_path)
    negatives = None if record is None else record.hard_negatives
    twins = None if record is None else record.counterfactual_pairs
    return {
        "run_record": record is not None,
        "hard_negatives": None if negatives is None else negatives["kinds"],
        "counterfactual_pairs": None if twins is None else twins["kinds"],
        "counterfactual_weight": None if twins is None else twins["weight"],
        "counterfactual_kind_weights": None if twins is None else twins["kind_weights"] or None,
    }


def recipe_name(recipe: dict | None) -> str:
    """ "the plain CLIP recipe", "the CLIP trained with --hard-negatives K [and --counterfactual-pairs P
    [--counterfactual-weight W] [--counterfactual-kind-weights KIND=W]]", or "the CLIP" when unknown."""
    if not recipe or not recipe.get("run_record"):
        return "the CLIP"
    options = [
        f"--{name.replace('_', '-')} {','.join(recipe[name])}"
        for name in ("hard_negatives", "counterfactual_pairs")
        if recipe.get(name)
    ]
    if recipe.get("counterfactual_weight"):
        options[-1] += f" --counterfactual-weight {recipe['counterfactual_weight']:g}"
    if recipe.get("counterfactual_kind_weights"):
        options[-1] += f" --counterfactual-kind-weights {format_kind_weights(recipe['counterfactual_kind_weights'])}"
    return f"the CLIP trained with {' and '.join(options)}" if options else "the plain CLIP recipe"


def clip_verdict(figures: dict, recipe: dict | None = None) -> str:
    """One sentence on where the binding and relation probes stand against chance (over all their pairs), naming the
    CLIP's recipe (`clip_recipe`)."""
    parts = []
    for probe in ("binding", "relation"):
        stat = (figures.get(probe) or {}).get("all")
        if stat is not None:
            where = {"at": "at chance (its interval holds 50%)", "above": "above chance", "below": "below chance"}
            parts.append(f"{probe} {_pct(stat['accuracy'])}, {where[stat['versus_chance']]}")
    name = recipe_name(recipe)
    return (name[:1].upper() + name[1:] + ": " + "; ".join(parts) + ".") if parts else ""


def markdown_tables(report: dict, heading: str = "##") -> str:
    """The tables of a probe report (`clipcond probe`'s JSON) as markdown, under headings of level `heading`."""
    lines: list[str] = []
    clip = report.get("clip") or {}
    if clip:
        lines += [
            f"{heading} CLIP zero-shot minimal pairs",
            "",
            "An image and two captions that differ in one field only; right when the image embedding is closer to "
            "the right caption (chance 50%; a tie counts one half).",
            "",
        ]
        verdict = clip_verdict(clip, report.get("clip_recipe"))
        if verdict:
            lines += [verdict, ""]
        for probe, figures in clip.items():
            example = (report.get("examples") or {}).get(probe)
            lines.append(f"**{probe}**" + (f" ({example[0]!r} vs {example[1]!r})" if example else ""))
            lines += ["", _header("group")]
            lines += [_row(GROUP_NAMES[g], figures[g]) for g in _groups(figures)]
            lines.append("")
    reader = report.get("reader")
    for key, generator in (report.get("generators") or {}).items():
        lines += [
            f"{heading} {GENERATOR_NAMES.get(key, key)}: prompts judged by the scene reader",
            "",
            "Chance: a prompt-blind generator (renders of other prompts of the same kind, read against the prompt). "
            "Reader: the scene reader's accuracy on renders of the same prompts (the ceiling of every figure).",
            "",
        ]
        for kind, fields in generator.items():
            lines += [f"**{kind} prompts**", "", _header("field (group)", "reader on renders")]
            for field_name, figures in fields.items():
                reader_stat = ((reader or {}).get("accuracy", {}).get(kind, {}).get(field_name) or {}).get("all")
                for g in _groups(figures):
                    lines.append(
                        _row(
                            f"{field_name} ({GROUP_NAMES[g]})",
                            figures[g],
                            _pct(reader_stat and reader_stat["accuracy"]),
                        )
                    )
            lines.append("")
    captioner = report.get("captioner")
    if captioner:
        best_of = (report.get("settings") or {}).get("captioner_best_of") or 1
        which = "greedy captions" if best_of == 1 else f"captions, each the best of {best_of} candidates"
        lines += [f"{heading} Captioner: fields read back from its {which}", "", "Chance 50%.", ""]
        for probe, figures in captioner.items():
            lines += [f"**{probe}** ({PROBE_FIELD[probe]})", "", _header("group")]
            lines += [_row(GROUP_NAMES[g], figures[g]) for g in _groups(figures)]
            lines.append("")
    for note in report.get("notes") or []:
        lines.append(f"- {note}")
    return "\n".join(lines).rstrip() + "\n"


def _bars(title: str, named: Sequence[tuple[str, dict]]) -> object:
    return interval_bars_image(
        [name for name, _ in named],
        [s["accuracy"] for _, s in named],
        [s["low"] for _, s in named],
        [s["high"] for _, s in named],
        chance=[s["chance"] for _, s in named],
        title=title,
    )


def write_figures(report: dict, output_dir: str | os.PathLike) -> list[Path]:
    """A bar chart (accuracy, 95% interval, chance as a dashed line) per CLIP probe, per generator and for the
    captioner; returns their paths."""
    out = Path(output_dir)
    paths = []
    for probe, figures in (report.get("clip") or {}).items():
        named = [(GROUP_NAMES[g], figures[g]) for g in _groups(figures)]
        paths.append(out / f"clip_{probe}.png")
        save_image_atomic(_bars(f"CLIP {probe}", named), paths[-1])
    for key, generator in (report.get("generators") or {}).items():
        named = [
            (f"{kind} {field_name}", figures["all"])
            for kind in GENERATOR_KINDS
            for field_name, figures in (generator.get(kind) or {}).items()
        ]
        if named:
            paths.append(out / f"generator_{key}.png")
            save_image_atomic(_bars(GENERATOR_NAMES.get(key, key), named), paths[-1])
    captioner = report.get("captioner")
    if captioner:
        paths.append(out / "captioner.png")
        bars = _bars("captioner", [(probe, figures["all"]) for probe, figures in captioner.items()])
        save_image_atomic(bars, paths[-1])
    return paths


def write_examples(
    pairs_by_probe: dict[str, list[MinimalPair]],
    outcomes: dict[str, torch.Tensor],
    resolution: int,
    path: str | os.PathLike,
    per_probe: int = 4,
) -> Path:
    """A grid of the first pairs of each probe (a row per probe), each labelled with its two captions and whether the
    CLIP chose the right one."""
    images, labels = [], []
    probes = [p for p in pairs_by_probe if pairs_by_probe[p]]
    for probe in probes:
        chosen = pairs_by_probe[probe][:per_probe]
        tiles = pair_images(chosen, resolution)
        for i, pair in enumerate(chosen):
            images.append(_to_pil(tiles[i]))
            verdict = {1.0: "CLIP right", 0.0: "CLIP wrong", 0.5: "tie"}.get(float(outcomes[probe][i]), "")
            labels.append(f"{verdict}: {pair.right} / not: {pair.wrong}")
    grid = image_grid(images, rows=len(probes), cols=per_probe, labels=labels, min_tile=128, max_label_lines=4)
    return save_image_atomic(grid, path)


def clip_probes(clip_run, pairs_by_probe: dict[str, list[MinimalPair]], resolution: int, output_dir) -> dict:
    """The CLIP's choices on the minimal pairs: {"examples": a pair of captions per probe, "clip": the figures per
    probe (`run_pair_probes`), "clip_recipe": how it was trained (`clip_recipe`)}, with the example grid written to OUTPUT_DIR/examples.png."""
    figures, outcomes = run_pair_probes(clip_scorer(clip_run), pairs_by_probe, resolution)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    write_examples(pairs_by_probe, outcomes, resolution, Path(output_dir) / EXAMPLES_NAME)
    examples = {probe: [pairs[0].right, pairs[0].wrong] for probe, pairs in pairs_by_probe.items() if pairs}
    return {"examples": examples, "clip": figures, "clip_recipe": clip_recipe(clip_run.path)}


def clip_content_hash(clip_path: str | os.PathLike) -> str:
    """The probed CLIP's content hash: its run record's, or hashed from its files where it has none."""
    from clipcond.lineage import content_hash
    from clipcond.runs import RunRecord

    record = RunRecord.read_if_present(clip_path)
    return (record is not None and record.content_hash) or content_hash(clip_path)


def minimal_pairs(
    data: str | os.PathLike,
    num_pairs: int,
    seed: int,
    held_out: Sequence[str],
    source: str = "render",
    split: str = "test",
) -> dict[str, list[MinimalPair]]:
    """{probe: its minimal pairs}, rendered by the shapes generator (`source="render"`) or read from the metadata of
    DATA/`split` (`source="metadata"`)."""
    from clipcond.evaluation import probes

    if source == "render":
        return {p: probes.build_pairs(p, num_pairs, held_out=held_out, seed=seed) for p in probes.PROBES}
    folder = Path(data) / split
    pairs = {p: probes.pairs_from_metadata(folder, p, num_pairs, held_out=held_out, seed=seed) for p in probes.PROBES}
    if not any(pairs.values()):
        raise ValueError(
            f"`--split` {split!r} of `--data` {str(data)!r}: no metadata row carries the shapes fields "
            "(objects with colour, shape, size, position; relation)"
        )
    return pairs


def run_clip_probes(
    clip_run: str | os.PathLike,
    data: str | os.PathLike,
    output_dir: str | os.PathLike,
    num_pairs: int,
    seed: int,
    *,
    source: str = "render",
    split: str = "test",
    device=None,
) -> tuple[dict, dict[str, list[MinimalPair]]]:
    """The CLIP part of a probe report, shared by `clipcond probe` and `clipcond demo`: the minimal pairs of the
    shapes data in `data` (`minimal_pairs`), the CLIP's choices (`clip_probes`, the example grid written to
    `output_dir`) and the settings, with the CLIP's content hash (`current_clip_probes` compares it). Returns the
    report (not written: the caller adds its sections, then `write_report`) and the pairs."""
    from clipcond.data.shapes import load_dataset_info
    from clipcond.models.clip import load_clip

    info = load_dataset_info(data) or {}
    held_out = list(info.get("held_out") or [])
    resolution = int(info.get("resolution") or 0)
    pairs = minimal_pairs(data, num_pairs, seed, held_out, source, split)
    loaded = load_clip(clip_run, device=device or "cpu", progress=False, what="--clip")
    settings = {
        "clip": str(clip_run),
        "clip_content_hash": clip_content_hash(clip_run),
        "data": str(data),
        "source": source,
        "num_pairs": num_pairs,
        "seed": seed,
        "held_out": held_out,
    }
    return {"settings": settings, **clip_probes(loaded, pairs, resolution, output_dir)}, pairs


def current_clip_probes(
    output_dir: str | os.PathLike, clip_run: str | os.PathLike, num_pairs: int, seed: int
) -> dict | None:
    """The probe report in `output_dir` when it is of this CLIP (same content hash) with these pairs, else None: a
    CLIP retrained in the same folder makes an earlier report stale."""
    path = Path(output_dir) / JSON_NAME
    if not path.is_file():
        return None
    report = json.loads(path.read_text(encoding="utf-8"))
    settings = report.get("settings") or {}
    wanted = {"clip_content_hash": clip_content_hash(clip_run), "num_pairs": num_pairs, "seed": seed}
    return report if all(settings.get(key) == value for key, value in wanted.items()) else None


def _to_pil(image: torch.Tensor):
    from PIL import Image

    return Image.fromarray(image.permute(1, 2, 0).numpy())


def write_report(report: dict, output_dir: str | os.PathLike, title: str = "clipcond probe") -> list[Path]:
    """probes.json, probes.md and the figures; returns the paths written. probes.json is written last: its presence
    marks a complete report."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = write_figures(report, out)
    markdown = [f"# {title}", "", markdown_tables(report)]
    if figures:
        markdown += ["Figures: " + ", ".join(f"[{p.name}]({p.name})" for p in figures)]
    if (out / EXAMPLES_NAME).is_file():
        markdown += ["", f"![example pairs]({EXAMPLES_NAME})"]
    write_text_atomic(out / MARKDOWN_NAME, "\n".join(markdown) + "\n")
    write_json_atomic(out / JSON_NAME, report)
    return [out / JSON_NAME, out / MARKDOWN_NAME, *figures]
