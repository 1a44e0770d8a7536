"""Which encoder a model was trained on: content hashes of saved model folders.

A decoder or prior records the hash of the CLIP it was conditioned on, so loading it beside another encoder can be
refused. The hash covers the weights and config files only, not logs, checkpoints or evaluation output, nor the
copies of the weights in other libraries' layouts (`open_clip_model.safetensors`): exporting a run for open_clip,
at the end of training or later (`clipcond export open-clip`), leaves its identity as it was.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from clipcond.models.open_clip_export import OPEN_CLIP_FILES
from clipcond.runs import check_same_encoder

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin")
CONFIG_NAMES = ("config.json",)
DERIVED_NAMES = OPEN_CLIP_FILES  # the same weights in another layout: not part of a model's identity


def content_hash(folder: str | os.PathLike, *, chunk_size: int = 1 << 20) -> str:
    """SHA-256 over the config and weight files at the top of `folder` (sorted by name, `DERIVED_NAMES` left out),
    as hex."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {str(folder)!r} does not exist")
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and (p.name in CONFIG_NAMES or p.suffix in WEIGHT_SUFFIXES) and p.name not in DERIVED_NAMES
    )
    if not any(p.suffix in WEIGHT_SUFFIXES for p in files):
        raise FileNotFoundError(f"model folder {str(folder)!r} holds no weight files (*.safetensors, *.bin)")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        _update(digest, path, chunk_size)
    return digest.hexdigest()


def file_hash(path: str | os.PathLike, *, chunk_size: int = 1 << 20) -> str:
    """SHA-256 of one file's bytes, as hex (what a figure measured with a weights file records of it)."""
    digest = hashlib.sha256()
    _update(digest, Path(path), chunk_size)
    return digest.hexdigest()


def _update(digest, path: Path, chunk_size: int) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)


def check_evaluation_clip(clip: str | os.PathLike, trained_on: str | None, *, what: str, allow: bool) -> bool:
    """Whether the CLIP `clip` that an evaluation would embed with differs from the one `what` was trained on (content
    hash `trained_on`; None when unrecorded: nothing to compare). Figures in another CLIP's embedding space are not
    the model's, so a difference is a `ValueError` unless `allow` (`--allow-clip-mismatch`), then a warning; the
    caller records the answer with its figures."""
    if trained_on is None:
        return False
    found = content_hash(clip)
    return check_same_encoder(
        trained_on,
        found,
        mismatch=f"`--clip` {str(clip)!r} (content hash {found[:12]}...) is not the CLIP {what} was trained on "
        f"({trained_on[:12]}...): its CLIP figures would be in another embedding space",
        fix="pass the CLIP it was trained on, or --allow-clip-mismatch to evaluate anyway",
        allowed_by="--allow-clip-mismatch; recorded in the metrics",
        allow=allow,
        log=logger,
    )


def init_record(
    argument: str | os.PathLike | None, folder: str | os.PathLike | None = None, *, known_hash: str | None = None
) -> dict:
    """Where a model's initial weights came from, for a run record: the `--init-*` argument as given and the content
    hash of the folder it resolved to, or `known_hash` when the source was hashed already (`--init-from
    open_clip:MODEL@WEIGHTS` has no folder); {} when the model started from its preset at random (neither given)."""
    if folder is None and known_hash is None:
        return {}
    return {"init_from": {"path": os.fspath(argument), "content_hash": known_hash or content_hash(folder)}}
