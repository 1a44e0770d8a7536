"""The `transformers:PATH` adapter: any transformers CLIP folder, frozen.

PATH is either a full `CLIPModel` folder (config.json with `model_type: clip`, tokenizer files beside it; e.g.
`openai/clip-vit-base-patch32` saved locally, or a clipcond CLIP run), or a Stable-Diffusion-style folder with
`text_encoder/` + `tokenizer/` subfolders, optionally `image_encoder/` + `feature_extractor/` (Stable unCLIP's
layout), or a Hugging Face Hub id of one (`clipcond.hub`). Each tower loads as `CLIPModel` builds it, with the
top-level `projection_dim`. A text tower saved as `CLIPTextModel` (Stable Diffusion's, no projection) gives per-token
states only; one with a projection (`CLIPTextModelWithProjection`, or the text half of a `CLIPModel`) also the pooled
embedding.

The lineage hash covers the tower folders present (`clipcond.lineage.content_hash` of each), whichever are loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from clipcond.encoders.base import FrozenEncoder
from clipcond.hub import resolve_folder
from clipcond.lineage import content_hash
from clipcond.models.clip import load_clip_tower, pixel_statistics
from clipcond.tokenizer import load_tokenizer


def _model_type(folder: Path) -> tuple[str | None, list[str]]:
    config_file = folder / "config.json"
    if not config_file.is_file():
        return None, []
    config = json.loads(config_file.read_text())
    return config.get("model_type"), config.get("architectures") or []


def load_transformers_clip(
    path: str | os.PathLike, *, what: str = "--text-encoder", text: bool = True, image: bool = False
) -> FrozenEncoder:
    """A transformers CLIP folder (full `CLIPModel`, or `text_encoder/` + `tokenizer/` subfolders) as a frozen
    `FrozenEncoder`; only the towers asked for are loaded."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    root = resolve_folder(path, what, "pass a transformers CLIP folder or a Hugging Face Hub id")
    model_type, architectures = _model_type(root)
    if model_type == "clip":  # a full CLIPModel: both towers and the tokenizer in one folder
        text_dir = image_dir = tokenizer_dir = pixels_dir = root
    elif (root / "text_encoder").is_dir() or (root / "image_encoder").is_dir():  # Stable Diffusion's layout
        text_dir, tokenizer_dir = root / "text_encoder", root / "tokenizer"
        image_dir, pixels_dir = root / "image_encoder", root / "feature_extractor"
    elif model_type in ("clip_text_model", "clip_vision_model"):
        text_dir = tokenizer_dir = image_dir = pixels_dir = root
    else:
        found = f"model_type {model_type!r}" if model_type else "no config.json"
        raise ValueError(
            f"`{what}` {str(root)!r} is not a transformers CLIP folder ({found}, and no text_encoder/ subfolder); "
            "pass a CLIPModel folder or a Stable-Diffusion-style folder with text_encoder/ and tokenizer/"
        )

    text_encoder = tokenizer = image_encoder = mean = std = None
    hashes = []
    if text:
        text_type, text_architectures = _model_type(text_dir)
        if text_type not in ("clip", "clip_text_model"):
            raise ValueError(f"`{what}` {str(text_dir)!r} holds no CLIP text encoder (model_type {text_type!r})")
        with_projection = text_type == "clip" or "CLIPTextModelWithProjection" in text_architectures
        cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
        text_encoder = load_clip_tower(cls, text_dir, what, "text encoder")
        if not tokenizer_dir.is_dir():
            raise FileNotFoundError(f"`{what}` {str(root)!r} has no tokenizer folder {str(tokenizer_dir)!r}")
        tokenizer = load_tokenizer(tokenizer_dir)
    if image:
        image_type, _ = _model_type(image_dir)
        if image_type not in ("clip", "clip_vision_model"):
            raise ValueError(
                f"`{what}` {str(root)!r} holds no CLIP image encoder (no CLIPModel config, no image_encoder/ folder)"
            )
        image_encoder = load_clip_tower(CLIPVisionModelWithProjection, image_dir, what, "image encoder")
        mean, std = pixel_statistics(pixels_dir, what)
    # The identity of the folder, whichever towers this caller loads: each tower folder's hash
    for folder in dict.fromkeys((text_dir, image_dir)):
        if (folder / "config.json").is_file():
            hashes.append(content_hash(folder))
    identity = hashes[0] if len(hashes) == 1 else hashlib.sha256("".join(hashes).encode()).hexdigest()
    return FrozenEncoder(
        kind="transformers",
        name=os.fspath(path),  # as given: a Hub id stays an id, not its cache folder
        content_hash=identity,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        image_encoder=image_encoder,
        image_mean=mean,
        image_std=std,
    )
