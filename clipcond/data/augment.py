"""Training-time augmentation of image batches for CLIP pretraining (`clipcond train clip --grayscale-prob P`,
`--random-crop-scale S`, `--hflip-prob Q`).

Random grayscale, as open_clip's `gray_scale_prob` and SimCLR's: with probability P an image is replaced by its
luminance, copied to the three channels, while its caption stays as it is. A grayscale image still shows its shapes
but hardly its colours, so the loss can match it to "a green circle" rather than "a green square" only through shape
features that do not depend on colour. Those are what a held-out composition needs: on the shapes data,
a CLIP that has never seen a green circle classifies one by combining "green" and "circle" learnt from other pairs.
Without grayscale views the image tower learns colour-specific shape detectors (green: square vs triangle) and puts a
green circle on the seen pair of its colour.

Random resized crops and horizontal flips, as torchvision's `RandomResizedCrop` (Szegedy et al. 2015; open_clip's
`scale`) and `RandomHorizontalFlip`: each image is replaced by a crop of a random share of its area, in [S, 1], and
aspect ratio (log-uniform in [3/4, 4/3]), at a random position, scaled back to its size, and mirrored with
probability Q: the usual regulariser of image towers on small data, though on the Tux Paint stamps it did not pay
at the budgets measured (docs/lab-notes.md, "random resized crops on the stamps"). They are off by default: the
shapes data's captions name positions ("on the left"), which a flip reverses and a crop shifts.

Works on the uint8 batches that training reads (B, 3, H, W), on any device; random draws come from the stage's seeded
generator (uniforms per sample of the global batch: one for grayscale, `CROP_DRAWS` for a crop, drawn as the diffusion
stages draw their noise), so a resumed run augments exactly as an uninterrupted one, and N processes as one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
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


CROP_RATIO: tuple[float, float] = (3 / 4, 4 / 3)  # torchvision's RandomResizedCrop default
CROP_DRAWS = 5  # uniforms per image: area, aspect ratio, x, y, flip


def random_resized_crops(
    pixels: torch.Tensor, draws: torch.Tensor, min_scale: float, hflip_prob: float = 0.0
) -> torch.Tensor:
    """uint8 images (B, 3, H, W) -> each one's random crop, resized back to (H, W) (bilinear), and mirrored with
    probability `hflip_prob`. `draws` (B, `CROP_DRAWS`) are uniforms in [0, 1) that fix each image's crop: its share
    of the area in [`min_scale`, 1], its log aspect ratio uniform in `CROP_RATIO` and then clamped to the ratios
    at which that area fits in the image (torchvision draws again instead), its position, and the flip. So a share
    of 1 is the whole image, and `min_scale=1` without flips returns the images unchanged. One `grid_sample` for the
    whole batch, on the images' device."""
    if pixels.dtype != torch.uint8 or pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"`pixels` must be uint8 (B, 3, H, W), got {pixels.dtype} {tuple(pixels.shape)}")
    if draws.shape != (pixels.shape[0], CROP_DRAWS):
        raise ValueError(f"`draws` must have shape ({pixels.shape[0]}, {CROP_DRAWS}), got {tuple(draws.shape)}")
    if not 0.0 < min_scale <= 1.0:
        raise ValueError(f"`min_scale` must be in (0, 1], got {min_scale}")
    draws = draws.to(device=pixels.device, dtype=torch.float32)
    area = min_scale + (1.0 - min_scale) * draws[:, 0]
    low, high = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    ratio = torch.exp(low + (high - low) * draws[:, 1])  # width / height
    ratio = torch.minimum(torch.maximum(ratio, area), 1.0 / area)  # so that neither side exceeds the image's
    width, height = torch.sqrt(area * ratio), torch.sqrt(area / ratio)  # shares of the image's sides
    # the crop's centre in grid_sample's [-1, 1] coordinates, uniform over the positions that keep it inside
    centre_x = (1.0 - width) * (2.0 * draws[:, 2] - 1.0)
    centre_y = (1.0 - height) * (2.0 * draws[:, 3] - 1.0)
    sign = torch.where(draws[:, 4] < hflip_prob, -1.0, 1.0)  # a negative x scale reads the crop right to left
    zero = torch.zeros_like(width)
    theta = torch.stack(
        [torch.stack([sign * width, zero, centre_x], dim=1), torch.stack([zero, height, centre_y], dim=1)], dim=1
    )  # (B, 2, 3): output grid -> input coordinates
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    out = F.grid_sample(pixels.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


@dataclass(frozen=True)
class ImageAugment:
    """The augmentation of a CLIP run's training images: grayscale views, random resized crops, horizontal flips."""

    grayscale_prob: float = 0.0
    crop_scale: float = 1.0  # the smallest share of the area a crop keeps; 1: no crop
    hflip_prob: float = 0.0

    @property
    def crops(self) -> bool:
        """Whether images are cropped or flipped: both are one `random_resized_crops` with its own draws."""
        return self.crop_scale < 1.0 or self.hflip_prob > 0.0
