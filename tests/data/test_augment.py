"""Random grayscale for CLIP pretraining: the luminance, which images are turned, and errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from clipcond.data.augment import grayscale_where, to_grayscale


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
