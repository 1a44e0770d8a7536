"""Interpolation between CLIP image embeddings, for the unCLIP pipelines' `interpolate` (Ramesh et al. 2022,
sec. 3.2: "interpolating between two images' CLIP embeddings using spherical interpolation").

`slerp` walks the great circle between two unit embeddings; `interpolation_times` spaces the frames. The pipelines
decode every frame from the same initial noise, so only the embedding changes along a row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers.utils import BaseOutput

# Below this sin(angle) the two vectors are treated as parallel: normalised linear interpolation is then exact to
# float precision, and the slerp weights sin(t w) / sin(w) would divide by ~0.
PARALLEL_EPS = 1e-6


@dataclass
class InterpolationOutput(BaseOutput):
    """
    Args:
        images: the frames, in order from the first endpoint to the second (PIL list, or "np"/"pt" arrays).
        t: the interpolation position of each frame, in [0, 1].
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    t: list[float]


def interpolation_times(num_frames: int) -> list[float]:
    """`num_frames` (>= 2) positions evenly spaced from 0 to 1, both included."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 2:
        raise ValueError(f"`num_frames` must be an integer >= 2 (both endpoints are frames), got {num_frames!r}")
    return [k / (num_frames - 1) for k in range(num_frames)]


def check_one_generator(generator) -> None:
    """An interpolation draws its noise once for every frame: from one generator (or None), not one per image."""
    if isinstance(generator, list):
        raise ValueError(
            "`generator` must be one torch.Generator for an interpolation (all frames share its noise), "
            f"got a list of {len(generator)}"
        )


def clone_generator(generator: torch.Generator) -> torch.Generator:
    """A new generator on the same device in the same state: it draws what `generator` would draw next."""
    return torch.Generator(device=generator.device).set_state(generator.get_state())


def slerp(a: torch.Tensor, b: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """Spherical linear interpolation (Shoemake 1985) between the directions of `a` and `b`.

    Args:
        a, b: (..., D) vectors of the same shape (normalised here).
        t: a number, or positions (N,): with (D,) vectors the result is then (N, D), with (B, D) vectors and (N,)
            positions (N, B, D).

    Returns unit vectors, in the dtype of `a`: a at t=0 and b at t=1 (up to the normalisation's rounding), the
    great-circle point at angle t * angle(a, b) between. Nearly parallel vectors get the normalised linear
    interpolation; exactly opposite ones have no unique great circle and raise a ValueError.
    """
    if a.shape != b.shape:
        raise ValueError(f"`a` and `b` must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    dtype = a.dtype
    a = torch.nn.functional.normalize(a.double(), dim=-1)
    b = torch.nn.functional.normalize(b.double(), dim=-1)
    t = torch.as_tensor(t, dtype=torch.float64, device=a.device)
    if t.ndim > 1:
        raise ValueError(f"`t` must be a number or a 1-D tensor of positions, got shape {tuple(t.shape)}")
    if t.ndim == 1:  # (N,) -> (N, 1, ..., 1) against (..., D)
        t = t.view(-1, *([1] * a.ndim))
    cos = (a * b).sum(dim=-1, keepdim=True).clamp(-1.0, 1.0)  # (..., 1)
    if bool((cos <= -1.0 + 1e-12).any()):
        raise ValueError("`a` and `b` point in opposite directions: no unique great circle to interpolate along")
    omega = torch.arccos(cos)
    sin_omega = torch.sin(omega)
    parallel = sin_omega < PARALLEL_EPS
    safe = torch.where(parallel, torch.ones_like(sin_omega), sin_omega)
    spherical = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / safe
    linear = (1 - t) * a + t * b
    out = torch.where(parallel, linear, spherical)
    return torch.nn.functional.normalize(out, dim=-1).to(dtype)
