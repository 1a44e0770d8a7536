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
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler, PriorTransformer

from clipcond.conditioning import (
    ImageEmbeddingCache,
    TextEmbeddingCache,
    context_length,
    unique_captions,
)
from clipcond.data.folders import ImageCaptionDataset
from clipcond.data.open import add_data_arguments, dataset_options, open_image_text_dataset
from clipcond.encoders.base import FrozenEncoder, load_encoder
from clipcond.finite import finite_float
from clipcond.help_formatter import HelpFormatter
from clipcond.lineage import content_hash
from clipcond.models.clip import load_text_tower, load_vision_tower
from clipcond.models.prior import (
    PriorTextInputs,
    check_prior_fits,
    create_prior,
    embedding_statistics,
    prior_config,
    prior_text_inputs,
    set_embedding_statistics,
    standardize,
)
from clipcond.train.ema import (
    add_ema_args,
    check_ema_args,
    ema_record,
    ema_state,
    ema_weights,
    load_ema_state,
    make_ema,
)
from clipcond.train.loop import RUN_RECORD as RUN_RECORD  # re-exported: the demo and benchmarks read it here
from clipcond.train.loop import (
    Stage,
    add_training_args,
    check_training_args,
    draw_rows,
    finish_run,
    make_output_dir,
    prepare_training,
    run_stage,
    train,
)
from clipcond.transfer import to_device

logger = logging.getLogger(__name__)

BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}  # DDPM (Ho et al.); Nichol & Dhariwal 2021
# Predicted standardised embeddings are clipped to +-5 standard deviations at each sampling step, as Karlo's prior
# scheduler does: a guard against guidance overshooting, far outside the data.
CLIP_SAMPLE_RANGE = 5.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="clipcond train prior",
        description="Train a DALL-E 2 prior (diffusers PriorTransformer): CLIP text embedding -> CLIP image "
        "embedding, on the frozen CLIP of a run.",
        formatter_class=HelpFormatter,
    )
    data = parser.add_argument_group("data")
    encoder = data.add_mutually_exclusive_group(required=True)
    encoder.add_argument(
        "--text-encoder",
        default=None,
        metavar="SPEC",
        help="the frozen CLIP (both towers): clipcond:RUN, transformers:PATH or open_clip:MODEL@WEIGHTS "
        "(clipcond.encoders)",
    )
    encoder.add_argument("--clip", help="CLIP run folder (from `clipcond train clip`): --text-encoder clipcond:RUN")
    add_data_arguments(data)
    data.add_argument(
        "--cache-dir",
        default=None,
        help="folder of the text- and image-embedding caches (default OUTPUT_DIR/cache; files are keyed by encoder "
        "and data, so runs may share a folder)",
    )
    data.add_argument("--encode-batch-size", type=int, default=256, help="captions or images per CLIP call")

    model = parser.add_argument_group("model")
    model.add_argument(
        "--model", default="tiny", help="PriorTransformer preset (test, tiny, small, base) or a JSON config file"
    )

    diffusion = parser.add_argument_group("diffusion")
    diffusion.add_argument(
        "--beta-schedule", default="cosine", choices=sorted(BETA_SCHEDULES), help="DDPM noise schedule"
    )
    diffusion.add_argument("--num-train-timesteps", type=int, default=1000, help="diffusion steps of the schedule")
    diffusion.add_argument(
        "--caption-dropout",
        type=finite_float,
        default=0.1,
        help="probability of training on the empty prompt instead of the caption (classifier-free guidance)",
    )
    add_ema_args(parser, "prior weights")

    val = parser.add_argument_group("validation (`clipcond eval prior` on the first captions of a split)")
    val.add_argument("--validation-split", default="test", help="split of --data to validate on ('none' to skip)")
    val.add_argument("--validation-max-captions", type=int, default=128, help="captions (items) per validation")
    val.add_argument("--validation-inference-steps", type=int, default=25, help="DDPM sampling steps")
    val.add_argument(
        "--validation-guidance-scale", type=finite_float, default=4.0, help="classifier-free guidance weight"
    )

    # CPU-sized defaults for the `tiny` prior on the shapes data (README, "What it reaches on 2 CPU cores")
    add_training_args(
        parser,
        train_batch_size=256,
        learning_rate=1e-3,
        max_train_steps=250,
        lr_warmup_steps=25,
        weight_decay=1e-2,
        checkpointing_steps=125,
        validation_steps=125,
    )
    args = parser.parse_args(argv)
    check_training_args(args)
    check_prior_args(args)
    return args


def check_prior_args(args: argparse.Namespace) -> None:
    """Reject values that would fail later or train nonsense, naming the option and the value."""
    if not 0.0 <= args.caption_dropout < 1.0:
        raise ValueError(f"`--caption-dropout` must be in [0, 1), got {args.caption_dropout}")
    check_ema_args(args)
    for name in ("num_train_timesteps", "encode_batch_size", "validation_max_captions", "validation_inference_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name.replace('_', '-')}` must be >= 1, got {getattr(args, name)}")
    if args.validation_guidance_scale < 0:
        raise ValueError(f"`--validation-guidance-scale` must be >= 0, got {args.validation_guidance_scale}")


def make_noise_scheduler(args: argparse.Namespace) -> DDPMScheduler:
    """The training noise schedule, saved with the pipeline, which samples with it.

    The prior predicts the unnoised sample ("sample" prediction, DALL-E 2 sec. 2.1); `timestep_spacing="trailing"`
    makes few-step sampling start at the last training step, where the embedding is pure noise (Lin et al. 2024).
    """
    return DDPMScheduler(
        num_train_timesteps=args.num_train_timesteps,
        beta_schedule=BETA_SCHEDULES[args.beta_schedule],
        prediction_type="sample",
        clip_sample=True,
        clip_sample_range=CLIP_SAMPLE_RANGE,
        timestep_spacing="trailing",
    )


# ---------------------------------------------------------------------------------------------- the training data


class _IndexDataset(torch.utils.data.Dataset):
    """Item i is i: a training step needs only the data set indices, whose embeddings the caches hold."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        return index


def _collate_indices(indices: list[int]) -> dict:
    return {"index": torch.tensor(indices, dtype=torch.long), "skipped": []}


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
class ValidationSettings:
    dataset: ImageCaptionDataset
    image_cache: ImageEmbeddingCache
    max_captions: int
    inference_steps: int
    guidance_scale: float
    seed: int


class PriorStage(Stage):
    def __init__(
        self,
        accelerator,
        model,
        noise_scheduler: DDPMScheduler,
        data: PriorData,
        *,
        text_encoder,
        tokenizer,
        caption_dropout: float,
        ema,
        validation: ValidationSettings | None,
        clip_hash: str,
    ):
        self.accelerator = accelerator
        self.model = model
        self.noise_scheduler = noise_scheduler
        self.data = data
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.caption_dropout = caption_dropout
        self.ema = ema
        self.validation = validation
        self.clip_hash = clip_hash

    @property
    def unwrapped(self) -> PriorTransformer:
        return self.accelerator.unwrap_model(self.model)

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

    def after_optimizer_step(self):
        if self.ema is not None:
            self.ema.step(self.unwrapped.parameters())

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
                guidance_scale=v.guidance_scale,
                num_inference_steps=v.inference_steps,
                max_captions=v.max_captions,
                seed=v.seed,
            )
        return {
            key: value
            for key, value in metrics.items()
            if key.startswith(("cosine", "zero_shot")) and value is not None
        }

    def extra_state(self):
        return {"clip_content_hash": self.clip_hash, **ema_state(self.ema)}

    def load_extra_state(self, state):
        saved_hash = state.get("clip_content_hash")
        if saved_hash is not None and saved_hash != self.clip_hash:
            raise ValueError(
                f"the checkpoint was trained on the CLIP with content hash {saved_hash[:12]}..., but `--clip` has "
                f"{self.clip_hash[:12]}...; resume with the CLIP it was trained on, or start a new run"
            )
        load_ema_state(self.ema, state, self.accelerator.device)

    def export(self, path: Path):
        with ema_weights(self.ema, self.unwrapped) as prior:
            self.pipeline(prior, self.noise_scheduler).save_pretrained(path, safe_serialization=True)


# --------------------------------------------------------------------------------------------------- the entry


def main(argv: list[str] | None = None) -> int:
    return run_stage(parse_args(argv), train_prior)


def train_prior(accelerator: Accelerator, args: argparse.Namespace) -> int:

    # 2. The frozen towers (first: a wrong --clip fails before anything is read or written)
    if args.text_encoder is None:  # --clip RUN: the synonym of --text-encoder clipcond:RUN
        text_encoder, tokenizer = load_text_tower(args.clip)
        vision_model, image_mean, image_std = load_vision_tower(args.clip)
        encoder = FrozenEncoder("clipcond", str(args.clip), content_hash(args.clip), text_encoder, tokenizer)
    else:
        encoder = load_encoder(args.text_encoder, what="--text-encoder", need_image=True)
        text_encoder, tokenizer = encoder.text_encoder, encoder.tokenizer
        vision_model, image_mean, image_std = encoder.image_encoder, encoder.image_mean, encoder.image_std
    if encoder.embed_dim is None:
        raise ValueError(f"`--text-encoder` {encoder.name!r} has no pooled embedding; the prior needs a CLIP")
    clip_hash = encoder.content_hash
    output_dir = make_output_dir(accelerator, args)
    text_encoder.to(accelerator.device)
    vision_model.to(accelerator.device)
    resolution = vision_model.config.image_size

    # 3. Data, at the image encoder's resolution
    dataset_kwargs = {**dataset_options(args), "resolution": resolution}
    dataset = open_image_text_dataset(args.data, split=args.split, **dataset_kwargs)
    validation_set = None
    if args.validation_steps and args.validation_split != "none":
        if Path(args.data, args.validation_split).is_dir():
            validation_set = ImageCaptionDataset(args.data, split=args.validation_split, **dataset_kwargs)
        else:
            logger.info("no split %r in %s: no validation", args.validation_split, args.data)

    # 4. Embeddings of the captions and images, computed once (by the main process; the others then read the files)
    cache_dir = Path(args.cache_dir) if args.cache_dir else output_dir / "cache"
    captions, caption_rows = unique_captions(dataset.captions)
    encode = {"batch_size": args.encode_batch_size, "device": accelerator.device}
    with accelerator.main_process_first():
        progress = accelerator.is_local_main_process
        text_cache = TextEmbeddingCache.build_or_load(
            text_encoder, tokenizer, captions, cache_dir, progress=progress, **encode
        )
        image_kwargs = {"image_mean": image_mean, "image_std": image_std, "progress": progress, **encode}
        image_cache = ImageEmbeddingCache.build_or_load(vision_model, dataset, cache_dir, **image_kwargs)
        validation_cache = None
        if validation_set is not None:
            validation_cache = ImageEmbeddingCache.build_or_load(
                vision_model, validation_set, cache_dir, **image_kwargs
            )
    vision_model.to("cpu")  # not needed any more: the caches hold what training and validation read

    # 5. The prior, its standardisation from the training images, the noise schedule, EMA
    config = prior_config(
        args.model,
        embedding_dim=text_encoder.config.projection_dim,
        num_embeddings=context_length(text_encoder, tokenizer),
    )
    prior = create_prior(config)
    check_prior_fits(prior, text_encoder, context_length(text_encoder, tokenizer))
    image_embeds = F.normalize(image_cache.embeddings.float(), dim=-1)  # (N, D)
    mean, std = embedding_statistics(image_embeds)
    set_embedding_statistics(prior, mean, std)
    data = PriorData(
        targets=standardize(prior, image_embeds),
        text_cache=text_cache,
        caption_rows=caption_rows[image_cache.item_indices],
    )
    if args.gradient_checkpointing:
        logger.warning("--gradient-checkpointing is ignored: PriorTransformer does not support it")
    noise_scheduler = make_noise_scheduler(args)
    ema = make_ema(prior, args, accelerator.device)  # after the statistics: the EMA copies them
    num_parameters = sum(p.numel() for p in prior.parameters() if p.requires_grad)
    logger.info(
        "prior %r: %.2f M parameters, width %d, %d layers; CLIP embedding width %d, %d text positions",
        args.model,
        num_parameters / 1e6,
        config["num_attention_heads"] * config["attention_head_dim"],
        config["num_layers"],
        config["embedding_dim"],
        config["num_embeddings"],
    )

    # 6. Optimizer (the prior's weights only: both towers are frozen), schedule; prepare
    prepared = prepare_training(accelerator, args, prior)
    model = prepared.model

    # 7. Train
    validation = None
    if validation_set is not None:
        validation = ValidationSettings(
            dataset=validation_set,
            image_cache=validation_cache,
            max_captions=args.validation_max_captions,
            inference_steps=args.validation_inference_steps,
            guidance_scale=args.validation_guidance_scale,
            seed=args.seed,
        )
    stage = PriorStage(
        accelerator,
        model,
        noise_scheduler,
        data,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        caption_dropout=args.caption_dropout,
        ema=ema,
        validation=validation,
        clip_hash=clip_hash,
    )
    result = train(
        accelerator,
        args,
        stage,
        prepared,
        dataset=_IndexDataset(len(dataset)),
        collate_fn=_collate_indices,
    )

    # 8. Save the pipeline (EMA weights) and the run record
    def record() -> dict:
        return {
            "data": {
                "path": str(args.data),
                "split": args.split,
                "num_samples": len(dataset),
                "num_captions": len(captions),
                "resolution": resolution,
                "skipped_files": image_cache.skipped,
                "validation_split": args.validation_split if validation is not None else None,
            },
            "clip": {"path": str(args.clip or encoder.name), "content_hash": clip_hash},
            "encoder": encoder.lineage(),
            "caches": {
                "text": {"path": str(text_cache.path), "key": text_cache.key},
                "image": {"path": str(image_cache.path), "key": image_cache.key},
            },
            "prior": {
                "preset": args.model,
                "parameters": num_parameters,
                "embedding_dim": config["embedding_dim"],
                "num_embeddings": config["num_embeddings"],
                "content_hash": content_hash(output_dir / "prior"),
            },
            "ema": ema_record(ema),
        }

    finish_run(accelerator, args, stage, result, "clipcond-prior", record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
