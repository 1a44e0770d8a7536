"""Finite numbers wherever numbers come in (flags, Python arguments, loaded tensors), and `null` where a figure that
goes out is not one.

NaN slips through every range check (`nan < 0` and `nan >= 1` are both False) and infinity through most, so a
`--guidance-scale nan` ran unguided and an index of NaN embeddings ranked by NaN scores. Each boundary refuses them
here, naming the flag, the argument or the file.
"""

from __future__ import annotations

import argparse
import math
from typing import Any


def finite_float(text: str) -> float:
    """argparse `type=` for a float flag: refuses NaN and infinities at parse time, which argparse reports as
    "argument --flag: must be a finite number, got 'nan'"."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def is_finite_number(value: Any) -> bool:
    """Whether `value` is an int or float (not a bool) that is neither NaN nor infinite."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_finite_tensor(tensor, what: str, fix: str = "") -> None:
    """Raise a ValueError naming `what` (e.g. "`image_embeds`" or "the index FILE") when the torch tensor holds NaN or
    infinite values, with how many, the first row they are in, and `fix`."""
    import torch

    if tensor.is_meta:  # a shape-only placeholder holds no values to check
        return
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return
    bad = (~finite).nonzero()[0].tolist()  # the first non-finite element's indices
    row = f", the first in row {bad[0]}" if tensor.ndim > 1 else f", the first at {bad[0]}"
    raise ValueError(
        f"{what} holds {int((~finite).sum())} non-finite value(s) (NaN or infinity){row}{'; ' + fix if fix else ''}"
    )


def finite_or_null(obj: Any) -> Any:
    """`obj` with every NaN or infinite float (in dicts, lists and tuples, recursively) replaced by None, which JSON
    writes as `null`: for figures that are legitimately not a number (a mean over nothing, the loss of a run that
    took no step), so that strict JSON can hold them."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {key: finite_or_null(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_or_null(value) for value in obj]
    return obj
