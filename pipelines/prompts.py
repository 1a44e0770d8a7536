"""Prompts as the text-conditioned pipelines (`TextToImagePipeline`, `PriorPipeline`) take them: the negative
prompts that classifier-free guidance steers away from, and one encoding of each distinct text.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import torch

logger = logging.getLogger(__name__)

# What a pipeline encodes texts into: a batch indexable by a tensor of rows, with a `cat` of batches
# (`clipcond.text_encoding.TextEmbeddings`, `clipcond.models.prior_text.PriorTextInputs`).
Encoded = TypeVar("Encoded")


def prompt_list(prompt: str | list[str]) -> list[str]:
    return [prompt] if isinstance(prompt, str) else list(prompt)


def negative_prompts(
    prompts: list[str], negative_prompt: str | list[str] | None, guidance_scale: float
) -> list[str] | None:
    """One negative prompt per prompt, or None when `guidance_scale` <= 1 turns guidance off (a `negative_prompt` is
    then ignored, with a warning). A single string serves every prompt; None is the empty prompt, the caption-dropout
    target of training, i.e. plain classifier-free guidance."""
    if guidance_scale <= 1.0:
        if negative_prompt is not None:
            logger.warning(
                "`negative_prompt` is ignored: `guidance_scale` (%s) <= 1 turns guidance off", guidance_scale
            )
        return None
    if isinstance(negative_prompt, list):
        return negative_prompt
    return [negative_prompt or ""] * len(prompts)


def encode_each_text_once(
    prompts: list[str],
    negative_prompts: list[str] | None,
    encode: Callable[[list[str]], Encoded],
    device: torch.device,
) -> tuple[Encoded, Encoded | None]:
    """`encode` the prompts, and the negative prompts when there are some, each distinct text once (the empty
    negative prompt of a batch is encoded a single time); returns their rows in the order asked for."""
    texts = list(dict.fromkeys(prompts + (negative_prompts or [])))
    encoded = encode(texts)
    index = {text: i for i, text in enumerate(texts)}

    def take(selected: list[str]) -> Encoded:
        return encoded[torch.tensor([index[text] for text in selected], device=device)]

    return take(prompts), None if negative_prompts is None else take(negative_prompts)


def encode_for_guidance(
    encode_prompt: Callable[[list[str], list[str] | None, torch.device], tuple[Encoded, Encoded | None]],
    prompt: str | list[str],
    negative_prompt: str | list[str] | None,
    guidance_scale: float,
    device: torch.device,
) -> Encoded:
    """The text batch of one guided model call: [negative prompts; prompts] (2B) when guidance is on, the prompts
    (B) alone otherwise. `encode_prompt(prompts, negative_prompts, device)` is the pipeline's own."""
    prompts = prompt_list(prompt)
    cond, uncond = encode_prompt(prompts, negative_prompts(prompts, negative_prompt, guidance_scale), device)
    return cond if uncond is None else type(cond).cat([uncond, cond])
