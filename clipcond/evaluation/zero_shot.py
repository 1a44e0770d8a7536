"""Zero-shot classification with a CLIP: class names turned into text classifiers by prompt ensembling.

Each class name is put into every template ("a photo of a {}."), the prompts are embedded, and the normalised
embeddings are averaged and renormalised into one class vector (Radford et al. 2021, "Learning Transferable Visual
Models From Natural Language Supervision", sec. 3.1.4; open_clip's `build_zero_shot_classifier` does the same).
An image is assigned the class whose vector has the largest cosine with its embedding.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from clipcond.evaluation.retrieval import normalize_caption

# Generic templates: nothing in them names a colour, a shape or a position, so they suit any "colour shape" label
# (and most other labels). "a small {}." and "a large {}." cancel each other's size bias in the average.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a {}.",
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a drawing of a {}.",
    "a small {}.",
    "a large {}.",
)


def check_templates(templates: Sequence[str]) -> list[str]:
    """The templates as a list, after checking that there is at least one and that each has exactly one "{}"."""
    if isinstance(templates, str):
        raise ValueError(f"`templates` must be a list of strings, got the single string {templates!r}")
    templates = list(templates)
    if not templates:
        raise ValueError("`templates` is empty; give at least one template such as 'a photo of a {}.'")
    for template in templates:
        if not isinstance(template, str) or template.count("{}") != 1:
            raise ValueError(
                f"zero-shot template {template!r} must contain exactly one '{{}}' (where the class name goes)"
            )
    return templates


def load_templates(path: str | os.PathLike) -> list[str]:
    """Templates from a text file, one per line (blank lines skipped, surrounding whitespace stripped)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"templates file {path!r} does not exist; expected one template with '{{}}' per line")
    with open(path, encoding="utf-8") as f:
        templates = [line.strip() for line in f if line.strip()]
    if not templates:
        raise ValueError(f"templates file {path!r} holds no template; expected one template with '{{}}' per line")
    return check_templates(templates)


@torch.no_grad()
def build_zero_shot_classifier(
    encode_text: Callable[[list[str]], torch.Tensor], classnames: Sequence[str], templates: Sequence[str]
) -> torch.Tensor:
    """Class vectors (C, D), unit norm, by prompt ensembling over `templates`.

    `encode_text` maps a list of strings to embeddings (N, D); they need not be normalised, each prompt's embedding
    is normalised before the average. All C * T prompts go to `encode_text` in one call (it batches them).
    """
    templates = check_templates(templates)
    classnames = list(classnames)
    if not classnames:
        raise ValueError("`classnames` is empty; zero-shot classification needs at least one class")
    prompts = [template.replace("{}", name) for name in classnames for template in templates]  # class-major
    embeddings = encode_text(prompts)
    if embeddings.shape[0] != len(prompts):
        raise ValueError(f"`encode_text` returned {embeddings.shape[0]} embeddings for {len(prompts)} prompts")
    embeddings = F.normalize(embeddings.float(), dim=-1).view(len(classnames), len(templates), -1)  # (C, T, D)
    return F.normalize(embeddings.mean(dim=1), dim=-1)  # (C, D)


@torch.no_grad()
def zero_shot_predict(image_features: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """Predicted class index (N,) of each image: the class vector with the highest cosine."""
    if image_features.shape[-1] != classifier.shape[-1]:
        raise ValueError(
            f"image features have width {image_features.shape[-1]} but the classifier {classifier.shape[-1]}"
        )
    logits = image_features.float() @ classifier.to(image_features.device, torch.float32).T  # (N, C)
    return logits.argmax(dim=-1)


def confusion_matrix(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts (C, C), int64 on the CPU: row = true class, column = predicted class."""
    predictions, targets = _check_predictions(predictions, targets, num_classes)
    flat = targets * num_classes + predictions
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def held_out_groups(classnames: Sequence[str], held_out: Sequence[str] | None) -> dict[str, list[int]] | None:
    """The indices of the seen and of the held-out classes among `classnames` (`{"seen", "heldout"}`, for
    `zero_shot_metrics`); a class is held out when its name is a held-out "colour shape" pair (compared as
    normalised captions). None without a held-out list."""
    if held_out is None:
        return None
    held = {normalize_caption(pair) for pair in held_out}
    heldout = [c for c, name in enumerate(classnames) if normalize_caption(name) in held]
    return {"seen": [c for c in range(len(classnames)) if c not in heldout], "heldout": heldout}


def zero_shot_metrics(
    predictions: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int,
    groups: dict[str, Sequence[int]] | None = None,
) -> dict[str, float | None]:
    """Top-1 accuracy, balanced accuracy and top-1 within groups of classes.

    Returns `{"top1", "balanced", "top1_<group>" for each group}`. Balanced accuracy is the mean per-class recall
    over the classes that have at least one image (a class without images has no recall). `groups` maps a name to
    class indices; a group's top-1 is the accuracy on the images whose true class is in the group, None when the
    group has no image.
    """
    predictions, targets = _check_predictions(predictions, targets, num_classes)
    if targets.numel() == 0:
        raise ValueError("zero-shot metrics need at least one image; got empty `predictions` and `targets`")
    counts = confusion_matrix(predictions, targets, num_classes)
    support = counts.sum(dim=1)  # images per true class
    present = support > 0
    recall = counts.diagonal()[present].double() / support[present].double()
    correct = predictions == targets
    metrics: dict[str, float | None] = {
        "top1": correct.double().mean().item(),
        "balanced": recall.mean().item(),
    }
    for name, class_indices in (groups or {}).items():
        members = torch.zeros(num_classes, dtype=torch.bool)
        for index in class_indices:
            if not 0 <= int(index) < num_classes:
                raise ValueError(f"group {name!r} names class {index}, outside [0, {num_classes})")
            members[int(index)] = True
        in_group = members[targets]
        metrics[f"top1_{name}"] = correct[in_group].double().mean().item() if in_group.any() else None
    return metrics


def _check_predictions(
    predictions: torch.Tensor, targets: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    predictions = torch.as_tensor(predictions).long().cpu().flatten()
    targets = torch.as_tensor(targets).long().cpu().flatten()
    if predictions.shape != targets.shape:
        raise ValueError(f"`predictions` has {predictions.numel()} entries but `targets` {targets.numel()}")
    if num_classes < 1:
        raise ValueError(f"`num_classes` must be >= 1, got {num_classes}")
    for name, values in (("predictions", predictions), ("targets", targets)):
        if values.numel() and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(
                f"`{name}` holds class indices in [{values.min().item()}, {values.max().item()}], "
                f"outside [0, {num_classes})"
            )
    return predictions, targets
