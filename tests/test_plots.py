import numpy as np
import pytest
import torch
from PIL import Image

from clipcond.plots import _font, _text_width, _wrap, heatmap_image, heatmap_png, image_grid, viridis

CLASSES = [
    f"{c} {s}"
    for c in ("red", "green", "blue", "yellow", "purple", "orange")
    for s in ("circle", "square", "triangle")
]


def test_viridis_ends_and_monotonic_brightness():
    colours = viridis(np.linspace(0, 1, 11))
    assert colours.dtype == np.uint8 and colours.shape == (11, 3)
    assert tuple(colours[0]) == (68, 1, 84) and tuple(colours[-1]) == (253, 231, 37)
    luminance = colours.astype(float) @ np.array([0.299, 0.587, 0.114])
    assert np.all(np.diff(luminance) > 0)
    assert tuple(viridis(np.array([-5.0, 5.0]))[1]) == (253, 231, 37)  # clipped
    assert tuple(viridis(np.array([np.nan]))[0]) == (200, 200, 200)


def test_heatmap_png_for_18_classes(tmp_path):
    confusion = torch.rand(18, 18, generator=torch.Generator().manual_seed(0)) + 3 * torch.eye(18)
    confusion = confusion / confusion.sum(dim=1, keepdim=True)
    path = heatmap_png(confusion, CLASSES, CLASSES, tmp_path / "sub" / "confusion.png", "confusion", vmin=0, vmax=1)
    assert path == tmp_path / "sub" / "confusion.png"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        assert 500 <= image.width <= 1400 and 500 <= image.height <= 1400
        pixels = np.asarray(image)
    # viridis' bright end shows up (the diagonal, about 0.8) and so does its dark end (off the diagonal)
    assert (np.abs(pixels.astype(int) - [68, 1, 84]).sum(-1) < 30).sum() > 1000
    assert (pixels[..., 1] > 180).sum() > 1000


def test_heatmap_sizes_labels_and_errors(tmp_path):
    big = heatmap_image(torch.randn(64, 64), [f"caption {i}" * 5 for i in range(64)], None, "similarity")
    assert 700 <= big.width <= 1600 and 700 <= big.height <= 1600
    small = heatmap_image([[3, 1], [0, 4]], ["a", "b"], ["a", "b"])
    assert small.width < 300 and small.height < 300
    constant = heatmap_image(np.zeros((3, 3)))  # vmin == vmax must not divide by zero
    assert constant.width > 0
    with pytest.raises(ValueError, match="2 row labels"):
        heatmap_image(np.zeros((3, 3)), ["a", "b"], None)
    with pytest.raises(ValueError, match="2-D"):
        heatmap_image(np.zeros(3))


def test_image_grid_dims_and_nearest_upscaling():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 0, 0)]
    images = [Image.new("RGB", (32, 32), c) for c in colours]
    grid = image_grid(images, 2, 3)
    # 32 px tiles are upscaled 3x to 96 px; 4 px padding around every tile
    assert grid.size == (3 * (96 + 4) + 4, 2 * (96 + 4) + 4)
    assert grid.getpixel((4 + 48, 4 + 48)) == colours[0]
    assert grid.getpixel((4 + 100 + 95, 4 + 95)) == colours[1]  # the last pixel of tile 1
    assert grid.getpixel((4 + 100 + 48, 4 + 100 + 48)) == colours[4]  # second row, second column
    assert grid.getpixel((4 + 200 + 48, 4 + 100 + 48)) == (255, 255, 255)  # empty cell

    labels = ["a red circle", "a small green square at the top of the image, in a long caption", "x", "", "y"]
    labelled = image_grid(images, 2, 3, labels=labels, max_label_lines=2)
    assert labelled.width == grid.width
    assert grid.height < labelled.height <= grid.height + 2 * 2 * 20  # at most two lines of text per row
    big = image_grid([Image.new("L", (128, 100), 128)], 1, 1)  # large enough: not upscaled; grey converted to RGB
    assert big.size == (128 + 8, 100 + 8) and big.mode == "RGB"


def test_label_wrapping_truncates_to_width_and_lines():
    font = _font(12)
    lines = _wrap("a small green square at the top of the image next to a circle", font, 96, 2)
    assert len(lines) == 2 and lines[-1].endswith("...")
    assert all(_text_width(font, line) <= 96 for line in lines)
    lines = _wrap("supercalifragilisticexpialidocious", font, 40, 5)  # one word wider than a line is broken up
    assert len(lines) > 1 and "".join(lines) == "supercalifragilisticexpialidocious"
    assert _wrap("short", font, 96, 1) == ["short"]


def test_image_grid_errors():
    images = [Image.new("RGB", (8, 8))] * 3
    with pytest.raises(ValueError, match="do not fit"):
        image_grid(images, 1, 2)
    with pytest.raises(ValueError, match="2 labels for 3 images"):
        image_grid(images, 2, 2, labels=["a", "b"])
    with pytest.raises(TypeError, match="images\\[1\\]"):
        image_grid([images[0], np.zeros((8, 8, 3))], 1, 2)
    with pytest.raises(ValueError, match="empty"):
        image_grid([], 1, 1)


def test_interval_bars_show_value_interval_and_chance():
    from clipcond.plots import interval_bars_image

    image = interval_bars_image(["a", "b"], [1.0, None], [0.8, None], [1.0, None], chance=0.5, height=100)
    pixels = np.asarray(image)
    red = np.argwhere((pixels == (220, 30, 30)).all(axis=-1))
    assert len(red) and np.ptp(red[:, 0]) <= 1  # one dashed line, across both bars' slots
    chance_row = red[0, 0]
    bar = np.argwhere((pixels == tuple(viridis(np.array(0.35)))).all(axis=-1))
    top, bottom = bar[:, 0].min(), bar[:, 0].max()
    assert abs((bottom - top) - 100) <= 1 and abs(chance_row - (top + 50)) <= 1  # value 1.0: the full height
    assert bar[:, 1].max() < red[:, 1].max()  # the empty bar "b" has its chance line but no bar
    with pytest.raises(ValueError, match="2 labels, 1 values"):
        interval_bars_image(["a", "b"], [0.5], [0.4], [0.6])
