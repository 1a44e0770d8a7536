"""One entry for the training commands' `--data`: a folder or CSV (map-style `ImageCaptionDataset`) or WebDataset
shards (streamed `ShardedImageCaptionDataset`). Both yield the same items and have `captions`, `info`,
`resolution` and `len()`; `clipcond.train.loop.train` handles either. Also the data arguments the commands share
(`add_data_arguments`, `add_allow_outside_paths`, `add_validation_split_argument`), the data set options they give
(`dataset_options`) and the split they validate on (`validation_split`)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from clipcond.data.folders import ImageCaptionDataset
from clipcond.data.webdataset import ShardedImageCaptionDataset, is_shard_source

logger = logging.getLogger(__name__)

DATA_HELP = (
    "an imagefolder root (with train/ and test/), a split folder or a CSV file; or WebDataset tar shards from "
    "`clipcond data convert`: a quoted brace pattern such as 'shards/{000000..000099}.tar', a .tar file or a shard "
    "folder, or URLs as WebDataset takes them ('pipe:curl -s https://host/{000000..000099}.tar', "
    "'https://host/{000000..000099}.tar'; read as streams, counted by one pass when opened). Shards are streamed: each epoch is one pass over them in a new shuffled order, split across processes "
    "and dataloader workers by whole shards, and --max-train-steps sets the length; resuming is exact with the same "
    "processes and workers. --split and the validation split do not apply to shards. The captions are read once "
    "from the shards' .txt members (images are skipped over), and the text- and image-embedding caches of the "
    "decoder and prior are built as for folders, the image cache by one in-order pass over the shards"
)


ALLOW_OUTSIDE_PATHS_HELP = (
    "read images whose path in the metadata or CSV leads outside its folder (../, absolute paths, symlinks to "
    "elsewhere); without it they are skipped and counted like unreadable files. Risk: a data set from someone else "
    "could then make this command read any image file you can read; give it only for data you trust"
)


def add_allow_outside_paths(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """`--allow-outside-paths`, for every command that reads a data folder (see `ImageCaptionDataset`)."""
    parser.add_argument("--allow-outside-paths", action="store_true", help=ALLOW_OUTSIDE_PATHS_HELP)


def add_data_arguments(group: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The data arguments of the training commands: `--data`, `--split`, `--caption-column`, `--image-column`,
    `--allow-outside-paths`; `dataset_options(args)` turns them into keyword arguments of the data sets."""
    group.add_argument("--data", required=True, help=DATA_HELP)
    group.add_argument("--split", default="train", help="split of --data to train on")
    group.add_argument("--caption-column", default="text", help="caption column of the metadata or CSV")
    group.add_argument("--image-column", default=None, help="image column (default: file_name, or path for CSVs)")
    add_allow_outside_paths(group)


VALIDATION_SPLIT = "test"  # the default of --validation-split: skipped where the data has no such split


def add_validation_split_argument(group: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """`--validation-split`, read through `validation_split`."""
    group.add_argument(
        "--validation-split",
        default=VALIDATION_SPLIT,
        help=f"split of --data to validate on ('none' to skip; the default skips too where --data has no "
        f"{VALIDATION_SPLIT}/ split)",
    )


def validation_split(args: argparse.Namespace) -> str | None:
    """The split of `--data` to validate on, or None: `--validation-split none`, or the default split where the
    data has none (shards have no splits). A split the user named that the data lacks, or named for shards, is an
    error naming the flag, the value and the folders that are there. (The default cannot be told from a `test` the
    user named: both skip quietly where it is missing.)"""
    split = args.validation_split
    if split == "none":
        return None
    shards = is_shard_source(args.data)
    if not shards and Path(args.data, split).is_dir():
        return split
    if split != VALIDATION_SPLIT and shards:
        raise ValueError(
            f"`--validation-split` {split!r}: `--data` {str(args.data)!r} is WebDataset shards, which have no splits; "
            "validate on a folder's split, or pass 'none'"
        )
    if split != VALIDATION_SPLIT:
        root = Path(args.data)
        folders = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise ValueError(
            f"`--validation-split` {split!r} is not a folder of `--data` {str(args.data)!r} (its folders: "
            f"{', '.join(folders) or 'none'}); name one of them, or 'none'"
        )
    logger.info("no split %r in %s: no validation", split, args.data)
    return None


def dataset_options(args: argparse.Namespace) -> dict:
    """Keyword arguments of `open_image_text_dataset` and `ImageCaptionDataset` from `add_data_arguments`'s."""
    options = {"caption_column": args.caption_column, "allow_outside_paths": args.allow_outside_paths}
    if args.image_column:
        options["image_column"] = args.image_column
    return options


def open_image_text_dataset(
    data: str | Path | Sequence[str | Path],
    *,
    split: str | None = "train",
    resolution: int | None = None,
    caption_column: str = "text",
    image_column: str | None = None,
    center_crop: bool = True,
    shuffle_buffer: int = 1000,
    allow_outside_paths: bool = False,
) -> ImageCaptionDataset | ShardedImageCaptionDataset:
    """The data set that `data` names: streamed shards when it names WebDataset shards (see
    `clipcond.data.webdataset.is_shard_source`), else an `ImageCaptionDataset` of `split`. `allow_outside_paths`
    applies to the latter only: a shard's images are its own members, which cannot lead elsewhere."""
    if is_shard_source(data):
        if split not in (None, "train"):
            raise ValueError(
                f"`--split` {split!r} was given, but --data {str(data)!r} names WebDataset shards, which have no "
                "splits; convert that split to its own shards (clipcond data convert DIR --split "
                f"{split} --output-dir ...) and pass them"
            )
        if image_column is not None:
            raise ValueError(
                f"`--image-column` {image_column!r} does not apply to shards: a sample's image is its image member"
            )
        return ShardedImageCaptionDataset(
            data,
            resolution=resolution,
            center_crop=center_crop,
            caption_column=caption_column,
            shuffle_buffer=shuffle_buffer,
        )
    kwargs = {"caption_column": caption_column, "allow_outside_paths": allow_outside_paths}
    if image_column is not None:
        kwargs["image_column"] = image_column
    return ImageCaptionDataset(data, split=split, resolution=resolution, center_crop=center_crop, **kwargs)


def is_streamed(dataset) -> bool:
    return isinstance(dataset, torch.utils.data.IterableDataset)


def items_at(dataset, indices: Sequence[int]) -> list[dict]:
    """The items at `indices` of a map-style or streamed data set (the latter in shard order, decoding only those)."""
    if not is_streamed(dataset):
        return [dataset[i] for i in indices]
    found = dataset.items_at(indices)
    return [found[int(i)] for i in indices]


def open_at_resolution(
    data: str | Path | Sequence[str | Path], *, split: str | None, resolution: int | None, **options
) -> tuple[ImageCaptionDataset | ShardedImageCaptionDataset, int]:
    """`open_image_text_dataset` at `resolution`, by default the data set's own (its info, else its first image's
    width); and that resolution. `options`: `dataset_options(args)`."""
    dataset = open_image_text_dataset(data, split=split, resolution=resolution, **options)
    chosen = resolution or (dataset.info or {}).get("resolution") or native_resolution(dataset)
    if dataset.resolution != chosen:
        dataset = open_image_text_dataset(data, split=split, resolution=chosen, **options)
    return dataset, chosen


def native_resolution(dataset) -> int:
    """The width of the data set's first image as the data set gives it (its native size without `resolution`)."""
    return items_at(dataset, [0])[0]["pixel_values"].shape[-1]
