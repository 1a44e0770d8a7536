"""Image files in and out of the commands that sample: the input images to vary or interpolate (`read_images`), and
what is drawn, written as it comes (`ImageWriter`: one PNG per image, `images.jsonl` with a record per image, and
`grid.png`). The records: `image_record` for `clipcond generate`, `decoder_record` for `vary` and `interpolate`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from clipcond.storage import dumps_json, save_image_atomic, writing


def read_images(paths: list[str], what: str = "IMAGE") -> list:
    """The images as RGB PIL images, read now: a missing or unreadable file fails before any model is loaded."""
    from PIL import Image, UnidentifiedImageError

    from clipcond.data.folders import to_rgb

    images = []
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{what} {path!r} does not exist")
        try:
            with Image.open(path) as image:
                images.append(to_rgb(image))
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"{what} {path!r} cannot be read as an image ({err})") from None
    return images


def image_record(
    index: int,
    prompt: str,
    seed: int,
    *,
    negative_prompt: str | None,
    num_inference_steps: int,
    guidance_scale: float,
    scheduler: str,
    model: str | os.PathLike,
    dtype: str,
) -> dict:
    """The images.jsonl record of image `index`: what `clipcond generate --seed SEED --num-images 1` with these
    settings needs to draw it again (`dtype`: the `--dtype` it was drawn in)."""
    return {
        "file_name": f"{index:05d}.png",
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "seed": seed,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "scheduler": scheduler,
        "model": os.fspath(model),
        "dtype": dtype,
    }


def decoder_record(
    index: int, seed: int, settings: dict, *, scheduler: str, model: str | os.PathLike, **about
) -> dict:
    """The images.jsonl record of image `index` drawn by an image-embedding decoder (`clipcond vary`,
    `interpolate`): what it was drawn from (`about`: its source image, or its row's ends and t), its seed, the
    decoder's `settings` (`clipcond.sampling_options.decoder_settings`), the sampler and the model."""
    return {
        "file_name": f"{index:05d}.png",
        **about,
        "seed": seed,
        **settings,
        "scheduler": scheduler,
        "model": os.fspath(model),
    }


class ImageWriter:
    """Writes generated images into `output_dir` as they are drawn: each image as `<record["file_name"]>` and its
    record as a line of `images.jsonl` (after the PNGs it names), batch by batch, so that a crash loses at most the
    batch being drawn; then the grid (`finish`). A full disk raises `DiskFullError` naming the file."""

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.records_path = self.output_dir / "images.jsonl"
        with writing(self.records_path):
            self.records_path.write_text("", encoding="utf-8")  # a previous run's records go
        self.images: list = []
        self.records: list[dict] = []

    def add(self, images: Sequence, records: Sequence[dict]) -> None:
        if len(images) != len(records):
            raise ValueError(f"got {len(images)} images but {len(records)} records")
        for image, record in zip(images, records):
            save_image_atomic(image, self.output_dir / record["file_name"])
        lines = "".join(dumps_json(record) + "\n" for record in records)
        size = self.records_path.stat().st_size
        try:
            with writing(self.records_path), open(self.records_path, "a", encoding="utf-8") as f:
                f.write(lines)
        except OSError:
            os.truncate(self.records_path, size)  # no half line for a reader to trip on
            raise
        self.images += images
        self.records += records

    def finish(self, grid_rows: int, labels: Sequence[str] | None = None, grid_images: Sequence | None = None) -> Path:
        """Tile the images written (or `grid_images`, e.g. with each row's source image first; `labels` then label
        them) `grid_rows` rows deep, row by row, with `labels` under them, as `grid.png`; returns its path."""
        from clipcond.plots import image_grid

        grid_path = self.output_dir / "grid.png"
        tiles = list(self.images if grid_images is None else grid_images)
        cols = math.ceil(len(tiles) / grid_rows)
        return save_image_atomic(image_grid(tiles, rows=grid_rows, cols=cols, labels=labels), grid_path)


def write_outputs(
    images: Sequence,
    records: Sequence[dict],
    output_dir: str | os.PathLike,
    grid_rows: int,
    labels: Sequence[str] | None = None,
    grid_images: Sequence | None = None,
) -> Path:
    """All at once what `ImageWriter` writes batch by batch: the images, `images.jsonl` and `grid.png` (see
    `ImageWriter.finish` for `grid_rows`, `labels` and `grid_images`). Returns the grid's path."""
    writer = ImageWriter(output_dir)
    writer.add(images, records)
    return writer.finish(grid_rows, labels, grid_images)
