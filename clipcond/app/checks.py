"""The checks of a page's input: each field's value, or a `RequestError` whose message names the field and what it
got (the page shows it as it is). Uploads are checked for size and pixel count before they are decoded.
"""

from __future__ import annotations

import math
import os

from clipcond.pipeline_loading import DEFAULT_SAMPLER, SCHEDULER_CHOICES, chosen_scheduler

MAX_GUIDANCE = 50.0
MAX_UPLOAD_BYTES = 25 * 2**20
MAX_UPLOAD_PIXELS = 4096 * 4096
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


class RequestError(ValueError):
    """A request the page cannot answer: the message says which field and what it got."""


def whole_number(name: str, value, low: int, high: int) -> int:
    """`value` (a page's number field: int, float or None) as an int in [low, high]."""
    if value is None or isinstance(value, bool) or not float(value).is_integer() or not low <= value <= high:
        raise RequestError(f"`{name}` must be a whole number from {low} to {high}, got {value!r}")
    return int(value)


def guidance(name: str, value) -> float:
    if value is None or not math.isfinite(float(value)) or not 0 <= float(value) <= MAX_GUIDANCE:
        raise RequestError(f"`{name}` must be a number from 0 to {MAX_GUIDANCE:g}, got {value!r}")
    return float(value)


def numbers(name: str, text: str | None) -> list[float]:
    """'1, 3, 5' -> [1.0, 3.0, 5.0]: guidance scales to compare."""
    try:
        values = [float(part) for part in (text or "").replace(";", ",").split(",") if part.strip()]
    except ValueError:
        raise RequestError(f"`{name}` must be numbers separated by commas, e.g. '1, 3, 5', got {text!r}") from None
    if not values:
        raise RequestError(f"`{name}` is empty: give numbers separated by commas, e.g. '1, 3, 5'")
    return [guidance(name, v) for v in values]


def prompt_text(name: str, value: str | None) -> str:
    text = (value or "").strip()
    if not text:
        raise RequestError(f"`{name}` is empty: type what to draw, e.g. 'a red circle'")
    return text


def scheduler_choice(value: str | None) -> str | None:
    """A page's scheduler field as `load_pipeline` takes it: unset is `DEFAULT_SAMPLER`, as on the command line;
    None for the run's own (`SAVED_SCHEDULER`)."""
    if value in (None, ""):
        return DEFAULT_SAMPLER
    if value not in SCHEDULER_CHOICES:
        raise RequestError(f"`scheduler` must be one of {list(SCHEDULER_CHOICES)}, got {value!r}")
    return chosen_scheduler(value)


def check_upload(name: str, path: str | os.PathLike | None) -> str:
    """Refuse a missing upload, one over `MAX_UPLOAD_BYTES`, or one whose header is not an image's or claims more
    than `MAX_UPLOAD_PIXELS` (read from the header alone, before any decoding); returns the file's name."""
    from PIL import Image

    if path is None or not os.path.isfile(path):
        raise RequestError(f"`{name}`: upload an image (PNG, JPEG, WebP) or pick one")
    label = os.path.basename(path)  # an upload's own name, not the server's temporary path
    size = os.path.getsize(path)
    if size > MAX_UPLOAD_BYTES:
        raise RequestError(f"`{name}` {label!r} is {size / 2**20:.1f} MiB; the limit is {MAX_UPLOAD_BYTES >> 20} MiB")
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, Image.DecompressionBombError) as err:
        raise RequestError(f"`{name}` {label!r} cannot be read as an image ({_without(err, path)})") from None
    if width * height > MAX_UPLOAD_PIXELS:
        raise RequestError(f"`{name}` {label!r} is {width}x{height} pixels; the limit is {MAX_UPLOAD_PIXELS:,} pixels")
    return label


def read_upload(name: str, path: str | os.PathLike | None):
    """An upload, checked (`check_upload`), decoded as an RGB PIL image by `clipcond.image_files.read_images`; a
    file that breaks while decoding is refused by name too."""
    from clipcond.image_files import read_images

    check_upload(name, path)
    try:
        return read_images([os.fspath(path)], what=f"`{name}`")[0]
    except ValueError as err:
        raise RequestError(_without(err, path)) from None


def _without(err: Exception, path) -> str:
    """An error's message with the server's path of the file replaced by its name (the server's folders are its
    own business)."""
    return str(err).replace(os.fspath(path), os.path.basename(path))
