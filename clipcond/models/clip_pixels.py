"""CLIP's pixel inputs: uint8 images standardised per channel, by default with OpenAI's CLIP statistics. The
CLIPs trained here (`clipcond.models.clip`), the image-embedding caches and the image-embedding decoder's pipeline
(`clipcond.pipelines.variation`) normalise images here; the CLIP probes and the captioner resize them here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipcond.transfer import constant

# OpenAI's CLIP statistics (transformers.utils.constants); kept as the default for models trained here too.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize_pixels(pixels: torch.Tensor, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> torch.Tensor:
    """uint8 images (B, 3, H, W) in [0, 255] -> float CLIP inputs, standardised per channel."""
    if pixels.dtype != torch.uint8:
        raise ValueError(f"`pixels` must be uint8 in [0, 255], got {pixels.dtype}")
    mean = constant(mean, pixels.device).view(1, 3, 1, 1)  # built once per device: no wait in a training step
    std = constant(std, pixels.device).view(1, 3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> uint8 (B, 3, size, size), antialiased: the shorter side resized to `size` and the centre
    square kept, as `clipcond.data.folders.resize_image` does to PIL images (a non-square batch is not squashed);
    unchanged when already that size."""
    height, width = images.shape[-2:]
    if (height, width) == (size, size):
        return images
    scale = size / min(height, width)
    new = (max(size, round(height * scale)), max(size, round(width * scale)))
    x = F.interpolate(images.float(), size=new, mode="bilinear", antialias=True, align_corners=False)
    top, left = (new[0] - size) // 2, (new[1] - size) // 2
    return x[..., top : top + size, left : left + size].round().clamp(0, 255).to(torch.uint8)
