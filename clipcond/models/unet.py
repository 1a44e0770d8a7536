"""The denoiser: diffusers' `UNet2DConditionModel` from named size presets (`presets/unet.json`).

clipcond sets what depends on the data and on the frozen encoder: the sample size and channels (pixels now, VAE
latents later), the cross-attention width (the text encoder's per-token width, or a projection to it through
`encoder_hid_dim`), and for the DALL-E 2 path the image-embedding input of the class embedding.
"""

from __future__ import annotations

from diffusers import UNet2DConditionModel

from clipcond.models.presets import PRESETS_DIR, preset_fields, read_presets

PRESETS_FILE = PRESETS_DIR / "unet.json"


def unet_presets() -> dict[str, dict]:
    return read_presets(PRESETS_FILE)


def sample_size_multiple(config: dict) -> int:
    """What a UNet config's sample size must be a multiple of: each level after the first halves it."""
    return 2 ** (len(config["block_out_channels"]) - 1)


def unet_config(
    preset: str,
    *,
    sample_size: int,
    cross_attention_dim: int,
    in_channels: int = 3,
    out_channels: int | None = None,
    encoder_hid_dim: int | None = None,
    image_embedding_dim: int | None = None,
    pooled_text_dim: int | None = None,
) -> dict:
    """A `UNet2DConditionModel` config from a preset name or a JSON file of the same fields.

    `encoder_hid_dim`: the encoder's per-token width when it differs from `cross_attention_dim`; the UNet then
    learns a linear projection from one to the other (`encoder_hid_dim_type="text_proj"`).
    `image_embedding_dim`: condition on an image embedding added to the timestep embedding
    (`class_embed_type="projection"`, as Stable unCLIP does).
    `pooled_text_dim`: the same input for the pooled CLIP text embedding beside the token states, as Imagen and SDXL
    add a pooled text embedding to the timestep's: one vector that summarises the whole caption ("a red circle" vs
    "two red circles"), where the causal text encoder's token states for "a red circle" are the same in both.
    """
    if image_embedding_dim is not None and pooled_text_dim is not None:
        raise ValueError("give `image_embedding_dim` or `pooled_text_dim`, not both: the UNet has one class embedding")
    config = preset_fields(preset, unet_presets(), "UNet")
    multiple = sample_size_multiple(config)
    if sample_size % multiple:
        levels = len(config["block_out_channels"])
        raise ValueError(
            f"`resolution` ({sample_size}) must be divisible by {multiple} for a UNet with {levels} levels"
        )
    config.update(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=out_channels or in_channels,
        cross_attention_dim=cross_attention_dim,
    )
    if encoder_hid_dim is not None and encoder_hid_dim != cross_attention_dim:
        config.update(encoder_hid_dim=encoder_hid_dim, encoder_hid_dim_type="text_proj")
    if image_embedding_dim is not None or pooled_text_dim is not None:
        config.update(
            class_embed_type="projection", projection_class_embeddings_input_dim=image_embedding_dim or pooled_text_dim
        )
    return config


def create_unet(config: dict) -> UNet2DConditionModel:
    return UNet2DConditionModel(**config)


# What a pretrained UNet must share with the one this run would build, and what each field is about.
UNET_INTERFACE = {
    "sample_size": "the data's resolution (--resolution)",
    "in_channels": "the channels of what it denoises",
    "out_channels": "the channels of what it predicts",
    "context_width": "the width of the token states it reads (cross_attention_dim, or encoder_hid_dim when set)",
    "cross_attention": "whether its blocks cross-attend to a context",
    "class_embed_type": "its class-embedding input (the image or pooled text embedding)",
    "projection_class_embeddings_input_dim": "the width of that class-embedding input",
}


def unet_interface(config) -> dict:
    """The fields of a UNet config (a dict or a diffusers `FrozenDict`) in `UNET_INTERFACE`."""
    blocks = list(config.get("down_block_types") or ()) + list(config.get("up_block_types") or ())
    return {
        "sample_size": config.get("sample_size"),
        "in_channels": config.get("in_channels"),
        "out_channels": config.get("out_channels"),
        "context_width": config.get("encoder_hid_dim") or config.get("cross_attention_dim"),
        "cross_attention": any("CrossAttn" in block for block in blocks),
        "class_embed_type": config.get("class_embed_type"),
        "projection_class_embeddings_input_dim": config.get("projection_class_embeddings_input_dim")
        if config.get("class_embed_type") == "projection"
        else None,
    }


def load_pretrained_unet(path, expected: dict, what: str = "--init-unet") -> tuple[UNet2DConditionModel, str]:
    """A `UNet2DConditionModel` folder (or a pipeline folder with `unet/`, Stable Diffusion's layout; or a Hugging
    Face Hub id, see `clipcond.hub`) to train on from its weights, checked against `expected`, the config of the UNet
    this run would otherwise build: each field of `UNET_INTERFACE` must agree, else a `ValueError` names `what`, the
    folder, the field and both values. Returns (UNet, the folder its weights came from)."""
    from clipcond.pipeline_loading import load_pretrained_component

    hint = "pass a UNet2DConditionModel folder (Stable Diffusion's unet/)"
    unet, folder = load_pretrained_component(path, "unet", UNet2DConditionModel, what, hint)
    got, want = unet_interface(unet.config), unet_interface(expected)
    for field, meaning in UNET_INTERFACE.items():
        if got[field] != want[field]:
            raise ValueError(
                f"`{what}` {str(folder)!r} has {field}={got[field]!r}, but this run needs {field}={want[field]!r} "
                f"({meaning}); pass a UNet that fits, or change the run's options to fit it"
            )
    return unet.train(), str(folder)
