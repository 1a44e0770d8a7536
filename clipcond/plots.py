"""Figures drawn with Pillow alone (matplotlib is not a dependency): labelled heatmaps and labelled image grids.

`heatmap_png` draws confusion and similarity matrices: cells coloured with a viridis-like scale, a colour bar,
row and column labels, and the value in each cell when the matrix is small. `image_grid` tiles images (pixel-art
sized ones are upscaled with NEAREST so that 32 px samples stay visible) with an optional caption under each tile.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from clipcond.storage import save_image_atomic

# matplotlib's viridis sampled at 9 evenly spaced points; interpolated linearly in between (dark blue -> yellow).
_VIRIDIS = np.array(
    [
        (68, 1, 84),
        (71, 45, 123),
        (59, 82, 139),
        (44, 114, 142),
        (33, 145, 140),
        (40, 174, 128),
        (94, 201, 98),
        (173, 220, 48),
        (253, 231, 37),
    ],
    dtype=np.float64,
)
_NAN_COLOUR = (200, 200, 200)
_WHITE = (255, 255, 255)
_BLACK = (0, 0, 0)
_MARGIN = 8  # around the figure
_GAP = 4  # between its parts


def viridis(values: np.ndarray) -> np.ndarray:
    """Colours uint8 (..., 3) for values in [0, 1] (clipped); NaN maps to grey."""
    values = np.asarray(values, dtype=np.float64)
    position = np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0) * (len(_VIRIDIS) - 1)
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, len(_VIRIDIS) - 1)
    t = (position - low)[..., None]
    colours = np.rint(_VIRIDIS[low] * (1 - t) + _VIRIDIS[high] * t).astype(np.uint8)
    colours[np.isnan(values)] = _NAN_COLOUR
    return colours


@cache
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font at `size` px (a scalable font since Pillow 10.1 with FreeType, else the bitmap one)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError, AttributeError):
        return ImageFont.load_default()


def _text_width(font, text: str) -> int:
    return int(math.ceil(font.getlength(text))) if text else 0


def _line_height(font) -> int:
    top, bottom = font.getbbox("Agjy|")[1::2]
    return int(bottom) + max(1, int(bottom - top) // 5)


def _ellipsize(text: str, font, width: int) -> str:
    """`text` + "...", with characters dropped from the end of `text` until it fits in `width` px."""
    text = text.rstrip()
    while text and _text_width(font, text + "...") > width:
        text = text[:-1].rstrip()
    return text + "..."


def _fit(text: str, font, width: int) -> str:
    """`text`, cut and ended with "..." if it is wider than `width` px."""
    return text if _text_width(font, text) <= width else _ellipsize(text, font, width)


def _cut(text: str, max_chars: int) -> str:
    """`text`, cut to `max_chars` characters ending in "..." if it is longer."""
    return text if len(text) <= max_chars else text[: max(1, max_chars - 3)].rstrip() + "..."


def _wrap(text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap into at most `max_lines` lines of at most `width` px; overflow ends the last line in "..."."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if _text_width(font, candidate) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        while _text_width(font, word) > width:  # a word wider than a line: break it by characters
            cut = max(1, len(word) - 1)
            while cut > 1 and _text_width(font, word[:cut]) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = _ellipsize(lines[-1], font, width)
    return lines


def _draw_centred(draw: ImageDraw.ImageDraw, centre: tuple[float, float], text: str, font, fill) -> None:
    # Centre the ink box by hand: anchors other than the default are not supported by bitmap fonts.
    left, top, right, bottom = font.getbbox(text)
    draw.text((centre[0] - (left + right) / 2, centre[1] - (top + bottom) / 2), text, font=font, fill=fill)


def _text_image(text: str, font, fill=_BLACK, background=_WHITE) -> Image.Image:
    """Text drawn on its own tight image (for rotated labels)."""
    width, height = max(1, _text_width(font, text)), _line_height(font)
    image = Image.new("RGB", (width, height), background)
    ImageDraw.Draw(image).text((0, 0), text, font=font, fill=fill)
    return image


def _as_array(matrix) -> np.ndarray:
    if hasattr(matrix, "detach"):  # a torch tensor, on any device and in any dtype
        matrix = matrix.detach().cpu()
        matrix = (matrix.float() if matrix.is_floating_point() else matrix).numpy()  # numpy has no bfloat16
    array = np.asarray(matrix)
    if array.ndim != 2 or 0 in array.shape:
        raise ValueError(f"`matrix` must be a non-empty 2-D array, got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise ValueError(f"`matrix` must be numeric, got dtype {array.dtype}")
    return array


@dataclass
class _HeatmapLayout:
    """Where the parts of a heatmap go, in pixels: the grid of cells at (`grid_x`, `grid_y`), row labels left of
    it, column labels under it, the colour bar right of it, the title above."""

    cell: int  # a cell's side
    fonts: dict[str, ImageFont.ImageFont | ImageFont.FreeTypeFont]  # "label", "value", "title", "axis"
    row_labels: list[str]  # cut to fit
    col_labels: list[str]
    col_label_h: int  # the height of the rotated column labels
    grid_x: int
    grid_y: int
    grid_w: int
    grid_h: int
    bar_w: int
    bar_h: int
    width: int
    height: int


def _heatmap_layout(
    shape: tuple[int, int], row_labels, col_labels, tick_labels, title, xlabel, ylabel, max_label_chars
) -> _HeatmapLayout:
    """Cells of 12-48 px (18 classes get 40 px, 64 items 12 px); fonts follow the cell size."""
    n_rows, n_cols = shape
    cell = int(np.clip(720 // max(n_rows, n_cols), 12, 48))
    fonts = {
        "label": _font(int(np.clip(cell - 2, 9, 13))),
        "value": _font(int(np.clip(cell // 3, 8, 12))),
        "title": _font(15),
        "axis": _font(12),
    }
    label_font, title_font, axis_font = fonts["label"], fonts["title"], fonts["axis"]
    label_width = 8 * max_label_chars  # px cap beside the character cap
    row_labels = [_fit(_cut(label, max_label_chars), label_font, label_width) for label in row_labels]
    col_labels = [_fit(_cut(label, max_label_chars), label_font, label_width) for label in col_labels]
    row_label_w = max(_text_width(label_font, label) for label in row_labels)
    col_label_h = max(_text_width(label_font, label) for label in col_labels)
    grid_w, grid_h = n_cols * cell, n_rows * cell
    bar_w, bar_h = 14, max(grid_h, 60)
    tick_w = max(_text_width(label_font, t) for t in tick_labels)
    title_h = _line_height(title_font) + _GAP if title else 0
    xlabel_h = _line_height(axis_font) + _GAP if xlabel else 0
    ylabel_w = _line_height(axis_font) + _GAP if ylabel else 0

    grid_x = _MARGIN + ylabel_w + row_label_w + _GAP
    grid_y = _MARGIN + title_h
    width = grid_x + grid_w + 3 * _GAP + bar_w + _GAP + tick_w + _MARGIN
    width = max(width, _text_width(title_font, title) + 2 * _MARGIN)
    height = grid_y + max(grid_h + _GAP + col_label_h + (_GAP + xlabel_h if xlabel else 0), bar_h) + _MARGIN
    return _HeatmapLayout(
        cell, fonts, row_labels, col_labels, col_label_h, grid_x, grid_y, grid_w, grid_h, bar_w, bar_h, width, height
    )


def _draw_cells(canvas: Image.Image, layout: _HeatmapLayout, values: np.ndarray, low: float, high: float, value_text):
    """The cells, with thin separators when they are big enough to need them, and the values written by
    `value_text(value)` (None: no values)."""
    draw = ImageDraw.Draw(canvas)
    cell, grid_x, grid_y, grid_w, grid_h = layout.cell, layout.grid_x, layout.grid_y, layout.grid_w, layout.grid_h
    n_rows, n_cols = values.shape
    colours = viridis((values - low) / (high - low))  # (R, C, 3)
    colours[~np.isfinite(values)] = _NAN_COLOUR
    canvas.paste(Image.fromarray(colours, "RGB").resize((grid_w, grid_h), Image.NEAREST), (grid_x, grid_y))
    if cell >= 20:
        for i in range(1, n_cols):
            draw.line([(grid_x + i * cell, grid_y), (grid_x + i * cell, grid_y + grid_h - 1)], fill=_WHITE)
        for i in range(1, n_rows):
            draw.line([(grid_x, grid_y + i * cell), (grid_x + grid_w - 1, grid_y + i * cell)], fill=_WHITE)
    if value_text is None:
        return
    for r in range(n_rows):
        for c in range(n_cols):
            if not np.isfinite(values[r, c]):
                continue
            red, green, blue = (int(x) for x in colours[r, c])
            fill = _BLACK if 0.299 * red + 0.587 * green + 0.114 * blue > 140 else _WHITE
            centre = (grid_x + c * cell + cell / 2, grid_y + r * cell + cell / 2)
            value_font = layout.fonts["value"]
            _draw_centred(draw, centre, _fit(value_text(values[r, c]), value_font, cell - 2), value_font, fill)


def _draw_labels(canvas: Image.Image, layout: _HeatmapLayout, title: str, xlabel: str | None, ylabel: str | None):
    """Rows right-aligned left of the grid, columns rotated under it (their ends touch the grid), the title and
    the axis titles."""
    draw = ImageDraw.Draw(canvas)
    label_font, axis_font, title_font = layout.fonts["label"], layout.fonts["axis"], layout.fonts["title"]
    cell, grid_x, grid_y, grid_w, grid_h = layout.cell, layout.grid_x, layout.grid_y, layout.grid_w, layout.grid_h
    line_h = _line_height(label_font)
    for r, label in enumerate(layout.row_labels):
        x = grid_x - _GAP - _text_width(label_font, label)
        draw.text((x, grid_y + r * cell + (cell - line_h) / 2), label, font=label_font, fill=_BLACK)
    for c, label in enumerate(layout.col_labels):
        rotated = _text_image(label, label_font).rotate(90, expand=True)
        x = grid_x + c * cell + (cell - rotated.width) // 2
        canvas.paste(rotated, (x, grid_y + grid_h + _GAP + layout.col_label_h - rotated.height))
    if title:
        draw.text(((layout.width - _text_width(title_font, title)) // 2, _MARGIN), title, font=title_font, fill=_BLACK)
    if xlabel:
        y = grid_y + grid_h + 2 * _GAP + layout.col_label_h
        draw.text((grid_x + (grid_w - _text_width(axis_font, xlabel)) // 2, y), xlabel, font=axis_font, fill=_BLACK)
    if ylabel:
        rotated = _text_image(ylabel, axis_font).rotate(90, expand=True)
        canvas.paste(rotated, (_MARGIN, grid_y + max(0, (grid_h - rotated.height) // 2)))


def _draw_colour_bar(canvas: Image.Image, layout: _HeatmapLayout, tick_labels: list[str]) -> None:
    """The colour bar right of the grid, high at the top, with its ends and middle marked."""
    draw = ImageDraw.Draw(canvas)
    label_font, line_h = layout.fonts["label"], _line_height(layout.fonts["label"])
    bar_x, grid_y, bar_w, bar_h = layout.grid_x + layout.grid_w + 3 * _GAP, layout.grid_y, layout.bar_w, layout.bar_h
    ramp = viridis(np.linspace(1.0, 0.0, bar_h))[:, None, :].repeat(bar_w, axis=1)  # (bar_h, bar_w, 3)
    canvas.paste(Image.fromarray(np.ascontiguousarray(ramp), "RGB"), (bar_x, grid_y))
    draw.rectangle([bar_x - 1, grid_y - 1, bar_x + bar_w, grid_y + bar_h], outline=_BLACK)
    for text, y in zip(tick_labels, (grid_y, grid_y + bar_h / 2 - line_h / 2, grid_y + bar_h - line_h)):
        draw.text((bar_x + bar_w + _GAP, y), text, font=label_font, fill=_BLACK)


def heatmap_image(
    matrix,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    title: str = "",
    *,
    vmin: float | None = None,
    vmax: float | None = None,
    annotate: bool | None = None,
    value_format: str | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
    max_label_chars: int = 40,
) -> Image.Image:
    """A heatmap of a 2-D matrix (rows top to bottom, columns left to right) as an RGB image.

    Args:
        matrix: (R, C) numbers: numpy array, torch tensor or nested lists. NaN cells are grey.
        row_labels, col_labels: one label per row / column (None: the indices). Column labels are drawn under the
            grid, rotated to read upwards; labels longer than `max_label_chars` are cut with "...".
        vmin, vmax: the ends of the colour scale (default: the matrix's finite min and max).
        annotate: write each cell's value; default when the matrix is at most 20 x 20.
        value_format: format of cell values, e.g. "{:.2f}" (default "{:d}" for integer matrices, else "{:.2f}").
        xlabel, ylabel: axis titles ("predicted", "true").
    """
    values = _as_array(matrix)
    n_rows, n_cols = values.shape
    integer = np.issubdtype(values.dtype, np.integer) or values.dtype == bool
    values = values.astype(np.float64)
    row_labels = [str(i) for i in range(n_rows)] if row_labels is None else [str(x) for x in row_labels]
    col_labels = [str(i) for i in range(n_cols)] if col_labels is None else [str(x) for x in col_labels]
    if len(row_labels) != n_rows or len(col_labels) != n_cols:
        raise ValueError(
            f"got {len(row_labels)} row labels and {len(col_labels)} column labels for a {n_rows} x {n_cols} matrix"
        )
    finite = values[np.isfinite(values)]
    low = float(vmin) if vmin is not None else float(finite.min()) if finite.size else 0.0
    high = float(vmax) if vmax is not None else float(finite.max()) if finite.size else 1.0
    if not high > low:
        high = low + 1.0
    if annotate is None:
        annotate = n_rows <= 20 and n_cols <= 20
    value_format = value_format or ("{:.0f}" if integer else "{:.2f}")
    tick_labels = [value_format.format(v) if integer else f"{v:.3g}" for v in (high, (low + high) / 2, low)]

    # 1. sizes, 2. cells, 3. labels, 4. colour bar
    layout = _heatmap_layout(
        (n_rows, n_cols), row_labels, col_labels, tick_labels, title, xlabel, ylabel, max_label_chars
    )
    canvas = Image.new("RGB", (layout.width, layout.height), _WHITE)
    value_text = (lambda v: value_format.format(int(round(v)) if integer else v)) if annotate else None
    _draw_cells(canvas, layout, values, low, high, value_text)
    _draw_labels(canvas, layout, title, xlabel, ylabel)
    _draw_colour_bar(canvas, layout, tick_labels)
    return canvas


def heatmap_png(
    matrix,
    row_labels: Sequence[str] | None,
    col_labels: Sequence[str] | None,
    path: str | os.PathLike,
    title: str = "",
    **kwargs,
) -> Path:
    """Draw `heatmap_image(matrix, row_labels, col_labels, title, **kwargs)` and save it as a PNG at `path`
    (parent folders are created). Returns the path."""
    path = Path(path)
    image = heatmap_image(matrix, row_labels, col_labels, title, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_image_atomic(image, path)


def image_grid(
    images: Sequence[Image.Image],
    rows: int,
    cols: int,
    labels: Sequence[str] | None = None,
    *,
    min_tile: int = 96,
    max_label_lines: int = 3,
    font_size: int = 12,
    padding: int = 4,
    background: tuple[int, int, int] = _WHITE,
    text_colour: tuple[int, int, int] = _BLACK,
) -> Image.Image:
    """Tile `images` row by row into a `rows` x `cols` grid, each with an optional label under it.

    Tiles are the size of the largest image, scaled by a whole factor (NEAREST, so pixels stay sharp) until their
    shorter side is at least `min_tile` px; a smaller image is centred in its tile. Labels are word-wrapped to the
    tile width, at most `max_label_lines` lines (the last one ends in "..." when the label is longer). Cells left
    over when there are fewer images than rows * cols stay empty.
    """
    if rows < 1 or cols < 1:
        raise ValueError(f"`rows` and `cols` must be >= 1, got rows={rows}, cols={cols}")
    images = list(images)
    if not images:
        raise ValueError("`images` is empty")
    if len(images) > rows * cols:
        raise ValueError(f"{len(images)} images do not fit a grid of rows={rows} x cols={cols}")
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise TypeError(f"images[{i}] must be a PIL.Image.Image, got {type(image).__name__}")
    if labels is not None:
        labels = [str(label) for label in labels]
        if len(labels) != len(images):
            raise ValueError(f"got {len(labels)} labels for {len(images)} images")
    if max_label_lines < 1:
        raise ValueError(f"`max_label_lines` must be >= 1, got {max_label_lines}")

    base_w = max(image.width for image in images)
    base_h = max(image.height for image in images)
    scale = max(1, math.ceil(min_tile / min(base_w, base_h)))
    tile_w, tile_h = base_w * scale, base_h * scale

    font = _font(font_size)
    line_h = _line_height(font)
    wrapped = [_wrap(label, font, tile_w, max_label_lines) for label in labels] if labels is not None else []
    label_h = max((len(lines) for lines in wrapped), default=0) * line_h
    label_h = label_h + padding if label_h else 0
    cell_w, cell_h = tile_w + padding, tile_h + label_h + padding

    grid = Image.new("RGB", (cols * cell_w + padding, rows * cell_h + padding), background)
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        x = padding + (i % cols) * cell_w
        y = padding + (i // cols) * cell_h
        tile = image.convert("RGB")
        if scale > 1:
            tile = tile.resize((tile.width * scale, tile.height * scale), Image.NEAREST)
        grid.paste(tile, (x + (tile_w - tile.width) // 2, y + (tile_h - tile.height) // 2))
        if labels is not None:
            for j, line in enumerate(wrapped[i]):
                line_x = x + (tile_w - _text_width(font, line)) // 2
                draw.text((line_x, y + tile_h + padding // 2 + j * line_h), line, font=font, fill=text_colour)
    return grid


def interval_bars_image(
    labels: Sequence[str],
    values: Sequence[float | None],
    lows: Sequence[float | None],
    highs: Sequence[float | None],
    *,
    chance: Sequence[float | None] | float | None = None,
    title: str = "",
    bar_width: int = 44,
    height: int = 160,
    font_size: int = 12,
) -> Image.Image:
    """A bar chart of proportions in [0, 1]: one bar per label with its interval as a whisker and, where `chance`
    gives one (a number for all bars or one per bar), a dashed red line at chance across the bar's slot. A bar whose
    value is None is left empty."""
    n = len(labels)
    if not (len(values) == len(lows) == len(highs) == n) or n == 0:
        raise ValueError(
            f"got {n} labels, {len(values)} values, {len(lows)} lows and {len(highs)} highs; give one each"
        )
    chances = list(chance) if isinstance(chance, (list, tuple)) else [chance] * n
    if len(chances) != n:
        raise ValueError(f"got {len(chances)} chance levels for {n} bars")
    font = _font(font_size)
    line_h = _line_height(font)
    axis_w = _text_width(font, "1.0") + _GAP
    slot = bar_width + 2 * _GAP
    wrapped = [_wrap(str(label), font, slot, 3) for label in labels]
    label_h = max(len(lines) for lines in wrapped) * line_h
    title_h = line_h + _GAP if title else 0
    width = 2 * _MARGIN + axis_w + n * slot
    canvas = Image.new(
        "RGB",
        (max(width, 2 * _MARGIN + _text_width(font, title)), _MARGIN * 2 + title_h + height + _GAP + label_h),
        _WHITE,
    )
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((_MARGIN, _MARGIN), title, font=font, fill=_BLACK)
    top = _MARGIN + title_h
    x0 = _MARGIN + axis_w

    def y_of(value: float) -> float:
        return top + height * (1.0 - min(max(value, 0.0), 1.0))

    for tick in (0.0, 0.5, 1.0):
        y = y_of(tick)
        draw.line((x0 - 3, y, x0 + n * slot, y), fill=(220, 220, 220))
        draw.text((_MARGIN, y - line_h / 2), f"{tick:.1f}", font=font, fill=_BLACK)
    draw.line((x0, top, x0, top + height), fill=_BLACK)
    for i in range(n):
        left = x0 + i * slot + _GAP
        if values[i] is not None:
            draw.rectangle((left, y_of(values[i]), left + bar_width, y_of(0.0)), fill=tuple(viridis(np.array(0.35))))
        if lows[i] is not None and highs[i] is not None:
            mid = left + bar_width / 2
            draw.line((mid, y_of(lows[i]), mid, y_of(highs[i])), fill=_BLACK, width=2)
            for end in (lows[i], highs[i]):
                draw.line((mid - 6, y_of(end), mid + 6, y_of(end)), fill=_BLACK, width=2)
        if chances[i] is not None:
            y = y_of(chances[i])
            for dash in range(int(left - _GAP), int(left + bar_width + _GAP), 6):
                draw.line((dash, y, min(dash + 3, left + bar_width + _GAP), y), fill=(220, 30, 30), width=2)
        for j, line in enumerate(wrapped[i]):
            line_x = left + (bar_width - _text_width(font, line)) / 2
            draw.text((line_x, top + height + _GAP + j * line_h), line, font=font, fill=_BLACK)
    return canvas
