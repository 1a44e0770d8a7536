"""A LLaVA-style captioner: a frozen CLIP image tower, a two-layer MLP projector, and a small decoder-only language
model from transformers that reads the projected image tokens before the text.

Liu et al. 2023, "Visual Instruction Tuning" (LLaVA) and "Improved Baselines with Visual Instruction Tuning"
(LLaVA-1.5): the vision tower's penultimate-layer patch states (`clipcond.vision_tokens`) go through the projector
(`mlp2x_gelu`: Linear, GELU, Linear) into the language model's embedding space and are prepended to the token
embeddings (`inputs_embeds`); the model is trained with the next-token loss on the answer only (labels -100 on the
image tokens and on the prompt). Here the pooled CLIP image embedding is one more image token, through its own MLP.

The sequence the language model reads, for a caption and for a question:

    [image tokens (P + 1)] <bos> caption <eos>
    [image tokens (P + 1)] <bos> question: QUESTION answer: ANSWER <eos>

A captioner folder (`Captioner.save_pretrained`):

    lm/              the language model and its tokenizer: `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained`
    projector/       `VisionProjector` (config.json + safetensors)
    vision_encoder/  the frozen CLIP image tower (`CLIPVisionModelWithProjection`) and its preprocessor_config.json
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

from clipcond.models.presets import PRESETS_DIR, preset_fields, read_presets
from clipcond.vision_tokens import DEFAULT_SELECT_LAYER, vision_tokens

LM_FOLDER, PROJECTOR_FOLDER, VISION_FOLDER = "lm", "projector", "vision_encoder"
IGNORE_INDEX = -100  # transformers' cross-entropy skips these labels
CAPTION_BEST_OF = 8  # candidates per image of a caption (`Captioner.generate_best_of`), unless the user asks otherwise


def lm_presets() -> dict[str, dict]:
    return read_presets(PRESETS_DIR / "lm.json")


def lm_config(preset: str, *, tokenizer, max_position_embeddings: int):
    """A `LlamaConfig` of the preset `preset` (or a JSON file of its fields) for `tokenizer`'s vocabulary and
    special tokens."""
    from transformers import LlamaConfig

    fields = preset_fields(preset, lm_presets(), "language model", required=("hidden_size", "num_hidden_layers"))
    return LlamaConfig(
        **fields,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=max_position_embeddings,
    )


def position_limit(lm) -> int | None:
    """The positions a causal LM reads at most (`max_position_embeddings`, GPT-2's `n_positions`), or None when its
    config names no limit. A learned position table (GPT-2) fails with an index error past it; a rotary one (Llama)
    runs on, beyond the positions it was trained at."""
    return getattr(lm.config, "max_position_embeddings", None)


def lm_hidden_size(lm) -> int:
    """The width of a causal LM's token embeddings (whatever its config calls it)."""
    return lm.get_input_embeddings().embedding_dim


class VisionProjector(ModelMixin, ConfigMixin):
    r"""CLIP patch tokens and the pooled embedding -> image tokens of the language model's width.

    LLaVA-1.5's `mlp2x_gelu` (Linear, GELU, Linear) on the patch tokens, and one of its own on the pooled embedding.

    Args:
        vision_width: W, the vision tower's hidden size (patch token width).
        embed_dim: D, the CLIP projection width (the pooled image embedding).
        hidden_size: H, the language model's embedding width.
        select_layer: the vision tower's hidden layer the patch tokens come from (LLaVA's -2).
    """

    @register_to_config
    def __init__(
        self,
        vision_width: int = 128,
        embed_dim: int = 128,
        hidden_size: int = 128,
        select_layer: int = DEFAULT_SELECT_LAYER,
    ):
        super().__init__()
        self.patch = nn.Sequential(
            nn.Linear(vision_width, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size)
        )
        self.pooled = nn.Sequential(nn.Linear(embed_dim, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, patch_tokens: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """(B, P, W) patch tokens, (B, D) image embeddings -> (B, P + 1, H) image tokens, the pooled one last."""
        pooled = self.pooled(image_embeds)[:, None]  # (B, 1, H)
        return torch.cat([self.patch(patch_tokens), pooled], dim=1)


class CaptionerModel(nn.Module):
    """The trainable part, as one module for Accelerate: the projector and the language model."""

    def __init__(self, projector: VisionProjector, lm):
        super().__init__()
        self.projector, self.lm = projector, lm

    def inputs(self, patch_tokens, image_embeds, input_ids, attention_mask, dropped=None):
        """The LM's `inputs_embeds` (B, V + T, H) and attention mask (B, V + T): image tokens, then the text, whose
        tokens where `dropped` (B, T) is True read as zero vectors (word dropout without an unknown token)."""
        image = self.projector(patch_tokens, image_embeds)  # (B, V, H)
        text = self.lm.get_input_embeddings()(input_ids)  # (B, T, H)
        if dropped is not None:
            text = text.masked_fill(dropped[..., None], 0.0)
        mask = torch.cat([attention_mask.new_ones(image.shape[:2]), attention_mask], dim=1)
        return torch.cat([image.to(text.dtype), text], dim=1), mask

    def forward(self, patch_tokens, image_embeds, input_ids, attention_mask, labels, dropped=None) -> torch.Tensor:
        """The mean next-token loss over the labelled text tokens."""
        embeds, mask = self.inputs(patch_tokens, image_embeds, input_ids, attention_mask, dropped)
        ignore = labels.new_full((labels.shape[0], embeds.shape[1] - labels.shape[1]), IGNORE_INDEX)
        return self.lm(inputs_embeds=embeds, attention_mask=mask, labels=torch.cat([ignore, labels], 1)).loss


# ------------------------------------------------------------------------------------------------ text layout


def question_prompt(question: str) -> str:
    """The text before the answer of a question (the caption task has none)."""
    return f"question: {question.strip()} answer:"


def start_token_id(tokenizer) -> int:
    """The token every text starts with: the tokenizer's begin token, or its end token when it has none (GPT-2)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def prompt_ids(tokenizer, question: str | None) -> list[int]:
    """<bos> (+ the question's prompt): what the model reads before it writes."""
    ids = [start_token_id(tokenizer)]
    if question is not None:
        ids += tokenizer(question_prompt(question), add_special_tokens=False)["input_ids"]
    return ids


def target_ids(tokenizer, text: str, max_tokens: int | None = None) -> list[int]:
    """The tokens the model learns to write: the text (its first `max_tokens` - 1 tokens), then <eos>."""
    ids = tokenizer(text.strip(), add_special_tokens=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[: max_tokens - 1]
    return ids + [tokenizer.eos_token_id]


def text_batch(
    prompts: list[list[int]], targets: list[list[int]], pad_token_id: int, device: torch.device | str | None = None
) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `labels` (B, T) of prompt + target sequences, on `device`;
    only the targets are labelled."""
    length = max(len(p) + len(t) for p, t in zip(prompts, targets, strict=True))
    input_ids, labels, mask = [], [], []
    for p, t in zip(prompts, targets, strict=True):
        pad = length - len(p) - len(t)
        input_ids.append(p + t + [pad_token_id] * pad)
        labels.append([IGNORE_INDEX] * len(p) + t + [IGNORE_INDEX] * pad)
        mask.append([1] * (len(p) + len(t)) + [0] * pad)
    columns = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    return {name: torch.tensor(rows, dtype=torch.long, device=device) for name, rows in columns.items()}


# ------------------------------------------------------------------------------------------------ the captioner


@dataclass
class Captioner:
    """A trained captioner for inference: images (and a question) in, text out. Load with `from_pretrained`."""

    vision_encoder: nn.Module  # CLIPVisionModelWithProjection, frozen
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    projector: VisionProjector
    lm: nn.Module  # a transformers causal LM
    tokenizer: object

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    @property
    def image_size(self) -> int:
        return self.vision_encoder.config.image_size

    def to(self, device=None) -> Captioner:
        for model in (self.vision_encoder, self.projector, self.lm):
            model.to(device)
        return self

    def save_pretrained(self, path: str | os.PathLike) -> None:
        from clipcond.models.clip import image_processor_for

        path = Path(path)
        self.lm.save_pretrained(path / LM_FOLDER)
        self.tokenizer.save_pretrained(path / LM_FOLDER)
        self.projector.save_pretrained(path / PROJECTOR_FOLDER)
        self.vision_encoder.save_pretrained(path / VISION_FOLDER)
        image_processor_for(self.vision_encoder.config, self.image_mean, self.image_std).save_pretrained(
            path / VISION_FOLDER
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, what: str = "--model") -> Captioner:
        """The captioner saved in the folder `path` (a captioner run, or one of its checkpoints' `pretrained/`)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from clipcond.models.clip import load_vision_tower

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"`{what}` folder {str(path)!r} does not exist; pass a captioner run folder")
        missing = [name for name in (LM_FOLDER, PROJECTOR_FOLDER, VISION_FOLDER) if not (path / name).is_dir()]
        if missing:
            raise ValueError(
                f"`{what}` {str(path)!r} is not a captioner folder (no {', '.join(missing)}/); pass the output of "
                "`clipcond train captioner`"
            )
        vision_encoder, mean, std = load_vision_tower(path / VISION_FOLDER, what)
        projector = VisionProjector.from_pretrained(path / PROJECTOR_FOLDER).eval()
        lm = AutoModelForCausalLM.from_pretrained(path / LM_FOLDER).eval()
        tokenizer = AutoTokenizer.from_pretrained(path / LM_FOLDER)
        return cls(vision_encoder, mean, std, projector, lm, tokenizer)

    def pixels(self, images) -> torch.Tensor:
        """PIL images, or uint8 tensors ((B, 3, H, W), or a list of (3, H, W)) -> uint8 (B, 3, size, size) at the
        vision tower's `image_size`: resized (antialiased) and centre-cropped to it, PIL images by
        `resize_image`, tensors by `resize_images`."""
        from clipcond.data.folders import image_to_tensor, resize_image, to_rgb
        from clipcond.models.clip_pixels import resize_images

        if isinstance(images, torch.Tensor):
            return resize_images(images, self.image_size)
        return torch.stack(
            [
                resize_images(im[None], self.image_size)[0]
                if isinstance(im, torch.Tensor)
                else image_to_tensor(resize_image(to_rgb(im), self.image_size))
                for im in images
            ]
        )

    @torch.no_grad()
    def image_tokens(self, images) -> tuple[torch.Tensor, torch.Tensor]:
        """(patch tokens (B, P, W), image embeddings (B, D)) of the images, on the model's device."""
        from clipcond.models.clip_pixels import normalize_pixels

        pixels = self.pixels(images).to(self.device)
        pixel_values = normalize_pixels(pixels, self.image_mean, self.image_std)
        return vision_tokens(self.vision_encoder, pixel_values, self.projector.config.select_layer)

    def check_positions(self, prefix_length: int, max_new_tokens: int, what: str = "max_new_tokens") -> None:
        """Reject a `max_new_tokens` that would run past the language model's positions (`position_limit`) after a
        prefix (image tokens, <bos>, prompt) of `prefix_length`: the last token written is never read back. The
        error names the argument `what` (a command's flag, a page's field)."""
        limit = position_limit(self.lm)
        if limit is not None and prefix_length > limit:  # no room for a single token, whatever `what` says
            raise ValueError(
                f"the image and prompt tokens ({prefix_length}) fill the language model's {limit} positions: "
                "shorten the question"
            )
        if limit is not None and prefix_length + max_new_tokens - 1 > limit:
            raise ValueError(
                f"`{what}` {max_new_tokens} runs past the language model's {limit} positions after "
                f"{prefix_length} image and prompt tokens: pass {what} <= {limit - prefix_length + 1}"
            )

    def generate(self, images=None, prompt: str | list[str | None] | None = None, **options) -> list[str]:
        """The text the model writes for each image: a caption (`prompt` None) or the answer to the question `prompt`
        (one for all images, or one per image); `options` as `generate_scored`'s."""
        return self.generate_scored(images, prompt, **options)[0]

    @torch.no_grad()
    def generate_scored(
        self,
        images=None,
        prompt: str | list[str | None] | None = None,
        *,
        image_tokens: tuple[torch.Tensor, torch.Tensor] | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        max_new_tokens_name: str = "max_new_tokens",
    ) -> tuple[list[str], torch.Tensor]:
        """The text the model writes for each image (a caption, `prompt` None, or the answer to the question
        `prompt`, one for all images or one per image), and how likely the model finds each (B,): the mean
        log-probability of the tokens it wrote, the end token included, under its own distribution (untempered,
        whatever `temperature` sampled).

        Greedy, or sampled at `temperature` from `generator` (on the model's device); `image_tokens` (patch tokens,
        embeddings) stand in for `images` (e.g. from a cache). `max_new_tokens_name`: how errors name
        `max_new_tokens` (a command passes its flag)."""
        # 1. check inputs
        if max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` must be >= 1, got {max_new_tokens}")
        if do_sample and not temperature > 0:
            raise ValueError(f"`temperature` must be > 0 when sampling, got {temperature}")
        patches, embeds = self.image_tokens(images) if image_tokens is None else image_tokens
        batch_size = patches.shape[0]
        prompts = prompt if isinstance(prompt, list) else [prompt] * batch_size
        if len(prompts) != batch_size:
            raise ValueError(f"`prompt` has {len(prompts)} entries for {batch_size} images")
        ids = [prompt_ids(self.tokenizer, p) for p in prompts]
        self.check_positions(patches.shape[1] + 1 + max(map(len, ids)), max_new_tokens, max_new_tokens_name)

        # 2. decode, then the text up to the first <eos>
        written, log_probs = self._decode(patches, embeds, ids, max_new_tokens, do_sample, temperature, generator)
        eos, texts = self.tokenizer.eos_token_id, []
        for row in written.tolist():
            if eos in row:
                row = row[: row.index(eos)]
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        # the tokens up to and with the first <eos> (all of them when the text was cut off at max_new_tokens)
        is_eos = (written == eos).long()
        counted = is_eos.cumsum(dim=1) - is_eos == 0
        per_token = (log_probs * counted).sum(dim=1) / counted.sum(dim=1)
        return texts, per_token

    def _decode(self, patches, embeds, ids, max_new_tokens, do_sample, temperature, generator):
        """The tokens written after each row's image tokens and prompt `ids` (B, L <= max_new_tokens), <eos> once a
        row has ended, and each one's log-probability under the model (B, L)."""
        # the prefix: image tokens, then <bos> and the prompt, left-padded so that every row ends together
        device, batch_size = self.device, patches.shape[0]
        width = max(map(len, ids))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids], device=device)
        text_mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], device=device)
        model = CaptionerModel(self.projector, self.lm)
        embeds_in, mask = model.inputs(patches.to(device), embeds.to(device), input_ids, text_mask)
        # the image tokens of a row follow its padding: move them behind it, so each row reads image, <bos>, prompt
        order = torch.argsort(mask, dim=1, stable=True)  # padding (0) first, then the row's tokens in order
        embeds_in = torch.gather(embeds_in, 1, order[..., None].expand_as(embeds_in))
        mask = torch.gather(mask, 1, order)
        positions = (mask.cumsum(1) - 1).clamp(min=0)

        # one token at a time, with the key-value cache
        out = self.lm(
            inputs_embeds=embeds_in, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
        )
        written, log_probs = [], []
        done = torch.zeros(batch_size, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            logits = out.logits[:, -1].float()  # (B, V)
            if do_sample:
                probs = torch.softmax(logits / temperature, dim=-1)
                token = torch.multinomial(probs, 1, generator=generator)[:, 0]
            else:
                token = logits.argmax(dim=-1)
            token = torch.where(done, torch.full_like(token, self.tokenizer.eos_token_id), token)
            written.append(token)
            log_probs.append(torch.log_softmax(logits, dim=-1).gather(1, token[:, None])[:, 0])
            done |= token == self.tokenizer.eos_token_id
            if done.all() or step == max_new_tokens - 1:  # the last token is written, never read back
                break
            mask = torch.cat([mask, mask.new_ones(batch_size, 1)], dim=1)
            positions = positions[:, -1:] + 1
            out = self.lm(
                input_ids=token[:, None],
                attention_mask=mask,
                position_ids=positions,
                cache=out.cache,
                use_cache=True,
            )
        return torch.stack(written, dim=1), torch.stack(log_probs, dim=1)

    @torch.no_grad()
    def generate_best_of(
        self,
        images=None,
        prompt: str | list[str | None] | None = None,
        *,
        best_of: int,
        image_tokens: tuple[torch.Tensor, torch.Tensor] | None = None,
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        max_new_tokens_name: str = "max_new_tokens",
    ) -> list[str]:
        """Of `best_of` candidate texts per image (the greedy one, and `best_of` - 1 sampled at `temperature` from
        `generator`), the one whose tokens the model finds likeliest on average (`generate_scored`): the highest
        log-probability per token, as the `best_of` option of OpenAI's completions ranks them.

        The greedy text maximises no sequence score, and the likeliest whole text is the shortest one: each word
        more multiplies in a probability below one, so a caption that names every field loses to one that stops
        early (the length bias of beam search; Wu et al. 2016, "Google's Neural Machine Translation System", and
        Murray & Chiang 2018, "Correcting Length Bias in Neural Machine Translation", normalise by length for
        it). `best_of=1` is greedy decoding."""
        if best_of < 1:
            raise ValueError(f"`best_of` must be >= 1, got {best_of}")
        if best_of > 1 and not temperature > 0:
            raise ValueError(f"`temperature` must be > 0 to sample the candidates, got {temperature}")
        tokens = self.image_tokens(images) if image_tokens is None else image_tokens
        options = {
            "image_tokens": tokens,
            "max_new_tokens": max_new_tokens,
            "max_new_tokens_name": max_new_tokens_name,
        }
        sampled = {"do_sample": True, "temperature": temperature, "generator": generator}
        candidates = [self.generate_scored(prompt=prompt, **options)]
        for _ in range(best_of - 1):
            candidates.append(self.generate_scored(prompt=prompt, **sampled, **options))
        scores = torch.stack([per_token for _, per_token in candidates])  # (best_of, B)
        best = scores.argmax(dim=0).tolist()  # the first of equals: the greedy text on a tie
        return [candidates[k][0][row] for row, k in enumerate(best)]
