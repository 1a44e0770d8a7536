"""Each adapter of `clipcond.encoders` on tiny, seeded models saved locally: output shapes, frozen weights, the spec
grammar, and fidelity to the model family's own code (open_clip's tokenizer and `encode_text`)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clipcond.encoders import FrozenEncoder, load_encoder, parse_spec
from clipcond.encoders.tiny import save_tiny_open_clip, save_tiny_t5, save_tiny_transformers_clip

PROMPTS = ["a red circle", "a small blue square at the top left"]


@pytest.fixture(scope="module")
def specs(tmp_path_factory, tiny_clip_run):
    root = tmp_path_factory.mktemp("encoders")
    return {
        "clipcond": f"clipcond:{tiny_clip_run}",
        "transformers-sd": save_tiny_transformers_clip(root / "sd"),
        "transformers-full": save_tiny_transformers_clip(root / "full", layout="full"),
        "open_clip": save_tiny_open_clip(root / "open_clip"),
        "t5": save_tiny_t5(root / "t5"),
    }


@pytest.mark.parametrize(
    "name, width, embed_dim, context, has_image",
    [
        ("transformers-sd", 48, 32, 32, True),
        ("transformers-full", 48, 32, 32, True),
        ("open_clip", 32, 32, 24, True),
        ("t5", 40, None, 32, False),
    ],
)
def test_adapter_shapes_and_frozen(specs, name, width, embed_dim, context, has_image):
    encoder = load_encoder(specs[name], need_image=has_image)
    assert isinstance(encoder, FrozenEncoder) and encoder.kind == specs[name].split(":")[0]
    assert (encoder.text_width, encoder.embed_dim, encoder.context_length) == (width, embed_dim, context)
    assert len(encoder.content_hash) == 64 and encoder.lineage()["content_hash"] == encoder.content_hash
    for model in (encoder.text_encoder, encoder.image_encoder):
        if model is not None:
            assert not model.training and not any(p.requires_grad for p in model.parameters())

    text = encoder.encode_text(PROMPTS)
    assert text.hidden_states.shape == (2, context, width)
    assert text.attention_mask.shape == (2, context) and text.attention_mask.dtype == torch.long
    # padded to the full context: the longer prompt has more real tokens; padding is 0 after the real ones
    lengths = text.attention_mask.sum(1)
    assert lengths[1] > lengths[0] >= 3 and bool(text.attention_mask[0, lengths[0] :].eq(0).all())
    if embed_dim is None:
        assert text.pooled is None
    else:
        assert text.pooled.shape == (2, embed_dim)
    # batch composition never changes a prompt's states
    alone = encoder.encode_text(PROMPTS[:1])
    torch.testing.assert_close(alone.hidden_states[0], text.hidden_states[0], atol=1e-5, rtol=1e-5)

    if has_image:
        assert encoder.image_size == 32
        pixels = torch.randint(0, 256, (3, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
        image = encoder.encode_image(pixels)
        assert image.embeds.shape == (3, embed_dim)
        assert image.patch_tokens.shape == (3, 16, width)  # (32 / 8)^2 patches
        with pytest.raises(ValueError, match="reads 32 x 32 images, got \\(16, 16\\)"):
            encoder.encode_image(pixels[:, :, :16, :16])
    else:
        assert encoder.image_encoder is None
        with pytest.raises(ValueError, match="has no image encoder"):
            load_encoder(specs[name], need_image=True)


def test_clipcond_adapter_matches_the_run(specs, tiny_clip_run):
    from clipcond.lineage import content_hash
    from clipcond.models.clip import load_clip

    encoder = load_encoder(specs["clipcond"], need_image=True)
    assert encoder.content_hash == content_hash(tiny_clip_run)
    # the same folder through the transformers adapter is the same encoder (same hash, same states)
    same = load_encoder(f"transformers:{tiny_clip_run}")
    assert same.content_hash == encoder.content_hash
    torch.testing.assert_close(same.encode_text(PROMPTS).hidden_states, encoder.encode_text(PROMPTS).hidden_states)
    # pooled and image embeddings are the CLIP run's own features
    run = load_clip(tiny_clip_run)
    pooled = torch.nn.functional.normalize(encoder.encode_text(PROMPTS).pooled, dim=-1)
    torch.testing.assert_close(pooled, run.encode_text(PROMPTS), atol=1e-5, rtol=1e-5)
    pixels = torch.randint(0, 256, (2, 3, encoder.image_size, encoder.image_size), dtype=torch.uint8)
    embeds = torch.nn.functional.normalize(encoder.encode_image(pixels).embeds, dim=-1)
    torch.testing.assert_close(embeds, run.encode_images(pixels), atol=1e-5, rtol=1e-5)


def test_transformers_layouts_agree(specs):
    """The same seeded CLIPModel saved whole and in Stable Diffusion's subfolders gives the same states."""
    full, sd = load_encoder(specs["transformers-full"]), load_encoder(specs["transformers-sd"])
    a, b = full.encode_text(PROMPTS), sd.encode_text(PROMPTS)
    torch.testing.assert_close(a.hidden_states, b.hidden_states)
    torch.testing.assert_close(a.pooled, b.pooled)


def test_open_clip_adapter_matches_open_clip(specs):
    """Token ids up to the end token are open_clip's own tokenizer's; the pooled embedding is `encode_text`'s."""
    import open_clip
    from open_clip.factory import load_state_dict

    from clipcond.encoders.open_clip import open_clip_model_config

    encoder = load_encoder(specs["open_clip"])
    ids = encoder.tokenizer(PROMPTS, padding="max_length", max_length=24, truncation=True, return_tensors="pt")
    reference = open_clip.tokenize(PROMPTS, context_length=24)
    mask = ids["attention_mask"].bool()
    assert torch.equal(ids["input_ids"][mask], reference[mask]) and bool(reference[~mask].eq(0).all())

    config_file, weights = specs["open_clip"].removeprefix("open_clip:").split("@")
    model = open_clip.model.CLIP(**open_clip_model_config(config_file)[1]).eval()
    model.load_state_dict(load_state_dict(weights))
    with torch.no_grad():
        expected = model.encode_text(reference)
    torch.testing.assert_close(encoder.encode_text(PROMPTS).pooled, expected, atol=1e-5, rtol=1e-5)


def test_open_clip_tokenizer_files_leave_with_the_process(tmp_path):
    """The BPE files written for transformers' tokenizer live in a temporary folder that goes when the process ends."""
    code = (
        "from clipcond.encoders.open_clip import _openai_bpe_folder, open_clip_tokenizer\n"
        "tokenizer = open_clip_tokenizer(24)\n"
        "assert tokenizer('a red circle').input_ids[0] == tokenizer.bos_token_id\n"
        "print(_openai_bpe_folder().name)\n"
    )
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    folder = Path(done.stdout.strip().splitlines()[-1])
    assert folder.parent == tmp_path and folder.name.startswith("clipcond-open-clip-bpe-")
    assert not folder.exists()


def test_open_clip_is_an_optional_extra(specs, monkeypatch):
    from clipcond.encoders import open_clip as adapter

    monkeypatch.setitem(sys.modules, "open_clip", None)  # `import open_clip` now raises ImportError
    with pytest.raises(ImportError, match='pip install "clipcond\\[openclip\\]"'):
        adapter.load_open_clip(specs["open_clip"].removeprefix("open_clip:"))


def test_spec_grammar_and_errors(specs, tmp_path):
    assert parse_spec("clipcond:runs/clip") == ("clipcond", "runs/clip")
    assert parse_spec("runs/clip") == ("clipcond", "runs/clip")  # a bare folder
    assert parse_spec("open_clip:ViT-B-32@/w/model.bin") == ("open_clip", "ViT-B-32@/w/model.bin")
    with pytest.raises(ValueError, match="unknown encoder kind 'bert'"):
        parse_spec("bert:models/bert")
    with pytest.raises(ValueError, match="names no t5 model"):
        parse_spec("t5:")
    with pytest.raises(ValueError, match="expected open_clip:MODEL@WEIGHTS"):
        load_encoder("open_clip:ViT-B-32")
    with pytest.raises(FileNotFoundError, match="weights file .*missing.bin"):
        load_encoder(f"open_clip:ViT-B-32@{tmp_path / 'missing.bin'}")
    weights = specs["open_clip"].split("@")[1]
    with pytest.raises(ValueError, match="'NoSuchNet' is no open_clip architecture"):
        load_encoder(f"open_clip:NoSuchNet@{weights}")
    with pytest.raises(ValueError, match="do not fit the text tower"):  # ViT-B-32's config, the tiny model's weights
        load_encoder(f"open_clip:ViT-B-32@{weights}")
    with pytest.raises(FileNotFoundError, match="`--text-encoder` folder .*nowhere"):
        load_encoder(f"transformers:{tmp_path / 'nowhere'}")
    t5_folder = specs["t5"].removeprefix("t5:")
    with pytest.raises(ValueError, match="is not a transformers CLIP folder \\(model_type 't5'"):
        load_encoder(f"transformers:{t5_folder}")
    with pytest.raises(ValueError, match="is not a T5 folder"):
        load_encoder(specs["transformers-full"].replace("transformers:", "t5:"))


def test_mismatched_end_token_is_refused(specs):
    """A CLIP text tower pools at its config's end token; a tokenizer that ends prompts otherwise is refused."""
    encoder = load_encoder(specs["transformers-sd"])
    encoder.text_encoder.config.eos_token_id = encoder.tokenizer.eos_token_id + 1
    with pytest.raises(ValueError, match=r"pools at the end token 1, but its tokenizer ends prompts with 0"):
        encoder.check_tokens()
