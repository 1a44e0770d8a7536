"""Named size presets of the models, as data: `presets/<model>.json` maps a name (`test`, `tiny`, `small`, ...) to
the fields of a config, and a JSON file of the same fields can stand in for a name."""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path

PRESETS_DIR = Path(__file__).parent / "presets"


@cache
def read_presets(path: Path) -> dict[str, dict]:
    """The presets in a JSON file by name; keys that start with "_" are notes, not presets."""
    with open(path) as f:
        return {name: preset for name, preset in json.load(f).items() if not name.startswith("_")}


def preset_fields(preset: str, presets: dict[str, dict], what: str, required: tuple[str, ...] = ()) -> dict:
    """The fields of the preset named `preset`, or of the JSON file at the path `preset`: a copy, free to change.

    `what` names the model in messages ("CLIP", "prior"); each key of `required` must be there.
    """
    if os.path.isfile(preset):
        with open(preset) as f:
            fields = json.load(f)
    elif preset in presets:
        fields = dict(presets[preset])
    else:
        raise ValueError(f"`model` must be one of {sorted(presets)} or a JSON config file, got {preset!r}")
    for key in required:
        if key not in fields:
            raise ValueError(f"{what} preset {preset!r} lacks the key {key!r}")
    return fields
