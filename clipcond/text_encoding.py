"""The frozen text encoder's outputs for prompts: per-token states (Stable Diffusion's cross-attention input),
their attention mask, and the pooled projected embedding (the CLIP text embedding of the DALL-E 2 path); and the
check that a UNet reads token states of the encoder's width.

Training (through `clipcond.conditioning.TextEmbeddingCache`) and the pipelines encode prompts with
`encode_prompts`, so a decoder sees at inference the states it was trained on. The module needs torch alone: the
pipelines' code ships it in their folders (`clipcond.pipeline_code`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from clipcond.transfer import to_device

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

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

    def to_device(self, device: torch.device) -> TextEmbeddings:
        """The same on `device`, copied without making the host wait (`clipcond.transfer.to_device`)."""
        return TextEmbeddings(
            to_device(self.hidden_states, device),
            to_device(self.attention_mask, device),
            None if self.pooled is None else to_device(self.pooled, device),
        )

    def __getitem__(self, index) -> TextEmbeddings:
        return TextEmbeddings(
            self.hidden_states[index], self.attention_mask[index], None if self.pooled is None else self.pooled[index]
        )

    def without_padding_columns(self) -> TextEmbeddings:
        """The same embeddings without the trailing token columns that no row attends to (`attended_columns`)."""
        columns = attended_columns(self.attention_mask)
        return self if columns == self.attention_mask.shape[1] else self.first_columns(columns)

    def first_columns(self, columns: int) -> TextEmbeddings:
        """The first `columns` token positions of every row (the pooled embedding unchanged)."""
        return TextEmbeddings(self.hidden_states[:, :columns], self.attention_mask[:, :columns], self.pooled)

    @staticmethod
    def cat(parts: list[TextEmbeddings]) -> TextEmbeddings:
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
        return TextEmbeddings(
            torch.cat([p.hidden_states for p in parts]), torch.cat([p.attention_mask for p in parts]), pooled
        )


def attended_columns(attention_mask: torch.Tensor, multiple: int = 1) -> int:
    """How many leading token columns of a batch (attention mask (B, L)) the cross-attention needs: through the last
    column that some row attends to, rounded up to a `multiple` (at most L; a compiled model then meets a few
    shapes rather than one per caption length).

    Cross-attention with padded keys masked out is the same function over the first `attended_columns` tokens (right
    padding) as over all L, so the rest cost compute and change nothing: a shapes caption is about 12 of the `tiny`
    text encoder's 32 positions, a Stable Diffusion prompt rarely 20 of its 77. All L when some row attends to
    nothing (softmax over only masked keys is uniform, not zero). Count it on the CPU where the mask is there:
    the integer is a wait for the device otherwise.
    """
    attended = attention_mask.bool()  # (B, L)
    if not attended.any(dim=1).all():
        return attended.shape[1]
    columns = int(attended.any(dim=0).nonzero().max()) + 1
    return min(-(-columns // multiple) * multiple, attended.shape[1])


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
    mask_padding: bool = True,
) -> TextEmbeddings:
    """Encode prompts with a frozen transformers text encoder (CLIPTextModel[WithProjection] or similar).

    Prompts are padded to the full context (as Stable Diffusion does, so batch composition never changes a
    prompt's states) and truncated with a warning that names what was cut. With `mask_padding` the encoder and the
    returned mask leave the padding out; without it, as Stable Diffusion's `encode_prompt` does for CLIP, the
    encoder runs without a mask and every position counts (the returned mask is all ones), so a UNet trained on
    these states runs in stock `StableDiffusionPipeline`.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    max_length = max_length or context_length(text_encoder, tokenizer)
    device = device or text_encoder.device
    tokens = tokenizer(prompts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    _warn_truncated(tokenizer, prompts, tokens["input_ids"], max_length)
    input_ids = tokens["input_ids"].to(device)
    attention_mask = tokens["attention_mask"].to(device)
    if not mask_padding:
        attention_mask = torch.ones_like(attention_mask)
    out = text_encoder(input_ids=input_ids, attention_mask=attention_mask if mask_padding else None)
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


def check_encoder_fits(unet: UNet2DConditionModel, encoder_width: int, what: str = "text encoder") -> None:
    """Refuse an encoder whose per-token width the UNet cannot read, naming both numbers."""
    expected = unet.config.encoder_hid_dim or unet.config.cross_attention_dim
    if encoder_width != expected:
        raise ValueError(
            f"the {what} produces {encoder_width}-wide token states, but this UNet reads {expected} "
            f"(cross_attention_dim={unet.config.cross_attention_dim}, encoder_hid_dim={unet.config.encoder_hid_dim}); "
            "train a new UNet on this encoder, or load the encoder it was trained with"
        )
