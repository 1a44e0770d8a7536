"""Tiny, randomly initialised encoders of each adapter's kind, saved to local folders: stand-ins for pretrained
models in tests and notebooks, where nothing can be downloaded. Each `save_tiny_*` returns the spec that
`clipcond.encoders.load_encoder` reads; a user with real weights passes the real folder in the same spec.

Widths are a few dozen, so that a decoder trains on them in seconds on a CPU; the weights are seeded.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch

from clipcond.storage import dumps_json

# Words of the built-in shapes captions ("a small red circle at the top left"), so that the tiny tokenizers know them.
DEFAULT_TEXTS = (
    "a small large red green blue yellow purple orange white black circle square triangle star at the top bottom "
    "left right center middle of in on"
)


def save_tiny_transformers_clip(
    folder: str | os.PathLike,
    *,
    layout: str = "stable-diffusion",
    texts: Iterable[str] = (DEFAULT_TEXTS,),
    width: int = 48,
    projection_dim: int = 32,
    image_size: int = 32,
    context_length: int = 32,
    seed: int = 0,
) -> str:
    """A tiny transformers `CLIPModel` with a BPE tokenizer trained on `texts`, saved either as one `CLIPModel`
    folder (`layout="full"`) or Stable Diffusion style (`"stable-diffusion"`: `text_encoder/` as
    `CLIPTextModelWithProjection`, `tokenizer/`, `image_encoder/`, `feature_extractor/`). Returns the spec."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    from clipcond.models.clip import image_processor_for
    from clipcond.tokenizer import train_tokenizer

    if layout not in ("full", "stable-diffusion"):
        raise ValueError(f"`layout` must be 'full' or 'stable-diffusion', got {layout!r}")
    folder = Path(folder)
    tokenizer = train_tokenizer(list(texts), vocab_size=512, context_length=context_length)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    layers = {"hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": 2, "num_attention_heads": 2}
    text = {**layers, "vocab_size": len(tokenizer), "max_position_embeddings": context_length}
    text["pad_token_id"] = tokenizer.pad_token_id
    vision = {**layers, "image_size": image_size, "patch_size": 8}
    config = CLIPConfig(
        text_config={**text, **ids, "projection_dim": projection_dim},
        vision_config={**vision, "projection_dim": projection_dim},
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    processor = image_processor_for(config)
    if layout == "full":
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        processor.save_pretrained(folder)
        return f"transformers:{folder}"
    text_model = CLIPTextModelWithProjection(config.text_config)
    text_model.text_model.load_state_dict(model.text_model.state_dict())
    text_model.text_projection.load_state_dict(model.text_projection.state_dict())
    vision_model = CLIPVisionModelWithProjection(config.vision_config)
    vision_model.vision_model.load_state_dict(model.vision_model.state_dict())
    vision_model.visual_projection.load_state_dict(model.visual_projection.state_dict())
    text_model.save_pretrained(folder / "text_encoder")
    tokenizer.save_pretrained(folder / "tokenizer")
    vision_model.save_pretrained(folder / "image_encoder")
    processor.save_pretrained(folder / "feature_extractor")
    return f"transformers:{folder}"


def tiny_open_clip_config(width: int = 32, projection_dim: int = 32, image_size: int = 32, context_length: int = 24):
    """An open_clip model config (`model_configs/*.json`'s shape) of test size, with open_clip's own vocabulary."""
    return {
        "embed_dim": projection_dim,
        "vision_cfg": {"image_size": image_size, "layers": 2, "width": width, "head_width": 16, "patch_size": 8},
        "text_cfg": {
            "context_length": context_length,
            "vocab_size": 49408,
            "width": width,
            "heads": 2,
            "layers": 2,
        },
    }


def save_tiny_open_clip(folder: str | os.PathLike, *, seed: int = 0, **config_kwargs) -> str:
    """A tiny open_clip `CLIP` (built by open_clip's factory from a JSON config), saved as `FOLDER/tiny-open-clip.json`
    + `FOLDER/open_clip_model.safetensors`. Returns `open_clip:CONFIG@WEIGHTS`."""
    from safetensors.torch import save_file

    from clipcond.encoders.open_clip import import_open_clip

    open_clip = import_open_clip()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = tiny_open_clip_config(**config_kwargs)
    config_file = folder / "tiny-open-clip.json"
    config_file.write_text(dumps_json(config, indent=2))
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**config).eval()
    weights = folder / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    return f"open_clip:{config_file}@{weights}"


def save_tiny_t5(
    folder: str | os.PathLike,
    *,
    texts: Iterable[str] = (DEFAULT_TEXTS,),
    d_model: int = 40,
    context_length: int = 32,
    seed: int = 0,
) -> str:
    """A tiny `T5EncoderModel` with a word-level tokenizer over the words of `texts` (appending `</s>`, as T5's
    tokenizers do), saved in one folder. Returns `t5:FOLDER`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    folder = Path(folder)
    words = sorted({w for text in texts for w in text.lower().split()})
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=context_length,
    )
    config = T5Config(
        vocab_size=len(vocab),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(seed)
    T5EncoderModel(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return f"t5:{folder}"
