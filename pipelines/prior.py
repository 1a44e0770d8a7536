"""The DALL-E 2 prior as a diffusers pipeline: text -> CLIP image embeddings.

`PriorPipeline` samples the image embedding that a caption's image would have under the frozen CLIP, by denoising
with a `PriorTransformer` trained to predict the (standardised) embedding directly (Ramesh et al. 2022, sec. 2.1).
Prompts are encoded with `clipcond.text_encoding.encode_prompts` and turned into the prior's inputs with
`clipcond.models.prior_text.prior_text_inputs`, as in training, so the prior sees at inference what it was trained on.
The output is "the CLIP image embedding" of clipcond's DALL-E 2 path: L2-normalised, (B, D); an image-embedding
decoder (`clipcond.pipelines.unclip`) turns it into pixels.

`save_pretrained` writes `prior/`, `scheduler/`, `text_encoder/`, `tokenizer/` and `model_index.json`;
`PriorPipeline.from_pretrained` reads them back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, PriorTransformer, SchedulerMixin
from diffusers.utils import BaseOutput
from transformers import CLIPTextModelWithProjection, PreTrainedTokenizerBase

from clipcond.models.prior_text import PriorTextInputs, check_prior_fits, prior_text_inputs
from clipcond.pipelines.inputs import (
    DEFAULT_PRIOR_GUIDANCE_SCALE,
    DEFAULT_PRIOR_INFERENCE_STEPS,
    check_latents,
    check_prompts,
)
from clipcond.pipelines.prompts import encode_each_text_once, encode_for_guidance, prompt_list
from clipcond.pipelines.sampling import Sampling, denoise, initial_noise, set_timesteps
from clipcond.pipelines.shipped_code import ShippedCodeMixin
from clipcond.text_encoding import context_length, encode_prompts

OUTPUT_TYPES = ("pt", "np")


@dataclass
class PriorPipelineOutput(BaseOutput):
    """
    Args:
        image_embeds: predicted CLIP image embeddings, L2-normalised, (num_images, D): a float32 tensor for
            `output_type="pt"`, a numpy array for "np"; prompt by prompt, `num_images_per_prompt` each.
    """

    image_embeds: torch.Tensor | np.ndarray


class PriorPipeline(ShippedCodeMixin, DiffusionPipeline):
    r"""Text-to-image-embedding sampling with classifier-free guidance (the DALL-E 2 prior).

    Args:
        prior: a `PriorTransformer` predicting the standardised image embedding (its `clip_mean` / `clip_std` hold
            the standardisation).
        scheduler: a diffusers scheduler whose `prediction_type` is "sample" (training uses `DDPMScheduler`).
        text_encoder: the frozen `CLIPTextModelWithProjection`; its projection width must be the prior's
            `embedding_dim`.
        tokenizer: the text encoder's tokenizer.
    """

    model_cpu_offload_seq = "text_encoder->prior"

    def __init__(
        self,
        prior: PriorTransformer,
        scheduler: SchedulerMixin,
        text_encoder: CLIPTextModelWithProjection,
        tokenizer: PreTrainedTokenizerBase,
    ):
        super().__init__()
        if prior is not None and text_encoder is not None and tokenizer is not None:
            check_prior_fits(prior, text_encoder, context_length(text_encoder, tokenizer))
        self.register_modules(prior=prior, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)

    def check_inputs(self, prompt, negative_prompt, sampling: Sampling, num_images_per_prompt) -> None:
        """Raise a `ValueError` naming the first bad argument of `__call__` (`sampling` holds most of them)."""
        batch_size = check_prompts(prompt, negative_prompt)
        num_images = sampling.check(num_images_per_prompt, batch_size, OUTPUT_TYPES, output="embedding")
        check_latents(sampling.latents, (num_images, self.prior.config.embedding_dim))

    def encode_prompt(
        self, prompts: list[str], negative_prompts: list[str] | None, device: torch.device
    ) -> tuple[PriorTextInputs, PriorTextInputs | None]:
        """The prior's text inputs for the prompts, and for the negative prompts when guiding; each distinct text is
        encoded once."""

        def encode(texts: list[str]) -> PriorTextInputs:
            text = encode_prompts(self.text_encoder, self.tokenizer, texts, device=device)
            return prior_text_inputs(text, self.text_encoder)

        return encode_each_text_once(prompts, negative_prompts, encode, device)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = DEFAULT_PRIOR_INFERENCE_STEPS,
        guidance_scale: float = DEFAULT_PRIOR_GUIDANCE_SCALE,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pt",
        return_dict: bool = True,
    ) -> PriorPipelineOutput | tuple:
        r"""Sample CLIP image embeddings for text.

        Args:
            prompt: the text, or a list of texts; "" asks for an unconditional sample.
            negative_prompt: what the guidance steers away from (one string for all prompts, or one per prompt);
                None: the empty prompt, the caption-dropout target of training, i.e. plain classifier-free guidance.
            num_inference_steps: denoising steps (Karlo's prior samples with 25).
            guidance_scale: classifier-free guidance weight w on the predicted embedding,
                x_uncond + w (x_cond - x_uncond) (Ho & Salimans 2022); 1 or less: the conditional prediction alone,
                with one prior batch per step. 4 is Karlo's prior default.
            num_images_per_prompt: embeddings per prompt; they come prompt by prompt.
            generator: a torch generator, or one per embedding: with one per embedding, each depends on its own
                generator only, so a batch equals its embeddings sampled one at a time.
            latents: initial noise (num_images, D), unscaled (drawn from `generator` when None).
            output_type: "pt" (float32 tensor) or "np" (numpy array).
            return_dict: return a `PriorPipelineOutput` rather than a tuple `(image_embeds,)`.
        """
        # 1. check inputs
        sampling = Sampling(num_inference_steps, guidance_scale, generator, latents, output_type)
        self.check_inputs(prompt, negative_prompt, sampling, num_images_per_prompt)

        # 2.-6. encode prompt, timesteps, initial noise, denoising loop, un-standardise
        image_embeds = self.sample_embeddings(prompt, negative_prompt, sampling, num_images_per_prompt)

        # 7. output
        if output_type == "np":
            image_embeds = image_embeds.cpu().numpy()
        if not return_dict:
            return (image_embeds,)
        return PriorPipelineOutput(image_embeds=image_embeds)

    def sample_embeddings(
        self, prompt: str | list[str], negative_prompt, sampling: Sampling, num_images_per_prompt: int
    ) -> torch.Tensor:
        """The stages of `__call__` after its checks (shared with the unCLIP pipeline): L2-normalised image
        embeddings (num_images, D), float32, prompt by prompt."""
        device = self._execution_device
        dtype = self.prior.dtype

        # 2. encode prompt: one prior batch per step, [negative; prompt] when guiding, repeated per embedding
        text = encode_for_guidance(self.encode_prompt, prompt, negative_prompt, sampling.guidance_scale, device)
        text = text.repeat_interleave(num_images_per_prompt).to(device, dtype)  # (B or 2B, ...)

        # 3. timesteps: guided every one, or none
        guided = set_timesteps(self.scheduler, sampling, device)

        # 4. initial noise, in the prior's standardised space
        shape = (len(prompt_list(prompt)) * num_images_per_prompt, self.prior.config.embedding_dim)
        latents = initial_noise(self.scheduler, sampling, shape, device=device, dtype=dtype)

        # 5. denoising loop: the prior predicts the standardised embedding itself ("sample" prediction)
        inputs = {
            "proj_embedding": text.proj_embedding,
            "encoder_hidden_states": text.encoder_hidden_states,
            "attention_mask": text.attention_mask,
        }
        latents = denoise(self, self.prior, latents, sampling, guided, inputs)

        # 6. un-standardise, normalise
        image_embeds = F.normalize(self.prior.post_process_latents(latents).float(), dim=-1)  # (num_images, D)
        self.maybe_free_model_hooks()
        return image_embeds
