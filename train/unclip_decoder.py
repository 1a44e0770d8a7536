"""`clipcond train decoder --conditioning image-embedding`: the DALL-E 2 (unCLIP) decoder.

    clipcond train decoder --conditioning image-embedding --clip runs/clip --data shapes/ --output-dir runs/unclip

A diffusers `UNet2DConditionModel` (the same presets as the text path, in pixel space) learns to draw an image from
its CLIP image embedding (Ramesh et al. 2022, sec. 2.1, in the layout of Stable unCLIP): the embedding enters as
`class_labels` (`class_embed_type="projection"`, added to the timestep embedding) and, with `--embedding-tokens K`
(default 4, unCLIP's "four extra tokens of context"), as K cross-attention tokens made by an `ImageEmbeddingTokens`
module trained jointly with the UNet. With K = 0 the UNet has no cross-attention (its cross-attention blocks become
self-attention blocks; `clipcond.models.image_embedding.without_cross_attention`) and reads no context.

How an embedding becomes the UNet's inputs is `clipcond.models.image_embedding`, shared with the pipelines:
standardised (sqrt(D) times the unit embedding), optionally noise-augmented (`--noise-level N`: each sample is
noised to a level drawn uniformly from [0, N] of a cosine DDPM schedule, and the level's sinusoidal embedding is
concatenated; sampling then picks `noise_level`), and replaced by the zero vector with probability
`--caption-dropout` (the unconditional input of classifier-free guidance, which the pipeline feeds too).

The frozen CLIP vision tower runs once over the training images, before training, into an `ImageEmbeddingCache`
(`RUN/cache/` by default); training steps look rows up and never run the tower. The objective, EMA, checkpoints and
resume are the text path's (`clipcond.train.decoder.DecoderStage`, `clipcond.train.loop`).

The run folder is a complete `ImageVariationPipeline` (`unet/` with the EMA weights, `scheduler/`,
`image_encoder/` (the CLIP vision tower), `feature_extractor/` (its pixel statistics), `embedding_tokens/` with
K > 0, `image_noising_scheduler/` with N > 0, `model_index.json`), plus `clipcond_run.json` (with
`"conditioning": "image-embedding"` and the CLIP's content hash), `checkpoints/`, `validation/step-<N>.png` (rows:
a fixed test image, then its variations) and `cache/`.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from transformers import CLIPImageProcessor

from clipcond.conditioning import ImageEmbeddingCache
from clipcond.data.folders import collate_image_text
from clipcond.data.open import dataset_options, items_at, native_resolution, open_image_text_dataset
from clipcond.encoders.base import load_encoder
from clipcond.lineage import content_hash
from clipcond.models.clip import load_vision_tower
from clipcond.models.image_embedding import (
    ImageEmbeddingTokens,
    condition_width,
    decoder_condition,
    drop_condition,
    make_noising_scheduler,
    unet_inputs,
    without_cross_attention,
)
from clipcond.models.unet import create_unet, unet_config
from clipcond.train.decoder import (
    Conditioning,
    DecoderStage,
    configure_unet_for_training,
    image_grid,
    make_noise_scheduler,
)
from clipcond.train.ema import ema_record, ema_weights, make_ema
from clipcond.train.loop import (
    draw_rows,
    finish_run,
    make_output_dir,
    prepare_training,
    train,
)
from clipcond.transfer import to_device

logger = logging.getLogger(__name__)

CONDITIONING = "image-embedding"


def check_image_embedding_args(args: argparse.Namespace) -> None:
    """Reject values of the image-embedding options that would fail later, naming the option and the value."""
    if args.embedding_tokens < 0:
        raise ValueError(f"`--embedding-tokens` must be >= 0 (0: no cross-attention), got {args.embedding_tokens}")
    max_level = make_noising_scheduler().config.num_train_timesteps - 1
    if not 0 <= args.noise_level <= max_level:
        raise ValueError(
            f"`--noise-level` must be in [0, {max_level}] (0: no noise augmentation), got {args.noise_level}"
        )
    if args.validation_sources < 1:
        raise ValueError(f"`--validation-sources` must be >= 1, got {args.validation_sources}")


# ---------------------------------------------------------------------------------------------- conditioning


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

    def __call__(self, batch: dict, generator: torch.Generator, device: torch.device) -> Conditioning:
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
        return Conditioning(encoder_hidden_states=None, encoder_attention_mask=None, class_labels=condition)

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

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        class_labels: torch.Tensor,
        encoder_hidden_states: None = None,
        encoder_attention_mask: None = None,
        return_dict: bool = False,
    ):
        assert encoder_hidden_states is None and encoder_attention_mask is None, "the tokens come from class_labels"
        inputs = unet_inputs(class_labels, self.embedding_tokens)
        return self.unet(sample, timestep, **inputs, return_dict=return_dict)


# -------------------------------------------------------------------------------------------------- the stage


@dataclass
class VariationValidation:
    sources: torch.Tensor  # (S, 3, r, r) uint8 at the image encoder's resolution: what the pipeline embeds
    shown: torch.Tensor  # (S, 3, R, R) uint8 at the decoder's resolution: the grid's first column
    images_per_source: int
    inference_steps: int
    guidance_scale: float
    seed: int
    out_dir: Path
    log_images: bool


class UnCLIPDecoderStage(DecoderStage):
    """`DecoderStage` (objective, EMA, checkpoints) with the unCLIP decoder's pipeline and validation."""

    def __init__(
        self,
        accelerator,
        model: UnCLIPDecoder,
        noise_scheduler: DDPMScheduler,
        conditioning: ImageEmbeddingConditioning,
        *,
        image_encoder,
        feature_extractor: CLIPImageProcessor,
        ema: EMAModel | None,
        snr_gamma: float | None,
        validation: VariationValidation | None,
        clip_hash: str,
    ):
        super().__init__(
            accelerator,
            model,
            noise_scheduler,
            conditioning,
            text_encoder=None,
            tokenizer=None,
            ema=ema,
            snr_gamma=snr_gamma,
            validation=None,
            clip_hash=clip_hash,
        )
        self.image_encoder = image_encoder
        self.feature_extractor = feature_extractor
        self.variation_validation = validation

    def pipeline(self, decoder: UnCLIPDecoder, scheduler):
        from clipcond.pipelines.variation import ImageVariationPipeline

        return ImageVariationPipeline(
            unet=decoder.unet,
            scheduler=scheduler,
            image_encoder=self.image_encoder,
            embedding_tokens=decoder.embedding_tokens,
            feature_extractor=self.feature_extractor,
            image_noising_scheduler=self.conditioning.noising_scheduler,
        )

    def validate(self, step):
        if self.variation_validation is None:
            return {}
        from clipcond.pipelines.text_to_image import scheduler_from_name

        v = self.variation_validation
        num_images = len(v.sources) * v.images_per_source
        # The same noise at every validation, one generator per image: the grids of a run are comparable.
        generators = [torch.Generator().manual_seed(v.seed + k) for k in range(num_images)]
        with ema_weights(self.ema, self.unwrapped) as decoder:
            decoder.eval()
            pipe = self.pipeline(decoder, scheduler_from_name("dpm", self.noise_scheduler.config))
            pipe.set_progress_bar_config(disable=True)
            images = pipe(
                image=v.sources,
                num_inference_steps=v.inference_steps,
                guidance_scale=v.guidance_scale,
                num_images_per_prompt=v.images_per_source,
                generator=generators,
                output_type="pt",
            ).images  # (S * n, 3, R, R) in [0, 1], source by source
        images = images.float().cpu().unflatten(0, (len(v.sources), v.images_per_source))
        shown = (v.shown.float() / 255)[:, None]  # (S, 1, 3, R, R)
        rows = torch.cat([shown, images], dim=1).flatten(0, 1)  # a row per source: the source, its variations
        v.out_dir.mkdir(parents=True, exist_ok=True)
        path = v.out_dir / f"step-{step}.png"
        image_grid(rows, columns=v.images_per_source + 1).save(path)
        if v.log_images:
            writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
            writer.add_images("validation", rows, step, dataformats="NCHW")
        logger.info("step %d: validation variations in %s", step, path)
        return {}


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


# --------------------------------------------------------------------------------------------------- the entry


def main_image_embedding(accelerator: Accelerator, args: argparse.Namespace) -> int:
    """`clipcond train decoder` with `--conditioning image-embedding` (arguments parsed and checked by
    `clipcond.train.decoder.parse_args`; the accelerator made and the output folder held by its `main`)."""
    # 2. The frozen image encoder (first: a wrong --clip fails before anything is read or written)
    if args.text_encoder is None:  # --clip RUN: the synonym of --text-encoder clipcond:RUN
        image_encoder, image_mean, image_std = load_vision_tower(args.clip)
        lineage = {"kind": "clipcond", "name": str(args.clip), "content_hash": content_hash(args.clip)}
    else:  # the image tower of any CLIP adapter (clipcond.encoders)
        encoder = load_encoder(args.text_encoder, what="--text-encoder", need_text=False, need_image=True)
        image_encoder, image_mean, image_std = encoder.image_encoder, encoder.image_mean, encoder.image_std
        lineage = encoder.lineage()
    clip_hash = lineage["content_hash"]
    output_dir = make_output_dir(accelerator, args)
    image_encoder.to(accelerator.device)
    clip_size = image_encoder.config.image_size
    embedding_dim = image_encoder.config.projection_dim
    feature_extractor = CLIPImageProcessor(
        size={"shortest_edge": clip_size},
        crop_size={"height": clip_size, "width": clip_size},
        image_mean=list(image_mean),
        image_std=list(image_std),
    )

    # 3. Data, at the decoder's resolution; the same items at the image encoder's for the embedding cache
    dataset_kwargs = dataset_options(args)
    dataset = open_image_text_dataset(args.data, split=args.split, resolution=args.resolution, **dataset_kwargs)
    resolution = args.resolution or (dataset.info or {}).get("resolution") or native_resolution(dataset)
    if dataset.resolution != resolution:
        dataset = open_image_text_dataset(args.data, split=args.split, resolution=resolution, **dataset_kwargs)
    clip_dataset = dataset
    if resolution != clip_size:
        clip_dataset = open_image_text_dataset(args.data, split=args.split, resolution=clip_size, **dataset_kwargs)

    # 4. CLIP image embeddings of the training images, computed once (by the main process; the others read the file)
    cache_dir = Path(args.cache_dir) if args.cache_dir else output_dir / "cache"
    with accelerator.main_process_first():
        cache = ImageEmbeddingCache.build_or_load(
            image_encoder,
            clip_dataset,
            cache_dir,
            image_mean=image_mean,
            image_std=image_std,
            batch_size=args.encode_batch_size,
            device=accelerator.device,
            progress=accelerator.is_local_main_process,
        )
    noising_scheduler = make_noising_scheduler() if args.noise_level > 0 else None
    conditioning = ImageEmbeddingConditioning(cache, args.caption_dropout, noising_scheduler, args.noise_level)

    # 5. UNet (+ embedding tokens), noise schedule, EMA
    num_tokens = args.embedding_tokens
    cross_attention_dim = args.cross_attention_dim or embedding_dim
    config = unet_config(
        args.model,
        sample_size=resolution,
        cross_attention_dim=cross_attention_dim,
        in_channels=3,
        image_embedding_dim=condition_width(embedding_dim, noising_scheduler is not None),
    )
    if num_tokens == 0:
        config = without_cross_attention(config)
    unet = create_unet(config)
    embedding_tokens = ImageEmbeddingTokens(embedding_dim, num_tokens, cross_attention_dim) if num_tokens else None
    xformers = configure_unet_for_training(unet, args, accelerator.device, accelerator.mixed_precision)
    decoder = UnCLIPDecoder(unet, embedding_tokens)
    noise_scheduler = make_noise_scheduler(args)
    ema = make_ema(decoder, args, accelerator.device)
    num_parameters = sum(p.numel() for p in decoder.parameters())
    logger.info(
        "unCLIP decoder %r: %.2f M parameters; CLIP image embedding width %d, %d context tokens, noise level <= %d",
        args.model,
        num_parameters / 1e6,
        embedding_dim,
        num_tokens,
        args.noise_level,
    )

    # 6. Optimizer (the UNet's and the tokens' parameters: the image encoder is frozen), schedule; prepare
    prepared = prepare_training(accelerator, args, decoder)
    model = prepared.model

    # 7. Train
    validation = None
    if args.validation_steps:
        sources, shown = validation_sources(
            args.data, args.split, (clip_size, resolution), args.validation_sources, dataset_kwargs
        )
        validation = VariationValidation(
            sources=sources,
            shown=shown,
            images_per_source=args.validation_images_per_prompt,
            inference_steps=args.validation_inference_steps,
            guidance_scale=args.validation_guidance_scale,
            seed=args.seed,
            out_dir=output_dir / "validation",
            log_images=args.report_to in ("tensorboard", "all"),
        )
    stage = UnCLIPDecoderStage(
        accelerator,
        model,
        noise_scheduler,
        conditioning,
        image_encoder=image_encoder,
        feature_extractor=feature_extractor,
        ema=ema,
        snr_gamma=args.snr_gamma,
        validation=validation,
        clip_hash=clip_hash,
    )
    result = train(
        accelerator,
        args,
        stage,
        prepared,
        dataset=dataset,
        collate_fn=collate_image_text,
    )

    # 8. Save the pipeline (EMA weights) and the run record
    def record() -> dict:
        return {
            "data": {
                "path": str(args.data),
                "split": args.split,
                "num_samples": len(dataset),
                "resolution": resolution,
            },
            "clip": {"path": str(args.clip or lineage["name"]), "content_hash": clip_hash},
            "encoder": lineage,
            "conditioning": CONDITIONING,
            "image_embedding": {
                **conditioning.record(),
                "embedding_tokens": num_tokens,
                "cross_attention_dim": cross_attention_dim if num_tokens else None,
            },
            "unet": {
                "preset": args.model,
                "parameters": num_parameters,
                "class_embedding_input_dim": unet.config.projection_class_embeddings_input_dim,
                "cross_attention": num_tokens > 0,
                "xformers": xformers,
                "content_hash": content_hash(output_dir / "unet"),
            },
            "ema": ema_record(ema),
        }

    finish_run(accelerator, args, stage, result, "clipcond-decoder", record)
    return 0
