"""What each tab of `clipcond serve` does with a request: plain functions of the served runs and the request's
values, so that they are tested without a browser. Bad input raises `RequestError`, whose message the page shows;
nothing here knows about Gradio.

Images are drawn by the same code as the commands (`clipcond.drawing`), with a generator per image seeded with
`seed + k`, so that the images and the `images.jsonl` records match those of `clipcond generate` / `clipcond vary`
with the same flags, and each image can be drawn again from the command line.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from clipcond.app.runs import ServedRuns
from clipcond.drawing import generate_batches, interpolation_row, vary_batches
from clipcond.image_files import ImageWriter, read_images
from clipcond.pipeline_loading import DEFAULT_SAMPLER, SCHEDULER_NAMES
from clipcond.sampling_options import add_prior_args

# Limits of one request: a page is shared, and one request holds the queue.
MAX_IMAGES = 16
MAX_STEPS = 250
MAX_FRAMES = 16
MAX_TOP_K = 50
MAX_COMPARE_CELLS = 24
MAX_GUIDANCE = 50.0
MAX_UPLOAD_BYTES = 25 * 2**20
MAX_UPLOAD_PIXELS = 4096 * 4096
CAPTION_TOKENS = 32  # `clipcond caption`'s default --max-new-tokens
MAX_NEW_TOKENS = 256
SAVED_SCHEDULER = "saved"  # the scheduler choice that keeps the run's own
DEFAULT_SCHEDULER = DEFAULT_SAMPLER  # what the page draws with until told otherwise
STABLE_DIFFUSION, DALLE2 = "Stable Diffusion path", "DALL-E 2 path (prior)"

Progress = Callable[[int, int], None]


class RequestError(ValueError):
    """A request the page cannot draw: the message says which field and what it got."""


@dataclass
class Drawn:
    """What a request drew: the images, their records, and the folder holding the PNGs, images.jsonl and grid.png."""

    images: list
    records: list[dict]
    folder: Path
    labels: list[str] = field(default_factory=list)

    @property
    def files(self) -> list[Path]:
        """The files to download: each PNG, then images.jsonl."""
        return [self.folder / r["file_name"] for r in self.records] + [self.folder / "images.jsonl"]


# --------------------------------------------------------------------------------------------------- checking input


def whole_number(name: str, value, low: int, high: int) -> int:
    """`value` (a page's number field: int, float or None) as an int in [low, high]."""
    if value is None or isinstance(value, bool) or not float(value).is_integer() or not low <= value <= high:
        raise RequestError(f"`{name}` must be a whole number from {low} to {high}, got {value!r}")
    return int(value)


def guidance(name: str, value) -> float:
    if value is None or not math.isfinite(float(value)) or not 0 <= float(value) <= MAX_GUIDANCE:
        raise RequestError(f"`{name}` must be a number from 0 to {MAX_GUIDANCE:g}, got {value!r}")
    return float(value)


def prompt_text(name: str, value: str | None) -> str:
    text = (value or "").strip()
    if not text:
        raise RequestError(f"`{name}` is empty: type what to draw, e.g. 'a red circle'")
    return text


def scheduler_choice(value: str | None) -> str | None:
    """None for the run's own scheduler, else a `--scheduler` name."""
    if value in (None, "", SAVED_SCHEDULER):
        return None
    if value not in SCHEDULER_NAMES:
        raise RequestError(f"`scheduler` must be {SAVED_SCHEDULER!r} or one of {list(SCHEDULER_NAMES)}, got {value!r}")
    return value


def read_upload(name: str, path: str | os.PathLike | None):
    """An uploaded file as an RGB PIL image; refuses a missing, oversized or undecodable file by name."""
    from PIL import Image

    if path is None or not os.path.isfile(path):
        raise RequestError(f"`{name}`: upload an image (PNG, JPEG, WebP) or pick one")
    label = os.path.basename(path)
    size = os.path.getsize(path)
    if size > MAX_UPLOAD_BYTES:
        raise RequestError(f"`{name}` {label!r} is {size / 2**20:.1f} MiB; the limit is {MAX_UPLOAD_BYTES >> 20} MiB")
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, Image.DecompressionBombError) as err:
        raise RequestError(f"`{name}` {label!r} cannot be read as an image ({err})") from None
    if width * height > MAX_UPLOAD_PIXELS:
        raise RequestError(f"`{name}` {label!r} is {width}x{height} pixels; the limit is {MAX_UPLOAD_PIXELS:,} pixels")
    try:
        return read_images([os.fspath(path)], what=f"`{name}`")[0]
    except ValueError as err:
        raise RequestError(str(err)) from None


def _request(runs: ServedRuns, **values) -> argparse.Namespace:
    """The flags a command would have parsed for this request: the prior's defaults, then `values`."""
    parser = argparse.ArgumentParser(add_help=False)
    add_prior_args(parser)
    args = parser.parse_args([])
    args.prior = None if runs.paths.prior is None else os.fspath(runs.paths.prior)
    args.dtype, args.batch_size = runs.dtype, 8
    for name, value in values.items():
        setattr(args, name, value)
    return args


@contextmanager
def _scheduler(pipe, name: str | None):
    """`pipe` sampling with the scheduler `name` (None: its own) for the length of a request."""
    from clipcond.pipelines.text_to_image import scheduler_from_name

    saved = pipe.scheduler
    if name is not None:
        pipe.scheduler = scheduler_from_name(name, saved.config)
    try:
        yield pipe
    finally:
        pipe.scheduler = saved


# --------------------------------------------------------------------------------------------------------- the tabs


def text_pipeline(runs: ServedRuns, path: str):
    """The pipeline of `path` (`STABLE_DIFFUSION` or `DALLE2`) and its `--model` folder."""
    if path == DALLE2 and runs.unclip is not None:
        return runs.unclip, runs.paths.image_decoder
    if path == STABLE_DIFFUSION and runs.text_to_image is not None:
        return runs.text_to_image, runs.paths.text_to_image
    raise RequestError(f"`path` {path!r} is not served here; choose one of {text_paths(runs)}")


def text_paths(runs: ServedRuns) -> list[str]:
    """The text-to-image paths the runs allow."""
    return [p for p, pipe in ((STABLE_DIFFUSION, runs.text_to_image), (DALLE2, runs.unclip)) if pipe is not None]


def generate(
    runs: ServedRuns,
    path: str,
    prompt: str,
    negative_prompt: str | None = None,
    seed=0,
    num_images=4,
    guidance_scale=None,
    scheduler: str | None = None,
    steps=25,
    progress: Progress | None = None,
) -> Drawn:
    """`num_images` images of `prompt`, as `clipcond generate --prompt PROMPT --seed SEED` draws them."""
    pipe, model = text_pipeline(runs, path)
    args = _request(
        runs,
        model=os.fspath(model),
        negative_prompt=(negative_prompt or "").strip() or None,
        seed=whole_number("seed", seed, 0, 2**31 - 1),
        num_images=whole_number("images", num_images, 1, MAX_IMAGES),
        num_inference_steps=whole_number("steps", steps, 1, MAX_STEPS),
        guidance_scale=None if guidance_scale is None else guidance("guidance scale", guidance_scale),
    )
    if pipe is not runs.unclip:
        args.prior = None  # the Stable Diffusion path's records name no prior
    prompt = prompt_text("prompt", prompt)
    writer = ImageWriter(runs.request_folder("generate"))
    with _scheduler(pipe, scheduler_choice(scheduler)) as pipe:
        for images, records in generate_batches(pipe, [prompt], args, progress):
            writer.add(images, records)
    labels = [f"seed {r['seed']}" for r in writer.records]
    writer.finish(grid_rows=1, labels=labels)
    return Drawn(writer.images, writer.records, writer.output_dir, labels)


def vary(
    runs: ServedRuns,
    image_path: str | None,
    seed=0,
    num_images=4,
    guidance_scale=None,
    steps=25,
    scheduler: str | None = None,
    progress: Progress | None = None,
) -> Drawn:
    """`num_images` variations of the image, as `clipcond vary IMAGE --seed SEED` draws them; the source first."""
    if runs.variation is None:
        raise RequestError("no image-embedding decoder is served: start with `--model` such a decoder run")
    source = read_upload("image", image_path)
    args = _request(
        runs,
        model=os.fspath(runs.paths.image_decoder),
        images=[os.path.basename(image_path)],
        seed=whole_number("seed", seed, 0, 2**31 - 1),
        num_images=whole_number("images", num_images, 1, MAX_IMAGES),
        num_inference_steps=whole_number("steps", steps, 1, MAX_STEPS),
        guidance_scale=_image_guidance(guidance_scale),
    )
    writer = ImageWriter(runs.request_folder("vary"))
    with _scheduler(runs.variation, scheduler_choice(scheduler)) as pipe:
        for images, records in vary_batches(pipe, [source], args, progress):
            writer.add(images, records)
    size = writer.images[0].size
    labels = ["source", *(f"seed {r['seed']}" for r in writer.records)]
    writer.finish(grid_rows=1, labels=labels, grid_images=[source.resize(size), *writer.images])
    return Drawn([source.resize(size), *writer.images], writer.records, writer.output_dir, labels)


def _image_guidance(value) -> float:
    from clipcond.pipelines.inputs import DEFAULT_IMAGE_EMBEDDING_GUIDANCE_SCALE

    return DEFAULT_IMAGE_EMBEDDING_GUIDANCE_SCALE if value is None else guidance("guidance scale", value)


def interpolate(
    runs: ServedRuns,
    prompt_a: str | None = None,
    prompt_b: str | None = None,
    image_a: str | None = None,
    image_b: str | None = None,
    frames=8,
    seed=0,
    guidance_scale=None,
    steps=25,
    scheduler: str | None = None,
) -> Drawn:
    """A row between two prompts (through the prior) or, when both images are given, two images: as `clipcond
    interpolate` draws it."""
    if runs.variation is None:
        raise RequestError("no image-embedding decoder is served: start with `--model` such a decoder run")
    use_images = image_a is not None or image_b is not None
    if use_images:
        sources = [read_upload("first image", image_a), read_upload("second image", image_b)]
        ends = {"prompts": None, "images": [os.path.basename(image_a), os.path.basename(image_b)]}
    else:
        if runs.unclip is None:
            raise RequestError("a row between prompts needs a prior (`--prior`); upload two images instead")
        sources = None
        prompts = [prompt_text("first prompt", prompt_a), prompt_text("second prompt", prompt_b)]
        ends = {"prompts": prompts, "images": None}
    args = _request(
        runs,
        model=os.fspath(runs.paths.image_decoder),
        steps=whole_number("frames", frames, 2, MAX_FRAMES),
        seed=whole_number("seed", seed, 0, 2**31 - 1),
        num_inference_steps=whole_number("steps", steps, 1, MAX_STEPS),
        guidance_scale=_image_guidance(guidance_scale),
        negative_prompt=None,
        **ends,
    )
    with _scheduler(runs.variation if use_images else runs.unclip, scheduler_choice(scheduler)) as pipe:
        images, records, labels = interpolation_row(pipe, args, sources)
    writer = ImageWriter(runs.request_folder("interpolate"))
    writer.add(images, records)
    writer.finish(grid_rows=1, labels=labels)
    return Drawn(images, records, writer.output_dir, labels)


@dataclass
class Found:
    """One search result: the image file, its rank and cosine similarity to the query."""

    path: str
    rank: int
    score: float

    @property
    def label(self) -> str:
        return f"#{self.rank}  {self.score:.3f}  {os.path.basename(self.path)}"


def search(runs: ServedRuns, text: str | None = None, image_path: str | None = None, top_k=8) -> list[Found]:
    """The `top_k` images of the index closest to the text, or to the image when one is given."""
    from clipcond.index_queries import embed_image_query, embed_text

    if runs.index is None:
        raise RequestError("no index is served: start with `--index INDEX` (written by `clipcond index`)")
    top_k = whole_number("top-k", top_k, 1, MAX_TOP_K)
    if image_path is not None:
        read_upload("image", image_path)  # a clear message before the CLIP reads it
        query = embed_image_query(runs.clip_run, image_path, what="image")
    else:
        query = embed_text(runs.clip_run, prompt_text("query", text))
    root = Path(runs.index.root)
    return [Found(os.fspath(root / r.path), r.rank, r.score) for r in runs.index.search(query, top_k=top_k)]


def caption(
    runs: ServedRuns,
    image_path: str | None,
    question: str | None = None,
    do_sample=False,
    temperature=1.0,
    seed=0,
    max_new_tokens=CAPTION_TOKENS,
) -> str:
    """The captioner's caption of the image, or its answer to `question` when one is asked (as `clipcond caption`
    and `clipcond ask` write them)."""
    import torch

    if runs.captioner is None:
        raise RequestError("no captioner is served: start with `--captioner CAP`")
    image = read_upload("image", image_path)
    if do_sample and not (temperature is not None and math.isfinite(temperature) and temperature > 0):
        raise RequestError(f"`temperature` must be > 0, got {temperature!r}")
    max_new_tokens = whole_number("max new tokens", max_new_tokens, 1, MAX_NEW_TOKENS)
    generator = torch.Generator(device=runs.captioner.device).manual_seed(whole_number("seed", seed, 0, 2**31 - 1))
    try:
        text = runs.captioner.generate(
            [image],
            (question or "").strip() or None,
            max_new_tokens=max_new_tokens,
            do_sample=bool(do_sample),
            temperature=float(temperature or 1.0),
            generator=generator,
        )
    except ValueError as err:  # more tokens than the language model has positions for
        raise RequestError(str(err).replace("`max_new_tokens`", "`max new tokens`")) from None
    return text[0]


def parse_numbers(name: str, text: str | None) -> list[float]:
    """'1, 3, 5' -> [1.0, 3.0, 5.0]: the guidance scales to compare."""
    try:
        values = [float(part) for part in (text or "").replace(";", ",").split(",") if part.strip()]
    except ValueError:
        raise RequestError(f"`{name}` must be numbers separated by commas, e.g. '1, 3, 5', got {text!r}") from None
    if not values:
        raise RequestError(f"`{name}` is empty: give numbers separated by commas, e.g. '1, 3, 5'")
    return [guidance(name, v) for v in values]


def compare(
    runs: ServedRuns,
    path: str,
    prompt: str,
    seed=0,
    guidance_scales: str = "1, 3, 5",
    schedulers: Sequence[str] = (SAVED_SCHEDULER,),
    steps=25,
    progress: Progress | None = None,
):
    """One image of `prompt` with `seed` for every scheduler (rows) and guidance scale (columns), labelled: the
    labelled grid and the cells' records."""
    from clipcond.plots import image_grid

    scales = parse_numbers("guidance scales", guidance_scales)
    schedulers = list(schedulers or [SAVED_SCHEDULER])
    for name in schedulers:
        scheduler_choice(name)
    if len(scales) * len(schedulers) > MAX_COMPARE_CELLS:
        raise RequestError(
            f"{len(schedulers)} schedulers x {len(scales)} guidance scales is {len(scales) * len(schedulers)} "
            f"images; the limit is {MAX_COMPARE_CELLS}"
        )
    cells, labels, records = [], [], []
    for name in schedulers:
        for scale in scales:
            drawn = generate(
                runs, path, prompt, seed=seed, num_images=1, guidance_scale=scale, scheduler=name, steps=steps
            )
            cells += drawn.images
            records += drawn.records
            labels.append(f"{drawn.records[0]['scheduler']}, guidance {scale:g}")
            if progress is not None:
                progress(len(cells), len(scales) * len(schedulers))
    return image_grid(cells, rows=len(schedulers), cols=len(scales), labels=labels), records


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
            f"| {part} | `{runs.paths.items_dict()[part]}` | {record.kind or '?'} | {_hash(record.content_hash)} "
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
    """The demo folder's report.md with its figures linked where the page serves files, and those figures (the
    only files of the demo folder besides its test images that the page may send); None without a report."""
    if runs.paths.demo is None or not (runs.paths.demo / "report.md").is_file():
        return None
    figures = []

    def served_link(match: re.Match) -> str:
        figure = (runs.paths.demo / match.group(2)).resolve()
        if not figure.is_file():
            return match.group(0)
        figures.append(figure)
        return f"![{match.group(1)}](/gradio_api/file={figure})"

    text = (runs.paths.demo / "report.md").read_text(encoding="utf-8")
    return re.sub(r"!\[([^\]]*)\]\(([^)\s]+)\)", served_link, text), figures


def _hash(value: str | None) -> str:
    return f"`{value[:12]}`" if value else ""


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else ""
