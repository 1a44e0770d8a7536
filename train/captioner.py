"""`clipcond train captioner`: a LLaVA-style captioner on a CLIP run's frozen image tower.

    clipcond train captioner --clip runs/clip --data shapes/ --output-dir runs/cap
    clipcond train captioner --clip runs/clip --data shapes/ --output-dir runs/cap2 --init-captioner runs/cap

A small decoder-only language model (transformers `LlamaForCausalLM` of a `--model` preset, trained from scratch, or
`--init-lm`'s pretrained causal LM) reads the CLIP's penultimate-layer patch tokens and pooled image embedding
through a two-layer MLP projector (`clipcond.models.captioner`; Liu et al. 2023, LLaVA), and learns to write the
data's captions. On the shapes data it also learns to answer questions generated from the metadata
(`clipcond.data.questions`): each training example is a question with probability `--question-fraction`, drawn
anew every step. The loss is the next-token cross-entropy on the caption or answer only; with `--word-dropout` the
model's input hides some of those tokens (`drop_words`).

LLaVA's two stages: `--stage full` (the default) trains the projector and the language model; `--stage projector`
trains the projector alone on a frozen language model (LLaVA's feature-alignment pre-training), which therefore must
come pretrained: `--init-lm` or `--init-captioner`. From scratch, a BPE tokenizer (`clipcond.tokenizer`) is trained
on the captions and questions and saved with the language model; `--init-lm` brings its own.

The vision tower runs once, before training, over the training (and validation) images into a `VisionTokenCache`
(`RUN/cache/` by default). The run folder is a captioner folder (`Captioner.save_pretrained`: `lm/` loads with
transformers' `AutoModelForCausalLM` and `AutoTokenizer`, `projector/`, `vision_encoder/`), plus
`clipcond_run.json` (arguments, data, the CLIP's content hash, the tasks, summary), `checkpoints/`, `cache/`,
`logs/`. Validation (`clipcond.evaluation.captioner`, greedy captions of the first `--validation-max-images`
one-object images of `--validation-split`, and their questions) runs every `--validation-steps` and at the end,
on the shapes data.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import KW_ONLY, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from clipcond.data.folders import ImageCaptionDataset
from clipcond.data.open import add_data_arguments, add_validation_split_argument, dataset_options, validation_split
from clipcond.data.questions import QUESTION_TYPES, has_questions, question_texts, questions_for
from clipcond.data.shapes import is_shapes_data, load_dataset_info
from clipcond.finite import finite_float
from clipcond.help_formatter import HelpFormatter
from clipcond.hub import check_local_folder
from clipcond.lineage import content_hash, init_record
from clipcond.models.captioner import (
    IGNORE_INDEX,
    LM_FOLDER,
    PROJECTOR_FOLDER,
    Captioner,
    CaptionerModel,
    VisionProjector,
    lm_config,
    lm_hidden_size,
    position_limit,
    prompt_ids,
    question_prompt,
    target_ids,
    text_batch,
)
from clipcond.models.clip import load_vision_tower
from clipcond.runs import RunRecord, check_same_encoder
from clipcond.train.diffusion import cache_dir
from clipcond.train.loop import (
    IndexDataset,
    Stage,
    add_training_args,
    collate_indices,
    data_record,
    draw_rows,
    finish_run,
    make_output_dir,
    parse_training_args,
    prepare_training,
    run_stage,
    train,
    trainable_parameters,
)
from clipcond.transfer import to_device
from clipcond.vision_tokens import DEFAULT_SELECT_LAYER, VisionTokenCache

logger = logging.getLogger(__name__)

STAGES = ("full", "projector")
WORD_DROPOUT = 0.2
TEXT_CONTEXT = 64  # text positions the language model is built for, beyond the image tokens

# CPU-sized training defaults for the `tiny` language model on the shapes data (README, "What it reaches on 2 CPU
# cores")
TRAINING_DEFAULTS = {
    "train_batch_size": 64,
    "learning_rate": 1e-3,
    "max_train_steps": 1500,
    "lr_warmup_steps": 50,
    "weight_decay": 1e-2,
    "checkpointing_steps": 500,
    "validation_steps": 500,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="clipcond train captioner",
        description="Train a LLaVA-style captioner: a small causal language model reading a CLIP run's frozen "
        "image tokens through an MLP projector, on the data's captions (and, on the shapes data, questions).",
        formatter_class=HelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument("--clip", required=True, help="CLIP run folder (from `clipcond train clip`): its image tower")
    add_data_arguments(data)
    data.add_argument("--cache-dir", default=None, help="folder of the vision-token cache (default OUTPUT_DIR/cache)")
    data.add_argument("--encode-batch-size", type=int, default=256, help="images per vision-tower call")
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model", default="tiny", help="language model preset (test, tiny, small, base) or a JSON LlamaConfig file"
    )
    init = model.add_mutually_exclusive_group()
    init.add_argument(
        "--init-lm",
        default=None,
        metavar="PATH",
        help="start from a pretrained transformers causal LM folder (with its tokenizer) instead of --model's preset",
    )
    init.add_argument(
        "--init-captioner",
        default=None,
        metavar="RUN",
        help="start from a captioner run (its language model, tokenizer and projector), trained on the same --clip",
    )
    model.add_argument(
        "--stage",
        default="full",
        choices=STAGES,
        help="full: train the projector and the language model; projector: the projector only, on a frozen "
        "pretrained language model (--init-lm or --init-captioner), as LLaVA's first stage",
    )
    model.add_argument("--vocab-size", type=int, default=1024, help="BPE vocabulary of a tokenizer trained here")
    model.add_argument(
        "--word-dropout",
        type=finite_float,
        default=WORD_DROPOUT,
        help="probability of hiding each caption or answer token from the model's input (it still learns to write "
        "it), so that it reads attributes off the image rather than guessing them from the words before",
    )
    model.add_argument(
        "--question-fraction",
        type=finite_float,
        default=0.5,
        help="share of training examples that are questions about the image, on the shapes data (0: captions only)",
    )
    val = parser.add_argument_group("validation (`clipcond eval captioner` on the first images of a split)")
    add_validation_split_argument(val)
    val.add_argument("--validation-max-images", type=int, default=64, help="images per validation")
    add_training_args(parser, **TRAINING_DEFAULTS)
    return parse_training_args(parser, argv, check_captioner_args)


def check_captioner_args(args: argparse.Namespace) -> None:
    """Reject values that would fail later or train nonsense, naming the option and the value."""
    if not 0.0 <= args.word_dropout < 1.0:
        raise ValueError(f"`--word-dropout` must be in [0, 1), got {args.word_dropout}")
    if not 0.0 <= args.question_fraction <= 1.0:
        raise ValueError(f"`--question-fraction` must be in [0, 1], got {args.question_fraction}")
    for name in ("encode_batch_size", "validation_max_images"):
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name.replace('_', '-')}` must be >= 1, got {getattr(args, name)}")
    if args.stage == "projector" and not (args.init_lm or args.init_captioner):
        raise ValueError(
            "`--stage projector` trains the projector on a frozen language model, which must be pretrained: pass "
            "--init-lm PATH or --init-captioner RUN (or use --stage full)"
        )
    for flag, value in (("--clip", args.clip), ("--init-lm", args.init_lm), ("--init-captioner", args.init_captioner)):
        if value:
            check_local_folder(value, flag)


# ---------------------------------------------------------------------------------------------- the training data


@dataclass
class CaptionerData:
    """The training examples by data set index: the cached image tokens, the caption's tokens and the questions'."""

    cache: VisionTokenCache
    captions: list[list[int]]  # per row: the caption's target ids (with <eos>)
    questions: list[list[tuple[list[int], list[int]]]]  # per row: (prompt ids, answer ids) of each question
    caption_prompt: list[int]  # <bos>
    pad_token_id: int

    @property
    def width(self) -> int:
        """The longest prompt + target of the data: the text batches are at most this wide."""
        questions = (len(p) + len(t) for row in self.questions for p, t in row)
        return max(max(len(self.caption_prompt) + len(t) for t in self.captions), max(questions, default=0))

    def text(
        self, index: list[int], ask: list[bool], pick: list[int], device: torch.device
    ) -> dict[str, torch.Tensor]:
        """The text batch of rows `index`, on `device`: row k a question (the `pick[k]`-th, modulo) where `ask[k]`
        and the row has questions, else its caption."""
        prompts, targets = [], []
        for i, a, p in zip(index, ask, pick, strict=True):
            if a and self.questions[i]:
                prompt, target = self.questions[i][p % len(self.questions[i])]
            else:
                prompt, target = self.caption_prompt, self.captions[i]
            prompts.append(prompt)
            targets.append(target)
        return text_batch(prompts, targets, self.pad_token_id, device)


def build_data(dataset: ImageCaptionDataset, cache: VisionTokenCache, tokenizer, questions: bool) -> CaptionerData:
    """Tokenise every row's caption (cut to `TEXT_CONTEXT` tokens with <bos> and <eos>) and, with `questions`, its
    questions once."""
    captions, asked = [], []
    for item in cache.item_indices.tolist():  # the item each row was read from
        captions.append(target_ids(tokenizer, dataset.captions[item], max_tokens=TEXT_CONTEXT - 1))
        pairs = questions_for(dataset.records[item]) if questions else []
        asked.append([(prompt_ids(tokenizer, q.question), target_ids(tokenizer, q.answer)) for q in pairs])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return CaptionerData(cache, captions, asked, prompt_ids(tokenizer, None), pad)


def unknown_token_id(tokenizer) -> int | None:
    """The id word dropout writes over a hidden token: the tokenizer's unknown token, or its padding token (the
    tokenizers trained here have a dedicated one), where that is no end or begin token; None when neither is (a
    GPT-2's unknown and padding tokens are its end-of-text, which a pretrained LM reads as the end of the text): then
    the hidden tokens' embeddings are zeroed instead (`CaptionerModel.inputs`'s `dropped`)."""
    special = {tokenizer.eos_token_id, tokenizer.bos_token_id}
    for candidate in (tokenizer.unk_token_id, tokenizer.pad_token_id):
        if candidate is not None and candidate not in special:
            return candidate
    return None


def drop_words(text: dict[str, torch.Tensor], drop: torch.Tensor, unknown_id: int | None) -> dict[str, torch.Tensor]:
    """`text` with its target tokens where `drop` (B, T) is True hidden from the model's input: their input ids
    replaced by `unknown_id`, or, where that is None, marked in `dropped` (B, T) for the model to zero their
    embeddings. The labels keep them, so the model still learns to write every token, but cannot always read the
    one before. Word dropout (Bowman et al. 2016, "Generating Sentences from a Continuous Space", sec. 3.2): the
    model learns to rely on the image rather than on the text's own co-occurrences, which matter for compositions
    never seen together ("red" never precedes "triangle" in the shapes data's training text)."""
    hidden = drop & (text["labels"] != IGNORE_INDEX)
    if unknown_id is None:
        return {**text, "dropped": hidden}
    return {
        **text,
        "input_ids": torch.where(hidden, torch.full_like(text["input_ids"], unknown_id), text["input_ids"]),
    }


# -------------------------------------------------------------------------------------------------- the stage


@dataclass
class CaptionerValidation:
    dataset: ImageCaptionDataset
    info: dict
    questions: bool
    max_images: int


def token_weighted(loss: torch.Tensor, labels: torch.Tensor, accelerator: Accelerator) -> torch.Tensor:
    """`loss`, this process's mean over the labelled tokens of its `labels` (B, T), weighted so that the mean over
    processes (DDP averages their gradients) is the mean over every labelled token of the global batch, as one
    process holding the whole batch computes it: a caption (about 8 tokens) and an answer (1-2) weigh by their
    tokens wherever they fall. On one process the loss is returned as it is. (The micro-steps of an accumulated step
    weigh equally, on any number of processes.)"""
    if accelerator.num_processes == 1:
        return loss
    tokens = (labels != IGNORE_INDEX).sum().float()
    return loss * tokens * accelerator.num_processes / accelerator.reduce(tokens, reduction="sum")


@dataclass(eq=False)
class CaptionerStage(Stage):
    """The next-token loss on captions and answers, validation by `clipcond eval captioner`'s figures, and the
    export of a captioner folder."""

    accelerator: Accelerator
    model: torch.nn.Module  # CaptionerModel, as Accelerate prepared it
    data: CaptionerData
    _: KW_ONLY
    vision: tuple  # (CLIPVisionModelWithProjection, image_mean, image_std): the frozen tower, saved with the model
    tokenizer: object
    question_fraction: float
    clip_hash: str  # content hash of the frozen CLIP (`clipcond.lineage.content_hash`)
    validation: CaptionerValidation | None
    word_dropout: float = 0.0

    def __post_init__(self):
        self.width = self.data.width
        self.unknown_id = unknown_token_id(self.tokenizer)

    @property
    def unwrapped(self) -> CaptionerModel:
        return self.accelerator.unwrap_model(self.model)

    def loss(self, batch, generator):
        device = self.accelerator.device
        index = batch["index"]
        on_generator = {"generator": generator, "device": generator.device}
        n = len(index)
        # which examples are questions, and which question: drawn anew each step from the stage's generator
        ask = draw_rows(lambda m: torch.rand(m, **on_generator), n) < self.question_fraction
        pick = draw_rows(lambda m: torch.randint(0, 1 << 30, (m,), **on_generator), n)
        text = self.data.text(index.tolist(), ask.tolist(), pick.tolist(), device)
        if self.word_dropout > 0:
            # drawn at the data's full width, so every batch (and process) takes as many numbers from the generator
            drop = draw_rows(lambda m: torch.rand((m, self.width), **on_generator), n, device)
            drop = drop[:, : text["input_ids"].shape[1]] < self.word_dropout
            text = drop_words(text, drop, self.unknown_id)
        patches, embeds = self.data.cache.lookup(index)
        loss = self.model(to_device(patches, device), to_device(embeds, device), **text)
        return token_weighted(loss, text["labels"], self.accelerator), {}

    def captioner(self) -> Captioner:
        model = self.unwrapped
        return Captioner(*self.vision, model.projector, model.lm, self.tokenizer)

    def validate(self, step):
        if self.validation is None:
            return {}
        from clipcond.evaluation.captioner import evaluate_captioner, flat_figures

        v = self.validation
        self.unwrapped.eval()
        result = evaluate_captioner(
            self.captioner(), v.dataset, info=v.info, questions=v.questions, max_images=v.max_images
        )
        return flat_figures(result)

    def extra_state(self):
        return {"clip_content_hash": self.clip_hash}

    def load_extra_state(self, state):
        saved = state.get("clip_content_hash")
        check_same_encoder(
            saved,
            self.clip_hash,
            mismatch=f"the checkpoint was trained on the CLIP with content hash {str(saved)[:12]}..., but `--clip` "
            f"has {self.clip_hash[:12]}...",
            fix="resume with the CLIP it was trained on, or start a new run",
            allowed_by="nothing",
            allow=False,
        )

    def export(self, path: Path):
        self.captioner().save_pretrained(path)


# -------------------------------------------------------------------------------------------- set-up steps


def open_data(args: argparse.Namespace, resolution: int) -> tuple[ImageCaptionDataset, ImageCaptionDataset | None]:
    """The training split at the vision tower's resolution, and the validation split (None when validation is off,
    the default split is missing (`validation_split`), or the data is not the shapes data, whose metadata
    validation scores against)."""
    options = {**dataset_options(args), "resolution": resolution}
    dataset = ImageCaptionDataset(args.data, split=args.split, **options)
    split = validation_split(args) if args.validation_steps and is_shapes_data(dataset.info) else None
    if split is None:
        return dataset, None
    return dataset, ImageCaptionDataset(args.data, split=split, **options)


def tokenizer_texts(dataset: ImageCaptionDataset, questions: bool) -> list[str]:
    """What a tokenizer trained here learns its merges from: the captions, and the questions and answers."""
    texts = list(dataset.captions)
    if questions:
        texts += [question_prompt(q) for q in question_texts(dataset.records)]
        texts += sorted({q.answer for r in dataset.records for q in questions_for(r)})
    return texts


def build_language_model(args: argparse.Namespace, texts: list[str], num_image_tokens: int):
    """(language model, tokenizer, projector or None, the folder the LM came from or None): from `--init-captioner`
    (with its projector), `--init-lm`, or `--model`'s preset at random with a tokenizer trained on `texts`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from clipcond.device import transformers_dtype_keyword

    # Trained in fp32 whatever the saved weights' dtype (mixed precision is autocast's): AdamW's small updates round
    # away in bf16 weights, and transformers may load a model in the dtype it was saved in.
    if args.init_captioner:
        pretrained = Captioner.from_pretrained(args.init_captioner, "--init-captioner")
        lm, projector = pretrained.lm.float(), pretrained.projector.float()
        return lm, pretrained.tokenizer, projector, Path(args.init_captioner) / LM_FOLDER
    if args.init_lm:
        try:
            lm = AutoModelForCausalLM.from_pretrained(args.init_lm, **{transformers_dtype_keyword(): torch.float32})
            tokenizer = AutoTokenizer.from_pretrained(args.init_lm)
        except (OSError, ValueError) as err:
            raise ValueError(
                f"`--init-lm` {args.init_lm!r}: cannot load a causal LM and its tokenizer ({err})"
            ) from None
        if tokenizer.eos_token_id is None:
            raise ValueError(f"`--init-lm` {args.init_lm!r}: its tokenizer has no end token to stop a caption at")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        return lm, tokenizer, None, Path(args.init_lm)
    from clipcond.tokenizer import PAD_TOKEN, train_tokenizer

    # a padding token of its own: word dropout writes it over hidden words, which must not read as the end
    tokenizer = train_tokenizer(texts, vocab_size=args.vocab_size, context_length=TEXT_CONTEXT, pad_token=PAD_TOKEN)
    config = lm_config(args.model, tokenizer=tokenizer, max_position_embeddings=num_image_tokens + TEXT_CONTEXT)
    return LlamaForCausalLM(config), tokenizer, None, None


def build_captioner_model(args: argparse.Namespace, dataset, cache: VisionTokenCache, questions: bool):
    """(CaptionerModel, tokenizer, CaptionerData, the folder the LM came from or None): the language model and its
    tokenizer (`build_language_model`), the projector for the cached tokens' widths (new, or `--init-captioner`'s),
    frozen LM under `--stage projector`, and the tokenised training examples."""
    num_image_tokens = cache.patch_tokens.shape[1] + 1
    lm, tokenizer, projector, init_folder = build_language_model(
        args, tokenizer_texts(dataset, questions), num_image_tokens
    )
    vision_width, embed_dim = cache.patch_tokens.shape[2], cache.image_embeds.shape[1]
    if projector is None:
        projector = VisionProjector(vision_width=vision_width, embed_dim=embed_dim, hidden_size=lm_hidden_size(lm))
    if (projector.config.vision_width, projector.config.embed_dim) != (vision_width, embed_dim):
        raise ValueError(
            f"`--init-captioner`'s projector reads {projector.config.vision_width}-wide patch tokens and "
            f"{projector.config.embed_dim}-wide embeddings, but `--clip` gives {vision_width} and {embed_dim}"
        )
    if args.stage == "projector":
        lm.requires_grad_(False)
    model = CaptionerModel(projector, lm)
    data = build_data(dataset, cache, tokenizer, questions)
    check_positions(args, lm, num_image_tokens, data.width)
    logger.info(
        "captioner: language model %s %.2f M parameters (%s), projector %.2f M; %d image tokens; questions: %s",
        type(lm).__name__,
        sum(p.numel() for p in lm.parameters()) / 1e6,
        "trained" if args.stage == "full" else "frozen",
        trainable_parameters(projector) / 1e6,
        num_image_tokens,
        questions,
    )
    return model, tokenizer, data, init_folder


def check_positions(args: argparse.Namespace, lm, num_image_tokens: int, text_width: int) -> None:
    """The image tokens and the widest text must fit the language model's positions (`position_limit`): a learned
    position table (GPT-2's `n_positions`) fails past it with an index error, on CUDA a device-side assert."""
    limit = position_limit(lm)
    if limit is None or num_image_tokens + text_width <= limit:
        return
    flag = "--init-lm" if args.init_lm else "--init-captioner" if args.init_captioner else "--model"
    value = getattr(args, flag[2:].replace("-", "_"))
    raise ValueError(
        f"`{flag}` {value!r} reads at most {limit} positions, but the captioner's inputs take {num_image_tokens} image "
        f"tokens + {text_width} text tokens = {num_image_tokens + text_width}: pass a language model with more "
        "positions, or a CLIP with fewer patches"
    )


def check_init_captioner(args: argparse.Namespace, clip_hash: str) -> None:
    """`--init-captioner` must have been trained on `--clip`: its projector reads that tower's tokens."""
    if not args.init_captioner:
        return
    record = RunRecord.read_if_present(args.init_captioner)
    check_same_encoder(
        None if record is None else record.clip_hash,
        clip_hash,
        mismatch=f"`--init-captioner` {args.init_captioner!r} was trained on another CLIP than `--clip` {args.clip!r}",
        missing=f"`--init-captioner` {args.init_captioner!r} has no run record naming its CLIP",
        fix="pass the CLIP it was trained on",
        allowed_by="nothing",
        allow=False,
    )


def run_record(args, *, dataset, cache, model, tokenizer, init_folder, questions, clip_hash) -> dict:
    """The captioner's sections of the run record (after the export: it hashes the saved model)."""
    output_dir = Path(args.output_dir)
    lm = model.lm
    return {
        "data": data_record(
            args,
            len(dataset),
            skipped_files=cache.skipped,
            num_image_tokens=cache.patch_tokens.shape[1] + 1,
        ),
        "clip": {"path": str(args.clip), "content_hash": clip_hash},
        "cache": {"path": str(cache.path), "key": cache.key},
        "lm": {
            "preset": None if (args.init_lm or args.init_captioner) else args.model,
            **init_record(args.init_lm or args.init_captioner, init_folder),
            "class": type(lm).__name__,
            "parameters": sum(p.numel() for p in lm.parameters()),
            "trained": args.stage == "full",
            "content_hash": content_hash(output_dir / LM_FOLDER),
        },
        "projector": {
            "parameters": trainable_parameters(model.projector),
            "content_hash": content_hash(output_dir / PROJECTOR_FOLDER),
        },
        "tasks": {
            "captions": True,
            "questions": questions,
            "question_fraction": args.question_fraction if questions else 0.0,
            "question_types": list(QUESTION_TYPES) if questions else [],
        },
        "stage": args.stage,
        "word_dropout": word_dropout_record(args.word_dropout, tokenizer),
    }


def word_dropout_record(probability: float, tokenizer) -> dict:
    """How word dropout hid the tokens it drew (`unknown_token_id`): as a token, or as a zero embedding."""
    unknown = unknown_token_id(tokenizer)
    return {
        "probability": probability,
        "hidden_as": "zero embedding" if unknown is None else "token",
        "token": None if unknown is None else tokenizer.convert_ids_to_tokens(unknown),
        "token_id": unknown,
    }


# --------------------------------------------------------------------------------------------------- the entry


def main(argv: list[str] | None = None) -> int:
    return run_stage(parse_args(argv), train_captioner)


def train_captioner(accelerator: Accelerator, args: argparse.Namespace) -> int:
    # 2. The frozen image tower (first: a wrong --clip fails before anything is read or written)
    vision_model, image_mean, image_std = load_vision_tower(args.clip)
    vision_model.to(accelerator.device)
    clip_hash = content_hash(args.clip)
    check_init_captioner(args, clip_hash)
    make_output_dir(accelerator, args)

    # 3. Data, at the tower's resolution; questions where the metadata describes the objects
    dataset, validation_set = open_data(args, vision_model.config.image_size)
    questions = args.question_fraction > 0 and has_questions(dataset.records)

    # 4. The tower's tokens of every training image, computed once
    folder = cache_dir(args, Path(args.output_dir))
    with accelerator.main_process_first():
        cache = VisionTokenCache.build_or_load(
            vision_model,
            dataset,
            folder,
            image_mean=image_mean,
            image_std=image_std,
            select_layer=DEFAULT_SELECT_LAYER,
            batch_size=args.encode_batch_size,
            device=accelerator.device,
            progress=accelerator.is_local_main_process,
        )

    # 5. The language model and its tokenizer, the projector, the training examples
    model, tokenizer, data, init_folder = build_captioner_model(args, dataset, cache, questions)

    # 6. Optimizer (the trainable parameters only), schedule; prepare
    prepared = prepare_training(accelerator, args, model)

    # 7. Train
    validation = None
    if validation_set is not None:
        validation = CaptionerValidation(
            validation_set, load_dataset_info(args.data), questions, args.validation_max_images
        )
    stage = CaptionerStage(
        accelerator,
        prepared.model,
        data,
        vision=(vision_model, image_mean, image_std),
        tokenizer=tokenizer,
        question_fraction=args.question_fraction if questions else 0.0,
        clip_hash=clip_hash,
        validation=validation,
        word_dropout=args.word_dropout,
    )
    result = train(accelerator, args, stage, prepared, dataset=IndexDataset(len(dataset)), collate_fn=collate_indices)

    # 8. Save the captioner and the run record
    record = {
        "dataset": dataset,
        "cache": cache,
        "init_folder": init_folder,
        "questions": questions,
        "tokenizer": tokenizer,
    }
    finish_run(
        accelerator,
        args,
        stage,
        result,
        "clipcond-captioner",
        lambda: run_record(args, model=stage.unwrapped, clip_hash=clip_hash, **record),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
