"""A GPU check that fits a short lease: training throughput, memory and model-FLOP utilisation (MFU) of the `base`
presets — the CLIP (ViT-B/32 sizes) and the decoder UNet (Stable Diffusion 1.x sizes) — in bf16, with the options
that pay on GPUs switched one at a time (SDPA or xformers attention, channels-last, torch.compile, TF32, gradient
checkpointing). Prints one JSON object; `--output FILE` also writes it.

    python benchmarks/gpu_check.py                      # on a CUDA machine, about 3 minutes
    python benchmarks/gpu_check.py --device cpu --clip-preset test --unet-preset test --resolution 16 --steps 2

Each case is one real optimizer step of clipcond's training code path — transformers' CLIPModel with clipcond's
ClipLoss; diffusers' UNet2DConditionModel with clipcond's diffusion loss — on synthetic batches already on the device,
so the figures are the model's, not the data loader's. Model FLOPs per step are counted once per case with
`torch.utils.flop_counter.FlopCounterMode` (forward + backward matrix work); MFU = FLOPs per second / peak.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s. Matrix products on an H200 here reached
# ~790 (device notes), so an MFU is also reported against that measured ceiling.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--clip-preset", default="base")
    p.add_argument("--unet-preset", default="base")
    p.add_argument("--clip-batch", type=int, default=256)
    p.add_argument("--unet-batch", type=int, default=32)
    p.add_argument("--resolution", type=int, default=64, help="UNet sample size (64 = SD's latents of 512 px images)")
    p.add_argument("--unet-channels", type=int, default=4, help="UNet input channels (4 = SD's VAE latents)")
    p.add_argument("--steps", type=int, default=40, help="timed steps per case (after --warmup)")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile cases")
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak (default: from the GPU name)")
    p.add_argument("--output", default=None)
    return p.parse_args(argv)


@dataclass
class Case:
    name: str
    step: callable  # one optimizer step
    params: int
    samples_per_step: int


def clip_case(args, device, *, compile_model=False, dtype=torch.bfloat16, checkpointing=False) -> Case:
    from transformers import CLIPModel

    from clipcond.loss import ClipLoss
    from clipcond.models.clip import clip_config
    from clipcond.train.clip import ContrastiveModel

    config = clip_config(args.clip_preset, vocab_size=49408, bos_token_id=1, eos_token_id=0, pad_token_id=3)
    clip = CLIPModel(config)
    if checkpointing:
        clip.gradient_checkpointing_enable()
    model = ContrastiveModel(clip, with_bias=False).to(device)
    forward = torch.compile(model) if compile_model else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    loss_fn = ClipLoss()
    b, size, context = args.clip_batch, config.vision_config.image_size, config.text_config.max_position_embeddings
    pixels = torch.randn(b, 3, size, size, device=device)
    input_ids = torch.randint(4, 49408, (b, context), device=device)
    input_ids[:, -1] = 0  # the end token, where CLIP pools
    mask = torch.ones_like(input_ids)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            image, text, scale, _ = forward(input_ids=input_ids, attention_mask=mask, pixel_values=pixels)
        loss = loss_fn(image.float(), text.float(), scale.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Case("", step, sum(p.numel() for p in model.parameters()), b)


def unet_case(
    args, device, *, attention="sdpa", channels_last=False, checkpointing=False, compile_model=False
) -> Case:
    from diffusers import DDPMScheduler

    from clipcond.models.attention import enable_xformers_if_possible
    from clipcond.models.unet import create_unet, unet_config
    from clipcond.train.decoder import diffusion_loss

    width = {"base": 512, "small": 256, "tiny": 128}.get(args.clip_preset, 32)  # the CLIP text tower's width
    unet = create_unet(
        unet_config(
            args.unet_preset, sample_size=args.resolution, cross_attention_dim=width, in_channels=args.unet_channels
        )
    ).to(device)
    if attention == "xformers" and not enable_xformers_if_possible(unet):
        raise RuntimeError("xformers asked for but not usable here")
    if checkpointing:
        unet.enable_gradient_checkpointing()
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    forward = torch.compile(unet) if compile_model else unet
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=device.type == "cuda")
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    b = args.unet_batch
    sample = torch.randn(b, args.unet_channels, args.resolution, args.resolution, device=device)
    if channels_last:
        sample = sample.to(memory_format=torch.channels_last)
    states = torch.randn(b, 77, width, device=device)
    generator = torch.Generator(device=device).manual_seed(0)

    def step():
        noise = torch.randn(sample.shape, generator=generator, device=device)
        t = torch.randint(0, 1000, (b,), generator=generator, device=device)
        noisy = scheduler.add_noise(sample, noise, t)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            pred = forward(noisy, t, encoder_hidden_states=states).sample
        loss = diffusion_loss(pred.float(), noise, t, scheduler)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Case("", step, sum(p.numel() for p in unet.parameters()), b)


def measure(case: Case, device, steps: int, warmup: int, peak_tflops: float | None) -> dict:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    compile_start = time.perf_counter()
    case.step()  # the first step pays for compilation, autotuning and allocation
    sync()
    first_step = time.perf_counter() - compile_start
    with FlopCounterMode(display=False) as counter:
        case.step()
    flops = counter.get_total_flops()
    for _ in range(max(0, warmup - 2)):
        case.step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        case.step()
    sync()
    seconds = (time.perf_counter() - start) / steps
    result = {
        "s_per_step": round(seconds, 5),
        "samples_per_s": round(case.samples_per_step / seconds, 1),
        "model_tflop_per_step": round(flops / 1e12, 3),
        "achieved_tflops": round(flops / seconds / 1e12, 1),
        "first_step_s": round(first_step, 2),
        "params_M": round(case.params / 1e6, 1),
    }
    if device.type == "cuda":
        result["peak_memory_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if peak_tflops:
        result["mfu"] = round(flops / seconds / 1e12 / peak_tflops, 3)
        result["fraction_of_measured_matmul_peak"] = round(flops / seconds / 1e12 / 790.0, 3)
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device; this check needs a GPU (use --device cpu for a smoke run)"}))
        return 1
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    report = {
        "device": name,
        "torch": torch.__version__,
        "peak_bf16_tflops": peak,
        "settings": {k: v for k, v in vars(args).items() if k != "output"},
        "cases": {},
    }
    try:
        import xformers

        report["xformers"] = xformers.__version__
    except ImportError:
        report["xformers"] = None

    cases = [
        ("clip_bf16_sdpa", lambda: clip_case(args, device)),
        ("clip_tf32", lambda: clip_case(args, device, dtype=torch.float32)),
        ("clip_bf16_checkpointing", lambda: clip_case(args, device, checkpointing=True)),
        ("unet_bf16_sdpa", lambda: unet_case(args, device)),
        ("unet_bf16_xformers", lambda: unet_case(args, device, attention="xformers")),
        ("unet_bf16_channels_last", lambda: unet_case(args, device, channels_last=True)),
        ("unet_bf16_checkpointing", lambda: unet_case(args, device, checkpointing=True)),
    ]
    if not args.no_compile:
        cases.insert(1, ("clip_bf16_compile", lambda: clip_case(args, device, compile_model=True)))
        cases.append(("unet_bf16_compile", lambda: unet_case(args, device, compile_model=True)))
    for case_name, build in cases:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = case_name.endswith("tf32")
        try:
            report["cases"][case_name] = measure(build(), device, args.steps, args.warmup, peak)
        except Exception as err:  # one failing option must not lose the other figures
            report["cases"][case_name] = {"error": f"{type(err).__name__}: {err}"[:300]}
        print(case_name, json.dumps(report["cases"][case_name]), file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):
            torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print(json.dumps(report, indent=2))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
