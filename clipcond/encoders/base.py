"""The frozen-encoder interface: what a decoder or prior reads of an encoder, whichever model family it comes from.

A `FrozenEncoder` turns texts into per-token states with an attention mask and (for CLIP-like encoders) a pooled
embedding, and images into an embedding and patch tokens; it states its widths, context length, image size and
pixel normalisation, and its lineage (kind, name, content hash). The adapters (`clipcond.encoders.*`) wrap

    clipcond:RUN                  a CLIP run folder of `clipcond train clip`
    transformers:PATH             a transformers CLIP folder: a full `CLIPModel`, or Stable-Diffusion-style
                                  `text_encoder/` + `tokenizer/` (+ `image_encoder/` + `feature_extractor/`) subfolders
    open_clip:MODEL@WEIGHTS       an open_clip model built by name (or from a JSON config file) with local weights
    t5:PATH                       a transformers T5 encoder (per-token states only: the Stable Diffusion path)

`load_encoder(spec)` parses these specs (a bare folder means `clipcond:`). Every adapter exposes its text side as a
transformers-style pair `(text_encoder, tokenizer)`: `text_encoder(input_ids=, attention_mask=)` returns an output
with `last_hidden_state` (and `text_embeds` where there is a projection), and both save with `save_pretrained`. So
the embedding cache (`clipcond.conditioning.TextEmbeddingCache`, keyed by the encoder's class, config, weights and
tokenizer) and the pipelines work unchanged with any adapter, and a trained run folder holds its encoder.

`check_compatibility` compares an encoder with what consumes it (a UNet's cross-attention, a prior's embedding width
and context, an image size): a new model gets a learned projection where widths differ, a trained one a `ValueError`
that names both numbers. `check_lineage` refuses a trained model beside an encoder other than the one it was trained
on, unless asked not to.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clipcond.hub import local_files_only
from clipcond.runs import RUN_RECORD, RunRecord, check_same_encoder
from clipcond.text_encoding import TextEmbeddings, context_length, encode_prompts

logger = logging.getLogger(__name__)

ENCODER_KINDS = ("clipcond", "transformers", "open_clip", "t5")
SPEC_GRAMMAR = "clipcond:RUN, transformers:PATH, open_clip:MODEL@WEIGHTS or t5:PATH (a bare folder means clipcond:)"


@dataclass
class ImageEmbeddings:
    embeds: torch.Tensor  # (B, D) projected image embedding, not normalised
    patch_tokens: torch.Tensor | None  # (B, N, W) last-layer patch states (class token excluded), or None


@dataclass
class FrozenEncoder:
    """A frozen encoder behind one interface. Build it with `load_encoder` or an adapter's `load_*` function.

    `text_encoder` / `tokenizer`: the transformers-style text pair (None for an image-only encoder).
    `image_encoder`: a module whose `forward(pixel_values=...)` returns `image_embeds` and `last_hidden_state`
    (None for a text-only encoder); `image_mean` / `image_std` its pixel statistics for pixels in [0, 1].
    """

    kind: str  # one of ENCODER_KINDS
    name: str  # the path or model name it was loaded from
    content_hash: str  # SHA-256 of its weights (and config) files: its identity in lineage records
    text_encoder: torch.nn.Module | None
    tokenizer: object | None
    image_encoder: torch.nn.Module | None = None
    image_mean: tuple[float, float, float] | None = None
    image_std: tuple[float, float, float] | None = None
    extra: dict = field(default_factory=dict)  # adapter-specific facts (e.g. the open_clip model config)

    # ------------------------------------------------------------------------------------------------ facts

    @property
    def text_width(self) -> int | None:
        """Width of the per-token states (`hidden_size`, or `d_model` for T5)."""
        if self.text_encoder is None:
            return None
        config = self.text_encoder.config
        return _get(config, "hidden_size") or _get(config, "d_model")

    @property
    def embed_dim(self) -> int | None:
        """Width of the pooled (projected) text and image embeddings; None for encoders without one (T5)."""
        for model in (self.text_encoder, self.image_encoder):
            if model is not None and _get(model.config, "projection_dim") is not None:
                return _get(model.config, "projection_dim")
        return None

    @property
    def context_length(self) -> int | None:
        return None if self.text_encoder is None else context_length(self.text_encoder, self.tokenizer)

    @property
    def image_size(self) -> int | None:
        return None if self.image_encoder is None else _get(self.image_encoder.config, "image_size")

    @property
    def pad_token_id(self) -> int | None:
        return None if self.tokenizer is None else self.tokenizer.pad_token_id

    @property
    def eos_token_id(self) -> int | None:
        return None if self.tokenizer is None else self.tokenizer.eos_token_id

    def lineage(self) -> dict:
        """What a trained model records of its encoder: `{"kind", "name", "content_hash"}`."""
        return {"kind": self.kind, "name": self.name, "content_hash": self.content_hash}

    def describe(self) -> dict:
        return {
            **self.lineage(),
            "text_width": self.text_width,
            "embed_dim": self.embed_dim,
            "context_length": self.context_length,
            "image_size": self.image_size,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_id,
        }

    # ------------------------------------------------------------------------------------------ encoding

    def to(self, device=None, dtype=None) -> FrozenEncoder:
        for model in (self.text_encoder, self.image_encoder):
            if model is not None:
                model.to(device) if dtype is None else model.to(device, dtype)
        return self

    def encode_text(self, prompts: list[str] | str, device=None) -> TextEmbeddings:
        """Per-token states (B, L, W), attention mask (B, L) and pooled embedding (B, D) or None, padded to the
        full context (`clipcond.text_encoding.encode_prompts`, the function the caches and pipelines use)."""
        if self.text_encoder is None:
            raise ValueError(f"the {self.kind} encoder {self.name!r} has no text encoder")
        return encode_prompts(self.text_encoder, self.tokenizer, prompts, device=device)

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> ImageEmbeddings:
        """uint8 images (B, 3, H, W) at `image_size` -> projected embeddings (B, D) and patch tokens (B, N, W)."""
        from clipcond.models.clip_pixels import normalize_pixels

        if self.image_encoder is None:
            raise ValueError(f"the {self.kind} encoder {self.name!r} has no image encoder")
        size = self.image_size
        if tuple(pixels.shape[-2:]) != (size, size):
            raise ValueError(
                f"the image encoder of {self.name!r} reads {size} x {size} images, got {tuple(pixels.shape[-2:])}"
            )
        device = next(self.image_encoder.parameters()).device
        dtype = next(self.image_encoder.parameters()).dtype
        pixel_values = normalize_pixels(pixels.to(device), self.image_mean, self.image_std).to(dtype)
        out = self.image_encoder(pixel_values=pixel_values)
        tokens = getattr(out, "patch_tokens", None)
        if tokens is None and getattr(out, "last_hidden_state", None) is not None:
            tokens = out.last_hidden_state[:, 1:]  # transformers' CLIP: the class token first
        return ImageEmbeddings(out.image_embeds, tokens)

    def check_tokens(self) -> None:
        """The tokenizer must pad (prompts are padded to the full context) and, for CLIP text towers, end with the
        token the tower pools at; otherwise the pooled embedding is read at the wrong position."""
        if self.tokenizer is None:
            return
        if self.tokenizer.pad_token_id is None:
            raise ValueError(
                f"the tokenizer of {self.name!r} has no pad token; prompts are padded to the full context"
            )
        config = self.text_encoder.config
        config_eos = _get(config, "eos_token_id")
        if _get(config, "model_type") in ("clip_text_model", "clip") and config_eos is not None:
            # transformers reads eos_token_id == 2 as a legacy CLIP config and pools at argmax(input_ids)
            if config_eos == 2:
                expected = len(self.tokenizer) - 1
                if self.tokenizer.eos_token_id != expected:
                    raise ValueError(
                        f"the text encoder of {self.name!r} pools at the largest token id ({expected}), but its "
                        f"tokenizer ends prompts with {self.tokenizer.eos_token_id}"
                    )
            elif self.tokenizer.eos_token_id != config_eos:
                raise ValueError(
                    f"the text encoder of {self.name!r} pools at the end token {config_eos}, but its tokenizer ends "
                    f"prompts with {self.tokenizer.eos_token_id}; load the tokenizer saved with this model"
                )


def _get(config, key: str, default=None):
    """A config field from a transformers config (attributes) or a diffusers one (a dict)."""
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


# ------------------------------------------------------------------------------------------------ the spec


def parse_spec(spec: str) -> tuple[str, str]:
    """`KIND:REF` -> (kind, ref); a bare path (no known `KIND:` prefix) is `clipcond:PATH`."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"an encoder spec must be a non-empty string ({SPEC_GRAMMAR}), got {spec!r}")
    kind, sep, ref = spec.partition(":")
    if sep and kind in ENCODER_KINDS:
        if not ref:
            raise ValueError(f"the encoder spec {spec!r} names no {kind} model after the colon ({SPEC_GRAMMAR})")
        return kind, ref
    if sep and "/" not in kind and not os.path.exists(spec):
        raise ValueError(f"unknown encoder kind {kind!r} in {spec!r}; expected {SPEC_GRAMMAR}")
    return "clipcond", spec


def load_encoder(
    spec: str | FrozenEncoder,
    *,
    what: str = "--text-encoder",
    need_text: bool = True,
    need_image: bool = False,
    device: torch.device | str = "cpu",
) -> FrozenEncoder:
    """A frozen (eval, no gradients) encoder from a spec `KIND:REF` (see the module docstring).

    `what` names the argument in errors. `need_text` / `need_image`: which towers the caller uses; only those are
    loaded, and an encoder that lacks one is refused.
    """
    if isinstance(spec, FrozenEncoder):
        encoder = spec
    else:
        kind, ref = parse_spec(spec)
        if kind == "clipcond":
            from clipcond.encoders.clipcond_run import load_clipcond_run

            encoder = load_clipcond_run(ref, what=what, text=need_text, image=need_image)
        elif kind == "transformers":
            from clipcond.encoders.transformers_clip import load_transformers_clip

            encoder = load_transformers_clip(ref, what=what, text=need_text, image=need_image)
        elif kind == "open_clip":
            from clipcond.encoders.open_clip import load_open_clip

            encoder = load_open_clip(ref, what=what, text=need_text, image=need_image)
        else:
            from clipcond.encoders.t5 import load_t5

            encoder = load_t5(ref, what=what)
    if need_text and encoder.text_encoder is None:
        raise ValueError(f"`{what}` {encoder.name!r} ({encoder.kind}) has no text encoder")
    if need_image and encoder.image_encoder is None:
        raise ValueError(
            f"`{what}` {encoder.name!r} ({encoder.kind}) has no image encoder; the DALL-E 2 path needs a CLIP with "
            "both towers"
        )
    encoder.check_tokens()
    return encoder.to(device)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.requires_grad_(False)
    return model.eval()


# ----------------------------------------------------------------------------------------- compatibility


@dataclass
class Compatibility:
    """What `check_compatibility` found: the numbers compared, and the projections a new model needs."""

    checked: dict = field(default_factory=dict)  # name -> (encoder's number, consumer's number)
    projections: dict = field(default_factory=dict)  # name -> (from width, to width), learned by a new model


def check_compatibility(
    encoder: FrozenEncoder,
    *,
    unet=None,
    cross_attention_dim: int | None = None,
    prior=None,
    image_size: int | None = None,
    image_embedding_dim: int | None = None,
    new_model: bool = False,
) -> Compatibility:
    """Compare an encoder with what consumes it, before training or generating.

    Args:
        unet: a (trained) `UNet2DConditionModel` whose cross-attention reads the per-token states.
        cross_attention_dim: the width of a UNet about to be built (with `new_model`).
        prior: a `PriorTransformer`: its `embedding_dim` must be the encoder's embedding width and its
            `num_embeddings` the encoder's context length.
        image_size: the resolution an image-embedding consumer feeds the image encoder.
        image_embedding_dim: the embedding width an image-embedding decoder reads.
        new_model: True when the consumer is being trained now: widths that differ get a learned projection
            (returned in `projections`); False for a trained model: they raise a `ValueError` naming both numbers.
    """
    report = Compatibility()
    hint = "train a new model on this encoder, or load the encoder it was trained with (its run record names it)"

    def compare(name: str, ours, theirs, projectable: bool = False):
        report.checked[name] = (ours, theirs)
        if ours is None or theirs is None or ours == theirs:
            return
        if new_model and projectable:
            report.projections[name] = (ours, theirs)
            return
        raise ValueError(
            f"{name}: the encoder {encoder.name!r} ({encoder.kind}) gives {ours}, but the model reads {theirs}; {hint}"
        )

    if unet is not None:
        reads = unet.config.encoder_hid_dim or unet.config.cross_attention_dim
        compare("token-state width (UNet encoder_hid_dim or cross_attention_dim)", encoder.text_width, reads)
    if cross_attention_dim is not None:
        compare("token-state width (UNet cross_attention_dim)", encoder.text_width, cross_attention_dim, True)
    if prior is not None:
        if encoder.embed_dim is None:
            raise ValueError(
                f"the encoder {encoder.name!r} ({encoder.kind}) has no pooled embedding; a prior reads and predicts "
                "CLIP embeddings, so it needs a CLIP-like encoder"
            )
        compare("embedding width (prior embedding_dim)", encoder.embed_dim, prior.config.embedding_dim)
        compare("context length (prior num_embeddings)", encoder.context_length, prior.config.num_embeddings)
    if image_size is not None:
        compare("image size", encoder.image_size, image_size)
    if image_embedding_dim is not None:
        compare("image embedding width", encoder.embed_dim, image_embedding_dim)
    return report


# ------------------------------------------------------------------------------------------------- lineage


def recorded_lineage(run: str | os.PathLike) -> dict | None:
    """The encoder a run was trained on, from its `clipcond_run.json` (`RunRecord.lineage`): `{"kind", "name",
    "content_hash"}`; runs from before the encoder interface record only `clip.content_hash` (a clipcond CLIP).
    None without a record."""
    record = RunRecord.read_if_present(run)
    lineage = None if record is None else record.lineage
    return None if lineage is None else lineage.as_dict()


def check_lineage(run: str | os.PathLike, encoder: FrozenEncoder, *, allow_encoder_mismatch: bool = False) -> None:
    """Refuse to pair the model in `run` with an encoder other than the one it was trained on (compared by content
    hash, `clipcond.runs.check_same_encoder`), unless `allow_encoder_mismatch`, which only warns. A run without a record
    is refused too: nothing says what it was trained on."""
    lineage = recorded_lineage(run)
    recorded = lineage or {}
    missing = (
        f"{str(run)!r} holds no {RUN_RECORD} naming the encoder it was trained on"
        if lineage is None
        else f"the {RUN_RECORD} of {str(run)!r} records no content hash of the encoder it was trained on"
    )
    check_same_encoder(
        recorded.get("content_hash"),
        encoder.content_hash,
        mismatch=f"{str(run)!r} was trained on the {recorded.get('kind')} encoder {recorded.get('name')!r} (content "
        f"hash {str(recorded.get('content_hash'))[:12]}...), but the encoder given is the {encoder.kind} encoder "
        f"{encoder.name!r} ({encoder.content_hash[:12]}...)",
        missing=missing,
        fix="load it with the encoder it was trained on, or pass allow_encoder_mismatch=True "
        "(`--allow-encoder-mismatch`) to use this one anyway",
        allowed_by="allow_encoder_mismatch",
        allow=allow_encoder_mismatch,
        log=logger,
    )


def load_text_to_image(
    run: str | os.PathLike,
    encoder: str | FrozenEncoder | None = None,
    *,
    allow_encoder_mismatch: bool = False,
    **kwargs,
):
    """A trained decoder run as a `TextToImagePipeline`, with its own saved encoder (`encoder=None`) or another one
    (a spec or a `FrozenEncoder`), checked for lineage and widths. `kwargs` go to `from_pretrained`."""
    from clipcond.pipelines.text_to_image import TextToImagePipeline

    if encoder is None:
        return TextToImagePipeline.from_pretrained(run, local_files_only=local_files_only(), **kwargs)
    encoder = load_encoder(encoder, what="encoder")
    check_lineage(run, encoder, allow_encoder_mismatch=allow_encoder_mismatch)
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(Path(run) / "unet", local_files_only=local_files_only())
    check_compatibility(encoder, unet=unet)
    return TextToImagePipeline.from_pretrained(
        run,
        unet=unet,
        text_encoder=encoder.text_encoder,
        tokenizer=encoder.tokenizer,
        local_files_only=local_files_only(),
        **kwargs,
    )
