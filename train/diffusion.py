"""What the diffusion trainers (`clipcond train decoder`, `clipcond train prior`) share, defined once: the frozen
encoder's options and loading, the noise schedule's options and factory, the checks of the options they have in
common, the sampler settings of validation, and `DiffusionStage`, the part of a `Stage` around the loss (an EMA of
the weights, the CLIP's content hash kept in checkpoints and checked on resume, the export of a pipeline with the
EMA weights and its code).
"""

from __future__ import annotations

import argparse
from dataclasses import KW_ONLY, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel

from clipcond.conditioning import ImageEmbeddingCache, TextEmbeddingCache
from clipcond.data.open import add_data_arguments
from clipcond.encoders.base import FrozenEncoder, load_encoder
from clipcond.finite import finite_float
from clipcond.lineage import content_hash
from clipcond.models.clip import load_text_tower, load_vision_tower
from clipcond.pipeline_code import ship_pipeline_code
from clipcond.train.ema import check_ema_args, ema_state, ema_weights, load_ema_state
from clipcond.train.loop import Stage

BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}  # DDPM (Ho et al.); Nichol & Dhariwal 2021


# --------------------------------------------------------------------------------------------------- arguments


def add_encoder_and_data_args(data: argparse._ArgumentGroup, encoder_help: str) -> None:
    """`--text-encoder SPEC` or its synonym `--clip RUN` (one of them required), then the data set's options."""
    encoder = data.add_mutually_exclusive_group(required=True)
    encoder.add_argument("--text-encoder", default=None, metavar="SPEC", help=encoder_help)
    encoder.add_argument("--clip", help="CLIP run folder (from `clipcond train clip`): --text-encoder clipcond:RUN")
    add_data_arguments(data)


def add_cache_args(data: argparse._ArgumentGroup, *, cache_help: str, batch_help: str) -> None:
    """Where the frozen encoder's outputs are cached, and how many inputs it reads per call."""
    data.add_argument("--cache-dir", default=None, help=cache_help)
    data.add_argument("--encode-batch-size", type=int, default=256, help=batch_help)


def add_noise_schedule_args(diffusion: argparse._ArgumentGroup) -> None:
    diffusion.add_argument(
        "--beta-schedule", default="cosine", choices=sorted(BETA_SCHEDULES), help="DDPM noise schedule"
    )
    diffusion.add_argument("--num-train-timesteps", type=int, default=1000, help="diffusion steps of the schedule")


def add_caption_dropout_arg(diffusion: argparse._ArgumentGroup) -> None:
    diffusion.add_argument(
        "--caption-dropout",
        type=finite_float,
        default=0.1,
        help="probability of training on the empty prompt instead of the caption (classifier-free guidance)",
    )


def add_sampler_args(val: argparse._ArgumentGroup, *, steps: int, steps_help: str, guidance_scale: float) -> None:
    """The sampler options of validation, which `ValidationSettings.sampler_args` reads."""
    val.add_argument("--validation-inference-steps", type=int, default=steps, help=steps_help)
    val.add_argument(
        "--validation-guidance-scale",
        type=finite_float,
        default=guidance_scale,
        help="classifier-free guidance weight",
    )


def check_diffusion_args(args: argparse.Namespace, positive: tuple[str, ...]) -> None:
    """Reject values of the shared options that would fail later or train nonsense, naming the option and the value;
    `positive`: the dest names of the stage's options that must be >= 1."""
    if not 0.0 <= args.caption_dropout < 1.0:
        raise ValueError(f"`--caption-dropout` must be in [0, 1), got {args.caption_dropout}")
    check_ema_args(args)
    for name in ("num_train_timesteps", "encode_batch_size", *positive):
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name.replace('_', '-')}` must be >= 1, got {getattr(args, name)}")


# ---------------------------------------------------------------------------------------------- set-up steps


def load_frozen_encoder(args: argparse.Namespace, *, text: bool = True, image: bool = False) -> FrozenEncoder:
    """The frozen encoder of `--text-encoder SPEC`, or of `--clip RUN` (its synonym `clipcond:RUN`, named in errors
    as `--clip`), with the towers the stage reads: `text` (encoder and tokenizer), `image` (encoder and its pixel
    statistics)."""
    if args.text_encoder is not None:
        return load_encoder(args.text_encoder, what="--text-encoder", need_text=text, need_image=image)
    text_encoder = tokenizer = image_encoder = image_mean = image_std = None
    if text:
        text_encoder, tokenizer = load_text_tower(args.clip)
    if image:
        image_encoder, image_mean, image_std = load_vision_tower(args.clip)
    encoder = FrozenEncoder(
        "clipcond",
        str(args.clip),
        content_hash(args.clip),
        text_encoder,
        tokenizer,
        image_encoder=image_encoder,
        image_mean=image_mean,
        image_std=image_std,
    )
    encoder.check_tokens()
    return encoder


def cache_dir(args: argparse.Namespace, output_dir: Path) -> Path:
    """`--cache-dir`, by default `OUTPUT_DIR/cache`: the run folder is the one place the command knows it can write
    (a data folder may be read-only or shared), and a resumed run finds its cache there."""
    return Path(args.cache_dir) if args.cache_dir else output_dir / "cache"


def cache_text_embeddings(
    accelerator: Accelerator,
    args: argparse.Namespace,
    encoder: FrozenEncoder,
    captions: list[str],
    folder: Path,
    mask_padding: bool = True,
) -> TextEmbeddingCache:
    """The frozen text encoder's outputs for `captions`, computed once into `folder` (or read from it); with or
    without masking the padding (`encode_prompts`)."""
    towers = (encoder.text_encoder, encoder.tokenizer)
    encoding = _encoding(accelerator, args)
    return TextEmbeddingCache.build_or_load(*towers, captions, folder, **encoding, mask_padding=mask_padding)


def cache_image_embeddings(
    accelerator: Accelerator, args: argparse.Namespace, encoder: FrozenEncoder, dataset, folder: Path
) -> ImageEmbeddingCache:
    """The frozen image encoder's embeddings of `dataset`'s images (at its resolution), computed once into `folder`
    (or read from it)."""
    statistics = {"image_mean": encoder.image_mean, "image_std": encoder.image_std}
    return ImageEmbeddingCache.build_or_load(
        encoder.image_encoder, dataset, folder, **statistics, **_encoding(accelerator, args)
    )


def _encoding(accelerator: Accelerator, args: argparse.Namespace) -> dict:
    """How the caches run the encoder: `--encode-batch-size` inputs per call, on the training device, with a
    progress bar on each machine's main process."""
    return {
        "batch_size": args.encode_batch_size,
        "device": accelerator.device,
        "progress": accelerator.is_local_main_process,
    }


def make_noise_scheduler(
    args: argparse.Namespace, prediction_type: str, clip_sample_range: float = 1.0, clip_sample: bool = True
) -> DDPMScheduler:
    """The training noise schedule, saved with the pipeline so that any sampler built from it fits the model.

    `timestep_spacing="trailing"` makes few-step samplers start at the last training step, where the sample is
    (nearly) pure noise, rather than "leading"'s T - T/n (Lin et al. 2024, "Common Diffusion Noise Schedules and
    Sample Steps are Flawed", table 2); training does not read it. Predicted x0 are clipped to
    [-`clip_sample_range`, `clip_sample_range`] at each sampling step: the data range; not with `clip_sample`
    False (latents, which have no such bound).
    """
    return DDPMScheduler(
        num_train_timesteps=args.num_train_timesteps,
        beta_schedule=BETA_SCHEDULES[args.beta_schedule],
        prediction_type=prediction_type,
        clip_sample=clip_sample,
        clip_sample_range=clip_sample_range,
        timestep_spacing="trailing",
    )


def lineage_record(args: argparse.Namespace, encoder: FrozenEncoder) -> dict:
    """The run record's `clip` and `encoder` sections: what the stage was trained on, which loaders check."""
    return {
        "clip": {"path": str(args.clip or encoder.name), "content_hash": encoder.content_hash},
        "encoder": encoder.lineage(),
    }


# -------------------------------------------------------------------------------------------------- the stage


@dataclass
class ValidationSettings:
    """How a diffusion stage samples when it validates (with the EMA weights)."""

    inference_steps: int
    guidance_scale: float
    seed: int  # the same noise at every validation: the figures and grids of a run are comparable

    def sampler_kwargs(self) -> dict:
        """The pipeline's (or evaluation's) sampler arguments."""
        return {"num_inference_steps": self.inference_steps, "guidance_scale": self.guidance_scale}

    @staticmethod
    def sampler_args(args: argparse.Namespace) -> dict:
        """The fields of this class from the options of `add_sampler_args` (and `--seed`)."""
        return {
            "inference_steps": args.validation_inference_steps,
            "guidance_scale": args.validation_guidance_scale,
            "seed": args.seed,
        }


@dataclass(eq=False)
class DiffusionStage(Stage):
    """The part of a diffusion stage around its loss: an EMA of the weights stepped after every optimizer step, kept
    in checkpoints with the content hash of the CLIP the stage trains on (a resume on another CLIP is refused), and
    the export of `pipeline(model with the EMA weights, noise_scheduler)`. Subclasses add their fields and supply
    `loss` and `pipeline`."""

    accelerator: Accelerator
    model: torch.nn.Module  # as Accelerate prepared it
    noise_scheduler: DDPMScheduler  # the training schedule, saved with the pipeline
    _: KW_ONLY
    ema: EMAModel | None  # None with --no-ema
    clip_hash: str  # content hash of the frozen CLIP (`clipcond.lineage.content_hash`)

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def pipeline(self, model: torch.nn.Module, scheduler):
        """The stage's diffusers pipeline around `model` (unwrapped) and `scheduler`."""
        raise NotImplementedError

    def after_optimizer_step(self):
        if self.ema is not None:
            self.ema.step(self.unwrapped.parameters())

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
        """The pipeline with the EMA weights, saved with its code (`clipcond.pipeline_code`): stock diffusers loads
        the folder without clipcond."""
        with ema_weights(self.ema, self.unwrapped) as model:
            pipeline = self.pipeline(model, self.noise_scheduler)
            pipeline.save_pretrained(path, safe_serialization=True)
            ship_pipeline_code(pipeline, path)
