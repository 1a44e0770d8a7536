"""What the DALL-E 2 prior reads of a text (Ramesh et al. 2022, sec. 2.1): the CLIP text embedding and the per-token
states of the frozen text encoder (`clipcond.text_encoding`), at the prior's width, and the check that a text encoder
fits a prior. Training (`clipcond train prior`) and `clipcond.pipelines.prior.PriorPipeline` both build the prior's
inputs here, so the prior sees at inference what it was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import PriorTransformer

from clipcond.text_encoding import TextEmbeddings


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
