"""Image-caption data from users' own folders and CSV files, as uint8 tensors.

Accepted sources:

- an `imagefolder` folder: images plus a `metadata.jsonl` (or `metadata.csv`) at its root whose rows name an image
  (`file_name`, relative to the folder) and a caption (`text`); an optional `label` column is kept;
- a root with split folders (`ROOT/train/`, `ROOT/test/`, each an imagefolder), chosen by `split` (default train);
  a source without split folders is a training set and answers `split=None` or `"train"`;
- a CSV file with a header, by default `path,caption` (paths relative to the CSV's folder, or absolute).

Image paths must lead to files inside the data folder, the folder of the metadata or CSV file, once `..` and
symlinks are resolved; a row whose image lies elsewhere is skipped and counted like an unreadable file (below),
unless `allow_outside_paths` (`--allow-outside-paths`) says the data set is trusted. See `ImageCaptionDataset`.

The metadata is checked when the data set is built (columns, empty captions, missing image files: each error names
the file and line), without decoding any image. A file that exists but cannot be decoded is skipped at load time:
the next readable item takes its place and the sample's `"skipped"` list names the file, so a training loop can
report how many files it skipped.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipcond.data.shapes import load_dataset_info

logger = logging.getLogger(__name__)

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
# When the default column is absent, these are tried in order (a CSV of `path,caption` works without options).
_DEFAULT_COLUMN_FALLBACKS = {"text": ("text", "caption"), "file_name": ("file_name", "path", "image")}
# What a broken image file raises from `Image.open` / `.load()`; UnidentifiedImageError is an OSError.
UNREADABLE_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def _find_metadata(folder: Path) -> Path | None:
    for name in METADATA_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


def _resolve_source(source: Path, split: str | None) -> Path:
    """The metadata or CSV file that a source and split name.

    A root with split folders gives `source/split` (None: `source/train`). A source without splits (a folder with its
    own metadata, or a file) is one training set: it answers split None or "train", so that a training script can
    pass `split="train"` for any source; another split name is an error.
    """
    if not source.exists():
        raise FileNotFoundError(
            f"data source {source} does not exist; pass an imagefolder directory (with metadata.jsonl, or train/ "
            f"and test/ subfolders) or a CSV file with columns path,caption"
        )
    if source.is_file():
        if source.suffix.lower() not in (".csv", ".jsonl"):
            raise ValueError(f"data source {source} is a file but not a .csv or .jsonl metadata file")
        if split not in (None, "train"):
            raise ValueError(
                f"split={split!r} was given, but data source {source} is a single file without splits; "
                f"pass split=None (or 'train')"
            )
        return source

    split_dir = source / (split or "train")
    found = _find_metadata(split_dir) if split_dir.is_dir() else None
    own = _find_metadata(source)
    if own is not None and (split is None or (found is None and split == "train")):
        return own
    if found is not None:
        return found
    if split is None:
        raise FileNotFoundError(
            f"no metadata file in {source}: expected {' or '.join(METADATA_FILES)} in it or in {split_dir}"
        )
    available = sorted(p.name for p in source.iterdir() if p.is_dir() and _find_metadata(p) is not None)
    flat = f" ({source} itself has {own.name}: pass split=None)" if own is not None else ""
    raise FileNotFoundError(
        f"no split {split!r} in {source}: expected {' or '.join(METADATA_FILES)} in {split_dir}; "
        f"splits found: {', '.join(available) or 'none'}{flat}"
    )


def _read_text(path: Path) -> str:
    """The text of a metadata file, which must be UTF-8 (a byte-order mark, as Excel writes, is allowed).

    Decoded whole rather than line by line, so that a wrong byte is reported with its line: Python's own error
    gives only a byte offset into some read buffer.
    """
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise ValueError(
            f"{path}: line {line} is not UTF-8 (byte 0x{data[err.start]:02x} at column {column}: {err.reason}); "
            "save the file as UTF-8"
        ) from None


def _read_rows(path: Path) -> list[tuple[int, dict]]:
    """(line or row number, row) for each row of a .jsonl or .csv file; numbers count from 1, as an editor does."""
    text = _read_text(path)
    rows = []
    if path.suffix.lower() == ".jsonl":
        for number, line in enumerate(io.StringIO(text, newline=None), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: line {number} is not valid JSON: {err}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}: line {number} is not a JSON object: {line.strip()[:80]!r}")
            rows.append((number, row))
    else:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if not reader.fieldnames:
            raise ValueError(f"{path} is empty: expected a header row such as path,caption")
        # Row numbers are file lines: the header is line 1.
        rows = [(number, row) for number, row in enumerate(reader, start=2)]
    if not rows:
        raise ValueError(f"{path} has no rows")
    return rows


def resolves_inside(path: Path, folder: Path) -> bool:
    """Whether `path`, with `..` and symlinks resolved, is `folder` or lies under it; `folder` must be resolved.

    `os.path.realpath` rather than `Path.resolve`, which raises on a symlink loop: a loop inside the folder then
    fails later as a missing file, naming its row, as it did before this check.
    """
    return Path(os.path.realpath(path)).is_relative_to(folder)


def _pick_column(requested: str, columns: list[str], path: Path, what: str) -> str:
    if requested in columns:
        return requested
    for fallback in _DEFAULT_COLUMN_FALLBACKS.get(requested, ()):
        if fallback in columns:
            return fallback
    raise ValueError(f"{what} column {requested!r} is not in {path}; available columns: {', '.join(columns)}")


def to_rgb(image: Image.Image) -> Image.Image:
    """An image of any Pillow mode as 8-bit RGB: the one conversion every image reader uses.

    Pillow's own `convert("RGB")` clips the wide greyscale modes to 0..255 instead of scaling them, so a 16-bit
    value of 40000 (61% grey) turns white. Here they are scaled first:

    - `I;16`, `I;16B`, `I;16L` (16-bit PNG, TIFF) and `I` (32-bit int, what Pillow gives for some 16-bit files):
      read as 16-bit, 0..65535 (`I` values outside are clipped), and divided by 257, rounded, so 65535 -> 255;
      the same scaling as torchvision's `to_dtype(uint16 -> uint8)`, up to rounding;
    - `F` (32-bit float, e.g. TIFF): read as 0..1, the usual range of float images, clipped, times 255, rounded;
      NaN reads as 0.

    Every other mode (`L`, `P`, `RGBA`, `CMYK`, ...) goes through `convert("RGB")` unchanged.
    """
    if image.mode.startswith("I"):
        values = np.clip(np.asarray(image), 0, 65535).astype(np.uint32)  # (H, W)
        grey = (values + 128) // 257  # rounds: 257 is odd, so there are no ties
    elif image.mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0)  # (H, W)
        grey = np.rint(np.clip(values, 0.0, 1.0) * 255)
    else:
        return image.convert("RGB")
    return Image.fromarray(grey.astype(np.uint8)).convert("RGB")  # "L" -> RGB


def resize_image(image: Image.Image, resolution: int | None, center_crop: bool = True) -> Image.Image:
    """Resize the shorter side to `resolution` and crop the centre square (or, without `center_crop`, squash the
    whole image to `resolution` x `resolution`); None keeps the image as it is."""
    r = resolution
    if r is None or image.size == (r, r):
        return image
    if not center_crop:
        return image.resize((r, r), Image.Resampling.BICUBIC)
    w, h = image.size
    scale = r / min(w, h)
    size = (max(r, round(w * scale)), max(r, round(h * scale)))
    # Pillow's resize filters the source on downscale: antialiased
    image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - r) // 2, (size[1] - r) // 2
    return image.crop((left, top, left + r, top + r))


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL RGB image -> uint8 tensor (3, H, W)."""
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))  # (H, W, 3)
    return pixels.permute(2, 0, 1).contiguous()  # (3, H, W)


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Images and captions from an imagefolder directory or a CSV file.

    Items: `{"pixel_values": uint8 tensor (3, R, R), "text": str, "label": str ("" without a label column),
    "index": int, "skipped": list[str]}`. `index` is the index of the item returned, which differs from the one
    asked for only when unreadable files were skipped (they are listed in `skipped`).

    Args:
        source: an imagefolder directory, a root with split folders, or a CSV / metadata.jsonl file.
        split: the split folder of a root with splits (None: `ROOT/train`). A source without splits (a folder with
            its own metadata, a CSV file) takes None or "train".
        caption_column: caption column; the default "text" falls back to "caption".
        image_column: image path column; the default "file_name" falls back to "path", then "image".
        resolution: resize the shorter side to this and crop the centre square; None keeps the native size.
        center_crop: False squashes the whole image to `resolution` x `resolution` instead of cropping.
        cache_images: decode (and resize) every image once, now, and keep the uint8 tensors in memory (see
            `cache_images`); for small data sets such as the shapes (20,000 x 3 x 32 x 32 = 61 MB).
        allow_outside_paths: also read images outside the data folder (see below). Only for trusted data.

    The data folder is the folder that holds the metadata or CSV file (the split folder of a root with splits).
    Relative paths start there, and it is the same whether the source is named by its root, its split folder or
    the file itself, so what a row may read does not depend on how it was named (the data root would: `../` from
    `ROOT/train` would be allowed through `ROOT` and refused through `ROOT/train`). A row whose image path, with
    `..` and symlinks resolved (`os.path.realpath`), ends outside it (`../x.png`, an absolute path elsewhere, a link
    to another place) is listed in `outside`, warned about once, never opened, and skipped at load time as an
    unreadable file is, so training counts it in `--max-skipped-fraction`. Without this check a data set from
    someone else could make the toolkit read, train on and index any image file the user can read. Links inside
    the folder to files inside it are fine. The check costs a path resolution per row, once, here.
    """

    def __init__(
        self,
        source: str | Path,
        *,
        split: str | None = None,
        caption_column: str = "text",
        image_column: str = "file_name",
        resolution: int | None = None,
        center_crop: bool = True,
        cache_images: bool = False,
        allow_outside_paths: bool = False,
    ):
        if resolution is not None and (not isinstance(resolution, int) or resolution < 1):
            raise ValueError(f"resolution={resolution!r} must be a positive int or None")
        self.source = Path(source)
        self.metadata_path = _resolve_source(self.source, split)
        self.root = self.source if self.source.is_dir() else self.source.parent
        self.resolution = resolution
        self.center_crop = center_crop
        self.allow_outside_paths = allow_outside_paths
        self.info = load_dataset_info(self.root)

        rows = _read_rows(self.metadata_path)
        columns = list(rows[0][1])
        caption_key = _pick_column(caption_column, columns, self.metadata_path, "caption")
        image_key = _pick_column(image_column, columns, self.metadata_path, "image")
        where = "line" if self.metadata_path.suffix.lower() == ".jsonl" else "row"
        folder = self.metadata_path.parent
        inside = None if allow_outside_paths else folder.resolve()

        self.records: list[dict] = []
        self.captions: list[str] = []
        self.labels: list[str] = []
        self.image_paths: list[Path] = []
        self.outside: list[int] = []  # items whose image lies outside the data folder: skipped, never opened
        outside_rows: list[tuple[int, str, Path]] = []  # (line, name, path) of each, for the warning
        for number, row in rows:
            text = row.get(caption_key)
            if not isinstance(text, str) or not text.strip():
                raise ValueError(
                    f"{self.metadata_path}: {where} {number} has no caption in column {caption_key!r} (got {text!r})"
                )
            name = row.get(image_key)
            if not isinstance(name, str) or not name.strip():
                raise ValueError(
                    f"{self.metadata_path}: {where} {number} has no image path in column {image_key!r} (got {name!r})"
                )
            path = Path(name) if Path(name).is_absolute() else folder / name
            if inside is not None and not resolves_inside(path, inside):
                self.outside.append(len(self.image_paths))
                outside_rows.append((number, name, path))
            elif not path.is_file():
                raise FileNotFoundError(
                    f"{self.metadata_path}: {where} {number} names image {name!r}, but {path} does not exist"
                )
            label = row.get("label")
            self.records.append(row)
            self.captions.append(text)
            self.labels.append(label if isinstance(label, str) else "" if label is None else str(label))
            self.image_paths.append(path)
        if outside_rows:
            self._warn_outside(outside_rows, folder)

        # per process: DataLoader workers each keep (and warn about) their own; outside images are never opened
        self._unreadable: set[int] = set(self.outside)
        self._cache: list[torch.Tensor | None] | None = None  # decoded (3, H, W) uint8 per item, None: unreadable
        if cache_images:
            self.cache_images()

    def _warn_outside(self, rows: list[tuple[int, str, Path]], folder: Path) -> None:
        where = "line" if self.metadata_path.suffix.lower() == ".jsonl" else "row"
        examples = "; ".join(f"{where} {n}: {name!r} -> {os.path.realpath(path)}" for n, name, path in rows[:3])
        logger.warning(
            "skipping %d of %d images of %s: outside the data folder %s (%s%s); they are counted as skipped "
            "files. Pass --allow-outside-paths (allow_outside_paths=True) only if you trust this data set",
            len(rows),
            len(self.image_paths),
            self.metadata_path,
            folder,
            examples,
            ", ..." if len(rows) > 3 else "",
        )

    def cache_images(self) -> int:
        """Decode every image once and serve items from memory from now on; returns the bytes held.

        Without it every epoch decodes every file again, a noticeable share of a small model's step on a CPU. Call it
        before a DataLoader starts its workers, which then share the cache. Items are copies of the cached tensors; unreadable files stay skipped, as without the cache.
        """
        if self._cache is None:
            self._cache = [self._pixels(i) for i in range(len(self))]
        return sum(t.numel() for t in self._cache if t is not None)

    def __len__(self) -> int:
        return len(self.image_paths)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.metadata_path)!r}, n={len(self)}, resolution={self.resolution})"

    def _load(self, index: int) -> Image.Image | None:
        """The RGB image of an item, or None (with one warning per file) when the file cannot be decoded."""
        if index in self._unreadable:
            return None
        path = self.image_paths[index]
        try:
            with Image.open(path) as image:
                image.load()
                return to_rgb(image)
        except UNREADABLE_IMAGE_ERRORS as err:
            self._unreadable.add(index)
            logger.warning("skipping unreadable image %s (%s: %s)", path, type(err).__name__, err)
            return None

    def _resize(self, image: Image.Image) -> Image.Image:
        return resize_image(image, self.resolution, self.center_crop)

    def _pixels(self, index: int) -> torch.Tensor | None:
        """The item's image as uint8 (3, H, W) at the data set's resolution, or None when it cannot be decoded."""
        if self._cache is not None:
            cached = self._cache[index]
            return None if cached is None else cached.clone()  # a copy: a caller may modify its item in place
        image = self._load(index)
        if image is None:
            return None
        return image_to_tensor(self._resize(image))  # (3, H, W)

    def __getitem__(self, index: int) -> dict:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a data set of {n} items")
        index %= n
        skipped: list[str] = []
        for offset in range(n):
            i = (index + offset) % n
            pixels = self._pixels(i)
            if pixels is None:
                skipped.append(str(self.image_paths[i]))
                continue
            return {
                "pixel_values": pixels,  # (3, H, W) uint8
                "text": self.captions[i],
                "label": self.labels[i],
                "index": i,
                "skipped": skipped,
            }
        raise ValueError(f"none of the {n} images listed in {self.metadata_path} could be read (see the warnings)")


def collate_image_text(samples: list[dict]) -> dict:
    """Batch samples of `ImageCaptionDataset`: pixel_values (B, 3, R, R) uint8, lists of text and label,
    index (B,) int64, and the skipped files of all samples in one list. On the CPU, where data loaders batch; the
    consumer moves what it needs to its model's device."""
    shapes = {tuple(s["pixel_values"].shape) for s in samples}
    if len(shapes) > 1:
        raise ValueError(
            f"cannot batch images of different sizes {sorted(shapes)}; pass resolution= to ImageCaptionDataset"
        )
    return {
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "text": [s["text"] for s in samples],
        "label": [s["label"] for s in samples],
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.long, device="cpu"),
        "skipped": [path for s in samples for path in s["skipped"]],
    }
