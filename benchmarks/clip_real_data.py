"""CLIP on small real data: clipcond's recipe beside a plain transformers `CLIPModel` loop and an open_clip loop, at
equal steps, batch and model sizes, on Tux Paint's clip-art stamps (a benchmark, not a test).

    python benchmarks/clip_real_data.py --data-dir DIR [--stamps /usr/share/tuxpaint/stamps] --seeds 0,1,2 \
        [--steps 300] [--batch-size 128] [--save-results]

1. `clipcond data tuxpaint DIR --test-fraction 0.2` (reused when DIR holds it).
2. Per seed, three contenders, each from its own random initialisation of the same sizes (the `--model` preset) and
   reading the same tokens (the tokenizer that clipcond's run trains on the training captions):
   - clipcond: `clipcond train clip` with every recipe option at its default, `--max-train-steps` and
     `--train-batch-size` set;
   - transformers: `CLIPModel(config)` and its own loss (`return_loss=True`), images resized and normalised, no
     augmentation: what transformers' example scripts do;
   - open_clip: `open_clip.CLIP` of the same architecture (`open_clip_model_cfg`: widths, depths, activation, the
     text pooled at the tokenizer's end token) with open_clip's `ClipLoss`.
   Both baselines train with open_clip's defaults for ViTs: AdamW (lr 5e-4, betas 0.9/0.98, eps 1e-6, weight decay
   0.2 on matrices only), linear warm-up over clipcond's warm-up steps, then cosine decay.
3. Each model embeds the test split; the figures are image->text and text->image recall@1/5/10
   (`clipcond.evaluation.retrieval`) and zero-shot top-1 over the stamps' labels with the default templates
   (`clipcond.evaluation.zero_shot`), the same code for all three.

Prints one JSON object: per contender and seed the figures and the training seconds, their mean with a 95% interval
over seeds, and whether clipcond's mean beats both baselines' on text->image R@10 and zero-shot top-1. Beside the
data it says how often the training captions name the labels (`label_words`): a label no caption names is a word
that contrastive training on these captions cannot teach, and zero-shot over such labels stays near chance for any
model trained here from scratch.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import add_results_flag, command_line, machine, parse_seeds, save_results

from clipcond.data.folders import ImageCaptionDataset
from clipcond.data.shapes import load_dataset_info
from clipcond.data.tuxpaint import DATASET_NAME, DEFAULT_STAMPS, write_tuxpaint_dataset
from clipcond.evaluation.retrieval import recall, retrieval_hits
from clipcond.evaluation.stats import mean_interval
from clipcond.evaluation.zero_shot import DEFAULT_TEMPLATES, build_zero_shot_classifier, zero_shot_predict
from clipcond.models.clip import image_features, load_clip, text_features
from clipcond.models.clip_pixels import normalize_pixels
from clipcond.models.open_clip_export import open_clip_model_cfg
from clipcond.runs import RunRecord
from clipcond.train.clip import TRAINING_DEFAULTS

CONTENDERS = ("clipcond", "transformers", "open_clip")
HEADLINE = ("text_to_image_R@10", "zero_shot_top1")
COUNTS = ("train_seconds", "params")  # figures that are not proportions
RESOLUTION = 32
WARMUP_STEPS = TRAINING_DEFAULTS["lr_warmup_steps"]  # clipcond's warm-up, given to the baselines too


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/clip_real_data.py",
        description="clipcond's CLIP recipe against plain transformers and open_clip loops on the Tux Paint stamps.",
    )
    parser.add_argument("--data-dir", type=Path, required=True, help="the stamps data set, made here if absent")
    parser.add_argument("--stamps", type=Path, default=DEFAULT_STAMPS, help="Tux Paint's stamps folder")
    parser.add_argument("--work-dir", type=Path, help="where the clipcond runs go (default: a temp dir)")
    parser.add_argument("--seeds", type=parse_seeds, default=[0, 1, 2], help="training seeds, e.g. 0,1,2")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of every contender")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step of every contender")
    parser.add_argument("--model", default="tiny", help="the CLIP preset all three share")
    parser.add_argument(
        "--clipcond-args",
        type=shlex.split,
        default=[],
        help="more `clipcond train clip` options, to measure another recipe (e.g. '--grayscale-prob 0')",
    )
    add_results_flag(parser, results_name="clip_real_data")
    return parser.parse_args(argv)


def ensure_data(data_dir: Path, stamps: Path) -> dict:
    info = load_dataset_info(data_dir) if data_dir.is_dir() else None
    if info is not None and info.get("name") == DATASET_NAME:
        return info
    return write_tuxpaint_dataset(stamps, data_dir, resolution=64, test_fraction=0.2, seed=0)


def words_of(caption: str) -> set[str]:
    """The words of a caption: its runs of letters, lower-cased."""
    return set(re.findall(r"[a-z]+", caption.lower()))


def label_words(captions: list[str], labels: list[str]) -> dict:
    """How often `captions` name the labels: per label, the captions that hold it (or its singular, "animals" ->
    "animal") as a word, in any case; the share of captions that name their own label; and uniform chance."""
    words = [words_of(caption) for caption in captions]

    def names(said: set[str], label: str) -> bool:
        return label.lower() in said or label.lower().removesuffix("s") in said

    classes = sorted(set(labels))
    return {
        "captions_naming": {c: sum(names(said, c) for said in words) for c in classes},
        "own_label_named": round(sum(map(names, words, labels)) / len(captions), 4),
        "uniform_chance": round(1 / len(classes), 4),
    }


def known_words(test_captions: list[str], train_captions: list[str]) -> torch.Tensor:
    """Per test caption (N,) bool, whether every word of it occurs in a training caption: a caption with a word that
    none has ("An ostrich.") can be matched to its image by nothing the training taught but the word's pieces."""
    vocabulary = set().union(*map(words_of, train_captions))
    return torch.tensor([words_of(caption) <= vocabulary for caption in test_captions])


def load_split(data_dir: Path, split: str) -> tuple[torch.Tensor, list[str], list[str]]:
    """All images of a split (uint8, N x 3 x R x R), their captions and labels."""
    dataset = ImageCaptionDataset(data_dir, split=split, resolution=RESOLUTION)
    pixels = torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))])
    return pixels, list(dataset.captions), list(dataset.labels)


# ------------------------------------------------------------------------------------------------ contenders


def train_clipcond(args, data_dir: Path, run: Path, seed: int) -> float:
    argv = ["--data", str(data_dir), "--output-dir", str(run), "--model", args.model, "--seed", str(seed)]
    argv += ["--max-train-steps", str(args.steps), "--train-batch-size", str(args.batch_size)]
    argv += ["--resolution", str(RESOLUTION), "--validation-steps", "0", "--checkpointing-steps", "0"]
    argv += args.clipcond_args
    subprocess.run([sys.executable, "-m", "clipcond", "train", "clip", *argv], check=True, stdout=subprocess.DEVNULL)
    return RunRecord.read(run).summary["seconds"]  # the optimisation loop, as the baselines' figure


class Embedder:
    """What the evaluation reads of a model: embeddings of texts and of uint8 images, and its parameter count."""

    def __init__(self, model: torch.nn.Module, encode_text, encode_images):
        self.encode_text, self.encode_images = encode_text, encode_images
        self.params = sum(p.numel() for p in model.parameters())


def clipcond_embedder(run: Path) -> Embedder:
    clip = load_clip(run, progress=False)
    return Embedder(clip.model, clip.encode_text, clip.encode_images)


def tokenize(tokenizer, texts: list[str], context: int) -> dict[str, torch.Tensor]:
    return tokenizer(texts, padding="max_length", truncation=True, max_length=context, return_tensors="pt")


def baseline_optimizer(model: torch.nn.Module, steps: int):
    """open_clip's ViT defaults: AdamW, weight decay on matrices only; linear warm-up, then cosine decay."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "logit_scale" not in n]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2 or "logit_scale" in n]
    groups = [{"params": decay, "weight_decay": 0.2}, {"params": rest, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=5e-4, betas=(0.9, 0.98), eps=1e-6)

    def factor(step: int) -> float:
        if step < WARMUP_STEPS:
            return (step + 1) / WARMUP_STEPS
        return 0.5 * (1 + math.cos(math.pi * (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_loop(model, loss_of, train, args, seed: int) -> float:
    """`args.steps` steps of `args.batch_size` shuffled pairs (epoch by epoch); `loss_of(pixels, captions)`."""
    pixels, captions, _ = train
    optimizer, schedule = baseline_optimizer(model, args.steps)
    generator = torch.Generator().manual_seed(seed)
    order, start = torch.empty(0, dtype=torch.long), time.perf_counter()
    model.train()
    for _ in range(args.steps):
        if len(order) < args.batch_size:
            order = torch.cat([order, torch.randperm(len(captions), generator=generator)])
        batch, order = order[: args.batch_size], order[args.batch_size :]
        loss = loss_of(pixels[batch], [captions[i] for i in batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    return time.perf_counter() - start


def train_transformers(run: Path, train, args, seed: int) -> tuple[Embedder, float]:
    from transformers import CLIPConfig, CLIPModel

    clip = load_clip(run, progress=False)  # the sizes and the tokenizer of clipcond's run, not its weights
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig.from_pretrained(run))
    context, mean, std = clip.context_length, clip.image_mean, clip.image_std

    def loss_of(pixels, captions):
        tokens = tokenize(clip.tokenizer, captions, context)
        return model(**tokens, pixel_values=normalize_pixels(pixels, mean, std), return_loss=True).loss

    seconds = train_loop(model, loss_of, train, args, seed)

    @torch.no_grad()
    def encode_text(texts):
        return text_features(model, **tokenize(clip.tokenizer, texts, context))

    @torch.no_grad()
    def encode_images(pixels):
        return image_features(model, normalize_pixels(pixels, mean, std))

    return Embedder(model, _features(encode_text), _features(encode_images)), seconds


def train_open_clip(run: Path, train, args, seed: int) -> tuple[Embedder, float]:
    import open_clip
    from open_clip.loss import ClipLoss
    from transformers import CLIPConfig

    clip = load_clip(run, progress=False)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**open_clip_model_cfg(CLIPConfig.from_pretrained(run)))  # the same network in open_clip
    context, mean, std, loss = clip.context_length, clip.image_mean, clip.image_std, ClipLoss()

    def ids(texts):
        return tokenize(clip.tokenizer, texts, context)["input_ids"]

    def loss_of(pixels, captions):
        images, texts, logit_scale = model(normalize_pixels(pixels, mean, std), ids(captions))[:3]
        return loss(images, texts, logit_scale)

    seconds = train_loop(model, loss_of, train, args, seed)

    @torch.no_grad()
    def encode_images(pixels):
        return model.encode_image(normalize_pixels(pixels, mean, std))

    encode_text = _features(lambda texts: model.encode_text(ids(texts)))
    return Embedder(model, encode_text, _features(encode_images)), seconds


def _features(encode, batch_size: int = 256):
    """`encode` over batches, without gradients."""

    @torch.no_grad()
    def batched(inputs):
        return torch.cat([encode(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)])

    return batched


# ------------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def evaluate(embedder: Embedder, test, known: torch.Tensor) -> dict:
    """Retrieval recall both ways, text->image R@10 apart for the test captions whose words the training captions
    all hold (`known`) and the rest, and zero-shot top-1 over the labels."""
    pixels, captions, labels = test
    images, texts = embedder.encode_images(pixels), embedder.encode_text(captions)
    hits = retrieval_hits(images, texts, captions)
    figures = {key: recall(hit) for key, hit in hits.items()}
    for name, subset in (("known_words", known), ("new_words", ~known)):
        if subset.any():  # a data set whose test captions are all of one kind has no figure for the other
            figures[f"text_to_image_R@10_{name}"] = recall(hits["text_to_image_R@10"][subset])
    classes = sorted(set(labels))
    classifier = build_zero_shot_classifier(embedder.encode_text, classes, DEFAULT_TEMPLATES)
    predicted = zero_shot_predict(F.normalize(images.float(), dim=-1), classifier)
    targets = torch.tensor([classes.index(label) for label in labels])
    figures["zero_shot_top1"] = (predicted == targets).float().mean().item()
    figures["zero_shot_chance"] = max(labels.count(c) for c in classes) / len(labels)  # the majority class
    return {**{key: round(value, 4) for key, value in figures.items()}, "params": embedder.params}


def summarise(per_seed: dict[str, dict[int, dict]]) -> dict:
    summary = {}
    for name, seeds in per_seed.items():
        keys = next(iter(seeds.values())).keys()
        summary[name] = {
            key: mean_interval([figures[key] for figures in seeds.values()], None if key in COUNTS else (0, 1))
            for key in keys
        }
    summary["clipcond_beats_both"] = {
        key: all(summary["clipcond"][key]["mean"] > summary[other][key]["mean"] for other in CONTENDERS[1:])
        for key in HEADLINE
    }
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = ensure_data(args.data_dir, args.stamps)
    train, test = load_split(args.data_dir, "train"), load_split(args.data_dir, "test")
    known = known_words(test[1], train[1])
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="clip_real_data_"))
    per_seed: dict[str, dict[int, dict]] = {name: {} for name in CONTENDERS}
    for seed in args.seeds:
        run = work / f"clipcond-seed{seed}"
        seconds = train_clipcond(args, args.data_dir, run, seed)
        per_seed["clipcond"][seed] = {
            **evaluate(clipcond_embedder(run), test, known),
            "train_seconds": round(seconds, 1),
        }
        for name, trainer in (("transformers", train_transformers), ("open_clip", train_open_clip)):
            embedder, seconds = trainer(run, train, args, seed)
            per_seed[name][seed] = {**evaluate(embedder, test, known), "train_seconds": round(seconds, 1)}
        print(json.dumps({"seed": seed, **{n: per_seed[n][seed] for n in CONTENDERS}}), file=sys.stderr, flush=True)
    report = {
        "benchmark": "clip_real_data",
        "command": command_line("clip_real_data", argv),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "save_results"},
        "data": {
            "source": info.get("source"),
            "splits": info.get("splits"),
            "classes": info.get("classes"),
            "label_words": label_words(*train[1:]),
            "test_captions_with_known_words": int(known.sum()),
        },
        "machine": machine(),
        "per_seed": per_seed,
        "summary": summarise(per_seed),
    }
    print(json.dumps(report, indent=2))
    if args.save_results:
        save_results(args.results_name, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
