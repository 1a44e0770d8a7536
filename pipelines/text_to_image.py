"""The Stable Diffusion path's sampler: a UNet conditioned on the frozen CLIP text encoder's per-token states.

`TextToImagePipeline` is a diffusers `DiffusionPipeline`: `save_pretrained` writes one folder per component plus
`model_index.json`, `from_pretrained` reads it back, and the scheduler is any fitting diffusers scheduler
(`SCHEDULERS`, swapped with `scheduler_from_name`). Prompts are encoded with
`clipcond.text_encoding.encode_prompts`, the function the decoder training's embedding cache uses, so the UNet sees
at inference the states it was trained on.

The UNet denoises pixels in [-1, 1] at `unet.config.sample_size` (with `space_to_depth` F > 1, the pixels as F x F
blocks: (3 F^2, H/F, W/F), rearranged back at the end); when a `vae` (diffusers `AutoencoderKL`) is registered, it
denoises the VAE's latents instead and decodes them at the end, as Stable Diffusion does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    ImagePipelineOutput,
    SchedulerMixin,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from diffusers.image_processor import VaeImageProcessor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from clipcond.pipelines.inputs import DEFAULT_TEXT_GUIDANCE_SCALE, check_latents, check_prompts
from clipcond.pipelines.prompts import encode_each_text_once, encode_for_guidance, prompt_list
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
from clipcond.text_encoding import TextEmbeddings, check_encoder_fits, encode_prompts

# The schedulers that sample a UNet trained with DDPM's noise schedule, by their `--scheduler` names.
SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "ddpm": DDPMScheduler,  # ancestral: draws fresh noise at every step
    "ddim": DDIMScheduler,
    "dpm": DPMSolverMultistepScheduler,  # DPM-Solver++ (Lu et al. 2022), multistep, order 2
    "dpm-sde": DPMSolverMultistepScheduler,  # its SDE variant: adds fresh noise at every step, like DDPM
    "euler": EulerDiscreteScheduler,  # works on sigmas: needs init_noise_sigma and scale_model_input
    "euler-a": EulerAncestralDiscreteScheduler,  # ancestral Euler (Karras et al. 2022's stochastic sampler)
    "unipc": UniPCMultistepScheduler,
}
# Options that pick the variant we mean by a name, on top of the saved noise schedule.
SCHEDULER_OPTIONS: dict[str, dict] = {
    "dpm": {"algorithm_type": "dpmsolver++"},
    "dpm-sde": {"algorithm_type": "sde-dpmsolver++"},
}
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def scheduler_from_name(name: str, config) -> SchedulerMixin:
    """A scheduler of the kind `name` (a key of `SCHEDULERS`) with the noise schedule in `config`.

    `config` is another scheduler's `config` (or a dict of the same fields): the betas, the number of training steps
    and the prediction type (epsilon or v_prediction) carry over, so the new scheduler fits the trained UNet.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"`scheduler` must be one of {sorted(SCHEDULERS)}, got {name!r}")
    return SCHEDULERS[name].from_config(config, **SCHEDULER_OPTIONS.get(name, {}))


def encoder_width(text_encoder: PreTrainedModel) -> int:
    """The width of the encoder's per-token states (`hidden_size` for CLIP and BERT-like configs, `d_model` for T5)."""
    config = text_encoder.config
    width = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
    if width is None:
        raise ValueError(f"cannot tell the token-state width of {type(text_encoder).__name__}: no hidden_size/d_model")
    return width


class TextToImagePipeline(ShippedCodeMixin, DiffusionPipeline):
    r"""Text-to-image sampling with classifier-free guidance, in pixel space or (with a `vae`) in latent space.

    Args:
        unet: a `UNet2DConditionModel` whose cross-attention reads the text encoder's token states.
        scheduler: a diffusers scheduler, e.g. one of `SCHEDULERS`.
        text_encoder: the frozen transformers text encoder (CLIPTextModelWithProjection, or any model whose output
            has `last_hidden_state`).
        tokenizer: the text encoder's tokenizer.
        vae: optional `AutoencoderKL`; when given the UNet denoises its latents.
        mask_text_padding: whether the text encoder and the UNet's cross-attention leave the prompt's padding out
            (the default); False for a UNet trained as Stable Diffusion's, on the unmasked states of every position
            (`clipcond train decoder --no-mask-text-padding`), which stock `StableDiffusionPipeline` can run.
        space_to_depth: without a `vae`, the side F of the pixel blocks the UNet denoises (3 F^2 channels at
            1/F of the image size; `clipcond train decoder --space-to-depth`); 1: the pixels as they are.
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["vae"]

    def __init__(
        self,
        unet: UNet2DConditionModel,
        scheduler: SchedulerMixin,
        text_encoder: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        vae: AutoencoderKL | None = None,
        mask_text_padding: bool = True,
        space_to_depth: int = 1,
    ):
        super().__init__()
        if unet is not None and text_encoder is not None:
            check_encoder_fits(unet, encoder_width(text_encoder))
        check_vae_fits(unet, vae, space_to_depth)
        self.register_modules(unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae)
        self.register_to_config(mask_text_padding=mask_text_padding, space_to_depth=space_to_depth)
        self.vae_scale_factor = vae_scale_factor(vae, space_to_depth)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @property
    def default_size(self) -> tuple[int, int]:
        """(height, width) of the images the UNet was trained on, in pixels."""
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else size
        return height * self.vae_scale_factor, width * self.vae_scale_factor

    def check_inputs(
        self, prompt, negative_prompt, sampling: Sampling, num_images_per_prompt, height: int, width: int
    ) -> None:
        """Raise a `ValueError` naming the first bad argument of `__call__` (`sampling` holds most of them)."""
        batch_size = check_prompts(prompt, negative_prompt)
        num_images = sampling.check(num_images_per_prompt, batch_size, OUTPUT_TYPES)
        if self.vae is None:
            if (height, width) != self.default_size:
                raise ValueError(
                    f"`height` and `width` must be the image size the UNet was trained on, {self.default_size}, in "
                    f"pixel space; got {(height, width)}"
                )
        elif height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(
                f"`height` and `width` must be divisible by the VAE's factor {self.vae_scale_factor}, "
                f"got {(height, width)}"
            )
        check_latents(sampling.latents, self._noise_shape(num_images, height, width))

    def _noise_shape(self, num_images: int, height: int, width: int) -> tuple[int, int, int, int]:
        f = self.vae_scale_factor
        return (num_images, self.unet.config.in_channels, height // f, width // f)

    def encode_prompt(
        self, prompts: list[str], negative_prompts: list[str] | None, device: torch.device
    ) -> tuple[TextEmbeddings, TextEmbeddings | None]:
        """Token states of the prompts, and of the negative prompts when guiding; each distinct text encoded once."""

        def encode(texts: list[str]) -> TextEmbeddings:
            mask_padding = self.config.mask_text_padding
            return encode_prompts(self.text_encoder, self.tokenizer, texts, device=device, mask_padding=mask_padding)

        return encode_each_text_once(prompts, negative_prompts, encode, device)

    def text_conditioning(
        self, prompt, negative_prompt, guidance_scale: float, num_images_per_prompt: int, device: torch.device
    ) -> dict[str, torch.Tensor | None]:
        """The UNet's text inputs for one batch: [negative prompts; prompts] when guiding, each repeated per image of
        its prompt: token states (B or 2B, L, W), their mask and, for a UNet trained with `--pooled-text`, the pooled
        embedding as `class_labels`."""
        text = encode_for_guidance(self.encode_prompt, prompt, negative_prompt, guidance_scale, device)
        text = text.without_padding_columns()  # masked padding changes nothing and costs every step
        hidden_states = text.hidden_states.repeat_interleave(num_images_per_prompt, dim=0)  # (B or 2B, L, W)
        mask = text.attention_mask.repeat_interleave(num_images_per_prompt, dim=0)
        return {
            "encoder_hidden_states": hidden_states.to(self.unet.dtype),
            "encoder_attention_mask": mask if self.config.mask_text_padding else None,  # None: every position, as SD
            "class_labels": self._pooled_text(text, num_images_per_prompt),  # (B or 2B, D), or None
        }

    def _pooled_text(self, text: TextEmbeddings, num_images_per_prompt: int) -> torch.Tensor | None:
        """The L2-normalised pooled text embedding, for a UNet trained with `--pooled-text` (a class embedding of
        type "projection"); None for a UNet on token states alone."""
        if self.unet.config.class_embed_type != "projection":
            return None
        if text.pooled is None:
            raise ValueError(
                "this UNet reads the pooled text embedding (trained with --pooled-text), but the text encoder "
                f"{type(self.text_encoder).__name__} has no projection; load it as CLIPTextModelWithProjection"
            )
        expected = self.unet.config.projection_class_embeddings_input_dim
        if text.pooled.shape[-1] != expected:
            raise ValueError(
                f"the UNet reads a pooled text embedding of width {expected}, but the text encoder "
                f"{type(self.text_encoder).__name__} gives {text.pooled.shape[-1]}: it is not the encoder it was "
                "trained on"
            )
        pooled = torch.nn.functional.normalize(text.pooled.float(), dim=-1)
        return pooled.repeat_interleave(num_images_per_prompt, dim=0).to(self.unet.dtype)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = DEFAULT_TEXT_GUIDANCE_SCALE,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        height: int | None = None,
        width: int | None = None,
        callback_on_step_end: Callable[[DiffusionPipeline, int, torch.Tensor, dict], dict] | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""Generate images from text.

        Args:
            prompt: the text, or a list of texts; "" asks for an unconditional sample.
            negative_prompt: what the guidance steers away from (one string for all prompts, or one per prompt);
                None: the empty prompt, i.e. plain classifier-free guidance.
            num_inference_steps: denoising steps.
            guidance_scale: classifier-free guidance weight w in eps_uncond + w (eps_cond - eps_uncond)
                (Ho & Salimans 2022); 1 or less samples from the conditional model alone, with one UNet batch.
            num_images_per_prompt: images per prompt; images come prompt by prompt (all of the first prompt's first).
            generator: a torch generator, or one per image: with one per image, each image depends on its own
                generator only, so a batch equals its images generated one at a time.
            latents: initial noise (num_images, C, h, w) of what the UNet denoises (pixels, pixel blocks or latents),
                unscaled (drawn from `generator` when None).
            output_type: "pil" (list of PIL images), "np" (float (B, H, W, 3) in [0, 1]), "pt" (float tensor
                (B, 3, H, W) in [0, 1]) or "latent" (the denoised sample before decoding or rearranging blocks).
            return_dict: return an `ImagePipelineOutput` rather than a tuple `(images,)`.
            height, width: image size in pixels; in pixel space it must be the size the UNet was trained on (the
                default).
            callback_on_step_end: called as `callback(pipeline, step, timestep, {"latents": latents})` after each
                step; a "latents" entry in the dict it returns replaces the current latents.
        """
        default_height, default_width = self.default_size
        height, width = height or default_height, width or default_width

        # 1. check inputs
        sampling = Sampling(num_inference_steps, guidance_scale, generator, latents, output_type)
        self.check_inputs(prompt, negative_prompt, sampling, num_images_per_prompt, height, width)
        device = self._execution_device

        # 2. encode prompt
        conditioning = self.text_conditioning(prompt, negative_prompt, guidance_scale, num_images_per_prompt, device)

        # 3. timesteps: guided every one, or none
        guided = set_timesteps(self.scheduler, sampling, device)

        # 4. initial noise
        shape = self._noise_shape(len(prompt_list(prompt)) * num_images_per_prompt, height, width)
        latents = initial_noise(self.scheduler, sampling, shape, device=device, dtype=self.unet.dtype)

        # 5. denoising loop
        latents = denoise(
            self, self.unet, latents, sampling, guided, conditioning, callback_on_step_end=callback_on_step_end
        )

        # 6. decode / postprocess
        images = to_output_type(
            self.image_processor, latents, output_type, vae=self.vae, space_to_depth=self.config.space_to_depth
        )
        self.maybe_free_model_hooks()
        return image_output(images, return_dict)
