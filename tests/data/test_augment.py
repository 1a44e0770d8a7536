"""Augmentation for CLIP pretraining: grayscale (the luminance, which images are turned), random resized crops and
flips (their geometry), and errors."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clipcond.data.augment import CROP_DRAWS, CROP_RATIO, grayscale_where, random_resized_crops, to_grayscale


def _images(n=4, size=8, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_grayscale_is_the_luminance_that_pil_computes():
    pixels = _images()
    gray = to_grayscale(pixels)
    assert gray.dtype == torch.uint8 and gray.shape == pixels.shape
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    for image, ours in zip(pixels, gray):
        pil = np.asarray(Image.fromarray(image.permute(1, 2, 0).numpy()).convert("L")).astype(int)
        assert np.abs(ours[0].numpy().astype(int) - pil).max() <= 1  # PIL rounds in fixed point
    # the shapes' colours keep distinct grey levels only by their luminance: pure green is lighter than pure blue
    green_blue = torch.tensor([[0, 255, 0], [0, 0, 255]], dtype=torch.uint8).view(2, 3, 1, 1)
    assert to_grayscale(green_blue).flatten(1)[:, 0].tolist() == [150, 29]


def test_only_the_chosen_images_turn_gray():
    pixels = _images(n=5)
    chosen = torch.tensor([True, False, True, False, False])
    out = grayscale_where(pixels, chosen)
    assert torch.equal(out[chosen], to_grayscale(pixels)[chosen])
    assert torch.equal(out[~chosen], pixels[~chosen])
    assert torch.equal(grayscale_where(pixels, torch.zeros(5, dtype=torch.bool)), pixels)


@pytest.mark.parametrize(
    "pixels, chosen, match",
    [
        (
            _images().float(),
            torch.ones(4, dtype=torch.bool),
            r"`pixels` must be uint8 \(B, 3, H, W\), got torch.float32",
        ),
        (_images()[:, :1], torch.ones(4, dtype=torch.bool), r"got torch.uint8 \(4, 1, 8, 8\)"),
        (_images(), torch.ones(3, dtype=torch.bool), r"`chosen` must have shape \(4,\), got \(3,\)"),
    ],
)
def test_bad_inputs_are_named(pixels, chosen, match):
    with pytest.raises(ValueError, match=match):
        grayscale_where(pixels, chosen)


def _draws(n, seed=0):
    return torch.rand(n, CROP_DRAWS, generator=torch.Generator().manual_seed(seed))


def test_a_full_scale_crop_is_the_image_and_a_flip_its_mirror():
    pixels, draws = _images(n=6, size=16), _draws(6)
    assert torch.equal(random_resized_crops(pixels, draws, min_scale=1.0), pixels)
    assert torch.equal(random_resized_crops(pixels, draws, min_scale=1.0, hflip_prob=1.0), pixels.flip(-1))
    draws[:, 4] = torch.tensor([0.1, 0.9, 0.1, 0.9, 0.1, 0.9])  # the flip's uniform against the probability
    half = random_resized_crops(pixels, draws, min_scale=1.0, hflip_prob=0.5)
    assert torch.equal(half[0::2], pixels[0::2].flip(-1)) and torch.equal(half[1::2], pixels[1::2])


def test_a_quarter_crop_at_the_top_left_is_that_quadrant_enlarged():
    pixels = _images(n=2, size=16)
    middle_ratio = -math.log(CROP_RATIO[0]) / (math.log(CROP_RATIO[1]) - math.log(CROP_RATIO[0]))  # ratio 1
    draws = torch.tensor([[0.0, middle_ratio, 0.0, 0.0, 1.0]] * 2)  # area 1/4, square, left, top, no flip
    out = random_resized_crops(pixels, draws, min_scale=0.25)
    enlarged = F.interpolate(pixels[:, :, :8, :8].float(), scale_factor=2, mode="bilinear", align_corners=False)
    # the last row and column blend in the quadrant's neighbours, which the quadrant alone does not have
    assert (out[:, :, :15, :15].int() - enlarged.round()[:, :, :15, :15].int()).abs().max() <= 1
    # its mirror image reads the same quadrant right to left
    draws[:, 4] = 0.0
    flipped = random_resized_crops(pixels, draws, min_scale=0.25, hflip_prob=1.0)
    assert torch.equal(flipped, out.flip(-1))


def test_crops_keep_at_least_the_smallest_share_of_the_image():
    """A ramp across the image: a crop's values span its share of the width; width x height >= min_scale."""
    size = 64
    ramp = torch.linspace(0, 255, size).round().to(torch.uint8)
    across = ramp.view(1, 1, 1, size).expand(32, 3, size, size).contiguous()
    down = across.transpose(2, 3).contiguous()
    draws = _draws(32, seed=1)
    spans = [random_resized_crops(x, draws, min_scale=0.3).float() for x in (across, down)]
    width = (spans[0][:, 0, 0, -1] - spans[0][:, 0, 0, 0]) / 255  # each crop's share of the width and height
    height = (spans[1][:, 0, -1, 0] - spans[1][:, 0, 0, 0]) / 255
    area = width * height
    assert area.min() >= 0.3 - 0.05 and area.max() <= 1.0 and area.max() - area.min() > 0.3


@pytest.mark.parametrize(
    "pixels, draws, scale, match",
    [
        (_images().float(), _draws(4), 0.5, r"`pixels` must be uint8 \(B, 3, H, W\), got torch.float32"),
        (_images(), _draws(3), 0.5, r"`draws` must have shape \(4, 5\), got \(3, 5\)"),
        (_images(), _draws(4), 0.0, r"`min_scale` must be in \(0, 1\], got 0.0"),
    ],
)
def test_bad_crop_inputs_are_named(pixels, draws, scale, match):
    with pytest.raises(ValueError, match=match):
        random_resized_crops(pixels, draws, scale)
