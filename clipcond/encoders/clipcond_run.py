"""The `clipcond:RUN` adapter: the frozen towers of a CLIP run folder written by `clipcond train clip`.

Its lineage hash is `clipcond.lineage.content_hash(RUN)`, the hash that run records kept as `clip.content_hash`
before the encoder interface, so older decoders and priors still match their CLIP.
"""

from __future__ import annotations

import os

from clipcond.encoders.base import FrozenEncoder
from clipcond.lineage import content_hash
from clipcond.models.clip import check_clip_folder, load_text_tower, load_vision_tower


def load_clipcond_run(
    path: str | os.PathLike, *, what: str = "--clip", text: bool = True, image: bool = False
) -> FrozenEncoder:
    """A clipcond CLIP run as a `FrozenEncoder`: `CLIPTextModelWithProjection` + its tokenizer (with `text`) and
    `CLIPVisionModelWithProjection` + the run's pixel statistics (with `image`), frozen."""
    path = check_clip_folder(path, what)
    text_encoder = tokenizer = image_encoder = mean = std = None
    if text:
        text_encoder, tokenizer = load_text_tower(path, what)
    if image:
        image_encoder, mean, std = load_vision_tower(path, what)
    return FrozenEncoder(
        kind="clipcond",
        name=os.fspath(path),
        content_hash=content_hash(path),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        image_encoder=image_encoder,
        image_mean=mean,
        image_std=std,
    )
