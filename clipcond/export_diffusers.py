"""`clipcond export diffusers RUN OUT`: a decoder or prior run folder written before run folders shipped their code,
as a folder that stock diffusers loads without clipcond.

    clipcond export diffusers runs/old_decoder exports/decoder
    python -c "from diffusers import DiffusionPipeline; DiffusionPipeline.from_pretrained('exports/decoder', trust_remote_code=True)"

The run's pipeline is loaded with clipcond and saved at OUT with its code (`clipcond.pipeline_code`), as training
now saves every run; the run record (`clipcond_run.json`) is copied with it, so OUT is still the run to clipcond
(`--prior` pairing checks the CLIP it names). The folder is written beside OUT and renamed into place.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from clipcond.help_formatter import HelpFormatter
from clipcond.hub import local_files_only
from clipcond.pipeline_loading import pipeline_class_name
from clipcond.runs import RUN_RECORD
from clipcond.storage import check_output_dir, new_folder

# The pipelines of the runs that `clipcond train decoder` and `clipcond train prior` write, by their class names.
EXPORTABLE = {
    "TextToImagePipeline": "clipcond.pipelines.text_to_image",
    "ImageVariationPipeline": "clipcond.pipelines.variation",
    "PriorPipeline": "clipcond.pipelines.prior",
}


def export_diffusers(run: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the decoder or prior run folder `run` with its pipeline's code at `out` (which must not exist)."""
    import importlib

    from clipcond.pipeline_code import ship_pipeline_code

    run, out = Path(run), Path(out)
    class_name = pipeline_class_name(run, "RUN")
    if class_name not in EXPORTABLE:
        raise ValueError(
            f"`RUN` {str(run)!r} holds {class_name or 'a pipeline of unknown class'}; expected one of "
            f"{sorted(EXPORTABLE)} (the output folder of `clipcond train decoder` or `clipcond train prior`)"
        )
    if out.exists():
        raise FileExistsError(f"`OUT` {str(out)!r} exists; pass a new folder")
    pipeline_class = getattr(importlib.import_module(EXPORTABLE[class_name]), class_name)
    pipe = pipeline_class.from_pretrained(run, local_files_only=local_files_only())
    with new_folder(out) as scratch:
        pipe.save_pretrained(scratch, safe_serialization=True)
        ship_pipeline_code(pipe, scratch)
        if (run / RUN_RECORD).is_file():
            shutil.copy2(run / RUN_RECORD, scratch / RUN_RECORD)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="clipcond export diffusers",
        description="Write a decoder or prior run folder with its pipeline's code, so that stock diffusers loads it "
        "with DiffusionPipeline.from_pretrained(OUT, trust_remote_code=True), without clipcond (runs trained now "
        "ship it already).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("run", metavar="RUN", help="a `clipcond train decoder` or `clipcond train prior` run folder")
    parser.add_argument("out", metavar="OUT", help="the new folder (must not exist)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_output_dir(args.out, "OUT")
    out = export_diffusers(args.run, args.out)
    print(
        f"wrote {out}: load it with diffusers.DiffusionPipeline.from_pretrained({str(out)!r}, trust_remote_code=True)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
