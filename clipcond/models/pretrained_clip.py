"""A pretrained CLIP to train from (`clipcond train clip --init-from SOURCE`), as the transformers `CLIPModel` that
`clipcond train clip` trains, with the tokenizer and image statistics that belong to it.

SOURCE is a transformers `CLIPModel` folder (config.json + safetensors; its tokenizer and `preprocessor_config.json`
beside it when it has them) or a Hugging Face Hub id of one (see `clipcond.hub`), or `open_clip:MODEL@WEIGHTS`, the
spec of the `open_clip` encoder adapter (`clipcond.encoders.open_clip`): an open_clip architecture name or JSON
config and a local weights file. An open_clip CLIP is converted to a `CLIPModel` weight for weight (the mapping of
transformers' `convert_clip_original_pytorch_to_hf.py`: each fused attention input projection split into q, k, v;
the (W, D) projection matrices transposed) and brings open_clip's own tokenizer. Only the plain OpenAI-style
architecture converts (a ViT image tower pooled at the class token, a causal text tower pooled at the end token);
other open_clip options are refused by name.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerBase

from clipcond.hub import local_files_only, resolve_folder
from clipcond.lineage import content_hash
from clipcond.models.clip import check_clip_folder, load_report, pixel_statistics
from clipcond.tokenizer import load_tokenizer

OPEN_CLIP_PREFIX = "open_clip:"


@dataclass
class PretrainedClip:
    """A CLIP to train from, and where it came from."""

    model: CLIPModel
    tokenizer: PreTrainedTokenizerBase | None  # None: the folder has none (then `--tokenizer` must give it)
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    source: str  # the argument as given
    content_hash: str  # of the folder's config and weights, or of the open_clip config and weights file

    @property
    def image_size(self) -> int:
        return self.model.config.vision_config.image_size


def load_pretrained_clip(source: str, what: str = "--init-from") -> PretrainedClip:
    """The `CLIPModel` (in train mode) of `source`: a transformers CLIPModel folder or Hub id, or
    `open_clip:MODEL@WEIGHTS`. Errors name the argument `what` and the value."""
    if source.startswith(OPEN_CLIP_PREFIX):
        return _from_open_clip(source, what)
    folder = check_clip_folder(
        resolve_folder(source, what, "pass a transformers CLIPModel folder or open_clip:MODEL@WEIGHTS"),
        what,
        ("clip",),
    )
    with load_report(what, folder):
        model, info = CLIPModel.from_pretrained(folder, local_files_only=local_files_only(), output_loading_info=True)
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ValueError(f"`{what}` {source!r} lacks {len(missing)} weights of a CLIPModel (e.g. {missing[:3]})")
    has_tokenizer = any(
        (folder / name).is_file() for name in ("tokenizer.json", "vocab.json", "tokenizer_config.json")
    )
    tokenizer = load_tokenizer(folder, what) if has_tokenizer else None
    mean, std = pixel_statistics(folder, what)
    return PretrainedClip(model.train(), tokenizer, mean, std, source, content_hash(folder))


# ------------------------------------------------------------------------------------------- open_clip -> CLIPModel

# open_clip config fields that change the architecture away from OpenAI's CLIP, which `CLIPModel` cannot express;
# a config that sets one of them to anything but open_clip's default is refused.
_TEXT_FIXED = [
    "ls_init_value",
    "embed_cls",
    "no_causal_mask",
    "final_ln_after_pool",
    "pool_type",
    "proj_bias",
    "proj_type",
    "act_kwargs",
    "norm_kwargs",
    "block_type",
    "qk_norm",
    "scaled_cosine_attn",
    "scale_heads",
    "scale_attn_inner",
    "scale_attn",
    "scale_fc",
    "hf_model_name",
    "hf_tokenizer_name",
    "tokenizer_mode",
]
_VISION_FIXED = [
    "ls_init_value",
    "attentional_pool",
    "no_ln_pre",
    "pos_embed_type",
    "final_ln_after_pool",
    "pool_type",
    "act_kwargs",
    "norm_kwargs",
    "block_type",
    "qk_norm",
    "scaled_cosine_attn",
    "scale_heads",
    "scale_attn_inner",
    "scale_attn",
    "scale_fc",
    "timm_model_name",
]


def _check_plain(cfg: dict, fields: list[str], defaults, what: str, name: str, tower: str) -> None:
    default = {f.name: f.default for f in dataclasses.fields(defaults)}
    changed = [f"{k}={cfg[k]!r}" for k in fields if k in cfg and cfg[k] != default.get(k)]
    if changed:
        raise ValueError(
            f"`{what}`: open_clip model {name!r} has a {tower} that a transformers CLIPModel cannot express "
            f"({', '.join(changed)}); only OpenAI-style CLIPs convert"
        )


def _single_size(value, field: str, what: str, name: str) -> int:
    if isinstance(value, list | tuple):
        if len(set(value)) != 1:
            raise ValueError(
                f"`{what}`: open_clip model {name!r} has a non-square {field} {value}; CLIPModel needs one"
            )
        value = value[0]
    return int(value)


def open_clip_clip_config(config: dict, what: str = "--init-from", name: str = "") -> CLIPConfig:
    """The `CLIPConfig` of the same architecture as an open_clip model config (`embed_dim`, `vision_cfg`,
    `text_cfg`, `quick_gelu`), with open_clip's tokenizer's special ids (start 49406, end 49407, padding the end)."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    from clipcond.encoders.open_clip import OPENAI_VOCAB_SIZE

    text, vision = config["text_cfg"], config["vision_cfg"]
    _check_plain(text, _TEXT_FIXED, CLIPTextCfg, what, name, "text tower")
    _check_plain(vision, _VISION_FIXED, CLIPVisionCfg, what, name, "image tower")
    text_defaults = {f.name: f.default for f in dataclasses.fields(CLIPTextCfg)}
    vision_defaults = {f.name: f.default for f in dataclasses.fields(CLIPVisionCfg)}
    text = {**text_defaults, **text}
    vision = {**vision_defaults, **vision}
    if text["vocab_size"] != OPENAI_VOCAB_SIZE:
        raise ValueError(
            f"`{what}`: open_clip model {name!r} has a vocabulary of {text['vocab_size']}, but open_clip's BPE "
            f"tokenizer has {OPENAI_VOCAB_SIZE}; only models with open_clip's own tokenizer are supported"
        )
    act = "quick_gelu" if config.get("quick_gelu") else "gelu"
    end = OPENAI_VOCAB_SIZE - 1  # <end_of_text>, the highest id: open_clip's argmax pooling finds it
    width = vision["width"]
    if width % vision["head_width"]:
        raise ValueError(f"`{what}`: open_clip model {name!r}: image width {width} is no multiple of its head width")
    return CLIPConfig(
        text_config={
            "vocab_size": text["vocab_size"],
            "hidden_size": text["width"],
            "intermediate_size": int(text["width"] * text["mlp_ratio"]),
            "num_hidden_layers": text["layers"],
            "num_attention_heads": text["heads"],
            "max_position_embeddings": text["context_length"],
            "hidden_act": act,
            "bos_token_id": end - 1,
            "eos_token_id": end,
            "pad_token_id": end,
            "projection_dim": config["embed_dim"],
        },
        vision_config={
            "hidden_size": width,
            "intermediate_size": int(width * vision["mlp_ratio"]),
            "num_hidden_layers": vision["layers"],
            "num_attention_heads": width // vision["head_width"],
            "image_size": _single_size(vision["image_size"], "image_size", what, name),
            "patch_size": _single_size(vision["patch_size"], "patch_size", what, name),
            "hidden_act": act,
            "projection_dim": config["embed_dim"],
        },
        projection_dim=config["embed_dim"],
    )


def _from_open_clip(source: str, what: str) -> PretrainedClip:
    import hashlib
    import json

    from clipcond.encoders.open_clip import (
        import_open_clip,
        open_clip_model_config,
        open_clip_tokenizer,
        read_open_clip_weights,
        split_open_clip_ref,
    )
    from clipcond.models.open_clip_export import from_open_clip_state_dict
    from clipcond.storage import file_sha256

    open_clip = import_open_clip()
    model_name, weights = split_open_clip_ref(source[len(OPEN_CLIP_PREFIX) :], what)
    name, config = open_clip_model_config(model_name, what)
    clip_config = open_clip_clip_config(config, what, name)
    state = read_open_clip_weights(weights)
    try:
        if "text.token_embedding.weight" in state:  # CustomTextCLIP keeps the text tower under `text.`
            state = {(k[len("text.") :] if k.startswith("text.") else k): v for k, v in state.items()}
        converted = from_open_clip_state_dict(state, clip_config)
    except KeyError as err:
        raise ValueError(
            f"`{what}`: the weights {weights!r} lack {err} of an OpenAI-style open_clip model {name!r}; pass the "
            "checkpoint of this architecture"
        ) from None
    model = CLIPModel(clip_config)
    try:
        missing, unexpected = model.load_state_dict(converted, strict=False)
    except RuntimeError as err:  # shapes that differ
        first = str(err).split("\n\t")[1:2] or [str(err)[:200]]
        raise ValueError(
            f"`{what}`: the weights {weights!r} do not fit open_clip model {name!r} ({first[0].strip()}); pass the "
            "checkpoint of this architecture"
        ) from None
    missing = [k for k in missing if not k.endswith("position_ids")]  # buffers transformers builds itself
    if missing or unexpected:
        raise ValueError(f"`{what}`: converting {name!r} left missing {missing[:3]}, unexpected {unexpected[:3]}")
    preprocess = config.get("preprocess_cfg", {})
    vision_cfg = config["vision_cfg"]
    mean = tuple(preprocess.get("mean") or vision_cfg.get("image_mean") or open_clip.OPENAI_DATASET_MEAN)
    std = tuple(preprocess.get("std") or vision_cfg.get("image_std") or open_clip.OPENAI_DATASET_STD)
    tokenizer = open_clip_tokenizer(clip_config.text_config.max_position_embeddings)
    identity = hashlib.sha256((json.dumps(config, sort_keys=True) + file_sha256(weights)).encode()).hexdigest()
    return PretrainedClip(model.train(), tokenizer, mean, std, os.fspath(source), identity)
