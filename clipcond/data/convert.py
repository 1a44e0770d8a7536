"""`clipcond data convert`: an imagefolder or CSV data set -> WebDataset tar shards, for streaming.

    clipcond data convert shapes/ --split train --to webdataset --shard-size 1000 --output-dir shards/train
    clipcond train clip --data 'shards/train/{000000..000019}.tar' --output-dir runs/clip

Each sample becomes three consecutive tar members under a zero-padded key (its index in the data set): the image
file's original bytes under its own extension (`000042.png`), the caption (`000042.txt`, UTF-8) and the metadata row
(`000042.json`: file name, caption, label and any attributes). Shards hold `--shard-size` samples each (the last
one fewer) and are named `000000.tar`, `000001.tar`, ...; the `webdataset` library reads them as they are. Beside
them, `index.json` lists each shard's sample count in wids' `wids-shard-index-v1` layout, plus the source, split and
the data set's `dataset_info.json` under `clipcond`. Images are copied, not decoded (an unreadable one is skipped
when streamed). A row whose image lies outside the data folder (`../`, an absolute path or a symlink elsewhere; see
`ImageCaptionDataset`) is left out, its key missing, and counted in the printed summary and the index, unless
`--allow-outside-paths` copies it: a shard must not carry away files the data set's folder does not hold. Members
carry fixed times and owners, so the same data gives byte-identical shards. Each shard is written to a temporary
name and renamed, and the index comes last: a folder with an index is complete.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
from pathlib import Path

from clipcond.data.folders import ImageCaptionDataset
from clipcond.data.open import add_allow_outside_paths, dataset_options
from clipcond.data.webdataset import INDEX_FILE, INDEX_KIND
from clipcond.finite import finite_or_null
from clipcond.help_formatter import HelpFormatter
from clipcond.storage import check_output_dir, dumps_json, write_json_atomic, writing

FORMATS = ("webdataset",)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="clipcond data convert",
        description="Convert an imagefolder or CSV data set into WebDataset tar shards (with an index.json), which "
        "every training command streams with --data 'OUT/{000000..000099}.tar'.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("source", help="imagefolder root (with train/ and test/), split folder, or CSV file")
    parser.add_argument("--split", default="train", help="split of SOURCE to convert (one split per output folder)")
    parser.add_argument("--to", default="webdataset", choices=FORMATS, help="output format")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--output-dir", required=True, help="folder for the shards and index.json")
    parser.add_argument("--caption-column", default="text", help="caption column of the metadata or CSV")
    parser.add_argument("--image-column", default=None, help="image column (default: file_name, or path for CSVs)")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in --output-dir")
    add_allow_outside_paths(parser)
    args = parser.parse_args(argv)
    if args.shard_size < 1:
        raise ValueError(f"`--shard-size` must be >= 1, got {args.shard_size}")
    return args


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mode = 0o644
    info.mtime = 0  # fixed: the same data gives the same bytes
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(payload))


def convert_to_webdataset(
    dataset: ImageCaptionDataset, output_dir: str | os.PathLike, *, shard_size: int = 1000, overwrite: bool = False
) -> dict:
    """Write `dataset`'s samples as WebDataset shards and an index.json into `output_dir`; returns the index.

    The samples whose image lies outside the data folder (`dataset.outside`) are left out."""
    if shard_size < 1:
        raise ValueError(f"`shard_size` must be >= 1, got {shard_size}")
    left_out = set(dataset.outside)
    samples = [i for i in range(len(dataset)) if i not in left_out]
    if not samples:
        raise ValueError(
            f"every image of {dataset.metadata_path} lies outside its folder {dataset.metadata_path.parent}, so "
            "there is nothing to convert; pass --allow-outside-paths only if you trust this data set"
        )
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(out.glob("*.tar")) + ([out / INDEX_FILE] if (out / INDEX_FILE).exists() else [])
    if existing and not overwrite:
        raise FileExistsError(
            f"`--output-dir` {out} already holds shards ({existing[0].name}, ...); pass --overwrite or another folder"
        )
    for path in existing:
        path.unlink()

    n = len(samples)
    key_width = max(6, len(str(len(dataset) - 1)))
    num_shards = -(-n // shard_size)
    shard_width = max(6, len(str(num_shards - 1)))
    shardlist = []
    for shard in range(num_shards):
        name = f"{shard:0{shard_width}d}.tar"
        tmp = out / f".{name}.tmp"
        indices = samples[shard * shard_size : (shard + 1) * shard_size]
        with writing(out / name, scratch=[tmp]), tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in indices:
                key = f"{i:0{key_width}d}"
                image_path = dataset.image_paths[i]
                extension = image_path.suffix.lower().lstrip(".") or "png"
                row = {**dataset.records[i], "text": dataset.captions[i], "label": dataset.labels[i]}
                _add(tar, f"{key}.{extension}", image_path.read_bytes())
                _add(tar, f"{key}.txt", dataset.captions[i].encode("utf-8"))
                metadata = dumps_json(finite_or_null(row), ensure_ascii=False, default=str)
                _add(tar, f"{key}.json", metadata.encode("utf-8"))
        os.replace(tmp, out / name)
        shardlist.append({"url": name, "nsamples": len(indices), "filesize": (out / name).stat().st_size})

    index = {
        "__kind__": INDEX_KIND,
        "wids_version": 1,
        "name": f"{dataset.source.name}-{dataset.metadata_path.parent.name}",
        "shardlist": shardlist,
        "clipcond": {
            "source": str(dataset.source),
            "metadata": str(dataset.metadata_path),
            "num_samples": n,
            "skipped_outside": len(left_out),
            "dataset_info": dataset.info,
        },
    }
    write_json_atomic(out / INDEX_FILE, index)
    return index


def shard_pattern(output_dir: str | os.PathLike, index: dict) -> str:
    """The brace pattern naming the shards of an index, e.g. `out/{000000..000004}.tar`."""
    names = [Path(entry["url"]).stem for entry in index["shardlist"]]
    if len(names) == 1:
        return str(Path(output_dir) / f"{names[0]}.tar")
    return str(Path(output_dir) / f"{{{names[0]}..{names[-1]}}}.tar")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_output_dir(args.output_dir)
    dataset = ImageCaptionDataset(args.source, split=args.split, **dataset_options(args))
    index = convert_to_webdataset(dataset, args.output_dir, shard_size=args.shard_size, overwrite=args.overwrite)
    summary = {
        "output_dir": str(args.output_dir),
        "shards": len(index["shardlist"]),
        "num_samples": index["clipcond"]["num_samples"],
        "skipped_outside": index["clipcond"]["skipped_outside"],
        "data": shard_pattern(args.output_dir, index),
    }
    print(dumps_json(summary), file=sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
