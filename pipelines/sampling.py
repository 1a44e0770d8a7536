"""What the pipelines' sampling shares, written once: the sampling arguments of a call as one value (`Sampling`),
the timesteps and which of them are guided, the initial noise, the denoising loop with classifier-free guidance,
and the conversion of the denoised sample to the output type (decoding a VAE's latents first, where a pipeline
denoises them).

Each pipeline keeps what is its own: the model it calls, what conditions it and the shape of its noise.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Container
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput, ModelMixin, SchedulerMixin
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from clipcond.models.vae import downsampling_factor
from clipcond.pipelines.inputs import check_guidance_interval, check_output_type, check_sampling_args, guided_steps


@dataclass(frozen=True, eq=False)
class Sampling:
    """How one pipeline call samples, by the names of the pipelines' `__call__` arguments (their docstrings say
    more): the stages read these from one value instead of taking them one by one."""

    num_inference_steps: int
    guidance_scale: float  # classifier-free guidance weight; 1 or less: the conditional model alone
    generator: torch.Generator | list[torch.Generator] | None = None
    latents: torch.Tensor | None = None  # the initial noise, unscaled; drawn from `generator` when None
    output_type: str = "pil"
    # The guided steps, fractions of the steps counted from the noisiest (`guided_steps`); all of them by default.
    guidance_start: float = 0.0
    guidance_end: float = 1.0

    @property
    def do_guidance(self) -> bool:
        return self.guidance_scale > 1.0

    def check(
        self,
        num_images_per_prompt,
        batch_size: int,
        output_types: tuple[str, ...],
        inputs: str = "prompts",
        output: str = "image",
    ) -> int:
        """Check the arguments (a `ValueError` naming the first bad one) for `batch_size` inputs (`inputs` in
        messages) making `num_images_per_prompt` `output`s each; returns the number of outputs. `latents` is left
        to the pipeline, which knows its shape."""
        num_images = check_sampling_args(
            self.num_inference_steps,
            self.guidance_scale,
            num_images_per_prompt,
            self.generator,
            batch_size,
            inputs=inputs,
            output=output,
        )
        check_guidance_interval(self.guidance_start, self.guidance_end)
        check_output_type(self.output_type, output_types)
        return num_images


def set_timesteps(scheduler: SchedulerMixin, sampling: Sampling, device: torch.device) -> range:
    """Set the scheduler's timesteps for `sampling`; returns the indices of the steps that apply guidance (none
    when it is off)."""
    scheduler.set_timesteps(sampling.num_inference_steps, device=device)
    if not sampling.do_guidance:
        return range(0)
    return guided_steps(len(scheduler.timesteps), sampling.guidance_start, sampling.guidance_end)


def initial_noise(
    scheduler: SchedulerMixin,
    sampling: Sampling,
    shape: tuple[int, ...],
    *,
    device: torch.device,
    dtype: torch.dtype,
    noise_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The first sample: `sampling.latents`, or noise of `shape` drawn from `sampling.generator` (one generator per
    sample: each sample's noise is its own), in `noise_dtype` (default `dtype`), scaled for the scheduler."""
    latents = sampling.latents
    if latents is None:
        latents = randn_tensor(shape, generator=sampling.generator, device=device, dtype=noise_dtype or dtype)
    return latents.to(device=device, dtype=dtype) * scheduler.init_noise_sigma


def classifier_free_guidance(prediction: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """The guided prediction x_uncond + w (x_cond - x_uncond) from a batch [unconditional; conditional] (Ho &
    Salimans 2022, "Classifier-Free Diffusion Guidance")."""
    uncond, cond = prediction.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def denoise(
    pipeline: DiffusionPipeline,
    model: torch.nn.Module,
    latents: torch.Tensor,
    sampling: Sampling,
    guided: Container[int],
    inputs: dict[str, Any],
    *,
    guided_inputs: dict[str, Any] | None = None,
    callback_on_step_end: Callable[[DiffusionPipeline, int, torch.Tensor, dict], dict] | None = None,
) -> torch.Tensor:
    """The denoising loop over `pipeline.scheduler`'s timesteps (`set_timesteps`): the denoised sample.

    On the steps in `guided`, `model` sees the batch twice, [unconditional; conditional], and its prediction is
    guided; on the others once. `inputs` are the model's conditioning keyword arguments; `guided_inputs` those of the
    doubled batch, where they differ (the text pipelines guide every step or none and pass one batch that fits).
    `callback_on_step_end(pipeline, step, timestep, {"latents": latents})` may replace the latents after a step.
    """
    scheduler = pipeline.scheduler
    # Ancestral samplers (DDPM, Euler ancestral) draw fresh noise in `step`, from the same generator(s): with one
    # generator per sample, that noise too is each sample's own.
    accepts_generator = "generator" in inspect.signature(scheduler.step).parameters
    step_kwargs = {"generator": sampling.generator} if accepts_generator else {}
    for i, t in enumerate(pipeline.progress_bar(scheduler.timesteps)):
        guide = i in guided
        model_input = torch.cat([latents] * 2) if guide else latents
        model_input = scheduler.scale_model_input(model_input, t)
        conditioning = guided_inputs if guide and guided_inputs is not None else inputs
        prediction = model(model_input, t, **conditioning, return_dict=False)[0]
        if guide:
            prediction = classifier_free_guidance(prediction, sampling.guidance_scale)
        # epsilon, v_prediction or sample: the scheduler reads its own `prediction_type`.
        latents = scheduler.step(prediction, t, latents, **step_kwargs, return_dict=False)[0]
        if callback_on_step_end is not None:
            latents = callback_on_step_end(pipeline, i, t, {"latents": latents}).get("latents", latents)
    return latents


def vae_scale_factor(vae: AutoencoderKL | None, space_to_depth: int = 1) -> int:
    """Image pixels per pixel of what the UNet denoises, along a side: `vae`'s downsampling factor, or without a VAE
    the side of the `space_to_depth` pixel blocks (1: the pixels as they are)."""
    return space_to_depth if vae is None else downsampling_factor(vae)


def check_vae_fits(unet: ModelMixin | None, vae: AutoencoderKL | None, space_to_depth: int = 1) -> None:
    """A `ValueError` when the UNet does not denoise latents of the VAE's width, or without a VAE pixels as
    `space_to_depth` blocks (3 F^2 channels); `space_to_depth` is for pixel space only."""
    if space_to_depth < 1:
        raise ValueError(f"`space_to_depth` must be >= 1, got {space_to_depth}")
    if vae is not None and space_to_depth != 1:
        raise ValueError(f"`space_to_depth` {space_to_depth} is for pixel space; a pipeline with a `vae` has none")
    if unet is None:
        return
    channels = unet.config.in_channels
    if vae is not None:
        if channels != vae.config.latent_channels:
            raise ValueError(
                f"the UNet denoises {channels} channels, but the VAE's latents have {vae.config.latent_channels}; "
                "train the UNet on this VAE's latents"
            )
        return
    if channels != 3 * space_to_depth**2:
        side = math.isqrt(channels // 3)
        trained = (
            f"it was trained on pixels as {side}x{side} blocks (`--space-to-depth {side}`)"
            if side >= 1 and 3 * side**2 == channels
            else "it denoises latents: give the pipeline the `vae` it was trained with"
        )
        raise ValueError(
            f"the UNet denoises {channels} channels, but pixels as {space_to_depth}x{space_to_depth} blocks have "
            f"{3 * space_to_depth**2}; {trained}"
        )


def to_output_type(
    image_processor: VaeImageProcessor,
    sample: torch.Tensor,
    output_type: str,
    vae: AutoencoderKL | None = None,
    space_to_depth: int = 1,
):
    """The denoised sample (B, C, h, w) as `output_type`: "latent" as it is; "pil", "np" or "pt" in [0, 1], clamped,
    converted in float32 (numpy has no bfloat16). Without a `vae` the sample is pixels in [-1, 1] (as F x F blocks,
    (B, 3 F^2, H/F, W/F), when `space_to_depth` F > 1: rearranged back first); with one it is the VAE's latents times
    `scaling_factor` (as latent diffusion trains on them, Rombach et al. 2022), which are unscaled and decoded into
    pixels first, as Stable Diffusion does."""
    if output_type == "latent":
        return sample
    if vae is not None:
        sample = vae.decode(sample.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    elif space_to_depth > 1:
        sample = torch.nn.functional.pixel_shuffle(sample, space_to_depth)
    return image_processor.postprocess(sample.float(), output_type=output_type)


def image_output(images, return_dict: bool) -> ImagePipelineOutput | tuple:
    """The images as an `ImagePipelineOutput`, or a tuple `(images,)` when not `return_dict`."""
    if not return_dict:
        return (images,)
    return ImagePipelineOutput(images=images)
