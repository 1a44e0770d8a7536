"""Training from pretrained weights (`--init-from`, `--init-unet`, `--init-prior`), loading CLIP towers the way
`CLIPModel` does, and where model arguments resolve (`clipcond.hub`): tiny seeded models saved locally, offline."""

import json
import logging
from pathlib import Path

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


@pytest.mark.parametrize("verbosity", ["warning", "error"])
def test_failed_tower_load_carries_the_loader_report(tmp_path, verbosity):
    """Weights that do not fit the config: the error names the argument and the folder and shows transformers'
    report (which key, which shapes) instead of pointing at a report that was swallowed, even when transformers'
    logging is set quieter than its report."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    getattr(hf_logging, f"set_verbosity_{verbosity}")()
    try:
        _check_report(tmp_path)
    finally:
        hf_logging.set_verbosity(before)


@pytest.mark.parametrize(
    ("verbosity", "passed"), [("warning", ["another warning", "an error"]), ("error", ["an error"])]
)
def test_load_report_lets_through_only_what_the_verbosity_would(verbosity, passed):
    """To see the report under TRANSFORMERS_VERBOSITY=error, `load_report` lowers the logger to WARNING for the
    block: the report is held for the error, and no other record below the user's level reaches the log."""
    from transformers.utils import logging as hf_logging

    from clipcond.models.clip import load_report

    logger = logging.getLogger("transformers.modeling_utils")
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append
    before = hf_logging.get_verbosity()
    getattr(hf_logging, f"set_verbosity_{verbosity}")()
    level = logger.level
    logger.addHandler(handler)
    try:
        expected = r"^`--x` 'folder': .*look at the above report.*\nLOAD REPORT: MISMATCH"
        with pytest.raises(ValueError, match=expected), load_report("--x", "folder"):
            logger.warning("another warning")
            logger.error("an error")
            logger.warning("\x1b[1mLOAD REPORT\x1b[0m: MISMATCH")
            raise RuntimeError("look at the above report")
        assert [record.getMessage() for record in seen] == passed
        assert logger.level == level and not logger.filters
    finally:
        logger.removeHandler(handler)
        hf_logging.set_verbosity(before)


def _check_report(tmp_path):
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


# ---------------------------------------------------------------------------------------- train decoder --init-unet

DECODER_ARGS = [
    *("--model", "test", "--train-batch-size", "4", "--lr-warmup-steps", "0", "--max-train-steps", "1"),
    *("--validation-steps", "0", "--checkpointing-steps", "0"),
]


def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _train_decoder(clip, data, out, *extra):
    from clipcond.train.decoder import main

    try:
        return main(["--clip", str(clip), "--data", str(data), "--output-dir", str(out), *DECODER_ARGS, *extra])
    finally:
        _reset_accelerate()


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(folder / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def pretrained_unet(shapes_data, tiny_clip_run, tmp_path_factory):
    """A UNet folder that no seed of the preset gives: a short run's UNet with every weight moved by seeded noise,
    saved in a pipeline-style folder (`ROOT/unet/`)."""
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("init_unet")
    _train_decoder(tiny_clip_run, shapes_data, root / "run", "--resolution", "16", "--seed", "3")
    unet = UNet2DConditionModel.from_pretrained(root / "run" / "unet")
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    unet.save_pretrained(root / "pretrained" / "unet")
    return root / "pretrained"


def test_init_unet_starts_from_the_given_weights(pretrained_unet, shapes_data, tiny_clip_run, tmp_path):
    """One step at a learning rate of 1e-12 without EMA: the saved UNet is the given one (a pipeline folder's
    `unet/`), and the run record names where it came from; without the flag the same run starts elsewhere."""
    from clipcond.lineage import content_hash

    given = _weights(pretrained_unet / "unet")
    fast = ["--resolution", "16", "--learning-rate", "1e-12", "--no-ema", "--seed", "0"]
    _train_decoder(tiny_clip_run, shapes_data, tmp_path / "init", *fast, "--init-unet", str(pretrained_unet))
    saved = _weights(tmp_path / "init" / "unet")
    assert saved.keys() == given.keys()
    for name in given:
        torch.testing.assert_close(saved[name], given[name], rtol=0, atol=1e-6, msg=name)
    record = json.loads((tmp_path / "init" / "clipcond_run.json").read_text())
    assert record["unet"]["preset"] is None
    init = record["unet"]["init_from"]
    assert init["path"] == str(pretrained_unet) and init["content_hash"] == content_hash(pretrained_unet / "unet")

    _train_decoder(tiny_clip_run, shapes_data, tmp_path / "fresh", *fast)
    fresh = _weights(tmp_path / "fresh" / "unet")
    assert max((fresh[k] - given[k]).abs().max().item() for k in given) > 0.01


def test_decoder_trains_on_a_clip_folder_with_default_tower_projection(shapes_data, tmp_path):
    """The regression through the command: `--text-encoder transformers:PATH` on that folder trains, with the
    folder's own tokenizer, and its pooled width (32, not the sub-config's 512) reaches the UNet."""
    from clipcond.train.decoder import main

    save_clip_with_default_tower_projection(tmp_path / "clip")
    argv = ["--text-encoder", f"transformers:{tmp_path / 'clip'}", "--data", str(shapes_data)]
    argv += ["--output-dir", str(tmp_path / "run"), "--resolution", "16", "--pooled-text", *DECODER_ARGS]
    try:
        assert main(argv) == 0
    finally:
        _reset_accelerate()
    unet_config = json.loads((tmp_path / "run" / "unet" / "config.json").read_text())
    assert unet_config["projection_class_embeddings_input_dim"] == 32 and unet_config["cross_attention_dim"] == 16
    record = json.loads((tmp_path / "run" / "clipcond_run.json").read_text())
    assert record["encoder"]["kind"] == "transformers"


@pytest.mark.parametrize(
    "resolution, cross_attention_dim, match",
    [
        ("32", None, "has sample_size=16, but this run needs sample_size=32 \\(the data's resolution"),
        ("16", 8, "has context_width=8, but this run needs context_width=32 \\(the width of the token states"),
    ],
)
def test_init_unet_that_does_not_fit_names_both_sizes(
    pretrained_unet, shapes_data, tiny_clip_run, tmp_path, resolution, cross_attention_dim, match
):
    from diffusers import UNet2DConditionModel

    folder = pretrained_unet / "unet"
    if cross_attention_dim is not None:  # the same UNet reading 8-wide token states
        config = dict(UNet2DConditionModel.load_config(folder), cross_attention_dim=cross_attention_dim)
        UNet2DConditionModel.from_config(config).save_pretrained(tmp_path / "narrow")
        folder = tmp_path / "narrow"
    with pytest.raises(ValueError, match=f"`--init-unet` {str(folder)!r} {match}"):
        _train_decoder(
            tiny_clip_run, shapes_data, tmp_path / "o", "--resolution", resolution, "--init-unet", str(folder)
        )


def test_init_unet_missing_or_not_a_unet(shapes_data, tiny_clip_run, tmp_path):
    missing = tmp_path / "nothing"
    with pytest.raises(FileNotFoundError, match=f"`--init-unet` folder {str(missing)!r} does not exist"):
        _train_decoder(tiny_clip_run, shapes_data, tmp_path / "o", "--resolution", "16", "--init-unet", str(missing))
    assert not (tmp_path / "o").exists()  # refused with the arguments, before the encoder ran
    with pytest.raises(ValueError, match="`--init-unet` .* holds a None; expected a UNet2DConditionModel folder"):
        _train_decoder(
            tiny_clip_run, shapes_data, tmp_path / "o", "--resolution", "16", "--init-unet", str(tiny_clip_run)
        )


# --------------------------------------------------------------------------------------- train prior --init-prior

PRIOR_ARGS = [
    *("--model", "test", "--train-batch-size", "8", "--lr-warmup-steps", "0", "--max-train-steps", "1"),
    *("--validation-steps", "0", "--checkpointing-steps", "0"),
]


def _train_prior(clip, data, out, *extra):
    from clipcond.train.prior import main

    try:
        return main(["--clip", str(clip), "--data", str(data), "--output-dir", str(out), *PRIOR_ARGS, *extra])
    finally:
        _reset_accelerate()


@pytest.fixture(scope="module")
def pretrained_prior(shapes_data, tiny_clip_run, tmp_path_factory):
    """A prior run folder whose prior no seed of the preset gives: weights and statistics moved by seeded noise."""
    from diffusers import PriorTransformer

    root = tmp_path_factory.mktemp("init_prior")
    _train_prior(tiny_clip_run, shapes_data, root / "run", "--seed", "3")
    prior = PriorTransformer.from_pretrained(root / "run" / "prior")
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in prior.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
        prior.clip_std.abs_()
    prior.save_pretrained(root / "pretrained" / "prior")
    return root / "pretrained"


def test_init_prior_starts_from_the_given_weights_and_statistics(
    pretrained_prior, shapes_data, tiny_clip_run, tmp_path
):
    given = _weights(pretrained_prior / "prior")
    fast = ["--learning-rate", "1e-12", "--no-ema", "--seed", "0"]
    _train_prior(tiny_clip_run, shapes_data, tmp_path / "init", *fast, "--init-prior", str(pretrained_prior))
    saved = _weights(tmp_path / "init" / "prior")
    assert saved.keys() == given.keys() and {"clip_mean", "clip_std"} <= given.keys()
    for name in given:  # the statistics too: the given weights were learned in their standardised space
        torch.testing.assert_close(saved[name], given[name], rtol=0, atol=1e-6, msg=name)
    record = json.loads((tmp_path / "init" / "clipcond_run.json").read_text())
    assert record["prior"]["preset"] is None and record["prior"]["init_from"]["path"] == str(pretrained_prior)

    _train_prior(tiny_clip_run, shapes_data, tmp_path / "fresh", *fast)
    fresh = _weights(tmp_path / "fresh" / "prior")
    assert max((fresh[k] - given[k]).abs().max().item() for k in given) > 0.01


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("embedding_dim", 16, "has embedding_dim=16, but the CLIP's projection width is 32"),
        ("num_embeddings", 7, "has num_embeddings=7, but the CLIP's text encoder reads 32 tokens"),
    ],
)
def test_init_prior_that_does_not_fit_names_both_sizes(
    pretrained_prior, shapes_data, tiny_clip_run, tmp_path, field, value, match
):
    from diffusers import PriorTransformer

    config = dict(PriorTransformer.load_config(pretrained_prior / "prior"), **{field: value})
    PriorTransformer.from_config(config).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match=f"`--init-prior` {str(tmp_path / 'other')!r} {match}"):
        _train_prior(tiny_clip_run, shapes_data, tmp_path / "o", "--init-prior", str(tmp_path / "other"))


def test_init_prior_missing_or_not_a_prior(pretrained_unet, shapes_data, tiny_clip_run, tmp_path):
    missing = tmp_path / "nothing"
    with pytest.raises(FileNotFoundError, match=f"`--init-prior` folder {str(missing)!r} does not exist"):
        _train_prior(tiny_clip_run, shapes_data, tmp_path / "o", "--init-prior", str(missing))
    assert not (tmp_path / "o").exists()  # refused with the arguments, before CLIP ran
    with pytest.raises(
        ValueError, match="`--init-prior` .* holds a 'UNet2DConditionModel'; expected a PriorTransformer"
    ):
        _train_prior(tiny_clip_run, shapes_data, tmp_path / "o", "--init-prior", str(pretrained_unet / "unet"))


# ----------------------------------------------------------------------------------------- train clip --init-from

CLIP_ARGS = [
    *("--train-batch-size", "16", "--lr-warmup-steps", "0", "--max-train-steps", "1", "--seed", "0"),
    *("--validation-steps", "0", "--checkpointing-steps", "0", "--learning-rate", "1e-12"),
]


def _train_clip(data, out, *extra):
    from clipcond.train.clip import main

    try:
        return main(["--data", str(data), "--output-dir", str(out), *CLIP_ARGS, *extra])
    finally:
        _reset_accelerate()


def test_init_from_a_clipmodel_folder_keeps_its_weights_tokenizer_and_statistics(shapes_data, tmp_path):
    from safetensors.torch import load_file
    from transformers import CLIPImageProcessor

    from clipcond.encoders.tiny import save_tiny_transformers_clip
    from clipcond.lineage import content_hash
    from clipcond.models.clip import load_clip

    source = tmp_path / "source"
    save_tiny_transformers_clip(source, layout="full", seed=5)
    processor = CLIPImageProcessor.from_pretrained(source)
    processor.image_mean, processor.image_std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]  # not OpenAI's: must travel
    processor.save_pretrained(source)
    _train_clip(shapes_data, tmp_path / "run", "--init-from", str(source))

    given, saved = load_file(source / "model.safetensors"), load_file(tmp_path / "run" / "model.safetensors")
    assert saved.keys() == given.keys()
    for name in given:
        torch.testing.assert_close(saved[name], given[name], rtol=0, atol=1e-6, msg=name)
    run = load_clip(tmp_path / "run")
    assert run.image_mean == (0.5, 0.4, 0.3) and run.image_std == (0.2, 0.25, 0.3)
    source_run = load_clip(source)
    assert run.tokenizer(PROMPTS)["input_ids"] == source_run.tokenizer(PROMPTS)["input_ids"]
    record = json.loads((tmp_path / "run" / "clipcond_run.json").read_text())
    assert record["init_from"] == {"path": str(source), "content_hash": content_hash(source)}


def test_init_from_open_clip_converts_weight_for_weight(shapes_data, tmp_path):
    """`open_clip:CONFIG@WEIGHTS`: the run (one step at lr 1e-12) embeds text and images as open_clip's own model
    does, through the saved tokenizer and image statistics."""
    from clipcond.encoders.open_clip import import_open_clip
    from clipcond.encoders.tiny import save_tiny_open_clip
    from clipcond.models.clip import load_clip

    open_clip = import_open_clip()
    spec = save_tiny_open_clip(tmp_path / "oc", seed=2)
    _train_clip(shapes_data, tmp_path / "run", "--init-from", spec)

    config_file, weights = spec[len("open_clip:") :].split("@")
    from safetensors.torch import load_file

    reference = open_clip.model.CLIP(**json.loads(Path(config_file).read_text())).eval()
    reference.load_state_dict(load_file(weights))
    run = load_clip(tmp_path / "run")
    tokens = open_clip.tokenize(PROMPTS, context_length=24)  # open_clip's own tokenizer, padding with 0
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        expected_text = torch.nn.functional.normalize(reference.encode_text(tokens), dim=-1)
        mean, std = torch.tensor(open_clip.OPENAI_DATASET_MEAN), torch.tensor(open_clip.OPENAI_DATASET_STD)
        normalised = (pixels.float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
        expected_image = torch.nn.functional.normalize(reference.encode_image(normalised), dim=-1)
    torch.testing.assert_close(run.encode_text(PROMPTS), expected_text, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(run.encode_images(pixels), expected_image, atol=1e-5, rtol=1e-5)


def test_init_from_sizes_that_do_not_fit_name_both(shapes_data, tmp_path):
    from clipcond.encoders.tiny import save_tiny_transformers_clip

    source = tmp_path / "source"
    save_tiny_transformers_clip(source, layout="full")
    for flag, value, field, own in (
        ("--resolution", "48", "image size", 32),
        ("--patch-size", "4", "patch size", 8),
        ("--context-length", "16", "context length", 32),
    ):
        match = f"`{flag}` {value} does not fit `--init-from` {str(source)!r}, whose {field} is {own}"
        with pytest.raises(ValueError, match=match):
            _train_clip(shapes_data, tmp_path / "o", "--init-from", str(source), flag, value)


def test_init_from_missing_sources_and_tokenizer_are_named(shapes_data, tmp_path):
    from clipcond.encoders.tiny import save_tiny_transformers_clip

    missing = tmp_path / "nothing"
    with pytest.raises(FileNotFoundError, match=f"`--init-from` folder {str(missing)!r} does not exist"):
        _train_clip(shapes_data, tmp_path / "o", "--init-from", str(missing))
    with pytest.raises(FileNotFoundError, match="`--init-from`: open_clip weights file '/no/w.safetensors' does not"):
        _train_clip(shapes_data, tmp_path / "o", "--init-from", "open_clip:ViT-B-32@/no/w.safetensors")
    with pytest.raises(ValueError, match="`--init-from` .* is not a CLIP model folder .*model_type 'clip_text_model'"):
        source = tmp_path / "sd"
        save_tiny_transformers_clip(source)  # Stable Diffusion's layout: text_encoder/ is a tower, not a CLIPModel
        _train_clip(shapes_data, tmp_path / "o", "--init-from", str(source / "text_encoder"))
    bare = tmp_path / "bare"
    save_tiny_transformers_clip(bare, layout="full")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
        (bare / name).unlink(missing_ok=True)
    with pytest.raises(ValueError, match=f"`--init-from` {str(bare)!r} has no tokenizer .* as `--tokenizer`"):
        _train_clip(shapes_data, tmp_path / "o", "--init-from", str(bare))
