"""`clipcond train decoder`: a diffusers `UNet2DConditionModel` conditioned on a frozen CLIP (or text encoder).

    clipcond train decoder --clip runs/clip --data shapes/ --output-dir runs/decoder
    clipcond train decoder --text-encoder open_clip:ViT-B-32@vit-b-32.bin --data shapes/ --output-dir runs/decoder
    clipcond train decoder --conditioning image-embedding --clip runs/clip --data shapes/ --output-dir runs/unclip
    accelerate launch -m clipcond.train.decoder --clip runs/clip --data shapes/ --output-dir runs/decoder

The frozen encoder is any `clipcond.encoders` adapter (`--text-encoder SPEC`: clipcond:RUN, transformers:PATH,
open_clip:MODEL@WEIGHTS, t5:PATH; `--clip RUN` is `--text-encoder clipcond:RUN`); the run record names it
(`encoder`: kind, name, content hash) and `clipcond.encoders.load_text_to_image` refuses the run beside another.

One training flow (`train_decoder`) for every conditioning, at the data's resolution, in pixel space or (`--vae VAE`)
in the latent space of a VAE from `clipcond train vae` (latent diffusion; `clipcond.train.model_space`): the frozen
encoder runs once over the training data into a cache (by default in `RUN/cache/`, the one folder this command
owns; its files are keyed by encoder and data, so runs may share a `--cache-dir`), training steps look rows up, the
UNet learns DDPM's denoising objective (epsilon or v targets, optional min-SNR weighting) with the condition dropped
for classifier-free guidance, an EMA of its weights is kept, and the run folder is the conditioning's pipeline
(`save_pretrained` with the EMA weights and the training noise schedule) plus `clipcond_run.json` (arguments, data,
summary, the content hash of the CLIP), `checkpoints/` (each with the same pipeline in `pretrained/`),
`validation/step-<N>.png`, `cache/` and `logs/`.

What the UNet is conditioned on is the flow's plug-in (`clipcond.train.decoder_conditioning`):
`--conditioning text` (`clipcond.train.text_decoder`, the Stable Diffusion path: a `TextToImagePipeline`) or
`--conditioning image-embedding` (`clipcond.train.unclip_decoder`, the DALL-E 2 decoder: an
`ImageVariationPipeline`). What the UNet denoises is another choice, orthogonal to it (`model_space`: pixels in
[-1, 1], or a VAE's latents sampled from posteriors cached once, the pipeline then holding the VAE that decodes
them, or pixels as F x F blocks, `--space-to-depth F`, for either conditioning), and how it is initialised one step
(`build_decoder`: a preset now, pretrained weights later), whatever the conditioning.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import KW_ONLY, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor
from diffusers.training_utils import compute_snr
from einops import rearrange
from PIL import Image

from clipcond.data.open import dataset_options, open_at_resolution
from clipcond.finite import finite_float
from clipcond.help_formatter import HelpFormatter
from clipcond.hub import check_local_folder
from clipcond.lineage import content_hash, init_record
from clipcond.models.attention import enable_xformers_if_possible
from clipcond.models.unet import create_unet, load_pretrained_unet
from clipcond.pipeline_loading import DEFAULT_SAMPLER
from clipcond.storage import save_image_atomic
from clipcond.train.decoder_conditioning import BatchConditioning, ConditioningPlugin
from clipcond.train.diffusion import (
    DiffusionStage,
    ValidationSettings,
    add_cache_args,
    add_caption_dropout_arg,
    add_encoder_and_data_args,
    add_noise_schedule_args,
    add_sampler_args,
    cache_dir,
    check_diffusion_args,
    lineage_record,
    make_noise_scheduler,
)
from clipcond.train.ema import add_ema_args, ema_record, ema_weights, make_ema
from clipcond.train.loop import (
    add_training_args,
    check_training_args,
    data_record,
    draw_rows,
    finish_run,
    make_output_dir,
    prepare_training,
    run_stage,
    train,
)
from clipcond.train.model_space import (
    LatentSpace,
    PixelSpace,
    add_vae_args,
    check_space_args,
    check_space_fits,
    model_space,
)
from clipcond.train.text_decoder import TextPlugin
from clipcond.train.unclip_decoder import ImageEmbeddingPlugin

logger = logging.getLogger(__name__)

PLUGINS: dict[str, type[ConditioningPlugin]] = {plugin.kind: plugin for plugin in (TextPlugin, ImageEmbeddingPlugin)}
# Colour-shape prompts of the built-in shapes data; "a blue square" is one of its held-out pairs (DEFAULT_HELD_OUT).
DEFAULT_VALIDATION_PROMPTS = ("a red circle", "a blue square", "a green triangle", "a yellow circle")
# --max-train-steps by --conditioning: the budgets of `clipcond demo`'s CPU recipe (docs/lab-notes.md)
DEFAULT_STEPS = {"text": 1200, "image-embedding": 800}


# --------------------------------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="clipcond train decoder",
        description="Train a diffusers UNet to generate images conditioned on the frozen text encoder of a CLIP run.",
        formatter_class=HelpFormatter,
    )
    add_data_args(parser.add_argument_group("data"))
    add_model_args(parser.add_argument_group("model"))
    add_diffusion_args(parser.add_argument_group("diffusion"))
    add_ema_args(parser, "UNet weights")
    add_validation_args(parser.add_argument_group("validation images (EMA weights, DPM-Solver++)"))
    add_image_embedding_args(parser.add_argument_group("--conditioning image-embedding (the DALL-E 2 decoder)"))
    # CPU-sized defaults for the `tiny` UNet on the shapes data (README, "What it reaches on 2 CPU cores")
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
    PLUGINS[args.conditioning].check_args(args)
    return args


def add_data_args(data: argparse._ArgumentGroup) -> None:
    add_encoder_and_data_args(
        data,
        "the frozen text encoder: clipcond:RUN, transformers:PATH, open_clip:MODEL@WEIGHTS or t5:PATH "
        "(clipcond.encoders)",
    )
    data.add_argument(
        "--resolution", type=int, default=None, help="image size (default: the data set's, else its first image's)"
    )
    add_cache_args(
        data,
        cache_help="folder of the embedding cache (default OUTPUT_DIR/cache; files are keyed by encoder and data, "
        "so runs may share a folder)",
        batch_help="captions (or images) per encoder call",
    )


def add_model_args(model: argparse._ArgumentGroup) -> None:
    model.add_argument("--model", default="tiny", help="UNet preset (test, tiny, small, base) or a JSON config file")
    add_vae_args(model)
    model.add_argument(
        "--init-unet",
        default=None,
        metavar="PATH",
        help="start from a pretrained UNet2DConditionModel folder (or a pipeline folder with unet/, or a Hub id) "
        "instead of --model's preset at random; its sizes must fit the data and the encoder",
    )
    model.add_argument(
        "--conditioning",
        default="text",
        choices=list(PLUGINS),
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


def add_diffusion_args(diffusion: argparse._ArgumentGroup) -> None:
    """The objective. Its defaults (v-prediction on the cosine schedule with min-SNR weighting) are the ones that
    draw clean shapes at CPU budgets, where epsilon prediction on the linear schedule still leaves visible noise."""
    diffusion.add_argument(
        "--prediction-type",
        default="v_prediction",
        choices=["epsilon", "v_prediction"],
        help="what the UNet predicts (v: Salimans & Ho 2022)",
    )
    add_noise_schedule_args(diffusion)
    diffusion.add_argument(
        "--snr-gamma",
        type=finite_float,
        default=5.0,
        help="min-SNR loss weighting with this gamma (Hang et al. 2023; 5 is their choice); 0: off",
    )
    add_caption_dropout_arg(diffusion)
    diffusion.add_argument(
        "--pooled-text",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also add the L2-normalised pooled CLIP text embedding to the timestep embedding (as Imagen and SDXL "
        "do): the whole caption in one vector beside the token states (default: off)",
    )
    diffusion.add_argument(
        "--mask-text-padding",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="leave the captions' padding out of the text encoder and the cross-attention; --no-mask-text-padding "
        "reads every position unmasked, as Stable Diffusion does, so that `clipcond export stable-diffusion` can "
        "hand the run to stock diffusers (default: on)",
    )


def add_validation_args(val: argparse._ArgumentGroup) -> None:
    val.add_argument("--validation-prompts", nargs="+", default=list(DEFAULT_VALIDATION_PROMPTS), help="prompts")
    val.add_argument("--validation-images-per-prompt", type=int, default=2, help="images per prompt (a grid row)")
    add_sampler_args(val, steps=10, steps_help="DPM-Solver++ steps", guidance_scale=3.0)


def add_image_embedding_args(unclip: argparse._ArgumentGroup) -> None:
    """The DALL-E 2 decoder's options (`ImageEmbeddingPlugin.check_args` checks them)."""
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


def check_decoder_args(args: argparse.Namespace) -> None:
    """Reject values that would fail later or train nonsense, naming the option and the value."""
    check_diffusion_args(args, positive=("validation_images_per_prompt", "validation_inference_steps"))
    if args.init_unet:  # a missing folder fails now, before the encoder runs over the data
        check_local_folder(
            args.init_unet, "--init-unet", "pass a UNet2DConditionModel folder (Stable Diffusion's unet/)"
        )
    if args.snr_gamma is not None and args.snr_gamma < 0:
        raise ValueError(f"`--snr-gamma` must be >= 0 (0: no min-SNR weighting), got {args.snr_gamma}")
    if args.snr_gamma == 0:
        args.snr_gamma = None
    if args.pooled_text and args.conditioning != "text":
        raise ValueError(
            f"`--pooled-text` adds the pooled text embedding of the caption; it needs `--conditioning text`, got "
            f"{args.conditioning!r}"
        )
    if not args.mask_text_padding and args.conditioning != "text":
        raise ValueError(
            f"`--no-mask-text-padding` is about the captions' token states; it needs `--conditioning text`, got "
            f"{args.conditioning!r}"
        )
    check_space_args(args)
    if args.cross_attention_dim is not None and args.cross_attention_dim < 1:
        raise ValueError(f"`--cross-attention-dim` must be >= 1, got {args.cross_attention_dim}")


# ---------------------------------------------------------------------------------------------- the objective


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
class DecoderValidation(ValidationSettings):
    """A grid of samples per validation: a row per condition of the plug-in, `images_per_condition` columns."""

    images_per_condition: int
    out_dir: Path
    log_images: bool  # to tensorboard


@dataclass(eq=False)
class DecoderStage(DiffusionStage):
    """The decoder's loss and validation grid; `conditioning` gives each batch's UNet inputs, and the conditioning's
    `plugin` the pipeline and what validation samples from."""

    conditioning: BatchConditioning
    _: KW_ONLY
    space: PixelSpace | LatentSpace  # what the UNet denoises
    plugin: ConditioningPlugin | None
    snr_gamma: float | None  # min-SNR weighting's gamma; None: unweighted
    validation: DecoderValidation | None

    def loss(self, batch, generator):
        device = self.accelerator.device
        sample = self.space.sample(batch, generator, device)  # (B, C, h, w)
        batch_size, shape = sample.shape[0], sample.shape[1:]
        on_generator = {"generator": generator, "device": generator.device}
        noise = draw_rows(lambda n: torch.randn((n, *shape), **on_generator), batch_size, device)
        num_timesteps = self.noise_scheduler.config.num_train_timesteps
        timesteps = draw_rows(lambda n: torch.randint(0, num_timesteps, (n,), **on_generator), batch_size, device)
        inputs = self.conditioning(batch, generator, device)
        noisy = self.noise_scheduler.add_noise(sample, noise, timesteps)
        target = diffusion_target(self.noise_scheduler, sample, noise, timesteps)
        prediction = self.model(noisy, timesteps, **inputs.as_kwargs(), return_dict=False)[0]
        return diffusion_loss(prediction, target, timesteps, self.noise_scheduler, self.snr_gamma), {}

    def pipeline(self, model, scheduler):
        return self.plugin.pipeline(model, scheduler, **self.space.pipeline_modules())

    def extra_state(self):
        state = super().extra_state()
        if self.space.content_hash is not None:
            state["vae_content_hash"] = self.space.content_hash
        if self.space.space_to_depth > 1:
            state["space_to_depth"] = self.space.space_to_depth
        return state

    def load_extra_state(self, state):
        saved, current = state.get("vae_content_hash"), self.space.content_hash
        if saved != current:
            trained = f"the latents of the VAE with content hash {saved[:12]}..." if saved else "pixels"
            given = f"a VAE with content hash {current[:12]}..." if current else "none (pixels)"
            raise ValueError(
                f"the checkpoint was trained on {trained}, but `--vae` gives {given}; resume with the `--vae` it "
                "was trained with, or start a new run"
            )
        saved, current = state.get("space_to_depth", 1), self.space.space_to_depth
        if saved != current:  # checked before the weights, whose shapes then differ
            raise ValueError(
                f"the checkpoint was trained with `--space-to-depth {saved}`, but this run has `--space-to-depth "
                f"{current}`; resume with the value it was trained with, or start a new run"
            )
        super().load_extra_state(state)

    def validate(self, step):
        if self.validation is None:
            return {}
        from clipcond.pipelines.text_to_image import scheduler_from_name

        v, per_condition = self.validation, self.validation.images_per_condition
        num_images = self.plugin.num_validation_conditions() * per_condition
        # The same noise at every validation, one generator per image: the grids of a run are comparable.
        generators = [torch.Generator().manual_seed(v.seed + k) for k in range(num_images)]
        with ema_weights(self.ema, self.unwrapped) as model:
            model.eval()
            pipe = self.pipeline(model, scheduler_from_name(DEFAULT_SAMPLER, self.noise_scheduler.config))
            pipe.set_progress_bar_config(disable=True)
            images = pipe(
                **self.plugin.validation_inputs(),
                **v.sampler_kwargs(),
                num_images_per_prompt=per_condition,
                generator=generators,
                output_type="pt",
            ).images  # (C * n, 3, H, W) in [0, 1], condition by condition
        rows, columns = self.plugin.validation_grid(images.float().cpu(), per_condition)
        v.out_dir.mkdir(parents=True, exist_ok=True)
        path = v.out_dir / f"step-{step}.png"
        save_image_atomic(image_grid(rows, columns=columns), path)
        if v.log_images:
            writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
            writer.add_images("validation", rows, step, dataformats="NCHW")
        logger.info("step %d: validation images in %s", step, path)
        return {}


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


# -------------------------------------------------------------------------------------------- set-up steps


def open_training_data(args: argparse.Namespace) -> tuple[torch.utils.data.Dataset, int]:
    """The training split at `--resolution`, by default the data set's own (its info, else its first image's)."""
    return open_at_resolution(args.data, split=args.split, resolution=args.resolution, **dataset_options(args))


@dataclass
class BuiltDecoder:
    """The module that trains and the UNet inside it (the same object for the text conditioning)."""

    model: torch.nn.Module
    unet: UNet2DConditionModel
    xformers: bool  # whether xformers attention is on
    init_folder: str | None = None  # the folder of `--init-unet`'s weights; None: the preset at random

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def build_decoder(
    args: argparse.Namespace, plugin: ConditioningPlugin, space: PixelSpace | LatentSpace, accelerator: Accelerator
) -> BuiltDecoder:
    """A UNet of `--model`'s preset, initialised at random (or `--init-unet`'s pretrained one, checked to have the
    same inputs), denoising `space`'s samples (pixels, or a VAE's latents) and reading the conditioning's inputs; and
    the module that trains it."""
    config = plugin.unet_config(sample_size=space.sample_size, in_channels=space.channels)
    init_folder = None
    if args.init_unet:
        unet, init_folder = load_pretrained_unet(args.init_unet, config)
    else:
        unet = create_unet(config)
    model = plugin.trainable(unet)
    xformers = configure_unet_for_training(unet, args, accelerator.device, accelerator.mixed_precision)
    decoder = BuiltDecoder(model=model, unet=unet, xformers=xformers, init_folder=init_folder)
    logger.info(
        "%s decoder %r: %.2f M parameters; %s",
        plugin.kind,
        args.model,
        decoder.num_parameters / 1e6,
        plugin.describe(unet),
    )
    return decoder


def make_validation(
    args: argparse.Namespace, plugin: ConditioningPlugin, resolution: int, output_dir: Path
) -> DecoderValidation | None:
    """What validation draws every `--validation-steps` (None when it is off), its inputs read now."""
    if not args.validation_steps:
        return None
    plugin.load_validation_inputs(resolution)
    return DecoderValidation(
        **ValidationSettings.sampler_args(args),
        images_per_condition=args.validation_images_per_prompt,
        out_dir=output_dir / "validation",
        log_images=args.report_to in ("tensorboard", "all"),
    )


def run_record(
    args: argparse.Namespace,
    plugin: ConditioningPlugin,
    *,
    dataset,
    resolution: int,
    space: PixelSpace | LatentSpace,
    decoder: BuiltDecoder,
    ema,
) -> dict:
    """The decoder's sections of the run record (after the export: it hashes the saved UNet)."""
    return {
        "data": data_record(args, len(dataset), **plugin.data_facts(), resolution=resolution),
        **lineage_record(args, plugin.encoder),
        **plugin.record_sections(),
        "model_space": space.record(),
        "unet": {
            "preset": None if decoder.init_folder else args.model,
            **init_record(args.init_unet, decoder.init_folder),
            "parameters": decoder.num_parameters,
            **plugin.unet_record(decoder.unet),
            "xformers": decoder.xformers,
            "content_hash": content_hash(Path(args.output_dir) / "unet"),
        },
        "ema": ema_record(ema),
    }


# --------------------------------------------------------------------------------------------------- the entry


def main(argv: list[str] | None = None) -> int:
    return run_stage(parse_args(argv), train_decoder)


def train_decoder(accelerator: Accelerator, args: argparse.Namespace) -> int:
    """The decoder's training, the same steps for every `--conditioning`; its plug-in supplies what differs."""
    # 2. The frozen encoder, checked against the UNet (first: a wrong --clip fails before anything is read or written)
    plugin = PLUGINS[args.conditioning].from_args(args, accelerator.device)
    output_dir = make_output_dir(accelerator, args)

    # 3. Data, at the decoder's resolution
    dataset, resolution = open_training_data(args)
    check_space_fits(args, resolution)  # before the encoder runs over the data

    # 4. The encoder's outputs for the training data, computed once (by the main process; the others then read the
    # file): the cache that each step's conditioning reads
    with accelerator.main_process_first():
        conditioning = plugin.encode_training_data(accelerator, dataset, resolution, cache_dir(args, output_dir))

    # 4b. What the UNet denoises: pixels, or with --vae the VAE's latents (their posteriors cached once, likewise)
    space = model_space(args, accelerator, dataset, resolution, cache_dir(args, output_dir))

    # 5. UNet (and what the conditioning trains with it), noise schedule, EMA
    decoder = build_decoder(args, plugin, space, accelerator)
    noise_scheduler = make_noise_scheduler(args, prediction_type=args.prediction_type, clip_sample=space.clip_sample)
    ema = make_ema(decoder.model, args, accelerator.device)

    # 6. Optimizer (the trained module's parameters only: the encoder is frozen), schedule; prepare
    prepared = prepare_training(accelerator, args, decoder.model)

    # 7. Train
    stage = DecoderStage(
        accelerator,
        prepared.model,
        noise_scheduler,
        conditioning,
        space=space,
        plugin=plugin,
        ema=ema,
        snr_gamma=args.snr_gamma,
        validation=make_validation(args, plugin, resolution, output_dir),
        clip_hash=plugin.encoder.content_hash,
    )
    training_data, collate = space.training_data(dataset)
    result = train(accelerator, args, stage, prepared, dataset=training_data, collate_fn=collate)

    # 8. Save the pipeline (EMA weights) and the run record
    record = {"dataset": dataset, "resolution": resolution, "space": space, "decoder": decoder, "ema": ema}
    finish_run(accelerator, args, stage, result, "clipcond-decoder", lambda: run_record(args, plugin, **record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
