"""A transformers `CLIPModel` as an open_clip model: `open_clip_config.json` + `open_clip_model.safetensors`.

open_clip loads a folder that holds both with `open_clip.create_model_and_transforms("local-dir:FOLDER")`; written
into a CLIP run folder, beside `config.json` and `model.safetensors`, the same folder then loads in transformers and
in open_clip. The two are the same network (Radford et al. 2021) with other names:

    transformers CLIPModel                                  open_clip CLIP
    text_model.embeddings.token_embedding.weight            token_embedding.weight
    text_model.embeddings.position_embedding.weight         positional_embedding
    text_model.encoder.layers.N.self_attn.{q,k,v}_proj      transformer.resblocks.N.attn.in_proj_{weight,bias}
                                                            (q, k, v stacked on the output axis, nn.MultiheadAttention)
    ...self_attn.out_proj, layer_norm1, layer_norm2         ...attn.out_proj, ln_1, ln_2
    ...mlp.fc1, mlp.fc2                                     ...mlp.c_fc, mlp.c_proj
    text_model.final_layer_norm                             ln_final
    text_projection.weight (D, W)                           text_projection (W, D), transposed
    vision_model.embeddings.class_embedding                 visual.class_embedding
    vision_model.embeddings.patch_embedding.weight          visual.conv1.weight
    vision_model.embeddings.position_embedding.weight       visual.positional_embedding
    vision_model.pre_layrnorm, post_layernorm               visual.ln_pre, visual.ln_post
    vision_model.encoder.layers.N...                        visual.transformer.resblocks.N... (as the text tower)
    visual_projection.weight (D, W)                         visual.proj (W, D), transposed
    logit_scale                                             logit_scale

What is not a weight goes into the config: the activation (`hidden_act` "quick_gelu" is open_clip's `quick_gelu`,
"gelu" its default `nn.GELU`), the layer norms' eps, the heads, the MLP width, and the text pooling. transformers
pools the text at the first `eos_token_id` of each sequence (open_clip's `pool_type: "eos"` with `eos_id`), except for
configs whose `eos_token_id` is 2, which it treats as OpenAI's and pools at the largest id (open_clip's default
`"argmax"`). The text attention is causal and the image attention full in both libraries.

The tokenizer: open_clip's `local-dir:` reads `text_cfg.hf_tokenizer_name` and, when it is set, loads the folder's own
transformers tokenizer (`open_clip.tokenizer.HFTokenizer`) with padding to `context_length`, so
`open_clip.get_tokenizer("local-dir:FOLDER")` gives the run tokenizer's ids. Before tokenising, `HFTokenizer` always
cleans the text (`ftfy.fix_text`, HTML unescaping twice, runs of whitespace to one space; no option turns this off),
so a text that these change (`"a &amp; b"`, curly quotes, two spaces in a row) gets the ids of its cleaned form.
The value written is the folder's absolute path: `local-dir:` ignores it, and `hf-hub:` passes it to
`AutoTokenizer.from_pretrained` as it is (a relative "." would be read from the working directory), so no value
serves both; a folder uploaded to the Hub needs the repository's id there (README, "In open_clip").
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

OPEN_CLIP_CONFIG = "open_clip_config.json"  # the names open_clip's `local-dir:` looks for (open_clip.constants)
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
OPEN_CLIP_FILES = (OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS)
# transformers' `hidden_act` -> open_clip's `quick_gelu`; open_clip builds both towers with one activation.
QUICK_GELU = {"quick_gelu": True, "gelu": False}

# Renames of one tensor, without the tower prefix; "T" marks a projection stored transposed in open_clip.
_EMBEDDINGS = {
    "text": {
        "embeddings.token_embedding.weight": "token_embedding.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "final_layer_norm.weight": "ln_final.weight",
        "final_layer_norm.bias": "ln_final.bias",
    },
    "vision": {
        "embeddings.class_embedding": "class_embedding",
        "embeddings.patch_embedding.weight": "conv1.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "pre_layrnorm.weight": "ln_pre.weight",
        "pre_layrnorm.bias": "ln_pre.bias",
        "post_layernorm.weight": "ln_post.weight",
        "post_layernorm.bias": "ln_post.bias",
    },
}
_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_TOWERS = {"text": ("text_model.", ""), "vision": ("vision_model.", "visual.")}  # (transformers, open_clip) prefixes
_PROJECTIONS = {"text_projection.weight": "text_projection", "visual_projection.weight": "visual.proj"}
_QKV = ("q_proj", "k_proj", "v_proj")  # nn.MultiheadAttention's in_proj stacks them in this order


def name_map(num_text_layers: int, num_vision_layers: int) -> dict[str, str]:
    """{transformers name: open_clip name} of every tensor that is renamed only (the projections are transposed as
    well, and q/k/v are packed: see `to_open_clip_state_dict`)."""
    names = {"logit_scale": "logit_scale"}
    for tower, layers in (("text", num_text_layers), ("vision", num_vision_layers)):
        hf, oc = _TOWERS[tower]
        names.update({hf + a: oc + b for a, b in _EMBEDDINGS[tower].items()})
        for i in range(layers):
            for a, b in _LAYER.items():
                for kind in ("weight", "bias"):
                    names[f"{hf}encoder.layers.{i}.{a}.{kind}"] = f"{oc}transformer.resblocks.{i}.{b}.{kind}"
    return names


def _packed(num_text_layers: int, num_vision_layers: int) -> dict[str, tuple[str, str, str]]:
    """{open_clip in_proj name: (transformers q, k, v names)}."""
    packed = {}
    for tower, layers in (("text", num_text_layers), ("vision", num_vision_layers)):
        hf, oc = _TOWERS[tower]
        for i in range(layers):
            for kind in ("weight", "bias"):
                packed[f"{oc}transformer.resblocks.{i}.attn.in_proj_{kind}"] = tuple(
                    f"{hf}encoder.layers.{i}.self_attn.{p}.{kind}" for p in _QKV
                )
    return packed


def _layers(config) -> tuple[int, int]:
    return config.text_config.num_hidden_layers, config.vision_config.num_hidden_layers


def to_open_clip_state_dict(state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """A transformers `CLIPModel` state dict (of `config`, a `CLIPConfig`) -> open_clip `CLIP`'s, new contiguous
    tensors. A tensor the map does not know is an error naming it (another architecture would load wrongly)."""
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith("position_ids")}  # buffers, not weights
    names, packed = name_map(*_layers(config)), _packed(*_layers(config))
    out, used = {}, set()
    for hf, oc in names.items():
        out[oc] = state_dict[hf]
        used.add(hf)
    for hf, oc in _PROJECTIONS.items():
        out[oc] = state_dict[hf].T  # (D, W) -> (W, D)
        used.add(hf)
    for oc, parts in packed.items():
        out[oc] = torch.cat([state_dict[p] for p in parts])  # (3W, W) or (3W,)
        used.update(parts)
    unknown = sorted(set(state_dict) - used)
    if unknown:
        raise ValueError(f"the CLIPModel has weights that open_clip's CLIP lacks (e.g. {unknown[:3]}); cannot export")
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def from_open_clip_state_dict(state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """The inverse of `to_open_clip_state_dict`: an open_clip `CLIP` state dict -> transformers `CLIPModel`'s.
    open_clip's non-persistent causal mask and a SigLIP `logit_bias` (no `CLIPModel` weight) are left out."""
    state_dict = {k: v for k, v in state_dict.items() if k not in ("attn_mask", "logit_bias")}
    names, packed = name_map(*_layers(config)), _packed(*_layers(config))
    out, used = {}, set()
    for hf, oc in names.items():
        out[hf] = state_dict[oc]
        used.add(oc)
    for hf, oc in _PROJECTIONS.items():
        out[hf] = state_dict[oc].T
        used.add(oc)
    for oc, parts in packed.items():
        for part, chunk in zip(parts, state_dict[oc].chunk(3), strict=True):
            out[part] = chunk
        used.add(oc)
    unknown = sorted(set(state_dict) - used)
    if unknown:
        raise ValueError(
            f"the open_clip model has weights that a CLIPModel lacks (e.g. {unknown[:3]}); cannot convert"
        )
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------- config


def _mlp_ratio(tower_config, tower: str) -> float:
    """open_clip's `mlp_ratio`, checked to give back the MLP width (open_clip uses `int(width * mlp_ratio)`)."""
    ratio = tower_config.intermediate_size / tower_config.hidden_size
    if int(tower_config.hidden_size * ratio) != tower_config.intermediate_size:
        raise ValueError(
            f"the {tower} tower's intermediate_size {tower_config.intermediate_size} is no width open_clip can build "
            f"from hidden_size {tower_config.hidden_size} (int(width * mlp_ratio))"
        )
    return ratio


def _quick_gelu(config) -> bool:
    acts = {tower: getattr(config, f"{tower}_config").hidden_act for tower in ("text", "vision")}
    for tower, act in acts.items():
        if act not in QUICK_GELU:
            raise ValueError(
                f"the {tower} tower's hidden_act {act!r} has no open_clip equivalent; expected one of {list(QUICK_GELU)}"
            )
    if QUICK_GELU[acts["text"]] != QUICK_GELU[acts["vision"]]:
        raise ValueError(f"open_clip builds both towers with one activation; this CLIP has {acts}")
    return QUICK_GELU[acts["text"]]


def open_clip_model_cfg(
    config,
    *,
    embed_dim: int | None = None,
    tokenizer_name: str | None = None,
    logit_bias: float | None = None,
) -> dict:
    """open_clip's `model_cfg` of a transformers `CLIPConfig`: the architecture that `to_open_clip_state_dict`'s
    weights load into. `embed_dim` is the projections' width (default `config.projection_dim`; a folder saved with
    another width in `text_config` than at the top has its weights' width); `tokenizer_name` (the folder of the
    transformers tokenizer) makes `get_tokenizer("local-dir:")` load that tokenizer instead of open_clip's BPE;
    `logit_bias` is a SigLIP run's learned bias."""
    text, vision = config.text_config, config.vision_config
    if vision.num_channels != 3:
        raise ValueError(f"open_clip's image tower takes RGB images; this CLIP takes {vision.num_channels} channels")
    for tower, cfg in (("text", text), ("vision", vision)):
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(
                f"the {tower} tower's hidden_size {cfg.hidden_size} is not a multiple of its "
                f"{cfg.num_attention_heads} heads"
            )
    # transformers' legacy rule (CLIPTextTransformer): an eos_token_id of 2 means "pool at the largest id".
    pool = {"pool_type": "argmax"} if text.eos_token_id == 2 else {"pool_type": "eos", "eos_id": text.eos_token_id}
    text_cfg = {
        "context_length": text.max_position_embeddings,
        "vocab_size": text.vocab_size,
        "width": text.hidden_size,
        "heads": text.num_attention_heads,
        "layers": text.num_hidden_layers,
        "mlp_ratio": _mlp_ratio(text, "text"),
        **pool,
        "pad_id": text.pad_token_id if text.pad_token_id is not None else 0,
        "norm_kwargs": {"eps": text.layer_norm_eps},
    }
    if tokenizer_name:
        text_cfg["hf_tokenizer_name"] = tokenizer_name
    cfg = {
        "embed_dim": embed_dim or config.projection_dim,
        "quick_gelu": _quick_gelu(config),
        "vision_cfg": {
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "width": vision.hidden_size,
            "head_width": vision.hidden_size // vision.num_attention_heads,
            "layers": vision.num_hidden_layers,
            "mlp_ratio": _mlp_ratio(vision, "vision"),
            "norm_kwargs": {"eps": vision.layer_norm_eps},
        },
        "text_cfg": text_cfg,
    }
    if logit_bias is not None:
        cfg["init_logit_bias"] = float(logit_bias)
    return cfg


def open_clip_preprocess_cfg(image_size: int, mean, std) -> dict:
    """open_clip's `preprocess_cfg` that matches clipcond's image reading (`clipcond.data.folders.resize_image`:
    the shorter side to `image_size`, bicubic, then the centre square) and the run's statistics."""
    return {
        "size": image_size,
        "mode": "RGB",
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }


# ---------------------------------------------------------------------------------------------------- writing


def export_open_clip(
    model,
    folder: str | os.PathLike,
    *,
    image_mean,
    image_std,
    tokenizer_name: str | None = None,
    logit_bias: float | None = None,
) -> list[Path]:
    """Write `model` (a transformers `CLIPModel`) into `folder` as open_clip's `local-dir:` layout, in fp32.

    The weights are written first and the config last, each through a scratch file renamed into place: open_clip
    builds a randomly initialised model from a config whose weights are missing, so a folder with the config always
    has its weights. Returns the paths written."""
    from clipcond.storage import save_tensors_atomic, write_json_atomic

    folder = Path(folder)
    config = model.config
    if model.text_projection.weight.shape[0] != model.visual_projection.weight.shape[0]:
        raise ValueError(
            f"the text and image projections differ in width ({model.text_projection.weight.shape[0]} vs "
            f"{model.visual_projection.weight.shape[0]}); open_clip's CLIP has one embed_dim"
        )
    embed_dim = model.text_projection.weight.shape[0]
    model_cfg = open_clip_model_cfg(config, embed_dim=embed_dim, tokenizer_name=tokenizer_name, logit_bias=logit_bias)
    tensors = to_open_clip_state_dict(model.state_dict(), config)
    tensors = {k: v.float() for k, v in tensors.items()}
    if logit_bias is not None:
        tensors["logit_bias"] = torch.tensor(float(logit_bias))
    preprocess_cfg = open_clip_preprocess_cfg(config.vision_config.image_size, image_mean, image_std)
    weights, config_file = folder / OPEN_CLIP_WEIGHTS, folder / OPEN_CLIP_CONFIG
    save_tensors_atomic(tensors, weights, metadata={"format": "pt"})
    write_json_atomic(config_file, {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg})
    return [weights, config_file]


def export_clip_run(path: str | os.PathLike) -> list[Path]:
    """Write the open_clip files into an existing CLIP folder (a `clipcond train clip` run, or any transformers
    `CLIPModel` folder with its tokenizer): the model as saved, in fp32, its image statistics from
    `preprocessor_config.json`, a SigLIP run's `logit_bias` from its run record (rounded there to 4 decimals)."""
    from clipcond.models.clip import check_clip_folder, load_clip
    from clipcond.runs import RunRecord

    path = check_clip_folder(path, "RUN", ("clip",))  # both towers: a CLIPModel folder
    # the model, its tokenizer (which open_clip will load) and statistics
    run = load_clip(path, progress=False, what="RUN")
    record = RunRecord.read_if_present(path)
    logit_bias = record.summary.get("logit_bias") if record is not None else None
    return export_open_clip(
        run.model,
        path,
        image_mean=run.image_mean,
        image_std=run.image_std,
        tokenizer_name=str(path.absolute()),
        logit_bias=logit_bias,
    )


def compare_open_clip(path: str | os.PathLike, texts: list[str], *, seed: int = 0, num_images: int = 4) -> dict:
    """Load the folder twice, as transformers' `CLIPModel` (clipcond's `load_clip`) and through open_clip's
    `local-dir:`, both fp32 on the CPU, and compare: the token ids of `texts` from `open_clip.get_tokenizer` and from
    the run's tokenizer, and the projected (unnormalised) text and image embeddings of the same inputs (`texts`
    tokenised by the run's tokenizer; `num_images` random normalised images drawn with `seed`).

    Returns `{"token_ids_equal": bool, "text_max_abs_diff": float, "image_max_abs_diff": float}`."""
    from clipcond.encoders.open_clip import import_open_clip
    from clipcond.models.clip import image_features, load_clip, text_features

    open_clip = import_open_clip()
    run = load_clip(path, progress=False)
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{path}", device="cpu", precision="fp32")
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
    ids = run.tokenize(texts, device="cpu")
    size = run.image_size
    pixels = torch.randn(num_images, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ours_text = text_features(run.model.float(), **ids)
        ours_image = image_features(run.model.float(), pixels)
        theirs_text = model.encode_text(ids["input_ids"])
        theirs_image = model.encode_image(pixels)
    return {
        "token_ids_equal": bool(torch.equal(tokenizer(texts), ids["input_ids"])),
        "text_max_abs_diff": (ours_text - theirs_text).abs().max().item(),
        "image_max_abs_diff": (ours_image - theirs_image).abs().max().item(),
    }
