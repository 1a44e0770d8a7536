"""The latent cache of latent diffusion training: a VAE's posterior over every image of a data set, computed once.

A latent decoder (`clipcond train decoder --vae VAE`) never runs the VAE's encoder while it trains: the encoder's
diagonal Gaussian posterior of each image, its mean and standard deviation, is stored once, and each training step
draws a fresh sample mean + std * noise from it (as mosaicml's Stable Diffusion training caches latents; Rombach et
al. 2022 train on posterior samples). Caching the mean alone would drop the posterior's noise, which the decoder of
the VAE was trained to absorb.

The file is `CACHE_DIR/latents-<key>.safetensors`, where `key` hashes the VAE (`model_fingerprint`: class, config,
weights), the resolution and crop, and the image list (`image_list_identity`): another VAE or a changed image file
gets a new file, never a stale one. It is written to a temporary name and renamed; a file that cannot be read is
rebuilt with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from tqdm.auto import tqdm

from clipcond.conditioning import image_list_identity, model_fingerprint
from clipcond.finite import check_finite_tensor
from clipcond.storage import dumps_json, save_tensors_atomic

logger = logging.getLogger(__name__)

LATENT_CACHE_FORMAT_VERSION = 1


class LatentCache:
    """Row i holds the posterior of what `dataset[i]` returns: `mean` and `std` (N, C, h, w) fp16, unscaled (the
    VAE's own units; the consumer multiplies samples by `scaling_factor`). For an unreadable image that is the item
    the data set substitutes, whose index is `item_indices[i]` (i for readable images): pair row i with the caption
    of `item_indices[i]`."""

    def __init__(
        self,
        mean: torch.Tensor,
        std: torch.Tensor,
        item_indices: torch.Tensor,
        key: str,
        path: Path,
        skipped: list[str],
    ):
        assert mean.shape == std.shape and mean.ndim == 4 and item_indices.shape == (mean.shape[0],), "one per item"
        # Contiguous whatever the source (a posterior's mean is a strided half of the encoder's moments): the rows
        # a step reads then have the same memory layout whether the cache was just built or read from its file, and
        # so do the UNet's convolutions, which round differently on other layouts (exact resume depends on it).
        self.mean = mean.contiguous()  # (N, C, h, w) fp16
        self.std = std.contiguous()  # (N, C, h, w) fp16
        self.item_indices = item_indices  # (N,) int64
        self.key = key
        self.path = path
        self.skipped = skipped  # unreadable image files met while building

    def __len__(self) -> int:
        return self.mean.shape[0]

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one latent."""
        return tuple(self.mean.shape[1:])

    def lookup(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows (B,) -> their posterior mean and std (B, C, h, w), float32 on the CPU."""
        return self.mean[rows].float(), self.std[rows].float()

    @staticmethod
    def cache_key(vae, dataset) -> str:
        digest = hashlib.sha256()
        digest.update(f"clipcond-latents-v{LATENT_CACHE_FORMAT_VERSION}\n".encode())
        digest.update(model_fingerprint(vae).encode())
        pixels = {
            "resolution": getattr(dataset, "resolution", None),
            "center_crop": getattr(dataset, "center_crop", True),
        }
        digest.update(json.dumps(pixels, sort_keys=True).encode())
        digest.update(json.dumps(image_list_identity(dataset)).encode())
        return digest.hexdigest()[:32]

    @classmethod
    def build_or_load(
        cls,
        vae,
        dataset,
        cache_dir: str | os.PathLike,
        *,
        batch_size: int = 64,
        device: torch.device | str | None = None,
        progress: bool = True,
    ) -> LatentCache:
        """Load the posteriors of `dataset`'s images under `vae` (a diffusers `AutoencoderKL`) from `cache_dir`, or
        compute and store them. `dataset`: an `ImageCaptionDataset` or streamed shards, at the resolution to train
        at (a multiple of the VAE's downsampling factor)."""
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
        if len(dataset) == 0:
            raise ValueError(f"the data set {dataset!r} is empty; there is nothing to encode")
        key = cls.cache_key(vae, dataset)
        path = Path(cache_dir) / f"latents-{key}.safetensors"
        if path.is_file():
            try:
                cache = cls._load(path, len(dataset), key)
                logger.info("loaded %d cached latents from %s", len(cache), path)
                return cache
            except (OSError, ValueError, KeyError, safetensors.SafetensorError) as err:
                logger.warning("the latent cache %s cannot be used (%s); rebuilding it", path, err)
        mean, std, item_indices, skipped = encode_posteriors(
            vae, dataset, batch_size=batch_size, device=device, progress=progress
        )
        check_finite_tensor(mean, f"the VAE's posterior means (to be cached in {str(path)!r})")
        cache = cls(mean, std, item_indices, key, path, skipped)
        cache._save()
        logger.info("cached the latents of %d images in %s", len(cache), path)
        return cache

    def _save(self) -> None:
        tensors = {
            "mean": self.mean.contiguous(),
            "std": self.std.contiguous(),
            "item_indices": self.item_indices.contiguous(),
        }
        metadata = {
            "format": str(LATENT_CACHE_FORMAT_VERSION),
            "key": self.key,
            "num_images": str(len(self)),
            "skipped": dumps_json(self.skipped),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        save_tensors_atomic(tensors, self.path, metadata)

    @classmethod
    def _load(cls, path: Path, num_images: int, key: str) -> LatentCache:
        with safetensors.safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            mean, std, item_indices = f.get_tensor("mean"), f.get_tensor("std"), f.get_tensor("item_indices")
        if metadata.get("key") != key or metadata.get("format") != str(LATENT_CACHE_FORMAT_VERSION):
            raise ValueError(f"its metadata {metadata} does not match key {key}")
        if mean.ndim != 4 or mean.shape[0] != num_images or std.shape != mean.shape:
            raise ValueError(f"it holds {tuple(mean.shape)} latents for {num_images} images")
        check_finite_tensor(mean, "its tensor 'mean'")
        return cls(mean, std, item_indices, key, path, json.loads(metadata.get("skipped", "[]")))


@torch.no_grad()
def encode_posteriors(
    vae, dataset, *, batch_size: int = 64, device=None, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """The posterior mean and std (N, C, h, w) fp16 of every item of `dataset`, the index of the item each row came
    from (N,), and the unreadable files met."""
    from clipcond.data.folders import collate_image_text

    device = torch.device(device) if device is not None else vae.device
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    # A generator of its own: a DataLoader otherwise draws its base seed from the global RNG, so building a cache
    # would change what a training run initialises next, depending on whether the cache existed.
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_image_text, generator=torch.Generator()
    )
    means, stds, indices, skipped = [], [], [], []
    for batch in tqdm(loader, desc="encoding latents", disable=not progress, dynamic_ncols=True):
        pixels = batch["pixel_values"]  # (B, 3, H, W) uint8
        if pixels.shape[-1] % factor or pixels.shape[-2] % factor:
            raise ValueError(
                f"the data set gives {tuple(pixels.shape[-2:])} images, not divisible by the VAE's downsampling "
                f"factor {factor}; choose a resolution that is"
            )
        sample = (pixels.to(device).float() / 127.5 - 1.0).to(vae.dtype)
        posterior = vae.encode(sample).latent_dist
        means.append(posterior.mean.to("cpu", torch.float16))
        stds.append(posterior.std.to("cpu", torch.float16))
        indices.append(batch["index"])
        skipped += batch["skipped"]
    if skipped:
        logger.warning("%d unreadable image(s) replaced by the next readable one, e.g. %s", len(skipped), skipped[0])
    return torch.cat(means), torch.cat(stds), torch.cat(indices), sorted(set(skipped))
