"""The frozen image tower and its embedding cache: the convention (rows = normalisable `get_image_features`), built
once and reused, keyed by encoder and image files, robust to unreadable files."""

import hashlib
import json
import logging
import shutil

import pytest
import torch
from PIL import Image
from transformers import CLIPModel, CLIPVisionModelWithProjection

from clipcond import conditioning as conditioning_module
from clipcond.conditioning import ImageEmbeddingCache, encoder_fingerprint, vision_fingerprint
from clipcond.data.folders import ImageCaptionDataset
from clipcond.models.clip import load_text_tower, load_vision_tower
from clipcond.models.clip_pixels import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, normalize_pixels


@pytest.fixture(scope="module")
def vision(tiny_clip_run):
    return load_vision_tower(tiny_clip_run)


@pytest.fixture
def small_data(shapes_data, tmp_path):
    """A copy of the first 6 test images of the shapes data: a data set whose files a test may change."""
    root = tmp_path / "data"
    (root / "train").mkdir(parents=True)
    lines = (shapes_data / "test" / "metadata.jsonl").read_text().splitlines()[:6]
    for line in lines:
        name = json.loads(line)["file_name"]
        shutil.copy(shapes_data / "test" / name, root / "train" / name)
    (root / "train" / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _count_forward(model) -> list:
    calls = []
    model.register_forward_hook(lambda module, args, output: calls.append(1))
    return calls


def _build(vision, dataset, cache_dir, **kwargs):
    model, mean, std = vision
    return ImageEmbeddingCache.build_or_load(
        model, dataset, cache_dir, image_mean=mean, image_std=std, progress=False, **kwargs
    )


def test_load_vision_tower_is_frozen_with_the_run_statistics(vision, tiny_clip_run):
    model, mean, std = vision
    assert isinstance(model, CLIPVisionModelWithProjection)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert (mean, std) == (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)  # what `clipcond train clip` saves
    # the same weights as the CLIP run's vision tower
    clip = CLIPModel.from_pretrained(tiny_clip_run)
    torch.testing.assert_close(model.visual_projection.weight, clip.visual_projection.weight, rtol=0, atol=0)


def test_rows_are_the_clip_image_features_in_dataset_order(vision, tiny_clip_run, shapes_data, tmp_path):
    dataset = ImageCaptionDataset(shapes_data, split="test")
    cache = _build(vision, dataset, tmp_path, batch_size=16)  # 36 images in 3 batches
    assert cache.embeddings.shape == (36, 32) and cache.embeddings.dtype == torch.float16
    assert torch.equal(cache.item_indices, torch.arange(36)) and cache.skipped == []
    rows = cache.lookup(torch.tensor([5, 0, 35]))
    assert rows.dtype == torch.float32 and rows.shape == (3, 32)

    clip = CLIPModel.from_pretrained(tiny_clip_run).eval()
    pixels = torch.stack([dataset[i]["pixel_values"] for i in (5, 0, 35)])
    with torch.no_grad():
        expected = clip.get_image_features(pixel_values=normalize_pixels(pixels))
    expected = getattr(expected, "pooler_output", expected)  # transformers 5 may return an output object
    # stored in fp16: ~1e-3 relative
    torch.testing.assert_close(rows, expected, rtol=2e-3, atol=2e-3)


def test_built_once_then_loaded_without_the_encoder(vision, small_data, tmp_path):
    dataset = ImageCaptionDataset(small_data)
    calls = _count_forward(vision[0])
    rng = torch.get_rng_state()
    first = _build(vision, dataset, tmp_path, batch_size=4)
    assert len(calls) == 2  # 6 images in batches of 4
    # building leaves the global RNG alone: a run initialises the same whether or not the cache existed
    assert torch.equal(torch.get_rng_state(), rng)
    second = _build(vision, ImageCaptionDataset(small_data), tmp_path)
    assert len(calls) == 2
    assert torch.equal(first.embeddings, second.embeddings) and first.key == second.key
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == [first.path.name]


def test_a_changed_image_file_or_encoder_gives_a_new_cache(vision, small_data, tmp_path):
    dataset = ImageCaptionDataset(small_data)
    first = _build(vision, dataset, tmp_path)

    # a changed image: its size and mtime differ, so the key does
    name = dataset.image_paths[2]
    with Image.open(name) as image:
        flipped = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).convert("RGB")
    flipped.putpixel((0, 0), (1, 2, 3))
    flipped.save(name)
    changed = _build(vision, ImageCaptionDataset(small_data), tmp_path)
    assert changed.key != first.key
    assert torch.equal(changed.embeddings[[0, 1, 3, 4, 5]], first.embeddings[[0, 1, 3, 4, 5]])
    assert not torch.equal(changed.embeddings[2], first.embeddings[2])

    # a changed encoder (one weight) or pixel normalisation
    model, mean, std = vision
    other = CLIPVisionModelWithProjection(model.config).eval()
    other.load_state_dict(model.state_dict())
    assert vision_fingerprint(other) == vision_fingerprint(model)
    with torch.no_grad():
        other.visual_projection.weight[0, 0] += 1.0
    assert vision_fingerprint(other) != vision_fingerprint(model)
    dataset = ImageCaptionDataset(small_data)
    keys = {
        ImageEmbeddingCache.cache_key(model, dataset, mean, std),
        ImageEmbeddingCache.cache_key(other, dataset, mean, std),
        ImageEmbeddingCache.cache_key(model, dataset, (0.5, 0.5, 0.5), std),
        ImageEmbeddingCache.cache_key(model, ImageCaptionDataset(small_data, resolution=16), mean, std),
    }
    assert len(keys) == 4
    assert len(list(tmp_path.glob("image-embeddings-*.safetensors"))) == 2  # the old file stays for other runs


def test_unreadable_image_row_holds_the_substitute_and_a_broken_file_is_rebuilt(vision, small_data, tmp_path, caplog):
    dataset = ImageCaptionDataset(small_data)
    dataset.image_paths[3].write_bytes(b"not a png")
    with caplog.at_level(logging.WARNING):
        cache = _build(vision, dataset, tmp_path)
    # the data set gives item 4 for index 3; the cache row follows it, and says so
    assert cache.item_indices.tolist() == [0, 1, 2, 4, 4, 5]
    assert torch.equal(cache.embeddings[3], cache.embeddings[4])
    assert cache.skipped == [str(dataset.image_paths[3])]

    cache.path.write_bytes(b"truncated")
    with caplog.at_level(logging.WARNING, logger="clipcond.conditioning"):
        rebuilt = _build(vision, ImageCaptionDataset(small_data), tmp_path)
    assert "cannot be used" in caplog.text and "rebuilding" in caplog.text
    assert torch.equal(rebuilt.embeddings, cache.embeddings) and rebuilt.skipped == cache.skipped


def test_wrong_resolution_and_bad_arguments(vision, shapes_data, tmp_path):
    with pytest.raises(ValueError, match=r"gives \(16, 16\) images but the image encoder expects 32 x 32"):
        _build(vision, ImageCaptionDataset(shapes_data, split="test", resolution=16), tmp_path)
    with pytest.raises(ValueError, match="`batch_size` must be >= 1, got 0"):
        _build(vision, ImageCaptionDataset(shapes_data, split="test"), tmp_path, batch_size=0)
    with pytest.raises(ValueError, match="is not a CLIP model folder"):
        load_vision_tower(shapes_data)


def test_text_fingerprint_is_unchanged_by_the_generalisation(tiny_clip_run):
    """`encoder_fingerprint` now goes through `model_fingerprint`; it must hash exactly as before, so text caches
    built before stay valid. The reference is the former implementation."""
    text_encoder, tokenizer = load_text_tower(tiny_clip_run)
    digest = hashlib.sha256()
    config = {
        k: v for k, v in text_encoder.config.to_dict().items() if k not in conditioning_module._VOLATILE_CONFIG_KEYS
    }
    header = {
        "class": type(text_encoder).__name__,
        "config": config,
        "tokenizer": conditioning_module._tokenizer_identity(tokenizer),
        "max_length": 32,
    }
    digest.update(json.dumps(header, sort_keys=True, default=str).encode())
    for name, tensor in sorted(text_encoder.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    assert encoder_fingerprint(text_encoder, tokenizer, 32) == digest.hexdigest()
    assert encoder_fingerprint(text_encoder, tokenizer, 16) != digest.hexdigest()
