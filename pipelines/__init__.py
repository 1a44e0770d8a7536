"""diffusers pipelines over the frozen encoder (`clipcond.pipelines`).

Names are imported on first use, so importing one pipeline module does not import the others.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "TextToImagePipeline": "clipcond.pipelines.text_to_image",
    "SCHEDULERS": "clipcond.pipelines.text_to_image",
    "scheduler_from_name": "clipcond.pipelines.text_to_image",
    "PriorPipeline": "clipcond.pipelines.prior",
    "PriorPipelineOutput": "clipcond.pipelines.prior",
    "ImageVariationPipeline": "clipcond.pipelines.variation",
    "UnCLIPTextToImagePipeline": "clipcond.pipelines.unclip",
    "InterpolationOutput": "clipcond.pipelines.interpolation",
    "slerp": "clipcond.pipelines.interpolation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
