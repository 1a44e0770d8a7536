"""The plug-in point of `clipcond train decoder`: what the UNet is conditioned on.

`clipcond.train.decoder` is one training flow (frozen encoder -> data -> cache -> UNet -> loss -> validation ->
export -> run record); a `ConditioningPlugin` supplies what differs between conditionings at each of its steps:

- `clipcond.train.text_decoder.TextPlugin` (`--conditioning text`, the Stable Diffusion path): per-token states of a
  frozen text encoder, cross-attended to;
- `clipcond.train.unclip_decoder.ImageEmbeddingPlugin` (`--conditioning image-embedding`, the DALL-E 2 decoder):
  the CLIP image embedding, added to the timestep embedding and projected into K cross-attention tokens.

Per training step the plug-in's conditioning turns a batch into `UNetInputs` by looking rows up in a cache that the
frozen encoder filled once, before training. What the UNet denoises (pixels, or a VAE's latents:
`clipcond.train.model_space`) and how the UNet is initialised (a preset now, pretrained weights later:
`clipcond.train.decoder.build_decoder`) are the flow's, the same for every conditioning.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from accelerate import Accelerator
from diffusers import UNet2DConditionModel

from clipcond.encoders.base import FrozenEncoder
from clipcond.train.diffusion import load_frozen_encoder


@dataclass
class UNetInputs:
    """What the UNet reads for a batch besides the noisy sample and the timestep: keyword arguments of
    `UNet2DConditionModel.forward` (or of the module that wraps it)."""

    encoder_hidden_states: torch.Tensor | None  # (B, L, W) cross-attention input; None: the model makes its own
    encoder_attention_mask: torch.Tensor | None = None  # (B, L) 1 for tokens to attend to, 0 for padding
    class_labels: torch.Tensor | None = None  # (B, D) embedding added to the timestep's (class_embed_type)

    def as_kwargs(self) -> dict[str, torch.Tensor]:
        """The inputs that are given, as keyword arguments."""
        return {name: value for name, value in vars(self).items() if value is not None}


# The per-step part of a plug-in: (batch, the stage's generator, device) -> the batch's UNet inputs. It draws all its
# randomness (dropout, noise augmentation) from the generator, for the global batch (`clipcond.train.loop.draw_rows`).
BatchConditioning = Callable[[dict, torch.Generator, torch.device], UNetInputs]


class ConditioningPlugin:
    """One conditioning of the decoder trainer. The flow calls, in its order:

    0. `check_args(args)`, when the arguments are parsed;
    2. `from_args(args, device)` -> the plug-in, its frozen encoder loaded and checked against what the UNet
       will read (first: a wrong `--clip` fails before anything is read or written);
    4. `encode_training_data` -> the `BatchConditioning` that training steps call, after filling its cache;
    5. `unet_config` and `trainable`: the UNet to build and the module to train (the UNet, or the UNet and what the
       conditioning trains with it); `describe` for the log;
    7. `pipeline` (validation and export), `load_validation_inputs`, `validation_inputs` and `validation_grid`;
    8. `data_facts`, `record_sections` and `unet_record`: the plug-in's parts of the run record.
    """

    kind: ClassVar[str]  # the value of --conditioning
    towers: ClassVar[dict[str, bool]]  # which towers of the frozen encoder it reads: {"text": ..., "image": ...}

    def __init__(self, args: argparse.Namespace, encoder: FrozenEncoder):
        self.args = args
        self.encoder = encoder

    @classmethod
    def check_args(cls, args: argparse.Namespace) -> None:
        """Reject values of the conditioning's own options, naming the option and the value."""

    @classmethod
    def from_args(cls, args: argparse.Namespace, device: torch.device) -> ConditioningPlugin:
        encoder = load_frozen_encoder(args, **cls.towers).to(device)
        plugin = cls(args, encoder)
        plugin.check_encoder(device)
        return plugin

    def check_encoder(self, device: torch.device) -> None:
        """Refuse an encoder whose outputs the UNet cannot read, with the numbers and the option."""

    def encode_training_data(self, accelerator: Accelerator, dataset, resolution: int, cache_dir) -> BatchConditioning:
        """Run the frozen encoder once over `dataset` (at `resolution`) into a cache in `cache_dir`, or read the cache
        a run with the same encoder and data left there; the main process goes first, the others read its file."""
        raise NotImplementedError

    def unet_config(self, **space: int) -> dict:
        """The UNet's config (`clipcond.models.unet.unet_config` of `--model`) with the conditioning's inputs;
        `space`: `sample_size` and `in_channels` of what the UNet denoises."""
        raise NotImplementedError

    def trainable(self, unet: UNet2DConditionModel) -> torch.nn.Module:
        """The module that trains: `unet`, or a module holding it and what the conditioning trains with it."""
        return unet

    def describe(self, unet: UNet2DConditionModel) -> str:
        """The conditioning's widths, for the log."""
        raise NotImplementedError

    def pipeline(self, model: torch.nn.Module, scheduler, **space_modules):
        """The diffusers pipeline of the trained `model` (unwrapped) with `scheduler`, and what turns its samples into
        images (`space_modules`, from `clipcond.train.model_space`: the `vae` that decodes latents, or pixel space's
        `space_to_depth`): what the run folder holds."""
        raise NotImplementedError

    def load_validation_inputs(self, resolution: int) -> None:
        """Read what validation samples from (before training; only when it validates)."""

    def validation_inputs(self) -> dict[str, Any]:
        """The pipeline's conditioning arguments for the validation grid: `num_validation_conditions()` conditions,
        a grid row each."""
        raise NotImplementedError

    def num_validation_conditions(self) -> int:
        raise NotImplementedError

    def validation_grid(self, images: torch.Tensor, per_condition: int) -> tuple[torch.Tensor, int]:
        """Sampled images (C * n, 3, H, W) in [0, 1], condition by condition -> the grid's images row by row, and its
        number of columns."""
        return images, per_condition

    def data_facts(self) -> dict:
        """The conditioning's facts in the run record's `data` section."""
        return {}

    def record_sections(self) -> dict:
        """The run record's sections that describe the conditioning."""
        raise NotImplementedError

    def unet_record(self, unet: UNet2DConditionModel) -> dict:
        """The run record's facts about the UNet's conditioning inputs."""
        raise NotImplementedError
