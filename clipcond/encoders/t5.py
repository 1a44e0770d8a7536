"""The `t5:PATH` adapter: a transformers T5 encoder (`T5EncoderModel`) with its tokenizer, frozen.

Not a CLIP: it gives per-token states and no pooled embedding and no image tower, which is all the Stable Diffusion
path reads (Imagen conditions on a frozen T5 the same way, Saharia et al. 2022). The DALL-E 2 path (prior, image
embeddings) refuses it. PATH holds a `T5EncoderModel` or a whole T5 (`T5ForConditionalGeneration`, whose encoder
weights `T5EncoderModel` reads), with its tokenizer in the same folder or in `tokenizer/`.

The context length is the tokenizer's `model_max_length` (T5's relative positions set no limit of their own).
"""

from __future__ import annotations

import json
import os

from clipcond.encoders.base import FrozenEncoder, freeze
from clipcond.hub import local_files_only, resolve_folder
from clipcond.lineage import content_hash
from clipcond.models.clip import load_report

T5_MODEL_TYPES = ("t5", "umt5", "mt5")
# Tokenizers that state no limit report ~1e30; such an encoder reads this many tokens of a prompt.
DEFAULT_CONTEXT_LENGTH = 77


def load_t5(path: str | os.PathLike, *, what: str = "--text-encoder") -> FrozenEncoder:
    """A T5 encoder folder as a frozen, text-only `FrozenEncoder`."""
    from transformers import AutoTokenizer, T5EncoderModel

    root = resolve_folder(path, what, "pass a transformers T5 folder or a Hugging Face Hub id")
    model_dir = root / "text_encoder" if (root / "text_encoder" / "config.json").is_file() else root
    config_file = model_dir / "config.json"
    model_type = json.loads(config_file.read_text()).get("model_type") if config_file.is_file() else None
    if model_type not in T5_MODEL_TYPES:
        found = f"model_type {model_type!r}" if config_file.is_file() else "no config.json"
        raise ValueError(
            f"`{what}` {str(root)!r} is not a T5 folder ({found}; expected one of {list(T5_MODEL_TYPES)})"
        )
    with load_report(what, model_dir):
        model, info = T5EncoderModel.from_pretrained(
            model_dir, local_files_only=local_files_only(), output_loading_info=True
        )
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ValueError(f"`{what}` {str(model_dir)!r} lacks {len(missing)} encoder weights (e.g. {missing[:3]})")
    tokenizer_dir = root / "tokenizer" if (root / "tokenizer").is_dir() else root
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=local_files_only())
    except (OSError, ValueError) as err:
        raise ValueError(f"`{what}` {str(root)!r}: cannot load its tokenizer ({err})") from None
    if tokenizer.model_max_length > 10**6:
        tokenizer.model_max_length = DEFAULT_CONTEXT_LENGTH
    return FrozenEncoder(
        kind="t5",
        name=os.fspath(path),  # as given: a Hub id stays an id, not its cache folder
        content_hash=content_hash(model_dir),
        text_encoder=freeze(model),
        tokenizer=tokenizer,
    )
