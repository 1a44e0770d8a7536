"""The GPU check: one script, at most 8 minutes on one GPU, no network, one JSON with every GPU figure the README
quotes as unmeasured.

    bash benchmarks/gpu_check.sh                         # on the GPU machine: installs the carried wheels, runs this
    python benchmarks/gpu_check.py [--budget 450]        # writes benchmarks/results/gpu_check/<UTC time>-<commit>.json
    python benchmarks/gpu_check.py --smoke --device cpu  # every part on tiny sizes, for the tests (seconds)

Parts, in order, each skipped (and said so) when the time left is too short for it; a part that fails records its
error and makes the script exit 1, after the others ran:

- `tiny_clip`: `clipcond train clip` (the demo's `tiny` recipe, PNG data at 32 px, the CLI's default loader
  workers) in-process, optimizer steps/s from two runs of different length (their difference cancels start-up and
  the first step's autotuning); with CUDA, the host syncs per step (`torch.cuda.set_sync_debug_mode`), likewise.
  Target: >= 100 steps/s at batch 256, no sync per step but the logging ones.
- `demo`: `clipcond demo` end to end (its GPU recipe where CUDA is), then `--dalle2` on the same folder, as
  subprocesses limited to the time left: wall time, stage times, judged figures.
- `base_clip`: `clipcond train clip --model base --resolution 224` (ViT-B/32) on 224 px PNG data, images/s by the
  same difference; compared with the model step alone from `clip_vs_open_clip`.
- `clip_vs_open_clip`: benchmarks/clip_throughput.py at `base`, bf16, batch 256 and 1024, each side's default
  attention and SDPA for both, then open_clip compiled.
- `decoder_vs_plain`: benchmarks/decoder_throughput.py at `base` (SD-1.x-sized UNet), 64 x 64, batch 32, bf16.
- `tiny_decoder`: `clipcond train decoder` (the demo's `tiny` UNet at 32 px, batch 32 and 128) steps/s.
- `options`: the model step of the `base` CLIP and UNet with one option changed at a time (SDPA kernels,
  xformers, channels-last, gradient checkpointing, TF32, torch.compile): time, memory, model FLOPs and MFU.

Model FLOPs per step are counted with `torch.utils.flop_counter.FlopCounterMode` (forward + backward matrix work);
MFU = FLOPs per second / the chip's dense bf16 peak, and beside it the fraction of the matrix-product rate measured
on the chip (`matmul_tflops`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from common import RESULTS_DIR, command_line, machine, provenance
from torch.utils.flop_counter import FlopCounterMode

# Dense bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}
PARTS = ("tiny_clip", "demo", "base_clip", "clip_vs_open_clip", "decoder_vs_plain", "tiny_decoder", "options")


@dataclass
class Sizes:
    """What each part runs; `SMOKE` shrinks everything to seconds on a CPU."""

    tiny_images: int = 8192  # shapes images at 32 px for the tiny CLI runs
    tiny_steps: tuple[int, int] = (50, 550)  # the two run lengths whose difference is timed
    tiny_batch: int = 256
    tiny_decoder_steps: tuple[int, int] = (30, 230)
    tiny_decoder_batches: tuple[int, ...] = (32, 128)
    base_images: int = 4096
    base_resolution: int = 224
    clip_preset: str = "base"
    base_steps: tuple[int, int] = (20, 60)
    base_batch: int = 256
    bench_batches: tuple[int, ...] = (256, 1024)
    bench_steps: int = 15
    bench_warmup: int = 3
    unet_preset: str = "base"
    unet_resolution: int = 64
    unet_batch: int = 32
    option_steps: int = 10
    option_warmup: int = 3
    demo_argv: list[str] = field(default_factory=list)


SMOKE = Sizes(
    tiny_images=300,
    tiny_steps=(1, 3),
    tiny_batch=16,
    tiny_decoder_steps=(1, 2),
    tiny_decoder_batches=(8,),
    base_images=300,
    base_resolution=32,
    clip_preset="test",
    base_steps=(1, 2),
    base_batch=16,
    bench_batches=(8,),
    bench_steps=1,
    bench_warmup=0,
    unet_preset="test",
    unet_resolution=16,
    unet_batch=2,
    option_steps=1,
    option_warmup=0,
    demo_argv=["--quick"],
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python benchmarks/gpu_check.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device", default="cuda", help="cuda (the check), or cpu with --smoke")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for all parts (8 minutes with start-up)")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS, help="the parts to run, in order")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks that every part runs, in seconds")
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak (default: from the GPU name)")
    p.add_argument("--workdir", default=None, help="where data and runs go (default: a temporary folder, removed)")
    p.add_argument("--output", default=None, help="the JSON file (default: benchmarks/results/gpu_check/<time>.json)")
    return p.parse_args(argv)


@dataclass
class Context:
    args: argparse.Namespace
    sizes: Sizes
    device: torch.device
    workdir: Path
    deadline: float
    peak_tflops: float | None
    results: dict = field(default_factory=dict)  # the parts' results so far (later parts read earlier ones)
    reserve: float = 0.0  # seconds the parts after the running one need at least

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def own(self) -> float:
        """Seconds the running part may take and still leave the later parts theirs."""
        return self.left() - self.reserve


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _shapes(ctx: Context, name: str, num_images: int, resolution: int) -> Path:
    from clipcond.data.shapes import write_shapes_dataset

    folder = ctx.workdir / name
    if not (folder / "dataset_info.json").is_file():
        write_shapes_dataset(folder, num_images=num_images, resolution=resolution, seed=0, overwrite=True)
    return folder


# ------------------------------------------------------------------------------------- CLI runs, timed by difference


def _run_record(main, argv: list[str], out: Path):
    from clipcond.runs import RunRecord
    from clipcond.train.loop import reset_accelerate_state

    try:
        main([*argv, "--output-dir", str(out)])
    finally:
        reset_accelerate_state()  # a failed run must not hand its Accelerator to the next part
    return RunRecord.read(out)


def _by_difference(main, argv: list[str], out: Path, steps: tuple[int, int], syncs: bool = False) -> dict:
    """Steps/s and samples/s of a training command between two run lengths: their difference leaves out what both
    pay once (start-up, data caching, the first step's autotuning and allocation). With `syncs` on CUDA, the host
    syncs per step counted the same way."""
    summaries, sync_counts = [], []
    for n in steps:
        with _count_syncs(syncs) as counted:
            record = _run_record(main, [*argv, "--max-train-steps", str(n)], out / f"steps-{n}")
        summaries.append(record.summary)
        sync_counts.append(len(counted))
    short, long = summaries
    seconds = long["seconds"] - short["seconds"]
    timed = seconds >= 0.05  # else too short to say anything (the smoke runs)
    result = {
        "steps_per_s": round((long["steps"] - short["steps"]) / seconds, 2) if timed else None,
        "samples_per_s": round((long["samples_seen"] - short["samples_seen"]) / seconds, 1) if timed else None,
        "runs": {str(n): s for n, s in zip(steps, summaries, strict=True)},
        "args": record.args,
    }
    if syncs and torch.cuda.is_available():
        result["host_syncs_per_step"] = round((sync_counts[1] - sync_counts[0]) / (steps[1] - steps[0]), 3)
        result["host_syncs"] = {str(n): c for n, c in zip(steps, sync_counts, strict=True)}
    return result


@contextlib.contextmanager
def _count_syncs(enabled: bool):
    """The CUDA synchronisations inside (a list, filled on exit), as `torch.cuda.set_sync_debug_mode("warn")` warns
    of them."""
    found: list[str] = []
    if not (enabled and torch.cuda.is_available()):
        yield found
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode("default")
            found += [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]


def part_tiny_clip(ctx: Context) -> dict:
    from clipcond.train import clip

    s = ctx.sizes
    data = _shapes(ctx, "shapes32", s.tiny_images, 32)
    argv = ["--data", str(data), "--train-batch-size", str(s.tiny_batch), "--mixed-precision", "bf16"]
    argv += ["--validation-steps", "0", "--checkpointing-steps", "0", "--logging-steps", "1000"]
    argv += ["--model", "test"] if ctx.args.smoke else []
    result = _by_difference(clip.main, argv, ctx.workdir / "tiny_clip", s.tiny_steps, syncs=True)
    result["target"] = ">= 100 steps/s at batch 256; host syncs per step ~0 (the loss is read every --logging-steps)"
    ctx.results["tiny_clip_run"] = str(ctx.workdir / "tiny_clip" / f"steps-{s.tiny_steps[1]}")
    return result


def part_base_clip(ctx: Context) -> dict:
    from clipcond.train import clip

    s = ctx.sizes
    data = _shapes(ctx, f"shapes{s.base_resolution}", s.base_images, s.base_resolution)
    argv = ["--data", str(data), "--model", s.clip_preset, "--resolution", str(s.base_resolution)]
    argv += ["--train-batch-size", str(s.base_batch), "--mixed-precision", "bf16", "--validation-steps", "0"]
    argv += ["--checkpointing-steps", "0", "--lr-warmup-steps", "1"]
    result = _by_difference(clip.main, argv, ctx.workdir / "base_clip", s.base_steps)
    result["target"] = "within 10% of the model step alone (clip_vs_open_clip, batch 256, default attention)"
    return result


def part_tiny_decoder(ctx: Context) -> dict:
    from clipcond.train import decoder

    s = ctx.sizes
    clip_run = ctx.results.get("tiny_clip_run")
    if clip_run is None:
        return {"skipped": "needs the CLIP of part tiny_clip"}
    data = _shapes(ctx, "shapes32", s.tiny_images, 32)
    result = {}
    for batch in s.tiny_decoder_batches:
        if ctx.own() < 20:
            result[f"batch_{batch}"] = {"skipped": f"{ctx.left():.0f} s left"}
            continue
        argv = ["--clip", clip_run, "--data", str(data), "--train-batch-size", str(batch), "--mixed-precision", "bf16"]
        argv += ["--validation-steps", "0", "--checkpointing-steps", "0", "--lr-warmup-steps", "1"]
        argv += ["--model", "test"] if ctx.args.smoke else []
        result[f"batch_{batch}"] = _by_difference(
            decoder.main, argv, ctx.workdir / f"tiny_decoder_{batch}", s.tiny_decoder_steps, syncs=True
        )
    return result


# -------------------------------------------------------------------------------------------------------- the demo


def _clipcond_command(*argv: str) -> list[str]:
    return [sys.executable, "-m", "clipcond", *argv]


def _demo_run(ctx: Context, out: Path, extra: list[str]) -> dict:
    """One `clipcond demo` as a subprocess (outside the source tree, as installed), limited to the time left."""
    command = _clipcond_command("demo", "--output-dir", str(out), *ctx.sizes.demo_argv, *extra)
    began = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ctx.workdir, capture_output=True, text=True, timeout=max(ctx.own(), 1))
    except subprocess.TimeoutExpired:
        return {"error": f"stopped after {time.perf_counter() - began:.0f} s: out of time", **_demo_figures(out)}
    result = {"wall_s": round(time.perf_counter() - began, 1), "returncode": done.returncode, **_demo_figures(out)}
    if done.returncode != 0:
        result["error"] = done.stderr[-2000:]
    return result


def _demo_figures(out: Path) -> dict:
    figures = {}
    if (out / "timings.json").is_file():
        figures["timings"] = json.loads((out / "timings.json").read_text())
    if (out / "report.json").is_file():
        report = json.loads((out / "report.json").read_text())
        figures["recipe"] = report.get("recipe")
        figures["clip_eval"] = {k: v for k, v in report["clip_eval"].items() if "top1" in k}
        figures["generation"] = {k: v for k, v in report["generation"].items() if "accuracy" in k}
        if "dalle2_table" in report:
            figures["dalle2_table"] = report["dalle2_table"]
            figures["prior"] = report["unclip_eval"]["prior"]
    return figures


def part_demo(ctx: Context) -> dict:
    out = ctx.workdir / "demo"
    result = {"plain": _demo_run(ctx, out, [])}
    result["plain"]["target"] = "<= 120 s on one H200; seen colour >= 95%, shape >= 90%"
    if "error" in result["plain"]:
        return result
    if ctx.own() < 60:
        result["dalle2"] = {"skipped": f"{ctx.own():.0f} s left before the later parts"}
    else:
        result["dalle2"] = _demo_run(ctx, out, ["--dalle2"])
    return result


# --------------------------------------------------------------------------------------- the side-by-side benchmarks


def part_clip_vs_open_clip(ctx: Context) -> dict:
    import clip_throughput

    s = ctx.sizes
    cases = {}
    # On a GPU clipcond's default attention is SDPA already: "sdpa" would measure the same thing twice.
    variants = [("default", []), ("default", ["open_clip"])]
    if ctx.device.type != "cuda":
        variants.insert(1, ("sdpa", []))
    for batch in s.bench_batches:
        for attention, compiled in variants:
            if compiled and (batch != s.bench_batches[0] or ctx.args.smoke):
                continue  # compiling takes a minute: at the first batch size only
            name = f"{s.clip_preset}_bf16_b{batch}_{attention}" + ("_open_clip-compiled" if compiled else "")
            if ctx.left() < 30:
                cases[name] = {"skipped": f"{ctx.left():.0f} s left"}
                continue
            argv = ["--batch-size", str(batch), "--steps", str(s.bench_steps), "--warmup", str(s.bench_warmup)]
            args = clip_throughput.parse_args([*argv, "--compile", *compiled] if compiled else argv)
            cases[name] = clip_throughput.run_case(s.clip_preset, "bf16", attention, args) | {"batch_size": batch}
            print(name, json.dumps(cases[name]), file=sys.stderr, flush=True)
    return cases


def part_decoder_vs_plain(ctx: Context) -> dict:
    import decoder_throughput

    s = ctx.sizes
    cases = {}
    # On a GPU clipcond keeps diffusers' default processor: "same" would measure "default" twice.
    for attention in ("default",) if ctx.device.type == "cuda" else ("default", "same"):
        args = decoder_throughput.parse_args(
            ["--batch-size", str(s.unet_batch), "--steps", str(s.bench_steps), "--warmup", str(s.bench_warmup)]
            + ["--resolution", str(s.unet_resolution)]
        )
        name = f"{s.unet_preset}_bf16_{s.unet_resolution}px_b{s.unet_batch}_{attention}"
        cases[name] = decoder_throughput.run_case(s.unet_preset, "bf16", attention, args) | {
            "batch_size": s.unet_batch
        }
        print(name, json.dumps(cases[name]), file=sys.stderr, flush=True)
    cases["target"] = ">= 1.2x the plain diffusers example loop"
    return cases


# ------------------------------------------------------------------------------------------------ the option sweep


@dataclass
class Case:
    step: callable  # one optimizer step
    params: int
    samples_per_step: int


def clip_case(ctx: Context, *, compile_model=False, dtype=torch.bfloat16, checkpointing=False) -> Case:
    from transformers import CLIPModel

    from clipcond.loss import ClipLoss
    from clipcond.models.clip import clip_config
    from clipcond.train.clip import ContrastiveModel

    device, b = ctx.device, ctx.sizes.base_batch
    config = clip_config(ctx.sizes.clip_preset, vocab_size=49408, bos_token_id=1, eos_token_id=0, pad_token_id=3)
    clip = CLIPModel(config)
    if checkpointing:
        clip.gradient_checkpointing_enable()
    model = ContrastiveModel(clip, with_bias=False).to(device)
    forward = torch.compile(model) if compile_model else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    loss_fn = ClipLoss()
    size, context = config.vision_config.image_size, config.text_config.max_position_embeddings
    pixels = torch.randn(b, 3, size, size, device=device)
    input_ids = torch.randint(4, 49408, (b, context), device=device)
    input_ids[:, -1] = 0  # the end token, where CLIP pools

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            image, text, scale, _ = forward(input_ids=input_ids, attention_mask=None, pixel_values=pixels)
        loss_fn(image.float(), text.float(), scale.float()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Case(step, sum(p.numel() for p in model.parameters()), b)


def unet_case(
    ctx: Context, *, attention="sdpa", channels_last=False, checkpointing=False, compile_model=False
) -> Case:
    from diffusers import DDPMScheduler

    from clipcond.models.attention import enable_xformers_if_possible
    from clipcond.models.unet import create_unet, unet_config
    from clipcond.train.decoder import diffusion_loss

    device, s = ctx.device, ctx.sizes
    width = {"base": 512, "small": 256, "tiny": 128}.get(s.clip_preset, 32)  # the CLIP text tower's width
    spec = unet_config(s.unet_preset, sample_size=s.unet_resolution, cross_attention_dim=width, in_channels=4)
    unet = create_unet(spec).to(device)
    if attention == "xformers" and not enable_xformers_if_possible(unet):
        raise RuntimeError("xformers asked for but not usable here")
    if checkpointing:
        unet.enable_gradient_checkpointing()
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    forward = torch.compile(unet) if compile_model else unet
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=device.type == "cuda")
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    b = s.unet_batch
    sample = torch.randn(b, 4, s.unet_resolution, s.unet_resolution, device=device)  # SD's latents
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
        diffusion_loss(pred.float(), noise, t, scheduler).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Case(step, sum(p.numel() for p in unet.parameters()), b)


def measure(ctx: Context, case: Case, kernel: str | None = None) -> dict:
    """Time `case.step` (after a first step and warm-up), count its FLOPs, report MFU; under SDPA `kernel`."""
    from types import SimpleNamespace

    from clipcond.train.loop import attention_kernel

    def step():
        with attention_kernel(SimpleNamespace(sdpa_backend=kernel)):
            case.step()

    began = time.perf_counter()
    step()  # the first step pays for compilation, autotuning and allocation
    _sync(ctx.device)
    first_step = time.perf_counter() - began
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    for _ in range(ctx.sizes.option_warmup):
        step()
    _sync(ctx.device)
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    for _ in range(ctx.sizes.option_steps):
        step()
    _sync(ctx.device)
    seconds = (time.perf_counter() - began) / ctx.sizes.option_steps
    tflops = flops / seconds / 1e12
    result = {
        "s_per_step": round(seconds, 5),
        "samples_per_s": round(case.samples_per_step / seconds, 1),
        "model_tflop_per_step": round(flops / 1e12, 3),
        "achieved_tflops": round(tflops, 1),
        "first_step_s": round(first_step, 2),
        "params_M": round(case.params / 1e6, 1),
    }
    if ctx.device.type == "cuda":
        result["peak_memory_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if ctx.peak_tflops:
        result["mfu"] = round(tflops / ctx.peak_tflops, 3)
    if ctx.results.get("matmul_tflops"):
        result["fraction_of_measured_matmul"] = round(tflops / ctx.results["matmul_tflops"], 3)
    return result


def matmul_tflops(device: torch.device, n: int = 8192, repeats: int = 20) -> float:
    """The bf16 matrix-product rate the chip reaches here (the ceiling an MFU is read against)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    a @ a
    _sync(device)
    began = time.perf_counter()
    for _ in range(repeats):
        a @ a
    _sync(device)
    return round(2 * n**3 * repeats / (time.perf_counter() - began) / 1e12, 1)


def option_cases(ctx: Context) -> list[tuple[str, callable, str | None]]:
    """(name, build, SDPA kernel) of every option tried, one change at a time from the bf16 SDPA step."""
    cases = [
        ("clip_bf16_sdpa", lambda: clip_case(ctx), None),
        ("clip_bf16_flash", lambda: clip_case(ctx), "flash"),
        ("clip_bf16_cudnn", lambda: clip_case(ctx), "cudnn"),
        ("clip_tf32", lambda: clip_case(ctx, dtype=torch.float32), None),
        ("clip_bf16_checkpointing", lambda: clip_case(ctx, checkpointing=True), None),
        ("unet_bf16_sdpa", lambda: unet_case(ctx), None),
        ("unet_bf16_flash", lambda: unet_case(ctx), "flash"),
        ("unet_bf16_cudnn", lambda: unet_case(ctx), "cudnn"),
        ("unet_bf16_xformers", lambda: unet_case(ctx, attention="xformers"), None),
        ("unet_bf16_channels_last", lambda: unet_case(ctx, channels_last=True), None),
        ("unet_bf16_checkpointing", lambda: unet_case(ctx, checkpointing=True), None),
    ]
    if not ctx.args.smoke:  # last: a minute each
        cases += [
            ("clip_bf16_compile", lambda: clip_case(ctx, compile_model=True), None),
            ("unet_bf16_compile", lambda: unet_case(ctx, compile_model=True), None),
        ]
    return cases


def part_options(ctx: Context) -> dict:
    if ctx.device.type == "cuda":
        ctx.results["matmul_tflops"] = matmul_tflops(ctx.device)
    cases = {"matmul_tflops": ctx.results.get("matmul_tflops")}
    for name, build, kernel in option_cases(ctx):
        if ctx.left() < (75 if "compile" in name else 15):
            cases[name] = {"skipped": f"{ctx.left():.0f} s left"}
            continue
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = name.endswith("tf32")
        try:
            cases[name] = measure(ctx, build(), kernel)
        except Exception as err:  # an option this machine lacks (xformers, a kernel) is a finding, not a failure
            cases[name] = {"unavailable": f"{type(err).__name__}: {err}"[:300]}
        print(name, json.dumps(cases[name]), file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):
            torch._dynamo.reset()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    return cases


# ----------------------------------------------------------------------------------------------------------- main

PART_FUNCTIONS = {
    "tiny_clip": (part_tiny_clip, 20),  # (function, seconds it needs at least)
    "demo": (part_demo, 60),
    "base_clip": (part_base_clip, 40),
    "clip_vs_open_clip": (part_clip_vs_open_clip, 40),
    "decoder_vs_plain": (part_decoder_vs_plain, 30),
    "tiny_decoder": (part_tiny_decoder, 30),
    "options": (part_options, 30),
}


def default_output() -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    commit = (provenance().get("commit") or "nocommit")[:10]
    return RESULTS_DIR / "gpu_check" / f"{stamp}-{commit}.json"


def main(argv=None) -> int:
    from clipcond.storage import write_json_atomic

    args = parse_args(argv)
    began = time.monotonic()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device; this check needs a GPU (--smoke --device cpu runs it small)"}))
        return 1
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    output = Path(args.output) if args.output else default_output()
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="clipcond-gpu-check-"))
    ctx = Context(
        args=args,
        sizes=SMOKE if args.smoke else Sizes(),
        device=device,
        workdir=workdir.resolve(),
        deadline=began + args.budget,
        peak_tflops=args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None),
    )
    report = {
        "benchmark": "gpu_check",
        "command": command_line("gpu_check", argv),
        **provenance(),
        "machine": machine(),
        "peak_bf16_tflops": ctx.peak_tflops,
        "settings": {k: v for k, v in vars(args).items() if k != "output"},
        "parts": {},
    }
    failed = []
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        for k, part in enumerate(args.parts):
            function, needs = PART_FUNCTIONS[part]
            ctx.reserve = sum(PART_FUNCTIONS[later][1] for later in args.parts[k + 1 :])
            if ctx.left() < needs:
                report["parts"][part] = {"skipped": f"{ctx.left():.0f} s left of --budget {args.budget:g}"}
                continue
            part_began = time.monotonic()
            try:
                report["parts"][part] = function(ctx)
            except Exception as err:
                report["parts"][part] = {"error": f"{type(err).__name__}: {err}"[:2000]}
                failed.append(part)
            report["parts"][part]["seconds"] = round(time.monotonic() - part_began, 1)
            print(part, json.dumps(report["parts"][part])[:2000], file=sys.stderr, flush=True)
            write_json_atomic(output, report)  # after every part: a run cut short keeps what it measured
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    report["seconds"] = round(time.monotonic() - began, 1)
    report["failed_parts"] = failed
    write_json_atomic(output, report)
    print(json.dumps({"output": str(output), "seconds": report["seconds"], "failed_parts": failed}))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
