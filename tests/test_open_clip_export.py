"""A CLIP run loads in open_clip (`local-dir:RUN`) with the embeddings and token ids of transformers' model."""

import json
import shutil

import pytest
import torch
from transformers import CLIPConfig, CLIPModel

from clipcond import cli
from clipcond.lineage import content_hash
from clipcond.models.clip import load_clip
from clipcond.models.open_clip_export import (
    OPEN_CLIP_CONFIG,
    OPEN_CLIP_FILES,
    OPEN_CLIP_WEIGHTS,
    compare_open_clip,
    export_open_clip,
    from_open_clip_state_dict,
    to_open_clip_state_dict,
)

open_clip = pytest.importorskip("open_clip")

CAPTIONS = ["a red circle", "A big BLUE square to the left of a little green triangle.", "two yellow triangles"]


def _tiny_config(**text):
    text = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 8,
        "vocab_size": 40,
        "bos_token_id": 1,
        "eos_token_id": 0,
        "pad_token_id": 3,
        **text,
    }
    vision = {"hidden_size": 32, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4}
    vision.update(image_size=16, patch_size=8, hidden_act=text.get("hidden_act", "quick_gelu"))
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


def test_a_trained_run_loads_in_open_clip_with_the_same_embeddings(tiny_clip_run):
    for name in OPEN_CLIP_FILES:
        assert (tiny_clip_run / name).is_file()
    found = compare_open_clip(tiny_clip_run, CAPTIONS)
    assert found["token_ids_equal"]
    assert found["text_max_abs_diff"] <= 1e-5
    assert found["image_max_abs_diff"] <= 1e-5
    # and the images open_clip's transforms make are standardised with the run's statistics
    run = load_clip(tiny_clip_run)
    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tiny_clip_run}")
    normalize = preprocess.transforms[-1]
    assert tuple(normalize.mean) == pytest.approx(run.image_mean)
    assert tuple(normalize.std) == pytest.approx(run.image_std)


def test_two_training_steps_end_in_an_open_clip_folder_and_checkpoints_stay_as_they_were(shapes_data, tmp_path):
    from conftest import TINY_CLIP_ARGS

    from clipcond.train.clip import main as train_clip

    run = tmp_path / "run"
    args = ["--data", str(shapes_data), "--output-dir", str(run), "--max-train-steps", "2", *TINY_CLIP_ARGS]
    assert train_clip([*args, "--checkpointing-steps", "1", "--validation-steps", "0"]) == 0
    found = compare_open_clip(run, CAPTIONS, seed=1)
    assert found["token_ids_equal"] and max(found["text_max_abs_diff"], found["image_max_abs_diff"]) <= 1e-5
    for step in (1, 2):
        pretrained = run / "checkpoints" / f"checkpoint-{step}" / "pretrained"
        assert (pretrained / "model.safetensors").is_file()
        assert not any((pretrained / name).exists() for name in OPEN_CLIP_FILES)  # the final export only


def test_the_embeddings_are_the_same_on_real_images_and_captions(tiny_clip_run, shapes_data):
    from clipcond.data.folders import ImageCaptionDataset, collate_image_text
    from clipcond.models.clip_pixels import normalize_pixels

    run = load_clip(tiny_clip_run)
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tiny_clip_run}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tiny_clip_run}")
    batch = collate_image_text([ImageCaptionDataset(shapes_data, split="test")[i] for i in range(8)])
    with torch.no_grad():
        theirs_image = model.encode_image(normalize_pixels(batch["pixel_values"], run.image_mean, run.image_std))
        theirs_text = model.encode_text(tokenizer(batch["text"]))
        theirs_image, theirs_text = (torch.nn.functional.normalize(x, dim=-1) for x in (theirs_image, theirs_text))
    torch.testing.assert_close(theirs_image, run.encode_images(batch["pixel_values"]), atol=1e-5, rtol=0)
    torch.testing.assert_close(theirs_text, run.encode_text(batch["text"]), atol=1e-5, rtol=0)
    torch.testing.assert_close(model.logit_scale.exp(), run.model.logit_scale.exp())


def test_export_command_adds_the_files_to_an_older_run_and_keeps_its_identity(tiny_clip_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_clip_run, run)
    for name in OPEN_CLIP_FILES:
        (run / name).unlink()
    before = content_hash(run)
    assert cli.main(["export", "open-clip", str(run)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sorted(printed["written"]) == sorted(OPEN_CLIP_FILES)
    assert printed["check"]["token_ids_equal"]
    assert max(printed["check"]["text_max_abs_diff"], printed["check"]["image_max_abs_diff"]) <= 1e-5
    # the open_clip copy is derived from the weights: a decoder's lineage record of this CLIP still holds
    assert content_hash(run) == before == json.loads((run / "clipcond_run.json").read_text())["content_hash"]
    saved = json.loads((run / OPEN_CLIP_CONFIG).read_text())
    assert saved["model_cfg"]["text_cfg"]["hf_tokenizer_name"] == str(run.absolute())
    assert saved["model_cfg"]["text_cfg"]["pool_type"] == "eos" and saved["model_cfg"]["text_cfg"]["eos_id"] == 0


def test_export_command_errors_name_the_folder(tmp_path, capsys):
    assert cli.main(["export", "open-clip", str(tmp_path / "absent")]) == 2
    assert "absent" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    assert cli.main(["export", "open-clip", str(tmp_path)]) == 2
    assert "'t5'" in capsys.readouterr().err
    assert not (tmp_path / OPEN_CLIP_WEIGHTS).exists()


@pytest.mark.parametrize(
    "text",
    [
        {"hidden_act": "gelu"},  # open_clip's default nn.GELU instead of QuickGELU
        {"eos_token_id": 2, "pad_token_id": 0},  # transformers' legacy rule: pool at the largest id (argmax)
        {"layer_norm_eps": 1e-6},
    ],
    ids=["gelu", "legacy-eos-2", "eps"],
)
def test_architectures_other_than_ours_convert_exactly(tmp_path, text):
    torch.manual_seed(0)
    config = _tiny_config(**text)
    model = CLIPModel(config).eval()
    export_open_clip(model, tmp_path, image_mean=(0.5, 0.5, 0.5), image_std=(0.25, 0.25, 0.25), logit_bias=-7.5)
    theirs = open_clip.create_model(f"local-dir:{tmp_path}").eval()
    ids = torch.randint(4, 39, (3, 8))
    ids[:, 0], ids[:, 5], ids[:, 6:] = 1, config.text_config.eos_token_id, config.text_config.pad_token_id
    if config.text_config.eos_token_id == 2:
        ids[:, 5] = 39  # OpenAI's end token has the largest id
    pixels = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        ours_text = model.text_projection(model.text_model(input_ids=ids).pooler_output)
        ours_image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        torch.testing.assert_close(theirs.encode_text(ids), ours_text, atol=1e-5, rtol=0)
        torch.testing.assert_close(theirs.encode_image(pixels), ours_image, atol=1e-5, rtol=0)
    assert theirs.logit_bias.item() == -7.5
    # the name map is one table read both ways
    back = from_open_clip_state_dict(theirs.state_dict(), config)
    expected = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    assert back.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(back[key], value), key


def test_state_dict_conversion_refuses_weights_it_does_not_know():
    config = _tiny_config()
    state_dict = CLIPModel(config).state_dict()
    state_dict["text_model.encoder.layers.0.self_attn.q_norm.weight"] = torch.ones(32)
    with pytest.raises(ValueError, match="q_norm"):
        to_open_clip_state_dict(state_dict, config)


def test_an_activation_open_clip_lacks_is_an_error_naming_it(tmp_path):
    model = CLIPModel(_tiny_config(hidden_act="relu"))
    with pytest.raises(ValueError, match="hidden_act 'relu'"):
        export_open_clip(model, tmp_path, image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
    assert not list(tmp_path.iterdir())


def test_open_clip_tokenizer_cleans_text_before_the_run_tokenizer(tiny_clip_run):
    """open_clip's HFTokenizer always runs ftfy, HTML unescaping and whitespace collapsing first (no option turns it
    off): a caption these change gets the ids of its cleaned form, not the run tokenizer's ids of the raw text."""
    run = load_clip(tiny_clip_run)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tiny_clip_run}")
    raw, clean = "a red &amp; blue   circle", "a red & blue circle"
    assert torch.equal(tokenizer([raw]), run.tokenize([clean], device="cpu")["input_ids"])
    assert not torch.equal(tokenizer([raw]), run.tokenize([raw], device="cpu")["input_ids"])


def test_export_and_pixel_statistics_errors_name_the_argument(tiny_clip_run, tmp_path, capsys):
    """`clipcond export open-clip RUN` reports errors as RUN (not as another command's `--model`), and an unreadable
    preprocessor_config.json names the argument that gave the folder."""
    from clipcond.models.clip import pixel_statistics

    run = tmp_path / "run"
    shutil.copytree(tiny_clip_run, run)
    for name in OPEN_CLIP_FILES:
        (run / name).unlink()
    (run / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"^`--text-encoder` '.*run': cannot read its preprocessor_config.json"):
        pixel_statistics(run, "--text-encoder")
    assert cli.main(["export", "open-clip", str(run)]) == 2
    err = capsys.readouterr().err
    assert "`RUN`" in err and "preprocessor_config.json" in err and "--model" not in err
    shutil.copy(tiny_clip_run / "preprocessor_config.json", run / "preprocessor_config.json")
    (run / "model.safetensors").unlink()  # the load fails: transformers' error, named RUN
    assert cli.main(["export", "open-clip", str(run)]) == 2
    err = capsys.readouterr().err
    assert "`RUN`" in err and "cannot load it" in err and "--model" not in err
    assert not (run / OPEN_CLIP_WEIGHTS).exists()
