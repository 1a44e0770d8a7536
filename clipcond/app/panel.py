"""The page's words about what it serves: the header line (`serving_line`) and the Runs tab (`run_panel`: each run's
record and lineage, the index, the device, and a demo's report with its figures, `demo_report`).
"""

from __future__ import annotations

import re
from pathlib import Path

from clipcond.app.checks import IMAGE_SUFFIXES
from clipcond.app.runs import ServedRuns


def run_panel(runs: ServedRuns) -> str:
    """Markdown: each run served (folder, kind, its own content hash for a CLIP, the encoder it was trained on by
    content hash, steps and final loss), the index, the device; then the demo's report when there is one."""
    lines = [
        "| part | folder | kind | content hash | trained on | steps | final loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for part, record in runs.records().items():
        lineage = record.lineage
        trained_on = f"{lineage.kind} {_hash(lineage.content_hash)}" if lineage else ""
        lines.append(
            f"| {part} | `{getattr(runs.paths, part)}` | {record.kind or '?'} | {_hash(record.content_hash)} "
            f"| {trained_on} | {record.summary.get('steps', '')} | {_number(record.summary.get('final_loss'))} |"
        )
    if runs.index is not None:
        where = runs.paths.index or f"{runs.paths.test_images} (built in memory)"
        lines.append(f"\nSearch index: `{where}`, {len(runs.index)} images.")
    lines.append(
        f"\nDevice: `{runs.device}`, weights in {runs.dtype}; each request's files under `{runs.output_dir}`."
    )
    report = demo_report(runs)
    if report is not None:
        lines += ["", "---", "", report[0]]
    return "\n".join(lines)


def serving_line(runs: ServedRuns) -> str:
    """One line of Markdown: what the page serves (the Runs tab has the details)."""
    parts = []
    if runs.text_to_image is not None:
        parts.append(f"the Stable Diffusion path (`{runs.paths.text_to_image}`)")
    if runs.unclip is not None:
        parts.append(f"the DALL-E 2 path (prior `{runs.paths.prior or runs.paths.image_decoder}`)")
    if runs.variation is not None:
        parts.append(f"variations (`{runs.paths.image_decoder}`)")
    if runs.index is not None:
        parts.append(f"search over {len(runs.index)} images")
    if runs.captioner is not None:
        parts.append(f"captions (`{runs.paths.captioner}`)")
    origin = f" from the demo folder `{runs.paths.demo}`" if runs.paths.demo is not None else ""
    return f"Serving {', '.join(parts)}{origin}; the Runs tab says which runs these are."


def demo_report(runs: ServedRuns) -> tuple[str, list[Path]] | None:
    """The demo folder's report.md with its figures linked where the page serves files, and those figures: images
    inside the demo folder, the only files of it besides its test images that the page may send (a link elsewhere,
    or to a non-image, is left unserved). None without a report."""
    if runs.paths.demo is None or not (runs.paths.demo / "report.md").is_file():
        return None
    root, figures = runs.paths.demo.resolve(), []

    def served_link(match: re.Match) -> str:
        figure = (root / match.group(2)).resolve()
        if not (figure.is_file() and figure.is_relative_to(root) and figure.suffix.lower() in IMAGE_SUFFIXES):
            return match.group(0)  # a link to no image of the demo folder stays as it is, unserved
        figures.append(figure)
        return f"![{match.group(1)}](/gradio_api/file={figure})"

    text = (runs.paths.demo / "report.md").read_text(encoding="utf-8")
    return re.sub(r"!\[([^\]]*)\]\(([^)\s]+)\)", served_link, text), figures


def _hash(value: str | None) -> str:
    return f"`{value[:12]}`" if value else ""


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else ""
