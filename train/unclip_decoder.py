"""`clipcond train decoder --conditioning image-embedding`: the DALL-E 2 (unCLIP) decoder.

    clipcond train decoder --conditioning image-embedding --clip runs/clip --data shapes/ --output-dir runs/unclip

A diffusers `UNet2DConditionModel` (the same presets as the text path, in pixel space, as pixel blocks with
`--space-to-depth F`, or with `--vae` in a VAE's latent space: `clipcond.train.model_space`) learns to draw an image
from its CLIP image embedding (Ramesh et al. 2022, sec. 2.1, in the layout of Stable unCLIP): the embedding enters as
`class_labels` (`class_embed_type="projection"`, added to the timestep embedding) and, with `--embedding-tokens K`
(default 4, unCLIP's "four extra tokens of context"), as K cross-attention tokens made by an
`ImageEmbeddingTokens` module trained jointly with the UNet. With K = 0 the UNet has no cross-attention (its cross-attention blocks become
self-attention blocks; `clipcond.models.image_embedding.without_cross_attention`) and reads no context.

How an embedding becomes the UNet's inputs is `clipcond.models.image_embedding`, shared with the pipelines:
standardised (sqrt(D) times the unit embedding), optionally noise-augmented (`--noise-level N`: each sample is
noised to a level drawn uniformly from [0, N] of a cosine DDPM schedule, and the level's sinusoidal embedding is
concatenated; sampling then picks `noise_level`), and replaced by the zero vector with probability
`--caption-dropout` (the unconditional input of classifier-free guidance, which the pipeline feeds too).

The frozen CLIP vision tower runs once over the training images, before training, into an `ImageEmbeddingCache`
(`RUN/cache/` by default); training steps look rows up and never run the tower. The embeddings come from the pixel
images at the tower's resolution whatever the UNet denoises: in latent space only the targets are latents.
Everything else (the objective, EMA, checkpoints, resume, validation grid, run record with its `model_space`) is the
one decoder flow of `clipcond.train.decoder`, to which `ImageEmbeddingPlugin` is the conditioning.

The run folder is a complete `ImageVariationPipeline` (`unet/` with the EMA weights, `scheduler/`,
`image_encoder/` (the CLIP vision tower), `feature_extractor/` (its pixel statistics), `embedding_tokens/` with
K > 0, `image_noising_scheduler/` with N > 0, `vae/` with `--vae`, `model_index.json`), plus `clipcond_run.json`
(with `"conditioning": "image-embedding"` and the CLIP's content hash), `checkpoints/`, `validation/step-<N>.png`
(rows: a fixed test image, then its variations) and `cache/`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler, UNet2DConditionModel
from transformers import CLIPImageProcessor

from clipcond.conditioning import ImageEmbeddingCache
from clipcond.data.open import dataset_options, items_at, open_image_text_dataset
from clipcond.encoders.base import FrozenEncoder
from clipcond.models.image_embedding import (
    ImageEmbeddingTokens,
    condition_width,
    decoder_condition,
    drop_condition,
    make_noising_scheduler,
    unet_inputs,
    without_cross_attention,
)
from clipcond.models.unet import unet_config
from clipcond.train.decoder_conditioning import ConditioningPlugin, UNetInputs
from clipcond.train.diffusion import cache_image_embeddings
from clipcond.train.loop import draw_rows
from clipcond.transfer import to_device

logger = logging.getLogger(__name__)

CONDITIONING = "image-embedding"


# ------------------------------------------------------------------------------------------ per training step


class ImageEmbeddingConditioning:
    """The CLIP image embedding of each sample's image, looked up in the cache, as the condition vector of
    `clipcond.models.image_embedding` (noise-augmented to a random level in [0, `max_noise_level`] when a noising
    schedule is given); with probability `dropout` a sample gets the zero vector, the unconditional input."""

    kind = CONDITIONING

    def __init__(
        self,
        cache: ImageEmbeddingCache,
        dropout: float,
        noising_scheduler: DDPMScheduler | None = None,
        max_noise_level: int = 0,
    ):
        self.cache = cache
        self.dropout = dropout
        self.noising_scheduler = noising_scheduler
        self.max_noise_level = max_noise_level

    def __call__(self, batch: dict, generator: torch.Generator, device: torch.device) -> UNetInputs:
        embeds = to_device(self.cache.lookup(batch["index"]), device)  # (B, D) raw; normalised below
        batch_size, width = embeds.shape
        on_generator = {"generator": generator, "device": generator.device}
        levels, noise = 0, None
        if self.noising_scheduler is not None:
            top = self.max_noise_level + 1
            levels = draw_rows(lambda n: torch.randint(0, top, (n,), **on_generator), batch_size, device)
            noise = draw_rows(lambda n: torch.randn((n, width), **on_generator), batch_size, device)
        condition = decoder_condition(
            embeds, noising_scheduler=self.noising_scheduler, noise_level=levels, noise=noise
        )  # (B, D or 2D)
        if self.dropout > 0:
            drop = draw_rows(lambda n: torch.rand(n, **on_generator), batch_size, device)
            drop = drop < self.dropout
            condition = drop_condition(condition, drop)
        return UNetInputs(encoder_hidden_states=None, class_labels=condition)

    def record(self) -> dict:
        return {
            "kind": self.kind,
            "cache": str(self.cache.path),
            "cache_key": self.cache.key,
            "embedding_dim": self.cache.dim,
            "dropout": self.dropout,
            "max_noise_level": self.max_noise_level,
        }


class UnCLIPDecoder(torch.nn.Module):
    """The UNet and its embedding tokens as one module, so that Accelerate prepares (and DDP synchronises), the
    optimizer steps, the EMA averages and the checkpoints hold both together. Called like the UNet by
    `DecoderStage.loss`, with the condition vector as `class_labels`; it makes the tokens itself."""

    def __init__(self, unet: UNet2DConditionModel, embedding_tokens: ImageEmbeddingTokens | None):
        super().__init__()
        self.unet = unet
        self.embedding_tokens = embedding_tokens

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor, return_dict=False):
        inputs = unet_inputs(class_labels, self.embedding_tokens)
        return self.unet(sample, timestep, **inputs, return_dict=return_dict)


# ------------------------------------------------------------------------------------------------ the plug-in


class ImageEmbeddingPlugin(ConditioningPlugin):
    """`--conditioning image-embedding`: the frozen CLIP image tower's embedding of each training image, through an
    `ImageEmbeddingConditioning`, and K embedding tokens trained with the UNet (`UnCLIPDecoder`)."""

    kind = CONDITIONING
    towers = {"text": False, "image": True}

    def __init__(self, args: argparse.Namespace, encoder: FrozenEncoder):
        super().__init__(args, encoder)
        config = encoder.image_encoder.config
        self.clip_size, self.embedding_dim = config.image_size, config.projection_dim
        self.num_tokens = args.embedding_tokens
        self.cross_attention_dim = args.cross_attention_dim or self.embedding_dim
        # the image encoder's pixel statistics, which the pipeline normalises with
        self.feature_extractor = CLIPImageProcessor(
            size={"shortest_edge": self.clip_size},
            crop_size={"height": self.clip_size, "width": self.clip_size},
            image_mean=list(encoder.image_mean),
            image_std=list(encoder.image_std),
        )

    @classmethod
    def check_args(cls, args: argparse.Namespace) -> None:
        if args.embedding_tokens < 0:
            raise ValueError(f"`--embedding-tokens` must be >= 0 (0: no cross-attention), got {args.embedding_tokens}")
        max_level = make_noising_scheduler().config.num_train_timesteps - 1
        if not 0 <= args.noise_level <= max_level:
            raise ValueError(
                f"`--noise-level` must be in [0, {max_level}] (0: no noise augmentation), got {args.noise_level}"
            )
        if args.validation_sources < 1:
            raise ValueError(f"`--validation-sources` must be >= 1, got {args.validation_sources}")

    def encode_training_data(
        self, accelerator: Accelerator, dataset, resolution: int, cache_dir
    ) -> ImageEmbeddingConditioning:
        """The CLIP image embeddings of the training images, computed once (`ImageEmbeddingCache`) from the same
        items at the image encoder's resolution."""
        args = self.args
        clip_dataset = dataset
        if resolution != self.clip_size:
            clip_dataset = open_image_text_dataset(
                args.data, split=args.split, resolution=self.clip_size, **dataset_options(args)
            )
        cache = cache_image_embeddings(accelerator, args, self.encoder, clip_dataset, cache_dir)
        self.noising_scheduler = make_noising_scheduler() if args.noise_level > 0 else None
        self.conditioning = ImageEmbeddingConditioning(
            cache, args.caption_dropout, self.noising_scheduler, args.noise_level
        )
        return self.conditioning

    def unet_config(self, **space: int) -> dict:
        config = unet_config(
            self.args.model,
            **space,
            cross_attention_dim=self.cross_attention_dim,
            image_embedding_dim=condition_width(self.embedding_dim, self.noising_scheduler is not None),
        )
        return without_cross_attention(config) if self.num_tokens == 0 else config

    def trainable(self, unet: UNet2DConditionModel) -> UnCLIPDecoder:
        tokens = None
        if self.num_tokens:
            tokens = ImageEmbeddingTokens(self.embedding_dim, self.num_tokens, self.cross_attention_dim)
        return UnCLIPDecoder(unet, tokens)

    def describe(self, unet: UNet2DConditionModel) -> str:
        return (
            f"CLIP image embedding width {self.embedding_dim}, {self.num_tokens} context tokens, noise level <= "
            f"{self.args.noise_level}"
        )

    def pipeline(self, model: UnCLIPDecoder, scheduler, **space_modules):
        from clipcond.pipelines.variation import ImageVariationPipeline

        return ImageVariationPipeline(
            unet=model.unet,
            scheduler=scheduler,
            image_encoder=self.encoder.image_encoder,
            embedding_tokens=model.embedding_tokens,
            feature_extractor=self.feature_extractor,
            image_noising_scheduler=self.noising_scheduler,
            **space_modules,
        )

    def load_validation_inputs(self, resolution: int) -> None:
        args = self.args
        self.sources, self.shown = validation_sources(
            args.data, args.split, (self.clip_size, resolution), args.validation_sources, dataset_options(args)
        )

    def validation_inputs(self) -> dict:
        return {"image": self.sources}

    def num_validation_conditions(self) -> int:
        return len(self.sources)

    def validation_grid(self, images: torch.Tensor, per_condition: int) -> tuple[torch.Tensor, int]:
        """A row per source: the source image, then its variations."""
        images = images.unflatten(0, (len(self.shown), per_condition))  # (S, n, 3, R, R)
        shown = (self.shown.float() / 255)[:, None]  # (S, 1, 3, R, R)
        return torch.cat([shown, images], dim=1).flatten(0, 1), per_condition + 1

    def record_sections(self) -> dict:
        num_tokens = self.num_tokens
        return {
            "conditioning": CONDITIONING,
            "image_embedding": {
                **self.conditioning.record(),
                "embedding_tokens": num_tokens,
                "cross_attention_dim": self.cross_attention_dim if num_tokens else None,
            },
        }

    def unet_record(self, unet: UNet2DConditionModel) -> dict:
        return {
            "class_embedding_input_dim": unet.config.projection_class_embeddings_input_dim,
            "cross_attention": self.num_tokens > 0,
        }


def validation_sources(
    data: str, split: str, resolutions: tuple[int, int], count: int, dataset_kwargs: dict
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `count` images of distinct captions in the `test` split of `data` (else of `split`), at the
    image encoder's and at the decoder's resolution: uint8 (S, 3, r, r) and (S, 3, R, R)."""
    source_split = "test" if Path(data, "test").is_dir() else split
    by_resolution = [
        open_image_text_dataset(data, split=source_split, resolution=r, **dataset_kwargs) for r in resolutions
    ]
    chosen, seen = [], set()
    for i, caption in enumerate(by_resolution[0].captions):
        if caption not in seen:
            seen.add(caption)
            chosen.append(i)
        if len(chosen) == count:
            break
    samples = [items_at(dataset, chosen) for dataset in by_resolution]
    if any(s["skipped"] for s in samples[0]):
        logger.warning("some validation images could not be read; the next readable ones stand in")
    return tuple(torch.stack([s["pixel_values"] for s in part]) for part in samples)
