"""The text-embedding cache: built once per encoder and caption list, reused, invalidated by a changed encoder."""

import logging

import pytest
import torch
from transformers import CLIPTextModelWithProjection

from clipcond.conditioning import TextEmbeddingCache, encoder_fingerprint, unique_captions
from clipcond.text_encoding import encode_prompts
from clipcond.tokenizer import load_tokenizer

CAPTIONS = ["a red circle", "a blue square at the top", "two green triangles", "a small yellow circle"]


def _encoder(path):
    encoder = CLIPTextModelWithProjection.from_pretrained(path).eval().requires_grad_(False)
    calls = []
    encoder.register_forward_hook(lambda module, args, output: calls.append(1))
    return encoder, load_tokenizer(path), calls


def test_cache_rows_are_the_encoder_outputs(tiny_clip_run, tmp_path):
    encoder, tokenizer, calls = _encoder(tiny_clip_run)
    cache = TextEmbeddingCache.build_or_load(encoder, tokenizer, CAPTIONS, tmp_path, batch_size=3, progress=False)
    assert len(calls) == 2 + 1  # two batches of captions, then the empty prompt
    assert [p.name for p in tmp_path.iterdir()] == [cache.path.name]  # one folder, no scratch left behind
    assert cache.path.name == f"text-embeddings-{cache.key}" and (cache.path / "index.json").is_file()

    reference = encode_prompts(encoder, tokenizer, CAPTIONS)
    rows = cache.lookup(torch.tensor([2, 0]))
    assert rows.hidden_states.dtype == torch.float32 and rows.attention_mask.dtype == torch.long
    assert rows.hidden_states.shape == (2, 32, 32) and rows.pooled.shape == (2, 32)
    # stored in fp16: equal to the encoder's fp32 outputs to fp16's precision
    torch.testing.assert_close(rows.hidden_states, reference.hidden_states[[2, 0]], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(rows.pooled, reference.pooled[[2, 0]], rtol=2e-3, atol=2e-3)
    assert torch.equal(rows.attention_mask, reference.attention_mask[[2, 0]])

    empty = encode_prompts(encoder, tokenizer, [""])
    looked_up = cache.lookup_empty(3)
    assert looked_up.hidden_states.shape == (3, 32, 32)
    torch.testing.assert_close(looked_up.hidden_states, empty.hidden_states.expand(3, -1, -1), rtol=2e-3, atol=2e-3)
    assert looked_up.attention_mask[0].sum() == 2  # start and end tokens only


def test_cache_is_reused_without_running_the_encoder(tiny_clip_run, tmp_path):
    encoder, tokenizer, calls = _encoder(tiny_clip_run)
    first = TextEmbeddingCache.build_or_load(encoder, tokenizer, CAPTIONS, tmp_path, progress=False)
    assert calls

    # a fresh load of the same run (as a resumed or second training run does) finds the same key and the file
    encoder, tokenizer, calls = _encoder(tiny_clip_run)
    second = TextEmbeddingCache.build_or_load(encoder, tokenizer, CAPTIONS, tmp_path, progress=False)
    assert calls == []
    assert second.key == first.key
    assert torch.equal(second.embeddings.hidden_states, first.embeddings.hidden_states)
    assert torch.equal(second.empty.hidden_states, first.empty.hidden_states)


def test_changed_encoder_or_captions_get_a_new_key(tiny_clip_run, tmp_path):
    encoder, tokenizer, calls = _encoder(tiny_clip_run)
    before = TextEmbeddingCache.build_or_load(encoder, tokenizer, CAPTIONS, tmp_path, progress=False)

    with torch.no_grad():
        encoder.text_model.final_layer_norm.bias[0] += 0.5  # one weight of the encoder changes
    calls.clear()
    after = TextEmbeddingCache.build_or_load(encoder, tokenizer, CAPTIONS, tmp_path, progress=False)
    assert after.key != before.key and calls  # recomputed, not read from the old file
    assert before.path.is_dir() and after.path.is_dir()
    assert not torch.equal(after.embeddings.hidden_states, before.embeddings.hidden_states)

    other_captions = TextEmbeddingCache.cache_key(encoder, tokenizer, CAPTIONS[:3])
    assert other_captions != after.key
    shorter_context = encoder_fingerprint(encoder, tokenizer, max_length=16)
    assert shorter_context != encoder_fingerprint(encoder, tokenizer, max_length=32)


def test_unreadable_cache_file_is_rebuilt(tiny_clip_run, tmp_path, caplog):
    encoder, tokenizer, calls = _encoder(tiny_clip_run)
    cache = TextEmbeddingCache.build_or_load(encoder, tokenizer, CAPTIONS, tmp_path, progress=False)
    expected = cache.embeddings.hidden_states  # read before the damage: the cache reads rows from its files
    shard = next(cache.path.glob("shard-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])  # truncated, as by a full disk
    calls.clear()
    with caplog.at_level(logging.WARNING, logger="clipcond.conditioning"):
        rebuilt = TextEmbeddingCache.build_or_load(encoder, tokenizer, CAPTIONS, tmp_path, progress=False)
    assert calls and "cannot be used" in caplog.text and "truncated" in caplog.text
    assert torch.equal(rebuilt.embeddings.hidden_states, expected)


def test_unique_captions_map_samples_to_rows():
    unique, rows = unique_captions(["b", "a", "b", "c", "a"])
    assert unique == ["b", "a", "c"]
    assert rows.tolist() == [0, 1, 0, 2, 1]


def test_duplicate_captions_are_refused(tiny_clip_run, tmp_path):
    encoder, tokenizer, _ = _encoder(tiny_clip_run)
    with pytest.raises(ValueError, match="`captions` must be distinct"):
        TextEmbeddingCache.build_or_load(encoder, tokenizer, ["a", "a"], tmp_path, progress=False)


def test_fingerprint_ignores_the_tokenizers_last_call(tiny_clip_run):
    """Fast tokenizers keep the padding/truncation of their last call in their state; the key must not."""
    encoder, tokenizer, _ = _encoder(tiny_clip_run)
    before = encoder_fingerprint(encoder, tokenizer, max_length=32)
    tokenizer(["a red circle"], padding="max_length", truncation=True, max_length=32)
    assert encoder_fingerprint(encoder, tokenizer, max_length=32) == before


def test_padding_columns_are_dropped_and_the_unet_output_is_unchanged(tiny_clip_run):
    from clipcond.models.unet import create_unet, unet_config
    from clipcond.text_encoding import TextEmbeddings

    encoder, tokenizer, _ = _encoder(tiny_clip_run)
    text = encode_prompts(encoder, tokenizer, ["a red circle", "two green triangles left of a blue square", ""])
    longest = int(text.attention_mask.sum(dim=1).max())
    assert longest < text.attention_mask.shape[1]  # padded to the context length

    trimmed = text.without_padding_columns()
    assert trimmed.hidden_states.shape == (3, longest, 32) and trimmed.attention_mask.shape == (3, longest)
    assert torch.equal(trimmed.attention_mask.sum(dim=1), text.attention_mask.sum(dim=1))  # no attended token lost
    assert trimmed.pooled is text.pooled

    torch.manual_seed(0)
    unet = create_unet(unet_config("test", sample_size=32, cross_attention_dim=32)).eval()
    sample, timesteps = torch.randn(3, 3, 32, 32), torch.tensor([10, 500, 990])
    with torch.no_grad():
        full = unet(sample, timesteps, text.hidden_states, encoder_attention_mask=text.attention_mask).sample
        short = unet(sample, timesteps, trimmed.hidden_states, encoder_attention_mask=trimmed.attention_mask).sample
    torch.testing.assert_close(short, full, rtol=1e-5, atol=1e-5)

    # a row that attends to nothing softmaxes uniformly over every column: then nothing is dropped
    unattended = TextEmbeddings(text.hidden_states, torch.zeros_like(text.attention_mask), None)
    assert unattended.without_padding_columns() is unattended


def test_a_batch_is_looked_up_through_its_longest_caption(tiny_clip_run, tmp_path):
    """Training reads the cache through `attended_columns`, counted on the CPU from the stored masks: the batch's
    longest caption (the empty prompt's too when it may replace one), every column when a row attends to nothing."""
    encoder, tokenizer, _ = _encoder(tiny_clip_run)
    cache = TextEmbeddingCache.build_or_load(encoder, tokenizer, CAPTIONS, tmp_path, progress=False)
    lengths = cache.embeddings.attention_mask.sum(dim=1)  # right-padded: the attended columns come first
    rows = torch.tensor([0, 2])
    columns = cache.attended_columns(rows)
    assert columns == int(lengths[rows].max()) < cache.embeddings.attention_mask.shape[1]
    assert cache.attended_columns(rows, with_empty=True) == columns  # the empty prompt is shorter than any caption

    short = cache.lookup(rows, columns)
    full = cache.lookup(rows)
    assert short.hidden_states.shape == (2, columns, 32) and torch.equal(
        short.hidden_states, full.hidden_states[:, :columns]
    )
    assert torch.equal(short.attention_mask.sum(dim=1), full.attention_mask.sum(dim=1))  # no attended token lost
    assert cache.lookup_empty(3, columns).attention_mask.shape == (3, columns)

    # a row that attends to nothing keeps every column
    stored = cache.embeddings
    stored.attention_mask[2] = 0
    in_memory = TextEmbeddingCache(CAPTIONS, stored, cache.empty, cache.key, cache.path)
    assert in_memory.attended_columns(rows) == stored.attention_mask.shape[1]
    assert in_memory.attended_columns(torch.tensor([0, 1])) == int(lengths[:2].max())


def test_attended_columns_round_up_for_compiled_models():
    """A compiled model meets a few shapes instead of one per caption length: the columns round up, to at most L."""
    from clipcond.text_encoding import attended_columns

    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]])
    assert attended_columns(mask) == 5 and attended_columns(mask, 4) == 8 and attended_columns(mask, 8) == 8
    assert attended_columns(mask, 16) == 10  # never past the context


def test_a_single_file_cache_is_converted_without_the_encoder(tiny_clip_run, tmp_path, caplog):
    """A cache of the layout before the row store (one safetensors file) is copied into the sharded layout."""
    from safetensors.torch import save_file

    encoder, tokenizer, calls = _encoder(tiny_clip_run)
    cache = TextEmbeddingCache.build_or_load(encoder, tokenizer, CAPTIONS, tmp_path / "new", progress=False)
    rows, empty = cache.embeddings, cache.empty
    tensors = {"hidden_states": rows.hidden_states, "attention_mask": rows.attention_mask, "pooled": rows.pooled}
    tensors.update(
        {
            f"empty.{k}": v
            for k, v in (
                ("hidden_states", empty.hidden_states),
                ("attention_mask", empty.attention_mask),
                ("pooled", empty.pooled),
            )
        }
    )
    old = tmp_path / "old" / f"text-embeddings-{cache.key}.safetensors"
    old.parent.mkdir()
    save_file(tensors, old, metadata={"format": "1", "key": cache.key, "num_captions": str(len(CAPTIONS))})

    calls.clear()
    with caplog.at_level(logging.INFO, logger="clipcond.conditioning"):
        converted = TextEmbeddingCache.build_or_load(encoder, tokenizer, CAPTIONS, tmp_path / "old", progress=False)
    assert calls == [] and "converted the single-file text-embedding cache" in caplog.text
    assert not old.exists() and converted.path == old.parent / f"text-embeddings-{cache.key}"
    rows_back = converted.lookup(torch.tensor([3, 1]))
    expected = cache.lookup(torch.tensor([3, 1]))
    assert torch.equal(rows_back.hidden_states, expected.hidden_states)
    assert torch.equal(rows_back.pooled, expected.pooled)
    assert torch.equal(converted.lookup_empty(2).hidden_states, cache.lookup_empty(2).hidden_states)
    assert converted.attended_columns(torch.tensor([3, 1])) == cache.attended_columns(torch.tensor([3, 1]))


def test_a_nan_is_found_by_row_when_the_cache_is_scanned_in_pieces(tiny_clip_run, tmp_path, caplog, monkeypatch):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    import clipcond.row_store

    encoder, tokenizer, calls = _encoder(tiny_clip_run)
    cache = TextEmbeddingCache.build_or_load(encoder, tokenizer, CAPTIONS, tmp_path, progress=False)
    (shard,) = cache.path.glob("shard-*.safetensors")
    tensors = load_file(shard)
    tensors["hidden_states"][3, 5, 0] = float("inf")
    save_file(tensors, shard, metadata=safe_open(shard, framework="pt").metadata())
    monkeypatch.setattr(clipcond.row_store, "SCAN_BYTES", 2 * 32 * 32 * 2)  # two rows of (32, 32) fp16 a piece
    calls.clear()
    with caplog.at_level(logging.WARNING, logger="clipcond.conditioning"):
        TextEmbeddingCache.build_or_load(encoder, tokenizer, CAPTIONS, tmp_path, progress=False)
    assert (
        "its tensor 'hidden_states' holds 1 non-finite value(s) (NaN or infinity) in rows 2 to 3, the first in row 3"
        in caplog.text
    )
    assert calls  # rebuilt
