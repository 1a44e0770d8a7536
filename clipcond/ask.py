"""`clipcond ask`: a captioner's answer to a question about images (a captioner trained with questions: on the
shapes data, about colour, shape, count and position; `clipcond.data.questions`).

    clipcond ask --model runs/cap image.png "how many objects are there?"
    clipcond ask --model runs/cap a.png b.png "what colour is the shape?"
"""

from __future__ import annotations

import argparse

from clipcond.captioning import add_captioner_args, check_captioner_args, describe_images


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="clipcond ask",
        description="Print the captioner's answer to QUESTION for each image, one line per image: IMAGE<TAB>ANSWER.",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument("question", metavar="QUESTION", help="the question, in quotes (the last argument)")
    add_captioner_args(parser)
    args = parser.parse_args(argv)
    if not args.question.strip():
        raise ValueError(f"QUESTION must not be empty, got {args.question!r}")
    check_captioner_args(args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    describe_images(args, args.images, args.question.strip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
