"""Training from pretrained weights (`--init-from`, `--init-unet`, `--init-prior`), loading CLIP towers the way
`CLIPModel` does, and where model arguments resolve (`clipcond.hub`): tiny seeded models saved locally, offline."""

import json

import pytest
import torch

from clipcond.encoders import load_encoder
from clipcond.tokenizer import train_tokenizer

PROMPTS = ["a red circle", "a small blue square at the top left"]


def save_clip_with_default_tower_projection(folder, projection_dim=32):
    """A `CLIPModel` folder as `CLIPConfig(text_config=..., vision_config=..., projection_dim=32)` saves it: the
    towers' sub-configs keep transformers' default `projection_dim` (512), only the top level says 32."""
    from transformers import CLIPConfig, CLIPModel

    tokenizer = train_tokenizer(["a small red blue circle square at the top left"], vocab_size=300, context_length=16)
    layers = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    text = {
        **layers,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": 16,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = CLIPConfig(
        text_config=text, vision_config={**layers, "image_size": 16, "patch_size": 8}, projection_dim=projection_dim
    )
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


def test_clip_folder_with_default_tower_projection_loads_as_clipmodel(tmp_path):
    """Regression: `--text-encoder transformers:PATH` on such a folder raised transformers' "look at the above
    report" error with the report hidden. The towers now take the top-level width, as `CLIPModel` does, and give
    `CLIPModel`'s own features."""
    model, tokenizer = save_clip_with_default_tower_projection(tmp_path / "clip")
    saved = json.loads((tmp_path / "clip" / "config.json").read_text())
    assert saved["projection_dim"] == 32 and saved["text_config"].get("projection_dim", 512) == 512  # the case

    encoder = load_encoder(f"transformers:{tmp_path / 'clip'}", need_image=True)
    assert encoder.embed_dim == 32
    text = encoder.encode_text(PROMPTS)
    tokens = tokenizer(PROMPTS, padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        expected = model.get_text_features(**tokens)
        expected = getattr(expected, "pooler_output", expected)
    torch.testing.assert_close(text.pooled, expected, atol=1e-5, rtol=1e-5)
    pixels = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        image = encoder.image_encoder(pixel_values=pixels).image_embeds
        expected = model.get_image_features(pixel_values=pixels)
        expected = getattr(expected, "pooler_output", expected)
    torch.testing.assert_close(image, expected, atol=1e-5, rtol=1e-5)


def test_failed_tower_load_carries_the_loader_report(tmp_path):
    """Weights that do not fit the config: the error names the argument and the folder and shows transformers'
    report (which key, which shapes) instead of pointing at a report that was swallowed."""
    save_clip_with_default_tower_projection(tmp_path / "clip")
    config_file = tmp_path / "clip" / "config.json"
    config = json.loads(config_file.read_text())
    config["projection_dim"] = 24  # the saved projections are (32, 16)
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError) as err:
        load_encoder(f"transformers:{tmp_path / 'clip'}")
    message = str(err.value)
    assert message.startswith(f"`--text-encoder` {str(tmp_path / 'clip')!r}")
    assert "LOAD REPORT" in message and "text_projection.weight" in message and "MISMATCH" in message
    assert "\x1b[" not in message  # no terminal colours in an error


# ------------------------------------------------------------------------------------------------- clipcond.hub


def test_hub_helper_decides_local_files_only_from_hf_hub_offline(monkeypatch):
    from huggingface_hub import constants

    from clipcond import hub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub.local_files_only() is True
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert hub.local_files_only() is False


@pytest.mark.parametrize(
    "ref, is_path",
    [
        ("openai/clip-vit-base-patch32", False),
        ("gpt2", False),
        ("/abs/folder", True),
        ("./runs/clip", True),
        ("../clip", True),
        ("~/clip", True),
        ("runs/clip/checkpoint-4", True),
        ("bad name with spaces", True),
    ],
)
def test_hub_helper_tells_paths_from_hub_ids(ref, is_path):
    from clipcond.hub import looks_like_path

    assert looks_like_path(ref) is is_path


def test_hub_helper_existing_relative_folder_is_a_path(tmp_path, monkeypatch):
    from clipcond.hub import looks_like_path, resolve_folder

    (tmp_path / "org" / "run").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert looks_like_path("org/run") and resolve_folder("org/run", "--clip").resolve() == tmp_path / "org" / "run"


def test_hub_helper_errors_offline_and_for_missing_paths(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from clipcond.hub import resolve_folder

    missing = tmp_path / "nothing"
    with pytest.raises(FileNotFoundError, match=f"`--clip` folder {str(missing)!r} does not exist; pass it"):
        resolve_folder(missing, "--clip", "pass it")
    # An id that is in no cache, offline: the message says the id and that HF_HUB_OFFLINE is set; no network use
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(
        FileNotFoundError, match="`--clip` folder 'someone/no-such-clip' .* Hub id .*HF_HUB_OFFLINE is set"
    ):
        resolve_folder("someone/no-such-clip", "--clip")
