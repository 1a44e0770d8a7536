"""`clipcond export open-clip RUN`: write a CLIP run's weights in open_clip's layout beside transformers' own.

    clipcond export open-clip runs/clip
    python -c "import open_clip; open_clip.create_model_and_transforms('local-dir:runs/clip')"

`clipcond train clip` writes these files itself; this command adds them to runs trained before it did, and to any
transformers `CLIPModel` folder that holds its tokenizer. What the files hold: `clipcond.models.open_clip_export`.
"""

from __future__ import annotations

import argparse
import json
import os

from clipcond.help_formatter import HelpFormatter
from clipcond.runlock import run_folder_lock

CHECK_TEXTS = ["a red circle", "A Big BLUE square, left of a green triangle.", "an image"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="clipcond export open-clip",
        description="Write open_clip_config.json and open_clip_model.safetensors into a CLIP run folder, so that "
        "open_clip.create_model_and_transforms('local-dir:RUN') and open_clip.get_tokenizer('local-dir:RUN') load "
        "it. Then load it both ways and print the largest difference of their embeddings (needs open_clip).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("run", metavar="RUN", help="a CLIP run folder (`clipcond train clip`) or a CLIPModel folder")
    parser.add_argument(
        "--no-check", action="store_true", help="write the files only, without loading them in open_clip"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not os.path.isdir(args.run):
        raise FileNotFoundError(f"RUN {args.run!r} is not a folder; pass the output folder of `clipcond train clip`")
    from clipcond.models.open_clip_export import compare_open_clip, export_clip_run

    with run_folder_lock(args.run, flag="RUN"):  # not while a training writes into it
        written = export_clip_run(args.run)
    result = {"run": args.run, "written": [p.name for p in written]}
    if not args.no_check:
        try:
            result["check"] = compare_open_clip(args.run, CHECK_TEXTS)
        except ImportError as err:  # open_clip is an optional extra; the files are written without it
            result["check"] = f"skipped: {err}"
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
