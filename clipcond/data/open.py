"""One entry for the training commands' `--data`: a folder or CSV (map-style `ImageCaptionDataset`) or WebDataset
shards (streamed `ShardedImageCaptionDataset`). Both yield the same items and have `captions`, `info`,
`resolution` and `len()`; `clipcond.train.loop.train` handles either."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from clipcond.data.folders import ImageCaptionDataset
from clipcond.data.webdataset import ShardedImageCaptionDataset, is_shard_source

DATA_HELP = (
    "an imagefolder root (with train/ and test/), a split folder or a CSV file; or WebDataset tar shards from "
    "`clipcond data convert`: a quoted brace pattern such as 'shards/{000000..000099}.tar', a .tar file or a shard "
    "folder. Shards are streamed: each epoch is one pass over them in a new shuffled order, split across processes "
    "and dataloader workers by whole shards, and --max-train-steps sets the length; resuming is exact with the same "
    "processes and workers. --split and the validation split do not apply to shards. The captions are read once "
    "from the shards' .txt members (images are skipped over), and the text- and image-embedding caches of the "
    "decoder and prior are built as for folders, the image cache by one in-order pass over the shards"
)


def open_image_text_dataset(
    data: str | Path | Sequence[str | Path],
    *,
    split: str | None = "train",
    resolution: int | None = None,
    caption_column: str = "text",
    image_column: str | None = None,
    center_crop: bool = True,
    shuffle_buffer: int = 1000,
) -> ImageCaptionDataset | ShardedImageCaptionDataset:
    """The data set that `data` names: streamed shards when it names WebDataset shards (see
    `clipcond.data.webdataset.is_shard_source`), else an `ImageCaptionDataset` of `split`."""
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
    kwargs = {"caption_column": caption_column}
    if image_column is not None:
        kwargs["image_column"] = image_column
    return ImageCaptionDataset(data, split=split, resolution=resolution, center_crop=center_crop, **kwargs)


def is_streamed(dataset) -> bool:
    return isinstance(dataset, torch.utils.data.IterableDataset)


def items_at(dataset, indices: Sequence[int]) -> list[dict]:
    """The items at `indices` of a map-style or streamed data set (the latter in one pass, in shard order)."""
    if not is_streamed(dataset):
        return [dataset[i] for i in indices]
    wanted = {int(i): None for i in indices}
    remaining = set(wanted)
    for position, item in enumerate(dataset.in_order()):
        if position in remaining:
            wanted[position] = item
            remaining.discard(position)
            if not remaining:
                break
    if remaining:
        raise IndexError(f"indices {sorted(remaining)[:5]} out of range for a data set of {len(dataset)} items")
    return [wanted[int(i)] for i in indices]


def native_resolution(dataset) -> int:
    """The width of the data set's first image as the data set gives it (its native size without `resolution`)."""
    return items_at(dataset, [0])[0]["pixel_values"].shape[-1]
