"""Frozen encoders behind one interface (`FrozenEncoder`), loaded from a spec with `load_encoder`:
`clipcond:RUN`, `transformers:PATH`, `open_clip:MODEL@WEIGHTS`, `t5:PATH`. See `clipcond.encoders.base`."""

from clipcond.encoders.base import (
    ENCODER_KINDS,
    Compatibility,
    FrozenEncoder,
    ImageEmbeddings,
    check_compatibility,
    check_lineage,
    load_encoder,
    load_text_to_image,
    parse_spec,
    recorded_lineage,
)

__all__ = [
    "ENCODER_KINDS",
    "Compatibility",
    "FrozenEncoder",
    "ImageEmbeddings",
    "check_compatibility",
    "check_lineage",
    "load_encoder",
    "load_text_to_image",
    "parse_spec",
    "recorded_lineage",
]
