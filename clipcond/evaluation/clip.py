"""`clipcond eval clip`: zero-shot accuracy and image-text retrieval recall of a CLIP run on a data split.

    clipcond eval clip --model runs/clip --data data/shapes [--split test] [--templates FILE] [--max-images N]

prints one JSON object (the keys of `METRIC_KEYS`) to stdout and writes it, with a confusion-matrix PNG and an
image-text similarity PNG, to `--output-dir` (default `RUN/eval/`). `evaluate_clip` is the same evaluation as a
function of (model, data) that prints nothing; the training loop calls it for validation.

Zero-shot classification (`clipcond.evaluation.zero_shot`) runs over the images with a non-empty label; the classes
are the sorted unique labels of the whole split. On the shapes data, accuracy is also reported separately for the
seen colour-shape pairs and for the held-out ones (`dataset_info.json` "held_out"), which never appear in training.
Retrieval (`clipcond.evaluation.retrieval`) runs over every image and its caption, duplicate captions counting as
matches.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from clipcond.data.folders import ImageCaptionDataset
from clipcond.device import resolve_device
from clipcond.evaluation.arguments import add_output_arguments, eval_parser
from clipcond.evaluation.retrieval import retrieval_recall
from clipcond.evaluation.zero_shot import (
    DEFAULT_TEMPLATES,
    build_zero_shot_classifier,
    check_templates,
    confusion_matrix,
    held_out_groups,
    load_templates,
    zero_shot_metrics,
    zero_shot_predict,
)
from clipcond.finite import finite_or_null
from clipcond.models.clip import load_clip
from clipcond.plots import heatmap_png
from clipcond.storage import check_output_dir, dumps_json, write_json_atomic

logger = logging.getLogger(__name__)

RECALL_KS = (1, 5, 10)
# The stable interface of the printed JSON, in the order printed.
METRIC_KEYS = (
    "zero_shot_top1",
    "zero_shot_balanced",
    "zero_shot_top1_seen",
    "zero_shot_top1_heldout",
    *(f"image_to_text_R@{k}" for k in RECALL_KS),
    *(f"text_to_image_R@{k}" for k in RECALL_KS),
    "num_images",
    "num_classes",
    "num_zero_shot_images",
    "num_zero_shot_images_seen",
    "num_zero_shot_images_heldout",
    "num_unreadable_images",
)
SIMILARITY_ITEMS = 64  # images x captions shown in the similarity matrix


@dataclass
class ClipEvalExtras:
    """What the figures need beside the metrics."""

    classnames: list[str]  # zero-shot classes, sorted; empty when the split has no labels
    heldout_classes: list[str]  # the classes among `classnames` that are held-out compositions
    confusion: torch.Tensor | None  # (C, C) int64 counts, row = true class, column = predicted; None without labels
    similarity: torch.Tensor  # (m, m) cosine of the first m images (rows) with their captions (columns)
    similarity_captions: list[str]  # the m captions, in row (and column) order


# The command's description in `--help`.
DESCRIPTION = """Evaluate a CLIP run: zero-shot top-1 and class-balanced accuracy over the split's labels (prompt
ensembling over templates; seen and held-out compositions separately on the shapes data) and image-to-text /
text-to-image recall@1/5/10 (identical captions count as matches). Prints one JSON object and writes it, a confusion
matrix and a similarity matrix to --output-dir.
"""


def _collate(samples: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),  # (B, 3, R, R) uint8
        "text": [s["text"] for s in samples],
        "label": [s["label"] for s in samples],
        "index": [s.get("index") for s in samples],
        "skipped": [path for s in samples for path in s.get("skipped", ())],
    }


@torch.no_grad()
def _embed_images(clip_run, dataset, n: int, batch_size: int, num_workers: int, progress: bool):
    """L2-normalised image features of the first n items, with their captions and labels, and the paths of the
    unreadable ones. The data set puts the next readable item in an unreadable one's place; that stand-in (an item
    of another index) is dropped, so no image counts twice and the figures are over the readable images only."""
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, range(n)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate,
    )
    features, texts, labels, unreadable = [], [], [], []
    position = 0
    with tqdm(total=n, desc="embedding images", unit="img", disable=not progress, leave=False) as bar:
        for batch in loader:
            pixels = batch["pixel_values"]
            size = clip_run.image_size
            if pixels.shape[-2:] != (size, size):
                raise ValueError(
                    f"the data set gives {tuple(pixels.shape[-2:])} images but the CLIP expects {size} x {size}; "
                    f"build the data set with resolution={size}"
                )
            asked = range(position, position + len(pixels))
            keep = [k for k, i in enumerate(batch["index"]) if i is None or i == asked[k]]
            position += len(pixels)
            unreadable = list(dict.fromkeys([*unreadable, *batch["skipped"]]))  # a file once, however often tried
            if keep:
                features.append(clip_run.encode_images(pixels[keep]))
                texts += [batch["text"][k] for k in keep]
                labels += [batch["label"][k] for k in keep]
            bar.update(len(pixels))
    if unreadable:
        logger.warning("%d unreadable image(s) left out of the figures, e.g. %s", len(unreadable), unreadable[0])
    if not features:
        raise ValueError(f"none of the first {n} images of {dataset!r} could be read")
    return torch.cat(features), texts, labels, unreadable


@torch.no_grad()
def _embed_texts(clip_run, texts: list[str], batch_size: int, progress: bool) -> torch.Tensor:
    """L2-normalised text features (N, D); each distinct caption is encoded once."""
    unique = list(dict.fromkeys(texts))
    chunks = []
    for start in tqdm(
        range(0, len(unique), batch_size), desc="embedding captions", unit="batch", disable=not progress, leave=False
    ):
        chunks.append(clip_run.encode_text(unique[start : start + batch_size], batch_size=batch_size))
    position = {text: i for i, text in enumerate(unique)}
    index = torch.tensor([position[text] for text in texts])
    return torch.cat(chunks)[index.to(chunks[0].device)]


@dataclass
class _ZeroShot:
    """Zero-shot classification of the labelled images."""

    figures: dict  # top1, balanced, top1_seen, top1_heldout (None without labels or without the group)
    classnames: list[str]  # the classes, sorted; empty without labelled images
    heldout_classes: list[str]  # those among them that are held-out compositions
    confusion: torch.Tensor | None  # (C, C) counts, None without labelled images
    num_images: int  # the labelled images
    group_sizes: dict  # labelled images of seen and of held-out classes (None without a held-out list)


def _zero_shot(encode, dataset, image_features, labels: list[str], templates, held_out) -> _ZeroShot:
    """Zero-shot classification of the images with a label, over the labels of the whole split (prompt ensembles
    embedded by `encode`); seen and held-out classes apart when `held_out` is given."""
    split_labels = list(getattr(dataset, "labels", None) or [])
    classnames = sorted({label for label in [*split_labels, *labels] if label})
    labelled = [i for i, label in enumerate(labels) if label]
    figures = dict.fromkeys(("top1", "balanced", "top1_seen", "top1_heldout"))
    sizes = dict.fromkeys(("seen", "heldout"))
    if not labelled:
        return _ZeroShot(figures, [], [], None, 0, sizes)
    classifier = build_zero_shot_classifier(encode, classnames, templates)  # (C, D)
    predictions = zero_shot_predict(image_features[labelled], classifier).cpu()
    class_index = {name: c for c, name in enumerate(classnames)}
    targets = torch.tensor([class_index[labels[i]] for i in labelled])
    groups = held_out_groups(classnames, held_out)
    figures.update(zero_shot_metrics(predictions, targets, len(classnames), groups))
    heldout_classes = [classnames[c] for c in groups["heldout"]] if groups else []
    for name, classes in (groups or {}).items():  # how many images each group's figure reads: its interval
        sizes[name] = int(torch.isin(targets, torch.tensor(classes, dtype=torch.long)).sum())
    confusion = confusion_matrix(predictions, targets, len(classnames))
    return _ZeroShot(figures, classnames, heldout_classes, confusion, len(labelled), sizes)


def evaluate_clip(
    clip_run,
    dataset,
    *,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    held_out: Sequence[str] | None = None,
    batch_size: int = 256,
    max_images: int | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> tuple[dict, ClipEvalExtras]:
    """Zero-shot accuracy and retrieval recall of a CLIP on a data set; prints nothing (tqdm bars go to stderr).

    Args:
        clip_run: a `clipcond.models.clip.ClipRun` (its model is put in eval mode and restored afterwards).
        dataset: an `ImageCaptionDataset` (items with "pixel_values" uint8 (3, R, R) at the CLIP's resolution,
            "text" and "label"); its `labels` attribute, when present, gives the zero-shot classes.
        templates: zero-shot prompt templates, each with one "{}".
        held_out: held-out "colour shape" pairs (dataset_info["held_out"]); None: no seen / held-out split.
        max_images: evaluate the first N items only. The zero-shot classes stay those of the whole split.
        progress: show tqdm bars on stderr.

    Returns:
        `(metrics, extras)`: metrics with the keys of `METRIC_KEYS` (zero-shot values None when no item has a label;
        seen / held-out None without a held-out list or without an image of the group), and the data of the figures.
    """
    templates = check_templates(templates)
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
    if max_images is not None and max_images < 1:
        raise ValueError(f"`max_images` must be >= 1 (or None for all), got {max_images}")
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    if n == 0:
        raise ValueError(f"the data set {dataset!r} is empty; there is nothing to evaluate")

    model = clip_run.model
    was_training = model.training
    model.eval()
    try:
        # 1. embed the first n images and their captions
        image_features, texts, labels, unreadable = _embed_images(
            clip_run, dataset, n, batch_size, num_workers, progress
        )
        text_features = _embed_texts(clip_run, texts, batch_size, progress)  # (n, D)

        # 2. zero-shot classification of the labelled images, over the labels of the whole split
        encode = functools.partial(clip_run.encode_text, batch_size=batch_size)
        zero_shot = _zero_shot(encode, dataset, image_features, labels, templates, held_out)

        # 3. retrieval over all n pairs, and the similarity block of the first items for the figure
        recall = retrieval_recall(image_features, text_features, texts, ks=RECALL_KS)
        m = min(n, SIMILARITY_ITEMS)
        similarity = (image_features[:m] @ text_features[:m].T).cpu()  # (m, m)
    finally:
        model.train(was_training)

    metrics = {f"zero_shot_{key}": value for key, value in zero_shot.figures.items()}
    metrics.update(recall)
    metrics.update(
        num_images=len(texts),
        num_classes=len(zero_shot.classnames),
        num_zero_shot_images=zero_shot.num_images,
        num_zero_shot_images_seen=zero_shot.group_sizes["seen"],
        num_zero_shot_images_heldout=zero_shot.group_sizes["heldout"],
        num_unreadable_images=len(unreadable),
    )
    metrics = {key: metrics[key] for key in METRIC_KEYS}
    extras = ClipEvalExtras(
        classnames=zero_shot.classnames,
        heldout_classes=zero_shot.heldout_classes,
        confusion=zero_shot.confusion,
        similarity=similarity,
        similarity_captions=texts[:m],
    )
    return metrics, extras


def write_figures(extras: ClipEvalExtras, output_dir: str | os.PathLike, split: str | None = None) -> list[Path]:
    """confusion_matrix.png (row-normalised; held-out classes marked with *) and similarity_matrix.png."""
    output_dir = Path(output_dir)
    where = f" ({split})" if split else ""
    paths = []
    if extras.confusion is not None:
        counts = extras.confusion.double()
        rates = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)  # recall of each true class on the diagonal
        names = [f"{name} *" if name in extras.heldout_classes else name for name in extras.classnames]
        note = ", * held out" if extras.heldout_classes else ""
        paths.append(
            heatmap_png(
                rates,
                names,
                names,
                output_dir / "confusion_matrix.png",
                f"zero-shot confusion{where}, rows normalised{note}",
                vmin=0.0,
                vmax=1.0,
                xlabel="predicted class",
                ylabel="true class",
            )
        )
    m = extras.similarity.shape[0]
    paths.append(
        heatmap_png(
            extras.similarity,
            extras.similarity_captions,
            extras.similarity_captions,
            output_dir / "similarity_matrix.png",
            f"image-text cosine similarity, first {m} items{where}",
            xlabel="caption",
            ylabel="image",
        )
    )
    return paths


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = eval_parser("clipcond eval clip", DESCRIPTION, model="CLIP folder (written by `clipcond train clip`)")
    parser.add_argument(
        "--split", default="test", help="split folder to evaluate (default test); 'none' for data without splits"
    )
    parser.add_argument(
        "--templates", metavar="FILE", help="zero-shot templates, one per line, each with one '{}' (default: built in)"
    )
    parser.add_argument("--batch-size", type=int, default=256, help="images (and captions) per batch (default 256)")
    parser.add_argument("--max-images", type=int, metavar="N", help="evaluate the first N images only")
    parser.add_argument("--num-workers", type=int, default=0, help="data loading processes (default 0)")
    add_output_arguments(parser, output_dir="where metrics.json and the PNGs go (default RUN/eval)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # 1. check the inputs before the slow loads
    for flag, path in (("--model", args.model), ("--data", args.data)):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{flag} {path!r} does not exist")
    output_dir = Path(args.output_dir) if args.output_dir else Path(args.model) / "eval"
    check_output_dir(output_dir)
    templates = load_templates(args.templates) if args.templates else list(DEFAULT_TEMPLATES)
    split = None if args.split.lower() == "none" else args.split

    # 2. load the model and the data at the model's resolution
    clip_run = load_clip(args.model, device=resolve_device(args.device), progress=not args.no_progress)
    dataset = ImageCaptionDataset(
        args.data, split=split, resolution=clip_run.image_size, allow_outside_paths=args.allow_outside_paths
    )
    info = getattr(dataset, "info", None) or {}

    # 3. evaluate, then write the metrics and figures and print the metrics
    metrics, extras = evaluate_clip(
        clip_run,
        dataset,
        templates=templates,
        held_out=info.get("held_out"),
        batch_size=args.batch_size,
        max_images=args.max_images,
        num_workers=args.num_workers,
        progress=not args.no_progress,
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output_dir / "metrics.json", finite_or_null(metrics))
    write_figures(extras, output_dir, split)
    print(dumps_json(finite_or_null(metrics), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
