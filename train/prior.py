"""`clipcond train prior`: the DALL-E 2 prior, a diffusers `PriorTransformer` mapping a CLIP run's text embeddings to
its image embeddings.

    clipcond train prior --clip runs/clip --data shapes/ --output-dir runs/prior
    accelerate launch -m clipcond.train.prior --clip runs/clip --data shapes/ --output-dir runs/prior

The prior of Ramesh et al. 2022 ("Hierarchical Text-Conditional Image Generation with CLIP Latents", sec. 2.1), the
diffusion variant: a decoder-only transformer reads the caption's per-token states and CLIP text embedding, the
timestep and the noised CLIP image embedding, and predicts the unnoised image embedding directly (the "sample" /
x0 objective, mean squared error), under a DDPM noise schedule (cosine by default, as the paper). The image
embeddings are L2-normalised and standardised per dimension with statistics of the training set (`clip_mean`,
`clip_std`, stored in the model). Captions are dropped to the empty prompt with probability `--caption-dropout`
for classifier-free guidance, and an EMA of the weights is kept and saved.

Both CLIP towers are frozen and run once, before training: the text tower over the distinct captions into a
`TextEmbeddingCache`, the image tower over the images into an `ImageEmbeddingCache` (both in `RUN/cache/` by
default; keyed by encoder and data, so runs may share a `--cache-dir`). A training step only looks rows up, so it
never decodes an image or runs CLIP.

The run folder is a complete `PriorPipeline` (`save_pretrained`: `prior/` with the EMA weights and the
standardisation, `scheduler/` with the training noise schedule, `text_encoder/`, `tokenizer/`,
`model_index.json`), plus `clipcond_run.json` (arguments, data, summary with the last validation, and the content
hash of the CLIP), `checkpoints/` (each with the same pipeline in `pretrained/`), `cache/` and `logs/`.
Validation (`clipcond.evaluation.prior.evaluate_prior` on the first `--validation-max-captions` items of
`--validation-split`, EMA weights) runs every `--validation-steps` and at the end.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from clipcond.conditioning import ImageEmbeddingCache, TextEmbeddingCache, unique_captions
from clipcond.data.folders import ImageCaptionDataset
from clipcond.data.open import (
    add_validation_split_argument,
    dataset_options,
    open_image_text_dataset,
    validation_split,
)
from clipcond.encoders.base import FrozenEncoder
from clipcond.help_formatter import HelpFormatter
from clipcond.hub import check_local_folder
from clipcond.lineage import content_hash, init_record
from clipcond.models.prior import (
    create_prior,
    embedding_statistics,
    load_pretrained_prior,
    prior_config,
    set_embedding_statistics,
    standardize,
)
from clipcond.models.prior_text import PriorTextInputs, check_prior_fits, prior_text_inputs
from clipcond.text_encoding import context_length
from clipcond.train.diffusion import (
    DiffusionStage,
    ValidationSettings,
    add_cache_args,
    add_caption_dropout_arg,
    add_encoder_and_data_args,
    add_noise_schedule_args,
    add_sampler_args,
    cache_dir,
    cache_image_embeddings,
    cache_text_embeddings,
    check_diffusion_args,
    lineage_record,
    load_frozen_encoder,
    make_noise_scheduler,
)
from clipcond.train.ema import add_ema_args, ema_record, ema_weights, make_ema
from clipcond.train.loop import (
    IndexDataset,
    add_training_args,
    collate_indices,
    data_record,
    draw_rows,
    finish_run,
    make_output_dir,
    parse_training_args,
    prepare_training,
    run_stage,
    train,
    trainable_parameters,
)
from clipcond.transfer import to_device

logger = logging.getLogger(__name__)

# Predicted standardised embeddings are clipped to +-5 standard deviations at each sampling step, as Karlo's prior
# scheduler does: a guard against guidance overshooting, far outside the data.
CLIP_SAMPLE_RANGE = 5.0

# CPU-sized training defaults for the `tiny` prior on the shapes data (README, "What it reaches on 2 CPU cores")
TRAINING_DEFAULTS = {
    "train_batch_size": 256,
    "learning_rate": 1e-3,
    "max_train_steps": 250,
    "lr_warmup_steps": 25,
    "weight_decay": 1e-2,
    "checkpointing_steps": 125,
    "validation_steps": 125,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="clipcond train prior",
        description="Train a DALL-E 2 prior (diffusers PriorTransformer): CLIP text embedding -> CLIP image "
        "embedding, on the frozen CLIP of a run.",
        formatter_class=HelpFormatter,
    )
    data = parser.add_argument_group("data")
    add_encoder_and_data_args(
        data,
        "the frozen CLIP (both towers): clipcond:RUN, transformers:PATH or open_clip:MODEL@WEIGHTS "
        "(clipcond.encoders)",
    )
    add_cache_args(
        data,
        cache_help="folder of the text- and image-embedding caches (default OUTPUT_DIR/cache; files are keyed by "
        "encoder and data, so runs may share a folder)",
        batch_help="captions or images per CLIP call",
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model", default="tiny", help="PriorTransformer preset (test, tiny, small, base) or a JSON config file"
    )
    model.add_argument(
        "--init-prior",
        default=None,
        metavar="PATH",
        help="start from a pretrained diffusers PriorTransformer folder (or a prior run, or a Hub id) instead of "
        "--model's preset at random, keeping its standardisation statistics; its embedding_dim must be the CLIP's "
        "projection width and its num_embeddings the CLIP's context length",
    )
    diffusion = parser.add_argument_group("diffusion")
    add_noise_schedule_args(diffusion)
    add_caption_dropout_arg(diffusion)
    add_ema_args(parser, "prior weights")
    val = parser.add_argument_group("validation (`clipcond eval prior` on the first captions of a split)")
    add_validation_split_argument(val)
    val.add_argument("--validation-max-captions", type=int, default=128, help="captions (items) per validation")
    add_sampler_args(val, steps=25, steps_help="DDPM sampling steps", guidance_scale=4.0)
    add_training_args(parser, **TRAINING_DEFAULTS)
    return parse_training_args(parser, argv, check_prior_args)


def check_prior_args(args: argparse.Namespace) -> None:
    """Reject values that would fail later or train nonsense, naming the option and the value."""
    check_diffusion_args(args, positive=("validation_max_captions", "validation_inference_steps"))
    if args.init_prior:  # a missing folder fails now, before CLIP runs over the data
        check_local_folder(args.init_prior, "--init-prior", "pass a PriorTransformer folder (a prior run's prior/)")
    if args.validation_guidance_scale < 0:
        raise ValueError(f"`--validation-guidance-scale` must be >= 0, got {args.validation_guidance_scale}")


# ---------------------------------------------------------------------------------------------- the training data


@dataclass
class PriorData:
    """The cached embeddings of the training set, by data set index."""

    targets: torch.Tensor  # (N, D) float32 standardised normalised image embeddings
    text_cache: TextEmbeddingCache
    caption_rows: torch.Tensor  # (N,) data set index -> text cache row, of the caption of the item that was embedded

    def text(self, indices: torch.Tensor, text_encoder, device: torch.device) -> PriorTextInputs:
        text = self.text_cache.lookup(self.caption_rows[indices]).to_device(device)
        return prior_text_inputs(text, text_encoder)

    def empty(self, batch_size: int, text_encoder, device: torch.device) -> PriorTextInputs:
        return prior_text_inputs(self.text_cache.lookup_empty(batch_size).to_device(device), text_encoder)


# -------------------------------------------------------------------------------------------------- the stage


@dataclass
class PriorValidation(ValidationSettings):
    """`clipcond eval prior`'s figures on the first `max_captions` items of the validation split."""

    dataset: ImageCaptionDataset
    image_cache: ImageEmbeddingCache  # the validation images' CLIP embeddings
    max_captions: int


@dataclass(eq=False)
class PriorStage(DiffusionStage):
    """The prior's loss (the unnoised embedding regressed, DALL-E 2 sec. 2.1) and its validation figures."""

    data: PriorData
    _: KW_ONLY
    text_encoder: torch.nn.Module  # frozen; its outputs are cached, the pipeline runs it
    tokenizer: Any
    caption_dropout: float
    validation: PriorValidation | None

    def loss(self, batch, generator):
        device = self.accelerator.device
        index = batch["index"]
        sample = to_device(self.data.targets[index], device)  # (B, D) standardised image embeddings
        batch_size, width = sample.shape
        on_generator = {"generator": generator, "device": generator.device}
        text = self.data.text(index, self.text_encoder, device)
        if self.caption_dropout > 0:
            # Ho & Salimans 2022: the empty prompt's inputs, what the pipeline's unconditional branch feeds.
            drop = draw_rows(lambda n: torch.rand(n, **on_generator), batch_size, device) < self.caption_dropout
            text = PriorTextInputs.where(drop, self.data.empty(batch_size, self.text_encoder, device), text)
        noise = draw_rows(lambda n: torch.randn((n, width), **on_generator), batch_size, device)
        num_timesteps = self.noise_scheduler.config.num_train_timesteps
        timesteps = draw_rows(lambda n: torch.randint(0, num_timesteps, (n,), **on_generator), batch_size, device)
        noisy = self.noise_scheduler.add_noise(sample, noise, timesteps)
        prediction = self.model(
            noisy,
            timesteps,
            proj_embedding=text.proj_embedding,
            encoder_hidden_states=text.encoder_hidden_states,
            attention_mask=text.attention_mask,
            return_dict=False,
        )[0]  # (B, D): the unnoised standardised embedding
        return F.mse_loss(prediction.float(), sample.float()), {}

    def pipeline(self, prior, scheduler):
        from clipcond.pipelines.prior import PriorPipeline

        return PriorPipeline(
            prior=prior, scheduler=scheduler, text_encoder=self.text_encoder, tokenizer=self.tokenizer
        )

    def validate(self, step):
        if self.validation is None:
            return {}
        from clipcond.evaluation.prior import evaluate_prior

        v = self.validation
        with ema_weights(self.ema, self.unwrapped) as prior:
            prior.eval()
            pipe = self.pipeline(prior, self.noise_scheduler)
            pipe.set_progress_bar_config(disable=True)
            metrics = evaluate_prior(
                pipe,
                v.dataset,
                image_cache=v.image_cache,
                max_captions=v.max_captions,
                seed=v.seed,
                **v.sampler_kwargs(),
            )
        return {
            key: value
            for key, value in metrics.items()
            if key.startswith(("cosine", "zero_shot")) and value is not None
        }


# -------------------------------------------------------------------------------------------- set-up steps


def load_clip(args: argparse.Namespace, device: torch.device) -> FrozenEncoder:
    """Both towers of the frozen CLIP, on `device`; an encoder without a pooled embedding (T5) is refused."""
    encoder = load_frozen_encoder(args, text=True, image=True)
    if encoder.embed_dim is None:
        raise ValueError(f"`--text-encoder` {encoder.name!r} has no pooled embedding; the prior needs a CLIP")
    return encoder.to(device)


def open_prior_data(
    args: argparse.Namespace, resolution: int
) -> tuple[torch.utils.data.Dataset, ImageCaptionDataset | None]:
    """The training split at the image encoder's `resolution`, and the validation split (None when validation is
    off, or the default split is missing: `validation_split`)."""
    dataset_kwargs = {**dataset_options(args), "resolution": resolution}
    dataset = open_image_text_dataset(args.data, split=args.split, **dataset_kwargs)
    split = validation_split(args) if args.validation_steps else None
    if split is None:
        return dataset, None
    return dataset, ImageCaptionDataset(args.data, split=split, **dataset_kwargs)


@dataclass
class PriorCaches:
    """The frozen towers' outputs, computed once: the distinct captions' text embeddings, the training (and
    validation) images' CLIP embeddings."""

    captions: list[str]  # the distinct captions, in the text cache's row order
    caption_rows: torch.Tensor  # (N,) data set index -> text cache row
    text: TextEmbeddingCache
    image: ImageEmbeddingCache
    validation_image: ImageEmbeddingCache | None


def encode_prior_data(
    accelerator: Accelerator,
    args: argparse.Namespace,
    encoder: FrozenEncoder,
    dataset,
    validation_set: ImageCaptionDataset | None,
) -> PriorCaches:
    """Fill (or read) the caches, by the main process first; the others then read the files."""
    folder = cache_dir(args, Path(args.output_dir))
    captions, caption_rows = unique_captions(dataset.captions)
    with accelerator.main_process_first():
        text_cache = cache_text_embeddings(accelerator, args, encoder, captions, folder)
        image_cache = cache_image_embeddings(accelerator, args, encoder, dataset, folder)
        validation_cache = None
        if validation_set is not None:
            validation_cache = cache_image_embeddings(accelerator, args, encoder, validation_set, folder)
    return PriorCaches(captions, caption_rows, text_cache, image_cache, validation_cache)


def build_prior(
    args: argparse.Namespace, encoder: FrozenEncoder, caches: PriorCaches
) -> tuple[torch.nn.Module, PriorData, str | None]:
    """A prior of `--model`'s preset for the CLIP's widths, standardising with the training images' statistics (or
    `--init-prior`'s pretrained prior with its own statistics: its weights were learned in that standardised space),
    the training targets it learns, and the folder of `--init-prior`'s weights (None without it)."""
    text_encoder, tokenizer = encoder.text_encoder, encoder.tokenizer
    sizes = {
        "embedding_dim": text_encoder.config.projection_dim,
        "num_embeddings": context_length(text_encoder, tokenizer),
    }
    image_embeds = F.normalize(caches.image.embeddings.float(), dim=-1)  # (N, D)
    init_folder = None
    if args.init_prior:
        prior, init_folder = load_pretrained_prior(args.init_prior, **sizes)
    else:
        prior = create_prior(prior_config(args.model, **sizes))
        set_embedding_statistics(prior, *embedding_statistics(image_embeds))
    check_prior_fits(prior, text_encoder, sizes["num_embeddings"])
    config = prior.config
    data = PriorData(
        targets=standardize(prior, image_embeds),
        text_cache=caches.text,
        caption_rows=caches.caption_rows[caches.image.item_indices],
    )
    if args.gradient_checkpointing:
        logger.warning("--gradient-checkpointing is ignored: PriorTransformer does not support it")
    logger.info(
        "prior %r: %.2f M parameters, width %d, %d layers; CLIP embedding width %d, %d text positions",
        args.init_prior or args.model,
        trainable_parameters(prior) / 1e6,
        config["num_attention_heads"] * config["attention_head_dim"],
        config["num_layers"],
        config["embedding_dim"],
        config["num_embeddings"],
    )
    return prior, data, init_folder


def make_validation(args: argparse.Namespace, validation_set, caches: PriorCaches) -> PriorValidation | None:
    if validation_set is None:
        return None
    return PriorValidation(
        **ValidationSettings.sampler_args(args),
        dataset=validation_set,
        image_cache=caches.validation_image,
        max_captions=args.validation_max_captions,
    )


def run_record(
    args: argparse.Namespace,
    encoder: FrozenEncoder,
    *,
    dataset,
    caches: PriorCaches,
    prior,
    init_folder: str | None,
    validation,
    ema,
) -> dict:
    """The prior's sections of the run record (after the export: it hashes the saved prior)."""
    config = prior.config
    return {
        "data": data_record(
            args,
            len(dataset),
            num_captions=len(caches.captions),
            resolution=encoder.image_size,
            skipped_files=caches.image.skipped,
            validation_split=args.validation_split if validation is not None else None,
        ),
        **lineage_record(args, encoder),
        "caches": {
            "text": {"path": str(caches.text.path), "key": caches.text.key},
            "image": {"path": str(caches.image.path), "key": caches.image.key},
        },
        "prior": {
            "preset": None if args.init_prior else args.model,
            **init_record(args.init_prior, init_folder),
            "parameters": trainable_parameters(prior),
            "embedding_dim": config["embedding_dim"],
            "num_embeddings": config["num_embeddings"],
            "content_hash": content_hash(Path(args.output_dir) / "prior"),
        },
        "ema": ema_record(ema),
    }


# --------------------------------------------------------------------------------------------------- the entry


def main(argv: list[str] | None = None) -> int:
    return run_stage(parse_args(argv), train_prior)


def train_prior(accelerator: Accelerator, args: argparse.Namespace) -> int:
    # 2. The frozen towers (first: a wrong --clip fails before anything is read or written)
    encoder = load_clip(args, accelerator.device)
    make_output_dir(accelerator, args)

    # 3. Data, at the image encoder's resolution
    dataset, validation_set = open_prior_data(args, encoder.image_size)

    # 4. Embeddings of the captions and images, computed once
    caches = encode_prior_data(accelerator, args, encoder, dataset, validation_set)
    encoder.image_encoder.to("cpu")  # not needed any more: the caches hold what training and validation read

    # 5. The prior, its standardisation from the training images, the noise schedule, EMA
    prior, data, init_folder = build_prior(args, encoder, caches)
    # the prior predicts the unnoised embedding ("sample" prediction, DALL-E 2 sec. 2.1)
    noise_scheduler = make_noise_scheduler(args, prediction_type="sample", clip_sample_range=CLIP_SAMPLE_RANGE)
    ema = make_ema(prior, args, accelerator.device)  # after the statistics: the EMA copies them

    # 6. Optimizer (the prior's weights only: both towers are frozen), schedule; prepare
    prepared = prepare_training(accelerator, args, prior)

    # 7. Train
    stage = PriorStage(
        accelerator,
        prepared.model,
        noise_scheduler,
        data,
        text_encoder=encoder.text_encoder,
        tokenizer=encoder.tokenizer,
        caption_dropout=args.caption_dropout,
        ema=ema,
        validation=make_validation(args, validation_set, caches),
        clip_hash=encoder.content_hash,
    )
    result = train(accelerator, args, stage, prepared, dataset=IndexDataset(len(dataset)), collate_fn=collate_indices)

    # 8. Save the pipeline (EMA weights) and the run record
    record = {"dataset": dataset, "caches": caches, "prior": prior, "init_folder": init_folder}
    record["validation"] = stage.validation
    finish_run(
        accelerator, args, stage, result, "clipcond-prior", lambda: run_record(args, encoder, ema=ema, **record)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
