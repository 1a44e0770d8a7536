"""The captions' BPE tokenizer: padded with the end token as OpenAI's CLIP tokenizer, and CLIP still pools at the
first end token of a caption, wherever the padding stops."""

import pytest
import torch
from transformers import CLIPModel

from clipcond.models.clip import clip_config, text_features
from clipcond.tokenizer import EOS_TOKEN, PAD_TOKEN, train_tokenizer

CAPTIONS = ["a red circle", "two blue squares", "a green triangle left of a yellow circle"]


def test_pads_with_the_end_token_by_default():
    tokenizer = train_tokenizer(CAPTIONS, vocab_size=300, context_length=16)
    ids = tokenizer(["a red circle"], padding="max_length", max_length=16)
    real = sum(ids["attention_mask"][0])
    assert tokenizer.pad_token == EOS_TOKEN
    assert ids["input_ids"][0][real - 1 :] == [tokenizer.eos_token_id] * (16 - real + 1)
    assert ids["input_ids"][0][0] == tokenizer.bos_token_id


def test_a_padding_token_of_its_own_on_request():
    tokenizer = train_tokenizer(CAPTIONS, vocab_size=300, context_length=16, pad_token=PAD_TOKEN)
    ids = tokenizer(["a red circle"], padding="max_length", max_length=16)["input_ids"][0]
    assert tokenizer.pad_token_id not in (tokenizer.eos_token_id, tokenizer.bos_token_id)
    assert ids[-1] == tokenizer.pad_token_id and ids.count(tokenizer.eos_token_id) == 1


def test_an_unknown_padding_token_is_refused():
    with pytest.raises(ValueError, match=r"`pad_token` must be .*got '\[PAD\]'"):
        train_tokenizer(CAPTIONS, vocab_size=300, pad_token="[PAD]")


@pytest.mark.parametrize("mask", [True, False])
def test_clip_pools_at_the_first_end_token(mask):
    """Padded with end tokens, and with or without the attention mask, the pooled text embedding is the state at
    the caption's own end token: the same as for the caption with no padding at all."""
    torch.manual_seed(0)
    tokenizer = train_tokenizer(CAPTIONS, vocab_size=300, context_length=16)
    ids = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}
    ids |= {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    clip = CLIPModel(clip_config("test", context_length=16, **ids)).eval()
    padded = tokenizer(CAPTIONS, padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        pooled = text_features(clip, padded["input_ids"], padded["attention_mask"] if mask else None)
        for row, caption in enumerate(CAPTIONS):
            alone = tokenizer([caption], return_tensors="pt")["input_ids"]
            assert alone.shape[1] < 16  # the padded row has end tokens after the caption's own
            torch.testing.assert_close(pooled[row], text_features(clip, alone)[0])
