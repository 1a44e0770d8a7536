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

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import PriorTransformer

from clipcond.conditioning import TextEmbeddings
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


# ----------------------------------------------------------------------------------------- text conditioning


@dataclass
class PriorTextInputs:
    """What the prior reads of a text besides the noised image embedding and the timestep."""

    proj_embedding: torch.Tensor  # (B, D) the CLIP text embedding, L2-normalised
    encoder_hidden_states: torch.Tensor  # (B, L, D) per-token states at the prior's width
    attention_mask: torch.Tensor  # (B, L) bool, True for tokens to attend to

    def to(self, device=None, dtype=None) -> PriorTextInputs:
        return PriorTextInputs(
            self.proj_embedding.to(device=device, dtype=dtype),
            self.encoder_hidden_states.to(device=device, dtype=dtype),
            self.attention_mask.to(device=device),
        )

    def __getitem__(self, index) -> PriorTextInputs:
        return PriorTextInputs(
            self.proj_embedding[index], self.encoder_hidden_states[index], self.attention_mask[index]
        )

    def repeat_interleave(self, repeats: int) -> PriorTextInputs:
        return PriorTextInputs(
            self.proj_embedding.repeat_interleave(repeats, dim=0),
            self.encoder_hidden_states.repeat_interleave(repeats, dim=0),
            self.attention_mask.repeat_interleave(repeats, dim=0),
        )

    @staticmethod
    def cat(parts: list[PriorTextInputs]) -> PriorTextInputs:
        return PriorTextInputs(
            torch.cat([p.proj_embedding for p in parts]),
            torch.cat([p.encoder_hidden_states for p in parts]),
            torch.cat([p.attention_mask for p in parts]),
        )

    @staticmethod
    def where(mask: torch.Tensor, a: PriorTextInputs, b: PriorTextInputs) -> PriorTextInputs:
        """Per sample (mask (B,) bool): `a` where True, `b` elsewhere."""
        return PriorTextInputs(
            torch.where(mask[:, None], a.proj_embedding, b.proj_embedding),
            torch.where(mask[:, None, None], a.encoder_hidden_states, b.encoder_hidden_states),
            torch.where(mask[:, None], a.attention_mask, b.attention_mask),
        )


def prior_text_inputs(text: TextEmbeddings, text_encoder) -> PriorTextInputs:
    """The frozen text encoder's outputs (`encode_prompts`, or a `TextEmbeddingCache` lookup) -> the prior's inputs.

    The pooled embedding is L2-normalised ("the CLIP text embedding"). `PriorTransformer` reads per-token states at
    its `embedding_dim`, the projection width; when the text tower is wider or narrower than that, each token's
    state goes through the tower's own frozen `text_projection` (the map that makes the pooled embedding), so any
    CLIP fits without new weights. Training and the pipeline both call this, so the prior sees the same inputs.
    """
    if text.pooled is None:
        raise ValueError("the text encoder has no projection (pooled is None); load a CLIPTextModelWithProjection")
    hidden_states = text.hidden_states  # (B, L, W)
    if hidden_states.shape[-1] != text.pooled.shape[-1]:
        weight = text_encoder.text_projection.weight  # (D, W), no bias
        projected = hidden_states.to(weight.device, weight.dtype) @ weight.T  # (B, L, D)
        hidden_states = projected.to(hidden_states.device, hidden_states.dtype)
    return PriorTextInputs(
        proj_embedding=F.normalize(text.pooled, dim=-1),
        encoder_hidden_states=hidden_states,
        attention_mask=text.attention_mask.bool(),
    )


def check_prior_fits(prior: PriorTransformer, text_encoder, context_length: int) -> None:
    """Refuse a text encoder whose embedding width or context length the prior cannot read, naming both numbers."""
    config = prior.config
    projection = text_encoder.config.projection_dim
    if projection != config.embedding_dim:
        raise ValueError(
            f"the text encoder's projection width is {projection}, but the prior's embedding_dim is "
            f"{config.embedding_dim}; train a prior on this CLIP, or load the CLIP it was trained with"
        )
    output_width = config.clip_embed_dim or config.embedding_dim
    if output_width != config.embedding_dim:
        raise ValueError(
            f"the prior predicts {output_width}-wide embeddings (clip_embed_dim) but reads {config.embedding_dim}; "
            "clipcond's prior predicts the CLIP image embedding at the CLIP's projection width"
        )
    if context_length != config.num_embeddings:
        raise ValueError(
            f"the text encoder reads {context_length} tokens, but the prior's num_embeddings is "
            f"{config.num_embeddings}; train a prior on this CLIP, or load the CLIP it was trained with"
        )


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
