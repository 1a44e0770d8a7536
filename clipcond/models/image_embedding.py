"""How the unCLIP decoder reads a CLIP image embedding (Ramesh et al. 2022, "Hierarchical Text-Conditional Image
Generation with CLIP Latents", sec. 2.1), in the layout of diffusers' Stable unCLIP.

The decoder is a `UNet2DConditionModel` with `class_embed_type="projection"`: its `class_labels` input, here the
*condition vector* below, goes through a small MLP and is added to the timestep embedding. Optionally
`ImageEmbeddingTokens` also projects the embedding into K extra tokens of context for the UNet's cross-attention
(unCLIP's "four extra tokens of context").

The condition vector of a unit CLIP image embedding e (B, D):

- standardised: c = sqrt(D) e, so that each coordinate has RMS 1 (a unit vector's coordinates are ~1/sqrt(D),
  which would make the projection learn D^(1/2) times slower under Adam);
- with noise augmentation (`noising_scheduler` given; Stable unCLIP's, a simpler variant: one global scale instead
  of per-dimension statistics): c is noised to level n of a DDPM schedule, sqrt(abar_n) c + sqrt(1 - abar_n) eps,
  and the sinusoidal embedding of n (width D) is concatenated, so the vector is 2D wide. Training draws n uniformly
  from [0, N]; sampling picks n (`noise_level`), trading fidelity to the embedding for variety;
- unconditional (classifier-free guidance; the target of training's embedding dropout): the ZERO vector, of the
  full width (noise-level part included, as Stable unCLIP's pipeline feeds it), and `ImageEmbeddingTokens` maps a
  zero embedding to zero tokens. `unconditional_condition` builds it; training and the pipelines use only it.

`decoder_condition` and `unet_inputs` are the one implementation that training and the pipelines share.
"""

from __future__ import annotations

import math

import torch
from diffusers import DDPMScheduler, ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.utils.torch_utils import randn_tensor
from einops import rearrange
from torch import nn


class ImageEmbeddingTokens(ModelMixin, ConfigMixin):
    r"""The CLIP image embedding as K tokens of cross-attention context: a linear map to K x W, then LayerNorm.

    The zero embedding (the unconditional input) maps to zero tokens, whose keys and values are zero: the
    cross-attention then adds only its output bias, i.e. the UNet reads no context.

    Args:
        embedding_dim: D, the width of the condition vector's embedding part (the CLIP projection width).
        num_tokens: K, the number of tokens (>= 1).
        cross_attention_dim: W, the UNet's `cross_attention_dim`.
    """

    @register_to_config
    def __init__(self, embedding_dim: int = 512, num_tokens: int = 4, cross_attention_dim: int = 512):
        super().__init__()
        if num_tokens < 1:
            raise ValueError(f"`num_tokens` must be >= 1, got {num_tokens}")
        self.proj = nn.Linear(embedding_dim, num_tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        """(B, D) standardised (possibly noised) embeddings -> (B, K, W) tokens; zero rows give zero tokens."""
        tokens = rearrange(self.proj(embeds), "b (k w) -> b k w", k=self.config.num_tokens)
        tokens = self.norm(tokens)
        keep = embeds.ne(0).any(dim=-1).to(tokens.dtype)  # (B,): 0 for the unconditional input
        return tokens * keep[:, None, None]


# ---------------------------------------------------------------------------------------- the condition vector


def make_noising_scheduler(num_train_timesteps: int = 1000) -> DDPMScheduler:
    """The schedule of the embedding's noise augmentation: Stable unCLIP's (`squaredcos_cap_v2`, 1000 levels)."""
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="squaredcos_cap_v2")


def condition_width(embedding_dim: int, noise_augmented: bool) -> int:
    """The width of the condition vector, i.e. the UNet's `projection_class_embeddings_input_dim`."""
    return 2 * embedding_dim if noise_augmented else embedding_dim


def standardise(image_embeds: torch.Tensor) -> torch.Tensor:
    """(B, D) embeddings -> L2-normalised times sqrt(D): per-coordinate RMS 1."""
    embeds = torch.nn.functional.normalize(image_embeds.float(), dim=-1)
    return embeds * math.sqrt(embeds.shape[-1])


def decoder_condition(
    image_embeds: torch.Tensor,
    *,
    noising_scheduler: DDPMScheduler | None = None,
    noise_level: torch.Tensor | int = 0,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> torch.Tensor:
    """CLIP image embeddings (B, D) (normalised here) -> the condition vector (B, D), or (B, 2D) with noise
    augmentation; float32.

    Args:
        noising_scheduler: the augmentation's noise schedule; None: no augmentation (`noise_level` must be 0).
        noise_level: level n per sample (B,) or one int for all, in [0, num_train_timesteps).
        noise: the augmentation noise (B, D); drawn from `generator` when None (and a scheduler is given).
    """
    cond = standardise(image_embeds)  # (B, D)
    batch_size, dim = cond.shape
    if noising_scheduler is None:
        # an int is checked on the host as it is: training passes 0, and a step must not wait for the device
        nonzero = noise_level.any() if isinstance(noise_level, torch.Tensor) else noise_level != 0
        if nonzero:
            raise ValueError(
                f"`noise_level` must be 0 for a decoder trained without noise augmentation, got {noise_level}"
            )
        return cond
    levels = torch.as_tensor(noise_level, device=cond.device, dtype=torch.long).expand(batch_size)
    if noise is None:
        noise = randn_tensor(cond.shape, generator=generator, device=cond.device, dtype=cond.dtype)
    cond = noising_scheduler.add_noise(cond, noise.to(cond), levels)
    level_embedding = get_timestep_embedding(levels, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
    return torch.cat([cond, level_embedding.to(cond)], dim=1)  # (B, 2D)


def unconditional_condition(condition: torch.Tensor) -> torch.Tensor:
    """The unconditional input: zeros of the condition vector's shape (B, D or 2D)."""
    return torch.zeros_like(condition)


def drop_condition(condition: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """Replace the rows where `drop` (B,) is true with the unconditional input (embedding dropout)."""
    return torch.where(drop[:, None], unconditional_condition(condition), condition)


def unet_inputs(
    condition: torch.Tensor, embedding_tokens: ImageEmbeddingTokens | None, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor | None]:
    """The UNet's conditioning keywords for a condition vector (B, D or 2D): `class_labels`, and
    `encoder_hidden_states` (B, K, W), the tokens of its embedding part (first D entries), or None without tokens."""
    dtype = dtype or condition.dtype
    tokens = None
    if embedding_tokens is not None:
        embedding = condition[:, : embedding_tokens.config.embedding_dim]
        tokens = embedding_tokens(embedding.to(embedding_tokens.dtype)).to(dtype)
    return {"class_labels": condition.to(dtype), "encoder_hidden_states": tokens}


# ------------------------------------------------------------------------------------------ the UNet


def without_cross_attention(config: dict) -> dict:
    """A `unet_config` made to need no context (the decoder with K = 0 embedding tokens): each cross-attention
    block becomes diffusers' self-attention-only block of the same level (`AttnDownBlock2D` / `AttnUpBlock2D`, with
    the preset's number of heads), and the mid block a plain ResNet block (`UNetMidBlock2D`, which in
    `UNet2DConditionModel` carries no attention). The image embedding then reaches the UNet through the class
    embedding alone, and `encoder_hidden_states` is None."""
    config = dict(config)
    channels = config["block_out_channels"]
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)  # diffusers' misnomer: heads
    heads = list(heads) if isinstance(heads, list | tuple) else [heads] * len(channels)
    down = [b.replace("CrossAttn", "Attn") for b in config["down_block_types"]]
    up = [b.replace("CrossAttn", "Attn") for b in config["up_block_types"]]
    # The self-attention blocks read `attention_head_dim` as the width of a head, and `UNet2DConditionModel` gives
    # up block i (level n-1-i) entry i of the list, not its level's: fill each entry from the down block of its
    # level where that one attends, else from the up block that reads it.
    n = len(channels)
    head_width = [channels[i] // heads[i] for i in range(n)]
    config["attention_head_dim"] = [
        head_width[i] if down[i].startswith("Attn") or not up[i].startswith("Attn") else head_width[n - 1 - i]
        for i in range(n)
    ]
    config.update(down_block_types=down, up_block_types=up, mid_block_type="UNetMidBlock2D")
    config.pop("num_attention_heads", None)
    return config


# ------------------------------------------------------------------------------------------- fit checks


def has_cross_attention(unet: UNet2DConditionModel) -> bool:
    blocks = [*unet.config.down_block_types, *unet.config.up_block_types, unet.config.mid_block_type or ""]
    return any("CrossAttn" in block for block in blocks)


def check_decoder_fits(
    unet: UNet2DConditionModel,
    embedding_dim: int,
    embedding_tokens: ImageEmbeddingTokens | None,
    noising_scheduler: DDPMScheduler | None,
    what: str = "image encoder",
) -> None:
    """Refuse a UNet / tokens / encoder combination that cannot work together, naming the numbers."""
    config = unet.config
    if config.class_embed_type != "projection":
        raise ValueError(
            f"the UNet has class_embed_type={config.class_embed_type!r}; a decoder of CLIP image embeddings needs "
            "'projection' (train it with `clipcond train decoder --conditioning image-embedding`)"
        )
    expected = condition_width(embedding_dim, noising_scheduler is not None)
    if config.projection_class_embeddings_input_dim != expected:
        augmented = "with" if noising_scheduler is not None else "without"
        raise ValueError(
            f"the {what} produces {embedding_dim}-wide image embeddings, so {augmented} noise augmentation the UNet "
            f"must read {expected}-wide class embeddings, but its projection_class_embeddings_input_dim is "
            f"{config.projection_class_embeddings_input_dim}; load the image encoder (CLIP) the decoder was trained "
            "with"
        )
    cross_attention = has_cross_attention(unet)
    if embedding_tokens is None and cross_attention:
        raise ValueError(
            "the UNet has cross-attention blocks but no `embedding_tokens` was given to feed them; pass the "
            "ImageEmbeddingTokens it was trained with"
        )
    if embedding_tokens is not None:
        if not cross_attention:
            raise ValueError("`embedding_tokens` was given, but the UNet has no cross-attention block to read them")
        tokens = embedding_tokens.config
        if tokens.embedding_dim != embedding_dim:
            raise ValueError(
                f"`embedding_tokens` reads {tokens.embedding_dim}-wide embeddings, but the {what} produces "
                f"{embedding_dim}-wide ones"
            )
        if tokens.cross_attention_dim != config.cross_attention_dim:
            raise ValueError(
                f"`embedding_tokens` makes {tokens.cross_attention_dim}-wide tokens, but the UNet's cross_attention_dim "
                f"is {config.cross_attention_dim}"
            )
