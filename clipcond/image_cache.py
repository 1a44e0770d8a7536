"""What the per-image caches share: the CLIP image-embedding cache of the DALL-E 2 stages
(`clipcond.conditioning.ImageEmbeddingCache`) and the VAE posterior cache of latent diffusion
(`clipcond.latents.LatentCache`).

Each runs a frozen model once over a data set's images, in item order, and stores the outputs in
`CACHE_DIR/<kind>-<key>.safetensors`. The key hashes the kind and format version, the model's fingerprint, how the
images are read (resolution, crop, normalisation) and the image list itself (`image_list_identity`), so another model
or a changed image file gets a new file, never a stale one. The file is written to a temporary name and renamed; one
that cannot be read, or whose key or format differ, is rebuilt with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import safetensors
import torch
from tqdm.auto import tqdm

from clipcond.storage import dumps_json, save_tensors_atomic

logger = logging.getLogger(__name__)

Cache = TypeVar("Cache")
# What a cache file that cannot be used raises when read: it is then rebuilt.
UNUSABLE_CACHE_ERRORS = (OSError, ValueError, KeyError, safetensors.SafetensorError)


def image_list_identity(dataset) -> list[list]:
    """What decides a data set's pixels, file by file: `[path relative to the data set's root, bytes, mtime_ns]`
    for each item's image, in item order (paths outside the root stay absolute; an image skipped for lying outside
    the data folder, never read, is `[path, "outside"]`). For streamed WebDataset shards (`clipcond.data.webdataset`,
    items in shard order) the same of each shard file, by absolute path; of a remote shard, its URL and sample
    count."""
    if getattr(dataset, "shards", None) is not None:
        from clipcond.data.webdataset import is_remote

        identity = []
        for shard in dataset.shards:
            if is_remote(shard.path):  # a URL: its samples are what can be known without reading it again
                identity.append([shard.path, "remote", shard.num_samples])
                continue
            stat = shard.path.stat()
            identity.append([shard.path.resolve().as_posix(), stat.st_size, stat.st_mtime_ns])
        return identity
    root = Path(dataset.root).resolve()
    outside = set(getattr(dataset, "outside", ()))
    identity = []
    for i, path in enumerate(dataset.image_paths):
        resolved = Path(path).resolve()
        name = resolved.relative_to(root).as_posix() if resolved.is_relative_to(root) else resolved.as_posix()
        if i in outside:  # its row is the next readable image's, until --allow-outside-paths reads it
            identity.append([name, "outside"])
            continue
        stat = resolved.stat()
        identity.append([name, stat.st_size, stat.st_mtime_ns])
    return identity


def image_cache_key(kind: str, version: int, fingerprint: str, dataset, **pixels) -> str:
    """The key of a per-image cache of `kind` ("image-embeddings", "latents") at format `version`: the model's
    `fingerprint`, how `dataset` reads its images (its resolution and crop, and `pixels`, e.g. the normalisation)
    and its image list."""
    digest = hashlib.sha256()
    digest.update(f"clipcond-{kind}-v{version}\n".encode())
    digest.update(fingerprint.encode())
    read = {
        **pixels,
        "resolution": getattr(dataset, "resolution", None),
        "center_crop": getattr(dataset, "center_crop", True),
    }
    digest.update(json.dumps(read, sort_keys=True).encode())
    digest.update(json.dumps(image_list_identity(dataset)).encode())
    return digest.hexdigest()[:32]


def load_or_build(path: Path, load: Callable[[], Cache], build: Callable[[], Cache], what: str) -> Cache:
    """The cache in the file `path` (`load`), or, when there is none or it cannot be used, a new one (`build`, which
    also saves it). `what` names the cache in the log ("image-embedding", "latent")."""
    if path.is_file():
        try:
            cache = load()
            logger.info("loaded the %s cache %s", what, path)
            return cache
        except UNUSABLE_CACHE_ERRORS as err:
            logger.warning("the %s cache %s cannot be used (%s); rebuilding it", what, path, err)
    cache = build()
    logger.info("cached the %s rows of %d images in %s", what, len(cache), path)
    return cache


@torch.no_grad()
def encode_dataset(
    dataset,
    encode: Callable[[torch.Tensor], tuple[torch.Tensor, ...]],
    *,
    batch_size: int,
    desc: str,
    progress: bool = False,
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, list[str]]:
    """`encode` over `dataset`'s images in item order, a batch of uint8 pixels (B, 3, H, W) at a time: the
    concatenated outputs (each a CPU tensor with a row per image), the item index of each row (N,) (an unreadable
    image's row is the item the data set substitutes) and the unreadable files met."""
    from clipcond.data.folders import collate_image_text

    # A generator of its own: a DataLoader otherwise draws its base seed from the global RNG, so building a cache
    # would change what a training run initialises next, depending on whether the cache existed.
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_image_text, generator=torch.Generator()
    )
    parts, indices, skipped = [], [], []
    for batch in tqdm(loader, desc=desc, disable=not progress, dynamic_ncols=True):
        parts.append(encode(batch["pixel_values"]))
        indices.append(batch["index"])
        skipped += batch["skipped"]
    if skipped:
        logger.warning("%d unreadable image(s) replaced by the next readable one, e.g. %s", len(skipped), skipped[0])
    outputs = tuple(torch.cat(column) for column in zip(*parts, strict=True))
    return outputs, torch.cat(indices), sorted(set(skipped))


def save_image_cache(path: Path, tensors: dict[str, torch.Tensor], *, version: int, key: str, skipped: list[str]):
    """Write a per-image cache's `tensors` (a row per image) with its format `version`, `key` and the unreadable
    files met, atomically."""
    metadata = {
        "format": str(version),
        "key": key,
        "num_images": str(next(iter(tensors.values())).shape[0]),
        "skipped": dumps_json(skipped),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors_atomic({name: t.contiguous() for name, t in tensors.items()}, path, metadata)


def read_image_cache(path: Path, names: tuple[str, ...], *, version: int, key: str):
    """The tensors `names` of a per-image cache file and the unreadable files its build met; a `ValueError` when its
    key or format is not `key` and `version`."""
    with safetensors.safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {name: f.get_tensor(name) for name in names}
    if metadata.get("key") != key or metadata.get("format") != str(version):
        raise ValueError(f"its metadata {metadata} does not match key {key}")
    return tensors, json.loads(metadata.get("skipped", "[]"))
