"""The core of the judged evaluations: `clipcond eval generation` (`clipcond.evaluation.generation`) and `clipcond
eval unclip` (`clipcond.evaluation.unclip`).

Both draw images from per-image seeded generators (`derived_seed`, `draw_seeded`), judge each one with the attribute
judge (`clipcond.evaluation.judge`) against the colour and shape it should show, and report accuracies over all
images, the seen compositions and the held-out ones (`GROUPS`, `group_masks`, `accuracy_figures`), per class
(`per_class_table`) and as grids whose frames say how many attributes each image got right (`judged_tile`). Their
commands share the inputs too: the shapes data's info and palette, the CLIP a decoder was trained on and the
reference images of a split (their command-line arguments: `clipcond.evaluation.arguments`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipcond.data.shapes import is_shapes_data, load_dataset_info
from clipcond.evaluation.frechet import FeatureFn
from clipcond.evaluation.judge import AttributeJudge, JudgeScores
from clipcond.models.clip_pixels import resize_images
from clipcond.runs import RUN_RECORD, RunRecord

logger = logging.getLogger(__name__)

GROUPS = ("", "_seen", "_heldout")  # the suffixes of the figures: all images, seen compositions, held-out ones
FRAME = {2: (40, 170, 60), 1: (250, 150, 30), 0: (220, 30, 30)}  # a tile's frame by the attributes judged right
SOURCE_FRAME = (255, 255, 255)  # an unjudged tile (the source of variations)


# ---------------------------------------------------------------- seeds and drawing


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from `parts` ("clipcond-eval-generation", seed, prompt, index): the same for the same parts,
    whatever the batch size and whatever else is evaluated."""
    digest = hashlib.sha256("/".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def to_uint8_images(images) -> torch.Tensor:
    """A pipeline's images ("pt" float (B, 3, H, W) or "np" float (B, H, W, 3) in [0, 1], PIL list, or uint8) as a
    uint8 tensor (B, 3, H, W) on the CPU."""
    if isinstance(images, (list, tuple)) and images and isinstance(images[0], Image.Image):
        images = np.stack([np.asarray(image.convert("RGB")) for image in images])  # (B, H, W, 3) uint8
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
        if images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
            images = images.permute(0, 3, 1, 2)
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError(f"expected images (B, 3, H, W), got {type(images).__name__} {getattr(images, 'shape', '')}")
    images = images.detach().cpu()
    if images.is_floating_point():
        images = (images.float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    if images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 or float images, got {images.dtype}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images.contiguous()


def call_pipeline(pipe, generators: Sequence[torch.Generator], **kwargs) -> torch.Tensor:
    """One image per input row from a diffusers pipeline with the standard arguments, image i drawn from
    `generators[i]`: uint8 (B, 3, H, W). `kwargs` are the pipeline's own (prompt or image, steps, guidance...)."""
    output = pipe(**kwargs, num_images_per_prompt=1, generator=list(generators), output_type="pt")
    return to_uint8_images(output.images)


def check_image_batch(images, expected: int, what: str, per: str) -> None:
    """Refuse anything but `expected` uint8 images (expected, 3, H, W) from `what` (a generate/vary callable)."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(
            f"{what} must return uint8 images (B, 3, H, W), got {type(images).__name__} "
            f"{getattr(images, 'dtype', '')} {tuple(getattr(images, 'shape', ()))}"
        )
    if images.shape[0] != expected or images.shape[1] != 3:
        raise ValueError(
            f"{what} returned images of shape {tuple(images.shape)} for {per}; expected ({expected}, 3, H, W)"
        )


def draw_seeded(
    draw: Callable[[list, list[torch.Generator]], torch.Tensor],
    jobs: list,
    seed_of: Callable[[object], int],
    batch_size: int,
    bar,
    what: str,
    per: Callable[[int], str],
) -> torch.Tensor:
    """uint8 images (len(jobs), 3, H, W): `draw(batch, generators)` over the jobs in batches, job j from a CPU
    generator seeded `seed_of(j)`, each batch checked (`what` names the callable, `per(n)` the batch of n jobs)."""
    chunks = []
    for first in range(0, len(jobs), batch_size):
        batch = jobs[first : first + batch_size]
        generators = [torch.Generator("cpu").manual_seed(seed_of(job)) for job in batch]
        images = draw(batch, generators)
        check_image_batch(images, len(batch), what, per(len(batch)))
        chunks.append(images.cpu())
        bar.update(len(batch))
    return torch.cat(chunks)


def clip_image_features(clip_run, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """L2-normalised CLIP features (N, D) of uint8 images, resized to the CLIP's input size if needed."""
    chunks = [
        clip_run.encode_images(resize_images(images[start : start + batch_size], clip_run.image_size)).cpu()
        for start in range(0, images.shape[0], batch_size)
    ]
    return torch.cat(chunks)


def frechet_extractors(clip_run, inception: FeatureFn | None, batch_size: int) -> dict[str, FeatureFn]:
    """The feature spaces of an evaluation's Fréchet distances (`FrechetSpaces`): the run's CLIP image space
    ("clip", `clip_image_features`) when there is a CLIP, and Inception-v3 pool3 ("inception",
    `clipcond.evaluation.inception.InceptionFeatures`) when given."""
    extractors: dict[str, FeatureFn] = {}
    if clip_run is not None:
        extractors["clip"] = partial(clip_image_features, clip_run, batch_size=batch_size)
    if inception is not None:
        extractors["inception"] = inception
    return extractors


# ---------------------------------------------------------------- classes and groups


def class_pairs(names: Sequence[str], judge: AttributeJudge, what: str = "class", note: str = "") -> list:
    """The (colour, shape) of each "colour shape" name, refusing a name the judge cannot tell (`what` names it in
    the message, `note` ends it)."""
    pairs = []
    for name in names:
        words = str(name).split()
        if len(words) != 2 or words[0] not in judge.colours or words[1] not in judge.shapes:
            raise ValueError(
                f"{what} {name!r} is not '<colour> <shape>' with a colour in {', '.join(judge.colours)} and a shape "
                f"in {', '.join(judge.shapes)}{note}"
            )
        pairs.append((words[0], words[1]))
    return pairs


def check_counts(**counts: object) -> None:
    """Refuse a count (images per prompt, batch size, ...) that is not an integer >= 1, naming the argument."""
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}")


def group_masks(is_heldout: torch.Tensor) -> dict[str, torch.Tensor]:
    """The image masks of `GROUPS` from a (N,) bool tensor that marks the held-out compositions."""
    return {"": torch.ones(len(is_heldout), dtype=torch.bool), "_seen": ~is_heldout, "_heldout": is_heldout}


def mean_or_none(values: torch.Tensor, mask: torch.Tensor) -> float | None:
    """The mean of `values` where `mask` holds, in float64; None over no value."""
    return values[mask].double().mean().item() if bool(mask.any()) else None


def accuracy_figures(
    colour_ok: torch.Tensor, shape_ok: torch.Tensor, groups: dict[str, torch.Tensor], prefix: str = ""
) -> dict[str, float | None]:
    """Colour, shape and both-correct accuracy of each group's images, keyed "<prefix><metric><group>"."""
    figures = {}
    for group, mask in groups.items():
        figures[f"{prefix}colour_accuracy{group}"] = mean_or_none(colour_ok, mask)
        figures[f"{prefix}shape_accuracy{group}"] = mean_or_none(shape_ok, mask)
        figures[f"{prefix}both_accuracy{group}"] = mean_or_none(colour_ok & shape_ok, mask)
    return figures


def outcome_figures(scores: JudgeScores, groups: dict[str, torch.Tensor]) -> dict[str, dict | None]:
    """What the judge saw in each group's images ("all", "seen", "heldout"): the shares of its outcomes."""
    return {group.lstrip("_") or "all": scores.outcome_shares(mask) for group, mask in groups.items()}


def per_class_table(
    names: Sequence[str],
    held: Sequence[str],
    image_classes: Sequence[str],
    scores: JudgeScores,
    extra: dict[str, torch.Tensor | None] | None = None,
) -> dict[str, dict]:
    """The figures of each class in `names` over the images whose class (`image_classes`, one per image) it is:
    held out or not, the accuracies, the mean of each per-image `extra` value (None for a None tensor), and what
    the judge saw in them, most frequent first."""
    table = {}
    for name in names:
        mask = torch.tensor([image_class == name for image_class in image_classes], dtype=torch.bool)
        table[name] = {
            "heldout": name in held,
            "colour_accuracy": mean_or_none(scores.colour_correct, mask),
            "shape_accuracy": mean_or_none(scores.shape_correct, mask),
            "both_accuracy": mean_or_none(scores.both_correct, mask),
            **{key: None if values is None else mean_or_none(values, mask) for key, values in (extra or {}).items()},
            "judged": scores.judged_counts(mask),
        }
    return table


# ---------------------------------------------------------------- grids


def framed(image: torch.Tensor, colour: tuple[int, int, int], width: int = 2) -> Image.Image:
    """A uint8 image (3, H, W) in a frame of `colour`, `width` pixels wide, as a PIL image."""
    array = image.permute(1, 2, 0).numpy()  # (H, W, 3)
    out = np.empty((array.shape[0] + 2 * width, array.shape[1] + 2 * width, 3), dtype=np.uint8)
    out[:] = colour
    out[width:-width, width:-width] = array
    return Image.fromarray(out, "RGB")


def judged_tile(image: torch.Tensor, scores: JudgeScores, i: int) -> Image.Image:
    """Image i of a judged batch, framed green / orange / red for 2 / 1 / 0 attributes right (`FRAME`)."""
    right = int(scores.colour_correct[i]) + int(scores.shape_correct[i])
    return framed(image, FRAME[right])


# ---------------------------------------------------------------- the commands' inputs


def shapes_info(data: str | os.PathLike, what: str = "`--data`") -> dict:
    """The dataset_info.json of the shapes data at `data`; a ValueError naming `what` for other data."""
    info = load_dataset_info(data)
    if not is_shapes_data(info):
        found = "has no dataset_info.json" if info is None else f"holds the data set {info.get('name')!r}"
        raise ValueError(
            f"{what} {str(data)!r} {found}: this evaluation needs the built-in shapes data "
            "(`clipcond data shapes OUT`), whose colour-shape classes the attribute judge knows"
        )
    return info


def check_palette(info: dict, judge: AttributeJudge) -> None:
    """The data's colours (with their RGB) and shapes must be those the judge was trained to tell apart."""
    known = judge.info.get("colours", {})
    for name, rgb in (info.get("colours") or {}).items():
        if name not in judge.colours or (known and list(known.get(name, [])) != list(rgb)):
            raise ValueError(
                f"the data's colour {name!r} {list(rgb)} is not one the judge knows ({known or judge.colours}); "
                "this evaluation needs the built-in shapes palette"
            )
    for shape in info.get("shapes") or []:
        if shape not in judge.shapes:
            raise ValueError(f"the data's shape {shape!r} is not one the judge knows ({', '.join(judge.shapes)})")


def resolve_clip_path(run: Path, override: str | None) -> tuple[Path, str | None]:
    """The CLIP run of a decoder run (`--clip` when given) and the content hash of the CLIP it was trained on (None
    when its run record names none)."""
    record = RunRecord.read_if_present(run)
    clip_hash = None if record is None else record.clip_hash
    if override is not None:
        if not os.path.isdir(override):
            raise FileNotFoundError(f"`--clip` {override!r} does not exist")
        return Path(override), clip_hash
    record_path = run / RUN_RECORD
    if record is None:
        raise FileNotFoundError(
            f"{record_path} does not exist, so the CLIP run of `--model` {str(run)!r} is unknown; pass `--clip PATH`"
        )
    if not record.clip_path:
        raise ValueError(f"{record_path} has no clip.path; pass `--clip PATH`")
    recorded = Path(record.clip_path)
    # A relative path was relative to where training ran; try there (the current folder), then beside the run.
    for candidate in (recorded, run / recorded, run.parent / recorded):
        if candidate.is_dir():
            return candidate, clip_hash
    raise FileNotFoundError(
        f"the CLIP run {str(recorded)!r} named in {record_path} does not exist (tried it from the current folder and "
        f"from {run}); pass `--clip PATH`"
    )


def load_reference_images(
    data: str, split: str, resolution: int, *, allow_outside_paths: bool = False
) -> tuple[torch.Tensor, list[str]]:
    """The split's readable single-object images (those with a label), uint8 (N, 3, R, R) at `resolution`, and the
    paths of the single-object files that could not be read (or lie outside the data folder, see
    `ImageCaptionDataset`): those are left out and counted (the data set's stand-in for one, the next readable
    image, would count twice)."""
    from clipcond.data.folders import ImageCaptionDataset

    dataset = ImageCaptionDataset(data, split=split, resolution=resolution, allow_outside_paths=allow_outside_paths)
    images, unreadable = [], []
    for i in range(len(dataset)):
        if not dataset.labels[i]:
            continue  # not a single-object image: not a reference whether it reads or not
        item = dataset[i]
        if item["index"] != i:  # the data set's stand-in for an unreadable file
            unreadable.append(str(dataset.image_paths[i]))
        else:
            images.append(item["pixel_values"])
    if unreadable:
        logger.warning("%d unreadable image(s) in split %r left out, e.g. %s", len(unreadable), split, unreadable[0])
    if len(images) < 2:
        raise ValueError(
            f"split {split!r} of {data} has {len(images)} readable single-object image(s); the Fréchet distance "
            "needs >= 2"
        )
    return torch.stack(images), unreadable


def load_clip_and_reference(
    clip_path: str | os.PathLike, data: str | os.PathLike, split: str, device, *, allow_outside_paths: bool = False
) -> tuple[object, torch.Tensor, list[str]]:
    """The CLIP that gives CLIP score and FD (`load_clip`) on `device`, and the reference images of `split` at its
    input size (`load_reference_images`): (clip_run, uint8 (N, 3, R, R), the unreadable files)."""
    from clipcond.models.clip import load_clip

    clip_run = load_clip(clip_path, device=device, what="--clip")
    reference, unreadable = load_reference_images(
        str(data), split, clip_run.image_size, allow_outside_paths=allow_outside_paths
    )
    return clip_run, reference, unreadable
