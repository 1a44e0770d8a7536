"""What each tab of `clipcond serve` does with a request: plain functions of the served runs and the request's
values (keyword arguments named after the page's fields), so that they are tested without a browser. Bad input
raises `RequestError` (`clipcond.app.checks`), whose message the page shows; nothing here knows about Gradio.

Images are drawn by the same code as the commands (`clipcond.drawing`), with a generator per image seeded with
`seed + k`, so that the images and the `images.jsonl` records match those of `clipcond generate`, `vary` and
`interpolate` with the same flags, and each image can be drawn again from the command line. Requests that use a
model hold `runs.lock`: one at a time, whatever the web server's threads do.
"""

from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from clipcond.app.checks import (
    RequestError,
    check_upload,
    guidance,
    numbers,
    prompt_text,
    read_upload,
    scheduler_choice,
    whole_number,
)
from clipcond.app.runs import ServedRuns
from clipcond.drawing import generate_batches, interpolation_row, vary_batches
from clipcond.image_files import ImageWriter
from clipcond.pipeline_loading import DEFAULT_SAMPLER, use_scheduler
from clipcond.sampling_options import add_prior_args

# Limits of one request: a page is shared, and one request holds the models.
MAX_IMAGES = 16
MAX_STEPS = 250
MAX_FRAMES = 16
MAX_TOP_K = 50
MAX_COMPARE_CELLS = 24
MAX_SEED = 2**31 - 1
CAPTION_TOKENS = 32  # `clipcond caption`'s default --max-new-tokens
MAX_NEW_TOKENS = 256
STABLE_DIFFUSION, DALLE2 = "Stable Diffusion path", "DALL-E 2 path (prior)"

Progress = Callable[[int, int], None]


@dataclass
class Drawn:
    """What a request drew: the images, their records and labels, and the folder that holds the PNGs, images.jsonl
    and grid.png; `source`: the image varied, at the output size (Vary)."""

    images: list
    records: list[dict]
    folder: Path
    labels: list[str] = field(default_factory=list)
    source: object | None = None

    @property
    def files(self) -> list[Path]:
        """The files to download: each PNG, then images.jsonl and grid.png."""
        return [self.folder / r["file_name"] for r in self.records] + [self.folder / "images.jsonl", self.grid]

    @property
    def grid(self) -> Path:
        return self.folder / "grid.png"


def _request(runs: ServedRuns, **values) -> argparse.Namespace:
    """The flags a command would have parsed for this request: the prior's defaults, then `values`."""
    parser = argparse.ArgumentParser(add_help=False)
    add_prior_args(parser)
    args = parser.parse_args([])
    args.prior = None if runs.paths.prior is None else os.fspath(runs.paths.prior)
    args.dtype, args.batch_size = runs.dtype, 16  # `clipcond generate` / `vary`'s --batch-size
    for name, value in values.items():
        setattr(args, name, value)
    return args


@contextmanager
def _request_folder(runs: ServedRuns, kind: str) -> Iterator[Path]:
    """A new folder for one request's files (`ServedRuns.request_folder`), removed with what it holds if the request
    fails: the page lists the output folder, where a failed request would leave an empty or half-written one."""
    folder = runs.request_folder(kind)
    folder.mkdir(parents=True)
    try:
        yield folder
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


@contextmanager
def _scheduler(pipe, name: str | None):
    """`pipe` sampling with the scheduler `name` (None: its own) for the length of a request (under `runs.lock`)."""
    saved = pipe.scheduler
    use_scheduler(pipe, name)
    try:
        yield pipe
    finally:
        pipe.scheduler = saved


def _sampling(*, seed, steps) -> dict:
    return {
        "seed": whole_number("seed", seed, 0, MAX_SEED),
        "num_inference_steps": whole_number("steps", steps, 1, MAX_STEPS),
    }


# ------------------------------------------------------------------------------------------------- text to image


def text_paths(runs: ServedRuns) -> list[str]:
    """The text-to-image paths the runs allow."""
    return [p for p, pipe in ((STABLE_DIFFUSION, runs.text_to_image), (DALLE2, runs.unclip)) if pipe is not None]


def _text_request(runs: ServedRuns, path: str, **values):
    """The pipeline of `path` (`STABLE_DIFFUSION` or `DALLE2`) and the flags of `clipcond generate --model` it."""
    if path == DALLE2 and runs.unclip is not None:
        return runs.unclip, _request(runs, model=os.fspath(runs.paths.image_decoder), **values)
    if path == STABLE_DIFFUSION and runs.text_to_image is not None:
        return runs.text_to_image, _request(runs, model=os.fspath(runs.paths.text_to_image), prior=None, **values)
    raise RequestError(f"`path` {path!r} is not served here; choose one of {text_paths(runs)}")


def generate(
    runs: ServedRuns,
    *,
    path: str,
    prompt: str | None,
    negative_prompt: str | None = None,
    seed=0,
    num_images=4,
    guidance_scale=None,
    scheduler: str | None = DEFAULT_SAMPLER,
    steps=25,
    progress: Progress | None = None,
) -> Drawn:
    """`num_images` images of `prompt`, as `clipcond generate --prompt PROMPT --seed SEED` draws them (`guidance_scale`
    None: the path's default, as the command's)."""
    pipe, args = _text_request(
        runs,
        path,
        negative_prompt=(negative_prompt or "").strip() or None,
        num_images=whole_number("images", num_images, 1, MAX_IMAGES),
        guidance_scale=None if guidance_scale is None else guidance("guidance scale", guidance_scale),
        **_sampling(seed=seed, steps=steps),
    )
    prompt = prompt_text("prompt", prompt)
    name = scheduler_choice(scheduler)
    with _request_folder(runs, "generate") as folder:
        writer = ImageWriter(folder)
        with runs.lock, _scheduler(pipe, name):
            for images, records in generate_batches(pipe, [prompt], args, progress):
                writer.add(images, records)
        labels = [f"seed {r['seed']}" for r in writer.records]
        writer.finish(grid_rows=1, labels=labels)
    return Drawn(writer.images, writer.records, writer.output_dir, labels)


def compare(
    runs: ServedRuns,
    *,
    path: str,
    prompt: str | None,
    seed=0,
    guidance_scales: str = "1, 3, 5",
    schedulers: Sequence[str] = (DEFAULT_SAMPLER,),
    steps=25,
    progress: Progress | None = None,
) -> Drawn:
    """One image of `prompt` with `seed` for every scheduler (grid rows) and guidance scale (columns), each what
    `clipcond generate --scheduler S --guidance-scale G --seed SEED --num-images 1` draws, in one request folder."""
    scales = numbers("guidance scales", guidance_scales)
    names = [scheduler_choice(name) for name in (schedulers or [DEFAULT_SAMPLER])]
    cells = len(scales) * len(names)
    if cells > MAX_COMPARE_CELLS:
        raise RequestError(
            f"{len(names)} schedulers x {len(scales)} guidance scales is {cells} images; the limit is "
            f"{MAX_COMPARE_CELLS}"
        )
    pipe, args = _text_request(runs, path, negative_prompt=None, num_images=1, **_sampling(seed=seed, steps=steps))
    prompt = prompt_text("prompt", prompt)
    with _request_folder(runs, "compare") as folder:
        writer = ImageWriter(folder)
        with runs.lock:
            labels = _draw_cells(pipe, args, prompt, names, scales, writer, progress)
        writer.finish(grid_rows=len(names), labels=labels)
    return Drawn(writer.images, writer.records, writer.output_dir, labels)


def _draw_cells(pipe, args, prompt: str, names, scales, writer: ImageWriter, progress: Progress | None) -> list[str]:
    """`compare`'s images, scheduler by scheduler and guidance scale by scale, added to `writer`; their labels."""
    labels = []
    for name in names:
        for scale in scales:
            args.guidance_scale = scale
            with _scheduler(pipe, name):
                [(images, records)] = list(generate_batches(pipe, [prompt], args))
            writer.add(images, [{**records[0], "file_name": f"{len(writer.records):05d}.png"}])
            labels.append(f"{writer.records[-1]['scheduler']}, guidance {scale:g}")
            if progress is not None:
                progress(len(writer.records), len(names) * len(scales))
    return labels


# ------------------------------------------------------------------------------------- image-embedding decoder


def _image_request(runs: ServedRuns, *, guidance_scale, **values) -> argparse.Namespace:
    """The flags of `clipcond vary` / `interpolate --model` the image-embedding decoder."""
    from clipcond.pipelines.inputs import DEFAULT_IMAGE_EMBEDDING_GUIDANCE_SCALE

    if runs.variation is None:
        raise RequestError("no image-embedding decoder is served: start with `--model` such a decoder run")
    scale = (
        DEFAULT_IMAGE_EMBEDDING_GUIDANCE_SCALE
        if guidance_scale is None
        else guidance("guidance scale", guidance_scale)
    )
    return _request(runs, model=os.fspath(runs.paths.image_decoder), guidance_scale=scale, **values)


def vary(
    runs: ServedRuns,
    *,
    image: str | None,
    seed=0,
    num_images=4,
    guidance_scale=None,
    steps=25,
    scheduler: str | None = DEFAULT_SAMPLER,
    progress: Progress | None = None,
) -> Drawn:
    """`num_images` variations of the image file `image`, as `clipcond vary IMAGE --seed SEED` draws them (the
    records name the file by its name: an upload's server path means nothing to its user)."""
    num_images = whole_number("images", num_images, 1, MAX_IMAGES)
    args = _image_request(
        runs, guidance_scale=guidance_scale, num_images=num_images, **_sampling(seed=seed, steps=steps)
    )
    name = scheduler_choice(scheduler)
    source = read_upload("image", image)
    args.images = [os.path.basename(image)]
    with _request_folder(runs, "vary") as folder:
        writer = ImageWriter(folder)
        with runs.lock, _scheduler(runs.variation, name):
            for images, records in vary_batches(runs.variation, [source], args, progress):
                writer.add(images, records)
        labels = [f"seed {r['seed']}" for r in writer.records]
        source = source.resize(writer.images[0].size)
        writer.finish(grid_rows=1, labels=["source", *labels], grid_images=[source, *writer.images])
    return Drawn(writer.images, writer.records, writer.output_dir, labels, source=source)


def interpolate(
    runs: ServedRuns,
    *,
    prompts: Sequence[str | None] = (None, None),
    images: Sequence[str | None] = (None, None),
    frames=8,
    seed=0,
    guidance_scale=None,
    steps=25,
    scheduler: str | None = DEFAULT_SAMPLER,
    progress: Progress | None = None,
) -> Drawn:
    """A row of `frames` between two prompts (through the prior) or, when an image is given, two image files: as
    `clipcond interpolate --prompts A B` / `--images A B` draws it."""
    use_images = any(image is not None for image in images)
    args = _image_request(
        runs,
        guidance_scale=guidance_scale,
        steps=whole_number("frames", frames, 2, MAX_FRAMES),
        negative_prompt=None,
        **_sampling(seed=seed, steps=steps),
    )
    name = scheduler_choice(scheduler)
    if use_images:
        sources = [read_upload("first image", images[0]), read_upload("second image", images[1])]
        args.prompts, args.images, pipe = None, [os.path.basename(i) for i in images], runs.variation
    else:
        if runs.unclip is None:
            raise RequestError("a row between prompts needs a prior (`--prior`); give two images instead")
        sources, pipe = None, runs.unclip
        args.prompts = [prompt_text("first prompt", prompts[0]), prompt_text("second prompt", prompts[1])]
    with runs.lock, _scheduler(pipe, name):
        row, records, labels = interpolation_row(pipe, args, sources, progress)
    with _request_folder(runs, "interpolate") as folder:
        writer = ImageWriter(folder)
        writer.add(row, records)
        writer.finish(grid_rows=1, labels=labels)
    return Drawn(row, records, writer.output_dir, labels)


# ------------------------------------------------------------------------------------------- search, captions


@dataclass
class Found:
    """One search result: the copy of the image file that the page sends (`path`, in the request's folder), the
    indexed file it copies (`source`), its rank and cosine similarity to the query."""

    path: str
    source: str
    rank: int
    score: float

    @property
    def label(self) -> str:
        return f"#{self.rank}  {self.score:.3f}  {os.path.basename(self.source)}"


def search(runs: ServedRuns, *, text: str | None = None, image: str | None = None, top_k=8) -> list[Found]:
    """The `top_k` images of the index closest to the text or to the image file (one of the two, as `clipcond
    search`), copied into a request folder of their own: the page sends its output folder, not the index's image
    folders (a long list of allowed files would cost the server a path check per indexed file and request)."""
    from clipcond.index_queries import embed_image_query, embed_text

    if runs.index is None:
        raise RequestError("no index is served: start with `--index INDEX` (written by `clipcond index`)")
    top_k = whole_number("top-k", top_k, 1, MAX_TOP_K)
    if image is not None and (text or "").strip():
        raise RequestError("give a text query or an image, not both (clear one of them)")
    with runs.lock:
        if image is not None:
            label = check_upload("image", image)
            try:
                query = embed_image_query(runs.clip_run, image, what="image")
            except ValueError:
                raise RequestError(f"`image` {label!r} cannot be read as an image") from None
        else:
            query = embed_text(runs.clip_run, prompt_text("query", text))
        results = runs.index.search(query, top_k=top_k)
    found = []
    with _request_folder(runs, "search") as folder:
        for r in results:
            copy = folder / f"{r.rank:02d}-{os.path.basename(r.path)}"  # ranked: two folders' "a.png" stay apart
            shutil.copyfile(r.path, copy)
            found.append(Found(os.fspath(copy), os.fspath(r.path), r.rank, r.score))
    return found


def caption(
    runs: ServedRuns,
    *,
    image: str | None,
    question: str | None = None,
    do_sample=False,
    temperature=1.0,
    seed=0,
    max_new_tokens=CAPTION_TOKENS,
) -> str:
    """The captioner's caption of the image file, or its answer to `question` when one is asked (as `clipcond
    caption` and `clipcond ask` write them by default: a caption is the best of `CAPTION_BEST_OF` candidates unless
    sampled, an answer greedy)."""
    import math

    import torch

    from clipcond.models.captioner import CAPTION_BEST_OF

    if runs.captioner is None:
        raise RequestError("no captioner is served: start with `--captioner CAP`")
    prompt = (question or "").strip() or None
    best_of = 1 if do_sample or prompt is not None else CAPTION_BEST_OF  # as the commands' defaults
    samples = bool(do_sample) or best_of > 1
    if samples and not (temperature is not None and math.isfinite(temperature) and temperature > 0):
        raise RequestError(f"`temperature` must be > 0, got {temperature!r}")
    max_new_tokens = whole_number("max new tokens", max_new_tokens, 1, MAX_NEW_TOKENS)
    seed = whole_number("seed", seed, 0, MAX_SEED)
    pil = read_upload("image", image)
    with runs.lock:
        generator = torch.Generator(device=runs.captioner.device).manual_seed(seed)
        try:
            options = {
                "max_new_tokens": max_new_tokens,
                "temperature": float(temperature) if samples else 1.0,  # greedy decoding reads no temperature
                "generator": generator,
                "max_new_tokens_name": "max new tokens",
            }
            if best_of > 1:
                texts = runs.captioner.generate_best_of([pil], best_of=best_of, **options)
            else:
                texts = runs.captioner.generate([pil], prompt, do_sample=samples, **options)
        except ValueError as err:  # more tokens than the language model has positions for
            raise RequestError(str(err)) from None
    return texts[0]
