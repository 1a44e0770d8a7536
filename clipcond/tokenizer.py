"""A BPE tokenizer trained on a data set's captions, saved so that `AutoTokenizer.from_pretrained(run)` loads it.

The layout follows OpenAI's CLIP tokenizer: lower-cased text, byte-level BPE (so no input is ever unknown),
`<|startoftext|> ... <|endoftext|>` around every caption, fixed context length, padded with the end token. The
special tokens take the first ids, with the end token at 0: transformers' `CLIPTextTransformer` pools the hidden
state at the first end token, except for configs whose `eos_token_id` is 2, which it treats as a legacy checkpoint
(argmax of the ids).

The padding token matters only where the padding is read: a CLIP and a decoder that mask it never see it, but a
decoder trained as Stable Diffusion's (unmasked, `--no-mask-text-padding`) cross-attends to every padding position.
Padded with the end token, as Stable Diffusion v1's tokenizer is, each of those positions is an end token that has
read the whole caption through the causal mask, so it carries what CLIP pools; a padding token of its own starts
from an embedding that CLIP's training never updates (it is masked there), and a small UNet then loses the count
word (docs/lab-notes.md, "the padding token"). `<|pad|>` stays in the vocabulary for language models that need a
padding distinct from the end (the captioner's word dropout writes it over hidden words).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|startoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [EOS_TOKEN, BOS_TOKEN, PAD_TOKEN]  # ids 0, 1, 2


def train_tokenizer(
    texts: Iterable[str], *, vocab_size: int = 1024, context_length: int = 32, pad_token: str = EOS_TOKEN
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` and wrap it as a transformers fast tokenizer that pads with
    `pad_token` (the end token, as OpenAI's CLIP tokenizer; or `PAD_TOKEN`).

    `vocab_size` is an upper bound: on a small caption vocabulary the merges run out first, and `len(tokenizer)`
    is the size to build the text embedding with.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"`vocab_size` must be at least {256 + len(SPECIAL_TOKENS)} (the byte alphabet), got {vocab_size}"
        )
    if pad_token not in (EOS_TOKEN, PAD_TOKEN):
        raise ValueError(f"`pad_token` must be {EOS_TOKEN!r} or {PAD_TOKEN!r}, got {pad_token!r}")
    if context_length < 3:
        raise ValueError(f"`context_length` must be >= 3 (start, one token, end), got {context_length}")

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase(), normalizers.Strip()])
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
        special_tokens=[(BOS_TOKEN, tokenizer.token_to_id(BOS_TOKEN)), (EOS_TOKEN, tokenizer.token_to_id(EOS_TOKEN))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=pad_token,
        model_max_length=context_length,
        padding_side="right",
    )


def load_tokenizer(path: str | os.PathLike, what: str = "--tokenizer") -> PreTrainedTokenizerBase:
    """Load a tokenizer saved with `save_pretrained` (ours, or any transformers CLIP tokenizer) from a folder or a
    Hugging Face Hub id (see `clipcond.hub`); errors name the argument `what`."""
    from clipcond.hub import local_files_only, resolve_folder

    path = os.fspath(resolve_folder(path, what, "pass a tokenizer saved with `save_pretrained`"))
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_files_only())
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer in {path!r} has no end-of-text token; CLIP pools at that token")
    if tokenizer.pad_token_id is None:  # OpenAI's CLIP tokenizer pads with the end token
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
