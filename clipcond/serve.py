"""`clipcond serve`: a web page to generate, vary, search and caption with trained runs (Gradio, `pip install
"clipcond[ui]"`).

    clipcond serve --demo demo                      # every run of a `clipcond demo` folder
    clipcond serve --model runs/decoder --port 7860
    clipcond serve --model runs/unclip_decoder --prior runs/prior --index photos.index --captioner runs/cap

Each model is loaded once and kept on the device; requests run one at a time through Gradio's queue. Each request
writes its PNGs, `images.jsonl` (the records `clipcond generate` writes) and `grid.png` into a folder of its own
under `--output-dir`. The page binds to 127.0.0.1 unless `--host` says otherwise (0.0.0.0 shows it to the network:
anyone who reaches the port can use the models).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile

from clipcond.device import DTYPES
from clipcond.storage import check_output_dir


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="clipcond serve",
        description="A web page (Gradio) to generate, vary, interpolate, search and caption with trained runs.",
    )
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="DEC",
        help="a decoder run: text-to-image (Generate, Compare) or image-embedding (Vary; Generate with --prior); "
        "repeat for one of each",
    )
    parser.add_argument("--prior", default=None, help="a prior run: text -> image through the image-embedding decoder")
    parser.add_argument("--clip", default=None, metavar="RUN", help="the index's CLIP run, if it moved")
    parser.add_argument("--index", default=None, help="a search index (`clipcond index`): the Search tab")
    parser.add_argument("--captioner", default=None, metavar="CAP", help="a captioner run: the Caption tab")
    parser.add_argument(
        "--demo",
        default=None,
        metavar="OUT",
        help="a `clipcond demo` output folder: every finished run in it, its test images, its report (the other "
        "flags add to or replace its runs); without an index, one of its test images is built in memory",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument(
        "--output-dir",
        default=None,
        help="folder for each request's files (default: a temporary folder, removed when the server stops)",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="weights' precision (default fp32)")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    if not 0 < args.port < 65536:
        raise ValueError(f"`--port` must be from 1 to 65535, got {args.port}")
    if args.output_dir is not None:
        check_output_dir(args.output_dir)


def build(args: argparse.Namespace):
    """The page and its runs for checked `args` with an `output_dir` (what `main` launches; tests build it without a
    server)."""
    from clipcond.app.page import build_page
    from clipcond.app.runs import ServedRuns, paths_from_flags
    from clipcond.demo_layout import find_demo

    demo = find_demo(args.demo) if args.demo else None
    paths = paths_from_flags(args.model, args.prior, args.clip, args.index, args.captioner, demo=demo)
    runs = ServedRuns(paths, output_dir=args.output_dir, device=args.device, dtype=args.dtype)
    return build_page(runs), runs


def allowed_paths(runs) -> list[str]:
    """The files and folders the page may send: the requests' output folder (search hits are copied there), and
    file by file the test images and the demo report's figures (not the folders they lie in: a demo's weights, or
    whatever else lies beside the indexed images, stay private)."""
    from clipcond.app.panel import demo_report

    report = demo_report(runs)
    paths = [runs.output_dir, *(path for _, path in runs.test_images), *(report[1] if report else [])]
    return list(dict.fromkeys(os.fspath(path) for path in paths))


def launch(args: argparse.Namespace) -> None:
    """Build the page for checked `args` and serve it until the server stops."""
    from clipcond.app.checks import MAX_UPLOAD_BYTES
    from clipcond.app.page import CSS

    page, runs = build(args)
    print(f"clipcond serve: {', '.join(runs.tabs)} on http://{args.host}:{args.port} (files in {runs.output_dir})")
    page.launch(
        server_name=args.host,
        server_port=args.port,
        allowed_paths=allowed_paths(runs),
        max_file_size=MAX_UPLOAD_BYTES + 1,  # a bigger upload is cut off by Gradio; up to it, the handler says why
        css=CSS,
        quiet=True,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_args(args)
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ValueError('`clipcond serve` needs Gradio: pip install "clipcond[ui]"') from None
    with contextlib.ExitStack() as stack:
        if args.output_dir is None:  # the requests' files live as long as the server
            args.output_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="clipcond-serve-"))
        launch(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
