"""`clipcond train clip`: contrastive pretraining of a transformers `CLIPModel` with Accelerate.

    clipcond train clip --data shapes/ --output-dir runs/clip
    accelerate launch -m clipcond.train.clip --data shapes/ --output-dir runs/clip   # N processes, same code

The run folder is a `save_pretrained` CLIP (config.json, model.safetensors, tokenizer, preprocessor_config.json)
that `CLIPModel`, `CLIPTextModelWithProjection` and `CLIPVisionModelWithProjection` load as is, the same weights for
`open_clip.create_model_and_transforms("local-dir:RUN")` (open_clip_config.json, open_clip_model.safetensors), plus
`clipcond_run.json` (arguments, data, summary, content hash), `checkpoints/`, `logs/` and `eval/`.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from transformers import CLIPModel

from clipcond.data.augment import CROP_DRAWS, ImageAugment, grayscale_where, random_resized_crops
from clipcond.data.counterfactual import KINDS as PAIR_KINDS
from clipcond.data.counterfactual import LOW_SHARE as LOW_PAIR_SHARE
from clipcond.data.counterfactual import CounterfactualPairs, check_pair_data, parse_kind_weights, parse_pair_kinds
from clipcond.data.folders import ImageCaptionDataset, collate_image_text
from clipcond.data.hard_negatives import KINDS as HARD_NEGATIVE_KINDS
from clipcond.data.hard_negatives import LOW_SHARE, HardNegatives, parse_kinds, pick_negatives
from clipcond.data.open import (
    add_data_arguments,
    add_validation_split_argument,
    dataset_options,
    is_streamed,
    native_resolution,
    open_image_text_dataset,
    validation_split,
)
from clipcond.evaluation.clip import evaluate_clip
from clipcond.evaluation.zero_shot import DEFAULT_TEMPLATES
from clipcond.finite import finite_float
from clipcond.help_formatter import HelpFormatter
from clipcond.lineage import content_hash, init_record
from clipcond.loss import MAX_LOGIT_SCALE, create_loss
from clipcond.models.clip import ClipRun, clip_config, clip_presets, image_processor_for
from clipcond.models.clip_pixels import normalize_pixels
from clipcond.models.open_clip_export import export_open_clip
from clipcond.models.pretrained_clip import PretrainedClip, load_pretrained_clip
from clipcond.text_encoding import attended_columns
from clipcond.tokenizer import load_tokenizer, train_tokenizer
from clipcond.train.loop import (
    Stage,
    add_training_args,
    data_record,
    draw_rows,
    finish_run,
    make_output_dir,
    parse_training_args,
    prepare_training,
    run_stage,
    train,
)
from clipcond.transfer import to_device

logger = logging.getLogger(__name__)

# Share of training images shown in grayscale (see clipcond.data.augment): shape features that do not depend on colour,
# so that unseen colour-shape pairs are recognised; how 0.3 was chosen is in docs/lab-notes.md ("grayscale views").
DEFAULT_GRAYSCALE_PROB = 0.3
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")

# CPU-sized training defaults for the `tiny` CLIP on the shapes data (README, "What it reaches on 2 CPU cores"); the
# learning rate is the one the held-out compositions favour over 1e-3 (docs/lab-notes.md, "a lower learning rate for the CLIP")
TRAINING_DEFAULTS = {
    "train_batch_size": 256,
    "learning_rate": 5e-4,
    "max_train_steps": 520,
    "lr_warmup_steps": 30,
    "weight_decay": 0.1,
    "adam_beta2": 0.98,
    "adam_epsilon": 1e-6,
    "checkpointing_steps": 100,
    "validation_steps": 100,
}


def add_augment_arguments(data: argparse._ActionsContainer) -> None:
    """The training images' views: grayscale, random resized crops, mirror images (all drawn per step)."""
    data.add_argument(
        "--grayscale-prob",
        type=finite_float,
        default=DEFAULT_GRAYSCALE_PROB,
        help="probability that a training image is shown in grayscale, its caption unchanged (open_clip's "
        "gray_scale_prob): makes shape features that do not depend on colour, so unseen colour-shape pairs are "
        "recognised; 0 turns it off",
    )
    data.add_argument(
        "--random-crop-scale",
        type=finite_float,
        default=1.0,
        metavar="S",
        help="show each training image as a random crop of a share in [S, 1] of its area (aspect ratio 3/4 to 4/3), "
        "resized back, as torchvision's RandomResizedCrop and open_clip's `scale` (e.g. 0.5 on real photos); 1 "
        "(default) turns it off, as the shapes data's positions need",
    )
    data.add_argument(
        "--hflip-prob",
        type=finite_float,
        default=0.0,
        help="probability that a training image is mirrored left to right, its caption unchanged; for data whose "
        "captions name no left or right (default 0)",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="clipcond train clip",
        description="Pretrain a CLIP (transformers CLIPModel) on image-caption pairs with a contrastive loss.",
        formatter_class=HelpFormatter,
    )
    data = parser.add_argument_group("data")
    add_data_arguments(data)
    add_validation_split_argument(data)
    data.add_argument("--validation-max-images", type=int, default=1000, help="images used by each validation")
    data.add_argument(
        "--image-cache-mb",
        type=int,
        default=2048,
        help="decode the images once and keep them in memory when they take at most this many MB (0: never)",
    )
    add_augment_arguments(data)

    model = parser.add_argument_group("model")
    model.add_argument("--model", default="tiny", help="CLIP preset (test, tiny, small, base) or a JSON config file")
    model.add_argument(
        "--init-from",
        default=None,
        metavar="SOURCE",
        help="start from a pretrained CLIP instead of --model's preset at random: a transformers CLIPModel folder "
        "(or Hub id; its tokenizer and image statistics come with it) or open_clip:MODEL@WEIGHTS (an open_clip "
        "architecture name or JSON config and a local weights file, converted; open_clip's tokenizer); "
        "--resolution, --patch-size and --context-length must then be the model's or unset",
    )
    model.add_argument("--resolution", type=int, default=None, help="image size (default: the preset's)")
    model.add_argument("--patch-size", type=int, default=None, help="ViT patch size (default: the preset's)")
    model.add_argument("--context-length", type=int, default=None, help="text context (default: the preset's)")
    model.add_argument("--tokenizer", default=None, help="a saved tokenizer folder (default: train one on captions)")
    model.add_argument("--vocab-size", type=int, default=1024, help="upper bound for a tokenizer trained here")
    model.add_argument(
        "--loss", default="clip", choices=["clip", "siglip"], help="symmetric InfoNCE or the sigmoid loss"
    )
    model.add_argument(
        "--hard-negatives",
        default="none",
        metavar="KINDS",
        help="NegCLIP's hard negatives (Yuksekgonul et al. 2023): for each image, one caption with a swap that no "
        "longer describes it joins the batch as an extra negative text of the image->text loss; a comma list of "
        f"{', '.join(HARD_NEGATIVE_KINDS)} (binding: colours or shapes of the two objects exchanged; left of <-> right "
        "of, above <-> below, or the noun phrases exchanged; two <-> one; on the left <-> on the right), made from "
        "the shapes data's metadata rows or from the caption's words; 'none' (default) for the plain recipe; "
        "--loss clip only",
    )
    add_pair_args(model)
    model.add_argument(
        "--attn-implementation",
        default=None,
        choices=ATTN_IMPLEMENTATIONS,
        help="transformers' attention for both towers while training (default: sdpa; eager in bf16 on a CPU, see "
        "configure_clip_for_training); flash_attention_2/3 need the flash-attn package; not saved with the model",
    )

    add_training_args(parser, **TRAINING_DEFAULTS)
    return parse_training_args(parser, argv, check_clip_args)


def add_pair_args(group) -> None:
    """`--counterfactual-pairs`, `--counterfactual-weight` and `--counterfactual-kind-weights` (TripletCLIP's twins)."""
    group.add_argument(
        "--counterfactual-pairs",
        default="none",
        metavar="KINDS",
        help="TripletCLIP's counterfactual pairs (Patel et al. 2024): for each image of the shapes data that has one, "
        "its twin with one thing changed in the pixels and in the caption alike joins the batch as a pair of its "
        "own, a hard negative of the original in both directions of the loss; a comma list of "
        f"{', '.join(PAIR_KINDS)} "
        "(the two objects' colours exchanged in the pixels; their shapes exchanged, the scene redrawn from its "
        "metadata; their places exchanged and the relation reversed, redrawn alike; no twin that would show a "
        "held-out composition); twins are shown in colour, their originals as without twins. 'none' (default) for "
        "the plain recipe; --loss clip only",
    )
    group.add_argument(
        "--counterfactual-weight",
        type=finite_float,
        default=0.0,
        metavar="W",
        help="with --counterfactual-pairs, weight of a loss of each original and its twin alone: each image picks "
        "its caption over the other's and each caption its image, two-way (`clipcond.loss.ClipLoss`'s pair term); "
        "at 1 a pair weighs as one row of the batch's loss; 0 (default) adds none",
    )
    group.add_argument(
        "--counterfactual-kind-weights",
        default="none",
        metavar="KIND=W,...",
        help="with --counterfactual-pairs, the pair-term weight of the twins of the named kinds in place of "
        "--counterfactual-weight, e.g. swap-relations=16 (relation twins at 16, the others at --counterfactual-weight)"
        "; 'none' (default): every twin at --counterfactual-weight",
    )


def check_pair_args(args: argparse.Namespace) -> None:
    """`--counterfactual-pairs` (parsed into a list), `--counterfactual-weight` and `--counterfactual-kind-weights`
    (parsed into a dict), against the loss and the data."""
    if isinstance(args.counterfactual_pairs, str):
        args.counterfactual_pairs = list(parse_pair_kinds(args.counterfactual_pairs))
    if isinstance(args.counterfactual_kind_weights, str):
        args.counterfactual_kind_weights = parse_kind_weights(
            args.counterfactual_kind_weights, args.counterfactual_pairs
        )
    if args.counterfactual_pairs and args.loss != "clip":
        raise ValueError(
            f"`--counterfactual-pairs` {','.join(args.counterfactual_pairs)!r} needs `--loss clip`, got "
            f"`--loss {args.loss}`; drop one of them"
        )
    if not args.counterfactual_weight >= 0:
        raise ValueError(f"`--counterfactual-weight` must be >= 0, got {args.counterfactual_weight}")
    if args.counterfactual_weight > 0 and not args.counterfactual_pairs:
        raise ValueError(
            f"`--counterfactual-weight` {args.counterfactual_weight} weighs the twins of `--counterfactual-pairs`, "
            "which is 'none'; name the kinds of twins or drop the weight"
        )
    if args.counterfactual_pairs:
        check_pair_data(args.counterfactual_pairs, args.data)


def check_clip_args(args: argparse.Namespace) -> None:
    """Reject values that would fail later, naming the option and the value."""
    if args.validation_max_images < 1:
        raise ValueError(f"`--validation-max-images` must be >= 1, got {args.validation_max_images}")
    if args.image_cache_mb < 0:
        raise ValueError(f"`--image-cache-mb` must be >= 0, got {args.image_cache_mb}")
    if not 0.0 <= args.grayscale_prob <= 1.0:
        raise ValueError(f"`--grayscale-prob` must be in [0, 1], got {args.grayscale_prob}")
    if not 0.0 < args.random_crop_scale <= 1.0:
        raise ValueError(f"`--random-crop-scale` must be in (0, 1], got {args.random_crop_scale}")
    if not 0.0 <= args.hflip_prob <= 1.0:
        raise ValueError(f"`--hflip-prob` must be in [0, 1], got {args.hflip_prob}")
    if isinstance(args.hard_negatives, str):  # a list already when checked a second time
        args.hard_negatives = list(parse_kinds(args.hard_negatives, "--hard-negatives"))
    check_pair_args(args)
    if args.hard_negatives and args.loss != "clip":
        raise ValueError(
            f"`--hard-negatives` {','.join(args.hard_negatives)!r} needs `--loss clip` (NegCLIP's softmax over the "
            f"texts), got `--loss {args.loss}`; drop one of them"
        )


class ContrastiveModel(nn.Module):
    """A CLIPModel and, for the sigmoid loss, its logit bias: the unit that Accelerate prepares and DDP syncs."""

    def __init__(self, clip, with_bias: bool):
        super().__init__()
        self.clip = clip
        self.logit_bias = nn.Parameter(torch.tensor(-10.0)) if with_bias else None  # SigLIP's initial bias

    def forward(self, input_ids, attention_mask, pixel_values):
        out = self.clip(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
        # image and text embeddings are projected and L2-normalised, (B, D) each
        return out.image_embeds, out.text_embeds, self.clip.logit_scale, self.logit_bias


class CaptionTokens:
    """The collate function of CLIP training: `collate_image_text`'s batch plus its captions' `input_ids` and
    `attention_mask` (B, context), padded to the context and truncated as the model reads them; with
    `hard_negatives`, also every hard-negative candidate of the batch's captions (`negatives`, a
    `NegativeCandidates`) and their tokens (`negative_input_ids`, `negative_attention_mask`: (N, context)), from
    which the stage picks one per caption with its generator; with `counterfactual`, the twins of the batch's
    images (`CounterfactualPairs.twins`) and their captions' tokens (`twin_input_ids`, `twin_attention_mask`).

    Captions are tokenised per batch, in the loader's workers, rather than all at once before training: the token
    table of a data set of many captions (2 x 8 bytes per position) never has to be held. Each caption is padded on
    its own to the context, so its tokens do not depend on the batch it is in: the same as tokenising up front.
    """

    def __init__(
        self,
        tokenizer,
        context_length: int,
        hard_negatives: HardNegatives | None = None,
        counterfactual: CounterfactualPairs | None = None,
    ):
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.hard_negatives = hard_negatives
        self.counterfactual = counterfactual

    def tokens(self, captions: list[str]) -> dict[str, torch.Tensor]:
        if not captions:
            empty = torch.zeros(0, self.context_length, dtype=torch.long)
            return {"input_ids": empty, "attention_mask": empty.clone()}
        out = self.tokenizer(
            captions, padding="max_length", truncation=True, max_length=self.context_length, return_tensors="pt"
        )
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    def __call__(self, samples: list[dict]) -> dict:
        batch = collate_image_text(samples)
        batch.update(self.tokens(batch["text"]))
        twin_captions: list[list[str]] = [[] for _ in samples]
        if self.counterfactual is not None:
            twins = self.counterfactual.twins(samples)
            paraphrases = twins.pop("twin_paraphrases")  # true of a twin as its own caption is: no negatives either
            tokens = self.tokens(twins["twin_text"])
            batch.update(twins, twin_input_ids=tokens["input_ids"], twin_attention_mask=tokens["attention_mask"])
            for row, caption, others in zip(
                twins["twin_source"].tolist(), twins["twin_text"], paraphrases, strict=True
            ):
                twin_captions[row] += [caption, *others]
        if self.hard_negatives is not None:
            negatives = self.hard_negatives.candidates(samples, twin_captions)
            tokens = self.tokens(negatives.captions)
            batch.update(
                negatives=negatives,
                negative_input_ids=tokens["input_ids"],
                negative_attention_mask=tokens["attention_mask"],
            )
        return batch


class ClipStage(Stage):
    def __init__(
        self,
        accelerator,
        model,
        tokenizer,
        image_processor,
        loss_fn,
        validation=None,
        augment: ImageAugment | None = None,
        length_multiple: int = 1,
        output_dir: Path | None = None,
        twin_weights: list[float] | None = None,
    ):
        self.accelerator = accelerator
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.loss_fn = loss_fn
        self.validation = validation  # (dataset, held_out, max_images) or None
        self.augment = augment or ImageAugment()  # none by default
        self.length_multiple = length_multiple  # 8 for a compiled model: a few shapes, not one per caption length
        self.output_dir = output_dir  # where the run's tokenizer ends up: named in open_clip_config.json
        # The final export adds open_clip's copy of the weights; checkpoints' pretrained/ folders stay transformers'
        # alone (`clipcond export open-clip` converts one of them when wanted).
        self.export_open_clip = False
        # Padding is on the right, so a batch can drop the columns past its longest caption (see `loss`).
        self.right_padded = tokenizer.padding_side == "right"
        # the pair-term weight of each kind of twin (`twin_weights`), None where all weigh `loss_fn.pair_weight`
        self.twin_weights = None if twin_weights is None else torch.tensor(twin_weights, device=accelerator.device)

    @property
    def unwrapped(self) -> ContrastiveModel:
        return self.accelerator.unwrap_model(self.model)

    def loss(self, batch, generator):
        device = self.accelerator.device
        twin_source = batch.get("twin_source")  # (C,) rows of the twins' originals, with --counterfactual-pairs
        num_pairs = batch["input_ids"].shape[0] + (0 if twin_source is None else twin_source.shape[0])
        input_ids, attention_mask = self.text_rows(batch, generator)  # (B + C + H, length)
        twins = None
        if twin_source is not None:
            twin_source = to_device(twin_source, device)
            twins = (to_device(batch["twin_pixel_values"], device), twin_source)
        pixels = self.augmented(to_device(batch["pixel_values"], device), generator, twins)  # (B + C, 3, H, W) uint8
        pixel_values = normalize_pixels(pixels, self.image_processor.image_mean, self.image_processor.image_std)
        image_embeds, text_embeds, logit_scale, logit_bias = self.model(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values
        )
        # The loss runs in fp32 whatever the autocast precision of the towers.
        text_embeds, negative_embeds = text_embeds[:num_pairs], text_embeds[num_pairs:]  # (B + C, D), (H, D)
        features = (image_embeds.float(), text_embeds.float(), logit_scale.float())
        logs = {"train/logit_scale": logit_scale.detach().exp()}  # a tensor: read when the loop logs
        if logit_bias is not None:
            return self.loss_fn(*features, logit_bias.float()), logs
        options = {}
        if twin_source is not None:
            options["uneven"] = True  # C differs between batches and processes
            twin_rows = torch.arange(batch["input_ids"].shape[0], num_pairs, device=device)
            options["pairs"] = torch.stack([twin_source, twin_rows], dim=1)  # (C, 2)
            if self.twin_weights is not None:
                options["pair_weights"] = self.twin_weights[to_device(batch["twin_kind"], device)]  # (C,)
            logs["train/counterfactual_pairs"] = twin_source.shape[0] / batch["input_ids"].shape[0]
        if "negatives" in batch:
            options["negative_features"] = negative_embeds.float()
            logs["train/hard_negatives"] = negative_embeds.shape[0] / batch["input_ids"].shape[0]
        return self.loss_fn(*features, **options), logs

    def text_rows(self, batch, generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The token rows that the text tower reads, on the device: the B captions (from `CaptionTokens`), the C
        captions of their twins (with --counterfactual-pairs), then one hard negative for each caption that has any
        (H, with --hard-negatives); and their attention mask, None where right padding makes it unneeded."""
        device = self.accelerator.device
        ids, masks = [batch["input_ids"]], [batch["attention_mask"]]  # (B, context) each, on the host
        if "twin_input_ids" in batch:
            ids.append(batch["twin_input_ids"])
            masks.append(batch["twin_attention_mask"])
        all_masks = torch.cat(masks)  # on the host: with every hard-negative candidate, an upper bound of the length
        input_ids = torch.cat([to_device(t, device) for t in ids])
        attention_mask = None if self.right_padded else torch.cat([to_device(t, device) for t in masks])
        negatives = batch.get("negatives")
        if negatives is not None:
            # NegCLIP: one hard negative per caption that has any, a kind and then a candidate drawn uniformly with
            # two uniforms per sample of the global batch (`draw_rows`), so the pick is the same on any number of
            # processes and after a resume.
            draws = draw_rows(
                lambda n: torch.rand(n, 2, generator=generator, device=generator.device), ids[0].shape[0], device
            )
            chosen = pick_negatives(negatives, draws)  # (H,) on the device
            input_ids = torch.cat([input_ids, to_device(batch["negative_input_ids"], device)[chosen]])
            all_masks = torch.cat([all_masks, batch["negative_attention_mask"]])
            if attention_mask is not None:
                negative_mask = to_device(batch["negative_attention_mask"], device)[chosen]
                attention_mask = torch.cat([attention_mask, negative_mask])
        if self.right_padded:
            # Exact: under the causal mask no real token attends to the trailing padding, and pooling happens at
            # the end token, so the text tower runs on (rows, longest caption) instead of (rows, context): about
            # half the text compute on the shapes captions (at most 17 of 32 tokens). For the same reason it needs
            # no padding mask: the causal one alone lets SDPA use its causal kernels, and transformers does not
            # check on the host whether the mask masks anything (a wait for the device every step on a GPU).
            return input_ids[:, : attended_columns(all_masks, self.length_multiple)], None
        return input_ids, attention_mask

    def augmented(self, pixels: torch.Tensor, generator, twins: tuple[torch.Tensor, torch.Tensor] | None = None):
        """The batch's images (B, 3, H, W) uint8 with `self.augment` applied, and after them the C twins' (when given):
        (B + C, 3, H, W). The draws are rows of the global batch (see `draw_rows`): grayscale one uniform per image,
        then crops and flips `CROP_DRAWS`, each only when on, so a run without crops draws what it drew before they
        existed.

        `twins`: their (C, 3, H, W) images and the (C,) rows of their originals (--counterfactual-pairs), appended
        after the batch. The originals are shown as without twins; each twin is cropped and flipped as its
        original, and always in colour: a colour or shape twin's colours or shapes are what it is there for
        (docs/lab-notes.md, "counterfactual pairs over three seeds"); relation twins too, since showing them in their
        originals' grayscale views was measured worse ("relation twins over three seeds")."""
        augment, device = self.augment, pixels.device
        if augment.grayscale_prob > 0:
            draws = draw_rows(
                lambda n: torch.rand(n, generator=generator, device=generator.device), pixels.shape[0], device
            )
            pixels = grayscale_where(pixels, draws < augment.grayscale_prob)
        num_images = pixels.shape[0]
        if twins is not None:
            pixels = torch.cat([pixels, twins[0]])
        if augment.crops:
            draws = draw_rows(
                lambda n: torch.rand(n, CROP_DRAWS, generator=generator, device=generator.device), num_images, device
            )
            if twins is not None:
                draws = torch.cat([draws, draws[twins[1]]])
            pixels = random_resized_crops(pixels, draws, augment.crop_scale, augment.hflip_prob)
        return pixels

    def after_optimizer_step(self):
        # CLIP paper, sec. 2.5: the temperature is clipped so that logits scale by at most 100. The loss clamps
        # too, but only clamping the parameter stops momentum from parking it past the bound.
        with torch.no_grad():
            self.unwrapped.clip.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def validate(self, step):
        if self.validation is None:
            return {}
        dataset, held_out, max_images = self.validation
        clip = self.unwrapped.clip
        clip.eval()
        run = ClipRun(clip, self.tokenizer, self.image_processor.image_mean, self.image_processor.image_std, "")
        metrics, _ = evaluate_clip(
            run, dataset, templates=DEFAULT_TEMPLATES, held_out=held_out, max_images=max_images, progress=False
        )
        return {k: v for k, v in metrics.items() if isinstance(v, float)}

    def export(self, path: Path):
        """The model as transformers saves it (config.json, model.safetensors, tokenizer, preprocessor_config.json);
        with `export_open_clip`, the same weights in open_clip's `local-dir:` layout beside it
        (`clipcond.models.open_clip_export`)."""
        unwrapped = self.unwrapped
        unwrapped.clip.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        if not self.export_open_clip:
            return
        export_open_clip(
            unwrapped.clip,
            path,
            image_mean=self.image_processor.image_mean,
            image_std=self.image_processor.image_std,
            tokenizer_name=str(Path(self.output_dir or path).absolute()),
            logit_bias=unwrapped.logit_bias.item() if unwrapped.logit_bias is not None else None,
        )


def main(argv: list[str] | None = None) -> int:
    return run_stage(parse_args(argv), train_clip)


def train_clip(accelerator: Accelerator, args: argparse.Namespace) -> int:
    output_dir = make_output_dir(accelerator, args)

    # 2. A pretrained CLIP to start from (first: a wrong --init-from fails before the data is read)
    pretrained = load_initial_clip(args) if args.init_from else None

    # 3. Data
    dataset, resolution, validation = open_clip_data(args, pretrained.image_size if pretrained else None)
    # the data's hard negatives and twins (here: data they cannot use fails before a tokenizer is trained)
    hard_negatives, coverage = hard_negative_captions(args, dataset, warn=accelerator.is_main_process)
    counterfactual, pair_coverage = counterfactual_pairs(args, dataset, warn=accelerator.is_main_process)

    # 4. Tokenizer and model
    if pretrained is not None:
        clip, tokenizer = pretrained.model, pretrained.tokenizer
        image_processor = image_processor_for(clip.config, pretrained.image_mean, pretrained.image_std)
    else:
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else train_clip_tokenizer(args, dataset)
        config = clip_config(
            args.model,
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            image_size=resolution,
            patch_size=args.patch_size,
            context_length=args.context_length or tokenizer.model_max_length,
        )
        clip = CLIPModel(config)
        image_processor = image_processor_for(config)
    configure_clip_for_training(clip, args, accelerator.device, accelerator.mixed_precision)
    model = ContrastiveModel(clip, with_bias=args.loss == "siglip")
    if args.loss == "siglip" and pretrained is None:
        with torch.no_grad():  # SigLIP starts at a temperature of 10 (Zhai et al. 2023, sec. 3.2)
            clip.logit_scale.fill_(math.log(10.0))
    loss_fn = create_loss(args.loss, **({"pair_weight": args.counterfactual_weight} if args.loss == "clip" else {}))

    # 5. Optimizer, schedule; prepare
    prepared = prepare_training(accelerator, args, model)

    # 6. Train
    multiple = 8 if args.torch_compile else 1
    stage = ClipStage(
        accelerator,
        prepared.model,
        tokenizer,
        image_processor,
        loss_fn,
        validation,
        ImageAugment(args.grayscale_prob, args.random_crop_scale, args.hflip_prob),
        multiple,
        output_dir=output_dir,
        twin_weights=None if counterfactual is None else twin_weights(counterfactual.kinds, args),
    )
    context = clip.config.text_config.max_position_embeddings
    collate = CaptionTokens(tokenizer, context, hard_negatives, counterfactual)
    result = train(accelerator, args, stage, prepared, dataset=dataset, collate_fn=collate)

    # 7. Save the final model and the run record
    def record() -> dict:
        known_hash = None if pretrained is None else pretrained.content_hash
        sections = {
            "data": data_record(args, len(dataset)),
            "content_hash": content_hash(output_dir),
            **init_record(args.init_from, known_hash=known_hash),
        }
        return {**sections, **negative_sections(args, (hard_negatives, coverage), (counterfactual, pair_coverage))}

    unwrapped = stage.unwrapped
    logit_bias = round(unwrapped.logit_bias.item(), 4) if unwrapped.logit_bias is not None else None
    logit_scale = round(unwrapped.clip.logit_scale.exp().item(), 4)
    stage.export_open_clip = True
    finish_run(
        accelerator, args, stage, result, "clipcond-clip", record, logit_scale=logit_scale, logit_bias=logit_bias
    )
    return 0


def negative_sections(
    args: argparse.Namespace,
    negatives: tuple[HardNegatives | None, dict],
    twins: tuple[CounterfactualPairs | None, dict],
) -> dict:
    """The run record's "hard_negatives" and "counterfactual_pairs" sections, each where used: kinds, options and
    the coverage (`hard_negative_captions`, `counterfactual_pairs`)."""
    sections = {}
    if negatives[0] is not None:
        sections["hard_negatives"] = {"kinds": list(negatives[0].kinds), **negatives[1]}
    if twins[0] is not None:
        options = {"kinds": list(twins[0].kinds), "weight": args.counterfactual_weight}
        if args.counterfactual_kind_weights:
            options["kind_weights"] = args.counterfactual_kind_weights
        sections["counterfactual_pairs"] = {**options, **twins[1]}
    return sections


def hard_negative_captions(args: argparse.Namespace, dataset, warn: bool = True) -> tuple[HardNegatives | None, dict]:
    """`--hard-negatives`' caption maker (None for none), reading the data set's metadata rows where it has them,
    and the share of the training captions that get a negative (`HardNegatives.coverage`); with `warn` (the main
    process: once per run), says when few do."""
    if not args.hard_negatives:
        return None, {}
    records = getattr(dataset, "records", None)
    maker = HardNegatives(args.hard_negatives, records)
    coverage = maker.coverage(dataset.captions, records)
    if not warn:
        return maker, coverage
    if coverage["share"] < LOW_SHARE:
        logger.warning(
            "`--hard-negatives` %s: only %.1f%% of the %d training captions checked have one (%s); the others train "
            "as in the plain recipe. The kinds need two-object captions with known colour, shape or relation words",
            ",".join(args.hard_negatives),
            100 * coverage["share"],
            coverage["captions_checked"],
            ", ".join(f"{kind} {100 * share:.1f}%" for kind, share in coverage["share_by_kind"].items()),
        )
    else:
        logger.info("hard negatives for %.1f%% of the training captions", 100 * coverage["share"])
    return maker, coverage


def counterfactual_pairs(
    args: argparse.Namespace, dataset, warn: bool = True
) -> tuple[CounterfactualPairs | None, dict]:
    """`--counterfactual-pairs`' twin maker (None for none) and the share of the training captions whose metadata
    gives a twin (`CounterfactualPairs.coverage`); an error for data that is not the shapes data, a warning (with
    `warn`) when few captions have a twin."""
    if not args.counterfactual_pairs:
        return None, {}
    maker = CounterfactualPairs(
        args.counterfactual_pairs, getattr(dataset, "records", None), getattr(dataset, "info", None)
    )
    coverage = maker.coverage(dataset.captions)
    if warn and coverage["share"] < LOW_PAIR_SHARE:
        logger.warning(
            "`--counterfactual-pairs` %s: only %.1f%% of the %d training captions checked have a twin (two-object "
            "scenes with something of the kinds to exchange); the others train as in the plain recipe",
            ",".join(args.counterfactual_pairs),
            100 * coverage["share"],
            coverage["captions_checked"],
        )
    elif warn:
        logger.info("counterfactual twins for %.1f%% of the training captions", 100 * coverage["share"])
    return maker, coverage


def twin_weights(kinds: Sequence[str], args: argparse.Namespace) -> list[float] | None:
    """The pair-term weight of each of the twin maker's `kinds`, in their order (that of `twin_kind`):
    `--counterfactual-kind-weights`' where it names the kind, `--counterfactual-weight` elsewhere; None without kind
    weights (all at the latter)."""
    if not args.counterfactual_kind_weights:
        return None
    return [args.counterfactual_kind_weights.get(kind, args.counterfactual_weight) for kind in kinds]


def load_initial_clip(args: argparse.Namespace) -> PretrainedClip:
    """`--init-from`'s CLIP and its tokenizer (`--tokenizer` when given), checked against the size options: each of
    `--resolution`, `--patch-size`, `--context-length` must be unset or the model's, and the tokenizer must fit its
    vocabulary and end token (where the text tower pools); errors name both values."""
    pretrained = load_pretrained_clip(args.init_from, "--init-from")
    text, vision = pretrained.model.config.text_config, pretrained.model.config.vision_config
    for flag, given, field, value in (
        ("--resolution", args.resolution, "image size", vision.image_size),
        ("--patch-size", args.patch_size, "patch size", vision.patch_size),
        ("--context-length", args.context_length, "context length", text.max_position_embeddings),
    ):
        if given is not None and given != value:
            raise ValueError(
                f"`{flag}` {given} does not fit `--init-from` {args.init_from!r}, whose {field} is {value}; leave "
                f"`{flag}` unset or pass {value}"
            )
    if args.tokenizer:
        pretrained.tokenizer = load_tokenizer(args.tokenizer)
    tokenizer = pretrained.tokenizer
    if tokenizer is None:
        raise ValueError(
            f"`--init-from` {args.init_from!r} has no tokenizer beside the model; pass the one it was trained with "
            "as `--tokenizer`"
        )
    if len(tokenizer) > text.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens, but `--init-from` {args.init_from!r} has a vocabulary of "
            f"{text.vocab_size}; pass the tokenizer it was trained with"
        )
    # transformers pools at the first `eos_token_id`, except for the legacy id 2 (the argmax of the ids)
    if text.eos_token_id != 2 and tokenizer.eos_token_id != text.eos_token_id:
        raise ValueError(
            f"the tokenizer's end token is {tokenizer.eos_token_id}, but `--init-from` {args.init_from!r} pools at "
            f"{text.eos_token_id}; pass the tokenizer it was trained with"
        )
    tokenizer.model_max_length = text.max_position_embeddings
    return pretrained


def open_clip_data(
    args: argparse.Namespace, model_resolution: int | None = None
) -> tuple[torch.utils.data.Dataset, int, tuple | None]:
    """The training split at `--resolution` (default: the pretrained model's `model_resolution`, else the preset's,
    else the data's), its decoded images kept in memory when they fit; and what validation reads (None when it is
    off or the split does not exist)."""
    preset = clip_presets().get(args.model)
    resolution = args.resolution or model_resolution or (preset["vision"]["image_size"] if preset else None)
    dataset_kwargs = dataset_options(args)
    dataset = open_image_text_dataset(args.data, split=args.split, resolution=resolution, **dataset_kwargs)
    resolution = resolution or native_resolution(dataset)
    split = validation_split(args)  # a missing split named by the user fails before the images are decoded
    if not is_streamed(dataset):  # streamed shards are decoded as they come
        _cache_images(dataset, resolution, args.image_cache_mb)
    validation = None
    if split is not None:
        val_set = ImageCaptionDataset(args.data, split=split, resolution=resolution, **dataset_kwargs)
        held_out = (val_set.info or {}).get("held_out")
        validation = (val_set, held_out, args.validation_max_images)
    return dataset, resolution, validation


def train_clip_tokenizer(args: argparse.Namespace, dataset):
    """A tokenizer trained on the training captions, with the preset's context length unless `--context-length`."""
    preset = clip_presets().get(args.model)
    context = args.context_length or (preset["text"]["max_position_embeddings"] if preset else 77)
    return train_tokenizer(dataset.captions, vocab_size=args.vocab_size, context_length=context)


def configure_clip_for_training(
    clip: CLIPModel, args: argparse.Namespace, device: torch.device, mixed_precision: str = "no"
) -> None:
    """The speed and memory options of a CLIP about to train on `device`.

    `--gradient-checkpointing`, `--attn-implementation`. Without the latter, on CPU in bf16 both towers run
    transformers' eager attention instead of SDPA: PyTorch's fused CPU attention kernel is slow in bf16 backward on
    these short sequences (17 image tokens, at most 32 text tokens; README, "Speed and scale"). Training only: `save_pretrained` does not record the choice, so the saved CLIP loads with
    the default.
    """
    if args.gradient_checkpointing:
        clip.gradient_checkpointing_enable()
    chosen = getattr(args, "attn_implementation", None)
    if chosen is None and device.type == "cpu" and mixed_precision == "bf16":
        chosen = "eager"
    if chosen is not None:
        try:
            clip.set_attn_implementation(chosen)
        except (ImportError, ValueError) as err:
            raise ValueError(f"`--attn-implementation {chosen}` cannot run here: {err}") from None


def _cache_images(dataset: ImageCaptionDataset, resolution: int, limit_mb: int) -> None:
    """Keep the decoded images of `dataset` in memory when they fit in `limit_mb` (see `--image-cache-mb`)."""
    megabytes = len(dataset) * 3 * resolution * resolution / 2**20
    if megabytes > limit_mb:
        if limit_mb:
            logger.info("images not cached: %.0f MB decoded, over --image-cache-mb %d", megabytes, limit_mb)
        return
    start = time.perf_counter()
    held = dataset.cache_images()
    logger.info(
        "cached %d decoded images (%.0f MB) in %.1f s", len(dataset), held / 2**20, time.perf_counter() - start
    )


if __name__ == "__main__":
    raise SystemExit(main())
