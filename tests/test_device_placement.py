"""Every tensor that meets a model is made on the model's device: the whole quick demo (both paths) and the
commands that use its runs, with every model call under `implicit_device_is_meta` (tests/device_guard.py), so a
tensor made without naming its device fails here as it would on a GPU."""

import json

import pytest
import torch
from device_guard import MixedDeviceError, guard_model_calls, implicit_device_is_meta

from clipcond import cli
from clipcond.demo import main as demo_main

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)


def test_the_guard_catches_a_draw_on_the_default_device():
    """The bug that stopped the demo on a GPU: a CPU draw beside the model's tensors (CLIP's grayscale views)."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.zeros(4, 3, 2, 2)
    with implicit_device_is_meta(also=(__file__,)), pytest.raises(MixedDeviceError, match="name the device"):
        torch.where(torch.rand(4, generator=generator)[:, None, None, None] < 0.5, pixels, pixels)
    with implicit_device_is_meta(also=(__file__,)):  # the fix: the draw on its generator's device
        draws = torch.rand(4, generator=generator, device=generator.device)
        torch.where(draws[:, None, None, None] < 0.5, pixels, pixels)


def test_the_guard_catches_indexing_with_an_implicit_index():
    """Indexing a real tensor with a meta index gives uninitialised memory in PyTorch, not an error; the guard
    raises (an embedding cache looked up with `torch.zeros(b, dtype=torch.long)` returned garbage rows)."""
    table = torch.arange(6.0)
    with implicit_device_is_meta(also=(__file__,)), pytest.raises(MixedDeviceError):
        table[torch.zeros(2, dtype=torch.long)]


def test_models_are_guarded(monkeypatch):
    names = guard_model_calls(monkeypatch)
    for expected in ("ClipStage.loss", "DecoderStage.loss", "PriorStage.loss", "CaptionerStage.loss"):
        assert expected in names
    assert "ImageVariationPipeline.interpolate" in names and "AttributeJudge.predict" in names
    assert "TextToImagePipeline.__call__" in names and "Captioner.generate" in names


def test_the_quick_demo_and_its_commands_name_every_device(tmp_path, monkeypatch):
    guard_model_calls(monkeypatch)
    out = tmp_path / "demo"
    assert demo_main(["--output-dir", str(out), "--quick", "--dalle2"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert {"decoder", "prior", "unclip_decoder", "unclip_eval"} <= set(report)

    images = out / "data" / "test"
    first = sorted(images.glob("*.png"))[:2]
    commands = [
        ["generate", "--model", str(out / "decoder"), "--prompt", "a red circle", "--num-inference-steps", "2"],
        ["generate", "--model", str(out / "unclip_decoder"), "--prior", str(out / "prior")]
        + ["--prompt", "a red circle", "--num-inference-steps", "2", "--prior-num-inference-steps", "2"],
        ["vary", "--model", str(out / "unclip_decoder"), str(first[0]), "--num-inference-steps", "2"],
        ["interpolate", "--model", str(out / "unclip_decoder"), "--images", *map(str, first)]
        + ["--steps", "3", "--num-inference-steps", "2"],
        ["index", "--model", str(out / "clip"), str(images), "--output", str(tmp_path / "index")],
        ["search", "--index", str(tmp_path / "index"), "a red circle", "--top-k", "3"],
    ]
    for k, argv in enumerate(commands):
        if argv[0] in ("generate", "vary", "interpolate"):
            argv += ["--output-dir", str(tmp_path / f"{argv[0]}-{k}")]
        assert cli.main(argv) == 0, argv


STEPS = ["--max-train-steps", "2", "--train-batch-size", "8", "--lr-warmup-steps", "1", "--checkpointing-steps", "0"]
DIFFUSION = ["--model", "test", "--validation-steps", "2", "--validation-inference-steps", "1"]


@pytest.mark.parametrize(
    "trainer, argv",
    [
        ("clip", ["--model", "test", "--loss", "siglip", "--grayscale-prob", "1", "--validation-steps", "2"]),
        ("clip", ["--model", "test", "--random-crop-scale", "0.5", "--hflip-prob", "0.5", "--validation-steps", "2"]),
        ("decoder", [*DIFFUSION, "--prediction-type", "epsilon", "--snr-gamma", "0", "--cross-attention-dim", "48"]),
        ("decoder", [*DIFFUSION, "--conditioning", "image-embedding", "--embedding-tokens", "0"]),
        ("decoder", [*DIFFUSION, "--conditioning", "image-embedding", "--noise-level", "100"]),
        ("prior", ["--model", "test", "--validation-steps", "2", "--validation-max-captions", "8"]),
        ("captioner", ["--model", "test", "--validation-steps", "2", "--validation-max-images", "4"]),
    ],
)
def test_training_options_name_every_device(trainer, argv, shapes_data, tiny_clip_run, tmp_path, monkeypatch):
    """The options the demo leaves at their defaults, with validation (which samples) at the last step."""
    guard_model_calls(monkeypatch)
    if trainer != "clip":
        argv = [*argv, "--clip", str(tiny_clip_run)]
    argv = [*argv, *STEPS, "--data", str(shapes_data), "--output-dir", str(tmp_path / "run")]
    assert cli.main(["train", trainer, *argv]) == 0


@pytest.mark.parametrize("kind", ["transformers", "open_clip", "t5"])
def test_text_encoder_adapters_name_every_device(kind, shapes_data, tmp_path, monkeypatch):
    from clipcond.data.folders import ImageCaptionDataset
    from clipcond.encoders import tiny

    captions = ImageCaptionDataset(shapes_data, split="train").captions
    save = {"transformers": tiny.save_tiny_transformers_clip, "open_clip": tiny.save_tiny_open_clip}
    save["t5"] = tiny.save_tiny_t5
    spec = save[kind](tmp_path / kind) if kind == "open_clip" else save[kind](tmp_path / kind, texts=captions)
    guard_model_calls(monkeypatch)
    argv = [*DIFFUSION, *STEPS, "--text-encoder", spec, "--resolution", "16"]
    argv += ["--data", str(shapes_data), "--output-dir", str(tmp_path / "run")]
    assert cli.main(["train", "decoder", *argv]) == 0
