"""`clipcond eval prior`: how close a DALL-E 2 prior's image embeddings come to the true ones, beside baselines.

    clipcond eval prior --model runs/prior --data data/shapes [--split test] [--guidance-scale 4] [--max-captions N]

prints one JSON object (the keys of `METRIC_KEYS`). For each item of the split, the prior samples an image embedding
from the item's caption (fixed seeds), which is compared with the true CLIP image embedding of the item's image:

- `cosine_predicted`: mean cosine between the predicted and the true image embedding;
- `cosine_text_baseline`: the same for the caption's own CLIP text embedding, what an unCLIP decoder would be fed
  without a prior (Ramesh et al. 2022, sec. 5.1 compare against it);
- `cosine_random_baseline`: the same for the true embedding of another image of the split (a fixed random
  derangement), what a prior that ignored the caption could reach at best in expectation;
- zero-shot top-1 of the predicted embeddings under the CLIP's zero-shot classifier (prompt ensembling over the
  split's labels), on the single-object captions (the items with a label), for seen and held-out compositions
  apart, beside the same for the true image embeddings, the ceiling.

The seen / held-out split of the cosines uses the metadata's `heldout` column where present (the shapes data).
`evaluate_prior` is the same evaluation as a function; training validation and benchmarks call it.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from clipcond.conditioning import ImageEmbeddingCache, embed_images
from clipcond.device import resolve_device
from clipcond.evaluation.arguments import add_output_arguments, check_at_least, eval_parser
from clipcond.evaluation.zero_shot import (
    DEFAULT_TEMPLATES,
    build_zero_shot_classifier,
    check_templates,
    held_out_groups,
    load_templates,
    zero_shot_metrics,
    zero_shot_predict,
)
from clipcond.finite import finite_float, finite_or_null
from clipcond.pipelines.inputs import DEFAULT_PRIOR_GUIDANCE_SCALE, DEFAULT_PRIOR_INFERENCE_STEPS
from clipcond.runs import RUN_RECORD, RunRecord
from clipcond.storage import check_output_dir, dumps_json, write_json_atomic
from clipcond.text_encoding import encode_prompts

logger = logging.getLogger(__name__)

# The stable interface of the printed JSON, in the order printed.
METRIC_KEYS = (
    "cosine_predicted",
    "cosine_text_baseline",
    "cosine_random_baseline",
    "cosine_predicted_seen",
    "cosine_predicted_heldout",
    "zero_shot_top1_predicted",
    "zero_shot_top1_predicted_seen",
    "zero_shot_top1_predicted_heldout",
    "zero_shot_top1_true_image",
    "zero_shot_top1_true_image_seen",
    "zero_shot_top1_true_image_heldout",
    "num_captions",
    "num_zero_shot_captions",
    "num_classes",
    "guidance_scale",
    "num_inference_steps",
)


# The command's description in `--help`.
DESCRIPTION = """Evaluate a DALL-E 2 prior run: the mean cosine between the image embedding it samples for each caption
of a split and the true CLIP image embedding of the caption's image, beside the caption's text embedding and a random
other image as baselines; and zero-shot top-1 of the predicted embeddings (single-object captions; seen and held-out
compositions apart) beside the true embeddings' ceiling. Prints one JSON object and writes it to --output-dir.
"""


@torch.no_grad()
def _encode_text(pipe, texts: list[str], batch_size: int) -> torch.Tensor:
    """L2-normalised CLIP text embeddings (N, D) with the pipeline's frozen text encoder."""
    chunks = []
    for start in range(0, len(texts), batch_size):
        text = encode_prompts(pipe.text_encoder, pipe.tokenizer, texts[start : start + batch_size])
        chunks.append(F.normalize(text.pooled.float(), dim=-1).cpu())
    return torch.cat(chunks)


def random_derangement(n: int, seed: int = 0) -> torch.Tensor:
    """A fixed random permutation (n,) without fixed points (n >= 2): a random cycle through all items."""
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 items, got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    other = torch.empty(n, dtype=torch.long)
    other[order] = order.roll(-1)
    return other


@torch.no_grad()
def predict_image_embeddings(
    pipe,
    captions: list[str],
    *,
    guidance_scale: float = DEFAULT_PRIOR_GUIDANCE_SCALE,
    num_inference_steps: int = DEFAULT_PRIOR_INFERENCE_STEPS,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = False,
) -> torch.Tensor:
    """One sampled image embedding (N, D) per caption, caption i from a generator seeded `seed + i`, so the result
    does not depend on `batch_size`."""
    chunks = []
    for start in tqdm(
        range(0, len(captions), batch_size), desc="sampling embeddings", disable=not progress, leave=False
    ):
        chunk = captions[start : start + batch_size]
        generators = [torch.Generator().manual_seed(seed + start + k) for k in range(len(chunk))]
        out = pipe(
            chunk,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generators,
            output_type="pt",
        )
        chunks.append(out.image_embeds.float().cpu())
    return torch.cat(chunks)


def _mean(values: torch.Tensor) -> float | None:
    return values.mean().item() if values.numel() else None


@torch.no_grad()
def evaluate_prior(
    pipe,
    dataset,
    *,
    image_cache: ImageEmbeddingCache | None = None,
    vision_model=None,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    guidance_scale: float = DEFAULT_PRIOR_GUIDANCE_SCALE,
    num_inference_steps: int = DEFAULT_PRIOR_INFERENCE_STEPS,
    max_captions: int | None = None,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    held_out: Sequence[str] | None = None,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = False,
) -> dict:
    """The prior's image embeddings against the true ones and the baselines (see the module); prints nothing.

    Args:
        pipe: a `PriorPipeline` (anything with `text_encoder`, `tokenizer` and a `__call__` returning
            `image_embeds`).
        dataset: an `ImageCaptionDataset` of the split (its `labels` give the zero-shot classes, its `info` the
            held-out pairs, its `records` the `heldout` flags).
        image_cache: the true image embeddings of `dataset` (an `ImageEmbeddingCache` of it); without one they are
            computed with `vision_model` (`clipcond.models.clip.load_vision_tower`), `image_mean` and `image_std`.
        max_captions: evaluate the first N items only (the zero-shot classes stay those of the whole split).
        held_out: held-out "colour shape" pairs; None: `dataset.info["held_out"]` when present.
        seed: item i is sampled with a generator seeded `seed + i`; the random baseline's derangement uses `seed`.
    """
    templates = check_templates(templates)
    if max_captions is not None and max_captions < 1:
        raise ValueError(f"`max_captions` must be >= 1 (or None for all), got {max_captions}")
    n = len(dataset) if max_captions is None else min(len(dataset), max_captions)
    if n < 2:
        raise ValueError(f"the evaluation needs at least 2 items (the random baseline pairs them), got {n}")

    # 1. the true image embeddings and, for each row, the item it came from (an unreadable image's substitute)
    if image_cache is None:
        if vision_model is None or image_mean is None or image_std is None:
            raise ValueError("give `image_cache`, or `vision_model` with `image_mean` and `image_std`")
        image_cache = ImageEmbeddingCache(
            *_embed_first(vision_model, dataset, n, image_mean, image_std, batch_size, progress)
        )
    if len(image_cache) < n:
        raise ValueError(f"`image_cache` holds {len(image_cache)} rows for a data set of {len(dataset)} items")
    true = F.normalize(image_cache.lookup(torch.arange(n)), dim=-1)  # (n, D)
    items = image_cache.item_indices[:n].tolist()

    # 2. predicted embeddings, and their cosines to the true ones beside the baselines'
    captions = [dataset.captions[j] for j in items]
    predicted = predict_image_embeddings(
        pipe,
        captions,
        guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps,
        seed=seed,
        batch_size=batch_size,
        progress=progress,
    )  # (n, D)
    if predicted.shape != true.shape:
        raise ValueError(f"the prior gives embeddings of shape {tuple(predicted.shape)}, the CLIP {tuple(true.shape)}")
    metrics: dict = dict.fromkeys(METRIC_KEYS)
    metrics.update(_cosines(pipe, predicted, true, captions, _heldout_flags(dataset, items), seed, batch_size))

    # 3. zero-shot classification of the labelled (single-object) items, over the labels of the whole split
    labels = [dataset.labels[j] for j in items] if getattr(dataset, "labels", None) else [""] * n
    encode = functools.partial(_encode_text, pipe, batch_size=batch_size)
    metrics.update(_zero_shot_figures(encode, dataset, labels, predicted, true, templates, held_out))
    metrics.update(num_captions=n, guidance_scale=float(guidance_scale), num_inference_steps=num_inference_steps)
    return metrics


def _heldout_flags(dataset, items: list[int]) -> list[bool] | None:
    """Whether each item is a held-out composition, from the metadata's `heldout` column (None without one)."""
    records = getattr(dataset, "records", None)
    return [bool(records[j].get("heldout")) for j in items] if records and "heldout" in records[0] else None


def _cosines(pipe, predicted, true, captions: list[str], heldout_flags: list[bool] | None, seed: int, batch_size: int):
    """Mean cosine of the predicted (N, D) and true (N, D) image embeddings, of the captions' text embeddings and
    of another item's true embedding (a fixed derangement) to the true ones; the predicted ones' for the seen and
    the held-out items apart when `heldout_flags` tells them apart."""
    unique = list(dict.fromkeys(captions))
    text_of_unique = _encode_text(pipe, unique, batch_size)
    position = {caption: i for i, caption in enumerate(unique)}
    text = text_of_unique[torch.tensor([position[c] for c in captions])]  # (N, D)
    cos_predicted = (predicted * true).sum(-1)  # (N,)
    figures = {
        "cosine_predicted": cos_predicted.mean().item(),
        "cosine_text_baseline": (text * true).sum(-1).mean().item(),
        "cosine_random_baseline": (true[random_derangement(len(true), seed)] * true).sum(-1).mean().item(),
    }
    if heldout_flags is not None:
        flags = torch.tensor(heldout_flags)
        figures["cosine_predicted_seen"] = _mean(cos_predicted[~flags])
        figures["cosine_predicted_heldout"] = _mean(cos_predicted[flags])
    return figures


def _zero_shot_figures(encode, dataset, labels: list[str], predicted, true, templates, held_out) -> dict:
    """Zero-shot top-1 of the predicted and of the true image embeddings of the labelled items (`labels`, "" for
    none) over the classes of the whole split, for the seen and held-out classes apart when `held_out` (default:
    the data set's) names them; and how many items and classes that was."""
    split_labels = list(getattr(dataset, "labels", None) or [])
    classnames = sorted({label for label in [*split_labels, *labels] if label})
    labelled = [i for i, label in enumerate(labels) if label]
    figures = {"num_zero_shot_captions": len(labelled), "num_classes": len(classnames) if labelled else 0}
    if not labelled:
        return figures
    if held_out is None:
        held_out = (getattr(dataset, "info", None) or {}).get("held_out")
    classifier = build_zero_shot_classifier(encode, classnames, templates)  # (C, D)
    class_index = {name: c for c, name in enumerate(classnames)}
    targets = torch.tensor([class_index[labels[i]] for i in labelled])
    groups = held_out_groups(classnames, held_out)
    for name, embeds in (("predicted", predicted), ("true_image", true)):
        scores = zero_shot_metrics(zero_shot_predict(embeds[labelled], classifier), targets, len(classnames), groups)
        figures[f"zero_shot_top1_{name}"] = scores["top1"]
        if groups is not None:
            figures[f"zero_shot_top1_{name}_seen"] = scores["top1_seen"]
            figures[f"zero_shot_top1_{name}_heldout"] = scores["top1_heldout"]
    return figures


def _embed_first(vision_model, dataset, n, image_mean, image_std, batch_size, progress):
    """The arguments of an in-memory `ImageEmbeddingCache` of the first n items of `dataset`."""
    subset = torch.utils.data.Subset(dataset, range(n))
    embeddings, item_indices, skipped = embed_images(
        vision_model, subset, image_mean=image_mean, image_std=image_std, batch_size=batch_size, progress=progress
    )
    return embeddings, item_indices, "in-memory", Path(os.devnull), skipped


# ------------------------------------------------------------------------------------------------------ the CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = eval_parser("clipcond eval prior", DESCRIPTION, model="prior run folder (`clipcond train prior`)")
    parser.add_argument("--split", default="test", help="split folder to evaluate (default test)")
    parser.add_argument(
        "--clip",
        metavar="CLIP_RUN",
        help="the CLIP whose image encoder gives the true embeddings (default: the one the prior was trained on, "
        "from RUN/clipcond_run.json)",
    )
    parser.add_argument(
        "--guidance-scale",
        type=finite_float,
        default=DEFAULT_PRIOR_GUIDANCE_SCALE,
        help=f"classifier-free guidance weight (default {DEFAULT_PRIOR_GUIDANCE_SCALE})",
    )
    parser.add_argument(
        "--num-inference-steps",
        type=int,
        default=DEFAULT_PRIOR_INFERENCE_STEPS,
        help=f"denoising steps (default {DEFAULT_PRIOR_INFERENCE_STEPS})",
    )
    parser.add_argument("--max-captions", type=int, metavar="N", help="evaluate the first N items only")
    parser.add_argument("--seed", type=int, default=0, help="item i is sampled with seed + i (default 0)")
    parser.add_argument(
        "--templates", metavar="FILE", help="zero-shot templates, one per line, each with one '{}' (default: built in)"
    )
    parser.add_argument("--batch-size", type=int, default=256, help="captions per prior batch (default 256)")
    parser.add_argument("--cache-dir", metavar="DIR", help="image-embedding cache folder (default RUN/cache)")
    parser.add_argument(
        "--allow-clip-mismatch",
        action="store_true",
        help="evaluate with a --clip other than the one the prior was trained on (recorded in the metrics)",
    )
    add_output_arguments(parser, output_dir="where metrics.json goes (default RUN/eval)")
    args = parser.parse_args(argv)
    check_at_least(args, 1, "num_inference_steps", "batch_size")
    check_at_least(args, 0, "guidance_scale")
    return args


def _lineage_clip(run: Path) -> str:
    record = RunRecord.read_if_present(run)
    if record is None:
        raise FileNotFoundError(f"`--model` {str(run)!r} has no {RUN_RECORD} naming its CLIP; pass --clip CLIP_RUN")
    if not record.clip_path:
        raise ValueError(f"{record.path} names no CLIP (no clip.path); pass --clip CLIP_RUN")
    return record.clip_path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # 1. check the inputs before the slow loads
    run = Path(args.model)
    for flag, path in (("--model", args.model), ("--data", args.data)):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{flag} {path!r} does not exist")
    if not (run / "model_index.json").is_file():
        raise FileNotFoundError(
            f"`--model` {str(run)!r} holds no model_index.json; pass the output folder of `clipcond train prior`"
        )
    output_dir = Path(args.output_dir) if args.output_dir else run / "eval"
    check_output_dir(output_dir)
    templates = load_templates(args.templates) if args.templates else list(DEFAULT_TEMPLATES)
    clip = args.clip or _lineage_clip(run)

    # 2. load the prior pipeline, the frozen image encoder, the data at the encoder's resolution
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as hf_logging

    from clipcond.data.folders import ImageCaptionDataset
    from clipcond.lineage import check_evaluation_clip
    from clipcond.models.clip import load_vision_tower
    from clipcond.pipelines.prior import PriorPipeline

    device = resolve_device(args.device)
    hf_logging.disable_progress_bar()  # "Loading weights" bars
    diffusers_logging.disable_progress_bar()  # "Loading pipeline components" bar
    pipe = PriorPipeline.from_pretrained(run).to(device)
    pipe.set_progress_bar_config(disable=True)
    vision_model, image_mean, image_std = load_vision_tower(clip, what="--clip")
    vision_model.to(device)
    record = RunRecord.read_if_present(run)
    trained_on = None if record is None else record.clip_hash
    mismatch = check_evaluation_clip(clip, trained_on, what="the prior", allow=args.allow_clip_mismatch)
    dataset = ImageCaptionDataset(
        args.data,
        split=args.split,
        resolution=vision_model.config.image_size,
        allow_outside_paths=args.allow_outside_paths,
    )
    cache = ImageEmbeddingCache.build_or_load(
        vision_model,
        dataset,
        Path(args.cache_dir) if args.cache_dir else run / "cache",
        image_mean=image_mean,
        image_std=image_std,
        batch_size=args.batch_size,
        device=device,
        progress=not args.no_progress,
    )

    # 3. evaluate, write and print
    metrics = evaluate_prior(
        pipe,
        dataset,
        image_cache=cache,
        guidance_scale=args.guidance_scale,
        num_inference_steps=args.num_inference_steps,
        max_captions=args.max_captions,
        templates=templates,
        seed=args.seed,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    metrics["clip"] = {"path": str(clip), "mismatch": mismatch}
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output_dir / "metrics.json", finite_or_null(metrics))
    print(dumps_json(finite_or_null(metrics), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
