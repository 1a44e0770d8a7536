"""The unCLIP decoder as a diffusers pipeline: image -> CLIP image embedding -> new images (image variations).

`ImageVariationPipeline` embeds images with the frozen CLIP vision tower (`CLIPVisionModelWithProjection`, the
pixel statistics of its `feature_extractor`), and denoises pixels with a `UNet2DConditionModel` conditioned on the
embedding through `class_labels` (`class_embed_type="projection"`) and, when the decoder has them, K tokens of
cross-attention context (`ImageEmbeddingTokens`); Ramesh et al. 2022, sec. 2.1, in the layout of diffusers'
`StableUnCLIPImg2ImgPipeline`. How an embedding becomes the UNet's inputs, and what the unconditional input is,
lives in `clipcond.models.image_embedding`, which training uses too. With a `vae` (a decoder trained with
`--vae`) the UNet denoises the VAE's latents instead of pixels and they are decoded at the end; with
`space_to_depth` F > 1 (`--space-to-depth F`) it denoises the pixels as F x F blocks, rearranged back at the end; both
as in `clipcond.pipelines.text_to_image` (`clipcond.pipelines.sampling.to_output_type`).

It also decodes given embeddings (`image_embeds=`, e.g. from the prior: `clipcond.pipelines.unclip`) and
interpolates between two images (`interpolate`). `save_pretrained` writes `unet/`, `scheduler/`,
`image_encoder/`, `feature_extractor/`, `embedding_tokens/` (a clipcond model, recorded in `model_index.json` under
its module `clipcond.models.image_embedding`, which importing this module imports; a run folder ships that module
in `embedding_tokens/` with the pipeline's code, `clipcond.pipeline_code`), with noise augmentation
`image_noising_scheduler/`, and in latent space `vae/`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiffusionPipeline,
    ImagePipelineOutput,
    SchedulerMixin,
    UNet2DConditionModel,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from clipcond.finite import check_finite_tensor
from clipcond.models.clip_pixels import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, normalize_pixels
from clipcond.models.image_embedding import (
    ImageEmbeddingTokens,
    check_decoder_fits,
    decoder_condition,
    unconditional_condition,
    unet_inputs,
)
from clipcond.pipelines.inputs import DEFAULT_GUIDANCE_START, DEFAULT_IMAGE_EMBEDDING_GUIDANCE_SCALE, check_latents
from clipcond.pipelines.interpolation import (
    InterpolationOutput,
    check_one_generator,
    clone_generator,
    interpolation_times,
    slerp,
)
from clipcond.pipelines.sampling import (
    Sampling,
    check_vae_fits,
    denoise,
    image_output,
    initial_noise,
    set_timesteps,
    to_output_type,
    vae_scale_factor,
)
from clipcond.pipelines.shipped_code import ShippedCodeMixin

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
ImageInput = PIL.Image.Image | Sequence[PIL.Image.Image] | torch.Tensor


def images_to_pixels(image: ImageInput, size: int) -> torch.Tensor:
    """PIL image(s) or a uint8 tensor (3, H, W) / (B, 3, H, W) -> uint8 (B, 3, size, size) on the CPU.

    Images of another size are centre-cropped to a square and resized (bicubic, antialiased); images already at
    `size` pass unchanged, as the training data set's did on their way into the embedding cache.
    """
    if isinstance(image, PIL.Image.Image):
        image = [image]
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.ndim not in (3, 4) or image.shape[-3] != 3:
            raise ValueError(
                f"`image` as a tensor must be uint8 (3, H, W) or (B, 3, H, W), got {image.dtype} {tuple(image.shape)}"
            )
        pixels = (image[None] if image.ndim == 3 else image).cpu()
        height, width = pixels.shape[-2:]
        if (height, width) != (size, size):
            side = min(height, width)
            top, left = (height - side) // 2, (width - side) // 2
            pixels = pixels[..., top : top + side, left : left + side].float()
            pixels = F.interpolate(pixels, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
            pixels = pixels.round().clamp(0, 255).to(torch.uint8)
        return pixels
    arrays = []
    for i, item in enumerate(image):
        if not isinstance(item, PIL.Image.Image):
            raise ValueError(
                f"`image` must be a PIL image, a list of PIL images or a uint8 tensor; item {i} is {type(item).__name__}"
            )
        item = item.convert("RGB")
        if item.size != (size, size):
            side = min(item.size)
            left, top = (item.width - side) // 2, (item.height - side) // 2
            item = item.crop((left, top, left + side, top + side)).resize((size, size), PIL.Image.BICUBIC)
        arrays.append(np.asarray(item))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (B, 3, S, S)


def count_images(image) -> int:
    """How many images `image` holds (a PIL image, a non-empty list of them, or uint8 (3, H, W) / (B, 3, H, W)); a
    `ValueError` naming `image` for anything else."""
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.ndim not in (3, 4) or image.shape[-3] != 3:
            raise ValueError(
                f"`image` as a tensor must be uint8 (3, H, W) or (B, 3, H, W), got {image.dtype} {tuple(image.shape)}"
            )
        return 1 if image.ndim == 3 else image.shape[0]
    if isinstance(image, PIL.Image.Image):
        return 1
    if isinstance(image, list | tuple) and image and all(isinstance(i, PIL.Image.Image) for i in image):
        return len(image)
    raise ValueError(
        f"`image` must be a PIL image, a non-empty list of PIL images or a uint8 tensor (B, 3, H, W), got "
        f"{type(image).__name__}"
    )


def check_image_embeds(image_embeds, embedding_dim: int) -> None:
    """`image_embeds`: finite CLIP image embeddings (B, D) of the decoder's width D."""
    if not isinstance(image_embeds, torch.Tensor) or image_embeds.ndim != 2:
        raise ValueError(
            f"`image_embeds` must be a tensor (B, D), got {type(image_embeds).__name__} "
            f"{tuple(getattr(image_embeds, 'shape', ()))}"
        )
    if image_embeds.shape[1] != embedding_dim:
        raise ValueError(
            f"`image_embeds` must be {embedding_dim} wide (the image encoder's projection_dim), got "
            f"shape {tuple(image_embeds.shape)}"
        )
    check_finite_tensor(image_embeds, "`image_embeds`", "pass finite embeddings (a prior or cache gone wrong?)")


def register_decoder_modules(
    pipe: DiffusionPipeline,
    unet: UNet2DConditionModel,
    scheduler: SchedulerMixin,
    image_encoder: CLIPVisionModelWithProjection,
    embedding_tokens: ImageEmbeddingTokens | None,
    feature_extractor: CLIPImageProcessor | None,
    image_noising_scheduler: DDPMScheduler | None,
    vae: AutoencoderKL | None = None,
    space_to_depth: int = 1,
) -> None:
    """Check that the decoder's components fit one another, then register them on `pipe` under these names (and
    `space_to_depth` in its config): the whole of `ImageVariationPipeline`, the decoder half of
    `clipcond.pipelines.unclip.UnCLIPTextToImagePipeline`."""
    if unet is not None and image_encoder is not None:
        check_decoder_fits(unet, image_encoder.config.projection_dim, embedding_tokens, image_noising_scheduler)
    check_vae_fits(unet, vae, space_to_depth)
    pipe.register_modules(
        unet=unet,
        scheduler=scheduler,
        image_encoder=image_encoder,
        embedding_tokens=embedding_tokens,
        feature_extractor=feature_extractor,
        image_noising_scheduler=image_noising_scheduler,
        vae=vae,
    )
    pipe.register_to_config(space_to_depth=space_to_depth)


class ImageVariationPipeline(ShippedCodeMixin, DiffusionPipeline):
    r"""Images from CLIP image embeddings (unCLIP's decoder), with classifier-free guidance.

    Args:
        unet: a `UNet2DConditionModel` with `class_embed_type="projection"` whose class-embedding input is the
            condition vector of `clipcond.models.image_embedding` (D wide, 2D with noise augmentation).
        scheduler: a diffusers scheduler fitting the UNet's noise schedule.
        image_encoder: the frozen CLIP vision tower; its `projection_dim` is the embedding width D.
        embedding_tokens: the `ImageEmbeddingTokens` trained with the UNet, when it has cross-attention blocks.
        feature_extractor: a `CLIPImageProcessor` whose `image_mean` / `image_std` are the CLIP's pixel statistics
            (OpenAI's when None).
        image_noising_scheduler: the noise schedule of the embedding's noise augmentation, when the decoder was
            trained with it (`--noise-level`); it enables the `noise_level` argument.
        vae: optional `AutoencoderKL`; when given the UNet denoises its latents (scaled by its `scaling_factor`).
        space_to_depth: without a `vae`, the side F of the pixel blocks the UNet denoises (3 F^2 channels at 1/F of
            the image size; `clipcond train decoder --space-to-depth`); 1: the pixels as they are.
    """

    model_cpu_offload_seq = "image_encoder->embedding_tokens->unet->vae"
    _optional_components = ["embedding_tokens", "feature_extractor", "image_noising_scheduler", "vae"]

    def __init__(
        self,
        unet: UNet2DConditionModel,
        scheduler: SchedulerMixin,
        image_encoder: CLIPVisionModelWithProjection,
        embedding_tokens: ImageEmbeddingTokens | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        image_noising_scheduler: DDPMScheduler | None = None,
        vae: AutoencoderKL | None = None,
        space_to_depth: int = 1,
    ):
        super().__init__()
        register_decoder_modules(
            self,
            unet,
            scheduler,
            image_encoder,
            embedding_tokens,
            feature_extractor,
            image_noising_scheduler,
            vae,
            space_to_depth,
        )
        self.vae_scale_factor = vae_scale_factor(vae, space_to_depth)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @property
    def embedding_dim(self) -> int:
        """D, the width of the CLIP image embeddings the decoder reads."""
        return self.image_encoder.config.projection_dim

    @property
    def sample_size(self) -> int:
        """The side of what the UNet denoises: pixels, pixel blocks, or with a VAE latent pixels."""
        size = self.unet.config.sample_size
        return size if isinstance(size, int) else size[0]

    @property
    def image_size(self) -> int:
        """The side in pixels of the images the pipeline makes."""
        return self.sample_size * self.vae_scale_factor

    @property
    def max_noise_level(self) -> int:
        """The largest `noise_level` accepted: 0 without noise augmentation."""
        if self.image_noising_scheduler is None:
            return 0
        return self.image_noising_scheduler.config.num_train_timesteps - 1

    # ------------------------------------------------------------------------------------------------ inputs

    @torch.no_grad()
    def encode_image(self, image: ImageInput, device: torch.device | None = None) -> torch.Tensor:
        """Image(s) -> their CLIP image embeddings (B, D), L2-normalised, float32.

        Pixels are normalised with the feature extractor's mean and std exactly as the training embedding cache
        did (`clipcond.models.clip_pixels.normalize_pixels` on uint8 images at the encoder's resolution).
        """
        device = device or self._execution_device
        pixels = images_to_pixels(image, self.image_encoder.config.image_size).to(device)
        if self.feature_extractor is not None:
            mean, std = self.feature_extractor.image_mean, self.feature_extractor.image_std
        else:
            mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        pixel_values = normalize_pixels(pixels, mean, std).to(self.image_encoder.dtype)
        embeds = self.image_encoder(pixel_values=pixel_values).image_embeds
        return F.normalize(embeds.float(), dim=-1)

    def check_inputs(self, image, image_embeds, sampling: Sampling, num_images_per_prompt, noise_level) -> None:
        """Raise a `ValueError` naming the first bad argument of `__call__` (`sampling` holds most of them)."""
        if (image is None) == (image_embeds is None):
            raise ValueError(
                "give exactly one of `image` and `image_embeds`, got " + ("both" if image is not None else "neither")
            )
        if image is not None:
            batch_size = count_images(image)
        else:
            check_image_embeds(image_embeds, self.embedding_dim)
            batch_size = image_embeds.shape[0]
        num_images = sampling.check(num_images_per_prompt, batch_size, OUTPUT_TYPES, inputs="inputs")
        self._check_noise_level(noise_level)
        check_latents(sampling.latents, self._noise_shape(num_images))

    def _check_noise_level(self, noise_level) -> None:
        if isinstance(noise_level, bool) or not isinstance(noise_level, int):
            raise ValueError(f"`noise_level` must be an integer, got {noise_level!r}")
        if self.image_noising_scheduler is None and noise_level != 0:
            raise ValueError(
                f"`noise_level` must be 0: this decoder was trained without noise augmentation, got {noise_level}"
            )
        if not 0 <= noise_level <= self.max_noise_level:
            raise ValueError(f"`noise_level` must be in [0, {self.max_noise_level}], got {noise_level}")

    def _noise_shape(self, num_images: int) -> tuple[int, int, int, int]:
        return (num_images, self.unet.config.in_channels, self.sample_size, self.sample_size)

    # ----------------------------------------------------------------------------------------------- sampling

    @torch.no_grad()
    def __call__(
        self,
        image: ImageInput | None = None,
        image_embeds: torch.Tensor | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = DEFAULT_IMAGE_EMBEDDING_GUIDANCE_SCALE,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        noise_level: int = 0,
        output_type: str = "pil",
        return_dict: bool = True,
        guidance_start: float = DEFAULT_GUIDANCE_START,
        guidance_end: float = 1.0,
    ) -> ImagePipelineOutput | tuple:
        r"""Generate variations of images, or images from given CLIP image embeddings.

        Args:
            image: a PIL image, a list of them, or uint8 images (B, 3, H, W); embedded with `image_encoder`.
            image_embeds: CLIP image embeddings (B, D) instead of images (normalised here), e.g. the prior's.
            num_inference_steps: denoising steps.
            guidance_scale: classifier-free guidance weight w in eps_uncond + w (eps_cond - eps_uncond), where the
                unconditional input is the zero condition vector; 1 or less: one UNet batch, no guidance.
            num_images_per_prompt: images per input image (or embedding); they come input by input.
            generator: a torch generator, or one per image: with one per image, each image depends on its own
                generator only, so a batch equals its images generated one at a time. Each image's generator draws
                its initial noise, then (with noise augmentation) its embedding noise, then the sampler's noise.
            latents: initial noise (num_images, C, h, w) of the UNet's sample shape (pixels, pixel blocks or the
                VAE's latents), unscaled (drawn from `generator` when None).
            noise_level: noise augmentation of the embedding (Stable unCLIP's `noise_level`), in
                [0, `max_noise_level`]; higher: more variety, less likeness. Only for decoders trained with it.
            output_type: "pil", "np" (float (B, H, W, 3) in [0, 1]), "pt" (float (B, 3, H, W) in [0, 1]) or
                "latent" (the denoised sample: pixels in [-1, 1] terms (as blocks with `space_to_depth`), or the VAE's
                scaled latents).
            return_dict: return an `ImagePipelineOutput` rather than a tuple `(images,)`.
            guidance_start, guidance_end: guidance applies on the sampling steps from `guidance_start` to
                `guidance_end`, fractions of `num_inference_steps` counted from the noisiest step
                (`clipcond.pipelines.inputs.guided_steps`); the other steps run the conditional model alone.
        """
        # 1. check inputs
        sampling = Sampling(
            num_inference_steps, guidance_scale, generator, latents, output_type, guidance_start, guidance_end
        )
        self.check_inputs(image, image_embeds, sampling, num_images_per_prompt, noise_level)
        device = self._execution_device

        # 2. encode image
        if image_embeds is None:
            image_embeds = self.encode_image(image, device)
        image_embeds = image_embeds.to(device).repeat_interleave(num_images_per_prompt, dim=0)  # (N, D)

        # 3.-7. timesteps, noise, condition, denoise, postprocess
        return image_output(self.decode(image_embeds, sampling, noise_level), return_dict)

    def decode(
        self,
        image_embeds: torch.Tensor,
        sampling: Sampling,
        noise_level: int = 0,
        embedding_noise: torch.Tensor | None = None,
    ):
        """One image per embedding (N, D): the stages after encoding, shared with `interpolate` and the unCLIP
        pipeline. `embedding_noise` (N, D): the noise augmentation's noise (drawn after the initial noise when None).
        Inputs are checked by the callers."""
        device = self._execution_device

        # 3. timesteps, and those that are guided
        guided = set_timesteps(self.scheduler, sampling, device)

        # 4. initial noise, drawn in float32 (first: each image's generator draws its latents, then its embedding noise)
        shape = self._noise_shape(image_embeds.shape[0])
        latents = initial_noise(
            self.scheduler, sampling, shape, device=device, dtype=self.unet.dtype, noise_dtype=torch.float32
        )

        # 5. condition: the condition vector (and its tokens); [unconditional; conditional] for the guided steps
        condition = decoder_condition(
            image_embeds.to(device),
            noising_scheduler=self.image_noising_scheduler,
            noise_level=noise_level,
            noise=embedding_noise,
            generator=sampling.generator,
        )  # (N, D) or (N, 2D)
        conditional = unet_inputs(condition, self.embedding_tokens, dtype=self.unet.dtype)
        guided_conditioning = None
        if len(guided):
            both = torch.cat([unconditional_condition(condition), condition])
            guided_conditioning = unet_inputs(both, self.embedding_tokens, dtype=self.unet.dtype)

        # 6. denoising loop: one UNet batch of 2N on guided steps, of N on the others
        latents = denoise(self, self.unet, latents, sampling, guided, conditional, guided_inputs=guided_conditioning)

        # 7. decode / postprocess: [-1, 1] (or the VAE's latents) -> output_type
        images = to_output_type(
            self.image_processor,
            latents,
            sampling.output_type,
            vae=self.vae,
            space_to_depth=self.config.space_to_depth,
        )
        self.maybe_free_model_hooks()
        return images

    # -------------------------------------------------------------------------------------------- interpolation

    @torch.no_grad()
    def interpolate(
        self,
        image: Sequence[PIL.Image.Image] | torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        num_frames: int = 5,
        num_inference_steps: int = 25,
        guidance_scale: float = DEFAULT_IMAGE_EMBEDDING_GUIDANCE_SCALE,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        noise_level: int = 0,
        output_type: str = "pil",
        return_dict: bool = True,
        guidance_start: float = DEFAULT_GUIDANCE_START,
        guidance_end: float = 1.0,
    ) -> InterpolationOutput | tuple:
        r"""A row of `num_frames` images between two images (or two embeddings), every frame from the same noise.

        The frames decode `slerp(e_A, e_B, t)` for t evenly spaced in [0, 1]. The noise (initial latents, then the
        augmentation's embedding noise) is drawn once from `generator`, as `__call__` draws an image's, and shared
        by all frames: the first and last frames are the plain variations of A and B with the same generator.

        Args:
            image: two PIL images, or uint8 images (2, 3, H, W).
            image_embeds: two CLIP image embeddings (2, D) instead.
            generator: one torch generator (not a list).
            latents: the initial noise of every frame (1, C, h, w).
            Others as in `__call__`.
        """
        # 1.-3. check inputs, the endpoints' embeddings, the frames
        sampling = Sampling(
            num_inference_steps, guidance_scale, generator, latents, output_type, guidance_start, guidance_end
        )
        return self.interpolate_row(image, image_embeds, num_frames, sampling, noise_level, return_dict)

    def interpolate_row(
        self, image, image_embeds, num_frames: int, sampling: Sampling, noise_level: int, return_dict: bool = True
    ) -> InterpolationOutput | tuple:
        """The stages of `interpolate` (shared with the unCLIP pipeline's), its arguments gathered in `sampling`;
        `sampling.latents`: the initial noise of every frame (1, C, h, w), or None."""
        # 1. check inputs (the latents, one draw for every frame, with the generator in `interpolate_embeddings`)
        self.check_inputs(image, image_embeds, replace(sampling, latents=None), 1, noise_level)
        count = image_embeds.shape[0] if image_embeds is not None else count_images(image)
        if count != 2:
            raise ValueError(f"`interpolate` needs exactly two images or embeddings (the endpoints), got {count}")
        times = interpolation_times(num_frames)

        # 2. endpoints
        if image_embeds is None:
            image_embeds = self.encode_image(image, self._execution_device)

        # 3. frames
        frames = self.interpolate_embeddings(image_embeds[0], image_embeds[1], times, sampling, noise_level)
        if not return_dict:
            return (frames, times)
        return InterpolationOutput(images=frames, t=times)

    def interpolate_embeddings(
        self, start: torch.Tensor, end: torch.Tensor, times: list[float], sampling: Sampling, noise_level: int = 0
    ):
        """Decode slerp(start, end, t) (D,) for each t in `times`, all frames from one draw of noise: the initial
        noise `sampling.latents` (1, C, h, w) or drawn from `sampling.generator`, then the embedding noise."""
        generator = sampling.generator
        check_one_generator(generator)
        device = self._execution_device
        num_frames = len(times)
        if generator is None:
            generator = torch.Generator().manual_seed(torch.seed())
        latents = sampling.latents
        if latents is None:
            latents = randn_tensor(self._noise_shape(1), generator=generator, device=device)
        check_latents(latents, self._noise_shape(1))
        embedding_noise = None
        if self.image_noising_scheduler is not None:  # drawn after the latents, as `decode` draws it
            embedding_noise = randn_tensor((1, self.embedding_dim), generator=generator, device=device)
            embedding_noise = embedding_noise.expand(num_frames, -1)
        # An ancestral sampler (DDPM) draws noise at every step too: each frame gets a copy of the generator in
        # its present state, so every frame, like a plain call with `generator`, draws the same step noise.
        frame_generators = [clone_generator(generator) for _ in range(num_frames)]
        embeds = slerp(start.to(device).float(), end.to(device).float(), torch.tensor(times, device=device))  # (N, D)
        frames = replace(sampling, generator=frame_generators, latents=latents.expand(num_frames, -1, -1, -1))
        return self.decode(embeds, frames, noise_level, embedding_noise)
