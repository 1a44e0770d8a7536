"""The `open_clip:MODEL@WEIGHTS` adapter: an open_clip CLIP built by name with weights from a local file, frozen.

MODEL is an open_clip architecture name (`ViT-B-32`, see `open_clip.list_models()`) or a JSON file of the same
shape (`{"embed_dim", "vision_cfg", "text_cfg"}`, as open_clip's `model_configs/*.json`); WEIGHTS is a local
checkpoint of the whole model (`.safetensors`, or a torch file read with `weights_only=True`), e.g. an
`open_clip_pytorch_model.bin` or a file written by `torch.save(model.state_dict())`. Nothing is downloaded.

The towers become diffusers-saveable modules (`OpenClipTextModel`, `OpenClipVisionModel`: `ModelMixin`, `ConfigMixin`)
that answer like transformers' CLIP towers (`last_hidden_state`, `text_embeds` / `image_embeds`), so a decoder run
saves its open_clip text encoder in `text_encoder/` and loads back without open_clip's factory. The tokenizer is
open_clip's own BPE (the `bpe_simple_vocab_16e6.txt.gz` inside the wheel) as a transformers `CLIPTokenizer`: the
same ids up to the end token; padding is the end token (transformers' convention) where open_clip pads with 0,
which changes only the states after the end token (the text attention is causal), and those are masked.

open_clip is an optional extra: `pip install "clipcond[openclip]"`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from transformers.utils import ModelOutput

from clipcond.encoders.base import FrozenEncoder, freeze
from clipcond.storage import dumps_json, file_sha256

INSTALL_HINT = 'open_clip is not installed; install the extra with `pip install "clipcond[openclip]"`'
OPENAI_VOCAB_SIZE = 49408  # open_clip's SimpleTokenizer: 256 bytes x 2, 48894 merges, start and end tokens
START_TOKEN, END_TOKEN = "<start_of_text>", "<end_of_text>"


def import_open_clip():
    try:
        import open_clip
    except ImportError as err:
        raise ImportError(f"{INSTALL_HINT} ({err})") from None
    return open_clip


@dataclass
class OpenClipTextOutput(ModelOutput):
    last_hidden_state: torch.Tensor = None  # (B, L, W) token states after the final layer norm
    text_embeds: torch.Tensor = None  # (B, D) projected end-token state


@dataclass
class OpenClipVisionOutput(ModelOutput):
    image_embeds: torch.Tensor = None  # (B, D) projected pooled state
    patch_tokens: torch.Tensor = None  # (B, N, W) patch states (class token excluded)


class OpenClipTextModel(ModelMixin, ConfigMixin):
    r"""open_clip's text tower (`TextTransformer`) with a transformers-like interface.

    Args:
        text_cfg: open_clip's `text_cfg` (context_length, vocab_size, width, heads, layers, ...).
        projection_dim: open_clip's `embed_dim`, the width of the pooled embedding.
        quick_gelu: open_clip's `quick_gelu` (OpenAI's weights use it).
        model_name: the architecture name, for the record.
    """

    @register_to_config
    def __init__(
        self,
        text_cfg: dict,
        projection_dim: int,
        quick_gelu: bool = False,
        model_name: str = "",
        hidden_size: int | None = None,
        max_position_embeddings: int | None = None,
    ):
        super().__init__()
        from open_clip.model import _build_text_tower

        if text_cfg.get("hf_model_name") or text_cfg.get("hf_tokenizer_name"):
            raise ValueError(
                f"open_clip model {model_name!r} uses a Hugging Face text tower or tokenizer; load that model with "
                "the transformers adapter instead"
            )
        self.text = _build_text_tower(projection_dim, {**text_cfg, "output_tokens": True}, quick_gelu)
        # The facts `FrozenEncoder` and `encode_prompts` read from a config, as transformers names them.
        self.register_to_config(hidden_size=self.text.width, max_position_embeddings=self.text.context_length)

    @property
    def text_projection(self) -> torch.nn.Module:
        """The map from token-state width to embedding width as an `nn.Linear` (weight (D, W)), as transformers'
        `CLIPTextModelWithProjection.text_projection`, which the prior applies to each token's state."""
        projection = self.text.text_projection
        if isinstance(projection, torch.nn.Linear):
            return projection
        linear = torch.nn.Linear(*projection.shape, bias=False).to(projection)  # open_clip's is a (W, D) matrix
        linear.weight = torch.nn.Parameter(projection.detach().T, requires_grad=False)
        return linear

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> OpenClipTextOutput:
        # open_clip's text attention is causal and ignores padding: the mask is the consumer's business.
        pooled, tokens = self.text(input_ids)  # (B, D), (B, L, W)
        return OpenClipTextOutput(last_hidden_state=tokens, text_embeds=pooled)


class OpenClipVisionModel(ModelMixin, ConfigMixin):
    r"""open_clip's image tower with a transformers-like interface (`image_embeds`, `patch_tokens`).

    Args:
        vision_cfg: open_clip's `vision_cfg` (image_size, patch_size, width, layers, ...).
        projection_dim: open_clip's `embed_dim`.
    """

    @register_to_config
    def __init__(
        self,
        vision_cfg: dict,
        projection_dim: int,
        quick_gelu: bool = False,
        model_name: str = "",
        image_size: int | None = None,
    ):
        super().__init__()
        from open_clip.model import _build_vision_tower

        self.visual = _build_vision_tower(projection_dim, {**vision_cfg, "output_tokens": True}, quick_gelu)
        size = vision_cfg.get("image_size", 224)
        self.register_to_config(image_size=size if isinstance(size, int) else size[0])

    def forward(self, pixel_values: torch.Tensor) -> OpenClipVisionOutput:
        pooled, tokens = self.visual(pixel_values)  # (B, D), (B, N, W)
        return OpenClipVisionOutput(image_embeds=pooled, patch_tokens=tokens)


# ------------------------------------------------------------------------------------------------ tokenizer


@cache
def _openai_bpe_folder() -> tempfile.TemporaryDirectory:
    """open_clip's bundled BPE vocabulary written as transformers' `vocab.json` + `merges.txt`, once a process, in a
    temporary folder that the cache holds until the process exits and then removes."""
    from open_clip.tokenizer import SimpleTokenizer

    simple = SimpleTokenizer()
    folder = tempfile.TemporaryDirectory(prefix="clipcond-open-clip-bpe-")
    root = Path(folder.name)
    (root / "vocab.json").write_text(dumps_json(simple.encoder))
    merges = sorted(simple.bpe_ranks, key=simple.bpe_ranks.get)
    (root / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return folder


def open_clip_tokenizer(context_length: int):
    """open_clip's BPE tokenizer (lower-cased byte-level BPE, start and end tokens) as a transformers `CLIPTokenizer`
    with `model_max_length=context_length`, padding with the end token."""
    from transformers import CLIPTokenizer

    import_open_clip()
    root = Path(_openai_bpe_folder().name)
    return CLIPTokenizer(
        str(root / "vocab.json"),
        str(root / "merges.txt"),
        bos_token=START_TOKEN,
        eos_token=END_TOKEN,
        unk_token=END_TOKEN,
        pad_token=END_TOKEN,
        model_max_length=context_length,
    )


# ----------------------------------------------------------------------------------------------- the loader


def open_clip_model_config(model: str, what: str = "--text-encoder") -> tuple[str, dict]:
    """(name, config) of an open_clip architecture name or a JSON config file."""
    open_clip = import_open_clip()
    if model.endswith(".json") or os.path.isfile(model):
        if not os.path.isfile(model):
            raise FileNotFoundError(f"`{what}`: open_clip model config {model!r} does not exist")
        config = json.loads(Path(model).read_text())
        name = Path(model).stem
    else:
        config = open_clip.get_model_config(model)
        name = model
        if config is None:
            raise ValueError(
                f"`{what}`: {model!r} is no open_clip architecture (e.g. ViT-B-32; see open_clip.list_models()) "
                "and no JSON config file"
            )
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in config:
            raise ValueError(f"`{what}`: the open_clip config of {model!r} lacks {key!r}")
    return name, config


def split_open_clip_ref(ref: str, what: str = "--text-encoder") -> tuple[str, str]:
    """`MODEL@WEIGHTS` (the part after `open_clip:`) -> (MODEL, WEIGHTS), checking that the weights file exists."""
    model, sep, weights = ref.rpartition("@")
    if not sep or not model or not weights:
        raise ValueError(
            f"`{what}` open_clip:{ref}: expected open_clip:MODEL@WEIGHTS, e.g. open_clip:ViT-B-32@/models/vit-b-32.bin "
            "(weights from a local file; nothing is downloaded)"
        )
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"`{what}`: open_clip weights file {weights!r} does not exist")
    return model, weights


def read_open_clip_weights(weights: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A whole open_clip checkpoint (`.safetensors`, or a torch file read with `weights_only=True`) as a state dict."""
    import_open_clip()
    from open_clip.factory import load_state_dict

    return load_state_dict(os.fspath(weights), weights_only=True)


def _split_state_dict(state_dict: dict) -> tuple[dict, dict]:
    """A whole open_clip CLIP checkpoint -> (text tower's, image tower's) state dicts."""
    text, visual = {}, {}
    for key, value in state_dict.items():
        if key.startswith("visual."):
            visual[key[len("visual.") :]] = value
        elif key.startswith("text."):  # CustomTextCLIP
            text[key[len("text.") :]] = value
        elif (
            key.split(".")[0] in ("token_embedding", "positional_embedding", "transformer", "ln_final")
            or key == "text_projection"
            or key.startswith("text_projection.")
        ):
            text[key] = value
    return text, visual


def _load_tower(module: torch.nn.Module, state_dict: dict, what: str, name: str, tower: str) -> None:
    hint = f"`{what}`: the weights do not fit the {tower} of open_clip model {name!r}"
    try:
        missing, unexpected = module.load_state_dict(state_dict, strict=False)
    except RuntimeError as err:  # shapes that differ
        first = str(err).split("\n\t")[1:2] or [str(err)[:200]]
        raise ValueError(f"{hint} ({first[0].strip()}); pass the checkpoint of this architecture") from None
    missing = [k for k in missing if k != "attn_mask"]
    if missing or unexpected:
        raise ValueError(
            f"{hint}: missing {missing[:3]}, unexpected {unexpected[:3]}; pass the checkpoint of this architecture"
        )


def load_open_clip(ref: str, *, what: str = "--text-encoder", text: bool = True, image: bool = False) -> FrozenEncoder:
    """`MODEL@WEIGHTS` -> a frozen `FrozenEncoder` with open_clip's towers (those asked for) and tokenizer."""
    open_clip = import_open_clip()
    model, weights = split_open_clip_ref(ref, what)
    name, config = open_clip_model_config(model, what)
    state_dict = read_open_clip_weights(weights)
    text_state, visual_state = _split_state_dict(state_dict)
    quick_gelu = bool(config.get("quick_gelu", False))
    text_encoder = tokenizer = image_encoder = mean = std = None
    if text:
        text_encoder = OpenClipTextModel(config["text_cfg"], config["embed_dim"], quick_gelu, name)
        _load_tower(text_encoder.text, text_state, what, name, "text tower")
        freeze(text_encoder)
        vocab_size = text_encoder.text.vocab_size
        if vocab_size != OPENAI_VOCAB_SIZE:
            raise ValueError(
                f"`{what}`: open_clip model {name!r} has a vocabulary of {vocab_size}, but open_clip's BPE tokenizer "
                f"has {OPENAI_VOCAB_SIZE}; only models with open_clip's own tokenizer are supported"
            )
        tokenizer = open_clip_tokenizer(text_encoder.text.context_length)
    if image:
        image_encoder = OpenClipVisionModel(config["vision_cfg"], config["embed_dim"], quick_gelu, name)
        _load_tower(image_encoder.visual, visual_state, what, name, "image tower")
        freeze(image_encoder)
        vision_cfg = config["vision_cfg"]
        preprocess = config.get("preprocess_cfg", {})
        mean = tuple(preprocess.get("mean") or vision_cfg.get("image_mean") or open_clip.OPENAI_DATASET_MEAN)
        std = tuple(preprocess.get("std") or vision_cfg.get("image_std") or open_clip.OPENAI_DATASET_STD)
    identity = hashlib.sha256((json.dumps(config, sort_keys=True) + file_sha256(weights)).encode()).hexdigest()
    return FrozenEncoder(
        kind="open_clip",
        name=f"{model}@{weights}",
        content_hash=identity,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        image_encoder=image_encoder,
        image_mean=mean,
        image_std=std,
        extra={"model_name": name, "model_cfg": config},
    )
