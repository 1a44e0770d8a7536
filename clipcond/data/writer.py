"""Writing a data set in the imagefolder layout that `clipcond.data.folders` reads: `OUT/train/`, `OUT/test/` (each
images + `metadata.jsonl`) and `OUT/dataset_info.json`, written last, whose presence marks a complete data set."""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

from clipcond.storage import dumps_json, write_text_atomic

SPLITS = ("train", "test")
DATASET_INFO = "dataset_info.json"


def prepare_dataset_dir(out: Path, overwrite: bool) -> None:
    """Make `out` ready for a new data set: refuse a non-empty folder unless `overwrite`, and then remove only what a
    data set writer makes (the split folders and the dataset_info), never other files a user keeps beside them."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"output directory {out} is not empty; pass --overwrite (overwrite=True) to replace it"
            )
        (out / DATASET_INFO).unlink(missing_ok=True)  # first: a half-replaced folder must not look complete
        for name in SPLITS:
            if (out / name).is_dir():
                shutil.rmtree(out / name)
    out.mkdir(parents=True, exist_ok=True)


def write_metadata(split_dir: Path, records: Iterable[dict]) -> None:
    """The split's `metadata.jsonl`, one JSON object a line (each names its image in `file_name`), written
    atomically: a split folder read on its own (`--data OUT/train`) is never half listed."""
    write_text_atomic(split_dir / "metadata.jsonl", "".join(dumps_json(record) + "\n" for record in records))
