"""Decoder training throughput of clipcond against a plain diffusers training loop, same UNet, batch and precision.

    python benchmarks/decoder_throughput.py --presets tiny small --precision fp32 bf16 --steps 10 [--save-results]

One process builds both contenders on the same device (the Accelerator's: CUDA when there is one), with each
one's batch already there, and times them alternately (common.alternate), one optimizer step each per round, and
prints one JSON object: per preset, precision and attention the median samples/s of each and the median ratio
clipcond / plain (> 1: clipcond is faster). Goal: >= 1.2 at the same precision and model.

- clipcond: `train.loop.training_step` on the prepared UNet with `DecoderStage.loss` (per-token text states looked
  up in the `TextEmbeddingCache`, 10% caption dropout, DDPM noise, epsilon MSE in fp32), then
  `DecoderStage.after_optimizer_step` (EMA update); the UNet configured by `configure_unet_for_training`, as
  `clipcond train decoder` does.
- plain: the step of diffusers' `examples/text_to_image/train_text_to_image.py` (`UNet2DConditionModel`,
  `DDPMScheduler`, AdamW, `--use_ema`), in pixel space like clipcond: under `accelerator.accumulate` the frozen
  text encoder (`CLIPTextModel`, in the precision's weight dtype, as the example casts it) runs on the batch's
  tokens (padded to the context length) every step, then noise, timesteps, `add_noise`, the UNet, MSE, backward,
  gradient clipping, AdamW, EMA. Its pixels arrive as float in [-1, 1], as its data loader delivers them.

The UNet (preset, cross-attention width = the text encoder's, its `encoder_hid_proj`), the text encoder (the CLIP
preset of the same name), batch, AdamW settings and EMA are the same on both sides. Where clipcond gains: no text
encoder in the step (the cache), and on CPU the classic attention processor (see `configure_unet_for_training`).
`--attention default` gives each side its own attention (the plain loop diffusers' default, SDPA); `--attention
same` gives the plain loop clipcond's choice too (the same on a GPU), which isolates the cache's share.
Both train in pixel space at `--resolution` (default: the CLIP preset's image size; SD's latents are 64 x 64 x 4,
one channel more in the first convolution only).
"""

from __future__ import annotations

import argparse
import tempfile
from types import SimpleNamespace

import torch
from clip_throughput import _optimizer_args, shapes_captions
from common import add_case_args, add_results_flag, alternate, ratio_summary, run_cases


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/decoder_throughput.py", description=__doc__.split("\n\n")[0]
    )
    add_case_args(
        parser,
        presets_help="UNet presets (and CLIP presets)",
        batch_size=64,
        batch_help="samples per step (the default recipe's)",
        attention=["default", "same"],
        attention_help="the plain loop's attention: diffusers' default (SDPA), or the same as clipcond's (see above)",
    )
    parser.add_argument("--resolution", type=int, default=None, help="image size (default: the CLIP preset's)")
    parser.add_argument("--seed", type=int, default=0)
    add_results_flag(parser)
    return parser.parse_args(argv)


def _setup(preset: str, batch_size: int, seed: int, resolution: int | None = None):
    """The text encoder, tokenizer, captions, UNet config and a fixed batch that both contenders share."""
    from transformers import CLIPTextModel

    from clipcond.models.clip import clip_config, clip_presets
    from clipcond.models.unet import unet_config
    from clipcond.tokenizer import train_tokenizer

    context = clip_presets()[preset]["text"]["max_position_embeddings"]
    resolution = resolution or clip_presets()[preset]["vision"]["image_size"]
    captions = shapes_captions(batch_size, seed)
    tokenizer = train_tokenizer(captions, vocab_size=1024, context_length=context)
    config = clip_config(
        preset,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(config.text_config).eval().requires_grad_(False)
    width = config.text_config.hidden_size
    unet_spec = unet_config(
        preset, sample_size=resolution, cross_attention_dim=width, in_channels=3, encoder_hid_dim=width
    )
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (batch_size, 3, resolution, resolution), dtype=torch.uint8, generator=generator)
    return SimpleNamespace(
        text_encoder=text_encoder, tokenizer=tokenizer, captions=captions, unet_spec=unet_spec, pixels=pixels
    )


def _ema(unet, device):
    """The EMA both sides keep, on the training device: clipcond's `make_ema` with the training defaults (diffusers'
    example moves its `EMAModel` to the device the same way)."""
    from clipcond.train.ema import add_ema_args, make_ema

    return make_ema(unet, add_ema_args(argparse.ArgumentParser()).parse_args([]), device)


def clipcond_step(shared, precision: str, cache_dir: str, seed: int, space=None):
    """clipcond's training step on `shared`'s batch, in pixel space, or in the model space `space(device)` makes (a
    `PixelSpace` of pixel blocks, or a `LatentSpace` over a cache of `len(shared.captions)` rows), with
    `shared.unet_spec` sized for what it denoises."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    from clipcond.conditioning import TextEmbeddingCache, unique_captions
    from clipcond.models.unet import create_unet
    from clipcond.train.decoder import DecoderStage, configure_unet_for_training
    from clipcond.train.loop import make_optimizer, training_step
    from clipcond.train.model_space import PixelSpace
    from clipcond.train.text_decoder import TextConditioning

    accelerator = Accelerator(mixed_precision="bf16" if precision == "bf16" else "no")
    device = accelerator.device
    captions, rows = unique_captions(shared.captions)
    shared.text_encoder.to(device)  # the cache runs it once, on the device of the training
    cache = TextEmbeddingCache.build_or_load(
        shared.text_encoder, shared.tokenizer, captions, cache_dir, device=device, progress=False
    )
    torch.manual_seed(seed)
    unet = create_unet(shared.unet_spec)
    options = SimpleNamespace(gradient_checkpointing=False, channels_last=False, enable_xformers=False)
    configure_unet_for_training(unet, options, device, accelerator.mixed_precision)
    ema = _ema(unet, device)
    optimizer = make_optimizer(unet.parameters(), _decoder_optimizer_args(), accelerator)
    model, optimizer = accelerator.prepare(unet, optimizer)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    index = torch.arange(len(shared.captions))
    space = PixelSpace(shared.pixels.shape[-1]) if space is None else space(device)
    if space.kind == "latents":
        batch = {"latent_row": index, "index": index}
    else:
        batch = {"pixel_values": shared.pixels.to(device), "index": index}
    stage = DecoderStage(
        accelerator,
        model,
        scheduler,
        TextConditioning(cache, rows, caption_dropout=0.1),
        space=space,
        plugin=None,  # no validation or export here
        ema=ema,
        snr_gamma=None,
        validation=None,
        clip_hash="benchmark",
    )
    generator = torch.Generator(device=device).manual_seed(seed)  # the stage's, as `train` makes it
    model.train()

    def step():
        training_step(accelerator, stage, model, optimizer, batch, generator, max_grad_norm=1.0)
        stage.after_optimizer_step()

    return step, sum(p.numel() for p in unet.parameters()), device


def _decoder_optimizer_args() -> SimpleNamespace:
    # train/decoder.py's defaults
    return SimpleNamespace(**{**vars(_optimizer_args()), "learning_rate": 5e-4, "weight_decay": 1e-2})


def plain_step(shared, precision: str, attention: str, seed: int):
    """diffusers' train_text_to_image.py step, in pixel space; `attention` "same": clipcond's processor choice."""
    import copy

    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    from clipcond.models.unet import create_unet
    from clipcond.train.decoder import configure_unet_for_training

    accelerator = Accelerator(mixed_precision="bf16" if precision == "bf16" else "no")
    weight_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    text_encoder = copy.deepcopy(shared.text_encoder).to(accelerator.device, dtype=weight_dtype)
    torch.manual_seed(seed)
    unet = create_unet(shared.unet_spec)
    if attention == "same":
        options = SimpleNamespace(gradient_checkpointing=False, channels_last=False, enable_xformers=False)
        configure_unet_for_training(unet, options, accelerator.device, accelerator.mixed_precision)
    ema = _ema(unet, accelerator.device)
    a = _decoder_optimizer_args()
    optimizer = torch.optim.AdamW(
        unet.parameters(),
        lr=a.learning_rate,
        betas=(a.adam_beta1, a.adam_beta2),
        weight_decay=a.weight_decay,
        eps=a.adam_epsilon,
    )
    unet, optimizer = accelerator.prepare(unet, optimizer)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000)
    input_ids = shared.tokenizer(
        shared.captions,
        max_length=shared.tokenizer.model_max_length,
        padding="max_length",
        truncation=True,
        return_tensors="pt",
    ).input_ids
    pixel_values = (shared.pixels.float() / 127.5 - 1.0).to(accelerator.device)  # as its loader delivers them
    unet.train()

    def step():
        with accelerator.accumulate(unet):
            latents = pixel_values.to(accelerator.device, dtype=weight_dtype)  # pixel space: no VAE
            noise = torch.randn_like(latents)
            bsz = latents.shape[0]
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device)
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps.long())
            encoder_hidden_states = text_encoder(input_ids.to(accelerator.device), return_dict=False)[0]
            model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
            loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
            accelerator.gather(loss.repeat(bsz)).mean()  # the example's logged average
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            ema.step(unet.parameters())

    return step, sum(p.numel() for p in unet.parameters())


def run_case(preset: str, precision: str, attention: str, args: argparse.Namespace) -> dict:
    from clipcond.train.loop import reset_accelerate_state

    shared = _setup(preset, args.batch_size, args.seed, args.resolution)
    reset_accelerate_state()  # a fresh Accelerator for each precision
    with tempfile.TemporaryDirectory(prefix="clipcond-bench-") as cache_dir:
        ours, ours_params, device = clipcond_step(shared, precision, cache_dir, args.seed)
        theirs, theirs_params = plain_step(shared, precision, attention, args.seed)
        seconds = alternate({"clipcond": ours, "plain": theirs}, rounds=args.steps, warmup=args.warmup)
    result = ratio_summary(seconds, args.batch_size, ours="clipcond", theirs="plain")
    result["params_M"] = {"clipcond": round(ours_params / 1e6, 3), "plain": round(theirs_params / 1e6, 3)}
    result["resolution"] = shared.unet_spec["sample_size"]
    result["device"] = device.type
    result["attention"] = {"clipcond": "default", "plain": attention}
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cases("decoder_throughput", args, argv, unit="samples/s", goal="ratio >= 1.2", run_case=run_case)


if __name__ == "__main__":
    raise SystemExit(main())
