"""The DALL-E 2 prior as a diffusers pipeline: text -> CLIP image embeddings.

`PriorPipeline` samples the image embedding that a caption's image would have under the frozen CLIP, by denoising
with a `PriorTransformer` trained to predict the (standardised) embedding directly (Ramesh et al. 2022, sec. 2.1).
Prompts are encoded with `clipcond.conditioning.encode_prompts` and turned into the prior's inputs with
`clipcond.models.prior.prior_text_inputs`, as in training, so the prior sees at inference what it was trained on.
The output is "the CLIP image embedding" of clipcond's DALL-E 2 path: L2-normalised, (B, D); an image-embedding
decoder (`clipcond.pipelines.unclip`) turns it into pixels.

`save_pretrained` writes `prior/`, `scheduler/`, `text_encoder/`, `tokenizer/` and `model_index.json`;
`PriorPipeline.from_pretrained` reads them back.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, PriorTransformer, SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModelWithProjection, PreTrainedTokenizerBase

from clipcond.conditioning import context_length, encode_prompts
from clipcond.models.prior import PriorTextInputs, check_prior_fits, prior_text_inputs
from clipcond.pipelines.inputs import check_prompts, check_sampling_args

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pt", "np")


@dataclass
class PriorPipelineOutput(BaseOutput):
    """
    Args:
        image_embeds: predicted CLIP image embeddings, L2-normalised, (num_images, D): a float32 tensor for
            `output_type="pt"`, a numpy array for "np"; prompt by prompt, `num_images_per_prompt` each.
    """

    image_embeds: torch.Tensor | np.ndarray


class PriorPipeline(DiffusionPipeline):
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

    def check_inputs(
        self,
        prompt,
        negative_prompt,
        num_inference_steps,
        guidance_scale,
        num_images_per_prompt,
        generator,
        latents,
        output_type,
    ) -> None:
        batch_size = check_prompts(prompt, negative_prompt)
        num_images = check_sampling_args(
            num_inference_steps, guidance_scale, num_images_per_prompt, generator, batch_size, output="embedding"
        )
        if latents is not None:
            expected = (num_images, self.prior.config.embedding_dim)
            if tuple(latents.shape) != expected:
                raise ValueError(f"`latents` must have shape {expected}, got {tuple(latents.shape)}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {list(OUTPUT_TYPES)}, got {output_type!r}")

    def encode_prompt(
        self, prompts: list[str], negative_prompts: list[str] | None, device: torch.device
    ) -> tuple[PriorTextInputs, PriorTextInputs | None]:
        """The prior's text inputs for the prompts, and for the negative prompts when guiding; each distinct text is
        encoded once."""
        texts = list(dict.fromkeys(prompts + (negative_prompts or [])))
        encoded = prior_text_inputs(
            encode_prompts(self.text_encoder, self.tokenizer, texts, device=device), self.text_encoder
        )
        index = {text: i for i, text in enumerate(texts)}

        def take(selected: list[str]) -> PriorTextInputs:
            rows = torch.tensor([index[text] for text in selected], device=device)
            return PriorTextInputs(
                encoded.proj_embedding[rows], encoded.encoder_hidden_states[rows], encoded.attention_mask[rows]
            )

        return take(prompts), None if negative_prompts is None else take(negative_prompts)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 4.0,
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
        self.check_inputs(
            prompt,
            negative_prompt,
            num_inference_steps,
            guidance_scale,
            num_images_per_prompt,
            generator,
            latents,
            output_type,
        )
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        num_images = len(prompts) * num_images_per_prompt
        do_guidance = guidance_scale > 1.0
        if negative_prompt is not None and not do_guidance:
            logger.warning(
                "`negative_prompt` is ignored: `guidance_scale` (%s) <= 1 turns guidance off", guidance_scale
            )
        device = self._execution_device
        dtype = self.prior.dtype

        # 2. encode prompt
        if not do_guidance:
            negative_prompts = None
        elif isinstance(negative_prompt, list):
            negative_prompts = negative_prompt
        else:  # one for all prompts; None: the empty prompt, as dropped captions in training
            negative_prompts = [negative_prompt or ""] * len(prompts)
        cond, uncond = self.encode_prompt(prompts, negative_prompts, device)
        # One prior batch per step: [unconditional; conditional], each repeated per embedding of its prompt.
        text = PriorTextInputs.cat([uncond, cond]) if do_guidance else cond
        text = text.repeat_interleave(num_images_per_prompt).to(device, dtype)  # (B or 2B, ...)

        # 3. timesteps
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        # Ancestral samplers (DDPM) draw fresh noise in `step` from the same generator(s): with one generator per
        # embedding, that noise too is each embedding's own.
        accepts_generator = "generator" in inspect.signature(self.scheduler.step).parameters
        step_kwargs = {"generator": generator} if accepts_generator else {}

        # 4. initial noise, in the prior's standardised space
        if latents is None:
            shape = (num_images, self.prior.config.embedding_dim)
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        latents = latents.to(device=device, dtype=dtype) * self.scheduler.init_noise_sigma

        # 5. denoising loop
        for t in self.progress_bar(timesteps):
            model_input = torch.cat([latents] * 2) if do_guidance else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            predicted = self.prior(
                model_input,
                timestep=t,
                proj_embedding=text.proj_embedding,
                encoder_hidden_states=text.encoder_hidden_states,
                attention_mask=text.attention_mask,
                return_dict=False,
            )[0]  # (B or 2B, D): the standardised embedding itself ("sample" prediction)
            if do_guidance:
                predicted_uncond, predicted_cond = predicted.chunk(2)
                predicted = predicted_uncond + guidance_scale * (predicted_cond - predicted_uncond)
            latents = self.scheduler.step(predicted, t, latents, **step_kwargs, return_dict=False)[0]

        # 6. un-standardise, normalise
        image_embeds = F.normalize(self.prior.post_process_latents(latents).float(), dim=-1)  # (num_images, D)
        self.maybe_free_model_hooks()
        if output_type == "np":
            image_embeds = image_embeds.cpu().numpy()

        if not return_dict:
            return (image_embeds,)
        return PriorPipelineOutput(image_embeds=image_embeds)
