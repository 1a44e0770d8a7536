"""What a captioner reads of a frozen CLIP image tower: its patch tokens and its pooled embedding, and the cache that
computes them once per data set.

LLaVA (Liu et al. 2023, "Visual Instruction Tuning"; LLaVA-1.5, "Improved Baselines with Visual Instruction
Tuning") feeds the language model the patch states of the vision tower's penultimate layer (`mm_vision_select_layer
= -2`: the last layer is trained for the contrastive pooled output, the one before keeps more local detail) without
the class token. We add the pooled, projected CLIP image embedding as one more token: it is what the contrastive
objective shaped, and it is cheap.

`VisionTokenCache` stores both for every image of a data set in `CACHE_DIR/vision-tokens-<key>.safetensors`, keyed
as the other per-image caches (`clipcond.image_cache`): the tower's fingerprint, the selected layer, the pixel
normalisation, the resolution and the image list.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from clipcond.conditioning import vision_fingerprint
from clipcond.image_cache import encode_dataset, image_cache_key, load_or_build, read_image_cache, save_image_cache

VISION_TOKENS_FORMAT_VERSION = 1
DEFAULT_SELECT_LAYER = -2  # LLaVA's mm_vision_select_layer


@torch.no_grad()
def vision_tokens(
    vision_model, pixel_values: torch.Tensor, select_layer: int = DEFAULT_SELECT_LAYER
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised pixels (B, 3, H, W) -> (patch tokens (B, P, W) of hidden layer `select_layer`, class token dropped;
    projected image embeddings (B, D), unnormalised), from a `CLIPVisionModelWithProjection`."""
    out = vision_model(pixel_values=pixel_values, output_hidden_states=True)
    patches = out.hidden_states[select_layer][:, 1:]  # (B, 1 + P, W) -> (B, P, W): transformers' CLIP puts CLS first
    return patches, out.image_embeds


class VisionTokenCache:
    """Patch tokens (N, P, W) and image embeddings (N, D), fp16 on the CPU, of every item of a data set; row i is
    what `dataset[i]` returns, whose item is `item_indices[i]` (it differs from i only for unreadable images)."""

    def __init__(
        self,
        patch_tokens: torch.Tensor,
        image_embeds: torch.Tensor,
        item_indices: torch.Tensor,
        key: str,
        path: Path,
        skipped: list[str],
    ):
        assert patch_tokens.ndim == 3 and image_embeds.ndim == 2, "(N, P, W) patch tokens and (N, D) embeddings"
        assert patch_tokens.shape[0] == image_embeds.shape[0] == item_indices.shape[0], "one row per item"
        self.patch_tokens, self.image_embeds, self.item_indices = patch_tokens, image_embeds, item_indices
        self.key, self.path, self.skipped = key, path, skipped

    def __len__(self) -> int:
        return self.patch_tokens.shape[0]

    def lookup(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Data set indices (B,) -> (patch tokens (B, P, W), image embeddings (B, D)), float32 on the CPU."""
        return self.patch_tokens[indices].float(), self.image_embeds[indices].float()

    @classmethod
    def build_or_load(
        cls,
        vision_model,
        dataset,
        cache_dir: str | os.PathLike,
        *,
        image_mean,
        image_std,
        select_layer: int = DEFAULT_SELECT_LAYER,
        batch_size: int = 256,
        device: torch.device | str | None = None,
        progress: bool = True,
    ) -> VisionTokenCache:
        """Load the tokens of `dataset`'s images (an `ImageCaptionDataset` at the tower's resolution) from
        `cache_dir`, or compute and store them."""
        from clipcond.models.clip_pixels import normalize_pixels

        if len(dataset) == 0:
            raise ValueError(f"the data set {dataset!r} is empty; there is nothing to encode")
        key = image_cache_key(
            "vision-tokens",
            VISION_TOKENS_FORMAT_VERSION,
            vision_fingerprint(vision_model),
            dataset,
            image_mean=[float(m) for m in image_mean],
            image_std=[float(s) for s in image_std],
            select_layer=select_layer,
        )
        path = Path(cache_dir) / f"vision-tokens-{key}.safetensors"
        names = ("patch_tokens", "image_embeds", "item_indices")
        device = torch.device(device) if device is not None else vision_model.device

        def encode(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            pixel_values = normalize_pixels(pixels.to(device), image_mean, image_std).to(vision_model.dtype)
            patches, embeds = vision_tokens(vision_model, pixel_values, select_layer)
            return patches.to("cpu", torch.float16), embeds.to("cpu", torch.float16)

        def build() -> VisionTokenCache:
            (patches, embeds), indices, skipped = encode_dataset(
                dataset, encode, batch_size=batch_size, desc="encoding images", progress=progress
            )
            tensors = {"patch_tokens": patches, "image_embeds": embeds, "item_indices": indices}
            save_image_cache(path, tensors, version=VISION_TOKENS_FORMAT_VERSION, key=key, skipped=skipped)
            return cls(patches, embeds, indices, key, path, skipped)

        def load() -> VisionTokenCache:
            tensors, skipped = read_image_cache(path, names, version=VISION_TOKENS_FORMAT_VERSION, key=key)
            if tensors["patch_tokens"].shape[0] != len(dataset):
                raise ValueError(f"it holds {tensors['patch_tokens'].shape[0]} rows for {len(dataset)} images")
            return cls(*(tensors[n] for n in names), key, path, skipped)

        return load_or_build(path, load, build, "vision-token")
