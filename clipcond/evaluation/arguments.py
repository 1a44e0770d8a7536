"""The command-line arguments that the `clipcond eval` commands (clip, prior, generation, unclip) share."""

from __future__ import annotations

import argparse

from clipcond.data.open import add_allow_outside_paths


def eval_parser(
    prog: str, description: str, *, model: str | None = None, shapes: bool = False
) -> argparse.ArgumentParser:
    """The parser of an evaluation command, with `--model RUN` (help `model`, when given) and `--data DIR`: any
    image-caption data, or with `shapes` the built-in shapes data (whose classes the attribute judge knows)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    if model is not None:
        parser.add_argument("--model", required=True, metavar="RUN", help=model)
    data = "the shapes data root (with dataset_info.json)" if shapes else "data root (imagefolder with split folders)"
    parser.add_argument("--data", required=True, metavar="DIR", help=data)
    return parser


def add_output_arguments(parser: argparse.ArgumentParser, *, output_dir: str) -> None:
    """`--device`, `--output-dir` (help `output_dir`), `--no-progress` and `--allow-outside-paths`."""
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--output-dir", metavar="DIR", help=output_dir)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    add_allow_outside_paths(parser)


def add_judged_arguments(parser: argparse.ArgumentParser, *, output_dir: str) -> None:
    """The arguments of the judged evaluations (`clipcond.evaluation.judged`) after their own: `--batch-size`,
    `--seed`, `--judge-cache-dir`, then `add_output_arguments`."""
    parser.add_argument("--batch-size", type=int, default=32, help="images per pipeline call (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-image generators (default 0)")
    parser.add_argument("--judge-cache-dir", metavar="DIR", help="where the judge is cached (default ~/.cache/...)")
    add_output_arguments(parser, output_dir=output_dir)


def check_at_least(args: argparse.Namespace, minimum: int, *names: str, note: str = "") -> None:
    """Refuse an argument in `names` (attribute names of `args`) below `minimum`, naming the flag; `note` follows
    the bound in the message (" (1: no guidance)")."""
    for name in names:
        value = getattr(args, name)
        if value < minimum:
            raise ValueError(f"`--{name.replace('_', '-')}` must be >= {minimum}{note}, got {value}")
