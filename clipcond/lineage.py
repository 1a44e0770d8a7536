"""Which encoder a model was trained on: content hashes of saved model folders.

A decoder or prior records the hash of the CLIP it was conditioned on, so loading it beside another encoder can be
refused. The hash covers the weights and config files only, not logs, checkpoints or evaluation output.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin")
CONFIG_NAMES = ("config.json",)


def content_hash(folder: str | os.PathLike, *, chunk_size: int = 1 << 20) -> str:
    """SHA-256 over the config and weight files at the top of `folder` (sorted by name), as hex."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {str(folder)!r} does not exist")
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and (p.name in CONFIG_NAMES or p.suffix in WEIGHT_SUFFIXES)
    )
    if not any(p.suffix in WEIGHT_SUFFIXES for p in files):
        raise FileNotFoundError(f"model folder {str(folder)!r} holds no weight files (*.safetensors, *.bin)")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            while chunk := f.read(chunk_size):
                digest.update(chunk)
    return digest.hexdigest()
