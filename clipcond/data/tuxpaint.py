"""`clipcond data tuxpaint`: Tux Paint's rubber stamps -> an image-caption data set (imagefolder layout).

    sudo apt-get install tuxpaint-stamps-default       # Debian/Ubuntu: ~1,000 clip-art stamps, GPL-2
    clipcond data tuxpaint OUT --resolution 64
    clipcond train clip --data OUT --output-dir runs/clip

Tux Paint (https://tuxpaint.org) ships each stamp as an image (`NAME.png`, or `NAME.svg` only) beside `NAME.txt`,
whose first line is a one-sentence English description ("A US 1 cent piece ($.01) called a penny.") and whose other
lines are translations (`fr.utf8=...`). The stamps are grouped in folders by topic (`animals/birds/...`,
`food/fruit/...`): the top folder becomes the label, for zero-shot classification over 16 topics.

Each stamp is drawn on a white background (its alpha channel composited), cropped to its opaque pixels, padded to a
square with a margin and resized to `--resolution`. SVG-only stamps are rasterised with `rsvg-convert` (Debian's
`librsvg2-bin`) when it is installed, and otherwise skipped and counted. A stamp without an image, with an empty
description or with an unreadable image is skipped, counted and named in `dataset_info.json`. The test split takes
`--test-fraction` of each label's stamps (at least one where a label has two or more), by a seeded shuffle: the same
stamps and arguments give the same files.
"""

from __future__ import annotations

import argparse
import io
import random
import shutil
import subprocess
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from clipcond.data.folders import UNREADABLE_IMAGE_ERRORS
from clipcond.data.writer import DATASET_INFO, SPLITS, prepare_dataset_dir, write_metadata
from clipcond.finite import finite_float
from clipcond.help_formatter import HelpFormatter
from clipcond.storage import check_output_dir, save_image_atomic, write_json_atomic

DEFAULT_STAMPS = Path("/usr/share/tuxpaint/stamps")  # where Debian's tuxpaint-stamps-* packages install them
DATASET_NAME = "tuxpaint-stamps"
MARGIN = 0.08  # blank border around a stamp, a share of the square's side
BACKGROUND = (255, 255, 255)


@dataclass(frozen=True)
class Stamp:
    """One stamp: its description file, its image (PNG preferred, else SVG), its caption and its label."""

    relative: str  # the stamp's path below the stamps folder, without extension: "food/fruit/apple"
    image: Path
    caption: str
    label: str


def read_caption(path: Path) -> str:
    """The English description: the first line of the stamp's .txt that is not a translation (`xx.utf8=...`)."""
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if line and ".utf8=" not in line.split(" ", 1)[0]:
            return line
    return ""


def find_stamps(root: Path, rasterise_svg: bool) -> tuple[list[Stamp], dict[str, list[str]]]:
    """The stamps below `root` in path order, and the skipped ones by reason."""
    stamps, skipped = [], defaultdict(list)
    for txt in sorted(root.rglob("*.txt")):
        relative = txt.relative_to(root).with_suffix("").as_posix()
        png, svg = txt.with_suffix(".png"), txt.with_suffix(".svg")
        image = png if png.is_file() else svg if svg.is_file() else None
        if image is None:
            skipped["no_image"].append(relative)
            continue
        if image == svg and not rasterise_svg:
            skipped["svg_without_rsvg_convert"].append(relative)
            continue
        caption = read_caption(txt)
        if not caption:
            skipped["empty_caption"].append(relative)
            continue
        label = relative.split("/", 1)[0] if "/" in relative else "stamps"
        stamps.append(Stamp(relative, image, caption, label))
    return stamps, dict(skipped)


def open_stamp(path: Path, rasterise_size: int) -> Image.Image:
    """The stamp as an RGBA image; an SVG is rasterised by `rsvg-convert` at `rasterise_size` px wide."""
    if path.suffix == ".svg":
        png = subprocess.run(
            ["rsvg-convert", "--width", str(rasterise_size), "--keep-aspect-ratio", str(path)],
            check=True,
            capture_output=True,
            timeout=60,
        ).stdout
        path = io.BytesIO(png)
    with Image.open(path) as image:
        return image.convert("RGBA")


def square_on_white(image: Image.Image, resolution: int) -> Image.Image:
    """The opaque part of an RGBA stamp, centred on a white square with a `MARGIN` border, `resolution` px."""
    box = image.getchannel("A").getbbox() or (0, 0, *image.size)
    image = image.crop(box)
    side = round(max(image.size) / (1 - 2 * MARGIN))
    canvas = Image.new("RGBA", (side, side), (*BACKGROUND, 255))
    canvas.alpha_composite(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas.convert("RGB").resize((resolution, resolution), Image.Resampling.LANCZOS)


def split_stamps(stamps: list[Stamp], test_fraction: float, seed: int) -> dict[str, list[Stamp]]:
    """Train and test stamps: `test_fraction` of each label's, rounded, at least one of a label with two or more."""
    by_label = defaultdict(list)
    for stamp in stamps:
        by_label[stamp.label].append(stamp)
    splits = {"train": [], "test": []}
    for label in sorted(by_label):
        members = list(by_label[label])
        random.Random(f"clipcond-tuxpaint/{seed}/{label}").shuffle(members)
        num_test = max(round(test_fraction * len(members)), 1) if len(members) > 1 and test_fraction > 0 else 0
        splits["test"] += members[:num_test]
        splits["train"] += members[num_test:]
    return {name: sorted(members, key=lambda s: s.relative) for name, members in splits.items()}


def write_split(split_dir: Path, stamps: list[Stamp], resolution: int, unreadable: list[str]) -> int:
    """Write the split's images and metadata.jsonl; unreadable stamps are appended to `unreadable`."""
    split_dir.mkdir()
    records = []
    for stamp in stamps:
        try:
            image = square_on_white(open_stamp(stamp.image, 4 * resolution), resolution)
        except (*UNREADABLE_IMAGE_ERRORS, subprocess.SubprocessError) as error:
            unreadable.append(f"{stamp.relative}: {type(error).__name__}: {error}")
            continue
        file_name = f"{len(records):05d}.png"
        save_image_atomic(image, split_dir / file_name)
        records.append({"file_name": file_name, "text": stamp.caption, "label": stamp.label, "stamp": stamp.relative})
    write_metadata(split_dir, records)
    return len(records)


def write_tuxpaint_dataset(
    stamps_dir: str | Path,
    out_dir: str | Path,
    *,
    resolution: int = 64,
    test_fraction: float = 0.1,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """Convert the Tux Paint stamps below `stamps_dir` into `out_dir` and return the dataset_info it wrote.

    Raises:
        FileNotFoundError: `stamps_dir` is not a folder, or holds no stamp with an image and a description.
        FileExistsError: `out_dir` is not empty and `overwrite` is False.
        ValueError: `resolution` or `test_fraction` out of range (the message names it).
    """
    if resolution < 8:
        raise ValueError(f"`--resolution` must be >= 8, got {resolution}")
    if not 0 <= test_fraction < 1:
        raise ValueError(f"`--test-fraction` must be in [0, 1), got {test_fraction}")
    root = Path(stamps_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"`--stamps` {str(root)!r} is not a folder; install Debian's tuxpaint-stamps-default "
            f"(`apt-get install tuxpaint-stamps-default`, into {DEFAULT_STAMPS}) or pass the folder of the stamps"
        )
    stamps, skipped = find_stamps(root, rasterise_svg=shutil.which("rsvg-convert") is not None)
    if not stamps:
        raise FileNotFoundError(f"`--stamps` {str(root)!r} holds no stamp (NAME.txt beside NAME.png or NAME.svg)")
    out = Path(out_dir)
    prepare_dataset_dir(out, overwrite)
    unreadable: list[str] = []
    splits = split_stamps(stamps, test_fraction, seed)
    counts = {name: write_split(out / name, splits[name], resolution, unreadable) for name in SPLITS}
    info = {
        "name": DATASET_NAME,
        "source": str(root.resolve()),
        "license": "GPL-2 (Tux Paint stamps, https://tuxpaint.org)",
        "resolution": resolution,
        "seed": seed,
        "test_fraction": test_fraction,
        "classes": sorted({stamp.label for stamp in stamps}),
        "splits": {name: {"num_images": n} for name, n in counts.items()},
        "skipped": {**skipped, "unreadable": unreadable},
    }
    write_json_atomic(out / DATASET_INFO, info)  # last: it marks a complete data set
    return info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="clipcond data tuxpaint",
        description="Convert Tux Paint's clip-art stamps (Debian's tuxpaint-stamps-default) into an image-caption "
        "data set: OUT/train and OUT/test (PNGs on white + metadata.jsonl with the English description as caption "
        "and the topic folder as label) and OUT/dataset_info.json.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("out", metavar="OUT", type=Path, help="output folder (must be empty unless --overwrite)")
    parser.add_argument("--stamps", type=Path, default=DEFAULT_STAMPS, help="the folder of the stamps")
    parser.add_argument("--resolution", type=int, default=64, help="image side in pixels")
    parser.add_argument("--test-fraction", type=finite_float, default=0.1, help="share of each label's stamps")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/test split")
    parser.add_argument("--overwrite", action="store_true", help="replace a data set already in OUT")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_output_dir(args.out, "OUT")
    start = time.perf_counter()
    info = write_tuxpaint_dataset(
        args.stamps,
        args.out,
        resolution=args.resolution,
        test_fraction=args.test_fraction,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    splits, skipped = info["splits"], info["skipped"]
    left_out = ", ".join(f"{len(names)} {reason.replace('_', ' ')}" for reason, names in skipped.items() if names)
    print(
        f"wrote {splits['train']['num_images']} train + {splits['test']['num_images']} test stamps "
        f"({args.resolution} px, {len(info['classes'])} labels) to {args.out} in {time.perf_counter() - start:.1f} s"
        + (f"; skipped {left_out} (see {DATASET_INFO})" if left_out else "")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
