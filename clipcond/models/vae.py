"""The autoencoder of latent diffusion: diffusers' `AutoencoderKL` from named size presets (`presets/vae.json`), or a
pretrained one from a folder in Stable Diffusion's `vae/` layout.

Rombach et al. 2022 ("High-Resolution Image Synthesis with Latent Diffusion Models"): an encoder maps an image to a
diagonal Gaussian over a latent f times smaller per side (f = 2^(levels - 1)), a decoder maps a latent back. A
diffusion model then denoises latents scaled by `scaling_factor` (stored in the config, where diffusers' pipelines
read `vae.config.scaling_factor`) so that they have about unit variance, as its noise schedule assumes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from clipcond.models.presets import PRESETS_DIR, preset_fields, read_presets

PRESETS_FILE = PRESETS_DIR / "vae.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"  # what `save_pretrained` writes, and the one format we read


def vae_presets() -> dict[str, dict]:
    return read_presets(PRESETS_FILE)


def vae_config(preset: str, *, sample_size: int) -> dict:
    """An `AutoencoderKL` config from a preset name or a JSON file of the same fields, for images of `sample_size`
    px, which must be divisible by the downsampling factor."""
    config = preset_fields(preset, vae_presets(), "VAE", required=("block_out_channels",))
    factor = 2 ** (len(config["block_out_channels"]) - 1)
    if sample_size % factor:
        raise ValueError(f"`resolution` ({sample_size}) must be divisible by {factor}, the VAE's downsampling factor")
    config["sample_size"] = sample_size
    return config


def create_vae(config: dict) -> AutoencoderKL:
    return AutoencoderKL(**config)


def to_model_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 images in [0, 255] -> float in [-1, 1]: what the VAE encodes, and what a pixel-space UNet denoises."""
    if pixels.dtype != torch.uint8:
        raise ValueError(f"`pixels` must be uint8 in [0, 255], got {pixels.dtype}")
    return pixels.float() / 127.5 - 1.0


def downsampling_factor(vae) -> int:
    """Pixels per latent pixel along a side, of a VAE (any diffusers autoencoder with `block_out_channels`) or of
    its config (`load_vae_config`)."""
    config = vae if isinstance(vae, dict) else vae.config
    return 2 ** (len(config["block_out_channels"]) - 1)


def check_fits_resolution(vae, resolution: int, flag: str, path: str | os.PathLike) -> None:
    """A `ValueError` naming the resolution, `flag` and `path` when images of `resolution` px do not divide into
    whole latent pixels of `vae` (a VAE or its config)."""
    factor = downsampling_factor(vae)
    if resolution % factor:
        raise ValueError(
            f"`--resolution` {resolution} is not divisible by {factor}, the downsampling factor of `{flag}` "
            f"{os.fspath(path)!r}; choose a --resolution that is"
        )


def load_vae(path: str | os.PathLike, flag: str = "--vae") -> AutoencoderKL:
    """A pretrained `AutoencoderKL` from a local folder: SD's `vae/` folder itself (`config.json` and
    `diffusion_pytorch_model.safetensors`), or a pipeline folder that holds one in `vae/`. Safetensors weights
    only (a pickle file can run code when loaded). Errors name `flag` and the path."""
    return AutoencoderKL.from_pretrained(vae_folder(path, flag), use_safetensors=True, local_files_only=True)


def load_vae_config(path: str | os.PathLike, flag: str = "--vae") -> dict:
    """The config of the `AutoencoderKL` that `path` names, checked as `load_vae` checks it, without its weights."""
    return json.loads((vae_folder(path, flag) / "config.json").read_text())


def vae_folder(path: str | os.PathLike, flag: str = "--vae") -> Path:
    """The folder of the `AutoencoderKL` that `path` names (itself, or its `vae/`), checked as `load_vae` says."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"`{flag}` folder {str(path)!r} does not exist")
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(
            f"`{flag}` {str(path)!r} is not an AutoencoderKL folder: it has no config.json (nor vae/config.json); "
            "give the `vae/` folder of a Stable Diffusion pipeline or the output of `clipcond train vae`"
        )
    try:
        class_name = json.loads(config_file.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as err:
        raise ValueError(f"`{flag}` {str(path)!r}: {config_file} is not a JSON config ({err})") from None
    if class_name != "AutoencoderKL":
        raise ValueError(
            f"`{flag}` {str(path)!r} is not an AutoencoderKL folder: its config.json names _class_name {class_name!r}"
        )
    if not (folder / WEIGHTS_NAME).is_file():
        raise ValueError(
            f"`{flag}` {str(path)!r} has no {WEIGHTS_NAME} (only safetensors weights are read; convert a .bin with "
            "`AutoencoderKL.from_pretrained(...).save_pretrained(...)` where you trust it)"
        )
    return folder


@torch.no_grad()
def measure_scaling_factor(
    vae: AutoencoderKL, batches: Iterable[torch.Tensor], generator: torch.Generator | None = None
) -> float:
    """1 / the standard deviation of posterior samples over `batches` of images in [-1, 1] (B, 3, H, W): the
    factor that gives the latents unit variance, as Stable Diffusion measured its 0.18215 (Rombach et al. 2022,
    sec. 4.3.2: KL-regularised latents rescaled by 1 / their standard deviation, estimated on training data).
    Samples, not means: the diffusion model is trained on samples. `generator` draws them."""
    total, total_sq, count = 0.0, 0.0, 0
    device, dtype = vae.device, vae.dtype
    for pixels in batches:
        latents = vae.encode(pixels.to(device=device, dtype=dtype)).latent_dist.sample(generator).double()
        total += latents.sum().item()
        total_sq += latents.square().sum().item()
        count += latents.numel()
    if count < 2:
        raise ValueError("no images to measure the latent scaling factor on")
    variance = (total_sq - total * total / count) / (count - 1)
    if not variance > 0:
        raise ValueError(f"the VAE's latents have variance {variance} on these images; cannot scale them")
    return float(variance**-0.5)


def set_scaling_factor(vae: AutoencoderKL, value: float) -> None:
    """Store `value` as the config's `scaling_factor`, which `save_pretrained` writes and pipelines read."""
    vae.register_to_config(scaling_factor=float(value))
