"""Training-time augmentation of image batches for CLIP pretraining (`clipcond train clip --grayscale-prob P`).

Random grayscale, as open_clip's `gray_scale_prob` and SimCLR's: with probability P an image is replaced by its
luminance, copied to the three channels, while its caption stays as it is. A grayscale image still shows its shapes
but hardly its colours, so the loss can match it to "a green circle" rather than "a green square" only through shape
features that do not depend on colour. Those are what a held-out composition needs: on the shapes data,
a CLIP that has never seen a green circle classifies one by combining "green" and "circle" learnt from other pairs.
Without grayscale views the image tower learns colour-specific shape detectors (green: square vs triangle) and puts a
green circle on the seen pair of its colour.

Works on the uint8 batches that training reads (B, 3, H, W), on any device; random draws come from the stage's seeded
generator (one uniform per sample of the global batch, drawn as the diffusion stages draw their noise), so a resumed run
augments exactly as an uninterrupted one, and N processes as one.
"""

from __future__ import annotations

import torch
from einops import rearrange, repeat

from clipcond.transfer import constant

# ITU-R BT.601 luma weights, as PIL's convert("L") and torchvision's rgb_to_grayscale use.
LUMA_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)


def to_grayscale(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 RGB images (B, 3, H, W) -> their luminance, rounded, in all three channels (B, 3, H, W) uint8."""
    if pixels.dtype != torch.uint8 or pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"`pixels` must be uint8 (B, 3, H, W), got {pixels.dtype} {tuple(pixels.shape)}")
    weights = constant(LUMA_WEIGHTS, pixels.device)  # built once per device: no wait in a training step
    luma = torch.einsum("bchw,c->bhw", pixels.float(), weights).round().clamp_(0, 255).to(torch.uint8)
    return repeat(luma, "b h w -> b c h w", c=3)


def grayscale_where(pixels: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """The images (B, 3, H, W) uint8 where `chosen` (B,) is True turned to grayscale, the others left as they are."""
    if chosen.shape != pixels.shape[:1]:
        raise ValueError(f"`chosen` must have shape ({pixels.shape[0]},), got {tuple(chosen.shape)}")
    chosen = rearrange(chosen.to(device=pixels.device, dtype=torch.bool), "b -> b 1 1 1")
    return torch.where(chosen, to_grayscale(pixels), pixels)
