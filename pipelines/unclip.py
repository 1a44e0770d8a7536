"""DALL-E 2 text-to-image (Ramesh et al. 2022): text -> prior -> CLIP image embedding -> decoder -> image.

`UnCLIPTextToImagePipeline` is the prior (`clipcond.pipelines.prior.PriorPipeline`: text encoder, tokenizer,
`PriorTransformer`, its scheduler) and the image-embedding decoder (`clipcond.pipelines.variation.
ImageVariationPipeline`: UNet, scheduler, image encoder, embedding tokens) as ONE diffusers pipeline, in the
layout of diffusers' `StableUnCLIPPipeline`: `save_pretrained` writes every component into one folder and
`from_pretrained` reads it back. Each stage has its own classifier-free guidance (`prior_guidance_scale` on the
predicted embedding, `guidance_scale` on the decoder's noise prediction) and step count.

`from_runs(prior_run, decoder_run)` pairs a prior run with a decoder run, refusing runs trained on different CLIPs
(the content hashes in their `clipcond_run.json`) unless told otherwise, and a CLIP whose embedding width differs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

import PIL.Image
import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiffusionPipeline,
    ImagePipelineOutput,
    PriorTransformer,
    SchedulerMixin,
    UNet2DConditionModel,
)
from transformers import (
    CLIPImageProcessor,
    CLIPTextModelWithProjection,
    CLIPVisionModelWithProjection,
    PreTrainedTokenizerBase,
)

from clipcond.models.image_embedding import ImageEmbeddingTokens
from clipcond.models.prior_text import check_prior_fits
from clipcond.pipelines.inputs import (
    DEFAULT_GUIDANCE_START,
    DEFAULT_IMAGE_EMBEDDING_GUIDANCE_SCALE,
    DEFAULT_PRIOR_GUIDANCE_SCALE,
    DEFAULT_PRIOR_INFERENCE_STEPS,
    check_guidance_scale,
    check_step_count,
)
from clipcond.pipelines.interpolation import (
    InterpolationOutput,
    check_one_generator,
    clone_generator,
    interpolation_times,
)
from clipcond.pipelines.prior import PriorPipeline
from clipcond.pipelines.sampling import Sampling, image_output
from clipcond.pipelines.shipped_code import ShippedCodeMixin
from clipcond.pipelines.variation import ImageVariationPipeline, check_image_embeds, register_decoder_modules
from clipcond.runs import RUN_RECORD, RunRecord, check_same_encoder
from clipcond.text_encoding import context_length

logger = logging.getLogger(__name__)


def clip_hash_of_run(run: str | os.PathLike, what: str) -> str:
    """The content hash of the CLIP a run was trained on, from its run record (`RunRecord.clip_hash`)."""
    try:
        record = RunRecord.read_if_present(run)
    except ValueError as err:  # a record that is not JSON, or not an object
        raise ValueError(f"cannot check which CLIP the {what} {str(run)!r} was trained on: {err}") from None
    if record is None:
        raise ValueError(
            f"cannot check which CLIP the {what} {str(run)!r} was trained on: it holds no {RUN_RECORD} (a folder "
            "written by `clipcond train` has one); pass allow_clip_mismatch=True (`--allow-clip-mismatch`) to pair "
            "it unchecked"
        )
    if record.clip_hash is None:
        raise ValueError(f"{str(Path(run) / RUN_RECORD)!r} records no clip.content_hash")
    return record.clip_hash


def check_same_clip(
    prior_run: str | os.PathLike, decoder_run: str | os.PathLike, allow_mismatch: bool = False
) -> None:
    """Refuse a prior and a decoder trained on different CLIPs (`clipcond.runs.check_same_encoder`): the prior's
    embeddings would be in another space than the one the decoder reads. A run whose record cannot say which CLIP it
    was trained on is refused too. With `allow_mismatch` only warn."""
    try:
        prior_hash = clip_hash_of_run(prior_run, "prior")
        decoder_hash = clip_hash_of_run(decoder_run, "decoder")
    except ValueError:
        if not allow_mismatch:
            raise
        logger.warning("pairing the prior %s and the decoder %s without a lineage check", prior_run, decoder_run)
        return
    check_same_encoder(
        prior_hash,
        decoder_hash,
        mismatch=(
            f"the prior {str(prior_run)!r} was trained on the CLIP with content hash {prior_hash[:12]}..., but the "
            f"decoder {str(decoder_run)!r} on {decoder_hash[:12]}...: the prior's embeddings would not be the ones "
            "the decoder reads"
        ),
        fix="pair runs trained on the same CLIP, or pass allow_clip_mismatch=True (`--allow-clip-mismatch`) to "
        "combine them anyway",
        allowed_by="allow_clip_mismatch",
        allow=allow_mismatch,
        log=logger,
    )


class UnCLIPTextToImagePipeline(ShippedCodeMixin, DiffusionPipeline):
    r"""Text-to-image through a prior: the prior samples a CLIP image embedding for the text, the decoder an
    image for the embedding.

    Args:
        prior: the `PriorTransformer` of a prior run.
        prior_scheduler: its scheduler ("sample" prediction).
        text_encoder: the frozen CLIP text tower (`CLIPTextModelWithProjection`).
        tokenizer: its tokenizer.
        unet: the decoder's UNet (`class_embed_type="projection"`).
        scheduler: the decoder's scheduler.
        image_encoder: the frozen CLIP vision tower of the same CLIP (used by image interpolation; its
            `projection_dim` must be the prior's `embedding_dim`).
        embedding_tokens, feature_extractor, image_noising_scheduler, vae, space_to_depth: as in
            `ImageVariationPipeline`.
    """

    model_cpu_offload_seq = "text_encoder->prior->image_encoder->embedding_tokens->unet->vae"
    _optional_components = ["embedding_tokens", "feature_extractor", "image_noising_scheduler", "vae"]

    def __init__(
        self,
        prior: PriorTransformer,
        prior_scheduler: SchedulerMixin,
        text_encoder: CLIPTextModelWithProjection,
        tokenizer: PreTrainedTokenizerBase,
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
        if (
            prior is not None
            and image_encoder is not None
            and prior.config.embedding_dim != image_encoder.config.projection_dim
        ):
            raise ValueError(
                f"the prior predicts {prior.config.embedding_dim}-wide CLIP image embeddings, but the decoder's "
                f"image encoder makes {image_encoder.config.projection_dim}-wide ones; pair a prior and a decoder "
                "trained on the same CLIP"
            )
        if prior is not None and text_encoder is not None and tokenizer is not None:
            check_prior_fits(prior, text_encoder, context_length(text_encoder, tokenizer))
        self.register_modules(
            prior=prior, prior_scheduler=prior_scheduler, text_encoder=text_encoder, tokenizer=tokenizer
        )
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

    @classmethod
    def from_runs(
        cls,
        prior_run: str | os.PathLike,
        decoder_run: str | os.PathLike,
        *,
        allow_clip_mismatch: bool = False,
        **kwargs,
    ) -> UnCLIPTextToImagePipeline:
        """Pair the pipeline folder of a prior run with that of a decoder run (`clipcond train prior` and
        `clipcond train decoder --conditioning image-embedding`), after checking that both were trained on the same
        CLIP. `kwargs` go to both `from_pretrained` calls (e.g. `local_files_only`, the dtype)."""
        for run, what in ((prior_run, "prior"), (decoder_run, "decoder")):
            if not (Path(run) / "model_index.json").is_file():
                raise FileNotFoundError(
                    f"the {what} run {str(run)!r} holds no model_index.json; pass the output folder of "
                    f"`clipcond train {what}`"
                )
        check_same_clip(prior_run, decoder_run, allow_clip_mismatch)
        prior = PriorPipeline.from_pretrained(prior_run, **kwargs)
        decoder = ImageVariationPipeline.from_pretrained(decoder_run, **kwargs)
        return cls(
            prior=prior.prior,
            prior_scheduler=prior.scheduler,
            text_encoder=prior.text_encoder,
            tokenizer=prior.tokenizer,
            **decoder.components,
            space_to_depth=decoder.config.space_to_depth,
        )

    # ------------------------------------------------------------------------------------------ the two stages

    @property
    def prior_pipeline(self) -> PriorPipeline:
        """The prior stage as its own pipeline, over this pipeline's components (no copies)."""
        pipe = PriorPipeline(
            prior=self.prior, scheduler=self.prior_scheduler, text_encoder=self.text_encoder, tokenizer=self.tokenizer
        )
        pipe.set_progress_bar_config(**getattr(self, "_progress_bar_config", {}))
        return pipe

    @property
    def decoder_pipeline(self) -> ImageVariationPipeline:
        """The decoder stage as its own pipeline, over this pipeline's components (no copies)."""
        pipe = ImageVariationPipeline(
            unet=self.unet,
            scheduler=self.scheduler,
            image_encoder=self.image_encoder,
            embedding_tokens=self.embedding_tokens,
            feature_extractor=self.feature_extractor,
            image_noising_scheduler=self.image_noising_scheduler,
            vae=self.vae,
            space_to_depth=self.config.space_to_depth,
        )
        pipe.set_progress_bar_config(**getattr(self, "_progress_bar_config", {}))
        return pipe

    def check_inputs(
        self, prompt, negative_prompt, prior_sampling: Sampling, sampling: Sampling, num_images_per_prompt, noise_level
    ) -> None:
        """Raise a `ValueError` naming the first bad argument of `__call__`: the prior's sampling arguments are in
        `prior_sampling`, the decoder's in `sampling`."""
        # the prior's own arguments first, by their names here
        check_step_count(prior_sampling.num_inference_steps, "prior_num_inference_steps")
        check_guidance_scale(prior_sampling.guidance_scale, "prior_guidance_scale")
        self.prior_pipeline.check_inputs(prompt, negative_prompt, prior_sampling, num_images_per_prompt)
        batch_size = 1 if isinstance(prompt, str) else len(prompt)
        # what the prior will hand over: its shape only, so no memory and no values (meta)
        placeholder = torch.empty(batch_size, self.prior.config.embedding_dim, device="meta")
        self.decoder_pipeline.check_inputs(
            image=None,
            image_embeds=placeholder,
            sampling=sampling,
            num_images_per_prompt=num_images_per_prompt,
            noise_level=noise_level,
        )

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = DEFAULT_IMAGE_EMBEDDING_GUIDANCE_SCALE,
        prior_num_inference_steps: int = DEFAULT_PRIOR_INFERENCE_STEPS,
        prior_guidance_scale: float = DEFAULT_PRIOR_GUIDANCE_SCALE,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prior_latents: torch.Tensor | None = None,
        noise_level: int = 0,
        output_type: str = "pil",
        return_dict: bool = True,
        guidance_start: float = DEFAULT_GUIDANCE_START,
        guidance_end: float = 1.0,
    ) -> ImagePipelineOutput | tuple:
        r"""Generate images from text.

        Args:
            prompt: the text, or a list of texts; "" asks the prior for an unconditional embedding.
            negative_prompt: what the prior's guidance steers away from (None: the empty prompt).
            num_inference_steps: the decoder's denoising steps.
            guidance_scale: the decoder's classifier-free guidance weight (against the zero embedding).
            prior_num_inference_steps: the prior's denoising steps.
            prior_guidance_scale: the prior's classifier-free guidance weight (against the negative prompt).
            num_images_per_prompt: images per prompt, each from its own prior sample; prompt by prompt.
            generator: a torch generator, or one per image. Each image's generator draws the prior's noise, then
                the decoder's (initial noise, embedding noise, sampler noise): with one per image, a batch equals
                its images generated one at a time.
            latents: the decoder's initial noise (num_images, C, h, w), as `ImageVariationPipeline`.
            prior_latents: the prior's initial noise (num_images, D).
            noise_level: the decoder's embedding noise augmentation (decoders trained with it only).
            output_type: "pil", "np", "pt" or "latent", as `ImageVariationPipeline`.
            return_dict: return an `ImagePipelineOutput` rather than a tuple `(images,)`.
            guidance_start, guidance_end: the decoder's guided sampling steps, fractions of `num_inference_steps`
                (`ImageVariationPipeline`); the prior is guided at every step.
        """
        # 1. check inputs
        prior_sampling = Sampling(prior_num_inference_steps, prior_guidance_scale, generator, prior_latents, "pt")
        sampling = Sampling(
            num_inference_steps, guidance_scale, generator, latents, output_type, guidance_start, guidance_end
        )
        self.check_inputs(prompt, negative_prompt, prior_sampling, sampling, num_images_per_prompt, noise_level)

        # 2. prior: text -> CLIP image embeddings (N, D), unit
        prior = self.prior_pipeline
        image_embeds = prior.sample_embeddings(prompt, negative_prompt, prior_sampling, num_images_per_prompt)

        # 3. decoder: embeddings -> images, one each (the prior made `num_images_per_prompt` per prompt)
        decoder = self.decoder_pipeline
        check_image_embeds(image_embeds, decoder.embedding_dim)
        return image_output(decoder.decode(image_embeds, sampling, noise_level), return_dict)

    @torch.no_grad()
    def interpolate(
        self,
        prompt: list[str] | tuple[str, str] | None = None,
        image: list[PIL.Image.Image] | torch.Tensor | None = None,
        num_frames: int = 5,
        negative_prompt: str | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = DEFAULT_IMAGE_EMBEDDING_GUIDANCE_SCALE,
        prior_num_inference_steps: int = DEFAULT_PRIOR_INFERENCE_STEPS,
        prior_guidance_scale: float = DEFAULT_PRIOR_GUIDANCE_SCALE,
        generator: torch.Generator | None = None,
        noise_level: int = 0,
        output_type: str = "pil",
        return_dict: bool = True,
        guidance_start: float = DEFAULT_GUIDANCE_START,
        guidance_end: float = 1.0,
    ) -> InterpolationOutput | tuple:
        r"""A row of `num_frames` images between two prompts (through the prior) or two images.

        With prompts, both endpoint embeddings are sampled by the prior from the same generator state, and the
        decoder's noise is then drawn once and shared by every frame: the first and last frames are what
        `__call__(prompt_a, generator=g)` and `__call__(prompt_b, generator=g')` give for two generators `g`, `g'`
        in the state of `generator`. With images, as `ImageVariationPipeline.interpolate`.
        """
        if (prompt is None) == (image is None):
            raise ValueError(
                "give exactly one of `prompt` (two prompts) and `image` (two images), got "
                + ("both" if prompt is not None else "neither")
            )
        sampling = Sampling(
            num_inference_steps, guidance_scale, generator, None, output_type, guidance_start, guidance_end
        )
        image_embeds = None  # with images, the decoder embeds them
        if prompt is not None:
            # 1. check inputs
            prior_sampling = Sampling(prior_num_inference_steps, prior_guidance_scale, generator, None, "pt")
            self.check_prompt_interpolation(prompt, negative_prompt, num_frames, prior_sampling, sampling, noise_level)

            # 2. prior: both endpoints from the same generator state
            if generator is None:
                generator = torch.Generator().manual_seed(torch.seed())
            image_embeds = self.prior_endpoints(prompt, negative_prompt, replace(prior_sampling, generator=generator))
            sampling = replace(sampling, generator=generator)

        # 3. decoder: the row (after the prior: from the noise `generator` draws next, as in `__call__`)
        return self.decoder_pipeline.interpolate_row(
            image, image_embeds, num_frames, sampling, noise_level, return_dict
        )

    def check_prompt_interpolation(
        self, prompt, negative_prompt, num_frames, prior_sampling: Sampling, sampling: Sampling, noise_level
    ) -> None:
        """The checks of `interpolate` between two prompts, all before the prior runs."""
        if not isinstance(prompt, list | tuple) or len(prompt) != 2 or not all(isinstance(p, str) for p in prompt):
            raise ValueError(f"`prompt` must be two strings (the endpoints), got {prompt!r}")
        check_one_generator(prior_sampling.generator)
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise ValueError(f"`negative_prompt` must be None or one string for both prompts, got {negative_prompt!r}")
        self.check_inputs(
            prompt[0],
            negative_prompt,
            prior_sampling=prior_sampling,
            sampling=sampling,
            num_images_per_prompt=1,
            noise_level=noise_level,
        )
        interpolation_times(num_frames)

    def prior_endpoints(self, prompt, negative_prompt, prior_sampling: Sampling) -> torch.Tensor:
        """The prior's embeddings (2, D) of the two prompts, each sampled from the state that
        `prior_sampling.generator` is in now."""
        prior = self.prior_pipeline
        second_generator = clone_generator(prior_sampling.generator)
        first = prior.sample_embeddings(prompt[0], negative_prompt, prior_sampling, 1)
        second = prior.sample_embeddings(
            prompt[1], negative_prompt, replace(prior_sampling, generator=second_generator), 1
        )
        return torch.cat([first, second])  # (2, D)
