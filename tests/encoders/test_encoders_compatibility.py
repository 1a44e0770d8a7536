"""`check_compatibility` and `check_lineage` without training: the numbers they compare, the projection a new model
gets, the errors a trained one raises, and the embedding cache keyed by encoder."""

import json

import pytest

from clipcond.encoders import check_compatibility, check_lineage, load_encoder, recorded_lineage
from clipcond.encoders.tiny import save_tiny_open_clip, save_tiny_t5, save_tiny_transformers_clip


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    return {
        "transformers": load_encoder(save_tiny_transformers_clip(root / "sd"), need_image=True),
        "open_clip": load_encoder(save_tiny_open_clip(root / "open_clip"), need_image=True),
        "t5": load_encoder(save_tiny_t5(root / "t5")),
    }


def test_unet_widths(encoders):
    from clipcond.models.unet import create_unet, unet_config

    clip = encoders["transformers"]  # 48-wide token states
    report = check_compatibility(clip, cross_attention_dim=48, new_model=True)
    assert report.projections == {} and report.checked["token-state width (UNet cross_attention_dim)"] == (48, 48)
    report = check_compatibility(clip, cross_attention_dim=64, new_model=True)
    assert report.projections == {"token-state width (UNet cross_attention_dim)": (48, 64)}

    unet = create_unet(unet_config("test", sample_size=16, cross_attention_dim=64, encoder_hid_dim=48))
    check_compatibility(clip, unet=unet)  # the projection reads 48
    with pytest.raises(ValueError, match=r"gives 40, but the model reads 48; train a new model on this encoder"):
        check_compatibility(encoders["t5"], unet=unet)
    with pytest.raises(ValueError, match=r"gives 48, but the model reads 64"):  # a trained model gets no projection
        check_compatibility(clip, cross_attention_dim=64)


def test_prior_and_image_checks(encoders):
    from clipcond.models.prior import create_prior, prior_config

    clip = encoders["transformers"]  # projection 32, context 32, images 32 px
    check_compatibility(clip, prior=create_prior(prior_config("test", embedding_dim=32, num_embeddings=32)))
    with pytest.raises(
        ValueError, match=r"context length \(prior num_embeddings\).* gives 32, but the model reads 16"
    ):
        check_compatibility(clip, prior=create_prior(prior_config("test", embedding_dim=32, num_embeddings=16)))
    with pytest.raises(
        ValueError, match=r"embedding width \(prior embedding_dim\).* gives 32, but the model reads 24"
    ):
        check_compatibility(clip, prior=create_prior(prior_config("test", embedding_dim=24, num_embeddings=32)))
    with pytest.raises(ValueError, match="has no pooled embedding; a prior reads and predicts CLIP embeddings"):
        check_compatibility(
            encoders["t5"], prior=create_prior(prior_config("test", embedding_dim=32, num_embeddings=32))
        )
    check_compatibility(encoders["open_clip"], image_size=32, image_embedding_dim=32)
    with pytest.raises(ValueError, match=r"image size: .* gives 32, but the model reads 64"):
        check_compatibility(encoders["open_clip"], image_size=64)


def test_text_cache_is_keyed_by_encoder(encoders, tmp_path):
    from clipcond.conditioning import TextEmbeddingCache

    captions = ["a red circle", "a blue square"]
    keys = {
        name: TextEmbeddingCache.cache_key(encoder.text_encoder, encoder.tokenizer, captions)
        for name, encoder in encoders.items()
    }
    assert len(set(keys.values())) == 3
    for name, encoder in encoders.items():
        cache = TextEmbeddingCache.build_or_load(
            encoder.text_encoder, encoder.tokenizer, captions, tmp_path, progress=False
        )
        assert cache.key == keys[name] and cache.embeddings.hidden_states.shape[-1] == encoder.text_width
    assert len(list(tmp_path.glob("text-embeddings-*/index.json"))) == 3


def test_lineage_records(encoders, tmp_path, caplog):
    clip = encoders["transformers"]
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(ValueError, match="holds no clipcond_run.json naming the encoder"):
        check_lineage(run, clip)
    check_lineage(run, clip, allow_encoder_mismatch=True)
    assert "allowed by allow_encoder_mismatch" in caplog.text

    # a record from before the encoder interface: the CLIP's content hash only
    (run / "clipcond_run.json").write_text(json.dumps({"clip": {"path": "runs/clip", "content_hash": "0" * 64}}))
    assert recorded_lineage(run) == {"kind": "clipcond", "name": "runs/clip", "content_hash": "0" * 64}
    with pytest.raises(
        ValueError, match="was trained on the clipcond encoder 'runs/clip' \\(content hash 000000000000"
    ):
        check_lineage(run, clip)

    (run / "clipcond_run.json").write_text(json.dumps({"encoder": clip.lineage(), "clip": {"content_hash": "x"}}))
    check_lineage(run, clip)
    with pytest.raises(ValueError, match="but the encoder given is the open_clip encoder"):
        check_lineage(run, encoders["open_clip"])
