"""The latent cache of latent diffusion training: a VAE's posterior over every image of a data set, computed once.

A latent decoder (`clipcond train decoder --vae VAE`) never runs the VAE's encoder while it trains: the encoder's
diagonal Gaussian posterior of each image, its mean and standard deviation, is stored once, and each training step
draws a fresh sample mean + std * noise from it (as mosaicml's Stable Diffusion training caches latents; Rombach et
al. 2022 train on posterior samples). Caching the mean alone would drop the posterior's noise, which the decoder of
the VAE was trained to absorb.

The file is `CACHE_DIR/latents-<key>.safetensors`, where `key` hashes the VAE (`model_fingerprint`: class, config,
weights), the resolution and crop, and the image list, as every per-image cache does (`clipcond.image_cache`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from clipcond.conditioning import model_fingerprint
from clipcond.finite import check_finite_tensor
from clipcond.image_cache import encode_dataset, image_cache_key, load_or_build, read_image_cache, save_image_cache
from clipcond.models.vae import downsampling_factor, to_model_range

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
        return image_cache_key("latents", LATENT_CACHE_FORMAT_VERSION, model_fingerprint(vae), dataset)

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

        def build() -> LatentCache:
            encoding = {"batch_size": batch_size, "device": device, "progress": progress}
            mean, std, item_indices, skipped = encode_posteriors(vae, dataset, **encoding)
            check_finite_tensor(mean, f"the VAE's posterior means (to be cached in {str(path)!r})")
            cache = cls(mean, std, item_indices, key, path, skipped)
            cache._save()
            return cache

        return load_or_build(path, lambda: cls._load(path, len(dataset), key), build, "latent")

    def _save(self) -> None:
        tensors = {"mean": self.mean, "std": self.std, "item_indices": self.item_indices}
        save_image_cache(self.path, tensors, version=LATENT_CACHE_FORMAT_VERSION, key=self.key, skipped=self.skipped)

    @classmethod
    def _load(cls, path: Path, num_images: int, key: str) -> LatentCache:
        names = ("mean", "std", "item_indices")
        tensors, skipped = read_image_cache(path, names, version=LATENT_CACHE_FORMAT_VERSION, key=key)
        mean, std = tensors["mean"], tensors["std"]
        if mean.ndim != 4 or mean.shape[0] != num_images or std.shape != mean.shape:
            raise ValueError(f"it holds {tuple(mean.shape)} latents for {num_images} images")
        check_finite_tensor(mean, "its tensor 'mean'")
        return cls(mean, std, tensors["item_indices"], key, path, skipped)


@torch.no_grad()
def encode_posteriors(
    vae, dataset, *, batch_size: int = 64, device=None, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """The posterior mean and std (N, C, h, w) fp16 of every item of `dataset`, the index of the item each row came
    from (N,), and the unreadable files met."""
    device = torch.device(device) if device is not None else vae.device
    factor = downsampling_factor(vae)

    def encode(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if pixels.shape[-1] % factor or pixels.shape[-2] % factor:
            raise ValueError(
                f"the data set gives {tuple(pixels.shape[-2:])} images, not divisible by the VAE's downsampling "
                f"factor {factor}; choose a resolution that is"
            )
        sample = to_model_range(pixels.to(device)).to(vae.dtype)
        posterior = vae.encode(sample).latent_dist
        return posterior.mean.to("cpu", torch.float16), posterior.std.to("cpu", torch.float16)

    (mean, std), indices, skipped = encode_dataset(
        dataset, encode, batch_size=batch_size, desc="encoding latents", progress=progress
    )
    return mean, std, indices, skipped
