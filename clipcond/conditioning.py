"""The frozen encoder's side of conditioning: prompts -> per-token states (Stable Diffusion's cross-attention
input), attention mask, and pooled projected embedding (the CLIP text embedding of the DALL-E 2 path).

Both training (through the embedding cache) and the pipelines encode prompts with `encode_prompts`, so a
decoder sees at inference exactly the states it was trained on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass
class TextEmbeddings:
    hidden_states: torch.Tensor  # (B, L, W) last-layer token states after the final layer norm
    attention_mask: torch.Tensor  # (B, L) 1 for real tokens (start, words, end), 0 for padding
    pooled: torch.Tensor | None  # (B, D) projected end-token state, or None for encoders without a projection

    def to(self, device=None, dtype=None) -> TextEmbeddings:
        return TextEmbeddings(
            hidden_states=self.hidden_states.to(device=device, dtype=dtype),
            attention_mask=self.attention_mask.to(device=device),
            pooled=None if self.pooled is None else self.pooled.to(device=device, dtype=dtype),
        )

    def __getitem__(self, index) -> TextEmbeddings:
        return TextEmbeddings(
            self.hidden_states[index], self.attention_mask[index], None if self.pooled is None else self.pooled[index]
        )

    @staticmethod
    def cat(parts: list[TextEmbeddings]) -> TextEmbeddings:
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
        return TextEmbeddings(
            torch.cat([p.hidden_states for p in parts]), torch.cat([p.attention_mask for p in parts]), pooled
        )


def context_length(text_encoder, tokenizer) -> int:
    """The number of positions the encoder reads: its position table, or the tokenizer's limit if smaller."""
    length = getattr(text_encoder.config, "max_position_embeddings", None) or tokenizer.model_max_length
    return min(length, tokenizer.model_max_length) if tokenizer.model_max_length < 10**6 else length


@torch.no_grad()
def encode_prompts(
    text_encoder,
    tokenizer,
    prompts: list[str],
    *,
    device: torch.device | str | None = None,
    max_length: int | None = None,
) -> TextEmbeddings:
    """Encode prompts with a frozen transformers text encoder (CLIPTextModel[WithProjection] or similar).

    Prompts are padded to the full context (as Stable Diffusion does, so batch composition never changes a
    prompt's states) and truncated with a warning that names what was cut.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    max_length = max_length or context_length(text_encoder, tokenizer)
    device = device or text_encoder.device
    tokens = tokenizer(prompts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    _warn_truncated(tokenizer, prompts, tokens["input_ids"], max_length)
    input_ids = tokens["input_ids"].to(device)
    attention_mask = tokens["attention_mask"].to(device)
    out = text_encoder(input_ids=input_ids, attention_mask=attention_mask)
    pooled = getattr(out, "text_embeds", None)  # CLIPTextModelWithProjection: the CLIP text embedding
    return TextEmbeddings(hidden_states=out.last_hidden_state, attention_mask=attention_mask, pooled=pooled)


def _warn_truncated(tokenizer, prompts: list[str], input_ids: torch.Tensor, max_length: int) -> None:
    full_lengths = [len(ids) for ids in tokenizer(prompts, padding=False, truncation=False)["input_ids"]]
    for prompt, ids, length in zip(prompts, input_ids, full_lengths):
        if length > max_length:
            kept = tokenizer.decode(ids, skip_special_tokens=True).strip()
            logger.warning(
                "the prompt %r has %d tokens, more than the text encoder's context of %d; it was truncated to %r",
                prompt,
                length,
                max_length,
                kept,
            )
