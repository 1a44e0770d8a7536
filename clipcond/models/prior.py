"""The DALL-E 2 prior: diffusers' `PriorTransformer` from named size presets (`presets/prior.json`), and the glue
between it and the frozen CLIP.

The prior (Ramesh et al. 2022, "Hierarchical Text-Conditional Image Generation with CLIP Latents", sec. 2.1) is a
decoder-only transformer over a short sequence: the text's per-token states, the CLIP text embedding, the timestep,
the noised CLIP image embedding and a final learned query, whose output is the prediction of the unnoised image
embedding. clipcond sets what depends on the frozen CLIP: `embedding_dim` (its projection width) and
`num_embeddings` (its text context length). The image embeddings it denoises are standardised per dimension with
`clip_mean` / `clip_std`, statistics of the training set's normalised image embeddings that the model stores as
parameters (so they travel with `save_pretrained`); `PriorTransformer.post_process_latents` undoes it.
"""

from __future__ import annotations

import torch
from diffusers import PriorTransformer

from clipcond.models.presets import PRESETS_DIR, preset_fields, read_presets

PRESETS_FILE = PRESETS_DIR / "prior.json"


def prior_presets() -> dict[str, dict]:
    return read_presets(PRESETS_FILE)


def prior_config(preset: str, *, embedding_dim: int, num_embeddings: int) -> dict:
    """A `PriorTransformer` config from a preset name or a JSON file of the same fields.

    `embedding_dim`: the width of the CLIP embeddings (the projection width), which the prior reads and predicts.
    `num_embeddings`: the number of text positions it reads (the text encoder's context length).
    """
    config = preset_fields(
        preset, prior_presets(), "prior", ("num_layers", "num_attention_heads", "attention_head_dim")
    )
    config.update(embedding_dim=embedding_dim, num_embeddings=num_embeddings)
    return config


def create_prior(config: dict) -> PriorTransformer:
    prior = PriorTransformer(**config)
    # The standardisation statistics are data, not weights to learn: no gradient, no weight decay.
    prior.clip_mean.requires_grad_(False)
    prior.clip_std.requires_grad_(False)
    return prior


# ------------------------------------------------------------------------------- embedding standardisation


def embedding_statistics(image_embeds: torch.Tensor, min_std: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and standard deviation (D,), (D,) of L2-normalised image embeddings (N, D), in fp32.

    The DALL-E 2 prior denoises standardised embeddings (Karlo's `clip_mean` / `clip_std`), so every dimension of
    its target has unit variance whatever the CLIP. `min_std` keeps a constant dimension finite.
    """
    if image_embeds.ndim != 2 or image_embeds.shape[0] < 2:
        raise ValueError(f"need at least 2 embeddings (N, D) for statistics, got shape {tuple(image_embeds.shape)}")
    x = image_embeds.double()
    return x.mean(dim=0).float(), x.std(dim=0).clamp(min=min_std).float()


@torch.no_grad()
def set_embedding_statistics(prior: PriorTransformer, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Store the standardisation of the image embeddings in the prior (`clip_mean`, `clip_std`, (1, D))."""
    width = prior.clip_mean.shape[-1]
    if mean.shape != (width,) or std.shape != (width,):
        raise ValueError(
            f"statistics of shapes {tuple(mean.shape)} and {tuple(std.shape)} do not fit a prior of width {width}"
        )
    if not (std > 0).all():
        raise ValueError("`std` must be positive in every dimension")
    prior.clip_mean.data[:] = mean.to(prior.clip_mean)
    prior.clip_std.data[:] = std.to(prior.clip_std)


def standardize(prior: PriorTransformer, image_embeds: torch.Tensor) -> torch.Tensor:
    """Normalised image embeddings (B, D) -> what the prior denoises; `prior.post_process_latents` is the inverse."""
    return (image_embeds - prior.clip_mean.to(image_embeds)) / prior.clip_std.to(image_embeds)


def load_pretrained_prior(
    path, *, embedding_dim: int, num_embeddings: int, what: str = "--init-prior"
) -> tuple[PriorTransformer, str]:
    """A diffusers `PriorTransformer` folder (or a pipeline folder with `prior/`, as Karlo's; or a Hugging Face Hub
    id, see `clipcond.hub`) to train on from its weights and its standardisation statistics, checked against the
    frozen CLIP: `embedding_dim` (the CLIP's projection width) and `num_embeddings` (its text context length) must be
    the prior's, else a `ValueError` names `what`, the folder and both sizes. Returns (prior, its folder)."""
    from clipcond.pipeline_loading import load_pretrained_component

    hint = "pass a PriorTransformer folder (a prior run's prior/)"
    prior, folder = load_pretrained_component(path, "prior", PriorTransformer, what, hint)
    config = prior.config
    if config.embedding_dim != embedding_dim:
        raise ValueError(
            f"`{what}` {str(folder)!r} has embedding_dim={config.embedding_dim}, but the CLIP's projection width is "
            f"{embedding_dim}; pass a prior trained on a CLIP of that width"
        )
    if config.num_embeddings != num_embeddings:
        raise ValueError(
            f"`{what}` {str(folder)!r} has num_embeddings={config.num_embeddings}, but the CLIP's text encoder reads "
            f"{num_embeddings} tokens; pass a prior trained on a CLIP of that context length"
        )
    prior.clip_mean.requires_grad_(False)  # as `create_prior`: statistics, not weights
    prior.clip_std.requires_grad_(False)
    return prior.train(), str(folder)
