"""What the decoder's UNet denoises, a choice orthogonal to what it is conditioned on (`decoder_conditioning`):
pixels in [-1, 1] (`PixelSpace`, the default), or a VAE's latents (`LatentSpace`, `--vae VAE`: latent diffusion,
Rombach et al. 2022).

In pixel space `--space-to-depth F` hands the UNet each image rearranged into F x F blocks, (3 F^2, H/F, W/F)
(torch's `pixel_unshuffle`; the pipeline's `pixel_shuffle` undoes it): the same pixels, nothing learnt or lost, while
every feature map of the UNet is F times smaller along each side, so a step costs about what a step on (H/F, W/F)
images costs. Simple diffusion (Hoogeboom et al. 2023, sec. 3.3) downsamples its input this way to avoid
high-resolution feature maps; here it is the pixel path's answer to the latent path's cheaper steps, without a VAE.

The latent path encodes the training images once into a `clipcond.latents.LatentCache` (the posterior's mean and
std, in the run's cache folder), so a training step reads no image and runs no encoder: it draws a posterior sample
mean + std * noise (the noise from the stage's generator, for the global batch: `draw_rows`) and scales it by the
VAE's `scaling_factor`, which is what the pipeline divides by before decoding. The pipeline holds the VAE and
decodes the UNet's samples into images; the x0 clipping of the pixel path (to [-1, 1]) is off, as latents have no
such bound.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import AutoencoderKL

from clipcond.data.folders import collate_image_text
from clipcond.latents import LatentCache
from clipcond.lineage import content_hash
from clipcond.models.presets import preset_fields
from clipcond.models.unet import sample_size_multiple, unet_presets
from clipcond.models.vae import (
    check_fits_resolution,
    downsampling_factor,
    load_vae,
    load_vae_config,
    to_model_range,
    vae_folder,
)
from clipcond.train.loop import draw_rows
from clipcond.transfer import to_device

logger = logging.getLogger(__name__)


def add_vae_args(model: argparse._ArgumentGroup) -> None:
    model.add_argument(
        "--vae",
        default=None,
        metavar="PATH",
        help="train on this AutoencoderKL's latents (latent diffusion): the output of `clipcond train vae`, or a "
        "folder in Stable Diffusion's vae/ layout; its posteriors are cached once (default: pixel space)",
    )
    model.add_argument(
        "--space-to-depth",
        type=int,
        default=1,
        metavar="F",
        help="pixel space: the UNet denoises each image as F x F blocks, (3 F^2, H/F, W/F), the same pixels at about "
        "the cost of a UNet on H/F images; the pipeline rearranges its samples back (default 1: the pixels as they are)",
    )


def check_space_args(args: argparse.Namespace) -> None:
    """Reject a `--space-to-depth` that is not a block side, or that comes with `--vae`, naming both."""
    factor = args.space_to_depth
    if factor < 1:
        raise ValueError(f"`--space-to-depth` must be >= 1, got {factor}")
    if factor > 1 and args.vae is not None:
        raise ValueError(
            f"`--space-to-depth {factor}` is for pixel space; with `--vae {args.vae}` the UNet denoises latents"
        )


def check_space_fits(args: argparse.Namespace, resolution: int) -> None:
    """Reject a `--space-to-depth` whose blocks do not tile the images, a `--vae` whose latents do not, or either
    leaving the `--model` preset's UNet too small a sample to halve at each of its levels, naming the options and the
    sizes. Reads the VAE's config only: before anything is encoded."""
    factor = args.space_to_depth
    if resolution % factor:
        raise ValueError(f"`--space-to-depth {factor}` must divide the image size {resolution}")
    if args.vae is not None:
        config = load_vae_config(args.vae)
        check_fits_resolution(config, resolution, "--vae", args.vae)
        side, option, fix = resolution // downsampling_factor(config), f"`--vae {args.vae}`", "another --resolution"
    elif factor > 1:
        side, option, fix = resolution // factor, f"`--space-to-depth {factor}`", "a smaller factor"
    else:
        return
    if getattr(args, "init_unet", None):
        return  # the pretrained UNet's own levels apply, checked when it is loaded
    multiple = sample_size_multiple(preset_fields(args.model, unet_presets(), "UNet"))
    if side % multiple:
        raise ValueError(
            f"{option} leaves the UNet {side} x {side} samples of `--resolution {resolution}` images, but a "
            f"`--model {args.model}` UNet needs a multiple of {multiple}; use {fix}"
        )


class PixelSpace:
    """The UNet denoises the images' pixels in [-1, 1] at the data's resolution, or (`space_to_depth` F > 1) the
    same pixels as F x F blocks: (3 F^2, H/F, W/F)."""

    kind = "pixels"
    vae = None
    content_hash = None  # of the VAE: none
    clip_sample = True  # predicted x0 are clipped to the data range at each sampling step

    def __init__(self, resolution: int, space_to_depth: int = 1):
        self.resolution, self.space_to_depth = resolution, space_to_depth
        self.channels = 3 * space_to_depth**2
        self.sample_size = resolution // space_to_depth

    def training_data(self, dataset) -> tuple[torch.utils.data.Dataset, Callable]:
        """What the loop iterates and how it batches: the images themselves."""
        return dataset, collate_image_text

    def sample(self, batch: dict, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """The batch's clean samples (B, 3 F^2, H/F, W/F); (B, 3, H, W) when F = 1."""
        pixels = to_model_range(to_device(batch["pixel_values"], device))
        return F.pixel_unshuffle(pixels, self.space_to_depth) if self.space_to_depth > 1 else pixels

    def pipeline_modules(self) -> dict:
        """What the pipeline needs to turn the UNet's samples into images."""
        return {"space_to_depth": self.space_to_depth} if self.space_to_depth > 1 else {}

    def record(self) -> dict:
        return {"space": self.kind, "sample_size": self.sample_size, "space_to_depth": self.space_to_depth}


class _LatentRows(torch.utils.data.Dataset):
    """Item i: row i of the latent cache and the data set index of the item it was encoded from."""

    def __init__(self, item_indices: torch.Tensor):
        self.item_indices = item_indices

    def __len__(self) -> int:
        return len(self.item_indices)

    def __getitem__(self, row: int) -> tuple[int, int]:
        return row, int(self.item_indices[row])


def _collate_latent_rows(items: list[tuple[int, int]], skipped: tuple[str, ...] = ()) -> dict:
    """A batch of cache rows. `skipped`: the image files the cache could not read when it was built (the next
    readable image stands in for each), reported with every batch so that the loop counts them against
    `--max-skipped-fraction` as it counts the files the pixel path meets."""
    rows, indices = zip(*items, strict=True)
    return {"latent_row": torch.tensor(rows), "index": torch.tensor(indices), "skipped": list(skipped)}


class LatentSpace:
    """The UNet denoises the VAE's latents times `scaling_factor`, sampled each step from the cached posteriors."""

    kind = "latents"
    clip_sample = False
    space_to_depth = 1  # pixel space's option: latents are denoised as they are

    def __init__(self, vae: AutoencoderKL, cache: LatentCache, resolution: int, vae_path: str):
        self.vae, self.cache, self.resolution, self.vae_path = vae, cache, resolution, vae_path
        self.channels, self.sample_size, _ = cache.latent_shape
        self.scaling_factor = float(vae.config.scaling_factor)
        self.content_hash = content_hash(vae_folder(vae_path))  # of the files read: checked on resume

    def training_data(self, dataset) -> tuple[torch.utils.data.Dataset, Callable]:
        """What the loop iterates and how it batches: cache rows (the conditioning reads their items' indices)."""
        return _LatentRows(self.cache.item_indices), partial(_collate_latent_rows, skipped=tuple(self.cache.skipped))

    def sample(self, batch: dict, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """Posterior samples of the batch's latents, scaled: (B, C, h, w)."""
        mean, std = self.cache.lookup(batch["latent_row"])
        on_generator = {"generator": generator, "device": generator.device}
        noise = draw_rows(lambda n: torch.randn((n, *mean.shape[1:]), **on_generator), mean.shape[0], device)
        return (to_device(mean, device) + to_device(std, device) * noise) * self.scaling_factor

    def pipeline_modules(self) -> dict:
        """What the pipeline needs to turn the UNet's samples into images: the VAE that decodes them."""
        return {"vae": self.vae}

    def record(self) -> dict:
        return {
            "space": self.kind,
            "sample_size": self.sample_size,
            "vae": {
                "path": self.vae_path,
                "content_hash": self.content_hash,
                "scaling_factor": self.scaling_factor,
                "latent_channels": self.channels,
                "downsampling_factor": downsampling_factor(self.vae),
            },
            "latent_cache": {"path": str(self.cache.path), "key": self.cache.key, "skipped": self.cache.skipped},
        }


def model_space(
    args: argparse.Namespace, accelerator: Accelerator, dataset, resolution: int, cache_dir: Path
) -> PixelSpace | LatentSpace:
    """Pixels, or with `--vae` its latents of `dataset` at `resolution` (cached by the main process first; the
    others then read its file)."""
    if args.vae is None:
        return PixelSpace(resolution, args.space_to_depth)
    vae = load_vae(args.vae, flag="--vae")
    check_fits_resolution(vae, resolution, "--vae", args.vae)
    vae.requires_grad_(False).eval().to(accelerator.device)
    with accelerator.main_process_first():
        cache = LatentCache.build_or_load(
            vae,
            dataset,
            cache_dir,
            batch_size=args.encode_batch_size,
            device=accelerator.device,
            progress=accelerator.is_local_main_process,
        )
    logger.info(
        "latent diffusion: %d px images -> %d x %d x %d latents (scaling factor %.5f)",
        resolution,
        cache.latent_shape[0],
        cache.latent_shape[1],
        cache.latent_shape[2],
        float(vae.config.scaling_factor),
    )
    return LatentSpace(vae, cache, resolution, args.vae)
