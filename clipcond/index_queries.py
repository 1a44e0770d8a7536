"""Queries of an image index (`clipcond.index.ImageIndex`): the index's CLIP, checked against the hash the index
records (`load_index_clip`), and the embedding of a text query (`embed_text`) or of an image
(`embed_image_query`). `clipcond search` and `clipcond serve` ask through them.
"""

from __future__ import annotations

import os

import torch

from clipcond.device import resolve_device
from clipcond.index import ImageIndex


@torch.no_grad()
def embed_text(clip_run, text: str) -> torch.Tensor:
    """The unit-norm embedding (D,) of a text query, on the CPU as the index's rows are."""
    return clip_run.encode_text([text])[0].cpu()


@torch.no_grad()
def embed_image_query(clip_run, path: str | os.PathLike, what: str = "--image") -> torch.Tensor:
    """The unit-norm embedding (D,) of an image file, decoded and resized as the index's images are."""
    from clipcond.index import embed_image_files

    embeddings, unreadable = embed_image_files(clip_run, [path])
    if unreadable:
        raise ValueError(f"`{what}` {os.fspath(path)!r} cannot be decoded as an image")
    return embeddings[0]


def load_index_clip(index: ImageIndex, model: str | None = None, device: str | None = None, flag: str = "--model"):
    """The index's CLIP: `model` (or the run folder recorded in the index), after checking its content hash; errors
    name `flag`, the command's flag for `model`."""
    from clipcond.lineage import content_hash
    from clipcond.models.clip import load_clip

    what, path = (flag, model) if model is not None else ("the index's CLIP", index.clip_path)
    if not os.path.isdir(path):
        hint = "" if model is not None else f"; pass the run folder with {flag} if it moved"
        raise FileNotFoundError(f"{what} {path!r} does not exist{hint}")
    index.check_model(content_hash(path), path, what=what)
    return load_clip(path, device=resolve_device(device), progress=False)  # no bar in front of the results
