"""What `clipcond caption` and `clipcond ask` share: their options, the captioner they load, and how they write what
it says (one line per image and sample: `IMAGE<TAB>TEXT`, or JSON lines with `--json`).

torch and transformers are imported inside the functions, so that the commands' `--help` answers without them.
"""

from __future__ import annotations

import argparse
import json
import sys

from clipcond.finite import finite_float


def add_captioner_args(parser: argparse.ArgumentParser, best_of: int = 1) -> None:
    """`--model`, the decoding options (`--best-of` defaults to `best_of` without `--do-sample`), `--seed`, `--device`
    and `--json`."""
    parser.add_argument(
        "--model", required=True, metavar="CAP", help="captioner run folder (clipcond train captioner)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=32, help="longest text written, in tokens (default 32)")
    parser.add_argument(
        "--do-sample", action="store_true", help="sample each token at --temperature instead of taking the likeliest"
    )
    parser.add_argument(
        "--best-of",
        type=int,
        default=None,
        metavar="N",
        help=f"write N candidates per image (the greedy text and N - 1 sampled at --temperature) and keep the one "
        f"with the highest log-probability per token (default {best_of}; 1 is greedy decoding; with --do-sample 1)",
    )
    parser.set_defaults(best_of_without_sampling=best_of)
    parser.add_argument(
        "--temperature",
        type=finite_float,
        default=1.0,
        help="sampling temperature, of --do-sample and --best-of (default 1)",
    )
    parser.add_argument("--num-samples", type=int, default=1, help="texts per image with --do-sample (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling generator (default 0)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of IMAGE<TAB>TEXT")


def check_captioner_args(args: argparse.Namespace) -> None:
    """Reject bad values, naming the flag; resolve `--best-of`'s default."""
    if args.best_of is None:
        args.best_of = 1 if args.do_sample else args.best_of_without_sampling
    elif args.do_sample and args.best_of > 1:
        raise ValueError(
            f"`--best-of {args.best_of}` keeps one text of several, `--do-sample` prints each sample: drop one of them"
        )
    for name in ("max_new_tokens", "num_samples", "best_of"):
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name.replace('_', '-')}` must be >= 1, got {getattr(args, name)}")
    if (args.do_sample or args.best_of > 1) and not args.temperature > 0:
        raise ValueError(
            f"`--temperature` must be > 0 (--do-sample and the candidates of --best-of sample at it), "
            f"got {args.temperature}"
        )
    if args.num_samples > 1 and not args.do_sample:
        raise ValueError(f"`--num-samples {args.num_samples}` needs --do-sample (without it each image gets one text)")


def describe_images(args: argparse.Namespace, paths: list[str], question: str | None = None) -> list[dict]:
    """Read the images (a missing or unreadable file fails first), load `--model`, and write what it says of each
    image (its caption, or its answer to `question`) to stdout; returns the records written."""
    import torch
    from transformers.utils import logging as hf_logging

    from clipcond.device import resolve_device
    from clipcond.image_files import read_images
    from clipcond.models.captioner import Captioner
    from clipcond.runs import check_finished

    if not paths:
        raise ValueError("give at least one IMAGE")
    images = read_images(paths, what="IMAGE")
    check_finished(args.model, "`--model`")
    hf_logging.disable_progress_bar()  # "Loading weights" bars
    captioner = Captioner.from_pretrained(args.model).to(resolve_device(args.device))
    generator = torch.Generator(device=captioner.device).manual_seed(args.seed)
    records = []
    options = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "generator": generator,
        "max_new_tokens_name": "--max-new-tokens",
    }
    for sample in range(args.num_samples):
        if args.best_of > 1:
            texts = captioner.generate_best_of(images, question, best_of=args.best_of, **options)
        else:
            texts = captioner.generate(images, question, do_sample=args.do_sample, **options)
        for path, text in zip(paths, texts, strict=True):
            record = {"image": path, "sample": sample, "text": text}
            if question is not None:
                record["question"] = question
            records.append(record)
            print(json.dumps(record) if args.json else f"{path}\t{text}", file=sys.stdout)
    return records
