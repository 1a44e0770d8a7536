"""Our CLIP: transformers' `CLIPModel`, built from named size presets, plus the few functions that read it.

The model class is transformers' own, so a run folder written with `save_pretrained` loads as `CLIPModel`,
`CLIPTextModelWithProjection` or `CLIPVisionModelWithProjection` in any transformers code, and a pretrained
transformers CLIP drops in here. What clipcond adds: presets as data (`presets/clip.json`), the image
normalisation for uint8 batches (`clipcond.models.clip_pixels`), and feature functions that work across transformers versions.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerBase

from clipcond.device import transformers_dtype_keyword
from clipcond.hub import local_files_only, resolve_folder
from clipcond.models.clip_pixels import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, normalize_pixels
from clipcond.models.presets import PRESETS_DIR, preset_fields, read_presets
from clipcond.runs import check_finished
from clipcond.tokenizer import load_tokenizer

PRESETS_FILE = PRESETS_DIR / "clip.json"


def clip_presets() -> dict[str, dict]:
    return read_presets(PRESETS_FILE)


def clip_config(
    preset: str,
    *,
    vocab_size: int,
    bos_token_id: int,
    eos_token_id: int,
    pad_token_id: int,
    image_size: int | None = None,
    patch_size: int | None = None,
    context_length: int | None = None,
) -> CLIPConfig:
    """A `CLIPConfig` from a preset name or a JSON file of the same shape, with the tokenizer's ids filled in.

    `image_size`, `patch_size` and `context_length` override the preset. The special token ids matter:
    `CLIPTextTransformer` pools at the first `eos_token_id` of each sequence.
    """
    spec = preset_fields(preset, clip_presets(), "CLIP", ("projection_dim", "text", "vision"))

    text = dict(spec["text"])
    vision = dict(spec["vision"])
    if context_length is not None:
        text["max_position_embeddings"] = context_length
    if image_size is not None:
        vision["image_size"] = image_size
    if patch_size is not None:
        vision["patch_size"] = patch_size
    if vision["image_size"] % vision["patch_size"]:
        raise ValueError(
            f"`image_size` ({vision['image_size']}) must be a multiple of `patch_size` ({vision['patch_size']})"
        )
    text.update(vocab_size=vocab_size, bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    if eos_token_id == 2:
        # transformers reads eos_token_id == 2 as a legacy OpenAI config and pools at argmax(input_ids) instead.
        raise ValueError(
            "`eos_token_id` must not be 2 (transformers' legacy CLIP pooling); reorder the special tokens"
        )
    # The towers carry the projection width too: CLIPTextModelWithProjection reads it from its own sub-config.
    text["projection_dim"] = vision["projection_dim"] = spec["projection_dim"]
    extra = {k: spec[k] for k in ("logit_scale_init_value",) if k in spec}  # ln(1 / initial temperature)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=spec["projection_dim"], **extra)


def image_processor_for(config: CLIPConfig, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> CLIPImageProcessor:
    """The transformers image processor that matches `config` (a CLIP config or a vision tower's), saved beside the
    model so PIL users can call it."""
    size = getattr(config, "vision_config", config).image_size
    return CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(mean),
        image_std=list(std),
    )


def text_features(
    model: CLIPModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Projected, unnormalised text embeddings (B, projection_dim), the pooled end-token state."""
    out = model.text_model(input_ids=input_ids, attention_mask=attention_mask)
    return model.text_projection(out.pooler_output)


def image_features(model: CLIPModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected, unnormalised image embeddings (B, projection_dim) from normalised pixels."""
    out = model.vision_model(pixel_values=pixel_values)
    return model.visual_projection(out.pooler_output)


@dataclass
class ClipRun:
    """A CLIP loaded from a folder: the model, its tokenizer and its image statistics."""

    model: CLIPModel
    tokenizer: PreTrainedTokenizerBase
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    path: str

    @property
    def context_length(self) -> int:
        return self.model.config.text_config.max_position_embeddings

    @property
    def image_size(self) -> int:
        return self.model.config.vision_config.image_size

    def tokenize(self, texts: list[str], device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=self.context_length, return_tensors="pt"
        )
        device = device or self.model.device
        return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}

    @torch.no_grad()
    def encode_text(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """L2-normalised text embeddings (N, D)."""
        chunks = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenize(texts[start : start + batch_size])
            chunks.append(text_features(self.model, **tokens).float())
        return torch.nn.functional.normalize(torch.cat(chunks), dim=-1)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings (B, D) of uint8 images (B, 3, H, W)."""
        pixel_values = normalize_pixels(pixels.to(self.model.device), self.image_mean, self.image_std)
        pixel_values = pixel_values.to(self.model.dtype)
        return torch.nn.functional.normalize(image_features(self.model, pixel_values).float(), dim=-1)


def load_clip(
    path: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    progress: bool = True,
    what: str = "--model",
) -> ClipRun:
    """Load a CLIP folder written by `clipcond train clip` (or any transformers CLIPModel folder), in eval mode;
    `progress=False` hides transformers' "Loading weights" bar (noise before a command's own output). `path` may be a
    Hugging Face Hub id (see `clipcond.hub`); errors name the argument `what`."""
    path = os.fspath(
        resolve_folder(path, what, "pass a CLIPModel folder, e.g. the output folder of `clipcond train clip`")
    )
    check_finished(path, f"`{what}`")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"`{what}` {path!r} holds no config.json; expected a CLIPModel saved with `save_pretrained`"
        )
    with contextlib.nullcontext() if progress else _no_loading_bar(), load_report(what, path):
        model = CLIPModel.from_pretrained(
            path, local_files_only=local_files_only(), **{transformers_dtype_keyword(): dtype}
        )
    model = model.to(device).eval()
    tokenizer = load_tokenizer(path)
    mean, std = pixel_statistics(path, what)
    return ClipRun(model=model, tokenizer=tokenizer, image_mean=mean, image_std=std, path=path)


@contextlib.contextmanager
def _no_loading_bar():
    """transformers' progress bars off for the block, then as they were."""
    from transformers.utils import logging as hf_logging

    were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if were_on:
            hf_logging.enable_progress_bar()


# ----------------------------------------------------------------------------------------- the frozen towers

CLIP_MODEL_TYPES = ("clip", "clip_text_model", "clip_vision_model")


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


class _HoldLoadReport(logging.Filter):
    """Takes transformers' load report off the log and keeps its text (colours removed). Every other record passes
    when it is at least `threshold`: the logger's level before `load_report` lowered it to WARNING to see the report,
    so the block lets through what the user's verbosity would have."""

    def __init__(self, threshold: int = logging.NOTSET):
        super().__init__()
        self.reports: list[str] = []
        self.threshold = threshold

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" not in message:
            return record.levelno >= self.threshold
        self.reports.append(_ANSI_ESCAPE.sub("", message))
        return False


@contextmanager
def load_report(what: str, path: str | os.PathLike):
    """Hold transformers' load report for a `from_pretrained` in the block, and put it in the error if the load fails.

    A text-only (or vision-only) load of a `CLIPModel` folder reports the other tower's weights as unexpected, in a
    long table that is noise on success: the callers check the one thing that matters themselves (that no weight of
    the tower they load is missing). When the load fails (weights of another size, a missing file), transformers
    raises an error that points at "the above report"; the `ValueError` raised here names `what` and `path` and
    carries that report.
    """
    report_logger = logging.getLogger("transformers.modeling_utils")
    level = report_logger.level
    # The report is a warning: if the logger is set quieter (TRANSFORMERS_VERBOSITY=error), lower it to WARNING for
    # the block so that the report is logged, and hold back every other record below the level the user set.
    hold = _HoldLoadReport(report_logger.getEffectiveLevel())
    report_logger.addFilter(hold)
    if not report_logger.isEnabledFor(logging.WARNING):
        report_logger.setLevel(logging.WARNING)
    try:
        yield
    except (RuntimeError, OSError) as err:
        report = "\n".join(hold.reports)
        raise ValueError(
            f"`{what}` {os.fspath(path)!r}: transformers cannot load it ({err})" + (f"\n{report}" if report else "")
        ) from err
    finally:
        report_logger.removeFilter(hold)
        report_logger.setLevel(level)


def tower_config(path: str | os.PathLike, cls):
    """The config for loading the tower class `cls` (a CLIP text or vision model) from the folder `path`, as
    `CLIPModel` builds its towers: from a `CLIPModel` folder, the tower's sub-config with the top-level
    `projection_dim` (a sub-config may leave its own at the default, which `CLIPModel` never reads); None (the
    folder's own config) for a folder of the tower alone."""
    config_file = Path(path, "config.json")
    if not config_file.is_file() or json.loads(config_file.read_text()).get("model_type") != "clip":
        return None
    config = CLIPConfig.from_pretrained(path)
    sub = config.text_config if cls.config_class.model_type == "clip_text_model" else config.vision_config
    sub = copy.deepcopy(sub)
    sub.projection_dim = config.projection_dim
    return sub


def load_clip_tower(cls, path: str | os.PathLike, what: str, tower: str, hint: str = ""):
    """The tower `cls` (`CLIPTextModel`, `CLIPTextModelWithProjection` or `CLIPVisionModelWithProjection`) of the
    CLIP folder `path`, frozen (eval mode, no gradients); errors name the argument `what`, the folder and `tower`."""
    config = tower_config(path, cls)
    kwargs = {} if config is None else {"config": config}
    with load_report(what, path):
        model, info = cls.from_pretrained(
            path, local_files_only=local_files_only(), output_loading_info=True, **kwargs
        )
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ValueError(
            f"`{what}` {os.fspath(path)!r} lacks {len(missing)} weights of the {tower} (e.g. {missing[:3]})"
            + (f"; {hint}" if hint else "")
        )
    model.requires_grad_(False)
    return model.eval()


def check_clip_folder(path: str | os.PathLike, what: str = "--clip", model_types=CLIP_MODEL_TYPES) -> Path:
    """`path` as a Path after checking that it is a CLIP model folder; errors name the argument `what`."""
    path = resolve_folder(path, what, "pass the output folder of `clipcond train clip`")
    check_finished(path, f"`{what}`")
    config_file = path / "config.json"
    try:
        model_type = json.loads(config_file.read_text()).get("model_type") if config_file.is_file() else None
    except json.JSONDecodeError as err:
        raise ValueError(f"`{what}` {str(path)!r}: config.json is not valid JSON ({err})") from None
    if model_type not in model_types:
        found = f"its config.json has model_type {model_type!r}" if config_file.is_file() else "it has no config.json"
        raise ValueError(
            f"`{what}` {str(path)!r} is not a CLIP model folder ({found}; expected one of {list(model_types)}); "
            "pass the output folder of `clipcond train clip`"
        )
    return path


def load_text_tower(path: str | os.PathLike, what: str = "--clip"):
    """The frozen text encoder of a CLIP run: `CLIPTextModelWithProjection` (eval, no gradients) and its tokenizer."""
    from transformers import CLIPTextModelWithProjection

    path = check_clip_folder(path, what, ("clip", "clip_text_model"))
    hint = "pass a complete CLIP run folder"
    text_encoder = load_clip_tower(CLIPTextModelWithProjection, path, what, "text encoder", hint)
    try:
        tokenizer = load_tokenizer(path)
    except OSError as err:
        raise ValueError(f"`{what}` {str(path)!r}: cannot load its tokenizer ({err})") from None
    return text_encoder, tokenizer


def load_vision_tower(path: str | os.PathLike, what: str = "--clip"):
    """The frozen image encoder of a CLIP run: `(CLIPVisionModelWithProjection in eval mode without gradients,
    image_mean, image_std)`, the statistics from the run's `preprocessor_config.json` (OpenAI's without one).

    Its `image_embeds` (projected, not normalised) are "the CLIP image embedding" of the DALL-E 2 path once
    L2-normalised, the same as `CLIPModel.get_image_features`.
    """
    from transformers import CLIPVisionModelWithProjection

    path = check_clip_folder(path, what, ("clip", "clip_vision_model"))
    hint = "pass a complete CLIP run folder"
    vision_model = load_clip_tower(CLIPVisionModelWithProjection, path, what, "image encoder", hint)
    mean, std = pixel_statistics(path, what)
    return vision_model, mean, std


def pixel_statistics(folder: str | os.PathLike, what: str = "--clip") -> tuple[tuple, tuple]:
    """(image_mean, image_std) from the folder's `preprocessor_config.json`, OpenAI's without one; errors name the
    argument `what` and the folder."""
    if not Path(folder, "preprocessor_config.json").is_file():
        return OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    try:
        processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=local_files_only())
    except (OSError, ValueError) as err:
        raise ValueError(f"`{what}` {os.fspath(folder)!r}: cannot read its preprocessor_config.json ({err})") from None
    return tuple(processor.image_mean), tuple(processor.image_std)
