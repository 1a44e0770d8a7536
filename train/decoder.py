"""`clipcond train decoder`: a diffusers `UNet2DConditionModel` conditioned on the frozen text tower of a CLIP run.

    clipcond train decoder --clip runs/clip --data shapes/ --output-dir runs/decoder
    clipcond train decoder --text-encoder open_clip:ViT-B-32@vit-b-32.bin --data shapes/ --output-dir runs/decoder
    accelerate launch -m clipcond.train.decoder --clip runs/clip --data shapes/ --output-dir runs/decoder

The frozen encoder is any `clipcond.encoders` adapter (`--text-encoder SPEC`: clipcond:RUN, transformers:PATH,
open_clip:MODEL@WEIGHTS, t5:PATH; `--clip RUN` is `--text-encoder clipcond:RUN`); the run record names it
(`encoder`: kind, name, content hash) and `clipcond.encoders.load_text_to_image` refuses the run beside another.

The Stable Diffusion path at the data's resolution, in pixel space: the UNet cross-attends to the per-token states
of CLIP's text encoder (`CLIPTextModelWithProjection` loaded from the CLIP run, frozen), learns DDPM's denoising
objective (epsilon or v targets, optional min-SNR weighting), drops captions to the empty prompt for classifier-free
guidance, and keeps an EMA of its weights. The text encoder runs once per distinct caption, before training, into a
`TextEmbeddingCache`; training steps only look rows up. The cache's default folder is `RUN/cache/`: the run folder is
the one place this command owns and knows it can write (a data folder may be read-only or shared by users, and a
CSV's parent is no data set's folder), and a resumed run finds it there. Its files are keyed by encoder and captions,
so several runs on one CLIP and data set can share a `--cache-dir` instead.

The run folder is a complete `TextToImagePipeline` (`save_pretrained`: `unet/` with the EMA weights, `scheduler/`
with the training noise schedule, `text_encoder/`, `tokenizer/`, `model_index.json`), plus `clipcond_run.json`
(arguments, data, summary, and the content hash of the CLIP it was trained on), `checkpoints/` (each with the same
pipeline in `pretrained/`), `validation/step-<N>.png`, `cache/` and `logs/`.

What the UNet is conditioned on is one object (`TextConditioning` now), which turns a batch into the UNet's
`encoder_hidden_states`, `encoder_attention_mask` and `class_labels`; the DALL-E 2 path adds an image-embedding
conditioning (`class_embed_type="projection"`) beside it (`--conditioning image-embedding` runs
`clipcond.train.unclip_decoder`, which reuses `DecoderStage` and this objective). What the UNet denoises is one
function (`encode_images_to_model_space`): pixels in [-1, 1] now, a VAE's latents later.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor
from diffusers.training_utils import EMAModel, compute_snr
from einops import rearrange
from PIL import Image

from clipcond.conditioning import TextEmbeddingCache, encode_prompts, unique_captions
from clipcond.data.folders import collate_image_text
from clipcond.data.open import add_data_arguments, dataset_options, native_resolution, open_image_text_dataset
from clipcond.encoders.base import FrozenEncoder, check_compatibility, load_encoder
from clipcond.finite import finite_float
from clipcond.help_formatter import HelpFormatter
from clipcond.lineage import content_hash
from clipcond.models.attention import enable_xformers_if_possible
from clipcond.models.unet import check_encoder_fits, create_unet, unet_config
from clipcond.tokenizer import load_tokenizer
from clipcond.train.ema import (
    add_ema_args,
    check_ema_args,
    ema_record,
    ema_state,
    ema_weights,
    load_ema_state,
    make_ema,
)
from clipcond.train.loop import RUN_RECORD as RUN_RECORD  # re-exported: the demo reads it here
from clipcond.train.loop import (
    Stage,
    add_training_args,
    check_training_args,
    draw_rows,
    finish_run,
    hold_output_dir,
    make_accelerator,
    make_output_dir,
    prepare_training,
    train,
)
from clipcond.transfer import to_device

logger = logging.getLogger(__name__)

# Colour-shape prompts of the built-in shapes data; "a blue square" is one of its held-out pairs (DEFAULT_HELD_OUT).
DEFAULT_VALIDATION_PROMPTS = ("a red circle", "a blue square", "a green triangle", "a yellow circle")
DEFAULT_STEPS = {"text": 1200, "image-embedding": 800}  # --max-train-steps by --conditioning (see parse_args)
BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}  # DDPM (Ho et al.); Nichol & Dhariwal 2021
CLIP_MODEL_TYPES = ("clip", "clip_text_model")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="clipcond train decoder",
        description="Train a diffusers UNet to generate images conditioned on the frozen text encoder of a CLIP run.",
        formatter_class=HelpFormatter,
    )
    data = parser.add_argument_group("data")
    encoder = data.add_mutually_exclusive_group(required=True)
    encoder.add_argument(
        "--text-encoder",
        default=None,
        metavar="SPEC",
        help="the frozen text encoder: clipcond:RUN, transformers:PATH, open_clip:MODEL@WEIGHTS or t5:PATH "
        "(clipcond.encoders)",
    )
    encoder.add_argument("--clip", help="CLIP run folder (from `clipcond train clip`): --text-encoder clipcond:RUN")
    add_data_arguments(data)
    data.add_argument(
        "--resolution", type=int, default=None, help="image size (default: the data set's, else its first image's)"
    )
    data.add_argument(
        "--cache-dir",
        default=None,
        help="folder of the text-embedding cache (default OUTPUT_DIR/cache; files are keyed by encoder and "
        "captions, so runs may share a folder)",
    )
    data.add_argument("--encode-batch-size", type=int, default=256, help="captions per text-encoder call")

    model = parser.add_argument_group("model")
    model.add_argument("--model", default="tiny", help="UNet preset (test, tiny, small, base) or a JSON config file")
    model.add_argument(
        "--conditioning",
        default="text",
        choices=["text", "image-embedding"],
        help="what the UNet reads: the text encoder's per-token states (cross-attention), or the CLIP image "
        "embedding (the DALL-E 2 decoder; clipcond.train.unclip_decoder)",
    )
    model.add_argument(
        "--cross-attention-dim",
        type=int,
        default=None,
        help="UNet cross-attention width (default: the text encoder's hidden_size; another width adds a projection)",
    )
    model.add_argument(
        "--channels-last",
        action="store_true",
        help="UNet weights in channels-last memory format (faster convolutions on GPUs; no gain on CPU)",
    )
    model.add_argument(
        "--enable-xformers",
        action="store_true",
        help="xformers attention where CUDA and xformers can run it (PyTorch SDPA otherwise, with a warning)",
    )

    diffusion = parser.add_argument_group("diffusion")
    diffusion.add_argument(
        "--prediction-type",
        default="v_prediction",
        choices=["epsilon", "v_prediction"],
        help="what the UNet predicts (v: Salimans & Ho 2022)",
    )
    diffusion.add_argument(
        "--beta-schedule", default="cosine", choices=sorted(BETA_SCHEDULES), help="DDPM noise schedule"
    )
    diffusion.add_argument("--num-train-timesteps", type=int, default=1000, help="diffusion steps of the schedule")
    diffusion.add_argument(
        "--snr-gamma",
        type=finite_float,
        default=5.0,
        help="min-SNR loss weighting with this gamma (Hang et al. 2023; 5 is their choice); 0: off",
    )
    diffusion.add_argument(
        "--caption-dropout",
        type=finite_float,
        default=0.1,
        help="probability of training on the empty prompt instead of the caption (classifier-free guidance)",
    )
    diffusion.add_argument(
        "--pooled-text",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also add the L2-normalised pooled CLIP text embedding to the timestep embedding (as Imagen and SDXL "
        "do): the whole caption in one vector beside the token states (default: off)",
    )

    add_ema_args(parser, "UNet weights")

    val = parser.add_argument_group("validation images (EMA weights, DPM-Solver++)")
    val.add_argument("--validation-prompts", nargs="+", default=list(DEFAULT_VALIDATION_PROMPTS), help="prompts")
    val.add_argument("--validation-images-per-prompt", type=int, default=2, help="images per prompt (a grid row)")
    val.add_argument("--validation-inference-steps", type=int, default=10, help="DPM-Solver++ steps")
    val.add_argument(
        "--validation-guidance-scale", type=finite_float, default=3.0, help="classifier-free guidance weight"
    )

    # The DALL-E 2 decoder's options (clipcond.train.unclip_decoder, which checks them).
    unclip = parser.add_argument_group("--conditioning image-embedding (the DALL-E 2 decoder)")
    unclip.add_argument(
        "--embedding-tokens",
        type=int,
        default=4,
        help="K cross-attention tokens projected from the embedding (unCLIP's 4); 0: a UNet without cross-attention",
    )
    unclip.add_argument(
        "--noise-level",
        type=int,
        default=0,
        help="noise augmentation of the embedding: train on levels drawn from [0, N] of a cosine schedule (0: none)",
    )
    unclip.add_argument(
        "--validation-sources",
        type=int,
        default=4,
        help="test images (of distinct captions) whose variations validation draws, "
        "--validation-images-per-prompt each",
    )

    # CPU-sized defaults for the `tiny` UNet on the shapes data (README, "What it reaches on 2 CPU cores"). At these
    # budgets v-prediction on the cosine schedule with min-SNR weighting draws clean shapes where epsilon prediction
    # on the linear schedule still leaves visible noise; the EMA warms up (clipcond.train.ema). The step budgets by
    # conditioning are `clipcond demo`'s recipe (docs/lab-notes.md).
    add_training_args(
        parser,
        train_batch_size=32,
        learning_rate=1e-3,
        max_train_steps=None,
        steps_help="optimizer steps in total (default: "
        + ", ".join(f"{n} with --conditioning {c}" for c, n in DEFAULT_STEPS.items())
        + ")",
        lr_warmup_steps=30,
        weight_decay=1e-2,
        checkpointing_steps=100,
        validation_steps=100,
    )
    args = parser.parse_args(argv)
    if args.max_train_steps is None:
        args.max_train_steps = DEFAULT_STEPS[args.conditioning]
    check_training_args(args)
    check_decoder_args(args)
    if args.conditioning == "image-embedding":
        from clipcond.train.unclip_decoder import check_image_embedding_args

        check_image_embedding_args(args)
    return args


def check_decoder_args(args: argparse.Namespace) -> None:
    """Reject values that would fail later or train nonsense, naming the option and the value."""
    if not 0.0 <= args.caption_dropout < 1.0:
        raise ValueError(f"`--caption-dropout` must be in [0, 1), got {args.caption_dropout}")
    check_ema_args(args)
    if args.snr_gamma is not None and args.snr_gamma < 0:
        raise ValueError(f"`--snr-gamma` must be >= 0 (0: no min-SNR weighting), got {args.snr_gamma}")
    if args.snr_gamma == 0:
        args.snr_gamma = None
    if args.pooled_text and args.conditioning != "text":
        raise ValueError(
            f"`--pooled-text` adds the pooled text embedding of the caption; it needs `--conditioning text`, got "
            f"{args.conditioning!r}"
        )
    if args.cross_attention_dim is not None and args.cross_attention_dim < 1:
        raise ValueError(f"`--cross-attention-dim` must be >= 1, got {args.cross_attention_dim}")
    for name in ("num_train_timesteps", "encode_batch_size", "validation_images_per_prompt"):
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name.replace('_', '-')}` must be >= 1, got {getattr(args, name)}")
    if args.validation_inference_steps < 1:
        raise ValueError(f"`--validation-inference-steps` must be >= 1, got {args.validation_inference_steps}")


# ------------------------------------------------------------------------------------------------ frozen encoder


def load_text_tower(clip_path: str | Path):
    """The frozen text encoder of a CLIP run: `CLIPTextModelWithProjection` (eval, no gradients) and its tokenizer."""
    from transformers import CLIPTextModelWithProjection

    path = Path(clip_path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"`--clip` folder {str(path)!r} does not exist; pass the output folder of `clipcond train clip`"
        )
    config_file = path / "config.json"
    try:
        model_type = json.loads(config_file.read_text()).get("model_type") if config_file.is_file() else None
    except json.JSONDecodeError as err:
        raise ValueError(f"`--clip` {str(path)!r}: config.json is not valid JSON ({err})") from None
    if model_type not in CLIP_MODEL_TYPES:
        found = f"its config.json has model_type {model_type!r}" if config_file.is_file() else "it has no config.json"
        raise ValueError(
            f"`--clip` {str(path)!r} is not a CLIP model folder ({found}; expected one of {list(CLIP_MODEL_TYPES)}); "
            "pass the output folder of `clipcond train clip`"
        )
    # transformers reports the vision tower's weights as unexpected in a text-only load, in a long table; we check
    # the one thing that matters, that no text weight is missing, ourselves.
    report_logger = logging.getLogger("transformers.modeling_utils")
    report_filter = _DropLoadReport()
    report_logger.addFilter(report_filter)
    try:
        text_encoder, info = CLIPTextModelWithProjection.from_pretrained(
            path, local_files_only=True, output_loading_info=True
        )
        tokenizer = load_tokenizer(path)
    except OSError as err:
        raise ValueError(f"`--clip` {str(path)!r}: cannot load its text encoder and tokenizer ({err})") from None
    finally:
        report_logger.removeFilter(report_filter)
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ValueError(
            f"`--clip` {str(path)!r} lacks {len(missing)} weights of the text encoder (e.g. {missing[:3]}); "
            "pass a complete CLIP run folder"
        )
    text_encoder.requires_grad_(False)
    text_encoder.eval()
    return text_encoder, tokenizer


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


def load_frozen_text_encoder(args: argparse.Namespace) -> FrozenEncoder:
    """The frozen encoder of `--text-encoder SPEC`, or of `--clip RUN` (its synonym `clipcond:RUN`)."""
    if args.text_encoder is None:
        text_encoder, tokenizer = load_text_tower(args.clip)
        encoder = FrozenEncoder("clipcond", str(args.clip), content_hash(args.clip), text_encoder, tokenizer)
        encoder.check_tokens()
        return encoder
    return load_encoder(args.text_encoder, what="--text-encoder")


# ---------------------------------------------------------------------------------------------- conditioning


@dataclass
class Conditioning:
    """What the UNet reads for a batch besides the noisy sample and the timestep."""

    encoder_hidden_states: torch.Tensor  # (B, L, W) cross-attention input
    encoder_attention_mask: torch.Tensor | None  # (B, L) 1 for tokens to attend to, 0 for padding
    class_labels: torch.Tensor | None = None  # (B, D) embedding added to the timestep's (class_embed_type)


class TextConditioning:
    """Per-token states of the frozen text encoder for each sample's caption, looked up in the cache; with
    probability `caption_dropout` a sample gets the empty prompt's states instead (Ho & Salimans 2022), which is
    what the pipeline's unconditional branch feeds at inference."""

    kind = "text"

    def __init__(
        self,
        cache: TextEmbeddingCache,
        sample_rows: torch.Tensor,
        caption_dropout: float,
        columns_multiple: int = 1,
        pooled: bool = False,
    ):
        self.cache = cache
        self.sample_rows = sample_rows  # (N,) data set index -> cache row
        self.caption_dropout = caption_dropout
        self.pooled = pooled  # also return the normalised pooled text embedding as `class_labels`
        self.columns_multiple = columns_multiple  # 8 for a compiled UNet: a few shapes, not one per caption length

    def __call__(self, batch: dict, generator: torch.Generator, device: torch.device) -> Conditioning:
        rows = self.sample_rows[batch["index"]]  # (B,) cache rows, on the CPU
        dropout = self.caption_dropout > 0
        # The cache pads to the context length; the UNet attends to the columns up to the batch's longest caption (the
        # same function, see `attended_columns`), counted on the CPU so that the step never waits on the device.
        columns = self.cache.attended_columns(rows, with_empty=dropout, multiple=self.columns_multiple)
        text = self.cache.lookup(rows, columns).to_device(device)
        hidden_states, attention_mask = text.hidden_states, text.attention_mask  # (B, L, W), (B, L)
        pooled = text.pooled if self.pooled else None  # (B, D)
        if dropout:
            batch_size = hidden_states.shape[0]
            drop = draw_rows(lambda n: torch.rand(n, generator=generator, device=generator.device), batch_size, device)
            drop = drop < self.caption_dropout  # (B,)
            empty = self.cache.lookup_empty(batch_size, columns).to_device(device)
            hidden_states = torch.where(drop[:, None, None], empty.hidden_states, hidden_states)
            attention_mask = torch.where(drop[:, None], empty.attention_mask, attention_mask)
            if pooled is not None:
                pooled = torch.where(drop[:, None], empty.pooled, pooled)
        class_labels = None if pooled is None else F.normalize(pooled, dim=-1)
        return Conditioning(hidden_states, attention_mask, class_labels)

    def record(self) -> dict:
        return {
            "kind": self.kind,
            "cache": str(self.cache.path),
            "cache_key": self.cache.key,
            "num_captions": len(self.cache),
            "caption_dropout": self.caption_dropout,
            "pooled_text": self.pooled,
        }


# ---------------------------------------------------------------------------------------------- the objective


def encode_images_to_model_space(
    pixels: torch.Tensor, vae=None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """uint8 images (B, 3, H, W) -> what the UNet denoises: pixels in [-1, 1], or with a VAE (diffusers
    `AutoencoderKL`) its sampled latents (B, C, H/f, W/f) times `scaling_factor`, as the pipeline decodes them."""
    if pixels.dtype != torch.uint8:
        raise ValueError(f"`pixels` must be uint8 in [0, 255], got {pixels.dtype}")
    sample = pixels.float() / 127.5 - 1.0
    if vae is None:
        return sample
    with torch.no_grad():
        latents = vae.encode(sample.to(vae.dtype)).latent_dist.sample(generator)
    return latents.float() * vae.config.scaling_factor


def make_noise_scheduler(args: argparse.Namespace, pixel_space: bool = True) -> DDPMScheduler:
    """The training noise schedule, saved with the pipeline so that any sampler built from it fits the UNet.

    `timestep_spacing="trailing"` makes few-step samplers start at the last training step, where the sample is
    (nearly) pure noise, rather than "leading"'s T - T/n (Lin et al. 2024, "Common Diffusion Noise Schedules and
    Sample Steps are Flawed", table 2); training does not read it. In pixel space x0 predictions are clipped to the
    data range [-1, 1].
    """
    return DDPMScheduler(
        num_train_timesteps=args.num_train_timesteps,
        beta_schedule=BETA_SCHEDULES[args.beta_schedule],
        prediction_type=args.prediction_type,
        clip_sample=pixel_space,
        timestep_spacing="trailing",
    )


def diffusion_target(scheduler: DDPMScheduler, sample, noise, timesteps) -> torch.Tensor:
    """What the UNet learns to predict: the noise (epsilon), or v = alpha_t eps - sigma_t x0 (Salimans & Ho 2022)."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(sample, noise, timesteps)
    raise ValueError(f"`prediction_type` must be 'epsilon' or 'v_prediction', got {prediction_type!r}")


def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample loss weights (B,) of min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
    Weighting Strategy", eq. 7 and sec. 3.4): the x0 loss weighted by min(SNR, gamma) is, for an epsilon target,
    the epsilon loss weighted by min(SNR, gamma) / SNR, and for a v target the v loss weighted by
    min(SNR, gamma) / (SNR + 1)."""
    snr = compute_snr(scheduler, timesteps)  # alpha_t^2 / sigma_t^2
    clipped = torch.clamp(snr, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def diffusion_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler: DDPMScheduler,
    snr_gamma: float | None = None,
) -> torch.Tensor:
    """Mean squared error in fp32, per sample weighted by min-SNR when `snr_gamma` is given."""
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none")
    per_sample = per_sample.mean(dim=tuple(range(1, per_sample.ndim)))  # (B,)
    if snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(scheduler, timesteps, snr_gamma)
    return per_sample.mean()


# -------------------------------------------------------------------------------------------------- the stage


@dataclass
class ValidationSettings:
    prompts: list[str]
    images_per_prompt: int
    inference_steps: int
    guidance_scale: float
    seed: int
    out_dir: Path
    log_images: bool  # to tensorboard


class DecoderStage(Stage):
    def __init__(
        self,
        accelerator,
        model,
        noise_scheduler: DDPMScheduler,
        conditioning: TextConditioning,
        *,
        text_encoder,
        tokenizer,
        ema: EMAModel | None,
        snr_gamma: float | None,
        validation: ValidationSettings | None,
        clip_hash: str,
        vae=None,
    ):
        self.accelerator = accelerator
        self.model = model
        self.noise_scheduler = noise_scheduler
        self.conditioning = conditioning
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.ema = ema
        self.snr_gamma = snr_gamma
        self.validation = validation
        self.clip_hash = clip_hash
        self.vae = vae

    @property
    def unwrapped(self) -> UNet2DConditionModel:
        return self.accelerator.unwrap_model(self.model)

    def loss(self, batch, generator):
        device = self.accelerator.device
        pixels = to_device(batch["pixel_values"], device)
        sample = encode_images_to_model_space(pixels, self.vae, generator)  # (B, C, h, w)
        batch_size, shape = sample.shape[0], sample.shape[1:]
        on_generator = {"generator": generator, "device": generator.device}
        noise = draw_rows(lambda n: torch.randn((n, *shape), **on_generator), batch_size, device)
        num_timesteps = self.noise_scheduler.config.num_train_timesteps
        timesteps = draw_rows(lambda n: torch.randint(0, num_timesteps, (n,), **on_generator), batch_size, device)
        cond = self.conditioning(batch, generator, device)
        noisy = self.noise_scheduler.add_noise(sample, noise, timesteps)
        target = diffusion_target(self.noise_scheduler, sample, noise, timesteps)
        prediction = self.model(
            noisy,
            timesteps,
            encoder_hidden_states=cond.encoder_hidden_states,
            encoder_attention_mask=cond.encoder_attention_mask,
            class_labels=cond.class_labels,
            return_dict=False,
        )[0]
        return diffusion_loss(prediction, target, timesteps, self.noise_scheduler, self.snr_gamma), {}

    def after_optimizer_step(self):
        if self.ema is not None:
            self.ema.step(self.unwrapped.parameters())

    def pipeline(self, unet, scheduler):
        from clipcond.pipelines.text_to_image import TextToImagePipeline

        return TextToImagePipeline(
            unet=unet, scheduler=scheduler, text_encoder=self.text_encoder, tokenizer=self.tokenizer, vae=self.vae
        )

    def validate(self, step):
        if self.validation is None:
            return {}
        from clipcond.pipelines.text_to_image import scheduler_from_name

        v = self.validation
        num_images = len(v.prompts) * v.images_per_prompt
        # The same noise at every validation, one generator per image: the grids of a run are comparable.
        generators = [torch.Generator().manual_seed(v.seed + k) for k in range(num_images)]
        with ema_weights(self.ema, self.unwrapped) as unet:
            unet.eval()
            pipe = self.pipeline(unet, scheduler_from_name("dpm", self.noise_scheduler.config))
            pipe.set_progress_bar_config(disable=True)
            images = pipe(
                v.prompts,
                num_inference_steps=v.inference_steps,
                guidance_scale=v.guidance_scale,
                num_images_per_prompt=v.images_per_prompt,
                generator=generators,
                output_type="pt",
            ).images  # (P * n, 3, H, W) in [0, 1], prompt by prompt
        images = images.float().cpu()
        v.out_dir.mkdir(parents=True, exist_ok=True)
        path = v.out_dir / f"step-{step}.png"
        image_grid(images, columns=v.images_per_prompt).save(path)
        if v.log_images:
            writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
            writer.add_images("validation", images, step, dataformats="NCHW")
        logger.info("step %d: validation images in %s", step, path)
        return {}

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
        with ema_weights(self.ema, self.unwrapped) as unet:
            self.pipeline(unet, self.noise_scheduler).save_pretrained(path, safe_serialization=True)


def configure_unet_for_training(
    unet: UNet2DConditionModel, args: argparse.Namespace, device: torch.device, mixed_precision: str = "no"
) -> bool:
    """The speed and memory options of a UNet about to train on `device`; returns whether xformers is on.

    `--gradient-checkpointing`, `--channels-last`, `--enable-xformers` (CUDA only; SDPA otherwise). On CPU in bf16
    the attention runs diffusers' classic processor (baddbmm + softmax, the same function) instead of SDPA, whose
    fused CPU kernel is slow in bf16 backward on these short sequences (README, "Speed and scale";
    `benchmarks/decoder_throughput.py`); in fp32 SDPA stays. Training only: the saved UNet samples with diffusers'
    default processor.
    """
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if getattr(args, "channels_last", False):
        unet.to(memory_format=torch.channels_last)
    xformers = enable_xformers_if_possible(unet) if args.enable_xformers else False
    if device.type == "cpu" and mixed_precision == "bf16":
        unet.set_attn_processor(AttnProcessor())
    return xformers


def image_grid(images: torch.Tensor, columns: int) -> Image.Image:
    """Float images (N, 3, H, W) in [0, 1], row by row -> one PIL image of N / columns rows."""
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    grid = rearrange(pixels, "(r c) ch h w -> (r h) (c w) ch", c=columns)
    return Image.fromarray(grid.numpy())


# --------------------------------------------------------------------------------------------------- the entry


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    accelerator = make_accelerator(args)  # 1. Accelerator, seed
    with hold_output_dir(accelerator, args):
        if args.conditioning == "image-embedding":  # the DALL-E 2 decoder: its own set-up, this objective and loop
            from clipcond.train.unclip_decoder import main_image_embedding

            return main_image_embedding(accelerator, args)
        return train_text_decoder(accelerator, args)


def train_text_decoder(accelerator: Accelerator, args: argparse.Namespace) -> int:

    # 2. The frozen text encoder (first: a wrong --clip fails before anything is read or written)
    encoder = load_frozen_text_encoder(args)
    text_encoder, tokenizer, clip_hash = encoder.text_encoder, encoder.tokenizer, encoder.content_hash
    output_dir = make_output_dir(accelerator, args)
    text_encoder.to(accelerator.device)
    width = encoder.text_width  # per-token state width
    # A UNet built now: another --cross-attention-dim gets a learned projection (encoder_hid_dim, below)
    compatibility = check_compatibility(encoder, cross_attention_dim=args.cross_attention_dim or width, new_model=True)
    if args.pooled_text and encode_prompts(text_encoder, tokenizer, [""], device=accelerator.device).pooled is None:
        raise ValueError(
            f"`--pooled-text` needs a text encoder with a projection (a pooled text embedding); {encoder.name} has none"
        )

    # 3. Data
    dataset_kwargs = dataset_options(args)
    dataset = open_image_text_dataset(args.data, split=args.split, resolution=args.resolution, **dataset_kwargs)
    resolution = args.resolution or (dataset.info or {}).get("resolution") or native_resolution(dataset)
    if dataset.resolution != resolution:
        dataset = open_image_text_dataset(args.data, split=args.split, resolution=resolution, **dataset_kwargs)

    # 4. Text embeddings of the captions, computed once (by the main process; the others then read the file)
    captions, sample_rows = unique_captions(dataset.captions)
    cache_dir = Path(args.cache_dir) if args.cache_dir else output_dir / "cache"
    with accelerator.main_process_first():
        cache = TextEmbeddingCache.build_or_load(
            text_encoder,
            tokenizer,
            captions,
            cache_dir,
            batch_size=args.encode_batch_size,
            device=accelerator.device,
            progress=accelerator.is_local_main_process,
        )
    conditioning = TextConditioning(
        cache, sample_rows, args.caption_dropout, 8 if args.torch_compile else 1, pooled=args.pooled_text
    )

    # 5. UNet, noise schedule, EMA
    config = unet_config(
        args.model,
        sample_size=resolution,
        cross_attention_dim=args.cross_attention_dim or width,
        in_channels=3,
        encoder_hid_dim=width,
        pooled_text_dim=cache.empty.pooled.shape[-1] if args.pooled_text else None,
    )
    unet = create_unet(config)
    check_encoder_fits(unet, width)
    xformers = configure_unet_for_training(unet, args, accelerator.device, accelerator.mixed_precision)
    noise_scheduler = make_noise_scheduler(args)
    ema = make_ema(unet, args, accelerator.device)
    num_parameters = sum(p.numel() for p in unet.parameters())
    logger.info(
        "UNet %r: %.2f M parameters, cross-attention width %d (text encoder: %d)",
        args.model,
        num_parameters / 1e6,
        unet.config.cross_attention_dim,
        width,
    )

    # 6. Optimizer (the UNet's parameters only: the text encoder is frozen), schedule; prepare
    prepared = prepare_training(accelerator, args, unet)
    model = prepared.model

    # 7. Train
    validation = None
    if args.validation_steps:
        validation = ValidationSettings(
            prompts=list(args.validation_prompts),
            images_per_prompt=args.validation_images_per_prompt,
            inference_steps=args.validation_inference_steps,
            guidance_scale=args.validation_guidance_scale,
            seed=args.seed,
            out_dir=output_dir / "validation",
            log_images=args.report_to in ("tensorboard", "all"),
        )
    stage = DecoderStage(
        accelerator,
        model,
        noise_scheduler,
        conditioning,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
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
                "num_captions": len(captions),
                "resolution": resolution,
            },
            "clip": {"path": str(args.clip or encoder.name), "content_hash": clip_hash},
            "encoder": encoder.lineage(),
            "compatibility": {"projections": compatibility.projections},
            "conditioning": conditioning.record(),
            "unet": {
                "preset": args.model,
                "parameters": num_parameters,
                "cross_attention_dim": unet.config.cross_attention_dim,
                "encoder_hid_dim": unet.config.encoder_hid_dim,
                "xformers": xformers,
                "content_hash": content_hash(output_dir / "unet"),
            },
            "ema": ema_record(ema),
        }

    finish_run(accelerator, args, stage, result, "clipcond-decoder", record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
