"""What a training step of a latent decoder costs beside a pixel-space one of the same widths (a benchmark, not a test).

    python benchmarks/latent_step_cost.py [--presets tiny] [--precision fp32 bf16] [--resolution 64] [--vae tiny]
        [--batch-size 32] [--steps 10] [--space-to-depth F] [--save-results]

Issue 19's target: at 64 px, the latent text-to-image decoder trains "at a lower cost per training step than a
pixel-space UNet of the same widths". One process builds both contenders on the same device and precision and times
them alternately (`common.alternate`), one optimizer step each per round, each with `clipcond train decoder`'s own
step (`benchmarks/decoder_throughput.clipcond_step`: cached text states, caption dropout, noise, UNet, loss,
backward, AdamW, EMA):

- pixels: the UNet preset on `--resolution` px RGB images (`PixelSpace`);
- latents: the same preset (same `block_out_channels`, blocks and attention) on the `--vae` preset's latents of
  those images (64 px through the `tiny` VAE: 16 x 16 x 4), each step drawing a posterior sample from the cache
  (`LatentSpace`), as `clipcond train decoder --vae` does;
- with `--space-to-depth F`, also blocks: the same preset on the images' pixels as F x F blocks (3 F^2 channels at
  1/F of the size; `PixelSpace`), as `clipcond train decoder --space-to-depth F` trains, reported under `blocks`
  (`ratio`: pixel-step time / block-step time).

It prints one JSON object: per preset and precision the median samples/s of each, the median over rounds of
pixel-step time / latent-step time (`ratio`, > 1: the latent step is cheaper), and the one-off cost the latent path
pays instead: seconds per image to encode the training images' posteriors once (the cache), and how many training
steps of the pixel UNet that equals per image of the data set.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from common import add_case_args, add_results_flag, alternate, ratio_summary, run_cases
from decoder_throughput import _setup, clipcond_step


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/latent_step_cost.py", description=__doc__.split("\n\n")[0]
    )
    add_case_args(
        parser,
        presets_help="UNet presets (and the CLIP presets of the frozen text encoder)",
        batch_size=32,
        batch_help="samples per step (`clipcond train decoder`'s default)",
        attention=["default"],
        attention_help="clipcond's attention choice on both sides",
    )
    parser.set_defaults(presets=["tiny"])
    parser.add_argument("--resolution", type=int, default=64, help="image size of both contenders (default 64)")
    parser.add_argument("--vae", default="tiny", help="VAE preset of the latent contender (default tiny)")
    parser.add_argument(
        "--space-to-depth",
        type=int,
        default=1,
        metavar="F",
        help="also time the UNet on the pixels as F x F blocks (default 1: not timed)",
    )
    parser.add_argument("--seed", type=int, default=0)
    add_results_flag(parser, results_name="latent_step_cost")
    args = parser.parse_args(argv)
    if args.space_to_depth < 1 or args.resolution % args.space_to_depth:
        parser.error(
            f"--space-to-depth must be >= 1 and divide --resolution {args.resolution}, got {args.space_to_depth}"
        )
    return args


def latent_setup(shared, vae_preset: str, folder: Path, seed: int):
    """The latent contender's shared inputs (its UNet sized for the latents) and a factory of its `LatentSpace`: a
    randomly initialised VAE of `vae_preset` saved to `folder`, with the batch's posteriors cached. Also returns the
    seconds per image that caching took (the encoder's one pass over the data)."""
    from clipcond.latents import LatentCache
    from clipcond.models.unet import unet_config
    from clipcond.models.vae import create_vae, downsampling_factor, vae_config
    from clipcond.train.model_space import LatentSpace

    resolution = shared.pixels.shape[-1]
    torch.manual_seed(seed)
    vae = create_vae(vae_config(vae_preset, sample_size=resolution)).eval()
    vae.save_pretrained(folder, safe_serialization=True)
    start = time.perf_counter()
    with torch.no_grad():
        posterior = vae.encode(shared.pixels.float() / 127.5 - 1.0).latent_dist
    encode_seconds = (time.perf_counter() - start) / len(shared.pixels)
    mean, std = posterior.mean.half(), posterior.std.half()
    rows = torch.arange(len(mean))
    cache = LatentCache(mean, std, rows, key="benchmark", path=folder / "latents.safetensors", skipped=[])

    latent = copy.copy(shared)
    spec = shared.unet_spec
    latent.unet_spec = unet_config(
        shared.preset,
        sample_size=resolution // downsampling_factor(vae),
        cross_attention_dim=spec["cross_attention_dim"],
        in_channels=vae.config.latent_channels,
        encoder_hid_dim=spec.get("encoder_hid_dim"),
    )

    def space(device):
        return LatentSpace(vae, cache, resolution, str(folder))

    return latent, space, encode_seconds


def blocks_setup(shared, factor: int):
    """The blocks contender's shared inputs (its UNet sized for F x F pixel blocks) and a factory of its space."""
    from clipcond.models.unet import unet_config
    from clipcond.train.model_space import PixelSpace

    resolution = shared.pixels.shape[-1]
    blocks = copy.copy(shared)
    spec = shared.unet_spec
    blocks.unet_spec = unet_config(
        shared.preset,
        sample_size=resolution // factor,
        cross_attention_dim=spec["cross_attention_dim"],
        in_channels=3 * factor**2,
        encoder_hid_dim=spec.get("encoder_hid_dim"),
    )

    def space(device):
        return PixelSpace(resolution, factor)

    return blocks, space


def run_case(preset: str, precision: str, attention: str, args: argparse.Namespace) -> dict:
    from clipcond.train.loop import reset_accelerate_state

    shared = _setup(preset, args.batch_size, args.seed, args.resolution)
    shared.preset = preset
    reset_accelerate_state()  # a fresh Accelerator for each precision
    with tempfile.TemporaryDirectory(prefix="clipcond-bench-") as tmp:
        latent, space, encode_seconds = latent_setup(shared, args.vae, Path(tmp) / "vae", args.seed)
        pixels, pixel_params, device = clipcond_step(shared, precision, tmp, args.seed)
        latents, latent_params, _ = clipcond_step(latent, precision, tmp, args.seed, space=space)
        steps = {"latents": latents, "pixels": pixels}
        if args.space_to_depth > 1:
            blocks, blocks_space = blocks_setup(shared, args.space_to_depth)
            steps["blocks"], blocks_params, _ = clipcond_step(blocks, precision, tmp, args.seed, space=blocks_space)
        seconds = alternate(steps, rounds=args.steps, warmup=args.warmup)
    result = ratio_summary(seconds, args.batch_size, ours="latents", theirs="pixels")
    if args.space_to_depth > 1:
        of_blocks = ratio_summary(seconds, args.batch_size, ours="blocks", theirs="pixels")
        result["blocks"] = {
            "space_to_depth": args.space_to_depth,
            "sample_size": blocks.unet_spec["sample_size"],
            "params_M": round(blocks_params / 1e6, 3),
            "ratio": of_blocks["ratio"],
            "ratio_min_max": of_blocks["ratio_min_max"],
        }
    pixel_step_per_image = min(seconds["pixels"]) / args.batch_size
    result["cache_encode_seconds_per_image"] = round(encode_seconds, 5)
    result["cache_encode_in_pixel_steps_per_image"] = round(encode_seconds / pixel_step_per_image, 3)
    result["params_M"] = {"latents": round(latent_params / 1e6, 3), "pixels": round(pixel_params / 1e6, 3)}
    result["sample_size"] = {"latents": latent.unet_spec["sample_size"], "pixels": shared.unet_spec["sample_size"]}
    result["resolution"] = args.resolution
    result["vae"] = args.vae
    result["device"] = device.type
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cases(
        "latent_step_cost",
        args,
        argv,
        unit="samples/s",
        goal="ratio > 1 (a latent step cheaper than a pixel step of the same UNet widths)",
        run_case=run_case,
    )


if __name__ == "__main__":
    raise SystemExit(main())
