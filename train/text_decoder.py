"""`clipcond train decoder --conditioning text` (the default): the Stable Diffusion path's conditioning.

The UNet cross-attends to the per-token states of the frozen text encoder (`--text-encoder SPEC` or `--clip RUN`);
with `--pooled-text` the L2-normalised pooled text embedding is also added to the timestep embedding, as Imagen and
SDXL do; with `--no-mask-text-padding` the encoder and the cross-attention read every position unmasked, as Stable
Diffusion does (the run then exports to stock diffusers: `clipcond export stable-diffusion`). Captions are dropped
to the empty prompt with probability `--caption-dropout` for classifier-free guidance. The text encoder runs once
per distinct caption, before training, into a `TextEmbeddingCache`; training steps only look rows up. The run folder
is a `TextToImagePipeline` (`unet/`, `scheduler/`, `text_encoder/`, `tokenizer/`), and validation draws a grid row
per `--validation-prompts` prompt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import UNet2DConditionModel

from clipcond.conditioning import TextEmbeddingCache, unique_captions
from clipcond.encoders.base import check_compatibility
from clipcond.models.unet import unet_config
from clipcond.text_encoding import check_encoder_fits, encode_prompts
from clipcond.train.decoder_conditioning import ConditioningPlugin, UNetInputs
from clipcond.train.diffusion import cache_text_embeddings
from clipcond.train.loop import draw_rows


class TextConditioning:
    """Per-token states of the frozen text encoder for each sample's caption, looked up in the cache; with
    probability `caption_dropout` a sample gets the empty prompt's states instead (Ho & Salimans 2022), which is
    what the pipeline's unconditional branch feeds at inference."""

    kind = "text"

    def __init__(
        self,
        cache: TextEmbeddingCache,
        sample_rows: torch.Tensor,
        caption_dropout: float,
        columns_multiple: int = 1,
        pooled: bool = False,
        mask_padding: bool = True,
    ):
        self.cache = cache
        self.mask_padding = mask_padding  # False: every position unmasked (the cache's masks are all ones), as SD
        self.sample_rows = sample_rows  # (N,) data set index -> cache row
        self.caption_dropout = caption_dropout
        self.pooled = pooled  # also return the normalised pooled text embedding as `class_labels`
        self.columns_multiple = columns_multiple  # 8 for a compiled UNet: a few shapes, not one per caption length

    def __call__(self, batch: dict, generator: torch.Generator, device: torch.device) -> UNetInputs:
        rows = self.sample_rows[batch["index"]]  # (B,) cache rows, on the CPU
        dropout = self.caption_dropout > 0
        # The cache pads to the context length; the UNet attends to the columns up to the batch's longest caption (the
        # same function, see `attended_columns`), counted on the CPU so that the step never waits on the device.
        columns = self.cache.attended_columns(rows, with_empty=dropout, multiple=self.columns_multiple)
        text = self.cache.lookup(rows, columns).to_device(device)
        hidden_states, attention_mask = text.hidden_states, text.attention_mask  # (B, L, W), (B, L)
        pooled = text.pooled if self.pooled else None  # (B, D)
        if dropout:
            batch_size = hidden_states.shape[0]
            drop = draw_rows(lambda n: torch.rand(n, generator=generator, device=generator.device), batch_size, device)
            drop = drop < self.caption_dropout  # (B,)
            empty = self.cache.lookup_empty(batch_size, columns).to_device(device)
            hidden_states = torch.where(drop[:, None, None], empty.hidden_states, hidden_states)
            attention_mask = torch.where(drop[:, None], empty.attention_mask, attention_mask)
            if pooled is not None:
                pooled = torch.where(drop[:, None], empty.pooled, pooled)
        class_labels = None if pooled is None else F.normalize(pooled, dim=-1)
        return UNetInputs(hidden_states, attention_mask if self.mask_padding else None, class_labels)

    def record(self) -> dict:
        return {
            "kind": self.kind,
            "cache": str(self.cache.path),
            "cache_key": self.cache.key,
            "num_captions": len(self.cache),
            "caption_dropout": self.caption_dropout,
            "pooled_text": self.pooled,
            "mask_text_padding": self.mask_padding,
        }


class TextPlugin(ConditioningPlugin):
    """`--conditioning text`: the frozen text encoder's per-token states (and with `--pooled-text` its pooled
    embedding), through a `TextConditioning`."""

    kind = "text"
    towers = {"text": True, "image": False}

    @property
    def width(self) -> int:
        """The width of the text encoder's per-token states."""
        return self.encoder.text_width

    def check_encoder(self, device: torch.device) -> None:
        args, encoder = self.args, self.encoder
        # A UNet built now: another --cross-attention-dim gets a learned projection (encoder_hid_dim, below)
        self.compatibility = check_compatibility(
            encoder, cross_attention_dim=args.cross_attention_dim or self.width, new_model=True
        )
        if (
            args.pooled_text
            and encode_prompts(encoder.text_encoder, encoder.tokenizer, [""], device=device).pooled is None
        ):
            raise ValueError(
                f"`--pooled-text` needs a text encoder with a projection (a pooled text embedding); {encoder.name} has none"
            )

    def encode_training_data(self, accelerator: Accelerator, dataset, resolution: int, cache_dir) -> TextConditioning:
        """The text embeddings of the distinct captions, computed once (`TextEmbeddingCache`)."""
        args = self.args
        captions, sample_rows = unique_captions(dataset.captions)
        cache = cache_text_embeddings(accelerator, args, self.encoder, captions, cache_dir, args.mask_text_padding)
        columns_multiple = 8 if args.torch_compile else 1
        self.conditioning = TextConditioning(
            cache,
            sample_rows,
            args.caption_dropout,
            columns_multiple,
            pooled=args.pooled_text,
            mask_padding=args.mask_text_padding,
        )
        return self.conditioning

    def unet_config(self, **space: int) -> dict:
        cache = self.conditioning.cache
        return unet_config(
            self.args.model,
            **space,
            cross_attention_dim=self.args.cross_attention_dim or self.width,
            encoder_hid_dim=self.width,
            pooled_text_dim=cache.empty.pooled.shape[-1] if self.args.pooled_text else None,
        )

    def trainable(self, unet: UNet2DConditionModel) -> torch.nn.Module:
        check_encoder_fits(unet, self.width)
        return unet

    def describe(self, unet: UNet2DConditionModel) -> str:
        return f"cross-attention width {unet.config.cross_attention_dim} (text encoder: {self.width})"

    def pipeline(self, model: torch.nn.Module, scheduler, **space_modules):
        from clipcond.pipelines.text_to_image import TextToImagePipeline

        return TextToImagePipeline(
            unet=model,
            scheduler=scheduler,
            text_encoder=self.encoder.text_encoder,
            tokenizer=self.encoder.tokenizer,
            mask_text_padding=self.args.mask_text_padding,
            **space_modules,
        )

    def validation_inputs(self) -> dict:
        return {"prompt": list(self.args.validation_prompts)}

    def num_validation_conditions(self) -> int:
        return len(self.args.validation_prompts)

    def data_facts(self) -> dict:
        return {"num_captions": len(self.conditioning.cache)}

    def record_sections(self) -> dict:
        return {
            "compatibility": {"projections": self.compatibility.projections},
            "conditioning": self.conditioning.record(),
        }

    def unet_record(self, unet: UNet2DConditionModel) -> dict:
        return {
            "cross_attention_dim": unet.config.cross_attention_dim,
            "encoder_hid_dim": unet.config.encoder_hid_dim,
        }
