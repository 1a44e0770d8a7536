"""`clipcond caption`: captions of images, written by a captioner run (`clipcond train captioner`), or with
`--detailed` their detailed descriptions.

    clipcond caption --model runs/cap photo.png drawing.png      # the best of 8 candidates per image
    clipcond caption --model runs/cap photo.png --best-of 1      # greedy decoding
    clipcond caption --model runs/cap photo.png --do-sample --temperature 0.8 --num-samples 3 --seed 1
    clipcond caption --model runs/cap photo.png --detailed      # "a small circle in red at the top"
"""

from __future__ import annotations

import argparse

from clipcond.captioning import add_captioner_args, check_captioner_args, describe_images
from clipcond.data.questions import DESCRIBE
from clipcond.models.captioner import CAPTION_BEST_OF


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="clipcond caption",
        description="Print a caption of each image (the best of --best-of candidates, or sampled with --do-sample), "
        "one line per image: IMAGE<TAB>CAPTION.",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument(
        "--detailed",
        action="store_true",
        help="ask for the detailed description instead of a caption (a captioner trained with the shapes data's "
        "questions: every object's size, colour, shape and position); greedy unless --best-of or --do-sample says "
        "otherwise, as a description names every field already",
    )
    add_captioner_args(parser, best_of=CAPTION_BEST_OF)
    args = parser.parse_args(argv)
    if args.detailed:  # a description names every field already: greedy, as `eval captioner` scores it
        args.best_of_without_sampling = 1
    check_captioner_args(args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    describe_images(args, args.images, DESCRIBE if args.detailed else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
