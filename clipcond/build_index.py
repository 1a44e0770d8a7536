"""`clipcond index`: embed the images under a folder with a CLIP into a search index (`clipcond.index.ImageIndex`),
or update one: only new and changed files are embedded. `clipcond search` queries it.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from clipcond.data.open import add_allow_outside_paths
from clipcond.device import resolve_device
from clipcond.index import DTYPES, IMAGE_EXTENSIONS, ImageIndex, is_index, scan_images
from clipcond.runlock import run_folder_lock
from clipcond.storage import check_output_dir


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="clipcond index",
        description="Embed the images under a folder (recursively) with a CLIP into a search index for "
        "`clipcond search`. Run it again to update the index: only new and changed files are embedded.",
    )
    parser.add_argument("folder", metavar="FOLDER", help=f"image folder ({', '.join(IMAGE_EXTENSIONS)}, recursive)")
    parser.add_argument("--model", required=True, help="CLIP run folder (the output of `clipcond train clip`)")
    parser.add_argument("--output", required=True, metavar="INDEX", help="index folder, made or updated")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="precision of stored embeddings (default: fp16)"
    )
    parser.add_argument("--rebuild", action="store_true", help="discard an existing index at INDEX and start over")
    parser.add_argument("--batch-size", type=int, default=128, help="images per encoder call (default 128)")
    parser.add_argument("--num-workers", type=int, default=0, help="image-decoding processes (default 0: none)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_allow_outside_paths(parser)
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Argument errors before any model is loaded."""
    if args.batch_size < 1:
        raise ValueError(f"`--batch-size` must be >= 1, got {args.batch_size}")
    if args.num_workers < 0:
        raise ValueError(f"`--num-workers` must be >= 0, got {args.num_workers}")
    if not os.path.isdir(args.folder):
        what = "is not a folder" if os.path.exists(args.folder) else "does not exist"
        raise FileNotFoundError(f"FOLDER {args.folder!r} {what}; pass the folder of images to index")
    check_output_dir(args.output, "--output")
    from clipcond.models.clip import check_clip_folder

    check_clip_folder(args.model, "--model")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_args(args)
    with run_folder_lock(args.output, flag="--output"):  # one writer per index
        return build_index(args)


def build_index(args: argparse.Namespace) -> int:
    """`clipcond index` with checked arguments, holding the lock of `--output`."""
    from clipcond.models.clip import load_clip

    root = Path(args.folder).resolve()

    # 1. the existing index, if any: it must be of this folder, this CLIP and this precision
    index = None
    if is_index(args.output) and not args.rebuild:
        try:
            index = ImageIndex.load(args.output, what="--output")
        except (ValueError, FileNotFoundError) as err:
            raise ValueError(f"{err}; or pass --rebuild to discard it") from None
        if index.root != root:
            raise ValueError(
                f"`--output` {args.output!r} indexes the folder {str(index.root)!r}, not FOLDER {str(root)!r}; "
                "pass that folder, another --output, or --rebuild"
            )
        if args.dtype is not None and args.dtype != index.dtype:
            raise ValueError(
                f"`--dtype` {args.dtype!r} differs from the index's {index.dtype!r}; pass --rebuild to change it"
            )
    if index is None and not scan_images(root):
        raise ValueError(f"FOLDER {args.folder!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}, recursively)")
    from clipcond.lineage import content_hash

    clip_hash = content_hash(args.model)
    if index is not None:
        index.check_model(clip_hash, args.model)

    # 2. the CLIP, then the update (a fresh index is an update of an empty one)
    clip_run = load_clip(args.model, device=resolve_device(args.device), progress=not args.no_progress)
    if index is None:
        index = ImageIndex.empty(root, clip_run, dtype=args.dtype or "fp16", clip_hash=clip_hash)
    report = index.update(
        clip_run,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        progress=not args.no_progress,
        clip_hash=clip_hash,
        allow_outside_paths=args.allow_outside_paths,
    )
    index.save(args.output)
    print(f"clipcond index: {report.summary()} -> {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
