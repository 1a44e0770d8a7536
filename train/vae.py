"""`clipcond train vae`: the autoencoder of latent diffusion, a diffusers `AutoencoderKL`, trained on images alone.

    clipcond train vae --data shapes/ --output-dir runs/vae
    clipcond train vae --data photos/ --init-vae sd/vae --model sd --output-dir runs/vae-ft
    accelerate launch -m clipcond.train.vae --data shapes/ --output-dir runs/vae

Rombach et al. 2022 ("High-Resolution Image Synthesis with Latent Diffusion Models", sec. 3.1): the encoder maps an
image to a diagonal Gaussian posterior over a latent f times smaller per side, a sample of it is decoded, and the
loss is the reconstruction error plus a small weight times the KL divergence of the posterior from N(0, I)
(`clipcond.loss.AutoencoderKLLoss`). The model is a preset of `clipcond/models/presets/vae.json` (`--model`), or
the pretrained `AutoencoderKL` of `--init-vae` fine-tuned.

Latent scaling: a latent diffusion model denoises latents times `scaling_factor`, chosen so that they have unit
variance (Stable Diffusion's 0.18215). Every export measures it on the training images (1 / the standard deviation
of posterior samples of `--scaling-factor-images` images, drawn by a generator of their own, so measuring changes
nothing in the training) and stores it in the saved config, where diffusers reads `vae.config.scaling_factor`;
`--scaling-factor X` stores X instead.

The run folder is the VAE itself (`config.json` + `diffusion_pytorch_model.safetensors`, what
`AutoencoderKL.from_pretrained(RUN)` loads), plus `clipcond_run.json` (arguments, data, the VAE's sizes and scaling
factor, summary with the last validation), `checkpoints/` (each with the VAE in `pretrained/`), `validation/`
(`step-<N>.png`: originals over their reconstructions; `step-<N>.json`: PSNR, L1 and MSE on the held-out split) and
`logs/`. Validation reconstructs from the posterior mean (what a decoder of latents sees), every
`--validation-steps` and at the end, on the first `--validation-max-images` images of `--validation-split`.
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL
from PIL import Image
from torch import nn

from clipcond.data.folders import ImageCaptionDataset, collate_image_text
from clipcond.data.open import (
    add_data_arguments,
    add_validation_split_argument,
    dataset_options,
    items_at,
    open_at_resolution,
    validation_split,
)
from clipcond.finite import finite_float
from clipcond.help_formatter import HelpFormatter
from clipcond.lineage import content_hash
from clipcond.loss import RECONSTRUCTION_LOSSES, AutoencoderKLLoss
from clipcond.models.vae import (
    check_fits_resolution,
    create_vae,
    downsampling_factor,
    load_vae,
    measure_scaling_factor,
    set_scaling_factor,
    to_model_range,
    vae_config,
)
from clipcond.plots import image_grid
from clipcond.storage import save_image_atomic, write_json_atomic
from clipcond.train.loop import (
    Stage,
    add_training_args,
    data_record,
    draw_rows,
    finish_run,
    make_output_dir,
    parse_training_args,
    prepare_training,
    run_stage,
    train,
)
from clipcond.transfer import to_device

logger = logging.getLogger(__name__)

DEFAULT_PRESET = "tiny"
GRID_COLUMNS = 8  # images per row of the validation grid (each row of originals has its reconstructions below)

# CPU-sized training defaults for the `tiny` VAE on the shapes data at 64 px
TRAINING_DEFAULTS = {
    "train_batch_size": 16,
    "learning_rate": 5e-4,
    "max_train_steps": 800,
    "lr_warmup_steps": 20,
    "weight_decay": 0.0,
    "checkpointing_steps": 100,
    "validation_steps": 100,
}


# --------------------------------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="clipcond train vae",
        description="Train the autoencoder of latent diffusion (diffusers AutoencoderKL): reconstruction + KL, the "
        "latent scaling factor measured on the data.",
        formatter_class=HelpFormatter,
    )
    data = parser.add_argument_group("data (images only: captions are not used)")
    add_data_arguments(data)
    data.add_argument(
        "--resolution", type=int, default=None, help="image size (default: the data set's, else its first image's)"
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        default=None,
        help=f"AutoencoderKL preset (test, tiny, sd) or a JSON config file (default: {DEFAULT_PRESET}; not with "
        "--init-vae)",
    )
    model.add_argument(
        "--init-vae",
        default=None,
        metavar="PATH",
        help="fine-tune a pretrained AutoencoderKL: a folder in Stable Diffusion's vae/ layout (config.json + "
        "diffusion_pytorch_model.safetensors), or a pipeline folder holding one in vae/",
    )
    loss = parser.add_argument_group("loss (Rombach et al. 2022, sec. 3.1)")
    loss.add_argument(
        "--reconstruction-loss",
        default="mse",
        choices=RECONSTRUCTION_LOSSES,
        help="pixel reconstruction error: mse (squared: a pixel's gradient grows with its error, so the few pixels of "
        "a small object drawn in the wrong colour weigh more; on the shapes data it learns colours in far fewer "
        "steps than l1) or l1 (LDM's, whose gradient is the same for a small error and a large one)",
    )
    loss.add_argument(
        "--kl-weight",
        type=finite_float,
        default=1e-6,
        help="weight of the KL divergence from N(0, I), per-sample sums as in LDM (their 1e-6)",
    )
    scaling = parser.add_argument_group("latent scaling factor (stored in the saved config)")
    scaling.add_argument(
        "--scaling-factor",
        default="measure",
        help="'measure': 1 / the standard deviation of the latents of training images, measured at every export; "
        "or a number to store as it is",
    )
    scaling.add_argument(
        "--scaling-factor-images", type=int, default=512, help="training images the scaling factor is measured on"
    )
    val = parser.add_argument_group("validation (reconstructions of held-out images: grid and PSNR)")
    add_validation_split_argument(val)
    val.add_argument("--validation-max-images", type=int, default=32, help="images reconstructed per validation")
    add_training_args(parser, **TRAINING_DEFAULTS)
    return parse_training_args(parser, argv, check_vae_args)


def check_vae_args(args: argparse.Namespace) -> None:
    """Reject values that would fail later or train nonsense, naming the option and the value."""
    if args.init_vae is not None and args.model is not None:
        raise ValueError(
            f"`--model` {args.model!r} and `--init-vae` {args.init_vae!r} both choose the VAE's sizes; give one"
        )
    if args.init_vae is None and args.model is None:
        args.model = DEFAULT_PRESET
    if args.kl_weight < 0:
        raise ValueError(f"`--kl-weight` must be >= 0, got {args.kl_weight}")
    for name in ("resolution", "scaling_factor_images", "validation_max_images"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"`--{name.replace('_', '-')}` must be >= 1, got {value}")
    if args.scaling_factor != "measure":
        try:
            value = float(args.scaling_factor)
        except ValueError:
            value = float("nan")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"`--scaling-factor` must be 'measure' or a number > 0, got {args.scaling_factor!r}")
        args.scaling_factor = value


# ------------------------------------------------------------------------------------------------- the model


class AutoencoderTraining(nn.Module):
    """The trained module: the VAE's encode, a posterior sample with noise given from outside (the stage's
    generator), decode; one `forward`, so that Accelerate's wrappers (DDP) see the whole step."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, pixels: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`pixels` (B, 3, H, W) in [-1, 1], `noise` (B, C, H/f, W/f) standard normal -> the reconstruction
        (B, 3, H, W) and the posterior's mean and log-variance (B, C, H/f, W/f)."""
        posterior = self.vae.encode(pixels).latent_dist
        latents = posterior.mean + posterior.std * noise.to(posterior.mean.dtype)  # reparameterised sample
        return self.vae.decode(latents).sample, posterior.mean, posterior.logvar


# -------------------------------------------------------------------------------------------------- the stage


@dataclass
class VaeValidation:
    """Reconstructions of the first images of a held-out split."""

    pixels: torch.Tensor  # (N, 3, H, W) uint8
    split: str
    out_dir: Path


@dataclass
class ScalingSettings:
    """How the exported config's `scaling_factor` is chosen: measured on `images`, or the `fixed` value."""

    fixed: float | None
    images: torch.Tensor | None  # (N, 3, H, W) uint8 training images, when measured
    batch_size: int
    seed: int


@dataclass(eq=False)
class VaeStage(Stage):
    """The autoencoder's loss, its validation (PSNR and a grid) and its export (scaling factor measured)."""

    accelerator: Accelerator
    model: nn.Module  # AutoencoderTraining, prepared
    loss_fn: AutoencoderKLLoss
    scaling: ScalingSettings
    validation: VaeValidation | None
    scaling_factor: float | None = None  # the value of the last export

    @property
    def unwrapped(self) -> AutoencoderKL:
        return self.accelerator.unwrap_model(self.model).vae

    def loss(self, batch, generator):
        device = self.accelerator.device
        pixels = to_model_range(to_device(batch["pixel_values"], device))  # (B, 3, H, W)
        vae = self.unwrapped
        factor, channels = downsampling_factor(vae), vae.config.latent_channels
        shape = (channels, pixels.shape[2] // factor, pixels.shape[3] // factor)
        on_generator = {"generator": generator, "device": generator.device}
        noise = draw_rows(lambda n: torch.randn((n, *shape), **on_generator), pixels.shape[0], device)
        reconstruction, mean, logvar = self.model(pixels, noise)
        return self.loss_fn(reconstruction, pixels, mean, logvar)

    def validate(self, step):
        if self.validation is None:
            return {}
        v = self.validation
        vae = self.unwrapped
        vae.eval()
        reconstructions = reconstruct(vae, v.pixels, batch_size=self.scaling.batch_size)
        metrics = reconstruction_metrics(v.pixels, reconstructions)
        v.out_dir.mkdir(parents=True, exist_ok=True)
        save_image_atomic(reconstruction_grid(v.pixels, reconstructions), v.out_dir / f"step-{step}.png")
        write_json_atomic(v.out_dir / f"step-{step}.json", {"step": step, "split": v.split, **metrics})
        return {k: value for k, value in metrics.items() if isinstance(value, float)}

    def export(self, path: Path):
        vae = self.unwrapped
        if self.scaling.fixed is not None:
            self.scaling_factor = self.scaling.fixed
        else:
            self.scaling_factor = latent_scaling_factor(vae, self.scaling)
        set_scaling_factor(vae, self.scaling_factor)
        vae.save_pretrained(path, safe_serialization=True)


def latent_scaling_factor(vae: AutoencoderKL, scaling: ScalingSettings) -> float:
    """`measure_scaling_factor` on the chosen training images, in batches, with a generator of its own."""
    was_training = vae.training
    vae.eval()
    generator = torch.Generator(device=vae.device).manual_seed(scaling.seed)
    batches = (to_model_range(chunk) for chunk in scaling.images.split(scaling.batch_size))
    value = measure_scaling_factor(vae, batches, generator)
    vae.train(was_training)
    return value


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, pixels: torch.Tensor, batch_size: int) -> torch.Tensor:
    """uint8 images (N, 3, H, W) -> their reconstructions from the posterior mean, float (N, 3, H, W) in [0, 1]."""
    out = []
    for chunk in pixels.split(batch_size):
        sample = to_model_range(chunk).to(device=vae.device, dtype=vae.dtype)
        latents = vae.encode(sample).latent_dist.mode()
        out.append(((vae.decode(latents).sample.float().cpu() + 1) / 2).clamp(0, 1))
    return torch.cat(out)


def reconstruction_metrics(originals: torch.Tensor, reconstructions: torch.Tensor) -> dict[str, float | int]:
    """PSNR in dB (the mean over images of 10 log10(1 / MSE), pixels in [0, 1]), and the mean L1 and MSE."""
    target = originals.float() / 255.0
    mse = (reconstructions - target).square().flatten(1).mean(dim=1)  # (N,)
    psnr = 10 * torch.log10(1.0 / mse.clamp_min(1e-10))
    return {
        "psnr": psnr.mean().item(),
        "l1": (reconstructions - target).abs().mean().item(),
        "mse": mse.mean().item(),
        "num_images": int(originals.shape[0]),
    }


def reconstruction_grid(originals: torch.Tensor, reconstructions: torch.Tensor) -> Image.Image:
    """Rows of up to `GRID_COLUMNS` originals, each with its reconstructions in the row below."""
    n, height, width = originals.shape[0], originals.shape[2], originals.shape[3]
    columns = min(GRID_COLUMNS, n)
    blank = Image.new("RGB", (width, height), (255, 255, 255))
    recon = (reconstructions * 255).round().to(torch.uint8)
    tiles = []
    for start in range(0, n, columns):
        for source in (originals, recon):
            row = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in source[start : start + columns]]
            tiles += row + [blank] * (columns - len(row))
    return image_grid(tiles, rows=len(tiles) // columns, cols=columns)


# -------------------------------------------------------------------------------------------- set-up steps


def build_vae(args: argparse.Namespace, resolution: int) -> AutoencoderKL:
    """The VAE of `--init-vae` or a fresh one of `--model`'s preset, for images of `resolution` px."""
    if args.init_vae is not None:
        vae = load_vae(args.init_vae, flag="--init-vae")
        check_fits_resolution(vae, resolution, "--init-vae", args.init_vae)
    else:
        vae = create_vae(vae_config(args.model, sample_size=resolution))
    if args.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    vae.train()
    logger.info(
        "VAE %s: %.2f M parameters; %d px -> %d x %d x %d latents",
        args.init_vae or repr(args.model),
        num_parameters(vae) / 1e6,
        resolution,
        vae.config.latent_channels,
        resolution // downsampling_factor(vae),
        resolution // downsampling_factor(vae),
    )
    return vae


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def evenly_spaced_pixels(dataset, count: int) -> torch.Tensor:
    """The uint8 images (N, 3, H, W) of `count` items spread evenly over `dataset` (all of them when it is smaller):
    the same images on every run and resume, whatever the data order."""
    n = len(dataset)
    indices = torch.linspace(0, n - 1, min(count, n)).round().long().unique().tolist()
    return torch.stack([item["pixel_values"] for item in items_at(dataset, indices)])


def make_validation(args: argparse.Namespace, resolution: int, output_dir: Path) -> VaeValidation | None:
    """The first `--validation-max-images` images of `--validation-split` (None when validation is off, or the
    default split is missing: `validation_split`)."""
    split = validation_split(args) if args.validation_steps else None
    if split is None:
        return None
    dataset = ImageCaptionDataset(args.data, split=split, resolution=resolution, **dataset_options(args))
    count = min(args.validation_max_images, len(dataset))
    pixels = torch.stack([dataset[i]["pixel_values"] for i in range(count)])
    return VaeValidation(pixels=pixels, split=split, out_dir=output_dir / "validation")


def run_record(args: argparse.Namespace, *, dataset, resolution: int, vae: AutoencoderKL, stage: VaeStage) -> dict:
    """The VAE's sections of the run record (after the export: it hashes the saved VAE)."""
    factor = downsampling_factor(vae)
    return {
        "data": data_record(
            args,
            len(dataset),
            resolution=resolution,
            validation_split=stage.validation.split if stage.validation is not None else None,
        ),
        "vae": {
            "preset": args.model,
            "init_vae": args.init_vae,
            "parameters": num_parameters(vae),
            "latent_channels": vae.config.latent_channels,
            "downsampling_factor": factor,
            "latent_size": resolution // factor,
            "scaling_factor": stage.scaling_factor,
            "scaling_factor_measured": stage.scaling.fixed is None,
            "scaling_factor_images": None if stage.scaling.images is None else int(stage.scaling.images.shape[0]),
            "content_hash": content_hash(Path(args.output_dir)),
        },
        "loss": {"reconstruction": args.reconstruction_loss, "kl_weight": args.kl_weight},
    }


# --------------------------------------------------------------------------------------------------- the entry


def main(argv: list[str] | None = None) -> int:
    return run_stage(parse_args(argv), train_vae)


def train_vae(accelerator: Accelerator, args: argparse.Namespace) -> int:
    # 2. Data, at its resolution (the VAE's downsampling must divide it)
    dataset, resolution = open_at_resolution(
        args.data, split=args.split, resolution=args.resolution, **dataset_options(args)
    )

    # 3. The VAE (a wrong --init-vae fails before anything is written)
    vae = build_vae(args, resolution)
    output_dir = make_output_dir(accelerator, args)
    model = AutoencoderTraining(vae)

    # 4. Optimizer, schedule; prepare
    prepared = prepare_training(accelerator, args, model)

    # 5. Train
    fixed = None if args.scaling_factor == "measure" else args.scaling_factor
    scaling = ScalingSettings(
        fixed=fixed,
        images=None if fixed is not None else evenly_spaced_pixels(dataset, args.scaling_factor_images),
        batch_size=args.train_batch_size,
        seed=args.seed,
    )
    stage = VaeStage(
        accelerator,
        prepared.model,
        AutoencoderKLLoss(args.reconstruction_loss, args.kl_weight),
        scaling,
        make_validation(args, resolution, output_dir),
    )
    result = train(accelerator, args, stage, prepared, dataset=dataset, collate_fn=collate_image_text)

    # 6. Save the VAE (scaling factor measured) and the run record
    def record() -> dict:
        return run_record(args, dataset=dataset, resolution=resolution, vae=stage.unwrapped, stage=stage)

    finish_run(accelerator, args, stage, result, "clipcond-vae", record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
