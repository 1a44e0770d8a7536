"""CLIP training throughput of clipcond against open_clip, same tower sizes, batch, optimizer and precision.

    python benchmarks/clip_throughput.py --presets tiny small --precision fp32 bf16 --steps 10 [--save-results]

One process builds both contenders on the same device (the Accelerator's: CUDA when there is one) and times them
alternately (common.alternate), one optimizer step each per round, and prints one JSON object: per preset,
precision and attention the median images/s of each and the median ratio clipcond / open_clip (> 1: clipcond is
faster). Goal: >= 1.0 at `tiny` and `small` on CPU, fp32 and bf16; on a GPU >= 1.3 against open_clip's eager step
and >= 1.0 against open_clip compiled (`--compile open_clip`).

`--attention default` gives each side its own default (clipcond: SDPA, but transformers' eager attention in bf16
on a CPU, see `configure_clip_for_training`; open_clip: `nn.MultiheadAttention`, which calls SDPA); `--attention
sdpa` puts clipcond on SDPA too, so both run the same attention kernel.

- clipcond: the training code path itself, `train.loop.training_step` (Accelerate's accumulate, backward, gradient
  clipping, AdamW step) on a prepared `ContrastiveModel` with `ClipStage.loss` (caption tokens as the loader's
  `CaptionTokens` gives them, uint8 pixels normalised on the device, the towers under the Accelerator's autocast, `ClipLoss` in fp32),
  then `ClipStage.after_optimizer_step` (temperature clamp).
- open_clip: `open_clip.model.CLIP` built from a config dict with the same widths, depths, heads, MLP ratio,
  patch, image size, context length, vocabulary and QuickGELU, pooling at the end token like CLIPModel;
  `open_clip.loss.ClipLoss`; the step of open_clip's `train_one_epoch` (autocast, loss, backward, clip_grad_norm,
  AdamW step, logit-scale clamp). Its images come already normalised as float, as its data loader delivers them.

Both use AdamW with clipcond's CLIP defaults (lr 1e-3, betas 0.9/0.98, eps 1e-6, weight decay 0.1 on matrices),
gradient clipping at 1.0, and the same captions (shapes-style, tokenised by one BPE tokenizer); each its own AdamW
implementation (clipcond's fused kernel on CUDA, open_clip's `main.py` the default one). The one difference in the
work is clipcond's own: it runs the text tower on the batch's longest caption instead of the full context (exact
under the causal mask; see `ClipStage.loss`), where open_clip always runs the context length.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from types import SimpleNamespace

import torch
from common import add_case_args, add_results_flag, alternate, ratio_summary, run_cases

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle"]
PLACES = ["at the top left", "at the top right", "in the centre", "at the bottom left", "at the bottom right"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python benchmarks/clip_throughput.py", description=__doc__.split("\n\n")[0])
    add_case_args(
        parser,
        presets_help="CLIP presets",
        batch_size=256,
        batch_help="images per step (the default recipe's)",
        attention=["default", "sdpa"],
        attention_help="clipcond's attention: its training default, or SDPA as open_clip's (see above)",
    )
    parser.add_argument(
        "--compile",
        nargs="*",
        default=[],
        choices=["clipcond", "open_clip"],
        help="torch.compile these contenders (clipcond: `--torch-compile`; open_clip: its `--torchcompile`)",
    )
    parser.add_argument("--seed", type=int, default=0)
    add_results_flag(parser)
    return parser.parse_args(argv)


def shapes_captions(n: int, seed: int) -> list[str]:
    """Captions like the built-in shapes data's (one or two objects, 5-17 tokens)."""
    rng = random.Random(seed)

    def phrase():
        return f"a {rng.choice(['small', 'big'])} {rng.choice(COLOURS)} {rng.choice(SHAPES)} {rng.choice(PLACES)}"

    return [phrase() if rng.random() < 0.5 else f"{phrase()} and {phrase()}" for _ in range(n)]


def _optimizer_args() -> SimpleNamespace:
    # train/clip.py's defaults
    return SimpleNamespace(learning_rate=1e-3, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.98, adam_epsilon=1e-6)


def clipcond_step(
    preset: str, precision: str, batch_size: int, captions, tokenizer, seed: int, attention: str, compile_model: bool
):
    """One optimizer step of `clipcond train clip`, on a fixed batch on the device. Returns (step, parameter count,
    device)."""
    from accelerate import Accelerator
    from transformers import CLIPModel

    from clipcond.loss import ClipLoss
    from clipcond.models.clip import clip_config, image_processor_for
    from clipcond.train.clip import CaptionTokens, ClipStage, ContrastiveModel, configure_clip_for_training
    from clipcond.train.loop import compile_if_asked, make_optimizer, training_step

    torch.manual_seed(seed)
    accelerator = Accelerator(mixed_precision="bf16" if precision == "bf16" else "no")
    config = clip_config(
        preset,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    clip = CLIPModel(config)
    device = accelerator.device
    if attention == "default":  # the training entry point's choice (eager attention in bf16 on CPU)
        configure_clip_for_training(clip, SimpleNamespace(gradient_checkpointing=False), device, precision)
    else:
        clip.set_attn_implementation(attention)
    model = ContrastiveModel(clip, with_bias=False)
    optimizer = make_optimizer(model.parameters(), _optimizer_args(), accelerator)
    compile_if_asked(model, SimpleNamespace(torch_compile="default" if compile_model else None))
    model, optimizer = accelerator.prepare(model, optimizer)
    stage = ClipStage(accelerator, model, tokenizer, image_processor_for(config), ClipLoss())
    size = config.vision_config.image_size
    cpu = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, generator=cpu)
    tokens = CaptionTokens(tokenizer, config.text_config.max_position_embeddings).tokens(captions[:batch_size])
    batch = {"pixel_values": pixels.to(device), "index": torch.arange(batch_size), **tokens}  # the loader's, once
    generator = torch.Generator(device=device).manual_seed(seed)  # the stage's, as `train` makes it
    model.train()

    def step():
        training_step(accelerator, stage, model, optimizer, batch, generator, max_grad_norm=1.0)
        stage.after_optimizer_step()

    return step, sum(p.numel() for p in model.parameters()), device


def open_clip_step(
    preset: str, precision: str, batch_size: int, captions, tokenizer, seed: int, device, compile_model: bool
):
    """One optimizer step as open_clip's `train_one_epoch` takes it, on a model of the preset's sizes, on `device`."""
    from open_clip.loss import ClipLoss
    from open_clip.model import CLIP

    from clipcond.models.clip import clip_presets

    spec = clip_presets()[preset]
    text, vision = spec["text"], spec["vision"]
    context = text["max_position_embeddings"]
    torch.manual_seed(seed)
    model = CLIP(
        embed_dim=spec["projection_dim"],
        vision_cfg={
            "layers": vision["num_hidden_layers"],
            "width": vision["hidden_size"],
            "head_width": vision["hidden_size"] // vision["num_attention_heads"],
            "mlp_ratio": vision["intermediate_size"] / vision["hidden_size"],
            "patch_size": vision["patch_size"],
            "image_size": vision["image_size"],
        },
        text_cfg={
            "context_length": context,
            "vocab_size": len(tokenizer),
            "width": text["hidden_size"],
            "heads": text["num_attention_heads"],
            "layers": text["num_hidden_layers"],
            "mlp_ratio": text["intermediate_size"] / text["hidden_size"],
            "pad_id": tokenizer.pad_token_id,
            "eos_id": tokenizer.eos_token_id,
            "pool_type": "eos",  # CLIPModel pools at the end token too
        },
        quick_gelu=True,  # transformers' CLIP activation
    ).to(device)
    forward = torch.compile(model) if compile_model else model  # open_clip's main.py --torchcompile
    # open_clip's main.py: no weight decay on gains, biases and the logit scale
    params = list(model.named_parameters())
    exclude = [p for n, p in params if p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n]
    include = [p for n, p in params if not any(p is q for q in exclude)]
    a = _optimizer_args()
    optimizer = torch.optim.AdamW(
        [{"params": exclude, "weight_decay": 0.0}, {"params": include, "weight_decay": a.weight_decay}],
        lr=a.learning_rate,
        betas=(a.adam_beta1, a.adam_beta2),
        eps=a.adam_epsilon,
    )
    loss_fn = ClipLoss()
    size = vision["image_size"]
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, size, size, generator=generator).to(device)  # as its loader delivers them
    tokens = tokenizer(
        captions[:batch_size], padding="max_length", truncation=True, max_length=context, return_tensors="pt"
    )["input_ids"].to(device)
    model.train()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            image_features, text_features, logit_scale = forward(images, tokens)
            loss = loss_fn(image_features, text_features, logit_scale)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    return step, sum(p.numel() for p in model.parameters())


def run_case(preset: str, precision: str, attention: str, args: argparse.Namespace) -> dict:
    from clipcond.models.clip import clip_presets
    from clipcond.tokenizer import train_tokenizer
    from clipcond.train.loop import reset_accelerate_state

    context = clip_presets()[preset]["text"]["max_position_embeddings"]
    captions = shapes_captions(args.batch_size, args.seed)
    tokenizer = train_tokenizer(captions, vocab_size=1024, context_length=context)
    reset_accelerate_state()  # a fresh Accelerator for each precision
    common = (preset, precision, args.batch_size, captions, tokenizer, args.seed)
    ours, ours_params, device = clipcond_step(*common, attention, "clipcond" in args.compile)
    theirs, theirs_params = open_clip_step(*common, device, "open_clip" in args.compile)
    seconds = alternate({"clipcond": ours, "open_clip": theirs}, rounds=args.steps, warmup=args.warmup)
    result = ratio_summary(seconds, args.batch_size, ours="clipcond", theirs="open_clip")
    result["params_M"] = {"clipcond": round(ours_params / 1e6, 3), "open_clip": round(theirs_params / 1e6, 3)}
    lengths = tokenizer(captions)["input_ids"]
    result["text_tokens"] = {"clipcond": max(len(t) for t in lengths), "open_clip": context}
    result["device"] = device.type
    result["attention"] = {"clipcond": attention, "open_clip": "default"}
    result["compiled"] = {name: name in args.compile for name in ("clipcond", "open_clip")}
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import open_clip  # noqa: F401
    except ImportError:
        print(json.dumps({"error": "open_clip is not installed: pip install open_clip_torch"}))
        return 1
    compiled = "".join(f"_{name}-compiled" for name in sorted(args.compile))
    return run_cases(
        "clip_throughput", args, argv, unit="images/s", goal="ratio >= 1.0", run_case=run_case, suffix=compiled
    )


if __name__ == "__main__":
    raise SystemExit(main())
