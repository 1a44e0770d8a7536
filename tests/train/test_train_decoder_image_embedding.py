"""`clipcond train decoder --conditioning image-embedding` (the unCLIP decoder) at test scale: the run folder as an
ImageVariationPipeline, the embedding cache instead of the vision tower per step, the tokens trained and averaged
with the UNet, resume after SIGKILL, embedding dropout and noise augmentation, errors."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import kill_at_step
import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPVisionModelWithProjection
from without_clipcond import assert_ships_its_code, assert_stock_diffusers_draws_the_same

from clipcond.conditioning import ImageEmbeddingCache
from clipcond.lineage import content_hash
from clipcond.models.image_embedding import has_cross_attention, make_noising_scheduler, standardise
from clipcond.pipelines import ImageVariationPipeline
from clipcond.train import diffusion, unclip_decoder
from clipcond.train.decoder import main

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

STEPS = 4  # checkpoints and validation every 2 steps
SOURCES, PER_SOURCE = 2, 2
FAST_ARGS = [
    *("--conditioning", "image-embedding", "--model", "test", "--resolution", "16", "--train-batch-size", "4"),
    *("--lr-warmup-steps", "1", "--seed", "0", "--validation-inference-steps", "1"),
    *("--validation-sources", str(SOURCES), "--validation-images-per-prompt", str(PER_SOURCE)),
]
RESUME_ARGS = ["--max-train-steps", str(STEPS), "--checkpointing-steps", "2", "--validation-steps", "2"]


def _argv(clip, data, out, *extra):
    return ["--clip", str(clip), "--data", str(data), "--output-dir", str(out), *FAST_ARGS, *extra]


def _reset_accelerate():
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    """The saved UNet's and tokens' weights of a pipeline folder, prefixed as in the trained module."""
    weights = {f"unet.{k}": v for k, v in load_file(folder / "unet" / "diffusion_pytorch_model.safetensors").items()}
    tokens = folder / "embedding_tokens" / "diffusion_pytorch_model.safetensors"
    if tokens.is_file():
        weights.update({f"embedding_tokens.{k}": v for k, v in load_file(tokens).items()})
    return weights


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]):
    assert a.keys() == b.keys()
    for name in a:  # bit-identical on one CPU process
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


@pytest.fixture(scope="module")
def decoder_run(shapes_data, tiny_clip_run, tmp_path_factory):
    """One short run through the CLI, counting the vision tower's forward batches. It is also the uninterrupted run
    of the resume test."""
    from clipcond.cli import main as cli_main

    out = tmp_path_factory.mktemp("unclip_decoder_run")
    seen = SimpleNamespace(encoder_batches=[])
    load_vision_tower = diffusion.load_vision_tower

    def counting_tower(path):
        encoder, mean, std = load_vision_tower(path)
        encoder.register_forward_pre_hook(
            lambda module, args, kwargs: seen.encoder_batches.append(kwargs["pixel_values"].shape[0]),
            with_kwargs=True,
        )
        seen.encoder = encoder
        return encoder, mean, std

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(diffusion, "load_vision_tower", counting_tower)
        assert cli_main(["train", "decoder", *_argv(tiny_clip_run, shapes_data, out, *RESUME_ARGS)]) == 0
    _reset_accelerate()
    seen.out = out
    return seen


def test_run_folder_is_an_image_variation_pipeline(decoder_run, tiny_clip_run):
    out = decoder_run.out
    pipe = ImageVariationPipeline.from_pretrained(out, local_files_only=True)
    dim = pipe.image_encoder.config.projection_dim
    assert dim == 32
    assert pipe.unet.config.class_embed_type == "projection"
    assert pipe.unet.config.projection_class_embeddings_input_dim == dim
    assert pipe.embedding_tokens.config.num_tokens == 4  # the default K
    assert pipe.embedding_tokens.proj.weight.shape == (4 * pipe.unet.config.cross_attention_dim, dim)
    assert pipe.image_noising_scheduler is None
    assert pipe.feature_extractor.crop_size == {"height": 32, "width": 32}
    # the CLIP run's own vision tower, and its pixel statistics
    original = CLIPVisionModelWithProjection.from_pretrained(tiny_clip_run).state_dict()
    _assert_same(pipe.image_encoder.state_dict(), original)

    record = json.loads((out / "clipcond_run.json").read_text())
    assert record["conditioning"] == "image-embedding"
    assert record["clip"] == {"path": str(tiny_clip_run), "content_hash": content_hash(tiny_clip_run)}
    assert record["image_embedding"]["embedding_tokens"] == 4 and record["image_embedding"]["max_noise_level"] == 0
    assert record["summary"]["steps"] == STEPS and record["ema"]["optimization_step"] == STEPS

    pipe.set_progress_bar_config(disable=True)
    source = Image.open(sorted((Path(record["data"]["path"]) / "test").glob("*.png"))[0])
    images = pipe(source, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert images[0].size == (16, 16)

    assert_ships_its_code(out, "pipeline_variation", "ImageVariationPipeline", "variation.py")
    index = json.loads((out / "model_index.json").read_text())
    assert index["embedding_tokens"] == ["modeling_embedding_tokens", "ImageEmbeddingTokens"]
    assert (out / "embedding_tokens" / "image_embedding.py").is_file()


def test_stock_diffusers_draws_the_runs_variations_without_clipcond(decoder_run, tmp_path):
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    call = {"image": images, "num_inference_steps": 2, "output_type": "np", "seed": 0}
    assert_stock_diffusers_draws_the_same(decoder_run.out, ImageVariationPipeline, tmp_path, **call)


def test_space_to_depth_trains_on_pixel_blocks_and_varies_whole_images(shapes_data, tiny_clip_run, tmp_path):
    """--space-to-depth 2 with image-embedding conditioning: the UNet denoises (12, 8, 8) blocks of the 16 px images,
    the run record and the saved pipeline say so, its images are its samples rearranged back, and stock diffusers
    draws the same without clipcond."""
    out = tmp_path / "run"
    argv = _argv(tiny_clip_run, shapes_data, out, "--max-train-steps", "2", "--checkpointing-steps", "0")
    main([*argv, "--validation-steps", "2", "--space-to-depth", "2"])
    _reset_accelerate()
    unet_config = json.loads((out / "unet" / "config.json").read_text())
    assert (unet_config["in_channels"], unet_config["out_channels"], unet_config["sample_size"]) == (12, 12, 8)
    record = json.loads((out / "clipcond_run.json").read_text())
    assert record["model_space"] == {"space": "pixels", "sample_size": 8, "space_to_depth": 2}
    assert Image.open(out / "validation" / "step-2.png").size == ((1 + PER_SOURCE) * 16, SOURCES * 16)

    pipe = ImageVariationPipeline.from_pretrained(out, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.space_to_depth == 2 and pipe.image_size == 16
    source = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))

    def sample(output_type):
        generator = torch.Generator().manual_seed(0)
        return pipe(source, num_inference_steps=2, generator=generator, output_type=output_type).images

    blocks, images = sample("latent"), sample("pt")
    assert blocks.shape == (1, 12, 8, 8) and images.shape == (1, 3, 16, 16)
    torch.testing.assert_close(images, (torch.nn.functional.pixel_shuffle(blocks.float(), 2) / 2 + 0.5).clamp(0, 1))
    call = {"image": source, "num_inference_steps": 2, "output_type": "np", "seed": 0}
    assert_stock_diffusers_draws_the_same(out, ImageVariationPipeline, tmp_path, **call)


def test_validation_grid_rows_are_sources_then_variations(decoder_run):
    for step in (2, 4):
        grid = Image.open(decoder_run.out / "validation" / f"step-{step}.png")
        assert grid.size == ((1 + PER_SOURCE) * 16, SOURCES * 16)
    # the first column is the source image itself (a shape on a light background), not a sample
    column = np.asarray(grid, dtype=np.float32)[:, :16]
    assert column.mean() > 150


def test_the_vision_tower_runs_once_over_the_data_not_per_step(decoder_run):
    # 240 training images in one batch of 256 into the cache, then the validation sources at each validation
    assert decoder_run.encoder_batches == [240, SOURCES, SOURCES]
    assert not any(p.requires_grad for p in decoder_run.encoder.parameters())
    assert len(list((decoder_run.out / "cache").glob("image-embeddings-*.safetensors"))) == 1


def test_ema_averages_the_tokens_with_the_unet(decoder_run):
    checkpoint = decoder_run.out / "checkpoints" / f"checkpoint-{STEPS}"
    raw = load_file(checkpoint / "model.safetensors")  # the optimizer's weights: UNet and tokens, one module
    ema = _weights(decoder_run.out)
    assert raw.keys() == ema.keys()
    assert any(k.startswith("embedding_tokens.") for k in raw)
    for prefix in ("unet.", "embedding_tokens."):
        assert any(not torch.equal(raw[k], ema[k]) for k in raw if k.startswith(prefix)), prefix
    _assert_same(ema, _weights(checkpoint / "pretrained"))


KILL = [kill_at_step.PATH, "clipcond.train.decoder", "DecoderStage"]  # runs the stage, SIGKILLed after a step


def test_resume_after_sigkill_matches_uninterrupted_run(decoder_run, shapes_data, tiny_clip_run, tmp_path):
    killed, straight = tmp_path / "killed", decoder_run.out
    env = {**os.environ, "CLIPCOND_KILL_AT_STEP": "3"}
    cmd = [sys.executable, *KILL, *_argv(tiny_clip_run, shapes_data, killed, *RESUME_ARGS)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (killed / "unet").exists()
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["checkpoint-2"]

    main(_argv(tiny_clip_run, shapes_data, killed, *RESUME_ARGS, "--resume-from-checkpoint", "latest"))
    _reset_accelerate()
    record = json.loads((killed / "clipcond_run.json").read_text())
    assert record["summary"]["resumed_from"].endswith("checkpoint-2")
    _assert_same(_weights(killed), _weights(straight))
    for name in ("model.safetensors", "extra_state.safetensors"):
        expected = load_file(straight / "checkpoints" / f"checkpoint-{STEPS}" / name)
        _assert_same(load_file(killed / "checkpoints" / f"checkpoint-{STEPS}" / name), expected)


def test_no_tokens_noise_augmentation_no_ema(decoder_run, shapes_data, tiny_clip_run, tmp_path):
    """K = 0: a UNet without cross-attention; --noise-level: a 2D-wide class input and a saved noising schedule;
    --no-ema saves the raw weights. The cache of the first run is reused."""
    out = tmp_path / "run"
    argv = _argv(tiny_clip_run, shapes_data, out, "--max-train-steps", "2", "--checkpointing-steps", "2")
    argv += ["--validation-steps", "0", "--no-ema", "--embedding-tokens", "0", "--noise-level", "300"]
    main([*argv, "--cache-dir", str(decoder_run.out / "cache")])
    _reset_accelerate()
    pipe = ImageVariationPipeline.from_pretrained(out, local_files_only=True)
    assert pipe.embedding_tokens is None and not has_cross_attention(pipe.unet)
    assert pipe.unet.config.projection_class_embeddings_input_dim == 64
    assert pipe.image_noising_scheduler.config.beta_schedule == "squaredcos_cap_v2"
    assert not (out / "cache").exists()
    raw = load_file(out / "checkpoints" / "checkpoint-2" / "model.safetensors")
    _assert_same(_weights(out), raw)
    pipe.set_progress_bar_config(disable=True)
    pixels = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    assert pipe(pixels, num_inference_steps=1, noise_level=300, output_type="np").images.shape == (1, 16, 16, 3)
    record = json.loads((out / "clipcond_run.json").read_text())
    assert record["image_embedding"]["max_noise_level"] == 300 and record["unet"]["cross_attention"] is False


# ------------------------------------------------------------------------------------------- conditioning


def _cache(embeddings: torch.Tensor) -> ImageEmbeddingCache:
    n = embeddings.shape[0]
    return ImageEmbeddingCache(embeddings.half(), torch.arange(n), key="k", path=Path("unused"), skipped=[])


def test_embedding_dropout_swaps_in_the_zero_input():
    raw = torch.randn(6, 8) * 3  # raw projected embeddings, as the cache stores them
    batch = {"index": torch.arange(6).repeat(50)}  # 300 samples
    kept = unclip_decoder.ImageEmbeddingConditioning(_cache(raw), dropout=0.0)(
        batch, torch.Generator(), torch.device("cpu")
    )
    assert kept.encoder_hidden_states is None and kept.encoder_attention_mask is None
    torch.testing.assert_close(kept.class_labels, standardise(raw.half().float()[batch["index"]]))

    dropped = unclip_decoder.ImageEmbeddingConditioning(_cache(raw), dropout=0.3)(
        batch, torch.Generator().manual_seed(0), torch.device("cpu")
    )
    is_zero = (dropped.class_labels == 0).all(dim=1)
    assert 0.2 < is_zero.float().mean() < 0.4
    assert torch.equal(dropped.class_labels[~is_zero], kept.class_labels[~is_zero])


def test_noise_augmentation_draws_levels_up_to_the_maximum():
    raw = torch.randn(4, 8)
    conditioning = unclip_decoder.ImageEmbeddingConditioning(
        _cache(raw), dropout=0.0, noising_scheduler=make_noising_scheduler(), max_noise_level=20
    )
    batch = {"index": torch.arange(4).repeat(100)}
    labels = conditioning(batch, torch.Generator().manual_seed(0), torch.device("cpu")).class_labels
    assert labels.shape == (400, 16)
    # the second half is the level's sinusoidal embedding: 21 distinct ones, every level from 0 to 20 drawn
    assert len(torch.unique(labels[:, 8:], dim=0)) == 21


@pytest.mark.parametrize(
    "option, value, match",
    [
        ("--embedding-tokens", "-1", r"`--embedding-tokens` must be >= 0 \(0: no cross-attention\), got -1"),
        ("--noise-level", "1000", r"`--noise-level` must be in \[0, 999\]"),
        ("--validation-sources", "0", "`--validation-sources` must be >= 1, got 0"),
    ],
)
def test_bad_arguments_are_named(shapes_data, tiny_clip_run, tmp_path, option, value, match):
    with pytest.raises(ValueError, match=match):
        main(_argv(tiny_clip_run, shapes_data, tmp_path / "o", option, value))
    assert not (tmp_path / "o").exists()
